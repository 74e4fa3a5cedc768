"""Pretrained weights for the plain-loop model: a Hugging Face folder, a scaling checkpoint, or a Hub id.

A preset with ``pretrained=`` asks three things, in this order, and every rank asks them itself:

* :func:`resolve_pretrained`: which local directory holds the weights (downloading a Hub id first);
* :func:`pretrained_architecture`: the shape to build the model with, before any tensor is read;
* :func:`load_pretrained_weights`: fill the built model, each rank reading only what it keeps.

The last one never materialises the model on one rank. A scaling checkpoint already loads one layer file
at a time (``load_checkpoint``). A Hugging Face folder is read one layer at a time too, and within a layer
each rank reads only its tensor-parallel slice of every tensor whose slice is a contiguous range of the
stored one, through safetensors slicing: the embedding and LM head (vocabulary rows, zero-padded up to the
padded vocabulary), the query, gate and up projections (rows), the attention output and down projections
(columns). Only the key and value projections are read whole: scaling fuses them into one ``key_value``
tensor whose rows interleave the heads of both (``[kv_head, (k|v), d]``), so they go through the
Hugging Face mapping (``scaling_layer_from_hf``) as stored, and this rank's slice is cut from the result.
They are the small tensors of a GQA layer (Llama 2 70B: 8 kv heads for 64 query heads, so k and v are
each 1/8 of the query projection). Norms and the biases of row-parallel projections are replicated over
tensor-parallel ranks and read whole, as they must be.
Data-parallel ranks each read their tensor-parallel slice, full, and keep their ZeRO shard of it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open

from scaling.core.checkpoint import CheckpointError, find_checkpoint, load_checkpoint
from scaling.core.zero.tensors import assign_full
from scaling.transformer.convert.errors import ConversionError
from scaling.transformer.convert.hf_config import architecture_from_hf
from scaling.transformer.convert.hf_files import HFWeightReader
from scaling.transformer.convert.hf_weights import hf_tensor_shapes, scaling_layer_from_hf
from scaling.transformer.model.config import TransformerArchitectureConfig
from scaling.transformer.plain.model import ShardedTransformer
from scaling.transformer.saved_run import SavedRun

__all__ = [
    "HUB_ALLOW_PATTERNS",
    "check_same_architecture",
    "load_pretrained_weights",
    "pretrained_architecture",
    "pretrained_kind",
    "resolve_pretrained",
    "tokenizer_of_pretrained",
]

PretrainedKind = Literal["huggingface", "scaling"]

# What a Hub download fetches: configs, tokenizer files and the transformers-format weights. "model*" leaves
# out the second copy some repositories carry in another format (Mistral's consolidated.safetensors).
HUB_ALLOW_PATTERNS = ("*.json", "model*.safetensors", "tokenizer.model")

# org/name, optionally @revision (a branch, tag or commit); the names as the Hub allows them.
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^\s@]+))?")


# Where the weights are ------------------------------------------------------------------------------------
def resolve_pretrained(source: str | Path) -> Path:
    """The local directory of ``source``: a directory as it is, or a Hub id (``org/name[@revision]``)
    downloaded with ``huggingface_hub`` (configs, tokenizer and safetensors weights only).

    Every rank may call it: the Hub cache locks each file, so concurrent downloads of one id share it.

    Raises:
        ValueError: ``source`` is neither an existing directory nor an id, or the Hub refused the id.
        ImportError: an id was given and ``huggingface_hub`` is not installed.
    """
    local = Path(source).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise ValueError(f"pretrained={str(source)!r} is a file; expected a model directory or checkpoint directory")
    match = _HUB_ID.fullmatch(source) if isinstance(source, str) else None
    if match is None:
        raise ValueError(
            f"pretrained={str(source)!r} does not exist: expected a local Hugging Face model folder, a scaling "
            "checkpoint directory, or a Hugging Face Hub id 'org/name' (optionally 'org/name@revision')"
        )
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError(
            f"pretrained={source!r} is not a local directory, so it is read as a Hugging Face Hub id; downloading "
            "it needs the huggingface_hub package: pip install huggingface_hub"
        ) from None
    repo, revision = match["repo"], match["revision"]
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id=repo, revision=revision, allow_patterns=list(HUB_ALLOW_PATTERNS)
        )
    except OSError as exc:  # the Hub's errors (not found, gated, offline) are OSErrors
        at = f" at revision {revision!r}" if revision else ""
        raise ValueError(
            f"pretrained={source!r}: downloading {repo}{at} from the Hugging Face Hub failed: {exc}"
        ) from exc
    return Path(str(folder))


def _directory(path: str | Path) -> Path:
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ValueError(
            f"{str(path)!r} is not a directory; pass a Hub id through resolve_pretrained first"
            if not directory.exists()
            else f"{str(path)!r} is a file, not a model or checkpoint directory"
        )
    return directory


def pretrained_kind(path: str | Path) -> PretrainedKind:
    """ "huggingface" for a folder with ``config.json``, "scaling" for a checkpoint or save directory."""
    directory = _directory(path)
    if (directory / "config.json").is_file():
        return "huggingface"
    try:
        find_checkpoint(directory)
    except CheckpointError as exc:
        raise ValueError(
            f"{directory} is neither a Hugging Face model folder (no config.json) nor a scaling checkpoint ({exc})"
        ) from None
    return "scaling"


def _hf_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return config


def pretrained_architecture(path: str | Path) -> TransformerArchitectureConfig:
    """The architecture the weights at ``path`` were trained with (read from config files only)."""
    directory = _directory(path)
    if pretrained_kind(directory) == "huggingface":
        return architecture_from_hf(_hf_config(directory), source=str(directory / "config.json"))
    return SavedRun.read(directory).architecture


def tokenizer_of_pretrained(path: str | Path) -> Path | None:
    """The ``tokenizer.json`` stored with the weights, if there is one (a scaling checkpoint keeps it in its
    ``global_step`` directory)."""
    directory = _directory(path)
    folder = directory if pretrained_kind(directory) == "huggingface" else find_checkpoint(directory)
    tokenizer = folder / "tokenizer.json"
    return tokenizer if tokenizer.is_file() else None


# Does it fit the model ------------------------------------------------------------------------------------
def _compared_fields(arch: TransformerArchitectureConfig) -> dict[str, object]:
    """What the weights and their function depend on, by the field a user would change (derived values
    where several spellings give one model: ``num_kv_heads`` None and = heads are the same). Sequence
    length, dropout and the attention kernel are the model's own business: finetuning may change them."""
    return {
        "vocab_size": arch.vocab_size,
        "vocab_multiple": arch.padded_vocab_size,  # only the padded size matters, and it is what differs
        "hidden_size": arch.hidden_size,
        "num_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_kv_heads": arch.kv_heads,
        "head_dim": arch.dims_per_head,
        "intermediate_size": arch.mlp_size,
        "mlp_type": arch.mlp_type,
        "norm_type": arch.norm_type,
        "norm_bias": arch.norm_bias and arch.norm_type == "layer",
        "norm_eps": arch.norm_eps,
        "attention_bias": arch.attention_bias,
        "mlp_bias": arch.mlp_bias,
        "weight_tying": arch.weight_tying,
        "rope_base": arch.rope_base,
        "rotary_fraction": arch.rotary_fraction,
        "rope_scaling": arch.rope_scaling.to_dict() if arch.rope_scaling is not None else None,
    }


