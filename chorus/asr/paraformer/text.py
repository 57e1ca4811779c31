"""FunASR's tokens -> text for Paraformer's char/BPE token lists (postprocess_utils.sentence_postprocess).

Chinese characters (and digits) join without spaces; Latin tokens are words separated by one space,
except that a token ending in "@@" continues into the next one; a Chinese character right after a
Latin word takes the space before it away.  FunASR's `abbr_dispose` (joining spelled-out single
letters, "a b c" -> "abc") is not applied.
"""
from __future__ import annotations

SPECIAL = {"<s>", "</s>", "<unk>", "<OOV>", "<blank>"}


def _clean(token: str) -> str:
    for s in (" ", "</s>", "<s>", "<unk>", "<OOV>"):
        token = token.replace(s, "")
    return token


def is_chinese(token: str) -> bool:
    """FunASR's isAllChinese for one token: CJK ideographs, ASCII digits and '@'."""
    t = _clean(token)
    return bool(t) and all("\u4e00" <= ch <= "\u9fff" or "0" <= ch <= "9" or ch == "@" for ch in t)


def is_alpha(token: str) -> bool:
    t = _clean(token)
    return bool(t) and all((ch.isalpha() and not is_chinese(ch)) or ch == "'" for ch in t)


def tokens_to_text(tokens: list[str]) -> str:
    words: list[str] = []
    partial = ""
    after_latin = False
    for token in tokens:
        if token in SPECIAL:
            continue
        if is_chinese(token):
            if after_latin:
                words.pop()  # the space after the Latin word
            words.append(token)
            after_latin = False
        elif "@@" in token:
            partial += token.replace("@@", "")
            after_latin = False
        elif is_alpha(token):
            words += [partial + token, " "]
            partial = ""
            after_latin = True
        else:
            words.append(token)
    return "".join(words).strip()


def starts_word(previous: str | None, token: str) -> bool:
    """Whether `token` begins a new word after `previous` (for word times)."""
    return previous is None or is_chinese(token) or "@@" not in previous
