"""Whisper's tokenizer through tiktoken, as openai/whisper builds it.

The byte-level BPE ranks come from the checkpoint's own vocabulary: whisper's `.tiktoken` files
(base64 token, rank), CTranslate2's `vocabulary.txt` or Hugging Face's `tokenizer.json` /
`vocab.json` (GPT-2's byte-to-unicode spelling, one id per token).  The BPE tokens are the ids
below `<|endoftext|>`; the special tokens follow in whisper's order (`get_encoding`):
endoftext, startoftranscript, one per language, translate, transcribe, startoflm, startofprev,
nospeech, notimestamps and 1501 timestamps.  English-only models (`gpt2`) have 50256 BPE tokens,
multilingual ones 50257.
"""
from __future__ import annotations

import base64
import json
import string
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import tiktoken

LANGUAGE_CODES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr "
    "bg lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn "
    "yo so af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su "
    "yue").split()

PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
N_TIMESTAMPS = 1501


class TokenizerError(ValueError):
    """A vocabulary that is not Whisper's."""


def special_tokens(num_languages: int) -> list[str]:
    return ["<|endoftext|>", "<|startoftranscript|>",
            *[f"<|{code}|>" for code in LANGUAGE_CODES[:num_languages]],
            "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
            "<|notimestamps|>", *[f"<|{i * 0.02:.2f}|>" for i in range(N_TIMESTAMPS)]]


def n_special(num_languages: int) -> int:
    return 2 + num_languages + 6 + N_TIMESTAMPS


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte-to-character map, which `vocabulary.txt` and `tokenizer.json` spell tokens with."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_OF = {c: b for b, c in _bytes_to_unicode().items()}


def token_bytes(token: str) -> bytes:
    try:
        return bytes(_BYTE_OF[c] for c in token)
    except KeyError as e:
        raise TokenizerError(f"token {token!r} is not spelled in GPT-2's byte-level alphabet") from e


def spell_token(data: bytes) -> str:
    table = _bytes_to_unicode()
    return "".join(table[b] for b in data)


def ranks_from_tokens(tokens: list[str], source: str) -> dict[bytes, int]:
    """BPE ranks from a vocabulary listed by id: the tokens before `<|endoftext|>`."""
    try:
        n = tokens.index("<|endoftext|>")
    except ValueError:
        raise TokenizerError(f"{source}: no <|endoftext|> token; not a Whisper vocabulary") from None
    ranks = {}
    for i, tok in enumerate(tokens[:n]):
        ranks[token_bytes(tok)] = i
    if len(ranks) != n:
        raise TokenizerError(f"{source}: duplicate tokens")
    return ranks


def read_ranks(path: Path) -> dict[bytes, int]:
    """The BPE ranks of a whisper `.tiktoken`, CTranslate2 `vocabulary.txt`, or Hugging Face
    `tokenizer.json` / `vocab.json` file."""
    path = Path(path)
    if path.suffix == ".tiktoken":
        ranks = {}
        for line in path.read_text().splitlines():
            if line:
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
        return ranks
    if path.name.endswith(".txt"):
        lines = path.read_text(encoding="utf-8").split("\n")
        return ranks_from_tokens(lines[:-1] if lines[-1] == "" else lines, str(path))
    data = json.loads(path.read_text(encoding="utf-8"))
    if path.name == "tokenizer.json":
        model = data.get("model") or {}
        if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise TokenizerError(f"{path}: not a byte-level BPE tokenizer")
        vocab = dict(model["vocab"])
        for added in data.get("added_tokens") or []:
            vocab[added["content"]] = added["id"]
    else:
        vocab = data
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise TokenizerError(f"{path}: token ids are not 0..{len(by_id) - 1}")
    return ranks_from_tokens([t for t, _ in by_id], str(path))


def make_encoding(ranks: dict[bytes, int], num_languages: int, name: str = "whisper") -> tiktoken.Encoding:
    n = len(ranks)
    specials = {tok: n + i for i, tok in enumerate(special_tokens(num_languages))}
    return tiktoken.Encoding(name=name, explicit_n_vocab=n + len(specials), pat_str=PAT_STR,
                             mergeable_ranks=ranks, special_tokens=specials)