def check_same_architecture(
    pretrained: TransformerArchitectureConfig, model: TransformerArchitectureConfig, source: str
) -> None:
    """Raise ValueError naming the first field in which the weights at ``source`` do not fit ``model``."""
    theirs, ours = _compared_fields(pretrained), _compared_fields(model)
    for field, value in theirs.items():
        if ours[field] != value:
            what = "padded vocabulary " if field == "vocab_multiple" else ""
            raise ValueError(
                f"the pretrained weights at {source} do not fit the model: {field}: {what}{value!r} in the "
                f"pretrained model, {what}{ours[field]!r} in the model being built"
            )


# Filling the model ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Cut:
    """This rank's tensor-parallel slice of a full tensor: ``length`` entries of ``dim`` from ``start``."""

    dim: int
    start: int
    length: int


def _copied_from_hf(arch: TransformerArchitectureConfig, index: int) -> dict[str, str]:
    """Scaling key -> the Hugging Face tensor it is an unchanged copy of (the vocabulary rows zero-padded),
    for layer ``index``: every tensor but the fused ``key_value``, as ``scaling_layer_from_hf`` maps them.
    Keys the model lacks (biases it has none of) are never looked up."""
    last = arch.num_layers + 1
    if index == 0:
        return {"weight": "model.embed_tokens.weight"}
    if index == last:
        return {"norm.weight": "model.norm.weight", "weight": "lm_head.weight"}
    pairs = {"attention_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight"}
    for ours, theirs in (
        ("attention.query", "self_attn.q_proj"),
        ("attention.dense", "self_attn.o_proj"),
        ("mlp.gate", "mlp.gate_proj"),
        ("mlp.up", "mlp.up_proj"),
        ("mlp.down", "mlp.down_proj"),
    ):
        for suffix in ("weight", "bias"):
            pairs[f"{ours}.{suffix}"] = f"{theirs}.{suffix}"
    return {ours: f"model.layers.{index - 1}.{theirs}" for ours, theirs in pairs.items()}


