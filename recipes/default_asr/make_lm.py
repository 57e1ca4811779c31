"""Build the default model's token-level n-gram language model (ARPA, gzip) from the sentence list.

    python recipes/default_asr/make_lm.py                  # -> chorus/models/default_asr_lm.arpa.gz
    python recipes/default_asr/make_lm.py --smoke --out /tmp/lm.arpa.gz

The text is the corpus' `sentences.tsv` (fortunes, WordNet, GCIDE, number templates; see the
README), minus every sentence of the dev and test manifests and the bundled sample's sentence, so
the evaluation sets and the sample stay unseen by the LM as they are by the acoustic model.  Each
sentence is encoded with the model's own SentencePiece tokenizer; the ARPA words are its pieces.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from chorus.asr.conformer.checkpoint import load_fastconformer  # noqa: E402
from chorus.asr.ngram import estimate_kneser_ney, write_arpa  # noqa: E402
from chorus.asr.textnorm import normalize_text  # noqa: E402

SAMPLE_TEXT = ROOT / "chorus" / "samples" / "held_out_voice.txt"


def held_out_texts(corpus: Path) -> set[str]:
    """Every transcript of the dev and test manifests (dev.json, test_*.json) and of the sample."""
    if not (corpus / "dev.json").exists():
        raise SystemExit(f"{corpus / 'dev.json'} is missing: build the corpus first (make_corpus.py), so that "
                         f"the LM can leave out the dev and test sentences")
    texts = set()
    for path in [corpus / "dev.json", *sorted(corpus.glob("test_*.json"))]:
        with open(path) as f:
            texts.update(normalize_text(json.loads(line)["text"]) for line in f if line.strip())
    if SAMPLE_TEXT.exists():
        texts.add(normalize_text(SAMPLE_TEXT.read_text()))
    return texts


def read_sentences(corpus: Path, limit: int | None) -> list[str]:
    out = []
    with open(corpus / "sentences.tsv") as f:
        for line in f:
            if line.startswith("#"):
                continue
            out.append(line.split("\t")[1])
            if limit and len(out) >= limit:
                break
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=HERE / "work" / "corpus")
    p.add_argument("--model", type=Path, default=ROOT / "chorus" / "models" / "default_asr.nemo",
                   help="the .nemo whose tokenizer the LM's words come from")
    p.add_argument("--out", type=Path, default=ROOT / "chorus" / "models" / "default_asr_lm.arpa.gz")
    p.add_argument("--order", type=int, default=5)
    p.add_argument("--min-count", type=int, default=2, help="drop n-grams seen fewer times (from --prune-from up)")
    p.add_argument("--prune-from", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="the first 300 sentences of work/corpus_smoke, order 3")
    args = p.parse_args(argv)
    if args.smoke:
        args.corpus = HERE / "work" / "corpus_smoke" if args.corpus == HERE / "work" / "corpus" else args.corpus
        args.order = 3
    tokenizer = load_fastconformer(args.model).tokenizer
    excluded = held_out_texts(args.corpus)
    sentences = [s for s in read_sentences(args.corpus, 300 if args.smoke else None) if s not in excluded]
    t0 = time.time()
    pieces = (tokenizer.encode_as_pieces(s) for s in sentences)
    grams = estimate_kneser_ney(pieces, args.order, min_count=args.min_count, min_count_order=args.prune_from)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_arpa(grams, args.out)
    sizes = {n: sum(len(g) == n for g in grams) for n in range(1, args.order + 1)}
    print(f"{len(sentences)} sentences ({len(excluded)} held-out ones left out) -> order {args.order}, "
          f"n-grams {sizes}; {args.out} {args.out.stat().st_size / 1e6:.1f} MB in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
