"""Split a stack of layers into contiguous pipeline stages: pure functions of ints.

``partition`` returns one ``range`` of layer indices per (virtual) stage. Virtual stage ``v`` lives on
pipeline rank ``v % pp`` as its model chunk ``v // pp`` (interleaved schedules); with one chunk per rank
the virtual stages are the pipeline ranks.

Example::

    >>> partition(10, 4, "uniform")
    [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    >>> partition(4, 2, "balanced", weights=[1, 1, 1, 3])
    [range(0, 3), range(3, 4)]
    >>> partition(5, 2, [2, 3])
    [range(0, 2), range(2, 5)]
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["PartitionError", "partition"]


class PartitionError(ValueError):
    """The layers cannot be placed on the stages as asked."""


def partition(
    n_layers: int,
    n_stages: int,
    method: str | Sequence[int],
    weights: Sequence[int] | None = None,
) -> list[range]:
    """Contiguous layer ranges for ``n_stages`` stages; every stage gets at least one layer.

    Args:
        n_layers: number of layers in the model.
        n_stages: number of (virtual) pipeline stages.
        method: ``"uniform"`` (layer counts differ by at most one; earlier stages take the extra layers
            because the last stage also computes the loss), ``"balanced"`` (minimise the largest stage
            weight, e.g. parameter counts), or an explicit list of layer counts, one per stage.
        weights: per-layer weights for ``"balanced"``.
    """
    if n_stages < 1:
        raise PartitionError(f"number of pipeline stages must be >= 1, got {n_stages}")
    if n_layers < n_stages:
        raise PartitionError(
            f"cannot split {n_layers} layers over {n_stages} pipeline stages: every stage needs at least one "
            "layer (lower pipe_parallel_size or the number of virtual stages)"
        )
    if isinstance(method, str):
        if method == "uniform":
            return _from_counts([n_layers // n_stages + (1 if s < n_layers % n_stages else 0) for s in range(n_stages)])
        if method == "balanced":
            if weights is None or len(weights) != n_layers:
                raise PartitionError(
                    f"balanced partitioning needs one weight per layer: got "
                    f"{'none' if weights is None else len(weights)} for {n_layers} layers"
                )
            return _balanced(list(weights), n_stages)
        raise PartitionError(f"unknown partition method {method!r}: use 'uniform', 'balanced' or a list of counts")
    counts = list(method)
    if len(counts) != n_stages:
        raise PartitionError(f"explicit partition {counts} has {len(counts)} entries for {n_stages} stages")
    if any(c < 1 for c in counts):
        raise PartitionError(f"explicit partition {counts}: every stage needs at least one layer")
    if sum(counts) != n_layers:
        raise PartitionError(f"explicit partition {counts} places {sum(counts)} layers, the model has {n_layers}")
    return _from_counts(counts)


def _from_counts(counts: list[int]) -> list[range]:
    ranges, start = [], 0
    for count in counts:
        ranges.append(range(start, start + count))
        start += count
    return ranges


def _balanced(weights: list[int], n_stages: int) -> list[range]:
    """Minimise the heaviest stage by binary search on its weight, then fill greedily.

    Greedy filling from the back leaves the lighter remainder on the first stages; any stage left empty
    takes one layer from its neighbour so every stage has work.
    """
    if any(w < 0 for w in weights):
        raise PartitionError("layer weights must be non-negative")
    low, high = max(weights), sum(weights)
    while low < high:
        mid = (low + high) // 2
        if _stages_needed(weights, mid) <= n_stages:
            high = mid
        else:
            low = mid + 1
    counts: list[int] = []
    load, count = 0, 0
    for index in range(len(weights) - 1, -1, -1):
        layers_left = index + 1
        stages_left = n_stages - len(counts) - 1  # stages still to open after the current one
        if count and (load + weights[index] > low or layers_left <= stages_left):
            counts.append(count)
            load, count = 0, 0
        load += weights[index]
        count += 1
    counts.append(count)
    counts.reverse()
    while len(counts) < n_stages:  # fewer stages used than available: split the largest count
        largest = max(range(len(counts)), key=lambda i: counts[i])
        if counts[largest] < 2:
            break
        counts[largest] -= 1
        counts.insert(largest, 1)
    return _from_counts(counts)


def _stages_needed(weights: list[int], cap: int) -> int:
    stages, load = 1, 0
    for weight in weights:
        if load + weight > cap:
            stages, load = stages + 1, 0
        load += weight
    return stages