class _SlicedReader:
    """Tensors of a Hugging Face folder, whole or as one rank's slice; ``whole`` lists the names read whole
    (what a test checks to see that nothing large is)."""

    def __init__(self, reader: HFWeightReader) -> None:
        self.reader = reader
        self.whole: list[str] = []
        self._handles: dict[Path, Any] = {}

    def read(self, name: str) -> torch.Tensor:
        self.whole.append(name)
        return self.reader.read(name)

    def read_cut(self, name: str, cut: _Cut) -> torch.Tensor:
        """Entries ``[start, start + length)`` of ``cut.dim``; those past the stored tensor's end (the padded
        vocabulary rows) are zeros, as the scaling embedding and head hold them."""
        if name not in self.reader.file_of:
            raise ConversionError(f"tensor {name!r} is missing from {self.reader.listing}")
        path = self.reader.file_of[name]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        stored = self._handles[path].get_slice(name)
        size = stored.get_shape()[cut.dim]
        start, stop = min(cut.start, size), min(cut.start + cut.length, size)
        part: torch.Tensor = stored[(slice(None),) * cut.dim + (slice(start, stop),)]
        if stop - start == cut.length:
            return part
        shape = list(part.shape)
        shape[cut.dim] = cut.length - (stop - start)
        return torch.cat([part, part.new_zeros(shape)], dim=cut.dim)


def _hf_layer_slices(
    arch: TransformerArchitectureConfig, index: int, cuts: Mapping[str, _Cut | None], reader: _SlicedReader
) -> dict[str, torch.Tensor]:
    """This rank's part of every tensor of scaling layer ``index`` named in ``cuts`` (key -> its cut, None
    for a tensor every tensor-parallel rank holds whole), read from a Hugging Face folder."""
    copied = _copied_from_hf(arch, index)
    out: dict[str, torch.Tensor] = {}
    for key, cut in cuts.items():
        if key in copied:
            name = copied[key]
            out[key] = reader.read(name) if cut is None else reader.read_cut(name, cut)
    fused = [key for key in cuts if key not in out]
    if not fused:
        return out

    def read(name: str) -> torch.Tensor:
        # The copied tensors are read above, by slice: the mapping gets shape-only stand-ins for them.
        if name in copied.values():
            return torch.empty(reader.reader.shape(name), device="meta")
        return reader.read(name)

    mapped = scaling_layer_from_hf(arch, index, read)
    for key in fused:
        if key not in mapped:
            raise AssertionError(f"layer {index}: the model has {key!r}, the Hugging Face mapping does not")
        cut = cuts[key]
        out[key] = mapped[key] if cut is None else mapped[key].narrow(cut.dim, cut.start, cut.length)
    return out


def _cuts_by_layer(model: ShardedTransformer) -> dict[int, dict[str, _Cut | None]]:
    """Layer -> key -> this rank's tensor-parallel cut of each parameter, from the parameter table."""
    engine = model.engine
    tp_rank = engine.topology.tp_rank
    cuts: dict[int, dict[str, _Cut | None]] = {}
    for name in model.named_parameters_by_name():
        record = engine.param_table[name]
        _, layer, key = name.split(".", 2)  # "layers.{index}.{key}"
        cut = None
        if record.tp_split_dim is not None:
            length = record.shape[record.tp_split_dim] // record.tp_parts
            cut = _Cut(record.tp_split_dim, tp_rank * length, length)
        cuts.setdefault(int(layer), {})[key] = cut
    return cuts


def _load_huggingface(model: ShardedTransformer, directory: Path) -> None:
    arch = pretrained_architecture(directory)
    check_same_architecture(arch, model.architecture, str(directory / "config.json"))
    hf = HFWeightReader(directory)
    ignored = [n for n in hf.names if n.endswith("rotary_emb.inv_freq")]  # a buffer some old exports kept
    if arch.weight_tying:
        ignored.append("lm_head.weight")  # a copy of the embedding when present: Hugging Face ignores it too
    hf.check(hf_tensor_shapes(arch), ignored)  # headers only: a mis-shaped folder fails before any read
    reader = _SlicedReader(hf)
    params = model.named_parameters_by_name()
    for index, cuts in sorted(_cuts_by_layer(model).items()):
        tensors = _hf_layer_slices(arch, index, cuts, reader)
        for key, tensor in tensors.items():
            assign_full(params[f"layers.{index}.{key}"], tensor)


def _load_scaling(model: ShardedTransformer, directory: Path) -> None:
    saved = SavedRun.read(directory)
    check_same_architecture(saved.architecture, model.architecture, str(saved.path))
    if saved.weights != "all":
        raise ValueError(f"{saved.path} holds only the {saved.weights} weights of a finetuning run, not a model")
    tuning = saved.finetuning
    if tuning is not None and (tuning.lora or tuning.adapters or tuning.soft_prompt):
        raise ValueError(
            f"{saved.path} was finetuned with adapters the plain model does not have; export it merged "
            "(`scaling convert to-hf`) and pass that folder as pretrained="
        )
    load_checkpoint(saved.path, model.engine)


def load_pretrained_weights(model: ShardedTransformer, path: str | Path) -> None:
    """Fill every parameter of ``model`` from the local directory ``path`` (see :func:`resolve_pretrained`).

    Collective: every rank calls it. Raises ValueError, before any tensor is read, when the weights were
    trained with another architecture (naming the first differing field and both values), and names the
    tensor or file when the folder itself is incomplete or mis-shaped.
    """
    directory = _directory(path)
    if pretrained_kind(directory) == "huggingface":
        _load_huggingface(model, directory)
    else:
        _load_scaling(model, directory)
