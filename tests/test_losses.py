"""Training losses against straightforward references."""
import math

import torch

from chorus.asr.conformer.losses import ctc_loss, rnnt_loss


def rnnt_reference(lp, y, blank):
    """The textbook alpha recursion, one cell at a time, in float64."""
    t_len, u1, _ = lp.shape
    alpha = [[-math.inf] * u1 for _ in range(t_len)]
    alpha[0][0] = 0.0
    for t in range(t_len):
        for u in range(u1):
            if t == 0 and u == 0:
                continue
            a = alpha[t - 1][u] + lp[t - 1, u, blank].item() if t > 0 else -math.inf
            b = alpha[t][u - 1] + lp[t, u - 1, y[u - 1]].item() if u > 0 else -math.inf
            alpha[t][u] = max(a, b) + math.log1p(math.exp(-abs(a - b))) if max(a, b) > -math.inf else -math.inf
    return -(alpha[t_len - 1][u1 - 1] + lp[t_len - 1, u1 - 1, blank].item())


def test_rnnt_loss_matches_reference_with_padding():
    torch.manual_seed(0)
    b, t_max, u_max, v = 3, 7, 4, 6
    blank = v - 1
    lp = torch.randn(b, t_max, u_max + 1, v, dtype=torch.float64).log_softmax(-1)
    targets = torch.randint(0, blank, (b, u_max))
    t_len = torch.tensor([7, 5, 3])
    u_len = torch.tensor([4, 2, 0])
    ours = rnnt_loss(lp, targets, t_len, u_len, blank)
    for i in range(b):
        ref = rnnt_reference(lp[i, :t_len[i], :u_len[i] + 1], targets[i, :u_len[i]].tolist(), blank)
        assert abs(ours[i].item() - ref) < 1e-9, i


def test_rnnt_loss_gradients_flow_and_are_finite():
    torch.manual_seed(1)
    logits = torch.randn(2, 20, 6, 9, requires_grad=True)
    loss = rnnt_loss(logits.log_softmax(-1), torch.randint(0, 8, (2, 5)), torch.tensor([20, 12]),
                     torch.tensor([5, 3]), 8).sum()
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_ctc_loss_is_per_utterance():
    torch.manual_seed(2)
    logits = torch.randn(2, 10, 5)
    targets = torch.tensor([[1, 2, 3], [2, 2, 0]])
    losses = ctc_loss(logits, targets, torch.tensor([10, 6]), torch.tensor([3, 2]), blank=4)
    alone = ctc_loss(logits[1:, :6], targets[1:, :2], torch.tensor([6]), torch.tensor([2]), blank=4)
    assert losses.shape == (2,) and abs(losses[1].item() - alone[0].item()) < 1e-5


def test_hybrid_loss_weights_and_ctc_only_phase():
    from chorus.asr.conformer.losses import hybrid_loss
    from factories import tiny_model

    model = tiny_model(seed=3).train()
    torch.manual_seed(0)
    mel = torch.randn(2, 80, 60)
    lengths, targets, target_lengths = torch.tensor([60, 44]), torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([3, 2])
    torch.manual_seed(1)
    mixed, parts = hybrid_loss(model, mel, lengths, targets, target_lengths, (70, 13), 0.3)
    assert set(parts) == {"rnnt", "ctc"}
    assert abs(mixed.item() - (0.7 * parts["rnnt"] + 0.3 * parts["ctc"])) < 1e-4
    torch.manual_seed(1)
    ctc_only, parts_ctc = hybrid_loss(model, mel, lengths, targets, target_lengths, (70, 13), 1.0)
    assert set(parts_ctc) == {"ctc"}  # the transducer lattice is not computed at all
    assert abs(ctc_only.item() - parts["ctc"]) < 1e-4
    model.zero_grad()
    ctc_only.backward()
    assert all(p.grad is None for p in model.joint.parameters())
    assert model.ctc_decoder.decoder_layers[0].weight.grad is not None
