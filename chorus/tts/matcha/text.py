"""Matcha-TTS' text front end: english_cleaners2 (phonemizer's espeak backend), the symbol table, blanks.

Matcha (matcha/cli.py `process_text`) turns text into ids with
`intersperse(text_to_sequence(text, ["english_cleaners2"]), 0)`:

* english_cleaners2: ASCII transliteration (Unidecode), lower case, abbreviations expanded (mr. -> mister ...),
  then phonemizer's `EspeakBackend("en-us", preserve_punctuation=True, with_stress=True,
  language_switch="remove-flags").phonemize([text], strip=True)`, brackets removed, whitespace collapsed;
* phonemizer with preserve_punctuation cuts the text at runs of punctuation marks (`;:,.!?¡¿—…"«»“”(){}[]` and the
  spaces around them; a `,` or `.` between two digits is not a mark), phonemizes each piece with libespeak-ng's
  `espeak_TextToPhonemes` (IPA, clauses joined by a space, `_` separators and `(en)` flags dropped), and puts the
  marks back (a mark's inner spaces kept);
* every character is looked up in Matcha's symbol table (`SYMBOLS`) and a blank (id 0) is put between ids and at
  both ends.

chorus runs the `espeak-ng` program (GPL) instead of linking libespeak-ng: `espeak-ng -q --ipa -v en-us` prints
the same `espeak_TextToPhonemes` IPA for each clause on its own line. Unidecode (GPL) is not a dependency: when it
is not installed, the ASCII step is NFKD with the combining marks dropped and common typographic characters
mapped (`TYPOGRAPHIC`), which agrees with Unidecode for Latin-script text.
"""
from __future__ import annotations

import logging
import re
import shutil
import subprocess
import unicodedata

LOG = logging.getLogger(__name__)

_PAD = "_"
_PUNCTUATION = ';:,.!?¡¿—…"«»“” '
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_LETTERS_IPA = ("ɑɐɒæɓʙβɔɕçɗɖðʤəɘɚɛɜɝɞɟʄɡɠɢʛɦɧħɥʜɨɪʝɭɬɫɮʟɱɯɰŋɳɲɴøɵɸθœɶʘɹɺɾɻʀʁɽʂʃʈʧʉʊʋⱱʌɣɤʍχʎʏʑʐʒʔʡʕʢǀǁǂǃˈˌːˑʼʴʰʱʲʷˠˤ˞↓↑→↗↘'̩'ᵻ")
SYMBOLS: list[str] = [_PAD] + list(_PUNCTUATION) + list(_LETTERS) + list(_LETTERS_IPA)
SYMBOL_TO_ID = {s: i for i, s in enumerate(SYMBOLS)}  # later duplicates win, as in Matcha's dict comprehension

ESPEAK_MISSING = "espeak-ng is not installed: Matcha-TTS voices need it for their phonemes (apt-get install espeak-ng)"

_ABBREVIATIONS = [(re.compile(f"\\b{a}\\.", re.IGNORECASE), b) for a, b in [
    ("mrs", "misess"), ("mr", "mister"), ("dr", "doctor"), ("st", "saint"), ("co", "company"), ("jr", "junior"),
    ("maj", "major"), ("gen", "general"), ("drs", "doctors"), ("rev", "reverend"), ("lt", "lieutenant"),
    ("hon", "honorable"), ("sgt", "sergeant"), ("capt", "captain"), ("esq", "esquire"), ("ltd", "limited"),
    ("col", "colonel"), ("ft", "fort")]]

TYPOGRAPHIC = {"\u2018": "'", "\u2019": "'", "\u201a": ",", "\u201c": '"', "\u201d": '"', "\u201e": ",,",
               "\u2013": "-", "\u2014": "--", "\u2026": "...", "\u00ab": "<<", "\u00bb": ">>", "\u00a0": " ",
               "\u00df": "ss", "\u00e6": "ae", "\u00c6": "AE", "\u0153": "oe", "\u0152": "OE", "\u00f8": "o",
               "\u00d8": "O", "\u0142": "l", "\u0141": "L", "\u00f0": "d", "\u00d0": "D", "\u00fe": "th"}

# phonemizer's Punctuation(default marks): runs of marks with the spaces around them; , and . between digits stay
_MARKS_OTHER = ';:!?¡¿—…"«»“”(){}[]'
_MARKS_RE = re.compile(r'(\s*(?:[' + re.escape(_MARKS_OTHER) + r']|(?<![0-9])[,.]|[,.](?![0-9]))+\s*)+')
_FLAGS_RE = re.compile(r"\(.+?\)")
_BRACKETS_RE = re.compile(r"[\[\]\(\)\{\}]")
_WHITESPACE_RE = re.compile(r"\s+")


