"""Durable writes and safe reads of checkpoint files.

Writes go to a temporary name, are fsynced, then renamed: a reader sees the old file or the new one,
never half of one. Reads use safetensors (no code execution) and turn any parse failure into one error
naming the file. Each tensor file's SHA-256 is returned by the write and checked by the read when the
caller knows it (the manifest records them), so a file changed after it was written (bit rot, a
partial copy, an edit) is refused instead of silently loading other weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

__all__ = [
    "CheckpointError",
    "file_digest",
    "fsync_dir",
    "read_json",
    "read_tensors",
    "write_json",
    "write_tensors",
]

_CHUNK = 16 * 2**20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model; the message says where."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_atomically(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not also leave half a file behind
        raise
    fsync_dir(path.parent)


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in chunks (checkpoint files can be far larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write a safetensors file atomically; returns its SHA-256 (hashed while the bytes are in the page cache)."""
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    digests: list[str] = []

    def write(tmp: Path) -> None:
        save_file(cpu, str(tmp), metadata=metadata)
        digests.append(file_digest(tmp))

    _replace_atomically(path, write)
    return digests[0]


def read_tensors(path: Path, expected_digest: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file; a damaged file raises ``CheckpointError``."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    if expected_digest is not None and file_digest(path) != expected_digest:
        raise CheckpointError(
            f"checkpoint file {path} does not match the checksum recorded when it was saved: "
            "it was modified or damaged afterwards"
        )
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint file {path} is corrupt or truncated: {exc}") from None
    return tensors, metadata


def write_json(path: Path, data: Any) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")

    _replace_atomically(path, write)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {path} is corrupt: {exc}") from None
