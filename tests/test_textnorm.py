import re

import pytest

from chorus.asr.textnorm import normalize_text, number_to_words, ordinal_words, year_words

JFK = ("And so, my fellow Americans, ask not what your country can do for you, "
       "ask what you can do for your country.")


def test_jfk_reference():
    assert normalize_text(JFK) == ("and so my fellow americans ask not what your country can do for you "
                                   "ask what you can do for your country")


def test_trailing_comma_and_case():
    assert normalize_text("ask not what your country can do for you,") == "ask not what your country can do for you"
    assert normalize_text("ASK Not") == "ask not"


def test_digits_zero_to_nine():
    assert normalize_text("0 1 2 3 4 5 6 7 8 9") == "zero one two three four five six seven eight nine"
    for d, w in enumerate("zero one two three four five six seven eight nine".split()):
        assert normalize_text(str(d)) == w


@pytest.mark.parametrize("n, words", [
    (0, "zero"), (13, "thirteen"), (20, "twenty"), (21, "twenty one"), (100, "one hundred"),
    (101, "one hundred one"), (999, "nine hundred ninety nine"), (1000, "one thousand"),
    (1001, "one thousand one"), (12345, "twelve thousand three hundred forty five"),
    (1_000_000, "one million"), (2_000_000_003, "two billion three"),
    (-42, "minus forty two"),
])
def test_number_to_words(n, words):
    assert number_to_words(n) == words


@pytest.mark.parametrize("text, expected", [
    ("1,234,567", "one million two hundred thirty four thousand five hundred sixty seven"),
    ("1000000", "one million"),
    ("-5", "minus five"),
    ("it was -12 degrees", "it was minus twelve degrees"),
    ("3.14", "three point one four"),
    ("0.5", "zero point five"),
    ("-0.25", "minus zero point two five"),
    ("007", "zero zero seven"),
])
def test_cardinals_and_decimals(text, expected):
    assert normalize_text(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("1st", "first"), ("2nd", "second"), ("3rd", "third"), ("4th", "fourth"), ("12th", "twelfth"),
    ("21st", "twenty first"), ("22nd", "twenty second"), ("100th", "one hundredth"), ("1,000th", "one thousandth"),
])
def test_ordinals(text, expected):
    assert normalize_text(text) == expected


def test_ordinal_words():
    assert ordinal_words(23) == "twenty third"
    assert ordinal_words(90) == "ninetieth"


@pytest.mark.parametrize("text, expected", [
    ("1961", "nineteen sixty one"), ("2005", "two thousand five"), ("2000", "two thousand"),
    ("1900", "nineteen hundred"), ("1905", "nineteen oh five"), ("2024", "twenty twenty four"),
    ("in 1066", "in one thousand sixty six"), ("1990s", "nineteen nineties"), ("the '80s", "the eighties"),
])
def test_years(text, expected):
    assert normalize_text(text) == expected


def test_year_words():
    assert year_words(1776) == "seventeen seventy six"


@pytest.mark.parametrize("text, expected", [
    ("50%", "fifty percent"), ("3.5%", "three point five percent"), ("10 percent", "ten percent"),
    ("$5", "five dollars"), ("$1", "one dollar"), ("$3.50", "three dollars fifty cents"),
    ("$0.99", "ninety nine cents"), ("$1.5 million", "one point five million dollars"),
    ("\u00a310", "ten pounds"), ("\u20ac2.50", "two euros fifty cents"),
    ("3:30", "three thirty"), ("10:05", "ten oh five"), ("12:00", "twelve o'clock"),
    ("3:30 p.m.", "three thirty p m"), ("5pm", "five p m"),
    ("3/4", "three quarters"), ("1/2", "one half"),
])
def test_percent_money_time_fractions(text, expected):
    assert normalize_text(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Mr. Smith", "mister smith"), ("Mrs. Smith", "missus smith"), ("Dr. Jones", "doctor jones"),
    ("mr smith", "mister smith"), ("St. Louis", "saint louis"), ("10 Downing St.", "ten downing street"),
    ("Tom & Jerry", "tom and jerry"), ("apples, pears, etc.", "apples pears et cetera"),
    ("cats vs. dogs", "cats versus dogs"), ("e.g. this", "for example this"), ("the U.S.A.", "the u s a"),
    ("No. 5", "number five"), ("Prof. Higgins", "professor higgins"),
])
def test_abbreviations(text, expected):
    assert normalize_text(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("don't", "don't"), ("It's", "it's"), ("o'clock", "o'clock"),
    ("\u2018quoted\u2019 words", "quoted words"), ("the dogs' bones", "the dogs bones"),
    ("don\u2019t", "don't"), ("rock 'n' roll", "rock n roll"),
])
def test_apostrophes(text, expected):
    assert normalize_text(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("well-known", "well known"), ("twenty-one", "twenty one"), ("state-of-the-art", "state of the art"),
    ("wait -- what", "wait what"), ("caf\u00e9 na\u00efve r\u00e9sum\u00e9", "cafe naive resume"),
    ("\u201cHello,\u201d she said\u2026", "hello she said"), ("Stra\u00dfe", "strasse"),
    ("  lots\tof \n space  ", "lots of space"), ("(brackets) [and] {braces}!?", "brackets and braces"),
    ("", ""), ("...", ""),
])
def test_punctuation_unicode_whitespace(text, expected):
    assert normalize_text(text) == expected


SAMPLES = [
    JFK, "In 1961, Mr. Smith paid $3.50 for 2 tickets -- 50% off!", "The 1st, 2nd & 3rd of May, 2005.",
    "Pi is 3.14; e is approx. 2.718...", "It's -5 degrees at 3:30 p.m. on St. Patrick's Day!",
    "\u201cDon\u2019t,\u201d she said \u2014 twice.", "Is it 1/2 or 3/4? Nobody knows.",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_output_alphabet_and_idempotence(text):
    out = normalize_text(text)
    assert re.fullmatch(r"[a-z']+( [a-z']+)*", out), out
    assert normalize_text(out) == out


@pytest.mark.parametrize("text", SAMPLES)
def test_keep_punctuation_has_the_same_words(text):
    spoken = normalize_text(text, keep_punctuation=True)
    assert re.fullmatch(r"[a-z'.,;:!? ]+", spoken), spoken
    assert normalize_text(spoken) == normalize_text(text)


def test_keep_punctuation_form():
    assert normalize_text("Hello, world... How are you?!", keep_punctuation=True) == "hello, world. how are you?"
