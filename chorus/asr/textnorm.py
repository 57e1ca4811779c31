"""English text normalisation shared by training and scoring.

:func:`normalize_text` is the single normaliser of the project: it prepares the transcripts of the training corpus
(``recipes/default_asr``) and it is applied to both hypothesis and reference before a word error rate is computed.
The output is lowercase ASCII words made of ``a-z`` and inner apostrophes, separated by single spaces:

>>> normalize_text("Ask not what your country can do for you,")
'ask not what your country can do for you'
>>> normalize_text("In 1961, Mr. Smith paid $3.50 for 2 tickets -- 50% off!")
'in nineteen sixty one mister smith paid three dollars fifty cents for two tickets fifty percent off'

What it does, in order: typographic characters to ASCII (NFKD, combining marks dropped); currency amounts,
times, ordinals, decades, percentages, fractions, decimals and integers spelled out (years such as 1961 are read
"nineteen sixty one", 2005 "two thousand five"); common abbreviations expanded (mr, mrs, dr, st, etc, e.g., ...);
symbols such as ``&`` to words; lowercase; hyphens to spaces; apostrophes kept only inside words; every other
punctuation mark dropped; whitespace collapsed.

``keep_punctuation=True`` keeps the sentence punctuation ``, . ; : ! ?`` attached to the preceding word: the
corpus recipe feeds that form to the speech synthesisers (for prosody), so the spoken words are exactly the words
of the transcript, and ``normalize_text(normalize_text(x, keep_punctuation=True)) == normalize_text(x)``.

Plain Python, no dependencies beyond the standard library.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["normalize_text", "number_to_words", "ordinal_words", "year_words"]

# ----------------------------------------------------------------------------------------------------------------
# numbers

_ONES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_SCALES = ["", "thousand", "million", "billion", "trillion", "quadrillion", "quintillion", "sextillion"]
_MAX_CARDINAL = 10 ** (3 * len(_SCALES)) - 1

_ORDINAL_IRREGULAR = {
    "one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
    "nine": "ninth", "twelve": "twelfth",
}


def _under_thousand(n: int) -> list[str]:
    words: list[str] = []
    hundreds, rest = divmod(n, 100)
    if hundreds:
        words += [_ONES[hundreds], "hundred"]
    if rest >= 20:
        tens, ones = divmod(rest, 10)
        words.append(_TENS[tens])
        if ones:
            words.append(_ONES[ones])
    elif rest or not words:
        words.append(_ONES[rest])
    return words


def _digits_words(digits: str) -> str:
    return " ".join(_ONES[int(d)] for d in digits)


def number_to_words(n: int) -> str:
    """Cardinal number in words, American style without "and": 1234 -> "one thousand two hundred thirty four"."""
    if n < 0:
        return "minus " + number_to_words(-n)
    if n > _MAX_CARDINAL:
        return _digits_words(str(n))
    if n < 1000:
        return " ".join(_under_thousand(n))
    groups: list[int] = []
    while n:
        n, g = divmod(n, 1000)
        groups.append(g)
    words: list[str] = []
    for scale in range(len(groups) - 1, -1, -1):
        g = groups[scale]
        if g:
            words += _under_thousand(g)
            if _SCALES[scale]:
                words.append(_SCALES[scale])
    return " ".join(words)


def _ordinalize_word(word: str) -> str:
    if word in _ORDINAL_IRREGULAR:
        return _ORDINAL_IRREGULAR[word]
    if word.endswith("y"):
        return word[:-1] + "ieth"
    return word + "th"


def ordinal_words(n: int) -> str:
    """Ordinal in words: 1 -> "first", 21 -> "twenty first", 100 -> "one hundredth"."""
    words = number_to_words(n).split()
    words[-1] = _ordinalize_word(words[-1])
    return " ".join(words)


def year_words(n: int) -> str:
    """A year as it is read: 1961 "nineteen sixty one", 1900 "nineteen hundred", 1905 "nineteen oh five",
    2000 "two thousand", 2005 "two thousand five", 2024 "twenty twenty four"."""
    if n < 1000 or n > 9999 or (2000 <= n <= 2009) or n % 1000 == 0:
        return number_to_words(n)
    hi, lo = divmod(n, 100)
    if lo == 0:
        return number_to_words(hi) + " hundred"
    if lo < 10:
        return number_to_words(hi) + " oh " + _ONES[lo]
    return number_to_words(hi) + " " + number_to_words(lo)


def _pluralize_word(word: str) -> str:
    if word.endswith("y"):
        return word[:-1] + "ies"
    if word.endswith("x"):
        return word + "es"
    return word + "s"


def _plural_number(n: int, as_year: bool) -> str:
    words = (year_words(n) if as_year else number_to_words(n)).split()
    words[-1] = _pluralize_word(words[-1])
    return " ".join(words)


def _is_year(n: int) -> bool:
    return 1100 <= n <= 2099


def _int_text(digits: str, year_ok: bool = True) -> str:
    """Spell out a run of digits: leading zeros and very long runs are read digit by digit."""
    digits = digits.replace(",", "")
    if len(digits) > 1 and digits[0] == "0":
        return _digits_words(digits)
    if len(digits) > 21:
        return _digits_words(digits)
    n = int(digits)
    if year_ok and len(digits) == 4 and _is_year(n):
        return year_words(n)
    return number_to_words(n)


def _decimal_text(int_part: str, frac_part: str) -> str:
    head = _int_text(int_part, year_ok=False) if int_part else ""
    return f"{head} point {_digits_words(frac_part)}".strip()


# ----------------------------------------------------------------------------------------------------------------
# character level

_CHAR_MAP = {
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'", "\u02bc": "'", "`": "'",
    "\u00b4": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": " - ", "\u2014": " - ", "\u2015": " - ",
    "\u2212": "-",
    "\u2026": "...", "\u00a0": " ", "\u2009": " ", "\u202f": " ", "\u2044": "/", "\u00d7": " times ",
    "\u00f7": " divided by ", "\u00b0": " degrees ", "\u00a7": " section ", "\u00b6": " ",
    "\u00df": "ss", "\u00e6": "ae", "\u00c6": "ae", "\u0153": "oe", "\u0152": "oe", "\u00f8": "o", "\u00d8": "o",
    "\u0142": "l", "\u0141": "l", "\u00f0": "d", "\u00d0": "d", "\u00fe": "th", "\u00de": "th", "\u0131": "i",
}
_CHAR_TABLE = str.maketrans(_CHAR_MAP)


def _to_ascii(text: str) -> str:
    text = text.translate(_CHAR_TABLE)
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = text.translate(_CHAR_TABLE)  # NFKD can produce some of the mapped characters (e.g. fraction slash)
    return text


# ----------------------------------------------------------------------------------------------------------------
# abbreviations and symbols

_LATIN = [
    (re.compile(r"\be\.\s?g\.", re.I), " for example "),
    (re.compile(r"\bi\.\s?e\.", re.I), " that is "),
    (re.compile(r"\bviz\.", re.I), " namely "),
    (re.compile(r"\bcf\.", re.I), " compare "),
    (re.compile(r"\betc\b\.?", re.I), " et cetera "),
    (re.compile(r"\bvs\b\.?", re.I), " versus "),
]

# expanded with or without a trailing period
_ABBREV_ALWAYS = {
    "mr": "mister", "mrs": "missus", "ms": "miss", "dr": "doctor", "jr": "junior", "sr": "senior", "mt": "mount",
}
# titles, expanded only as "Xxx." followed by a capitalised name
_ABBREV_TITLE = {
    "prof": "professor", "gen": "general", "capt": "captain", "lt": "lieutenant", "sgt": "sergeant",
    "rev": "reverend", "gov": "governor", "sen": "senator", "rep": "representative", "col": "colonel",
    "pres": "president", "hon": "honorable", "ft": "fort",
}
# expanded only with their period
_ABBREV_DOTTED = {
    "approx": "approximately", "dept": "department", "ave": "avenue", "blvd": "boulevard", "inc": "incorporated",
    "ltd": "limited", "corp": "corporation", "assn": "association", "univ": "university", "est": "established",
    "esp": "especially",
}
# expanded only with their period and before a number
_ABBREV_NUMBERED = {"no": "number", "nos": "numbers", "fig": "figure", "vol": "volume", "ch": "chapter",
                    "p": "page", "pp": "pages", "art": "article", "sec": "section"}

_RE_ST = re.compile(r"\b[Ss][Tt]\b\.?")
_RE_ALWAYS = re.compile(r"\b(" + "|".join(_ABBREV_ALWAYS) + r")\b\.?", re.I)
_RE_TITLE = re.compile(r"\b(" + "|".join(_ABBREV_TITLE) + r")\.(?=\s+[A-Z])", re.I)
_RE_DOTTED = re.compile(r"\b(" + "|".join(_ABBREV_DOTTED) + r")\.", re.I)
_RE_NUMBERED = re.compile(r"\b(" + "|".join(_ABBREV_NUMBERED) + r")\.(?=\s*\d)", re.I)
_RE_DOTTED_LETTERS = re.compile(r"\b(?:[A-Za-z]\.){2,}(?![A-Za-z])")
_RE_AMPM = re.compile(r"(?<=\d)\s*(?:([aApP])\.\s?[mM]\.|([aApP])[mM]\b|(A|P)M\b)")


def _sub_st(m: re.Match) -> str:
    # "St. Louis" -> saint, "Main St." -> street
    rest = m.string[m.end():]
    nxt = re.match(r"\s+([A-Za-z])", rest)
    if nxt and nxt.group(1).isupper():
        return " saint "
    return " street "


def _expand_abbreviations(text: str) -> str:
    for rx, rep in _LATIN:
        text = rx.sub(rep, text)
    text = _RE_ST.sub(_sub_st, text)
    text = _RE_ALWAYS.sub(lambda m: " " + _ABBREV_ALWAYS[m.group(1).lower()] + " ", text)
    text = _RE_TITLE.sub(lambda m: " " + _ABBREV_TITLE[m.group(1).lower()] + " ", text)
    text = _RE_DOTTED.sub(lambda m: " " + _ABBREV_DOTTED[m.group(1).lower()] + " ", text)
    text = _RE_NUMBERED.sub(lambda m: " " + _ABBREV_NUMBERED[m.group(1).lower()] + " ", text)
    return text


_SYMBOLS = [
    (re.compile(r"&"), " and "),
    (re.compile(r"@"), " at "),
    (re.compile(r"\+"), " plus "),
    (re.compile(r"(?<=\s)=(?=\s)|(?<=\w)=(?=\w)"), " equals "),
    (re.compile(r"#(?=\s?\d)"), " number "),
]

_UNITS = {
    "km": "kilometers", "kg": "kilograms", "cm": "centimeters", "mm": "millimeters", "mg": "milligrams",
    "mph": "miles per hour", "kph": "kilometers per hour", "lb": "pounds", "lbs": "pounds", "oz": "ounces",
    "ft": "feet", "hrs": "hours", "hr": "hours", "mins": "minutes", "kb": "kilobytes", "mb": "megabytes",
    "gb": "gigabytes", "tb": "terabytes", "khz": "kilohertz", "mhz": "megahertz", "ghz": "gigahertz",
    "hz": "hertz", "kw": "kilowatts", "ml": "milliliters",
}
_RE_UNITS = re.compile(r"(?<=\d)\s?(" + "|".join(sorted(_UNITS, key=len, reverse=True)) + r")\b", re.I)
_RE_DEGREES = re.compile(r"\bdegrees\s*([CF])\b")


def _expand_symbols(text: str) -> str:
    for rx, rep in _SYMBOLS:
        text = rx.sub(rep, text)
    text = _RE_DEGREES.sub(lambda m: "degrees " + ("celsius" if m.group(1) == "C" else "fahrenheit"), text)
    text = _RE_UNITS.sub(lambda m: " " + _UNITS[m.group(1).lower()] + " ", text)
    return text


# ----------------------------------------------------------------------------------------------------------------
# numeric expressions

_NUM = r"\d{1,3}(?:,\d{3})+|\d+"  # 1,234,567 or 1234567
_CURRENCY = {
    "$": ("dollar", "dollars", "cent", "cents"),
    "\u00a3": ("pound", "pounds", "penny", "pence"),
    "\u20ac": ("euro", "euros", "cent", "cents"),
    "\u00a5": ("yen", "yen", "sen", "sen"),
}
_SCALE_WORDS = "thousand|million|billion|trillion"
_RE_CURRENCY = re.compile(
    r"([$\u00a3\u20ac\u00a5])\s?(" + _NUM + r")?(?:\.(\d+))?(?:\s?(" + _SCALE_WORDS + r"|[mb]n|[kmb])\b)?", re.I)
_RE_TIME = re.compile(r"(?<![\d:])([01]?\d|2[0-3]):([0-5]\d)(?![\d:])(?:\s*([ap])\s?m\b)?", re.I)
_RE_ORDINAL = re.compile(r"(?<![\d.])(" + _NUM + r")(?:st|nd|rd|th)\b", re.I)
_RE_DECADE = re.compile(r"(?<![\w.])'?(\d{2}|\d{4})'?s\b")
_RE_PERCENT = re.compile(r"(?<![\d.])(" + _NUM + r")?(?:\.(\d+))?\s?(%|\bper\s?cent\b)", re.I)
_RE_FRACTION = re.compile(r"(?<![\d/])(\d{1,3})/(\d{1,2})(?![\d/])")
_RE_DECIMAL = re.compile(r"(?<![\d.])(" + _NUM + r")?\.(\d+)(?![\d.]*\d)")
_RE_NEGATIVE = re.compile(r"(?<![\w.\-])-(?=\.?\d)")
_RE_INTEGER = re.compile(r"(" + _NUM + r")")
_FRACTION_NAMES = {2: ("half", "halves"), 4: ("quarter", "quarters")}


def _scale_suffix(s: str | None) -> str:
    if not s:
        return ""
    s = s.lower()
    return {"k": "thousand", "m": "million", "mn": "million", "b": "billion", "bn": "billion"}.get(s, s)


def _sub_currency(m: re.Match) -> str:
    sym, whole, frac, scale = m.group(1), m.group(2), m.group(3), _scale_suffix(m.group(4))
    one, many, sub_one, sub_many = _CURRENCY[sym]
    if whole is None and frac is None:
        return f" {many} "
    if scale:  # $1.5 million -> one point five million dollars
        amount = _decimal_text(whole or "0", frac) if frac else _int_text(whole, year_ok=False)
        return f" {amount} {scale} {many} "
    if frac is not None and len(frac) > 2:
        return f" {_decimal_text(whole or '0', frac)} {many} "
    units = int(whole.replace(",", "")) if whole else 0
    cents = int(frac.ljust(2, "0")) if frac else 0
    parts = []
    if units or not cents:
        parts.append(f"{_int_text(whole or '0', year_ok=False)} {one if units == 1 else many}")
    if cents:
        parts.append(f"{number_to_words(cents)} {sub_one if cents == 1 else sub_many}")
    return " " + " ".join(parts) + " "


def _sub_time(m: re.Match) -> str:
    h, mm, ap = int(m.group(1)), int(m.group(2)), m.group(3)
    words = number_to_words(h)
    if mm == 0:
        words += "" if ap else " o'clock"
    elif mm < 10:
        words += " oh " + _ONES[mm]
    else:
        words += " " + number_to_words(mm)
    if ap:
        words += f" {ap.lower()} m"
    return f" {words} "


def _sub_ordinal(m: re.Match) -> str:
    return " " + ordinal_words(int(m.group(1).replace(",", ""))) + " "


def _sub_decade(m: re.Match) -> str:
    d = m.group(1)
    n = int(d)
    if len(d) == 2:
        return " " + _plural_number(n, as_year=False) + " "  # '80s -> eighties
    return " " + _plural_number(n, as_year=_is_year(n)) + " "


def _sub_percent(m: re.Match) -> str:
    whole, frac = m.group(1), m.group(2)
    if whole is None and frac is None:
        return " percent "
    num = _decimal_text(whole or "", frac) if frac is not None else _int_text(whole, year_ok=False)
    return f" {num} percent "


def _sub_fraction(m: re.Match) -> str:
    num, den = int(m.group(1)), int(m.group(2))
    if den == 0 or den == 1 or den > 10 or num == 0:
        return f" {number_to_words(num)} {number_to_words(den)} "
    if den in _FRACTION_NAMES:
        one, many = _FRACTION_NAMES[den]
    else:
        one = ordinal_words(den)
        many = one + "s"
    return f" {number_to_words(num)} {one if num == 1 else many} "


def _sub_decimal(m: re.Match) -> str:
    return " " + _decimal_text(m.group(1) or "", m.group(2)) + " "


def _sub_integer(m: re.Match) -> str:
    return " " + _int_text(m.group(1)) + " "


def _expand_numbers(text: str) -> str:
    text = _RE_CURRENCY.sub(_sub_currency, text)
    text = _RE_AMPM.sub(lambda m: " " + (m.group(1) or m.group(2) or m.group(3)).lower() + " m ", text)
    text = _RE_TIME.sub(_sub_time, text)
    text = _RE_ORDINAL.sub(_sub_ordinal, text)
    text = _RE_DECADE.sub(_sub_decade, text)
    text = _RE_PERCENT.sub(_sub_percent, text)
    text = _RE_FRACTION.sub(_sub_fraction, text)
    text = _RE_NEGATIVE.sub(" minus ", text)
    text = _RE_DECIMAL.sub(_sub_decimal, text)
    text = _RE_INTEGER.sub(_sub_integer, text)
    return text


# ----------------------------------------------------------------------------------------------------------------
# final clean-up

_RE_INNER_APOS = re.compile(r"(?<![a-z])'+|'+(?![a-z])")
_RE_NOT_WORD = re.compile(r"[^a-z' ]+")
_RE_NOT_WORD_PUNCT = re.compile(r"[^a-z' .,;:!?]+")
_RE_SPACES = re.compile(r"\s+")
_RE_PUNCT_RUN = re.compile(r"\s*([.,;:!?])[\s.,;:!?]*")


def _tidy_punctuation(text: str) -> str:
    # attach each run of punctuation marks, reduced to its first mark, to the preceding word
    text = _RE_PUNCT_RUN.sub(lambda m: m.group(1) + " ", text)
    text = _RE_SPACES.sub(" ", text).strip()
    while text and text[0] in ".,;:!?":
        text = text[1:].lstrip()
    return text


def normalize_text(text: str, *, keep_punctuation: bool = False) -> str:
    """Normalise English text to lowercase spoken-form words (see the module docstring)."""
    if not text:
        return ""
    text = _to_ascii(text)
    text = _expand_abbreviations(text)
    text = _RE_DOTTED_LETTERS.sub(lambda m: " " + " ".join(m.group(0).replace(".", "")) + " ", text)
    text = _expand_symbols(text)
    text = _expand_numbers(text)
    text = text.lower()
    text = text.replace("-", " ").replace("_", " ").replace("/", " ")
    text = _RE_INNER_APOS.sub(" ", text)
    if keep_punctuation:
        text = _RE_NOT_WORD_PUNCT.sub(" ", text)
        # "..." and stray dots between words are pauses, not words
        return _tidy_punctuation(text)
    text = _RE_NOT_WORD.sub(" ", text)
    return _RE_SPACES.sub(" ", text).strip()
