"""Token-level n-gram language models in the ARPA format, for shallow fusion in beam search.

The ARPA "words" are the ASR model's SentencePiece pieces (`▁the`, `re`, ...), so the file is the
one KenLM's `lmplz` writes from text encoded with the model's tokenizer (`spm_encode`), and the one
`estimate_kneser_ney` below writes.  `NgramLM` reads it (plain or .gz) and answers, for a context of
token ids, the natural-log probability of every token of the model's vocabulary at once: beam search
asks one vector per hypothesis and frame, so the vector is built with the standard back-off
recursion over the context's suffixes and cached.
"""
from __future__ import annotations

import collections
import gzip
import io
import math
from array import array
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
LN10 = math.log(10.0)


class LMError(ValueError):
    """A language model file that cannot be used (bad format, or not this model's tokens)."""


def _open_text(path: Path):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_arpa(path: str | Path) -> Iterator[tuple[tuple[str, ...], float, float]]:
    """(ngram words, log10 prob, log10 back-off) of every entry of an ARPA file, checked against its
    header; the last item is (("\\end\\",), order, 0) so that callers learn the order at the end."""
    path = Path(path)
    declared: dict[int, int] = {}
    found: collections.Counter = collections.Counter()
    section = None
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                if line == "\\data\\":
                    section = "data"
                elif line == "\\end\\":
                    section = "end"
                    break
                elif line.startswith("\\") and line.endswith("-grams:"):
                    section = int(line[1:-len("-grams:")])
                elif section == "data" and line.startswith("ngram "):
                    n, count = line[len("ngram "):].split("=")
                    declared[int(n)] = int(count)
                elif isinstance(section, int):
                    fields = line.split()
                    if len(fields) not in (section + 1, section + 2):
                        raise LMError(f"{path}:{lineno}: expected a {section}-gram line, got {line[:80]!r}")
                    bow = float(fields[section + 1]) if len(fields) == section + 2 else 0.0
                    found[section] += 1
                    yield tuple(fields[1:section + 1]), float(fields[0]), bow
                else:
                    raise LMError(f"{path}:{lineno}: unexpected line outside an ARPA section: {line[:80]!r}")
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, LMError):
            raise
        raise LMError(f"{path}: not a readable ARPA language model: {exc}") from None
    if section != "end" or not declared:
        raise LMError(f"{path}: not a complete ARPA file (no \\data\\ header or no \\end\\)")
    for n, count in declared.items():
        if found[n] != count:
            raise LMError(f"{path}: the header declares {count} {n}-grams, the file has {found[n]}")
    yield (END_MARK,), float(max(declared)), 0.0


END_MARK = "\\end\\"


def read_arpa(path: str | Path) -> tuple[int, dict[tuple[str, ...], tuple[float, float]]]:
    """(order, {ngram words: (log10 prob, log10 back-off)}) of an ARPA file (for small files and tests)."""
    grams = {}
    for words, logp, bow in iter_arpa(path):
        if words == (END_MARK,):
            return int(logp), grams
        grams[words] = (logp, bow)
    raise AssertionError("iter_arpa ends with its end mark")


