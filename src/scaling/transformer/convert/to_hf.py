"""scaling checkpoint (+ LoRA adapters) -> Hugging Face ``LlamaForCausalLM`` folder.

Checkpoints store full tensors per layer whatever layout trained them, so export reads the files
directly, one layer at a time, with no process group. An adapter checkpoint (saved with
``weights="trainable"``) is laid over the base tensors; LoRA factors are merged into their projections
(``W + alpha / rank * B A`` in float32, by the merge function inference uses too), vocabulary padding is
trimmed, and the tensors are renamed by :mod:`scaling.transformer.convert.hf_weights`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from scaling.core.checkpoint import CheckpointError, verify_file
from scaling.core.checkpoint.files import read_tensors
from scaling.core.checkpoint.layout import MANIFEST, model_layer_file
from scaling.core.config import ConfigError
from scaling.transformer.convert.errors import ConversionError
from scaling.transformer.convert.hf_config import check_exportable, hf_config_from_architecture, resolve_dtype
from scaling.transformer.convert.hf_files import ShardedWriter
from scaling.transformer.convert.hf_weights import hf_layer_from_scaling, scaling_tensor_shapes
from scaling.transformer.convert.output import SIDE_FILES, staged_directory
from scaling.transformer.data.tokenizer import Tokenizer, TokenizerError
from scaling.transformer.finetuning.lora import merged_lora_weight
from scaling.transformer.saved_run import SavedRun

__all__ = ["save_huggingface"]

_LORA_A, _LORA_B = ".lora_a", ".lora_b"


class _Checkpoint:
    """A finished checkpoint's recorded run (see :class:`SavedRun`), with conversion errors."""

    def __init__(self, path: str | Path, role: str) -> None:
        try:
            self.run = SavedRun.read(path)
        except CheckpointError as exc:
            raise ConversionError(f"{role}: {exc}") from None
        except ConfigError as exc:
            raise ConversionError(str(exc)) from None
        self.path, self.arch, self.finetuning = self.run.path, self.run.architecture, self.run.finetuning
        self.weights = self.run.weights
        if self.finetuning is not None:
            for field in ("adapters", "soft_prompt"):
                if getattr(self.finetuning, field) is not None:
                    raise ConversionError(
                        f"{self.path / MANIFEST}: config.finetuning.{field} has no Llama equivalent; only LoRA "
                        "(merged), BitFit and norm finetuning export"
                    )

    def layer(self, index: int) -> tuple[dict[str, torch.Tensor], Path]:
        path = model_layer_file(self.path, index)
        if not path.is_file():
            return {}, path
        try:
            return read_tensors(path, self.run.checksum_of(path))[0], path
        except CheckpointError as exc:
            raise ConversionError(str(exc)) from None

    def lora_scale(self) -> float | None:
        lora = self.finetuning.lora if self.finetuning is not None else None
        return None if lora is None else lora.alpha / lora.rank


def _refuse_adapter_modules(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    for key in tensors:
        if ".adapter." in f".{key}" or key.endswith("soft_prompt"):
            kind = "a soft prompt" if key.endswith("soft_prompt") else "a bottleneck adapter"
            raise ConversionError(f"tensor {key!r} in {path} is {kind}, which has no Llama equivalent")


def _merge_lora(tensors: dict[str, torch.Tensor], scale: float | None, path: Path) -> None:
    """Fold every ``<proj>.lora_a``/``lora_b`` pair into ``<proj>.weight``, in place."""
    for key in [k for k in tensors if k.endswith(_LORA_A)]:
        base = key[: -len(_LORA_A)]
        if scale is None:
            raise ConversionError(f"{path} holds LoRA tensor {key!r} but no manifest config has finetuning.lora")
        if base + _LORA_B not in tensors or base + ".weight" not in tensors:
            missing = base + _LORA_B if base + _LORA_B not in tensors else base + ".weight"
            raise ConversionError(f"tensor {missing!r} is missing from {path} (needed to merge {key!r})")
        a, b, weight = tensors.pop(key), tensors.pop(base + _LORA_B), tensors[base + ".weight"]
        if (b.shape[0], a.shape[1]) != tuple(weight.shape) or a.shape[0] != b.shape[1]:
            raise ConversionError(
                f"LoRA tensors {key!r} {list(a.shape)} and {base + _LORA_B!r} {list(b.shape)} in {path} do not fit "
                f"{base + '.weight'!r} {list(weight.shape)}"
            )
        tensors[base + ".weight"] = merged_lora_weight(weight, a, b, scale)
    stray = [k for k in tensors if k.endswith(_LORA_B)]
    if stray:
        raise ConversionError(f"tensor {stray[0][: -len(_LORA_B)] + _LORA_A!r} is missing from {path}")


def _check_layer(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], path: Path) -> None:
    for key, shape in expected.items():
        if key not in tensors:
            raise ConversionError(f"tensor {key!r} (shape {list(shape)}) is missing from {path}")
        if tuple(tensors[key].shape) != shape:
            raise ConversionError(
                f"tensor {key!r} in {path} has shape {list(tensors[key].shape)}; the manifest's architecture "
                f"implies {list(shape)}"
            )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ConversionError(f"unexpected tensor {unexpected[0]!r} in {path}: not part of a Llama model")