@dataclass(frozen=True)
class Tokenizer:
    """whisper's `Tokenizer`: the encoding, its special tokens and the start-of-transcript sequence."""

    encoding: tiktoken.Encoding
    num_languages: int
    multilingual: bool
    language: str | None = None
    task: str | None = None

    @classmethod
    def from_ranks(cls, ranks: dict[bytes, int], n_vocab: int, multilingual: bool,
                   language: str | None = None, task: str | None = None) -> "Tokenizer":
        num_languages = n_vocab - len(ranks) - n_special(0)
        if not 0 < num_languages <= len(LANGUAGE_CODES):
            raise TokenizerError(f"a vocabulary of {len(ranks)} BPE tokens does not fit a model of "
                                 f"{n_vocab} tokens (Whisper has {n_special(0)} + one per language special tokens)")
        if multilingual:
            language, task = language or "en", task or "transcribe"
            if language not in LANGUAGE_CODES[:num_languages]:
                raise ValueError(f"language {language!r} is not one of this model's {num_languages}")
            if task not in ("transcribe", "translate"):
                raise ValueError(f"task {task!r}: transcribe or translate")
        else:
            language = task = None
        return cls(make_encoding(ranks, num_languages), num_languages, multilingual, language, task)

    def with_language(self, language: str | None, task: str | None = None) -> "Tokenizer":
        if not self.multilingual:
            return self
        return Tokenizer(self.encoding, self.num_languages, True, language or "en", task or "transcribe")

    def special(self, name: str) -> int:
        return self.encoding.encode_single_token(name)

    @cached_property
    def eot(self) -> int:
        return self.encoding.eot_token

    @cached_property
    def sot(self) -> int:
        return self.special("<|startoftranscript|>")

    @cached_property
    def transcribe(self) -> int:
        return self.special("<|transcribe|>")

    @cached_property
    def translate(self) -> int:
        return self.special("<|translate|>")

    @cached_property
    def sot_lm(self) -> int:
        return self.special("<|startoflm|>")

    @cached_property
    def sot_prev(self) -> int:
        return self.special("<|startofprev|>")

    @cached_property
    def no_speech(self) -> int:
        return self.special("<|nospeech|>")

    @cached_property
    def no_timestamps(self) -> int:
        return self.special("<|notimestamps|>")

    @cached_property
    def timestamp_begin(self) -> int:
        return self.special("<|0.00|>")

    def language_token(self, code: str) -> int:
        return self.special(f"<|{code}|>")

    @cached_property
    def sot_sequence(self) -> tuple[int, ...]:
        seq = [self.sot]
        if self.language is not None:
            seq.append(self.sot + 1 + LANGUAGE_CODES.index(self.language))
        if self.task is not None:
            seq.append(self.transcribe if self.task == "transcribe" else self.translate)
        return tuple(seq)

    @cached_property
    def sot_sequence_including_notimestamps(self) -> tuple[int, ...]:
        return (*self.sot_sequence, self.no_timestamps)

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text)

    def decode(self, ids: list[int]) -> str:
        """Text of the ids, timestamps dropped (whisper's `decode`)."""
        return self.encoding.decode([t for t in ids if t < self.timestamp_begin])

    @cached_property
    def non_speech_tokens(self) -> tuple[int, ...]:
        """whisper's `non_speech_tokens`: symbols and speaker-tag openers suppressed by default."""
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
        miscellaneous = set("♩♪♫♬♭♮♯")
        result = {self.encode(" -")[0], self.encode(" '")[0]}
        for symbol in symbols + list(miscellaneous):
            for tokens in (self.encode(symbol), self.encode(" " + symbol)):
                if len(tokens) == 1 or symbol in miscellaneous:
                    result.add(tokens[0])
        return tuple(sorted(result))

    def starts_word(self, token_id: int) -> bool:
        """Whether a text token begins a word (a leading space or punctuation, as whisper splits words)."""
        if token_id >= self.eot:
            return True
        text = self.encoding.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")
        return text.startswith(" ") or (text.strip() != "" and text.strip() in string.punctuation)
