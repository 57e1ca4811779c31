#!/usr/bin/env python3
"""CosyVoice's own code for bench/cosyvoice_parity.py and bench/tts_cosyvoice.py. Run it in CosyVoice's venv
(never chorus's), with the reference checkout on the path:

    /work/cosy-venv/bin/python bench/cosyvoice_reference.py make DIR [--seed S]
    /work/cosy-venv/bin/python bench/cosyvoice_reference.py stream DIR IN.pt OUT.pt [--chunks K] [--threads N]
    /work/cosy-venv/bin/python bench/cosyvoice_reference.py concurrent DIR IN.pt OUT.pt --streams N [--chunks K]

make: builds CosyVoice's flow and HiFT from DIR/cosyvoice2.yaml with HyperPyYAML, as CosyVoice's CLI does (the llm:
section overridden to None), gives every parameter a random value of a trained-like scale (seeded), and saves
DIR/flow.pt and DIR/hift.pt as CosyVoice does (`torch.save(module.state_dict())`), so the layout is theirs.

stream: loads them back as CosyVoiceModel.load does (strict, `generator.` dropped from the HiFT's names), and runs
CosyVoice2Model.tts(stream=True) unchanged, its LLM thread replaced by one that hands over IN.pt's tokens at once.
tts() then streams on its own hop schedule (25 tokens + the prompt's pad, growing to 100) through token2wav, which
re-runs the flow over every token so far and vocodes the new mel behind the HiFT caches. torch.manual_seed(seed) is
set just before, so the HiFT's noise is the global RNG's from that seed (the flow's noise is its fixed buffer).
OUT.pt holds per chunk: the token offset, the new mel token2wav vocoded (the flow's output from the offset), the
audio, and the CPU and wall seconds of that token2wav call. --chunks K stops after K chunks (a long stream's
later chunks cost the most). One chunk goes through a throw-away model first (torch's first calls are slow).

concurrent: N such streams at once, each tts() generator in its own thread (as CosyVoice serves concurrent
requests: one model, one uuid per session); OUT.pt has each chunk's wall time from the start, the total wall
time and the process's CPU seconds.

Only the flow and HiFT modules and CosyVoice2Model are used; three modules on their import path are stubs:
cosyvoice.utils.onnx (the online speech tokenizer: torchaudio and a model file; online features off),
cosyvoice.llm.llm (the LLM: transformers) and cosyvoice.utils.file_utils (TensorRT / vLLM export: torchaudio);
matcha.utils is imported without its package __init__ (hydra, rich, gdown, matplotlib), its pylogger as is.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import types
from pathlib import Path

# A checkout of FunAudioLLM/CosyVoice (measured at ace7c47) with third_party/Matcha-TTS at its pinned commit
# (dd9105b); $COSYVOICE_ROOT says where.
REF = Path(os.environ.get("COSYVOICE_ROOT", "/work/ref/CosyVoice"))
sys.path[:0] = [str(REF), str(REF / "third_party" / "Matcha-TTS")]
# Stubs for modules on the import path that token-to-wave never uses (they need torchaudio or transformers):
sys.modules["cosyvoice.utils.onnx"] = types.SimpleNamespace(  # flow.py's online speech tokenizer: off
    SpeechTokenExtractor=None, online_feature=False, onnx_path=None)
sys.modules["cosyvoice.llm.llm"] = types.SimpleNamespace(  # class_utils' LLM classes (the LLM is replaced)
    TransformerLM=None, Qwen2LM=None, CosyVoice3LM=None)
sys.modules["cosyvoice.utils.file_utils"] = types.SimpleNamespace(  # model.py's TensorRT / vLLM export helpers
    convert_onnx_to_trt=None, export_cosyvoice2_vllm=None)
_matcha_utils = types.ModuleType("matcha.utils")  # its package __init__ pulls hydra, rich, gdown, matplotlib
_matcha_utils.__path__ = [str(REF / "third_party" / "Matcha-TTS" / "matcha" / "utils")]  # its modules load as is
sys.modules["matcha.utils"] = _matcha_utils

import torch  # noqa: E402
from hyperpyyaml import load_hyperpyyaml  # noqa: E402


def build(model_dir: Path):
    with open(model_dir / "cosyvoice2.yaml") as f:
        configs = load_hyperpyyaml(f, overrides={"llm": None})
    return configs["flow"], configs["hift"]


def randomize(flow, hift, seed: int) -> None:
    """Trained-like scales: norms' gains near 1, small biases, weights ~ N(0, 1/fan_in); HiFT's weight norm kept as
    (g, v) with g = ||v|| (the effective weight is v), Snake alphas in [0.5, 1.5), the F0 head scaled to tens to
    hundreds of Hz and conv_post's to small log-magnitudes. Same scheme as tests/cosyvoice_factories.py."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in flow.named_parameters():
            if "norm" in name and name.endswith("weight") or name.endswith("block.2.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias") or "pos_bias" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
        params = dict(hift.named_parameters())
        for name, p in params.items():
            if name.endswith("alpha"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif name.endswith("original0"):
                continue  # set from its v below
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
        for name, p in params.items():
            if name.endswith("original0"):
                v = params[name[:-1] + "1"]
                p.copy_(v.norm(2, dim=tuple(range(1, v.dim())), keepdim=True))
        hift.f0_predictor.classifier.weight.mul_(40.0)
        params["conv_post.parametrizations.weight.original0"].mul_(0.1)


def load(model_dir: Path):
    """CosyVoiceModel.load's way: strict state dicts, the HiFT's `generator.` prefix dropped."""
    flow, hift = build(model_dir)
    flow.load_state_dict(torch.load(model_dir / "flow.pt", map_location="cpu", weights_only=True), strict=True)
    state = torch.load(model_dir / "hift.pt", map_location="cpu", weights_only=True)
    hift.load_state_dict({k.replace("generator.", ""): v for k, v in state.items()}, strict=True)
    return flow.eval(), hift.eval()


def new_model(flow, hift):
    from cosyvoice.cli.model import CosyVoice2Model
    return CosyVoice2Model(None, flow, hift, fp16=False)  # a fresh one per stream: tts() grows token_hop_len on it


class Recorder:
    """Wraps the model's flow.inference and token2wav to keep each chunk's mel, audio and cost (per thread)."""

    def __init__(self, model):
        self.model = model
        self.local = threading.local()
        inner_flow, inner_t2w = model.flow.inference, model.token2wav

        def flow_inference(*a, **kw):
            mel, x = inner_flow(*a, **kw)
            self.local.mel = mel
            return mel, x

        def token2wav(*a, **kw):
            c0, w0 = time.thread_time(), time.perf_counter()
            audio = inner_t2w(*a, **kw)
            c1, w1 = time.thread_time(), time.perf_counter()
            offset = kw["token_offset"]
            mel = self.local.mel[:, :, offset * model.flow.token_mel_ratio:].clone()
            self.local.chunks.append({"token_offset": offset, "mel": mel, "audio": audio.clone(),
                                      "audio_samples": audio.shape[1],
                                      "cpu_s": c1 - c0, "wall_s": w1 - w0, "end_wall": w1,
                                      "finalize": kw.get("finalize", False)})
            return audio

        model.flow.inference = flow_inference
        model.token2wav = token2wav

    def run(self, inputs: dict, chunks: int | None):
        """One tts(stream=True) session over the given tokens; returns its chunk records."""
        model = self.model
        self.local.chunks = []
        tokens = [int(t) for t in inputs["tokens"].reshape(-1)]

        def llm_job(text, prompt_text, llm_prompt_speech_token, llm_embedding, uuid):
            with model.lock:
                model.tts_speech_token_dict[uuid].extend(tokens)
                model.llm_end_dict[uuid] = True

        model.llm_job = llm_job
        gen = model.tts(flow_embedding=inputs["embedding"], flow_prompt_speech_token=inputs["prompt_token"],
                        prompt_speech_feat=inputs["prompt_feat"], stream=True)
        for i, _ in enumerate(gen):
            if chunks is not None and i + 1 >= chunks:
                gen.close()
                break
        return self.local.chunks


def cmd_make(args):
    d = Path(args.dir)
    flow, hift = build(d)
    randomize(flow, hift, args.seed)
    torch.save(flow.state_dict(), d / "flow.pt")
    torch.save(hift.state_dict(), d / "hift.pt")
    print(f"wrote {d / 'flow.pt'} ({sum(p.numel() for p in flow.parameters())} parameters) and {d / 'hift.pt'} "
          f"({sum(p.numel() for p in hift.parameters())})")


def cmd_stream(args):
    torch.set_num_threads(args.threads)
    flow, hift = load(Path(args.dir))
    inputs = torch.load(args.inputs, weights_only=True)
    warm_up(flow, hift, inputs)
    rec = Recorder(new_model(flow, hift))
    torch.manual_seed(int(inputs["seed"]))
    t0 = time.perf_counter()
    chunks = rec.run(inputs, args.chunks)
    for c in chunks:
        c["end_wall"] -= t0
    torch.save({"chunks": chunks, "threads": torch.get_num_threads()}, args.out)


def warm_up(flow, hift, inputs: dict) -> None:
    """One chunk through a throw-away model first, so that the timed run does not pay torch's first calls."""
    Recorder(new_model(flow, hift)).run(inputs, 1)


def cmd_concurrent(args):
    torch.set_num_threads(args.threads)
    flow, hift = load(Path(args.dir))
    inputs = torch.load(args.inputs, weights_only=True)
    warm_up(flow, hift, inputs)
    results = [None] * args.streams
    barrier = threading.Barrier(args.streams + 1)

    def one(i):
        rec = Recorder(new_model(flow, hift))  # its own CosyVoice2Model (hop state) over the shared modules
        barrier.wait()
        results[i] = rec.run(inputs, args.chunks)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(args.streams)]
    for t in threads:
        t.start()
    barrier.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    for t in threads:
        t.join()
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    for chunks in results:
        for c in chunks:
            c["end_wall"] -= t0
            del c["mel"], c["audio"]
    torch.save({"streams": results, "total_s": total, "cpu_s": cpu, "threads": torch.get_num_threads()}, args.out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    for name in ("stream", "concurrent"):
        p = sub.add_parser(name)
        p.add_argument("dir")
        p.add_argument("inputs")
        p.add_argument("out")
        p.add_argument("--chunks", type=int, default=None)
        p.add_argument("--threads", type=int, default=1)
        if name == "concurrent":
            p.add_argument("--streams", type=int, required=True)
    args = ap.parse_args()
    {"make": cmd_make, "stream": cmd_stream, "concurrent": cmd_concurrent}[args.cmd](args)


if __name__ == "__main__":
    main()
