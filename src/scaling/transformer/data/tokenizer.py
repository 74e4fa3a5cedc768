"""A thin wrapper over Hugging Face ``tokenizers``: load a ``tokenizer.json``, encode, decode, special ids.

``tokenizers`` does the work (fast, Rust); this class only fixes the few things training needs: which
ids are EOS/BOS/PAD, a clear error when the file is missing or not a tokenizer, and a fingerprint that
data files and checkpoints record, so ids made by one tokenizer are never read with another.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from scaling.core.data import DataFileError

__all__ = ["Tokenizer", "TokenizerError"]

_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "[CLS]")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")
_BYTE_LEVEL_SOURCE = "<byte-level>"


def _byte_symbols() -> list[str]:
    """The character ``tokenizers``' ByteLevel pre-tokenizer writes for each byte value 0..255 (GPT-2's table).

    Printable Latin-1 bytes stand for themselves; the 68 others (controls, space, soft hyphen...) are moved,
    in byte order, to the characters from U+0100 on, so every byte is one visible, unambiguous symbol.
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}
    symbols, moved = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + moved))
            moved += 1
    return symbols


class TokenizerError(DataFileError):
    """A tokenizer file is missing, unreadable, or lacks a token training needs (bad input, like a data file)."""


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, source: str = "<tokenizer>") -> None:
        self.tokenizer = tokenizer
        self.source = source
        self.eos_id = self._find(_EOS_NAMES)
        self.bos_id = self._find(_BOS_NAMES)
        self.pad_id = self._find(_PAD_NAMES)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {path} does not exist")
        try:
            return cls(HFTokenizer.from_file(str(path)), str(path))
        except Exception as exc:  # tokenizers raises plain Exceptions for malformed files
            raise TokenizerError(f"{path} is not a valid tokenizer.json: {exc}") from None

    @classmethod
    def byte_level(cls) -> Tokenizer:
        """A tokenizer of raw UTF-8 bytes: id ``b`` is byte ``b``, then ``<|endoftext|>`` (256) and ``<pad>`` (257).

        Built in code (no file, no download) and always the same, so a plain loop can tokenize any text
        before anyone has trained or fetched a tokenizer, and it fits any model whose vocabulary has at least
        ``vocab_size`` (258) entries. Sequences are as long as their bytes: the price of needing nothing.
        """
        from tokenizers import decoders, models, pre_tokenizers

        vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
        tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.add_special_tokens([_EOS_NAMES[0], _PAD_NAMES[0]])
        return cls(tokenizer, _BYTE_LEVEL_SOURCE)

    def _find(self, names: Sequence[str]) -> int | None:
        for name in names:
            token_id = self.tokenizer.token_to_id(name)
            if token_id is not None:
                return int(token_id)
        return None

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the tokenizer's canonical JSON: equal for the same tokenizer however it was saved."""
        canonical = json.dumps(json.loads(self.tokenizer.to_str()), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def description(self) -> dict[str, Any]:
        """What a data file records about the tokenizer that made its ids."""
        path = self.source if self.source == _BYTE_LEVEL_SOURCE else str(Path(self.source).resolve())
        return {"path": path, "sha256": self.fingerprint, "vocab_size": self.vocab_size}

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def require_eos(self) -> int:
        if self.eos_id is None:
            raise TokenizerError(f"{self.source} has no end-of-sequence token (looked for {', '.join(_EOS_NAMES)})")
        return self.eos_id
