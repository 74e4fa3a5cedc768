"""``SavedRun``: what a transformer checkpoint records about the run that wrote it, read without a model.

Inference and Hugging Face export both start from a checkpoint directory and need the same facts: the
architecture, the finetuning that wrapped it, whether only trainable weights were stored, and the
checksums of its files. The training kernel and packed-sequence masking are properties of how the
model was trained, not of its weights, so the architecture is read with SDPA and no document masks:
a flash-attn checkpoint then loads (and exports) on a machine without flash-attn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaling.core.checkpoint import CheckpointError, find_checkpoint
from scaling.core.checkpoint.files import read_json
from scaling.core.checkpoint.layout import MANIFEST
from scaling.transformer.finetuning.config import FinetuningConfig
from scaling.transformer.model.config import TransformerArchitectureConfig

__all__ = ["SavedRun"]


@dataclass(frozen=True)
class SavedRun:
    path: Path  # the global_step directory
    config: dict[str, Any]  # the run config as saved
    architecture: TransformerArchitectureConfig
    finetuning: FinetuningConfig | None
    weights: str  # "all", or "trainable" for an adapter checkpoint
    checksums: dict[str, str]  # path inside the checkpoint -> SHA-256 (empty for older checkpoints)

    @classmethod
    def read(cls, path: str | Path) -> SavedRun:
        """Read a finished checkpoint (or the one a save directory's ``latest`` names).

        Raises ``CheckpointError`` when there is none or it records no architecture, ``ConfigError``
        when the recorded config does not validate (naming the manifest).
        """
        checkpoint = find_checkpoint(path)
        manifest_path = checkpoint / MANIFEST
        manifest = read_json(manifest_path)
        config = manifest.get("config")
        if not isinstance(config, dict) or not isinstance(config.get("architecture"), dict):
            raise CheckpointError(
                f"{manifest_path} records no model architecture (config.architecture); "
                "it was not written by a scaling transformer run"
            )
        raw = {**config["architecture"], "attention_kernel": "torch", "document_masking": False}
        architecture = TransformerArchitectureConfig.from_dict(raw, source=str(manifest_path))
        finetuning_raw = config.get("finetuning")
        finetuning = FinetuningConfig.from_dict(finetuning_raw, source=str(manifest_path)) if finetuning_raw else None
        return cls(
            checkpoint,
            config,
            architecture,
            finetuning,
            str(manifest.get("weights", "all")),
            dict(manifest.get("checksums") or {}),
        )

    def checksum_of(self, file: Path) -> str | None:
        """The recorded SHA-256 of ``file`` (a path inside this checkpoint), if the manifest has one."""
        return self.checksums.get(file.relative_to(self.path).as_posix())
