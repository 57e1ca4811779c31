"""Decoder heads of NeMo's hybrid models: the CTC projection and the RNNT predictor + joint.

Parameter names follow NeMo (`decoder_layers.0`, `prediction.embed`, `prediction.dec_rnn.lstm`,
`pred`, `enc`, `joint_net.N`).  The blank token is the last index (`vocab_size`).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import rows_kernel
from ..packed_linear import packed_linear


class CTCHead(nn.Module):
    """NeMo's ConvASRDecoder: a 1x1 convolution to vocab + blank."""

    def __init__(self, feat_in: int, vocab_size: int):
        super().__init__()
        self.blank = vocab_size
        self.decoder_layers = nn.Sequential(nn.Conv1d(feat_in, vocab_size + 1, kernel_size=1, bias=True))

    def forward(self, encoded: torch.Tensor) -> torch.Tensor:
        """encoded [B, T, d] -> logits [B, T, vocab + 1] (the 1x1 convolution as a matrix product)."""
        conv = self.decoder_layers[0]
        return packed_linear(conv, encoded, conv.weight.squeeze(-1), conv.bias, key=conv.weight)


def product(owner: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
            ) -> torch.Tensor:
    """F.linear(x, weight, bias) through `packed_linear`, in the weight's dtype and back to x's.  With `--dtype
    bf16` the LSTM's and the joint's two projections have bf16 weights (8 of the ~11 MB a label step reads at
    the real size), while the LSTM state, the gates' sums and the joint's output layer (the logits) stay fp32
    (precision.py)."""
    if x.dtype == weight.dtype:
        return packed_linear(owner, x, weight, bias)
    return packed_linear(owner, x.to(weight.dtype), weight, bias).to(x.dtype)