def _token_ids(checkpoint: Path) -> dict[str, Any]:
    """bos/eos/pad ids: from the checkpoint's generation_config.json, else found in its tokenizer.json."""
    generation = checkpoint / "generation_config.json"
    if generation.is_file():
        data = json.loads(generation.read_text(encoding="utf-8"))
        return {k: data.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if (checkpoint / "tokenizer.json").is_file():
        try:
            tokenizer = Tokenizer.from_file(checkpoint / "tokenizer.json")
        except TokenizerError as exc:
            raise ConversionError(str(exc)) from None
        return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    return {}


def _minimal_tokenizer_config(tokenizer_json: Path, token_ids: Mapping[str, Any], max_length: int) -> dict[str, Any]:
    """What ``AutoTokenizer`` needs to load a bare ``tokenizer.json`` (a ``PreTrainedTokenizerFast``)."""
    tokenizer = Tokenizer.from_file(tokenizer_json)
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length}
    for role in ("bos", "eos", "pad"):
        token_id = token_ids.get(f"{role}_token_id")
        if isinstance(token_id, int):
            token = tokenizer.tokenizer.id_to_token(token_id)
            if token is not None:
                config[f"{role}_token"] = token
    return config


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_huggingface(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    adapters: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write a scaling checkpoint as a Hugging Face ``LlamaForCausalLM`` folder; returns ``out_dir``.

    Args:
        checkpoint_dir: a ``global_step{N}`` directory, or a save directory whose ``latest`` is followed;
            any training layout.
        out_dir: must be absent or empty; receives ``config.json``, ``generation_config.json``, the
            weights (sharded with an index above ``max_shard_bytes``) and the checkpoint's tokenizer files.
        adapters: an adapter checkpoint (``weights="trainable"``) laid over the base; LoRA is merged.
        dtype: float32, bfloat16 or float16; default: the dtype the checkpoint stores.

    Raises:
        ConversionError: an architecture or finetuning option with no Llama equivalent (named), or a
            missing, unexpected or mis-shaped tensor (named with its file); nothing is written then.
    """
    out_dir = Path(out_dir)
    base = _Checkpoint(checkpoint_dir, "checkpoint")
    arch = base.arch
    check_exportable(arch, f"{base.path / MANIFEST}: config.architecture")
    overlay = _Checkpoint(adapters, "adapters") if adapters is not None else None
    if overlay is not None and overlay.finetuning is None:  # the same refusal as `scaling generate --adapters`
        raise ConversionError(
            f"adapters {overlay.path} records no finetuning config (config.finetuning in {overlay.path / MANIFEST}): "
            "it is not an adapter checkpoint; pass a checkpoint saved by a LoRA/BitFit finetuning run"
        )
    if overlay is not None and scaling_tensor_shapes(overlay.arch) != scaling_tensor_shapes(arch):
        raise ConversionError(f"adapters {overlay.path} were trained on a different architecture than {base.path}")
    scale = overlay.lora_scale() if overlay is not None and overlay.lora_scale() is not None else base.lora_scale()
    target = resolve_dtype(dtype)
    expected = scaling_tensor_shapes(arch)
    with staged_directory(out_dir) as staging:
        writer = ShardedWriter(staging, max_shard_bytes)
        for index, shapes in expected.items():
            tensors, path = base.layer(index)
            _refuse_adapter_modules(tensors, path)
            if overlay is not None:
                extra, extra_path = overlay.layer(index)
                _refuse_adapter_modules(extra, extra_path)
                tensors.update(extra)
            if not tensors and base.weights == "trainable":
                raise ConversionError(
                    f"{path} is missing: {base.path} holds only trainable weights; pass it as adapters on top of "
                    "its base checkpoint"
                )
            _merge_lora(tensors, scale, path)
            _check_layer(tensors, shapes, path)
            if target is None:
                target = tensors[next(iter(shapes))].dtype  # the dtype the checkpoint was trained in
            writer.add({k: v.to(target) for k, v in hf_layer_from_scaling(arch, index, tensors).items()})
        writer.finish()
        assert target is not None
        for name in SIDE_FILES:
            if (base.path / name).is_file():  # checked against the manifest: a tokenizer edited since is refused
                shutil.copyfile(verify_file(base.path / name, base.path, base.run.checksums), staging / name)
        token_ids = _token_ids(base.path)
        _write_json(staging / "config.json", hf_config_from_architecture(arch, target, token_ids))
        if not (staging / "generation_config.json").is_file():
            _write_json(staging / "generation_config.json", {"_from_model_config": True, **token_ids})
        if (staging / "tokenizer.json").is_file() and not (staging / "tokenizer_config.json").is_file():
            config = _minimal_tokenizer_config(staging / "tokenizer.json", token_ids, arch.context_length)
            _write_json(staging / "tokenizer_config.json", config)
    return out_dir