class NgramLM:
    """A back-off n-gram over a tokenizer's pieces; `log_probs(context)` -> ln P(token | context) for all tokens.

    Storage is flat numpy arrays: every listed (context, token) pair in one array sorted by context, and
    each context, packed into one integer, found by binary search in a sorted key array that gives its
    rows and back-off weight.  Python dicts of tuples took several times the memory and load time.
    Answers are kept in an LRU cache of `cache_size` contexts (20,000 vectors of the bundled 256 pieces
    are 40 MB): hypotheses of a beam share and keep their contexts from frame to frame.
    """

    def __init__(self, order: int, grams: dict[tuple[str, ...], tuple[float, float]], pieces: list[str],
                 cache_size: int = 20_000):
        self._build(order, ((g, lp, bo) for g, (lp, bo) in grams.items()), pieces, cache_size)

    @classmethod
    def from_arpa(cls, path: str | Path, pieces: list[str], cache_size: int = 20_000) -> "NgramLM":
        lm = cls.__new__(cls)
        lm._build(None, iter_arpa(path), pieces, cache_size)
        return lm

    def _build(self, order: int | None, entries: Iterable, pieces: list[str], cache_size: int) -> None:
        self.vocab_size = len(pieces)
        self.bos = self.vocab_size  # context id of <s>
        index = {p: i for i, p in enumerate(pieces)}
        index[BOS] = self.bos
        self._base = self.vocab_size + 2  # context ids packed as digits 1..V+1 of this base
        unigram = np.full(self.vocab_size, np.nan)
        unk = -99.0
        n_unigrams = known = 0
        # compact growing buffers (a Python list would hold an object per number)
        listed_ctx, listed_tok, listed_logp = array("q"), array("q"), array("d")  # per listed (context, token)
        bow_keys, bow_values, end_keys, end_values = array("q"), array("d"), array("q"), array("d")
        for words, logp, bow in entries:
            if words == (END_MARK,):
                order = int(logp)
                break
            if len(words) == 1:
                n_unigrams += 1
                known += words[0] in index and words[0] != BOS
                if words[0] == UNK:
                    unk = logp
            ids = [index.get(w, -1) for w in words[:-1]]
            if -1 in ids:
                continue  # an n-gram over words that are not tokens of this model
            last = words[-1]
            key = self._key(ids)
            if last == EOS:
                end_keys.append(key)
                end_values.append(logp * LN10)
                continue
            token = index.get(last, -1)
            if token == -1:
                continue
            if bow:
                bow_keys.append(self._key(ids + [token]))
                bow_values.append(bow * LN10)
            if token == self.bos:
                continue  # <s> is never predicted
            if not ids:
                unigram[token] = logp * LN10
            else:
                listed_ctx.append(key)
                listed_tok.append(token)
                listed_logp.append(logp * LN10)
        if known < 0.5 * min(self.vocab_size, max(1, n_unigrams - 3)):
            raise LMError(f"the language model's words are not this model's tokens: only {known} of its "
                          f"{n_unigrams} unigrams are among the {self.vocab_size} tokenizer pieces")
        if self._base ** max(0, order - 1) >= 2 ** 62:
            raise LMError(f"an order-{order} LM over {self.vocab_size} tokens is more than this reader packs")
        self.order = order
        self._unigram = np.where(np.isnan(unigram), unk * LN10, unigram)
        ctx = np.frombuffer(listed_ctx, dtype=np.int64)
        sort = np.argsort(ctx, kind="stable")
        self._tokens = np.frombuffer(listed_tok, dtype=np.int64)[sort]
        self._logps = np.frombuffer(listed_logp)[sort]
        listed_keys, starts = np.unique(ctx[sort], return_index=True)
        # every context with listed tokens or a back-off weight: sorted keys, weights, row ranges
        self._ctx_keys = np.union1d(listed_keys, np.frombuffer(bow_keys, dtype=np.int64))
        self._ctx_bow = np.zeros(len(self._ctx_keys))
        self._ctx_bow[np.searchsorted(self._ctx_keys, np.frombuffer(bow_keys, dtype=np.int64))] = \
            np.frombuffer(bow_values)
        self._ctx_rows = np.zeros((len(self._ctx_keys), 2), dtype=np.int64)
        stops = np.append(starts[1:], len(sort)) if len(starts) else starts
        self._ctx_rows[np.searchsorted(self._ctx_keys, listed_keys)] = np.stack([starts, stops], axis=1)
        order_end = np.argsort(np.frombuffer(end_keys, dtype=np.int64), kind="stable")
        self._end_keys = np.frombuffer(end_keys, dtype=np.int64)[order_end]
        self._end_logp = np.frombuffer(end_values)[order_end]
        self._cache: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self._cache_size = cache_size

    def _key(self, ids) -> int:
        key = 0
        for i in ids:
            key = key * self._base + i + 1
        return key

    def _context(self, ids) -> int:
        """Row of a context in the context arrays, or -1 when it is not listed."""
        key = self._key(ids)
        i = int(np.searchsorted(self._ctx_keys, key))
        return i if i < len(self._ctx_keys) and self._ctx_keys[i] == key else -1

    def start(self) -> tuple[int, ...]:
        """The context at the start of an utterance."""
        return (self.bos,)

    def extend(self, context: tuple[int, ...], token: int) -> tuple[int, ...]:
        """The context after `token`, cut to the last order - 1 ids."""
        return (context + (token,))[-(self.order - 1):] if self.order > 1 else ()

    def end_log_prob(self, context: tuple[int, ...]) -> float:
        """ln P(</s> | context): how likely the text ends here (scored once, at the end of an utterance)."""
        context = context[-(self.order - 1):] if self.order > 1 else ()
        bow = 0.0
        for k in range(len(context) + 1):
            key = self._key(context[k:])
            i = int(np.searchsorted(self._end_keys, key))
            if i < len(self._end_keys) and self._end_keys[i] == key:
                return bow + float(self._end_logp[i])
            row = self._context(context[k:])
            bow += float(self._ctx_bow[row]) if row >= 0 else 0.0
        return bow + float(self._unigram.min())  # no </s> in the file at all

    def log_probs(self, context: tuple[int, ...]) -> np.ndarray:
        """ln P(token | context) for every token id: float64 [vocab_size] (read-only, cached)."""
        context = context[-(self.order - 1):] if self.order > 1 else ()
        hit = self._cache.get(context)
        if hit is not None:
            self._cache.move_to_end(context)
            return hit
        out = self._unigram
        # p(w | c1..ck) = listed(c1..ck, w) or bow(c1..ck) + p(w | c2..ck): shortest suffix first.
        for k in range(len(context) - 1, -1, -1):
            row = self._context(context[k:])
            if row < 0:
                continue  # an unseen context: no listed words and back-off weight 1
            a, b = self._ctx_rows[row]
            out = out + self._ctx_bow[row]
            out[self._tokens[a:b]] = self._logps[a:b]
        out.setflags(write=False)
        self._cache[context] = out
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return out


