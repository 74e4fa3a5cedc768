"""Layer specifications: what to build, built lazily so each rank constructs only its own layers."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = ["LayerSpec", "TiedLayerSpec"]


@dataclass(frozen=True)
class LayerSpec:
    """A layer class (or factory) and its arguments. ``build()`` constructs it.

    Layers take one pytree of tensors and return one; the first layer receives the model input of a
    micro-batch and the last layer's output goes to the loss function.
    """

    module_class: Callable[..., nn.Module]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        return self.module_class(*self.args, **dict(self.kwargs))

    @property
    def name(self) -> str:
        return getattr(self.module_class, "__name__", type(self.module_class).__name__)


@dataclass(frozen=True)
class TiedLayerSpec(LayerSpec):
    """A layer whose ``tied_weight_attributes`` are shared with every other layer of the same ``key``.

    The classic case is the input embedding and the LM head. The layers may be different classes (an
    embedding lookup and a logits projection) as long as the tied attributes have the same shapes. On one
    rank the layers share the Parameter object; across pipeline stages the copies start equal and their
    gradients are summed, so they stay equal.
    """

    key: str = ""
    tied_weight_attributes: tuple[str, ...] = ("weight",)

    def __post_init__(self) -> None:
        if not self.key:
            raise ValueError(f"TiedLayerSpec({self.name}) needs a non-empty key naming the shared weights")
        if not self.tied_weight_attributes:
            raise ValueError(f"TiedLayerSpec({self.name}, key={self.key!r}) ties no attributes")
