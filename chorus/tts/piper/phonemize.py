"""Piper's text front end: espeak-ng phonemes per clause, grouped into sentences, then phoneme ids.

Piper (piper1-gpl `phonemize_espeak.py` + `espeakbridge.c`, and piper-phonemize before it) calls libespeak-ng's
`espeak_TextToPhonemesWithTerminator(text, espeakCHARS_AUTO, espeakPHONEMES_IPA)` clause by clause with the
voice's espeak voice, and for each clause:

* removes language-switch flags like `(fr)` from the IPA string,
* appends the clause's terminator: `.` `?` `!` for a full stop, question and exclamation, `,` `:` `;` plus a space
  for a comma, colon and semicolon, nothing for any other ending,
* splits it into Unicode code points after NFD normalization (so accents become their own "phonemes"),
* ends the sentence when espeak's clause type is a sentence (full stop, question, exclamation, paragraph, end of
  text).

chorus is Apache-2.0 and espeak-ng is GPL, so chorus runs the `espeak-ng` program instead of linking it:
`espeak-ng -q --ipa -v VOICE --stdin` prints `GetTranslatedPhonemeString(espeakPHONEMES_IPA)` for each clause
on its own line: the same function and mode the library call returns, over the same clauses (espeak's
`ReadClause`). The program does not print the terminators, so `clauses()` below finds them by the rules
`ReadClause` applies (which punctuation ends a clause, when a dot does not, runs of ?!, ellipses, paragraphs).
When its clause count differs from espeak's line count (text where those rules are not all reproduced here:
over-long clauses, SSML-like input, rare scripts), each clause found here is phonemized on its own instead.
"""
from __future__ import annotations

import logging
import re
import shutil
import subprocess
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

LOG = logging.getLogger(__name__)

PAD, BOS, EOS = "_", "^", "$"

ESPEAK_MISSING = "espeak-ng is not installed: Piper voices need it for their phonemes (apt-get install espeak-ng)"

# terminator kinds, as Piper's bridge names them
_PERIOD, _QUESTION, _EXCLAMATION, _COMMA, _COLON, _SEMICOLON = ".", "?", "!", ",", ":", ";"
# code point -> (Piper's terminator string, ends a sentence, may be followed by no space); espeak's
# clause_type_from_codepoint for the characters chorus handles here
_PUNCT: dict[str, tuple[str, bool, bool]] = {
    ".": (_PERIOD, True, False), "?": (_QUESTION, True, False), "!": (_EXCLAMATION, True, False),
    ",": (_COMMA, False, False), ":": (_COLON, False, False), ";": (_SEMICOLON, False, False),
    # extended dashes end a clause like a semicolon
    "\u2014": (_SEMICOLON, False, False), "\u2015": (_SEMICOLON, False, False),
    # ellipsis: CLAUSE_SEMICOLON | SPEAK_PUNCTUATION_NAME | OPTIONAL_SPACE_AFTER, which Piper's mask leaves
    # unmatched: no terminator, not a sentence end (Piper then glues the next clause on without a space)
    "\u2026": ("", False, True),
    # CJK full-width forms: optional space after
    "\u3002": (_PERIOD, True, True), "\uff0e": (_PERIOD, True, True), "\uff1f": (_QUESTION, True, True),
    "\uff01": (_EXCLAMATION, True, True), "\uff0c": (_COMMA, False, True), "\u3001": (_COMMA, False, True),
    "\uff1a": (_COLON, False, True), "\uff1b": (_SEMICOLON, False, True),
}
_BRACKETS = set("()[]{}<>\"'`\u00ab\u00bb\u300a\u300b") | {chr(c) for c in range(0x2014, 0x2020)}


@dataclass(frozen=True)
class Clause:
    text: str
    terminator: str  # what Piper appends: "." "?" "!" "," ":" ";" or ""
    ends_sentence: bool


def clauses(text: str) -> list[Clause]:
    """Cut text into espeak-ng's clauses with Piper's terminator for each (ReadClause's rules, see module doc)."""
    return [c for c, _ in clause_spans(text)]


