"""One typed record per parameter: how it is split over tensor-parallel ranks and how it is shared.

ZeRO sharding, gradient clipping and checkpointing read it, so they never guess from shapes or names:

* ``tp_split_dim``: the dimension split over tp ranks, or None when every tp rank holds all of it
  (replicated); a norm of the full model counts split parameters from every tp rank and replicated ones
  once;
* ``tied_key``: parameters with the same key are copies of one weight on several pipeline stages
  (embedding and LM head), counted once;
* ``partial_grad_over_tp``: replicated parameters whose gradient on each tp rank is only a part of the
  whole (norm weights that see one sequence shard under sequence parallelism; a kv projection replicated
  because there are fewer kv heads than tp ranks); the engine sums them over tp ranks.

Parameters without a record are replicated and untied. Whether a parameter is frozen is not recorded
here but read from ``param.requires_grad`` (one source of truth): the gradient buckets, the norm and the
optimizer all skip parameters that do not require grad.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

__all__ = [
    "InitMethod",
    "ParamMeta",
    "get_param_meta",
    "init_normal",
    "init_zeros",
    "local_slice_of_init",
    "set_param_meta",
    "shard",
    "unshard",
    "update_param_meta",
]


@dataclass(frozen=True, slots=True)
class ParamMeta:
    tp_split_dim: int | None = None
    tied_key: str | None = None
    partial_grad_over_tp: bool = False

    @property
    def is_replicated(self) -> bool:
        return self.tp_split_dim is None


_DEFAULT = ParamMeta()
_ATTRIBUTE = "_scaling_param_meta"  # the one attribute, only ever touched through the two functions below


def set_param_meta(param: torch.Tensor, meta: ParamMeta) -> None:
    setattr(param, _ATTRIBUTE, meta)


def get_param_meta(param: torch.Tensor) -> ParamMeta:
    meta = getattr(param, _ATTRIBUTE, _DEFAULT)
    assert isinstance(meta, ParamMeta)
    return meta


def update_param_meta(param: torch.Tensor, **changes: object) -> ParamMeta:
    """Change some fields of a parameter's record (e.g. mark it tied) and return the new record."""
    meta = replace(get_param_meta(param), **changes)  # type: ignore[arg-type]
    set_param_meta(param, meta)
    return meta


def shard(full: torch.Tensor, dim: int, rank: int, parts: int) -> torch.Tensor:
    """The slice of ``full`` that tp rank ``rank`` of ``parts`` holds along ``dim``."""
    if full.shape[dim] % parts != 0:
        raise ValueError(f"cannot split dim {dim} of size {full.shape[dim]} evenly over {parts} tensor-parallel ranks")
    return full.chunk(parts, dim=dim)[rank].clone()


def unshard(shards: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """Inverse of :func:`shard`: the full tensor from every rank's slice, in rank order."""
    return torch.cat(list(shards), dim=dim)


InitMethod = Callable[[torch.Tensor, torch.Generator], None]


def init_normal(std: float = 0.02) -> InitMethod:
    def init(tensor: torch.Tensor, generator: torch.Generator) -> None:
        with torch.no_grad():
            tensor.normal_(0.0, std, generator=generator)

    return init


def init_zeros(tensor: torch.Tensor, generator: torch.Generator) -> None:
    with torch.no_grad():
        tensor.zero_()


def local_slice_of_init(
    full_shape: Sequence[int],
    init: InitMethod,
    seed: int,
    split_dim: int | None,
    rank: int,
    parts: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Initialise the *full* tensor from ``seed`` on the CPU and keep this rank's slice.

    Any tp size therefore holds exactly the slices of the tp=1 weights: the layout never changes the
    model. The full tensor exists only transiently, one parameter at a time. Under a ``torch.device("meta")``
    context (counting parameters for balanced partitioning) everything stays on the meta device.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    full = torch.empty(tuple(full_shape), dtype=torch.float32)
    init(full, generator)
    local = full if split_dim is None else shard(full, split_dim, rank, parts)
    return local.to(dtype=dtype, device=None if local.is_meta else device)
