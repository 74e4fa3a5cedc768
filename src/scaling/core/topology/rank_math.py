"""Pure rank arithmetic: global rank <-> (pp, dp, tp) coordinates and the rank lists of every group.

Order (tensor-parallel fastest, then data-parallel, then pipeline)::

    global = pp * (dp_size * tp_size) + dp * tp_size + tp

Tensor-parallel ranks are neighbours because they talk the most (an all-reduce per layer) and should share
a node. Worked example, tp=2, dp=2, pp=2 (8 ranks)::

    rank:  0  1  2  3  4  5  6  7
    pp:    0  0  0  0  1  1  1  1
    dp:    0  0  1  1  0  0  1  1
    tp:    0  1  0  1  0  1  0  1

    tp groups:    [0,1] [2,3] [4,5] [6,7]
    dp groups:    [0,2] [1,3] [4,6] [5,7]
    pp groups:    [0,4] [1,5] [2,6] [3,7]
    model groups: [0,1,4,5] [2,3,6,7]        (tp x pp: one full model replica)
    embedding:    [0,4] [1,5] [2,6] [3,7]    (first and last stage; just the rank itself when pp=1)

No ``torch.distributed`` here: ints in, ints out, so every layout can be tested exhaustively.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Coord",
    "ParallelSizes",
    "coord_of",
    "data_parallel_groups",
    "embedding_groups",
    "model_parallel_groups",
    "pipe_parallel_groups",
    "rank_of",
    "tensor_parallel_groups",
]


@dataclass(frozen=True, slots=True)
class ParallelSizes:
    """Degrees of the three parallel axes."""

    tp: int = 1
    dp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        for axis in ("tp", "dp", "pp"):
            if getattr(self, axis) < 1:
                raise ValueError(f"{axis} size must be >= 1, got {getattr(self, axis)}")

    @property
    def world(self) -> int:
        return self.tp * self.dp * self.pp


@dataclass(frozen=True, slots=True, order=True)
class Coord:
    """Position of one rank on the three axes."""

    pp: int
    dp: int
    tp: int


def coord_of(rank: int, sizes: ParallelSizes) -> Coord:
    """Coordinates of ``rank``; inverse of :func:`rank_of`."""
    if not 0 <= rank < sizes.world:
        raise ValueError(f"rank {rank} is outside world of size {sizes.world}")
    return Coord(pp=rank // (sizes.tp * sizes.dp), dp=rank // sizes.tp % sizes.dp, tp=rank % sizes.tp)


def rank_of(coord: Coord, sizes: ParallelSizes) -> int:
    """Global rank of ``coord``; inverse of :func:`coord_of`."""
    for axis in ("pp", "dp", "tp"):
        if not 0 <= getattr(coord, axis) < getattr(sizes, axis):
            raise ValueError(f"{axis} coordinate {getattr(coord, axis)} is outside size {getattr(sizes, axis)}")
    return coord.pp * (sizes.dp * sizes.tp) + coord.dp * sizes.tp + coord.tp


def _ranks(sizes: ParallelSizes, pp: range, dp: range, tp: range) -> list[int]:
    return [rank_of(Coord(p, d, t), sizes) for p in pp for d in dp for t in tp]


def tensor_parallel_groups(sizes: ParallelSizes) -> list[list[int]]:
    """Ranks that differ only in tp (they split every layer)."""
    return [
        _ranks(sizes, range(p, p + 1), range(d, d + 1), range(sizes.tp))
        for p in range(sizes.pp)
        for d in range(sizes.dp)
    ]


def data_parallel_groups(sizes: ParallelSizes) -> list[list[int]]:
    """Ranks that differ only in dp (they hold the same parameters and average gradients)."""
    return [
        _ranks(sizes, range(p, p + 1), range(sizes.dp), range(t, t + 1))
        for p in range(sizes.pp)
        for t in range(sizes.tp)
    ]


def pipe_parallel_groups(sizes: ParallelSizes) -> list[list[int]]:
    """Ranks that differ only in pp (one pipeline: activations flow along it)."""
    return [
        _ranks(sizes, range(sizes.pp), range(d, d + 1), range(t, t + 1))
        for d in range(sizes.dp)
        for t in range(sizes.tp)
    ]


def model_parallel_groups(sizes: ParallelSizes) -> list[list[int]]:
    """Ranks that together hold one full model replica (tp x pp for a fixed dp)."""
    return [_ranks(sizes, range(sizes.pp), range(d, d + 1), range(sizes.tp)) for d in range(sizes.dp)]


def embedding_groups(sizes: ParallelSizes) -> list[list[int]]:
    """The first and last pipeline stage for a fixed (dp, tp): they share tied embedding weights."""
    stages = sorted({0, sizes.pp - 1})
    return [[rank_of(Coord(p, d, t), sizes) for p in stages] for d in range(sizes.dp) for t in range(sizes.tp)]
