"""Train chorus's default English model: a hybrid RNNT+CTC cache-aware FastConformer.

Runs in chorus's own model code (the modules that stream), trains all lookaheads at once as
NeMo's multi-lookahead models do (one attention context drawn per batch), keeps checkpoints
and resumes from the last one, and exports the result as a .nemo.

    python recipes/default_asr/train.py --corpus recipes/default_asr/work/corpus \
        --work recipes/default_asr/work/train --export chorus/models/default_asr.nemo
"""
from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from chorus.asr.conformer.asr_model import FastConformerModel, ModelSpec, RNNTConfig  # noqa: E402
from chorus.asr.conformer.checkpoint import load_fastconformer, save_fastconformer  # noqa: E402
from chorus.asr.conformer.decoding import ctc_offline, rnnt_offline  # noqa: E402
from chorus.asr.conformer.losses import hybrid_loss  # noqa: E402
from chorus.asr.conformer.model import EncoderConfig  # noqa: E402
from chorus.asr.textnorm import normalize_text  # noqa: E402
from chorus.asr.tokenizer import SentencePieceTokenizer  # noqa: E402
from chorus.stream.features import MelConfig  # noqa: E402

import data  # noqa: E402

CONTEXTS = ((70, 13), (70, 6), (70, 1), (70, 0))  # 1040, 480, 80, 0 ms lookahead
SIZES = {
    # name: (d_model, layers, heads, subsampling channels, pred/joint hidden)
    "tiny": (32, 2, 2, 16, 32),
    "small": (144, 8, 4, 64, 256),
    "medium": (144, 12, 4, 144, 256),
}


def build_spec(size: str, vocab: int) -> ModelSpec:
    d, layers, heads, ch, hidden = SIZES[size]
    enc = EncoderConfig(feat_in=80, n_layers=layers, d_model=d, n_heads=heads, subsampling_conv_channels=ch,
                        conv_kernel_size=9, att_context_size=CONTEXTS, att_context_style="chunked_limited",
                        conv_norm_type="layer_norm", dropout=0.1, dropout_pre_encoder=0.1, dropout_emb=0.0,
                        dropout_att=0.1)
    rnnt = RNNTConfig(pred_hidden=hidden, pred_rnn_layers=1, pred_dropout=0.1, joint_hidden=hidden,
                      joint_dropout=0.1, max_symbols=10)
    return ModelSpec(mel=MelConfig(), encoder=enc, vocab_size=vocab, rnnt=rnnt, ctc=True)


def train_tokenizer(texts: list[str], vocab_size: int, path: Path) -> SentencePieceTokenizer:
    if not path.exists():
        out = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=out, vocab_size=vocab_size,
                                       model_type="bpe", character_coverage=1.0, bos_id=-1, eos_id=-1,
                                       input_sentence_size=200000, shuffle_input_sentence=True, minloglevel=2)
        path.write_bytes(out.getvalue())
    return SentencePieceTokenizer.from_file(path)


