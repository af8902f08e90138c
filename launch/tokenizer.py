"""Tokenizers users bring: a Hugging Face tokenizer directory or ``tokenizer.json`` (the ``tokenizers``
library), or a SentencePiece ``.model`` (the ``sentencepiece`` package, when installed). Local files only.

The end-of-document id that ``moetrain data prepare`` appends after every document is the tokenizer's
EOS token (``tokenizer_config.json``'s ``eos_token``), else the first of the usual names that exists
(``<|endoftext|>``, ``</s>``, ``<eos>``, ``<|end_of_text|>``), else the one given with ``--eod-token``;
``moetrain generate`` stops at it when there is one.
"""

from __future__ import annotations

import json
from pathlib import Path

from moetrain.errors import UserError

__all__ = ["Tokenizer", "ByteTokenizer", "load_tokenizer", "TokenizerError", "TOKENIZER_FILES"]

_EOD_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
"""What a tokenizer directory holds that an HF export copies beside the model."""


class TokenizerError(UserError):
    """A tokenizer that is missing or cannot be used (named)."""


class Tokenizer:
    """``encode`` / ``decode`` / ``vocab_size`` / ``eod_id`` over either backend; ``files`` to copy on export."""

    def __init__(self, path: str, *, eod_token: str | None = None):
        p = Path(path)
        if not p.exists():
            raise TokenizerError(f"tokenizer {path}: no such file or directory")
        self.path, self.files = p, []
        config: dict = {}
        if p.is_dir():
            if (p / "tokenizer_config.json").is_file():
                try:
                    config = json.loads((p / "tokenizer_config.json").read_text(encoding="utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise TokenizerError(f"{p / 'tokenizer_config.json'}: not JSON ({exc})") from None
            self.files = [p / f for f in TOKENIZER_FILES if (p / f).is_file()]
            if (p / "tokenizer.json").is_file():
                self._hf(p / "tokenizer.json")
            elif (p / "tokenizer.model").is_file():
                self._sp(p / "tokenizer.model")
            else:
                raise TokenizerError(f"tokenizer {path}: neither tokenizer.json nor tokenizer.model in the directory")
        elif p.suffix == ".json":
            self.files = [p]
            self._hf(p)
        elif p.suffix == ".model":
            self.files = [p]
            self._sp(p)
        else:
            raise TokenizerError(f"tokenizer {path}: expected a directory, a tokenizer.json or a SentencePiece .model")
        self.eod_id = self._eod(eod_token, config)

    def _hf(self, f: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(str(f))
        except Exception as exc:  # the Rust library raises a bare Exception on a bad file
            raise TokenizerError(f"{f}: not a tokenizers file ({str(exc).splitlines()[0][:200]})") from None
        self.kind = "tokenizers"
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def _sp(self, f: Path) -> None:
        try:
            import sentencepiece
        except ImportError:
            raise TokenizerError(f"{f} is a SentencePiece model: pip install sentencepiece to use it") from None
        self._tok = sentencepiece.SentencePieceProcessor(model_file=str(f))
        self.kind = "sentencepiece"
        self.vocab_size = self._tok.get_piece_size()

    def id_to_token(self, i: int) -> str:
        return self._tok.id_to_token(i) if self.kind == "tokenizers" else self._tok.id_to_piece(i)

    def token_id(self, token: str) -> int | None:
        if self.kind == "tokenizers":
            return self._tok.token_to_id(token)
        i = self._tok.piece_to_id(token)
        return None if i == self._tok.unk_id() and token != self._tok.id_to_piece(i) else i

    def _eod(self, given: str | None, config: dict) -> int | None:
        if given is not None:
            i = self.token_id(given)
            if i is None:
                raise TokenizerError(f"tokenizer {self.path}: no token {given!r} (--eod-token)")
            return i
        eos = config.get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and self.token_id(eos) is not None:
            return self.token_id(eos)
        if self.kind == "sentencepiece" and self._tok.eos_id() >= 0:
            return self._tok.eos_id()
        for name in _EOD_NAMES:
            if self.token_id(name) is not None:
                return self.token_id(name)
        return None

    def require_eod(self) -> int:
        """The end-of-document id, which preparing data needs."""
        if self.eod_id is None:
            raise TokenizerError(f"tokenizer {self.path} names no end-of-document token (no eos_token, none of "
                                 f"{', '.join(_EOD_NAMES)}); give one with --eod-token")
        return self.eod_id

    def encode(self, text: str) -> list[int]:
        if self.kind == "tokenizers":
            return self._tok.encode(text, add_special_tokens=False).ids
        return self._tok.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "tokenizers":
            return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        return self._tok.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def load_tokenizer(path: str, *, eod_token: str | None = None, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer at ``path``; with ``vocab_size`` (model.vocab_size), one whose ids do not fit is refused."""
    tok = Tokenizer(path, eod_token=eod_token)
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise TokenizerError(f"tokenizer {path} has {tok.vocab_size} tokens but model.vocab_size={vocab_size}")
    return tok


class ByteTokenizer:
    """The byte-level "tokenizer" of ``data.source: text`` (ids are UTF-8 bytes): what ``moetrain generate
    --prompt`` uses for such a model when no ``data.tokenizer`` is set."""

    kind, vocab_size, eod_id, files = "bytes", 256, None, []

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
