"""Candidate English sentences for the synthetic ASR corpus, from text installed with Debian packages.

Sources (all read locally, nothing is downloaded):

- ``fortunes``: /usr/share/games/fortunes (packages fortunes, fortunes-min). Offensive collections (an ``off/``
  directory or files ending in ``-o``, from fortunes-off) are skipped, as are ``ascii-art`` and the Latin
  ``translate-me``. Attribution lines (``-- Author``) are dropped.
- ``wordnet_example``: the quoted usage examples in WordNet glosses (/usr/share/wordnet/data.{noun,verb,adj,adv}).
- ``wordnet_gloss``: the definitions in the same glosses.
- ``gcide``: definitions and quotations of the GNU Collaborative International Dictionary of English
  (/usr/share/dictd/gcide.dict.dz, a dictzip file that gzip reads).
- ``numbers``: sentences generated from templates with random numbers, years, ordinals, times, amounts of money,
  percentages and digit strings (the text sources above have almost no numbers, and spoken numbers and digits
  are what users dictate). Written with digits and symbols, so they go through the normaliser like the rest.

Every candidate is split into sentences, rejected if it looks like code, markup, an acronym (``IBM``: a reader
would spell it, the transcript would not) or has a word that is not an English word (the wamerican word list,
/usr/share/dict/words; this removes the debris of dictionary markup), normalised with
:func:`chorus.asr.textnorm.normalize_text`, and kept when it has 3..20 words. Each kept sentence has two forms:
``text`` (the transcript: lowercase words) and ``tts`` (the same words with their sentence punctuation, which the
synthesisers get for prosody). Duplicates (same ``text``) are dropped; each source is shuffled with a fixed seed;
the sources are then interleaved with fixed weights so that no source dominates the first N sentences that the
corpus builder takes.

Run ``python recipes/default_asr/text_sources.py`` to print the counts and a sample.
"""

from __future__ import annotations

import argparse
import gzip
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from chorus.asr.textnorm import normalize_text  # noqa: E402

FORTUNES_DIR = Path("/usr/share/games/fortunes")
WORDNET_DIR = Path("/usr/share/wordnet")
GCIDE_PATH = Path("/usr/share/dictd/gcide.dict.dz")
WORDLIST_PATH = Path("/usr/share/dict/words")

FORTUNE_SKIP = {"ascii-art", "translate-me"}

# share of each source in the interleaved order (renormalised over the sources that still have sentences)
SOURCE_WEIGHTS = {"fortunes": 0.33, "wordnet_example": 0.24, "wordnet_gloss": 0.14, "gcide": 0.22, "numbers": 0.07}
NUMBER_SENTENCES = 20000

MIN_WORDS = 3
MAX_WORDS = 20


@dataclass(frozen=True)
class Sentence:
    text: str  # transcript: normalize_text(raw)
    tts: str  # normalize_text(raw, keep_punctuation=True), what the synthesiser reads
    source: str


# ----------------------------------------------------------------------------------------------------------------
# sentence splitting

_NO_SPLIT_AFTER = {
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "vs", "etc", "no", "nos", "mt", "gen", "col", "capt", "lt",
    "sgt", "rev", "gov", "sen", "rep", "fig", "vol", "inc", "ltd", "co", "cf", "viz", "approx", "dept", "ave",
    "blvd", "corp", "ft", "pp", "ch", "ed", "eds", "esp", "al", "e.g", "i.e", "a.m", "p.m", "u.s",
}
_RE_BOUNDARY = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")


def split_sentences(text: str) -> list[str]:
    """Split running text at ``. ! ?`` followed by whitespace and a capital, a digit or a quote; not after
    common abbreviations (Mr., Dr., e.g.) or initials (J. Smith)."""
    text = re.sub(r"\s+", " ", text).strip()
    out: list[str] = []
    start = 0
    for m in _RE_BOUNDARY.finditer(text):
        end = m.end()
        if m.group(0)[0] == ".":
            prev = re.search(r"(\S+)$", text[start:m.start()])
            if prev:
                w = prev.group(1).lower().lstrip("(\"'")
                if w in _NO_SPLIT_AFTER or re.fullmatch(r"[a-z]", w) or re.fullmatch(r"(?:[a-z]\.)+[a-z]", w):
                    continue
        nxt = text[end:].lstrip()[:1]
        if nxt and not (nxt.isupper() or nxt.isdigit() or nxt in "\"'(`"):
            continue
        piece = text[start:end].strip()
        if piece:
            out.append(piece)
        start = end
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


