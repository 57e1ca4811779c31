"""Token-level ARPA n-grams: reading, the back-off recursion, Kneser-Ney estimation, bad files."""
import gzip
import math

import numpy as np
import pytest

from chorus.asr.ngram import LMError, NgramLM, estimate_kneser_ney, read_arpa, write_arpa

LN10 = math.log(10)
PIECES = ["▁a", "▁b", "c", "▁d"]

HAND_ARPA = """
\\data\\
ngram 1=6
ngram 2=3
ngram 3=1

\\1-grams:
-99\t<s>\t-0.5
-1.0\t</s>
-0.5\t▁a\t-0.3
-0.7\t▁b\t-0.2
-0.9\tc
-1.5\t<unk>

\\2-grams:
-0.1\t<s> ▁a\t-0.25
-0.2\t▁a ▁b\t-0.1
-0.4\t▁b c

\\3-grams:
-0.05\t<s> ▁a ▁b

\\end\\
"""


@pytest.fixture
def hand_lm(tmp_path):
    path = tmp_path / "hand.arpa"
    path.write_text(HAND_ARPA, encoding="utf-8")
    return NgramLM.from_arpa(path, PIECES)


def test_back_off_recursion_by_hand(hand_lm):
    a, b, c, d = range(4)
    bos = hand_lm.bos
    uni = np.array([-0.5, -0.7, -0.9, -1.5])  # ▁d is not in the file: <unk>'s probability
    np.testing.assert_allclose(hand_lm.log_probs(()), uni * LN10)
    # after ▁a: ▁b is listed; the rest back off with bow(▁a) = -0.3
    np.testing.assert_allclose(hand_lm.log_probs((a,)), np.array([-0.8, -0.2, -1.2, -1.8]) * LN10)
    # after <s> ▁a: the trigram, else bow(<s> ▁a) + P(. | ▁a)
    np.testing.assert_allclose(hand_lm.log_probs((bos, a)), np.array([-1.05, -0.05, -1.45, -2.05]) * LN10)
    # after ▁d ▁b: "▁d ▁b" is no context, so no back-off weight; then bow(▁b) + unigram or "▁b c"
    np.testing.assert_allclose(hand_lm.log_probs((d, b)), np.array([-0.7, -0.9, -0.4, -1.7]) * LN10)
    assert hand_lm.extend((bos, a), b) == (a, b) and hand_lm.order == 3
    # end of sentence: only the unigram </s> is listed, so P(</s> | ctx) backs off to it
    assert hand_lm.end_log_prob((bos, a)) == pytest.approx((-0.25 - 0.3 - 1.0) * LN10)
    assert hand_lm.end_log_prob((d, b)) == pytest.approx((-0.2 - 1.0) * LN10)


def test_results_are_cached_and_read_only(hand_lm):
    first = hand_lm.log_probs((0,))
    assert hand_lm.log_probs((0,)) is first
    with pytest.raises(ValueError):
        first[0] = 0.0


def _sentences(seed=0, n=400):
    rng = np.random.default_rng(seed)
    return [[PIECES[int(i)] for i in rng.integers(0, int(rng.integers(1, 5)), int(rng.integers(1, 9)))]
            for _ in range(n)]


def _prob(grams, context, word):
    """P(word | context) straight from the ARPA entries (independent of NgramLM)."""
    bow = 0.0
    while True:
        if context + (word,) in grams:
            return 10 ** (bow + grams[context + (word,)][0])
        if context in grams:
            bow += grams[context][1]
        context = context[1:]


@pytest.mark.parametrize("min_count", [1, 2])
def test_kneser_ney_is_normalised_and_round_trips(tmp_path, min_count):
    grams = estimate_kneser_ney(_sentences(), order=4, min_count=min_count)
    path = tmp_path / "kn.arpa.gz"
    write_arpa(grams, path)
    order, back = read_arpa(path)
    assert order == 4 and set(back) == set(grams)
    assert max(abs(back[g][0] - grams[g][0]) for g in grams) < 1e-5
    lm = NgramLM(order, back, PIECES)
    for context in [("<s>",), ("<s>", "▁a"), ("▁a", "▁b", "c"), ("c", "c", "c"), ("▁d",)]:
        ids = tuple(lm.bos if w == "<s>" else PIECES.index(w) for w in context)
        total = np.exp(lm.log_probs(ids)).sum() + _prob(back, context, "</s>")
        # the rest is <unk>'s share of the unigram mass (a few thousandths here)
        assert 0.99 < total <= 1.0 + 1e-9, context
    assert gzip.open(path).read().startswith(b"\n\\data\\")


def test_kneser_ney_learns_the_text():
    grams = estimate_kneser_ney([["▁a", "▁b", "c"]] * 50 + [["▁d", "▁b"]] * 5, order=3, min_count=1)
    lm = NgramLM(3, grams, PIECES)
    a, b, c, d = range(4)
    assert np.exp(lm.log_probs((a, b)))[c] > 0.9
    assert np.exp(lm.log_probs((d, b)))[c] < 0.5  # "▁d ▁b" ends sentences
    assert np.argmax(lm.log_probs((lm.bos,))) == a


def test_pruning_drops_rare_higher_order_ngrams():
    full = estimate_kneser_ney(_sentences(1), order=4, min_count=1)
    pruned = estimate_kneser_ney(_sentences(1), order=4, min_count=3)
    assert {g for g in full if len(g) <= 2} == {g for g in pruned if len(g) <= 2}
    assert sum(len(g) == 4 for g in pruned) < sum(len(g) == 4 for g in full)
    for g in pruned:  # every listed n-gram's context is listed too (ARPA's rule)
        assert len(g) == 1 or g[:-1] in pruned


def test_written_files_are_reproducible(tmp_path):
    grams = estimate_kneser_ney(_sentences(2), order=3)
    write_arpa(grams, tmp_path / "one.arpa.gz")
    write_arpa(grams, tmp_path / "two.arpa.gz")
    assert (tmp_path / "one.arpa.gz").read_bytes() == (tmp_path / "two.arpa.gz").read_bytes()


@pytest.mark.parametrize("text, message", [
    (HAND_ARPA.replace("\\end\\", ""), "not a complete ARPA"),
    (HAND_ARPA.replace("ngram 2=3", "ngram 2=4"), "declares 4 2-grams"),
    (HAND_ARPA.replace("-0.4\t▁b c", "-0.4\t▁b"), "expected a 2-gram line"),
    (HAND_ARPA.replace("-0.4\t▁b c", "oops\t▁b c"), "not a readable ARPA"),
    ("hello\n", "unexpected line"),
])
def test_bad_files_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "bad.arpa"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(LMError, match=message):
        NgramLM.from_arpa(path, PIECES)


def test_a_language_model_over_other_words_is_refused(tmp_path):
    path = tmp_path / "words.arpa"
    write_arpa(estimate_kneser_ney([["the", "cat", "sat"], ["a", "dog", "ran"]], order=2), path)
    with pytest.raises(LMError, match="not this model's tokens"):
        NgramLM.from_arpa(path, PIECES)


def test_a_corrupt_gzip_is_an_lm_error(tmp_path):
    path = tmp_path / "bad.arpa.gz"
    path.write_bytes(gzip.compress(HAND_ARPA.encode())[:40])
    with pytest.raises(LMError):
        NgramLM.from_arpa(path, PIECES)