def lr_at(step: int, peak: float, warmup: int, total: int, floor: float = 0.05) -> float:
    """Linear warm-up, then cosine decay to floor * peak at `total` steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: FastConformerModel, tokenizer, rows: list[dict], context, limit: int = 200) -> dict:
    """Greedy WER of both heads on (up to `limit`) utterances, offline with the streaming mask."""
    import jiwer

    model.eval()
    rows = rows[:limit]
    ds = data.UtteranceDataset(rows, tokenizer, model.frontend, train=False)
    refs, hyp = [], {"rnnt": [], "ctc": []}
    for start in range(0, len(ds), 16):
        mel, mel_len, _, _ = data.collate([ds[i] for i in range(start, min(len(ds), start + 16))])
        enc, enc_len = model.encoder(mel, mel_len, context)
        for name, ids in (("rnnt", rnnt_offline(model.joint, model.decoder, enc, enc_len)),
                          ("ctc", ctc_offline(model.ctc_decoder, enc, enc_len))):
            hyp[name] += [normalize_text(tokenizer.decode(i)) for i in ids]
        refs += [normalize_text(r["text"]) for r in rows[start:start + 16]]
    model.train()
    return {name: jiwer.wer(refs, h) for name, h in hyp.items()}


def save_checkpoint(path: Path, model, opt, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "state": state}, tmp)
    tmp.replace(path)


def average_snapshots(work: Path, last_step: int, n: int) -> dict:
    """Mean weights of the n latest stepN.pt snapshots up to last_step (checkpoint averaging: the
    last steps of a decayed schedule wander around a minimum; their mean usually sits closer)."""
    steps = sorted(int(p.stem[4:]) for p in work.glob("step*.pt") if p.stem[4:].isdigit())
    chosen = [s for s in steps if s <= last_step][-n:]
    if len(chosen) < n:
        raise SystemExit(f"--average {n}: only {len(chosen)} snapshots up to step {last_step} in {work}")
    states = [torch.load(work / f"step{s}.pt", map_location="cpu", weights_only=True)["model"] for s in chosen]
    print(f"averaging the weights of steps {chosen}", flush=True)
    return {k: sum(st[k] for st in states) / n if states[0][k].is_floating_point() else states[-1][k]
            for k in states[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=HERE / "work" / "corpus")
    p.add_argument("--work", type=Path, default=HERE / "work" / "train")
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--vocab-size", type=int, default=256)
    p.add_argument("--max-steps", type=int, default=34000)
    p.add_argument("--batch-seconds", type=float, default=80.0, help="padded audio seconds per batch")
    p.add_argument("--max-batch-items", type=int, default=48)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--weight-decay", type=float, default=1e-3)
    p.add_argument("--ctc-weight", type=float, default=0.3)
    p.add_argument("--init-from", type=Path, default=None,
                   help="fine-tune: start from this .nemo's weights and tokenizer (a fresh optimizer; no CTC-only "
                        "or clean-only phase unless asked for)")
    p.add_argument("--vtlp", type=float, default=0.0,
                   help="probability of vocal tract length perturbation per training utterance (a warped "
                        "filterbank, factor 0.88..1.12): new speakers from the same voices")
    p.add_argument("--tilt", type=float, default=0.0,
                   help="probability of a random spectral tilt (-3..+3 dB per octave) per training utterance")
    p.add_argument("--curriculum-steps", type=int, default=None,
                   help="train without augmentation this long (the first epoch also goes shortest first); "
                        "default 11000, 0 with --init-from")
    p.add_argument("--ctc-only-steps", type=int, default=None,
                   help="CTC loss alone this long: with the hybrid loss from the start, the RNNT predictor "
                        "learns the text's language model and the encoder stays on the blank plateau; "
                        "default 800, 0 with --init-from")
    p.add_argument("--fsdd-repeat", type=int, default=4,
                   help="present each FSDD (real speech) clip this many times per epoch, the copies augmented")
    p.add_argument("--max-duration", type=float, default=16.0, help="skip longer training utterances")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (weights stay fp32)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=400)
    p.add_argument("--eval-limit", type=int, default=200, help="dev utterances per evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--snapshot-every", type=int, default=500,
                   help="keep stepN.pt every N steps (0: off); with --average K > 1 only the last K are written")
    p.add_argument("--average", type=int, default=4,
                   help="export the mean weights of the last K snapshots (--snapshot-every), not the last step")
    p.add_argument("--export", type=Path, default=None, help="write the final model here as .nemo")
    p.add_argument("--export-dtype", choices=("float32", "float16"), default="float32",
                   help="how the export stores its weights: float16 halves the file (loaders cast back to fp32)")
    p.add_argument("--smoke", action="store_true", help="a few steps of a tiny model (CI)")
    args = p.parse_args()
    # a model from scratch gets a CTC-only start, a clean-only curriculum and a shortest-first first epoch
    fresh = args.init_from is None
    if args.curriculum_steps is None:
        args.curriculum_steps = 11000 if fresh else 0
    if args.ctc_only_steps is None:
        args.ctc_only_steps = 800 if fresh else 0
    if args.smoke:
        args.size, args.max_steps, args.warmup, args.vocab_size = "tiny", 4, 1, 64
        args.save_every, args.eval_every, args.batch_seconds, args.eval_limit = 2, 3, 20.0, 3
        args.curriculum_steps, args.ctc_only_steps = 1, 1
        args.snapshot_every, args.average = 1, 2
    if args.average > 1 and not args.snapshot_every:
        p.error(f"--average {args.average} needs snapshots: give --snapshot-every N, or --average 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)

    train_rows = [r for r in data.read_manifest(args.corpus / "train.json") if r["duration"] <= args.max_duration]
    train_rows = data.repeat_source(train_rows, "fsdd", args.fsdd_repeat)
    dev_rows = data.read_manifest(args.corpus / "dev.json")
    print(f"train: {len(train_rows)} utterances, {data.hours(train_rows):.1f} h; dev: {len(dev_rows)}", flush=True)
    texts = [r["text"] for r in train_rows if not r.get("augment")]  # (each sentence once)
    initial = None
    if args.init_from:  # its tokenizer, not one trained on this corpus: the output layer is tied to it
        initial = load_fastconformer(args.init_from)
        if not (args.work / "tokenizer.model").exists():
            (args.work / "tokenizer.model").write_bytes(initial.tokenizer.model_proto)
    tokenizer = train_tokenizer(texts, args.vocab_size, args.work / "tokenizer.model")
    model = FastConformerModel(build_spec(args.size, tokenizer.vocab_size)).train()
    if initial is not None:
        try:  # (our spec, for its training dropout; the weights must fit it exactly)
            model.load_state_dict(initial.model.state_dict(), strict=True)
        except RuntimeError as exc:
            raise SystemExit(f"--init-from {args.init_from}: not a --size {args.size} model: {exc}") from None
        print(f"initialised from {args.init_from}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {args.size}: {n_params / 1e6:.2f} M parameters, threads {torch.get_num_threads()}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)

    ckpt_path = args.work / "last.pt"
    # averaging reads only the last K snapshots; writing every one would take ~60 MB each
    snapshots_from = args.max_steps - args.average * args.snapshot_every if args.average > 1 else 0
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_wer": None, "log": []}
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        state = ckpt["state"]
        print(f"resumed at step {state['step']} (epoch {state['epoch']}, batch {state['batch_in_epoch']})", flush=True)

    from tqdm import tqdm

    dataset = data.UtteranceDataset(train_rows, tokenizer, model.frontend, train=True, seed=args.seed,
                                    vtlp=args.vtlp, tilt=args.tilt)
    context_rng = random.Random(args.seed * 1000 + state["step"])
    bar = tqdm(total=args.max_steps, initial=state["step"], unit="step", dynamic_ncols=True)
    t_start, audio_seconds = time.time(), 0.0
    while state["step"] < args.max_steps:
        dataset.epoch = state["epoch"]
        warming_up = state["step"] < args.curriculum_steps
        dataset.train = not warming_up
        batches = data.duration_batches(train_rows, args.batch_seconds, args.max_batch_items,
                                        np.random.default_rng((args.seed, state["epoch"])),
                                        shortest_first=state["epoch"] == 0 and fresh)
        batches = batches[state["batch_in_epoch"]:]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=data.collate,
                                             num_workers=0 if args.smoke else 1,
                                             worker_init_fn=lambda _: torch.set_num_threads(1))
        for mel, mel_len, target, target_len in loader:
            lr = lr_at(state["step"], args.lr, args.warmup, args.max_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            context = context_rng.choice(CONTEXTS)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                ctc_weight = 1.0 if state["step"] < args.ctc_only_steps else args.ctc_weight
                loss, parts = hybrid_loss(model, mel, mel_len, target, target_len, context, ctc_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
            if math.isfinite(grad_norm):
                opt.step()
            state["step"] += 1
            state["batch_in_epoch"] += 1
            audio_seconds += float(mel_len.sum()) / 100.0
            speed = audio_seconds / max(1e-6, time.time() - t_start)
            bar.update(1)
            loss_value = float(loss.detach())
            bar.set_postfix(loss=f"{loss_value:.3f}", rnnt=f"{parts.get('rnnt', 0):.2f}",
                            ctc=f"{parts.get('ctc', 0):.2f}", lr=f"{lr:.2e}", aud_s=f"{speed:.1f}")
            state["log"].append({"step": state["step"], "loss": round(loss_value, 4), "lr": lr,
                                 **{k: round(v, 4) for k, v in parts.items()}, "time": round(time.time(), 1)})
            done = state["step"] >= args.max_steps
            if state["step"] % args.save_every == 0 or done:
                save_checkpoint(ckpt_path, model, opt, state)
            if state["step"] in (args.ctc_only_steps, args.curriculum_steps) or (  # kept: a fallback per phase
                    args.snapshot_every and state["step"] % args.snapshot_every == 0
                    and state["step"] > snapshots_from):
                save_checkpoint(args.work / f"step{state['step']}.pt", model, opt, state)
            if state["step"] % args.eval_every == 0 or done:
                try:
                    wer = evaluate(model, tokenizer, dev_rows, (70, 6), args.eval_limit)
                except Exception as exc:  # an evaluation problem must not end hours of training
                    bar.write(f"step {state['step']}: dev evaluation failed: {exc!r}")
                else:
                    state["log"][-1]["dev_wer"] = wer
                    bar.write(f"step {state['step']}: dev WER at 480 ms rnnt {wer['rnnt']:.3f} ctc {wer['ctc']:.3f}")
            if done or (warming_up and state["step"] >= args.curriculum_steps):
                break  # (a new loader turns augmentation on, in the same epoch order)
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
            save_checkpoint(ckpt_path, model, opt, state)
    bar.close()
    (args.work / "log.json").write_text(json.dumps(state["log"]))
    if args.export:
        if args.average > 1:
            model.load_state_dict(average_snapshots(args.work, args.max_steps, args.average))
        args.export.parent.mkdir(parents=True, exist_ok=True)
        save_fastconformer(args.export, model.eval(), tokenizer, weights_dtype=getattr(torch, args.export_dtype))
        print(f"exported {args.export} ({args.export.stat().st_size / 2**20:.1f} MiB)", flush=True)


if __name__ == "__main__":
    main()