class RNNTPredictor(nn.Module):
    """NeMo's RNNTDecoder prediction network: embedding (blank as padding) + LSTM."""

    def __init__(self, vocab_size: int, pred_hidden: int, layers: int = 1, dropout: float = 0.0):
        super().__init__()
        self.blank = vocab_size
        self.hidden = pred_hidden
        self.layers = layers
        self.prediction = nn.ModuleDict({
            "embed": nn.Embedding(vocab_size + 1, pred_hidden, padding_idx=vocab_size),
            "dec_rnn": _LSTMDropout(pred_hidden, pred_hidden, layers, dropout),
        })

    def embed(self, labels: torch.Tensor) -> torch.Tensor:
        # The start symbol is the blank; NeMo feeds it as a zero vector.
        emb = self.prediction["embed"](labels.clamp(max=self.blank))
        return emb.masked_fill((labels == self.blank).unsqueeze(-1), 0.0)

    def step(self, labels: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One label per stream: labels [B], state (h, c) each [layers, B, H] -> g [B, H].

        The LSTM cell is written out (PyTorch's gate order i, f, g, o, with nn.LSTM's own weights):
        for one time step of a few streams torch's fused LSTM call costs ~1 ms of overhead on CPU,
        the one matrix product per layer below ~0.1 ms, and decoding calls this once per emitted label."""
        lstm = self.prediction["dec_rnn"].lstm
        (h, c), training = state, torch.is_grad_enabled()
        x = self.embed(labels) if training else None
        hs, cs = [], []
        for k in range(self.layers):
            w_ih, w_hh = getattr(lstm, f"weight_ih_l{k}"), getattr(lstm, f"weight_hh_l{k}")
            b_ih, b_hh = getattr(lstm, f"bias_ih_l{k}"), getattr(lstm, f"bias_hh_l{k}")
            if training:
                gates = torch.addmm(torch.addmm(b_ih, x, w_ih.t()) + b_hh, h[k], w_hh.t())
            elif k == 0:  # the input half is a row of a table (one per label), so only W_hh is read per label
                gates = product(self, h[0], w_hh).add_(
                    self._input_gates(w_ih, b_ih, b_hh).index_select(0, labels.clamp(max=self.blank)))
            else:  # one product over [x, h] with both weights side by side (packed once: decoding runs this per label)
                gates = product(self, torch.cat([x, h[k]], dim=1), *self._fused_gates(k, w_ih, w_hh, b_ih, b_hh))
            i, f, g, o = gates.chunk(4, dim=1)
            c_k = torch.sigmoid(f) * c[k] + torch.sigmoid(i) * torch.tanh(g)
            x = torch.sigmoid(o) * torch.tanh(c_k)
            hs.append(x)
            cs.append(c_k)
        return x, (torch.stack(hs), torch.stack(cs))

    def emitting_kernel(self, h: torch.Tensor):
        """chorus' kernel for `step_emitting` where it applies, else None: inference on CPU with fp32 state and a
        one-layer LSTM with bf16 weights (the kernel's sigmoid and tanh are within 2e-7 of torch's, not equal, so
        fp32 decoding keeps `step`)."""
        lstm = self.prediction["dec_rnn"].lstm
        if (self.layers != 1 or torch.is_grad_enabled() or lstm.weight_hh_l0.dtype != torch.bfloat16
                or not h.is_cpu or h.dtype != torch.float32 or self.hidden % 16):
            return None
        return rows_kernel.fused("lstm_cell")

    def step_emitting(self, labels: torch.Tensor, emit: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
                      out: torch.Tensor) -> None:
        """`step` for the streams where `emit` is set, written in place into h, c [1, B, H] and out [B, H]
        (contiguous, owned by the caller); the other streams keep theirs.  One kernel pass instead of the ~20
        operations of `step` and the selects after it; `emitting_kernel(h)` must be on."""
        lstm = self.prediction["dec_rnn"].lstm
        table = self._input_gates(lstm.weight_ih_l0, lstm.bias_ih_l0, lstm.bias_hh_l0)
        hh = product(self, h[0], lstm.weight_hh_l0).contiguous()
        labels, emit = labels.contiguous(), emit.to(torch.uint8).contiguous()
        kernel = rows_kernel.fused("lstm_cell")
        if kernel(h.shape[1], self.hidden, table.shape[0], hh.data_ptr(), table.data_ptr(), labels.data_ptr(),
                  emit.data_ptr(), h.data_ptr(), c.data_ptr(), out.data_ptr()):
            raise ValueError("lstm_cell kernel rejected its arguments (a label outside the vocabulary?)")

    def _input_gates(self, w_ih, b_ih, b_hh) -> torch.Tensor:
        """Layer 0's input half of the gates for every label, W_ih embed(label) + b_ih + b_hh: [vocab + 1, 4H].
        Layer 0's input is one of vocab + 1 embeddings, so a label step gathers its row instead of reading W_ih
        (half of the predictor's weights) again; the blank's row is the biases alone, as NeMo feeds the blank
        as a zero vector."""
        def build():  # fp32 whatever the weights' dtype: it is read a row at a time
            bias = (b_ih.float() + b_hh.float()).detach()
            table = torch.addmm(bias, emb.detach().float(), w_ih.detach().float().t())
            table[self.blank] = bias
            return table

        emb = self.prediction["embed"].weight
        return self._built_once("input_table", (emb, w_ih, b_ih, b_hh), build)

    def _fused_gates(self, k, w_ih, w_hh, b_ih, b_hh) -> tuple[torch.Tensor, torch.Tensor]:
        """[W_ih | W_hh] and b_ih + b_hh of layer k."""
        return self._built_once(("fused", k), (w_ih, w_hh, b_ih, b_hh),
                                lambda: (torch.cat([w_ih, w_hh], dim=1).detach(), (b_ih + b_hh).detach()))

    def _built_once(self, key, inputs: tuple[torch.Tensor, ...], build):
        """build()'s result, kept under `key` and built again only when one of `inputs` changes (in place, or
        replaced as Module.to does): decoding calls the predictor once per label."""
        stamp = tuple((t.data_ptr(), t._version, t.dtype) for t in inputs)
        built = self.__dict__.setdefault("_built", {})
        if key not in built or built[key][0] != stamp:
            built[key] = (stamp, build())
        return built[key][1]

    def forward(self, targets: torch.Tensor) -> torch.Tensor:
        """Training: targets [B, U] -> predictor outputs [B, U + 1, H] (blank/SOS prepended)."""
        emb = self.embed(targets)
        emb = torch.cat([torch.zeros_like(emb[:, :1]), emb], dim=1)
        out, _ = self.prediction["dec_rnn"](emb.transpose(0, 1))
        return out.transpose(0, 1)

    def initial_state(self, batch: int, device=None, dtype=torch.float32):
        z = torch.zeros(self.layers, batch, self.hidden, device=device, dtype=dtype)
        return z, z.clone()


class _LSTMDropout(nn.Module):
    """Holds the LSTM under the name `lstm` (NeMo's LSTMDropout) and applies output dropout."""

    def __init__(self, input_size: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden, layers, dropout=dropout if layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout) if dropout else None

    def forward(self, x, state=None):
        out, state = self.lstm(x, state)
        return (self.dropout(out) if self.dropout is not None else out), state


class RNNTJoint(nn.Module):
    """NeMo's RNNTJoint: project encoder and predictor, add, activation, (dropout), output layer."""

    def __init__(self, enc_hidden: int, pred_hidden: int, joint_hidden: int, vocab_size: int,
                 activation: str = "relu", dropout: float = 0.0):
        super().__init__()
        self.pred = nn.Linear(pred_hidden, joint_hidden)
        self.enc = nn.Linear(enc_hidden, joint_hidden)
        acts = {"relu": nn.ReLU(), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid()}
        if activation not in acts:
            raise ValueError(f"joint activation {activation!r} is not one of {sorted(acts)}")
        layers = [acts[activation]] + ([nn.Dropout(dropout)] if dropout else []) + \
            [nn.Linear(joint_hidden, vocab_size + 1)]
        self.joint_net = nn.Sequential(*layers)

    def project_encoder(self, encoded: torch.Tensor) -> torch.Tensor:
        return product(self.enc, encoded, self.enc.weight, self.enc.bias)

    def project_prediction(self, pred_out: torch.Tensor) -> torch.Tensor:
        return product(self.pred, pred_out, self.pred.weight, self.pred.bias)

    def forward(self, enc_proj: torch.Tensor, pred_proj: torch.Tensor) -> torch.Tensor:
        """Projected encoder [..., H] + projected predictor [..., H] -> logits [..., vocab + 1]."""
        *hidden, out = self.joint_net
        x = enc_proj + pred_proj
        for layer in hidden:
            x = layer(x)
        return product(out, x, out.weight, out.bias)
