"""``Transformer``: the whole decoder as one plain ``nn.Module``.

The same layer objects the pipeline engine runs (embedding, decoder layers, final norm and LM head, see
``layers.py``), chained in one ``forward``. On ``Topology.single()`` it needs no process group: build it,
call it on a batch, ``loss.backward()``, step any ``torch.optim`` optimizer. Its parameter names are the
engine's layout-free names (``layers.{index}.{key}``), so a checkpoint's tensors map onto it one to one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from scaling.core.nn.dropout import DropoutKey, dropout_key
from scaling.core.pipeline.layer_spec import TiedLayerSpec
from scaling.core.topology import Topology
from scaling.transformer.model.config import TransformerArchitectureConfig
from scaling.transformer.model.layers import LanguageModelLoss, transformer_layer_specs

__all__ = ["Transformer", "TransformerOutput"]


class TransformerOutput(dict[str, Any]):
    """``logits`` ([b, s, vocab / tp]) and, when the batch had ``targets``, ``loss`` and ``loss_tokens``."""

    @property
    def logits(self) -> torch.Tensor:
        value: torch.Tensor = self["logits"]
        return value

    @property
    def loss(self) -> torch.Tensor:
        value: torch.Tensor = self["loss"]
        return value


class Transformer(nn.Module):
    """The decoder on one rank of tensor parallelism (or on one process with ``Topology.single()``).

    ``forward(batch)`` takes ``{"tokens": [b, s]}`` (plus ``positions``, ``document_ids``, ``targets``,
    ``loss_mask`` as the datasets produce them) and returns a :class:`TransformerOutput`. Dropout masks are
    keyed by ``(seed, step, micro_batch, layer)`` exactly as the engine keys them, so with the same seed and
    step this module computes what ``ParallelModule`` computes on the (1, 1, 1) layout.
    """

    def __init__(
        self, config: TransformerArchitectureConfig, topology: Topology | None = None, *, seed: int = 0
    ) -> None:
        super().__init__()
        self.config = config
        self.topology = topology or Topology.single()
        if self.topology.pp_size != 1:
            raise ValueError(
                f"Transformer holds the whole model; pipe_parallel_size is {self.topology.pp_size} "
                "(the pipeline engine runs this rank's stages of the same layers)"
            )
        self.seed = seed
        specs = transformer_layer_specs(config, self.topology, seed=seed)
        self.layers = nn.ModuleList(spec.build() for spec in specs)
        tied = [i for i, spec in enumerate(specs) if isinstance(spec, TiedLayerSpec)]
        for index in tied[1:]:  # one Parameter for the embedding and the head, as on a single stage
            spec = specs[index]
            assert isinstance(spec, TiedLayerSpec)
            for attribute in spec.tied_weight_attributes:
                setattr(self.layers[index], attribute, getattr(self.layers[tied[0]], attribute))
        self.loss_fn = LanguageModelLoss(self.topology)
        self.to(self.topology.device)

    def forward(self, batch: dict[str, Any], *, step: int = 0, micro_batch: int = 0) -> TransformerOutput:
        value: Any = batch
        for index, layer in enumerate(self.layers):
            with dropout_key(DropoutKey(self.seed, step, micro_batch, index)):
                value = layer(value)
        output = TransformerOutput(logits=value)
        if "targets" in batch:
            loss, metrics = self.loss_fn(value, batch)
            output["loss"] = loss
            output.update(metrics)
        return output
