"""Which parameter-efficient finetuning to apply: LoRA, BitFit, bottleneck adapters (combinable)."""

from __future__ import annotations

from pydantic import Field

from scaling.core.config import BaseConfig

__all__ = ["AdapterConfig", "FinetuningConfig", "LoRAConfig", "SoftPromptConfig"]


class LoRAConfig(BaseConfig):
    """Low-rank updates W + (alpha / rank) B A on chosen projections; B starts at zero."""

    rank: int = Field(8, ge=1, description="Rank r of the update.")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: the update is multiplied by alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    targets: list[str] = Field(
        default_factory=lambda: ["query", "key_value", "dense"],
        description="Projections to adapt, by name or shell pattern: query, key_value, dense (attention), gate, up, "
        "down (MLP), or e.g. 'attention.*', 'mlp.*'. A target that matches no module is an error.",
    )


class AdapterConfig(BaseConfig):
    """Bottleneck adapters (down -> activation -> up, residual) after the attention and the MLP block."""

    bottleneck: int = Field(16, ge=1, description="Inner width of each adapter.")


class SoftPromptConfig(BaseConfig):
    """Learned embeddings prepended to every sequence (prompt tuning)."""

    tokens: int = Field(8, ge=1, description="Number of learned prompt embeddings.")


class FinetuningConfig(BaseConfig):
    """Everything not named here is frozen (and stays out of the optimizer)."""

    lora: LoRAConfig | None = Field(None, description="LoRA settings; none when unset.")
    bitfit: bool = Field(False, description="Train all biases (BitFit).")
    adapters: AdapterConfig | None = Field(None, description="Bottleneck adapters; none when unset.")
    soft_prompt: SoftPromptConfig | None = Field(None, description="Prompt tuning; none when unset.")
    train_norms: bool = Field(False, description="Also train the norm weights.")
