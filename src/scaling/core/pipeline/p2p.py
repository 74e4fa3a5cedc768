"""Point-to-point transfer of activation pytrees and their gradients between pipeline stages.

An activation is any pytree of tensors (hidden states plus masks, positions...). The receiver needs no
prior knowledge of shapes: each transfer starts with the length of a header (tree structure, shapes,
dtypes, which leaves carry gradients), then the header, then the leaves. Consecutive micro-batches
almost always have the same header, so a length of 0 means "same as the previous one on this channel"
and the header itself is skipped. Gradients flow back for exactly the floating-point leaves that require
grad, whose shapes both sides already know.

Sends are non-blocking (the caller keeps the returned works alive until it waits); receives block.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

__all__ = [
    "ActivationHeader",
    "HeaderCache",
    "decode_dtype",
    "gradient_leaves",
    "recv_activation",
    "recv_grads",
    "send_activation",
    "send_grads",
]

_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                                torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}  # fmt: skip


@dataclass(frozen=True)
class ActivationHeader:
    spec: str  # serialised pytree structure
    shapes: list[list[int]]
    dtypes: list[str]
    grad: list[bool]  # which leaves carry a gradient back

    def encode(self) -> torch.Tensor:
        payload = json.dumps({"spec": self.spec, "shapes": self.shapes, "dtypes": self.dtypes, "grad": self.grad})
        return torch.frombuffer(bytearray(payload.encode()), dtype=torch.uint8)

    @staticmethod
    def decode(data: torch.Tensor) -> ActivationHeader:
        raw = json.loads(bytes(data.tolist()).decode())
        return ActivationHeader(raw["spec"], raw["shapes"], raw["dtypes"], raw["grad"])


def decode_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def _carries_grad(leaf: torch.Tensor) -> bool:
    return leaf.is_floating_point() and leaf.requires_grad


class HeaderCache:
    """The last header sent to / received from each peer on one channel."""

    def __init__(self) -> None:
        self.sent: dict[int, bytes] = {}
        self.received: dict[int, ActivationHeader] = {}


def send_activation(
    obj: Any, dst: int, group: dist.ProcessGroup, device: torch.device, cache: HeaderCache | None = None
) -> list[Any]:
    """Start sending ``obj`` to global rank ``dst``; returns the works (keep them until waited)."""
    leaves, spec = pytree.tree_flatten(obj)
    if not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
        kinds = sorted({type(leaf).__name__ for leaf in leaves if not isinstance(leaf, torch.Tensor)})
        raise TypeError(f"pipeline activations must be pytrees of tensors, found {kinds}")
    header = ActivationHeader(
        spec=pytree.treespec_dumps(spec),
        shapes=[list(leaf.shape) for leaf in leaves],
        dtypes=[str(leaf.dtype) for leaf in leaves],
        grad=[_carries_grad(leaf) for leaf in leaves],
    ).encode()
    encoded = header.numpy().tobytes()
    if cache is not None and cache.sent.get(dst) == encoded:
        tensors = [torch.zeros(1, dtype=torch.int64, device=device)]
    else:
        tensors = [torch.tensor([header.numel()], dtype=torch.int64, device=device), header.to(device)]
        if cache is not None:
            cache.sent[dst] = encoded
    tensors += [leaf.detach().contiguous() for leaf in leaves]
    return [dist.isend(t, dst, group=group) for t in tensors]


def recv_activation(
    src: int, group: dist.ProcessGroup, device: torch.device, cache: HeaderCache | None = None
) -> tuple[Any, list[torch.Tensor]]:
    """Receive a pytree from ``src``; returns it and the leaves that will carry gradients back.

    Those leaves are fresh leaf tensors with ``requires_grad=True``, so after the backward pass their
    ``.grad`` is exactly what the sending stage needs.
    """
    length = torch.empty(1, dtype=torch.int64, device=device)
    dist.recv(length, src, group=group)
    size = int(length.item())
    if size == 0:
        if cache is None or src not in cache.received:
            raise RuntimeError(f"pipeline peer {src} referred to a previous activation header that was never sent")
        header = cache.received[src]
    else:
        raw = torch.empty(size, dtype=torch.uint8, device=device)
        dist.recv(raw, src, group=group)
        header = ActivationHeader.decode(raw.cpu())
        if cache is not None:
            cache.received[src] = header
    leaves: list[torch.Tensor] = []
    needs_grad: list[torch.Tensor] = []
    for shape, dtype, grad in zip(header.shapes, header.dtypes, header.grad, strict=True):
        leaf = torch.empty(shape, dtype=_DTYPES[dtype], device=device)
        dist.recv(leaf, src, group=group)
        if grad:
            leaf.requires_grad_(True)
            needs_grad.append(leaf)
        leaves.append(leaf)
    return pytree.tree_unflatten(leaves, pytree.treespec_loads(header.spec)), needs_grad


def gradient_leaves(obj: Any) -> list[torch.Tensor]:
    """The leaves of an activation that send a gradient back, in the order the receiver expects."""
    return [leaf for leaf in pytree.tree_leaves(obj) if isinstance(leaf, torch.Tensor) and _carries_grad(leaf)]


def send_grads(grads: list[torch.Tensor], dst: int, group: dist.ProcessGroup) -> list[Any]:
    return [dist.isend(g.contiguous(), dst, group=group) for g in grads]


def recv_grads(like: list[torch.Tensor], src: int, group: dist.ProcessGroup) -> list[torch.Tensor]:
    grads = []
    for tensor in like:
        grad = torch.empty_like(tensor, memory_format=torch.contiguous_format)
        dist.recv(grad, src, group=group)
        grads.append(grad)
    return grads
