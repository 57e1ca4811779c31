"""CosyVoice 2's flow: yaml read as data, flow.pt loaded strictly, and the cached streamer against CosyVoice's
recompute schedule (law 1: every chunk within 1e-4, fp32) and against itself batched (law 2)."""
from __future__ import annotations

import torch
import pytest

from chorus.tts.cosyvoice.checkpoint import NotACosyVoiceModel, flow_config, load_flow, read_model_yaml
from chorus.tts.cosyvoice.config import FlowConfig, read_cosyvoice_yaml
from chorus.tts.cosyvoice.reference import non_streaming, recompute_stream
from chorus.tts.cosyvoice.streaming import (FINAL_EXACT, FINAL_FLAT, FlowStreamer, HopSchedule, exact_final,
                                            plan_utterance, stream_utterance)
from cosyvoice_factories import TINY_FLOW, flow_yaml, random_flow, write_cosyvoice2_dir, write_flow

TOL = 1e-4


@pytest.fixture(scope="module")
def flow():
    torch.set_num_threads(1)
    return random_flow()


def utterance(seed: int, n: int, prompt: int, vocab: int = TINY_FLOW["vocab_size"]):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n,), generator=g).tolist()
    ptok = torch.randint(0, vocab, (prompt,), generator=g).tolist()
    feat = torch.randn(2 * prompt, 80, generator=g) if prompt else None
    return tokens, torch.randn(192, generator=g), ptok, feat


def max_diff(a: list, b: list) -> float:
    assert [m.shape for m in a] == [m.shape for m in b]
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


# -- the yaml and flow.pt -----------------------------------------------------------------------------------------

def test_yaml_read_as_data_with_refs_resolved(tmp_path):
    path = tmp_path / "cosyvoice2.yaml"
    path.write_text(flow_yaml() + "boom: !apply:builtins.exec ['raise SystemExit(3)']\n"
                    "obj: !new:os.system\n    command: 'false'\n")
    doc = read_cosyvoice_yaml(path)
    assert doc["boom"] == {"!": "!apply:builtins.exec", "args": ["raise SystemExit(3)"]}  # data, never run
    est = doc["flow"]["decoder"]["estimator"]
    assert est["static_chunk_size"] == 50 and est["num_decoding_left_chunks"] == -1  # `!ref <a> * <b>` and `!ref <a>`
    assert doc["flow"]["decoder"]["cfm_params"]["content"]["sigma_min"] == 1e-06
    cfg = FlowConfig.from_mapping(doc["flow"])
    assert cfg.encoder.static_chunk_size == 25 and cfg.inference_cfg_rate == 0.7
    assert cfg.estimator.channels == (TINY_FLOW["estimator_channels"],)


def test_yaml_refusals(tmp_path):
    path = tmp_path / "y.yaml"
    path.write_text("a: 2\nb: !ref <a> + __import__('os')\n")
    with pytest.raises(ValueError, match="only arithmetic"):
        read_cosyvoice_yaml(path)
    path.write_text(flow_yaml().replace("channels: [32]", "channels: [32, 32]"))
    with pytest.raises(ValueError, match="channels"):
        FlowConfig.from_mapping(read_cosyvoice_yaml(path)["flow"])


def test_flow_pt_loads_strictly_and_names_what_is_wrong(tmp_path):
    write_cosyvoice2_dir(tmp_path)
    cfg = flow_config(read_model_yaml(tmp_path))
    model = load_flow(tmp_path / "flow.pt", cfg)
    state = torch.load(tmp_path / "flow.pt", weights_only=True)
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert any(k.startswith("decoder.estimator.mid_blocks.1.1.0.attn1.to_q") for k in state)  # CosyVoice's names

    bad = dict(state)
    bad.pop("encoder.up_encoders.3.self_attn.pos_bias_u")
    bad["encoder.extra.weight"] = torch.zeros(1)
    bad["encoder_proj.weight"] = torch.zeros(80, 3)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(NotACosyVoiceModel) as err:
        load_flow(tmp_path / "bad.pt", cfg)
    msg = str(err.value)
    assert "missing encoder.up_encoders.3.self_attn.pos_bias_u" in msg
    assert "unexpected encoder.extra.weight" in msg and "encoder_proj.weight (80, 3) (expected (80, 64))" in msg


# -- law 1: cached chunks equal CosyVoice's recompute schedule ----------------------------------------------------

def test_hop_schedule_matches_cosyvoice():
    hops = HopSchedule(prompt_len=7, lookahead=3)
    assert hops.prompt_pad == 18 and hops.this_hop() == 43 and not hops.ready(45) and hops.ready(46)
    spans = [hops.advance() for _ in range(4)]
    assert spans == [(0, 43), (43, 93), (93, 193), (193, 293)]  # 25 + pad, then 50, 100, 100 (capped)
    plan = plan_utterance(list(range(260)), [1] * 7, 3)
    assert plan.offsets == [0, 43, 93, 193] and plan.chunks[-1].final and len(plan.chunks[0].tokens) == 7 + 43