# ----------------------------------------------------------------------------------------------------------------
# filtering and normalisation

_RE_BAD_CHARS = re.compile(r"[<>{}\[\]|\\=*^~_@#]|://|www\.|\.com\b|\.org\b|\.\w+\(")
_RE_ACRONYM = re.compile(r"\b[A-Z]{2,}s?\b")
_RE_TOKEN = re.compile(r"[a-z']+")


def load_wordlist(path: Path = WORDLIST_PATH) -> frozenset[str] | None:
    """The wamerican word list, lowercased; None when absent (the lexicon check is then skipped)."""
    if not path.exists():
        return None
    with open(path, encoding="utf-8", errors="ignore") as f:
        words = {w.strip().lower() for w in f if w.strip()}
    return frozenset(words)


def _in_lexicon(word: str, lexicon: frozenset[str]) -> bool:
    if word in lexicon:
        return True
    for suffix in ("'s", "s'", "'"):
        if word.endswith(suffix) and word[: -len(suffix)] in lexicon:
            return True
    return False


def make_sentence(raw: str, source: str, lexicon: frozenset[str] | None,
                  min_words: int = MIN_WORDS, max_words: int = MAX_WORDS) -> Sentence | None:
    """Clean one candidate sentence; None when it is rejected."""
    raw = raw.strip().strip("\"'`").strip()
    if len(raw) < 8 or len(raw) > 400:
        return None
    if _RE_BAD_CHARS.search(raw) or _RE_ACRONYM.search(raw):
        return None
    letters = sum(c.isalpha() for c in raw)
    if letters < 0.6 * len(raw.replace(" ", "")):
        return None
    text = normalize_text(raw)
    words = text.split()
    if not (min_words <= len(words) <= max_words):
        return None
    if not re.fullmatch(r"[a-z']+( [a-z']+)*", text):
        return None
    if any(len(w) > 22 or w.strip("'") != w for w in words):
        return None
    if lexicon is not None and not all(_in_lexicon(w, lexicon) for w in words):
        return None
    tts = normalize_text(raw, keep_punctuation=True)
    if normalize_text(tts) != text:  # never let the spoken words and the transcript disagree
        return None
    # every piece between sentence marks must be a phrase, not debris such as "adv. n." or "vii."
    if any(len(piece.split()) < 3 for piece in re.split(r"[.!?]", tts) if piece.strip()):
        return None
    if tts[-1] not in ".!?":
        tts = tts.rstrip(",;:") + "."
    return Sentence(text=text, tts=tts, source=source)


# ----------------------------------------------------------------------------------------------------------------
# sources


def fortune_files(fortunes_dir: Path = FORTUNES_DIR) -> list[Path]:
    files = []
    if not fortunes_dir.is_dir():
        return files
    for p in sorted(fortunes_dir.rglob("*")):
        if not p.is_file() or p.suffix in (".dat", ".u8") or p.is_symlink():
            continue
        rel = p.relative_to(fortunes_dir)
        if "off" in rel.parts[:-1] or p.name.endswith("-o") or p.name in FORTUNE_SKIP:
            continue
        files.append(p)
    return files


_RE_ATTRIBUTION = re.compile(r"^\s*(--|-\s|\u2014)")
_RE_ENUM = re.compile(r"^\s*(\(?\d{1,2}[.)]|\(?[a-z][.)])\s+")
_RE_INLINE_ATTRIBUTION = re.compile(r"(?<=[.!?\"'])\s+-{1,2}\s?[A-Z][\w.,' ]{0,60}$")
_RE_SPEAKER = re.compile(r"^\s*[A-Z][A-Za-z .']{0,20}:\s+")


