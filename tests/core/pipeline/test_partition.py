"""Partitioning rules: uniform, balanced (optimal max stage weight), explicit, and clear rejections."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scaling.core.pipeline.partition import PartitionError, partition


def _check_contiguous(ranges: list[range], n_layers: int, n_stages: int) -> None:
    assert len(ranges) == n_stages
    assert ranges[0].start == 0 and ranges[-1].stop == n_layers
    for left, right in itertools.pairwise(ranges):
        assert left.stop == right.start
    assert all(len(r) >= 1 for r in ranges)


def test_uniform_gives_extra_layers_to_the_first_stages() -> None:
    assert partition(10, 4, "uniform") == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    assert partition(8, 2, "uniform") == [range(0, 4), range(4, 8)]
    assert partition(3, 3, "uniform") == [range(0, 1), range(1, 2), range(2, 3)]


def test_explicit_counts() -> None:
    assert partition(5, 2, [2, 3]) == [range(0, 2), range(2, 5)]


def _best_max_weight(weights: list[int], n_stages: int) -> int:
    n = len(weights)
    best = None
    for cuts in itertools.combinations(range(1, n), n_stages - 1):
        bounds = [0, *cuts, n]
        heaviest = max(sum(weights[a:b]) for a, b in itertools.pairwise(bounds))
        best = heaviest if best is None else min(best, heaviest)
    assert best is not None
    return best


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=9), st.integers(1, 9))
def test_balanced_is_optimal_and_contiguous(weights: list[int], n_stages: int) -> None:
    if n_stages > len(weights):
        with pytest.raises(PartitionError):
            partition(len(weights), n_stages, "balanced", weights)
        return
    ranges = partition(len(weights), n_stages, "balanced", weights)
    _check_contiguous(ranges, len(weights), n_stages)
    assert max(sum(weights[r.start : r.stop]) for r in ranges) == _best_max_weight(weights, n_stages)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 64), st.integers(1, 16))
def test_uniform_is_contiguous_and_even(n_layers: int, n_stages: int) -> None:
    if n_stages > n_layers:
        return
    ranges = partition(n_layers, n_stages, "uniform")
    _check_contiguous(ranges, n_layers, n_stages)
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((3, 4, "uniform"), "cannot split 3 layers over 4 pipeline stages"),
        ((2, 4, "balanced", [1, 1]), "cannot split 2 layers over 4"),
        ((4, 2, "balanced", None), "needs one weight per layer"),
        ((4, 2, "balanced", [1, 2, 3]), "needs one weight per layer: got 3 for 4 layers"),
        ((4, 2, [1, 2]), "places 3 layers, the model has 4"),
        ((4, 2, [4, 0]), "every stage needs at least one layer"),
        ((4, 2, [1, 1, 2]), "has 3 entries for 2 stages"),
        ((4, 2, "random"), "unknown partition method 'random'"),
        ((4, 0, "uniform"), "must be >= 1"),
    ],
)
def test_bad_partitions_are_rejected_clearly(args: tuple, fragment: str) -> None:
    with pytest.raises(PartitionError, match=fragment.replace("(", r"\(")):
        partition(*args)