def clause_spans(text: str) -> list[tuple[Clause, int]]:
    """`clauses`, each with where the next clause starts in `text` (after the whitespace that follows it).

    A clause ending with punctuation is decided by the next non-space character (a dot before a lower-case word
    is an abbreviation's); the last clause of `text` is the end of text (decided by nothing after it), which is
    what a streaming segmenter needs to know: every clause but the last is final once more text follows."""
    out: list[tuple[Clause, int]] = []
    n = len(text)
    start = 0
    any_alnum = False
    i = 0
    while i < n:
        c = text[i]
        if c == "\n":
            j = i + 1
            nl = 0
            while j < n and text[j].isspace():
                nl += text[j] == "\n"
                j += 1
            if nl > 0 and j < n:  # a blank line: paragraph, a sentence end with no terminator
                out.append((Clause(text[start:i], "", True), j))
                start, i, any_alnum = j, j, False
                continue
        if c.isalnum():
            any_alnum = True
        if c == "." and text[i + 1:i + 3] == "..":  # 3 or more dots are an ellipsis
            j = i
            while j < n and text[j] == ".":
                j += 1
            kind, nxt = _PUNCT["\u2026"], j
        elif c in _PUNCT:
            kind, nxt = _PUNCT[c], i + 1
            if kind[0] in (_QUESTION, _EXCLAMATION):  # ??!? counts as its first character
                while nxt < n and text[nxt] in "?!\uff1f\uff01":
                    nxt += 1
        else:
            i += 1
            continue
        c2 = text[nxt] if nxt < n else ""
        end = kind[2] or c2 == "" or c2.isspace() or c2 in _BRACKETS or c2 == "?"
        if end:
            j = nxt
            nl = 0
            while j < n and text[j].isspace():
                nl += text[j] == "\n"
                j += 1
            c_next = text[j] if j < n else ""
            if nl == 0:
                if c == "." and nxt == i + 1:
                    if c_next == "'" and text[j + 1:j + 2] == "s":
                        end = False  # acronym + genitive: u.s.a.'s
                    if c_next.islower():
                        end = False  # a dot before a lower-case word is an abbreviation's
                if not any_alnum:
                    end = False
            if end:
                terminator, sentence = kind[0], kind[1]
                if nl > 1:  # punctuation then a blank line: a paragraph
                    terminator, sentence = "", True
                out.append((Clause(text[start:nxt], terminator, sentence), j))
                start, i, any_alnum = j, j, False
                continue
        i = nxt
    if text[start:].strip() or not out:
        out.append((Clause(text[start:], "", True), n))  # end of text: CLAUSE_EOF, a sentence with no terminator
    return out


def espeak_path() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise EspeakMissing(ESPEAK_MISSING)
    return path


class EspeakMissing(RuntimeError):
    pass


def _espeak_lines(text: str, voice: str) -> list[str]:
    proc = subprocess.run([espeak_path(), "-q", "--ipa", "-b", "1", "-v", voice, "--stdin"], input=text.encode("utf-8"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    if proc.returncode != 0:
        raise ValueError(f"espeak-ng failed for voice {voice!r}: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode("utf-8").splitlines()


def clause_phonemes(text: str, voice: str) -> list[tuple[str, Clause]]:
    """(IPA string, clause) for each espeak-ng clause of text, as espeak_TextToPhonemes returns them."""
    cut = [c for c in clauses(text)]
    lines = _espeak_lines(text, voice) if text.strip() else []
    if len(lines) == len(cut):
        return list(zip(lines, cut))
    LOG.debug("espeak-ng gave %d clauses, chorus found %d: phonemizing clause by clause", len(lines), len(cut))
    # espeak broke a clause that the rules here did not (or the reverse): keep chorus' clauses and terminators;
    # sub-clauses espeak makes inside one are joined without a terminator, as Piper joins clauses that have none
    return [("".join(_espeak_lines(c.text, voice)) if c.text.strip() else "", c) for c in cut]


def phonemize(text: str, voice: str) -> list[list[str]]:
    """Text to Piper's phonemes, one list of code points per sentence (Piper's EspeakPhonemizer.phonemize)."""
    sentences: list[list[str]] = []
    current: list[str] = []
    for ipa, clause in clause_phonemes(text, voice):
        ipa = re.sub(r"\([^)]+\)", "", ipa) + clause.terminator  # drop (lang) switch flags, keep punctuation
        if clause.terminator in (",", ":", ";"):
            ipa += " "
        current.extend(unicodedata.normalize("NFD", ipa))
        if clause.ends_sentence:
            sentences.append(current)
            current = []
    if current:
        sentences.append(current)
    return [s for s in sentences if s]


def phonemes_to_ids(phonemes: Sequence[str], id_map: Mapping[str, Sequence[int]]) -> list[int]:
    """Piper's phoneme-id mapping: BOS, PAD, then each known phoneme followed by PAD, then EOS.

    Phonemes missing from the map are skipped (Piper logs a warning and goes on)."""
    ids = list(id_map[BOS]) + list(id_map[PAD])
    missing = []
    for phoneme in phonemes:
        if phoneme not in id_map:
            missing.append(phoneme)
            continue
        ids.extend(id_map[phoneme])
        ids.extend(id_map[PAD])
    ids.extend(id_map[EOS])
    if missing:
        LOG.warning("phonemes missing from the voice's id map were skipped: %s", "".join(sorted(set(missing))))
    return ids