def fortune_texts(fortunes_dir: Path = FORTUNES_DIR, max_files: int | None = None) -> Iterator[str]:
    """Yield the candidate sentences of the fortune cookies."""
    for path in fortune_files(fortunes_dir)[:max_files]:
        with open(path, encoding="utf-8", errors="ignore") as f:
            content = f.read()
        for entry in re.split(r"^%\s*$", content, flags=re.M):
            lines = []
            for line in entry.splitlines():
                if _RE_ATTRIBUTION.match(line):
                    break  # the attribution and whatever follows it
                line = _RE_ENUM.sub("", line)
                line = _RE_SPEAKER.sub("", line)
                lines.append(line.strip())
            paragraph = " ".join(lines)
            paragraph = _RE_INLINE_ATTRIBUTION.sub("", paragraph)  # "... that. -Clara Barton"
            paragraph = re.sub(r"\s--\s", ", ", paragraph)
            yield from split_sentences(paragraph)


def wordnet_texts(wordnet_dir: Path = WORDNET_DIR, max_lines: int | None = None) -> Iterator[tuple[str, str]]:
    """Yield (kind, sentence) from the glosses of WordNet: kind is "example" for quoted usage examples and
    "gloss" for definitions."""
    for pos in ("noun", "verb", "adj", "adv"):
        path = wordnet_dir / f"data.{pos}"
        if not path.exists():
            continue
        with open(path, encoding="utf-8", errors="ignore") as f:
            for i, line in enumerate(f):
                if max_lines is not None and i >= max_lines:
                    break
                if line.startswith("  ") or "|" not in line:
                    continue  # licence header
                gloss = line.split("|", 1)[1].strip()
                for ex in re.findall(r'"([^"]+)"', gloss):
                    ex = re.sub(r"\s+-+\s*[A-Z][\w .']*$", "", ex.strip())
                    for s in split_sentences(ex):
                        yield "example", s
                rest = re.sub(r'"[^"]*"(\s*-+\s*[A-Z][\w .\']*)?', " ", gloss)
                for part in rest.split(";"):
                    part = re.sub(r"\([^)]*\)", " ", part).strip(" ,:")
                    if part:
                        yield "gloss", part


_RE_GCIDE_HEAD = re.compile(r"^[^\n\\]{1,80}\\[^\\\n]{1,80}\\,?\s*((?:[a-zA-Z]{1,6}\.\s*(?:&\s*)?){0,4})")


_RE_GCIDE_POS = re.compile(r"^\s*(?:(?:n|v|a|adv|adj|prep|conj|interj|pron|p|t|i|pl|sing|imp|pr|superl|compar)\.\s*"
                           r"(?:&\s*)?)+")


def gcide_texts(path: Path = GCIDE_PATH, max_bytes: int | None = None) -> Iterator[str]:
    """Yield candidate sentences of the GCIDE definitions, quotations and notes."""
    if not path.exists():
        return
    with gzip.open(path, "rt", encoding="utf-8", errors="ignore") as f:
        content = f.read(max_bytes) if max_bytes else f.read()
    for block in re.split(r"\n\s*\n", content):
        block = block.strip()
        if not block or block.startswith(("00-database", "Syn:", "Syn.")):
            continue
        block = re.sub(r"\[[^\]]*\]", " ", block)  # etymologies, [1913 Webster], entities such as [=a]
        block = _RE_GCIDE_HEAD.sub(" ", block, count=1)  # headword \pron\, part of speech
        block = re.sub(r"\{([^{}]*)\}", r"\1", block)
        block = re.sub(r"\([^()]*\)", " ", block)  # field labels such as (Geom.), (Obs.)
        block = re.sub(r"^\s*(Note:|\d+\.|\([a-z]\))\s*", "", block)
        block = _RE_GCIDE_POS.sub("", block)
        block = re.sub(r"\s\d+\.\s", " ", block)
        block = re.sub(r"--\s?[A-Z][^\s.]*(?:\s[A-Z][^\s.]*)*\.?", " ", block)  # --Author.
        block = block.replace(". . .", "...")
        yield from split_sentences(block)


