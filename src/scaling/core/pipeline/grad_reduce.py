"""Data-parallel gradient averaging in buckets, overlapped with the backward pass.

Gradients are averaged in flat bucket buffers, one collective per bucket. A bucket starts reducing as soon
as every gradient in it is final for the step (a post-accumulate hook counts accumulations: a parameter is
final after one per micro-batch for every model chunk on this rank that uses it), while autograd keeps
computing the gradients of earlier layers. Buckets are launched strictly in index order so every
data-parallel rank issues the same collectives in the same order.

Two modes, by ``reduce_dtype``:

* the parameter's dtype (the default): ``param.grad`` *is* a view into the bucket, reduced in place with
  no copy;
* a wider dtype (fp32 for bf16/fp16 parameters): autograd accumulates into ``param.grad`` as usual, the
  bucket holds an fp32 copy that is reduced, and :meth:`GradReducer.main_grad` returns it. The optimizer
  reads gradients only through ``main_grad``.

Parameters are addressed by their layout-free names (the engine's parameter table), never by ``id``.
This is ZeRO stage 0; stages 1-3 leave gradient reduction to FSDP2 (see ``grad_sync.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["GradReducer"]


class _Bucket:
    def __init__(self, names: list[str], params: list[nn.Parameter], dtype: torch.dtype) -> None:
        self.names = names
        self.params = params
        device = params[0].device
        self.buffer = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=device)
        self.views: list[torch.Tensor] = []
        offset = 0
        for p in params:
            self.views.append(self.buffer[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        self.in_place = dtype == params[0].dtype  # param.grad lives in the buffer itself
        self.ready = 0
        self.work: Any = None


class GradReducer:
    """Averages the gradients of the named parameters ``named`` over ``group`` (the data-parallel group).

    Use per step: :meth:`zero` before the first backward, :meth:`finish` after the last one; then read
    :meth:`main_grad`.
    """

    def __init__(
        self,
        named: Sequence[tuple[str, nn.Parameter]],
        group: dist.ProcessGroup | None,
        size: int,
        bucket_bytes: int,
        reduce_dtype: torch.dtype | None = None,
    ) -> None:
        self.group = group
        self.size = size
        trainable = [(n, p) for n, p in named if p.requires_grad]
        self.buckets: list[_Bucket] = []
        self._slot: dict[str, tuple[int, int]] = {}  # name -> (bucket, index in bucket)
        current: list[tuple[str, nn.Parameter]] = []
        current_bytes = 0
        # Reverse registration order approximates the order in which backward produces gradients.
        for name, p in reversed(trainable):
            size_bytes = p.numel() * p.element_size()
            if current and (current_bytes + size_bytes > bucket_bytes or p.dtype != current[0][1].dtype):
                self._add_bucket(current, reduce_dtype)
                current, current_bytes = [], 0
            current.append((name, p))
            current_bytes += size_bytes
        if current:
            self._add_bucket(current, reduce_dtype)
        self._expected: dict[str, int] = {}
        self._seen: dict[str, int] = {}
        self._next_launch = 0
        if size > 1:
            for name, p in trainable:
                hook = functools.partial(self._on_grad_ready, name)
                p.register_post_accumulate_grad_hook(hook)  # type: ignore[no-untyped-call]

    def _add_bucket(self, named: list[tuple[str, nn.Parameter]], reduce_dtype: torch.dtype | None) -> None:
        for index, (name, _) in enumerate(named):
            self._slot[name] = (len(self.buckets), index)
        params = [p for _, p in named]
        self.buckets.append(_Bucket([n for n, _ in named], params, reduce_dtype or params[0].dtype))

    def holds(self, name: str) -> bool:
        return name in self._slot

    def main_grad(self, name: str) -> torch.Tensor:
        """The averaged gradient of parameter ``name`` (in the reduce dtype), valid after :meth:`finish`."""
        bucket, index = self._slot[name]
        return self.buckets[bucket].views[index]

    def zero(self, n_micro: int = 1, uses: Mapping[str, int] | None = None) -> None:
        """Zero all gradients for a new step.

        A parameter's gradient is final after ``n_micro x uses[name]`` accumulations (default one use);
        ``uses`` counts the model chunks on this rank that contain the parameter.
        """
        uses = uses or {}
        self._expected = {n: n_micro * uses.get(n, 1) for b in self.buckets for n in b.names}
        self._seen = dict.fromkeys(self._expected, 0)
        for bucket in self.buckets:
            bucket.buffer.zero_()
            bucket.ready = 0
            bucket.work = None
            for p, view in zip(bucket.params, bucket.views, strict=True):
                p.grad = view if bucket.in_place else None
        self._next_launch = 0

    def _on_grad_ready(self, key: str, param: torch.Tensor) -> None:
        self._seen[key] = self._seen.get(key, 0) + 1
        if self._seen[key] != self._expected.get(key):
            return
        self.buckets[self._slot[key][0]].ready += 1
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if bucket.ready < len(bucket.params):
                return
            self._launch(bucket)

    @staticmethod
    def _collect(bucket: _Bucket) -> None:
        """Bring every gradient of ``bucket`` into its buffer (a copy in fp32 mode, or if code replaced
        ``.grad``); a parameter that got no gradient contributes zeros."""
        for p, view in zip(bucket.params, bucket.views, strict=True):
            if p.grad is None:
                view.zero_()
                if bucket.in_place:
                    p.grad = view
            elif p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)
                if bucket.in_place:
                    p.grad = view

    def _launch(self, bucket: _Bucket) -> None:
        self._collect(bucket)
        bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)
        self._next_launch += 1

    def finish(self) -> None:
        """Launch what is left (parameters that got no gradient), wait, and turn the sums into means."""
        if self.size == 1:
            for bucket in self.buckets:
                self._collect(bucket)
            return
        while self._next_launch < len(self.buckets):
            self._launch(self.buckets[self._next_launch])
        for bucket in self.buckets:
            bucket.work.wait()
            bucket.buffer.div_(self.size)