class EspeakMissing(RuntimeError):
    pass


def to_ascii(text: str) -> str:
    try:
        from unidecode import unidecode  # optional (GPL): used when the user has it
        return unidecode(text)
    except ImportError:
        pass
    text = "".join(TYPOGRAPHIC.get(c, c) for c in text)
    text = unicodedata.normalize("NFKD", text)
    return "".join(c for c in text if ord(c) < 128)


def espeak_ipa(text: str, voice: str = "en-us") -> str:
    """espeak_TextToPhonemes over all clauses of text, joined by spaces, through phonemizer's line clean-up."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise EspeakMissing(ESPEAK_MISSING)
    proc = subprocess.run([path, "-q", "--ipa", "-b", "1", "-v", voice, "--stdin"], input=text.encode("utf-8"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    if proc.returncode != 0:
        raise ValueError(f"espeak-ng failed: {proc.stderr.decode(errors='replace').strip()}")
    line = " ".join(x for x in proc.stdout.decode("utf-8").splitlines() if x)
    # phonemizer's EspeakBackend._postprocess_line (strip=True, phone separator "", word separator " ")
    line = line.strip().replace("\n", " ").replace("  ", " ")
    line = re.sub(r"_+", "_", line)
    line = re.sub(r"_ ", " ", line)
    line = _FLAGS_RE.sub("", line)
    if not line:
        return ""
    return " ".join(word.strip().replace("_", "") for word in line.split(" "))


def phonemize_preserving_punctuation(text: str, voice: str = "en-us") -> str:
    """phonemizer's phonemize([text], strip=True) with preserve_punctuation=True, for one line of text."""
    matches = list(_MARKS_RE.finditer(text))
    if not matches:
        chunks, marks = [text], []
    elif len(matches) == 1 and matches[0].group() == text:
        return text  # only marks: phonemizer returns them (inner spaces as word separators)
    else:
        marks = []
        for m in matches:
            pos = "I"
            if m is matches[0] and text.startswith(m.group()):
                pos = "B"
            elif m is matches[-1] and text.endswith(m.group()):
                pos = "E"
            marks.append((m.group(), pos))
        chunks, rest = [], text
        for mark, _ in marks:
            split = rest.split(mark)
            chunks.append(split[0])
            rest = mark.join(split[1:])
        chunks.append(rest)
    chunks = [c for c in chunks if c]
    phon = [espeak_ipa(c, voice) for c in chunks]
    # Punctuation.restore (one input line, strip=True, word separator " ")
    out: list[str] = []
    while phon or marks:
        if not marks:
            out.extend(phon)
            phon = []
        elif not phon:
            out.append("".join(m for m, _ in marks))
            marks = []
        else:
            mark, pos = marks.pop(0)
            if phon[0].endswith(" "):
                phon[0] = phon[0][:-1]
            if pos == "B":
                phon[0] = mark + phon[0]
            elif pos == "E":
                out.append(phon.pop(0) + mark)
            elif pos == "A":
                out.append(mark)
            elif len(phon) == 1:
                phon[0] = phon[0] + mark
            else:
                first = phon.pop(0)
                phon[0] = first + mark + phon[0]
    return "".join(out)


def english_cleaners2(text: str, voice: str = "en-us") -> str:
    text = to_ascii(text).lower()
    for regex, replacement in _ABBREVIATIONS:
        text = regex.sub(replacement, text)
    phonemes = phonemize_preserving_punctuation(text, voice)
    phonemes = _BRACKETS_RE.sub("", phonemes)
    return _WHITESPACE_RE.sub(" ", phonemes)


def intersperse(ids: list[int], item: int = 0) -> list[int]:
    result = [item] * (len(ids) * 2 + 1)
    result[1::2] = ids
    return result


def cleaned_to_ids(cleaned: str) -> list[int]:
    """Matcha's text_to_sequence after cleaning; a character outside the table is skipped with a warning
    (Matcha raises KeyError)."""
    ids, missing = [], set()
    for ch in cleaned:
        if ch in SYMBOL_TO_ID:
            ids.append(SYMBOL_TO_ID[ch])
        else:
            missing.add(ch)
    if missing:
        LOG.warning("characters outside Matcha's symbol table were skipped: %s", "".join(sorted(missing)))
    return ids


def text_to_ids(text: str, voice: str = "en-us", add_blank: bool = True) -> list[int]:
    """Text to Matcha's input ids (english_cleaners2, symbol table, blanks interspersed as Matcha's cli does)."""
    ids = cleaned_to_ids(english_cleaners2(text, voice))
    return intersperse(ids, 0) if add_blank else ids