@pytest.mark.parametrize("final", [FINAL_FLAT, FINAL_EXACT])
def test_cached_stream_equals_recompute_schedule(flow, final):
    """Prompt (tokens + mel, prompt_token_pad), hops 43, 50, 100 and a final chunk: the cached streamer's chunks
    equal the mel CosyVoice's schedule recomputes for each, within 1e-4."""
    tokens, emb, ptok, feat = utterance(1, 260, 7)
    ref = recompute_stream(flow, tokens, emb, ptok, feat, final)
    streamer = FlowStreamer(flow, slots=1, max_frames=600)
    got = stream_utterance(streamer, tokens, emb, ptok, feat, final)
    assert [m.shape[2] for m in ref] == [86, 100, 200, 134]
    assert max_diff(ref, got) < TOL
    assert all(float(m.abs().max()) > 0.5 for m in got)


def test_cached_stream_without_prompt(flow):
    tokens, emb, _, _ = utterance(2, 120, 0)
    ref = recompute_stream(flow, tokens, emb, (), None, FINAL_FLAT)
    got = stream_utterance(FlowStreamer(flow, slots=1, max_frames=300), tokens, emb, (), None, FINAL_FLAT)
    assert [m.shape[2] for m in got] == [50, 100, 90]
    assert max_diff(ref, got) < TOL


def test_non_streaming_and_short_utterance(flow):
    """Fewer tokens than a hop: one final chunk, CosyVoice's non-streaming flow (full attention)."""
    tokens, emb, ptok, feat = utterance(3, 40, 5)  # 45 tokens: two encoder chunks
    ref = non_streaming(flow, tokens, emb, ptok, feat)
    got = stream_utterance(FlowStreamer(flow, slots=1, max_frames=100), tokens, emb, ptok, feat, FINAL_EXACT)
    assert len(got) == 1 and max_diff([ref], got) < TOL
    flat = stream_utterance(FlowStreamer(flow, slots=1, max_frames=100), tokens, emb, ptok, feat, FINAL_FLAT)
    assert float((flat[0] - ref).abs().max()) > 1e-3  # chunk-causal is not full attention


def test_exact_and_flat_differ_only_in_the_final_chunk(flow):
    tokens, emb, ptok, feat = utterance(4, 150, 7)
    streamer = FlowStreamer(flow, slots=1, max_frames=400)
    exact = stream_utterance(streamer, tokens, emb, ptok, feat, FINAL_EXACT)
    flat = stream_utterance(streamer, tokens, emb, ptok, feat, FINAL_FLAT)
    assert max_diff(exact[:-1], flat[:-1]) == 0.0
    assert float((exact[-1] - flat[-1]).abs().max()) > 1e-3


# -- law 2: streams stepped together equal each alone -------------------------------------------------------------

def test_batched_streams_equal_each_alone(flow):
    """Four streams of different lengths and prompts, started at different steps, stepped together (the CFG pair
    of each in the same batch); flat finals step together too."""
    utts = [utterance(10, 200, 7), utterance(11, 90, 0), utterance(12, 140, 30), utterance(13, 30, 3)]
    plans = [plan_utterance(t, p, flow.cfg.pre_lookahead_len) for t, _, p, _ in utts]
    alone = [stream_utterance(FlowStreamer(flow, slots=1, max_frames=500), t, e, p, f, FINAL_FLAT)
             for t, e, p, f in utts]
    streamer = FlowStreamer(flow, slots=4, max_frames=500)
    states = [None] * 4
    done = [[] for _ in utts]
    start_at = [0, 0, 1, 2]
    batches = 0
    for rnd in range(10):
        active = [i for i in range(4) if rnd >= start_at[i] and len(done[i]) < len(plans[i].chunks)]
        if not active:
            break
        for i in active:
            if states[i] is None:
                states[i] = streamer.open(utts[i][1], utts[i][3])
        mels = streamer.step([states[i] for i in active], [plans[i].chunks[len(done[i])] for i in active])
        batches += len(active) > 1
        for i, mel in zip(active, mels):
            done[i].append(mel)
    for s in states:
        streamer.release(s)
    assert batches >= 2
    for i in range(4):
        assert max_diff(alone[i], done[i]) < TOL