_NOUNS = ["people", "cars", "books", "houses", "apples", "students", "birds", "miles", "days", "years", "boxes",
          "tickets", "votes", "pages", "trees", "children", "questions", "steps", "letters", "ships", "dogs", "cups"]
_PLACES = ["the city", "the garden", "the library", "the school", "the village", "the box", "the park", "the room",
           "the valley", "the museum", "the station", "the harbor"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_NAMES = ["John", "Mary", "Peter", "Anna", "David", "Sarah", "Tom", "Emma", "James", "Laura", "Paul", "Helen"]
_EVENTS = ["the war ended", "the bridge was built", "the school opened", "the company was founded",
           "the first train arrived", "the river flooded", "the law was passed", "the book was published",
           "the church burned down", "the treaty was signed"]


def _num(rng: random.Random) -> int:
    return rng.choice([rng.randint(0, 10), rng.randint(11, 99), rng.randint(100, 999), rng.randint(1000, 9999),
                       rng.randint(10_000, 999_999), rng.randint(1_000_000, 999_999_999)])


def _digits(rng: random.Random, lo: int = 3, hi: int = 10) -> str:
    return " ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(lo, hi)))


def number_texts(rng: random.Random, n: int) -> Iterator[str]:
    """``n`` template sentences with numbers, e.g. "Call 5 5 5 0 1 9 9 before 6:30 pm."."""
    r = rng
    templates = [
        lambda: f"There were {_num(r):,} {r.choice(_NOUNS)} in {r.choice(_PLACES)}.",
        lambda: f"There were {_num(r)} {r.choice(_NOUNS)} in {r.choice(_PLACES)}.",
        lambda: f"In {r.randint(1100, 2099)}, {r.choice(_EVENTS)}.",
        lambda: f"{r.choice(_NAMES)} was born on {r.choice(_MONTHS)} {r.randint(1, 31)}, {r.randint(1900, 2024)}.",
        lambda: f"The meeting is on the {r.randint(1, 31)}{'th'} of {r.choice(_MONTHS)}.",
        lambda: f"She finished {r.randint(1, 99)}{'th'} out of {r.randint(100, 5000)} runners.",
        lambda: f"The train leaves at {r.randint(1, 12)}:{r.randint(0, 59):02d} {r.choice(['am', 'pm', ''])}.",
        lambda: f"It costs ${r.randint(1, 999)}.{r.randint(0, 99):02d} at the shop.",
        lambda: f"The house sold for ${r.randint(1, 999):,},000 last {r.choice(_MONTHS)}.",
        lambda: f"About {r.randint(1, 100)}% of the {r.choice(_NOUNS)} were lost.",
        lambda: f"Prices rose by {r.randint(0, 20)}.{r.randint(1, 9)}% this year.",
        lambda: f"Please call {_digits(r, 7, 10)} after {r.randint(1, 12)} o'clock.",
        lambda: f"My code is {_digits(r, 3, 8)}.",
        lambda: f"The numbers are {_digits(r, 2, 6)} and {_digits(r, 1, 4)}.",
        lambda: f"Room {r.randint(1, 999)} is on the {r.randint(1, 40)}{'th'} floor.",
        lambda: f"The temperature fell to -{r.randint(1, 40)} degrees at night.",
        lambda: f"The value of pi is about {r.choice(['3.14', '3.1416', '3.14159'])}.",
        lambda: f"Add {r.randint(0, 100)} and {r.randint(0, 100)} to get the answer.",
        lambda: f"The road is {r.randint(2, 999)}.{r.randint(1, 9)} miles long.",
        lambda: f"He counted {r.randint(0, 9)}, {r.randint(0, 9)}, {r.randint(0, 9)} and {r.randint(0, 9)}.",
        lambda: f"Chapter {r.randint(1, 60)} begins on page {r.randint(1, 900)}.",
        lambda: f"The {r.choice(['nineteen', ''])}{r.choice(['20s', '30s', '60s', '80s', '90s'])} were "
                f"{r.choice(['good', 'hard', 'strange', 'long'])} years.".replace("The nineteen", "The 19"),
        lambda: f"{r.randint(1, 9)}/{r.choice([2, 3, 4, 8])} of the {r.choice(_NOUNS)} are gone.",
        lambda: f"We need {r.randint(2, 12)} {r.choice(_NOUNS)} by {r.choice(['Monday', 'Friday', 'noon'])}.",
    ]
    for _ in range(n):
        yield r.choice(templates)()


# ----------------------------------------------------------------------------------------------------------------
# the whole list


def _interleave(groups: dict[str, list[Sentence]], weights: dict[str, float], rng: random.Random) -> list[Sentence]:
    pos = {k: 0 for k in groups}
    out: list[Sentence] = []
    live = [k for k in groups if groups[k]]
    while live:
        w = [weights.get(k, 0.1) for k in live]
        k = rng.choices(live, weights=w)[0]
        out.append(groups[k][pos[k]])
        pos[k] += 1
        if pos[k] >= len(groups[k]):
            live.remove(k)
    return out


def build_sentences(seed: int = 0, max_words: int = MAX_WORDS, min_words: int = MIN_WORDS, smoke: bool = False,
                    fortunes_dir: Path = FORTUNES_DIR, wordnet_dir: Path = WORDNET_DIR,
                    gcide_path: Path = GCIDE_PATH, verbose: bool = True) -> tuple[list[Sentence], dict[str, dict]]:
    """Every usable sentence, deduplicated and in a fixed pseudo-random order, plus per-source statistics
    (candidates seen, kept). ``smoke`` reads only a small part of each source (for fast CI builds)."""
    lexicon = load_wordlist()
    if lexicon is None and verbose:
        print(f"note: {WORDLIST_PATH} not found; the lexicon check is off", file=sys.stderr)
    groups: dict[str, list[Sentence]] = {k: [] for k in SOURCE_WEIGHTS}
    stats: dict[str, dict] = {k: {"candidates": 0, "kept": 0} for k in SOURCE_WEIGHTS}
    seen: set[str] = set()

    def add(source: str, raw: str) -> None:
        stats[source]["candidates"] += 1
        s = make_sentence(raw, source, lexicon, min_words=min_words, max_words=max_words)
        if s is None or s.text in seen:
            return
        seen.add(s.text)
        groups[source].append(s)
        stats[source]["kept"] += 1

    t0 = time.time()
    for raw in fortune_texts(fortunes_dir, max_files=3 if smoke else None):
        add("fortunes", raw)
    for kind, raw in wordnet_texts(wordnet_dir, max_lines=3000 if smoke else None):
        add("wordnet_" + kind, raw)
    for raw in gcide_texts(gcide_path, max_bytes=400_000 if smoke else None):
        add("gcide", raw)
    for raw in number_texts(random.Random(seed + 7919), 500 if smoke else NUMBER_SENTENCES):
        add("numbers", raw)
    rng = random.Random(seed)
    for k in groups:
        rng.shuffle(groups[k])
    ordered = _interleave(groups, SOURCE_WEIGHTS, rng)
    if verbose:
        print(f"text sources: {len(ordered)} sentences in {time.time() - t0:.1f} s", file=sys.stderr)
    return ordered, stats


def main(argv: Iterable[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-sentence-words", type=int, default=MAX_WORDS)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--sample", type=int, default=20, help="print this many sentences")
    ap.add_argument("--out", type=Path, help="write source<TAB>text<TAB>tts lines here")
    args = ap.parse_args(argv)
    sentences, stats = build_sentences(args.seed, args.max_sentence_words, smoke=args.smoke)
    print(f"{'source':<18}{'candidates':>12}{'kept':>10}")
    for k, v in stats.items():
        print(f"{k:<18}{v['candidates']:>12}{v['kept']:>10}")
    n_words = sum(len(s.text.split()) for s in sentences)
    print(f"{'total':<18}{sum(v['candidates'] for v in stats.values()):>12}{len(sentences):>10}"
          f"   ({n_words} words, {n_words / max(1, len(sentences)):.1f} words/sentence)")
    for s in sentences[: args.sample]:
        print(f"  [{s.source}] {s.tts}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for s in sentences:
                f.write(f"{s.source}\t{s.text}\t{s.tts}\n")


if __name__ == "__main__":
    main()
