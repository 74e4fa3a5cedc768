"""Checks that the data, the model and the tokenizer fit together, made when the data is opened.

Token ids made by one tokenizer and read with another train silently wrong; ids at or above the model's
vocabulary crash with a bare ``IndexError`` on one process and, split over tensor-parallel ranks, train on
a wrong loss without any error. Both are cheap to rule out before the first step: a data file records the
vocabulary size and the fingerprint of the tokenizer that made it (``prepare-data`` writes them), and a
checkpoint carries a copy of its tokenizer. Files written without that record fall back to the largest
token id they hold (one pass over the memory map).
"""

from __future__ import annotations

from pathlib import Path

from scaling.core.config import ConfigError
from scaling.core.data import MemoryMapDataset
from scaling.transformer.data.tokenizer import Tokenizer

__all__ = ["check_data_tokenizer", "check_data_vocabulary", "check_tokenizer_fits", "check_tokenizers_agree"]


def check_data_vocabulary(data: MemoryMapDataset, vocab_size: int) -> None:
    """Every token id of ``data`` is below the model's ``vocab_size``."""
    if data.vocab_size is not None:
        if vocab_size < data.vocab_size:
            raise ConfigError(
                f"architecture.vocab_size ({vocab_size}) is smaller than the vocabulary of the data "
                f"({data.vocab_size}, recorded in {data.meta_path}): raise architecture.vocab_size to at least "
                f"{data.vocab_size} or prepare the data with the model's tokenizer"
            )
        return
    largest = data.max_token()
    if largest >= vocab_size:
        raise ConfigError(
            f"architecture.vocab_size ({vocab_size}) is too small for the data: {data.prefix}.bin holds token id "
            f"{largest} (the file records no vocabulary size)"
        )


def check_tokenizer_fits(tokenizer: Tokenizer, vocab_size: int) -> None:
    """The tokenizer (which makes the finetuning ids) has no id the model cannot embed."""
    if vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"architecture.vocab_size ({vocab_size}) is smaller than the vocabulary of data.tokenizer "
            f"{tokenizer.source} ({tokenizer.vocab_size})"
        )


def check_data_tokenizer(data: MemoryMapDataset, tokenizer: Tokenizer, what: str) -> None:
    """``data`` was prepared with ``tokenizer`` (when it records which tokenizer made it)."""
    recorded = data.meta.get("tokenizer")
    if not isinstance(recorded, dict) or "sha256" not in recorded:
        return
    if recorded["sha256"] != tokenizer.fingerprint:
        raise ConfigError(
            f"{data.meta_path} was prepared with the tokenizer {recorded.get('path', '<unknown>')}, which differs "
            f"from {what} {tokenizer.source} (sha256 {str(recorded['sha256'])[:12]} vs {tokenizer.fingerprint[:12]})"
        )


def check_tokenizers_agree(configured: Tokenizer, checkpoint_tokenizer: Path) -> None:
    """The tokenizer of the checkpoint being resumed is the one the config names."""
    saved = Tokenizer.from_file(checkpoint_tokenizer)
    if saved.fingerprint != configured.fingerprint:
        raise ConfigError(
            f"data.tokenizer {configured.source} differs from the tokenizer {checkpoint_tokenizer} of the checkpoint "
            f"being loaded (sha256 {configured.fingerprint[:12]} vs {saved.fingerprint[:12]})"
        )
