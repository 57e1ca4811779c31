"""SentencePiece tokenizer as NeMo's BPE models use it (ids <-> text, no special tokens)."""
from __future__ import annotations

import sentencepiece as spm


class TokenizerError(ValueError):
    pass


class SentencePieceTokenizer:
    def __init__(self, model_proto: bytes):
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except Exception as exc:  # sentencepiece raises bare RuntimeError/OSError
            raise TokenizerError(f"not a SentencePiece model: {exc}") from exc
        self.model_proto = model_proto

    @classmethod
    def from_file(cls, path) -> "SentencePieceTokenizer":
        with open(path, "rb") as f:
            return cls(f.read())

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode_as_ids(text)

    def encode_as_pieces(self, text: str) -> list[str]:
        return self._sp.encode_as_pieces(text)

    @property
    def pieces(self) -> list[str]:
        """Every piece, by id (the words of a token-level language model)."""
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode_ids([int(i) for i in ids])

    def piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def starts_word(self, token_id: int) -> bool:
        """True when the token begins a new word (SentencePiece's U+2581 prefix)."""
        return self.piece(token_id).startswith("\u2581")