# -- estimation --------------------------------------------------------------------------------

def estimate_kneser_ney(sentences: Iterable[list[str]], order: int, discount: float = 0.75,
                        min_count: int = 2, min_count_order: int = 3
                        ) -> dict[tuple[str, ...], tuple[float, float]]:
    """Interpolated Kneser-Ney with one absolute discount, written in back-off form.

    Every listed probability is the interpolated one, and the back-off weight of a context is the
    mass it leaves to the shorter context: d x (distinct continuations) plus the counts of the
    n-grams pruned by `min_count` (applied from `min_count_order` up), over the context's count.
    Lower orders count distinct left extensions (KN continuation counts), except n-grams that start
    with <s>, which cannot be extended to the left and keep their real counts (as KenLM does).
    """
    if order < 1:
        raise ValueError("order must be at least 1")
    counts = [collections.Counter() for _ in range(order + 1)]
    for words in sentences:
        seq = [BOS, *words, EOS]
        for n in range(1, order + 1):
            for end in range(max(n, 2), len(seq) + 1):  # every n-gram but the unigram <s>
                counts[n][tuple(seq[end - n:end])] += 1
    # KN: replace lower-order counts with continuation counts (except <s>-initial n-grams).
    for n in range(order - 1, 0, -1):
        cont = collections.Counter(g[1:] for g in counts[n + 1])
        counts[n] = collections.Counter({g: (c if g[0] == BOS else cont.get(g, 0)) for g, c in counts[n].items()})
        for g, c in cont.items():
            if g not in counts[n]:
                counts[n][g] = c
    grams: dict[tuple[str, ...], tuple[float, float]] = {}
    probs: dict[tuple[str, ...], float] = {}
    # unigrams: discounted continuation counts + uniform share of the discounted mass
    uni = {g: c for g, c in counts[1].items() if g != (BOS,) and c > 0}
    total = sum(uni.values())
    vocab = len(uni) + 1  # + <unk>
    left = discount * len(uni) / total
    for g, c in uni.items():
        probs[g] = max(c - discount, 0.0) / total + left / vocab
    probs[(UNK,)] = left / vocab
    probs[(BOS,)] = 0.0
    for n in range(2, order + 1):
        byctx: dict[tuple[str, ...], list] = collections.defaultdict(list)
        for g, c in counts[n].items():
            if c > 0:
                byctx[g[:-1]].append((g[-1], c))
        for ctx, entries in byctx.items():
            ctx_total = sum(c for _, c in entries)
            keep = [(w, c) for w, c in entries if n < min_count_order or c >= min_count]
            if not keep or ctx not in probs:
                continue
            bow = (ctx_total - sum(c - discount for _, c in keep)) / ctx_total
            for w, c in keep:
                lower = probs.get(ctx[1:] + (w,))
                if lower is None:
                    lower = _backoff_prob(probs, grams, ctx[1:], w)
                probs[ctx + (w,)] = (c - discount) / ctx_total + bow * lower
            grams[ctx] = (0.0, bow)  # back-off weights, merged below
    out: dict[tuple[str, ...], tuple[float, float]] = {}
    for g, p in probs.items():
        logp = -99.0 if p <= 0 else math.log10(p)
        bow = grams.get(g, (0.0, 1.0))[1]
        out[g] = (logp, math.log10(bow) if bow > 0 else -99.0)
    return out


def _backoff_prob(probs, grams, ctx: tuple[str, ...], w: str) -> float:
    """P(w | ctx) by backing off through listed contexts (for a word the shorter context did not keep)."""
    bow = 1.0
    while True:
        p = probs.get(ctx + (w,))
        if p is not None:
            return bow * p
        if not ctx:
            return bow * probs[(UNK,)]
        bow *= grams.get(ctx, (0.0, 1.0))[1]
        ctx = ctx[1:]


def write_arpa(grams: dict[tuple[str, ...], tuple[float, float]], path: str | Path) -> None:
    """Write n-grams as ARPA (gzip when the name ends in .gz), orders ascending, sorted for stable files."""
    path = Path(path)
    order = max(len(g) for g in grams)
    by_order = [sorted(g for g in grams if len(g) == n) for n in range(1, order + 1)]
    raw = open(path, "wb")
    # no name or time in the gzip header: the same n-grams give the same bytes (a reproducible file)
    binary = (gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=9, mtime=0)
              if path.suffix == ".gz" else raw)
    with raw, binary, io.TextIOWrapper(binary, encoding="utf-8") as f:
        f.write("\n\\data\\\n")
        for n, gs in enumerate(by_order, 1):
            f.write(f"ngram {n}={len(gs)}\n")
        for n, gs in enumerate(by_order, 1):
            f.write(f"\n\\{n}-grams:\n")
            for g in gs:
                logp, bow = grams[g]
                has_bow = n < order and g[-1] != EOS
                f.write(f"{logp:.6f}\t{' '.join(g)}" + (f"\t{bow:.6f}\n" if has_bow else "\n"))
        f.write("\n\\end\\\n")