def test_limits_and_bad_chunks(flow):
    streamer = FlowStreamer(flow, slots=1, max_frames=100)
    tokens, emb, _, _ = utterance(5, 60, 0)
    with pytest.raises(ValueError, match="100 mel frames"):
        stream_utterance(streamer, tokens, emb, (), None, FINAL_FLAT)
    assert streamer.pool.used == 0
    with pytest.raises(ValueError, match="max_frames"):
        FlowStreamer(flow, slots=1, max_frames=20000)


# -- a bounded left context (left_chunks): wenet's num_left_chunks masks, flat cost, bounded state ------------------

@pytest.mark.parametrize("left", [0, 2])
def test_bounded_left_context_equals_its_masked_recompute(flow, left):
    """Each chunk sees only `left` chunks before it in every attention stack; the slot is just large enough for that
    context and a 100-token chunk, so the K/V wrap around their ring (more than once for small L); the chunks equal
    the recompute schedule with wenet's left-chunk masks."""
    tokens, emb, ptok, feat = utterance(1, 260, 7)
    ref = recompute_stream(flow, tokens, emb, ptok, feat, FINAL_FLAT, left_chunks=left)
    streamer = FlowStreamer(flow, slots=1, max_frames=4 * (25 * left + 102) + 8)
    assert streamer.max_left_chunks(len(ptok)) == left
    assert len(tokens) + len(ptok) > streamer.enc_kv.ring() and 2 * (len(tokens) + len(ptok)) > streamer.est_kv.ring()
    keys = []
    state = streamer.open(emb, feat, left)
    got = []
    for c in plan_utterance(tokens, ptok, flow.cfg.pre_lookahead_len).chunks:
        got += streamer.step([state], [c])
        keys.append(dict(streamer.max_keys))
    streamer.release(state)
    assert max_diff(ref, got) < TOL
    assert all(k["encoder"] <= (left + 1) * 25 and k["up-encoder"] <= k["estimator"] <= (left + 1) * 50 for k in keys)
    full = recompute_stream(flow, tokens, emb, ptok, feat, FINAL_FLAT)
    assert float((full[-1] - got[-1]).abs().max()) > 1e-3  # it is not CosyVoice 2's full left context


def test_left_context_covering_the_utterance_equals_the_default_exactly(flow):
    tokens, emb, ptok, feat = utterance(1, 260, 7)
    streamer = FlowStreamer(flow, slots=1, max_frames=1600)
    left = streamer.max_left_chunks(len(ptok))
    assert left * 25 >= len(tokens) + len(ptok)  # every chunk still sees every earlier one
    for final in (FINAL_FLAT, FINAL_EXACT):
        assert max_diff(stream_utterance(streamer, tokens, emb, ptok, feat, final),
                        stream_utterance(streamer, tokens, emb, ptok, feat, final, left_chunks=left)) == 0.0


def test_bounded_and_full_streams_batched_equal_each_alone(flow):
    utts = [(utterance(20, 230, 7), 1), (utterance(21, 160, 0), None), (utterance(22, 200, 3), 0)]
    alone = [stream_utterance(FlowStreamer(flow, slots=1, max_frames=480), t, e, p, f, FINAL_FLAT, left_chunks=left)
             for (t, e, p, f), left in utts]
    streamer = FlowStreamer(flow, slots=3, max_frames=480)
    plans = [plan_utterance(t, p, flow.cfg.pre_lookahead_len).chunks for (t, _, p, _), _ in utts]
    states = [streamer.open(e, f, left) for (_, e, _, f), left in utts]
    done = [[] for _ in utts]
    while any(len(d) < len(p) for d, p in zip(done, plans)):
        active = [i for i in range(3) if len(done[i]) < len(plans[i])]
        for i, mel in zip(active, streamer.step([states[i] for i in active], [plans[i][len(done[i])] for i in active])):
            done[i].append(mel)
    for s in states:
        streamer.release(s)
    for i in range(3):
        assert max_diff(alone[i], done[i]) < TOL


def test_bounded_context_limits(flow):
    streamer = FlowStreamer(flow, slots=1, max_frames=400)  # 200 token rows: a ring of 100
    most = streamer.max_left_chunks(0)
    assert most == -1  # the widest chunk (100 tokens + lookahead) does not fit in a ring of 100 rows
    big = FlowStreamer(flow, slots=1, max_frames=600)
    assert big.max_left_chunks(0) == (150 - 102) // 25 == 1 and big.max_left_chunks(90) == 0  # 90 + 10 + 25 tokens
    tokens, emb, _, _ = utterance(5, 300, 0)
    with pytest.raises(ValueError, match="bounded stream holds"):
        stream_utterance(streamer, tokens, emb, (), None, FINAL_FLAT, left_chunks=1)
    with pytest.raises(ValueError, match="left_chunks"):
        streamer.open(emb, None, -1)
    assert streamer.pool.used == 0
