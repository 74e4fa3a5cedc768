"""Which checkpoint a directory holds, and whether it can be trusted. Reads files, never writes.

``latest`` is the published pointer, but it is one small file that a crash, a full disk or a user can
empty or break. A broken ``latest`` must not make a run start from step 0 next to good checkpoints, so
:func:`find_checkpoint` then falls back to the newest ``global_step*`` directory that verifies
(manifest readable with a step, every file it lists present, checksums matching) and says so. A
checkpoint whose own files are missing is never used silently: the error names the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scaling.core.checkpoint.files import CheckpointError, file_digest, read_json
from scaling.core.checkpoint.layout import LATEST, MANIFEST, step_of
from scaling.core.logging import get_logger

__all__ = [
    "find_checkpoint",
    "finished_checkpoints",
    "holds_checkpoints",
    "verify_checkpoint",
    "verify_file",
]

_logger = get_logger("scaling.checkpoint")


def verify_checkpoint(directory: Path, *, checksums: bool = False) -> dict[str, Any]:
    """The manifest of ``directory`` if it is a usable checkpoint, else ``CheckpointError`` naming the file.

    Checks that the manifest parses and records its step, and that every file it lists exists;
    with ``checksums`` also that each file's SHA-256 matches (reads every byte: used to choose a
    fallback, while a normal load checks each file as it reads it).
    """
    manifest_path = directory / MANIFEST
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("step"), int):
        raise CheckpointError(f"checkpoint file {manifest_path} records no step: the checkpoint is incomplete")
    for name, digest in (manifest.get("checksums") or {}).items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing (the manifest lists it)")
        if checksums and file_digest(path) != digest:
            raise CheckpointError(
                f"checkpoint file {path} does not match the checksum recorded when it was saved: "
                "it was modified or damaged afterwards"
            )
    return manifest


def verify_file(path: Path, checkpoint: Path, checksums: dict[str, str]) -> Path:
    """``path`` (a file copied into ``checkpoint``, like its tokenizer) after checking its recorded SHA-256.

    Files of checkpoints written before they were checksummed have no entry and are used as they are.
    """
    digest = checksums.get(path.relative_to(checkpoint).as_posix())
    if digest is not None and file_digest(path) != digest:
        raise CheckpointError(
            f"checkpoint file {path} does not match the checksum recorded when it was saved: "
            "it was modified or damaged afterwards"
        )
    return path


def finished_checkpoints(save_dir: Path) -> list[Path]:
    """The ``global_step*`` directories of ``save_dir`` that have a manifest, oldest first."""
    if not save_dir.is_dir():
        return []
    found = [p for p in save_dir.iterdir() if step_of(p) is not None and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: step_of(p) or 0)


def holds_checkpoints(path: Path) -> bool:
    """Whether ``path`` holds anything a checkpoint leaves (a manifest, ``latest``, a ``global_step*`` entry).

    Only a path that holds none of these may mean "nothing saved yet, start fresh".
    """
    if not path.is_dir():
        return False
    return any(p.name in (MANIFEST, LATEST) or step_of(p) is not None for p in path.iterdir())


def _newest_verified(save_dir: Path, exclude: Path | None) -> Path | None:
    for candidate in reversed(finished_checkpoints(save_dir)):
        if exclude is not None and candidate.resolve() == exclude.resolve():
            continue
        try:
            verify_checkpoint(candidate, checksums=True)
        except CheckpointError as exc:
            _logger.warning("checkpoint %s does not verify, skipped: %s", candidate, exc)
            continue
        return candidate
    return None


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a checkpoint, else the one its ``latest`` file names.

    When ``latest`` is missing, empty, unreadable or names a directory that is missing or does not
    verify, the newest ``global_step*`` directory that verifies is used instead, with a warning; when
    none does, ``CheckpointError`` names what is wrong. Never returns an unverified directory.
    """
    path = Path(path)
    if (path / MANIFEST).is_file():
        verify_checkpoint(path)
        return path
    latest = path / LATEST
    problem: str
    target: Path | None = None
    if not latest.exists():
        problem = f"no checkpoint at {path}: neither {MANIFEST} nor a '{LATEST}' file"
    else:
        try:
            name = latest.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            name, problem = "", f"{latest} is unreadable ({exc})"
        else:
            problem = f"{latest} is empty"
        if name:
            target = path / name
            if step_of(target) is None:
                problem = f"{latest} names {name!r}, which is not a global_step directory"
            elif not (target / MANIFEST).is_file():
                problem = f"{latest} names {target.name}, which has no {MANIFEST}"
            else:
                try:
                    verify_checkpoint(target)
                    return target
                except CheckpointError as exc:
                    problem = f"{latest} names {target.name}, which is unusable: {exc}"
    fallback = _newest_verified(path, exclude=target)
    if fallback is None:
        if latest.exists() or finished_checkpoints(path):
            raise CheckpointError(f"{problem}; no other global_step directory in {path} verifies")
        raise CheckpointError(problem)
    _logger.warning("%s; resuming from %s instead, the newest checkpoint that verifies", problem, fallback)
    return fallback
