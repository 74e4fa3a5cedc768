"""What every preset class of the plain-loop layer shares: architecture by name, pretrained weights, checks.

``scaling.llama.Llama70b(zero_stage=3, precision="bf16")`` and ``scaling.mistral.Mistral7b(...)`` are thin
names over :class:`PresetModel`, which resolves the architecture (a preset name, or an explicit
``TransformerArchitectureConfig``), refuses what a plain loop cannot do before any process group or memory
is touched (pipeline parallelism, flash attention without flash-attn), builds the sharded model, and fills
it from ``pretrained=`` (a Hugging Face folder, a ``scaling`` checkpoint, or a Hub id) slice by slice.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from scaling.transformer.data.tokenizer import Tokenizer
from scaling.transformer.model.config import TransformerArchitectureConfig
from scaling.transformer.plain.model import ShardedTransformer

__all__ = ["PresetModel"]

# Fields that decide the weights' shapes: a pretrained source must agree with an explicitly chosen preset.
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "intermediate_size")


class PresetModel(ShardedTransformer):
    """A sharded preset model for a plain PyTorch loop (see ``ShardedTransformer`` for the loop itself)."""

    def __init__(
        self,
        architecture: TransformerArchitectureConfig,
        *,
        zero_stage: int = 3,
        precision: str = "bf16",
        fast_attn: bool = False,
        tp: int = 1,
        pp: int = 1,
        offload: bool = False,
        activation_checkpointing: bool = False,
        pretrained: str | Path | None = None,
        seed: int = 0,
        tokenizer: Tokenizer | str | Path | None = None,
        sequence_length: int | None = None,
        device: str = "auto",
        check_pretrained_shape: bool = True,
        hang_timeout_s: float | None = None,
        hang_dir: str | Path = "hang",
    ) -> None:
        if pp != 1:
            raise ValueError(
                f"pp={pp}: pipeline parallelism is not part of the plain loop; train with "
                "`scaling train CONFIG` and topology.pipe_parallel_size instead"
            )
        if zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage={zero_stage}: expected 0, 1, 2 or 3")
        source: Path | None = None
        if pretrained is not None:
            from scaling.transformer.plain.pretrained import pretrained_architecture, resolve_pretrained

            source = resolve_pretrained(pretrained)
            found = pretrained_architecture(source)
            if check_pretrained_shape:
                for field in _SHAPE_FIELDS:
                    mine, theirs = getattr(architecture, field), getattr(found, field)
                    if field == "num_kv_heads":
                        mine, theirs = architecture.kv_heads, found.kv_heads
                    if mine != theirs:
                        raise ValueError(
                            f"pretrained {source} has {field}={theirs}, but this preset has {field}={mine}; "
                            "choose the matching preset or pass the architecture of the source"
                        )
            architecture = found
            if tokenizer is None:
                from scaling.transformer.plain.pretrained import tokenizer_of_pretrained

                tokenizer = tokenizer_of_pretrained(source)
        updates: dict[str, object] = {}
        if sequence_length is not None:
            updates["sequence_length"] = sequence_length
        if fast_attn:
            if importlib.util.find_spec("flash_attn") is None:
                raise ImportError(
                    "fast_attn=True needs the flash-attn package (CUDA only): pip install 'scaling[gpu_optimization]'"
                    ", or pass fast_attn=False for PyTorch's scaled_dot_product_attention"
                )
            updates["attention_kernel"] = "flash_attention"
        if updates:
            architecture = TransformerArchitectureConfig.from_dict({**architecture.to_dict(), **updates})
        super().__init__(
            architecture,
            zero_stage=zero_stage,
            precision=precision,
            tp=tp,
            offload=offload,
            activation_checkpointing=activation_checkpointing,
            seed=seed,
            tokenizer=tokenizer,
            device=device,
            hang_timeout_s=hang_timeout_s,
            hang_dir=hang_dir,
        )
        if source is not None:
            from scaling.transformer.plain.pretrained import load_pretrained_weights

            load_pretrained_weights(self, source)
