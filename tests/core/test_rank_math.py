"""Pure rank arithmetic, checked exhaustively for every layout of up to 16 ranks."""

from __future__ import annotations

import itertools

import pytest

from scaling.core.topology.rank_math import (
    Coord,
    ParallelSizes,
    coord_of,
    data_parallel_groups,
    embedding_groups,
    model_parallel_groups,
    pipe_parallel_groups,
    rank_of,
    tensor_parallel_groups,
)


def _layouts(max_world: int = 16) -> list[ParallelSizes]:
    return [
        ParallelSizes(tp=tp, dp=dp, pp=pp)
        for tp, dp, pp in itertools.product(range(1, max_world + 1), repeat=3)
        if tp * dp * pp <= max_world
    ]


LAYOUTS = _layouts()


def test_documented_example_tp2_dp2_pp2() -> None:
    sizes = ParallelSizes(tp=2, dp=2, pp=2)
    assert [coord_of(r, sizes) for r in range(8)] == [
        Coord(0, 0, 0), Coord(0, 0, 1), Coord(0, 1, 0), Coord(0, 1, 1),
        Coord(1, 0, 0), Coord(1, 0, 1), Coord(1, 1, 0), Coord(1, 1, 1),
    ]  # fmt: skip
    assert tensor_parallel_groups(sizes) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert data_parallel_groups(sizes) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert pipe_parallel_groups(sizes) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert model_parallel_groups(sizes) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert embedding_groups(sizes) == [[0, 4], [1, 5], [2, 6], [3, 7]]


@pytest.mark.parametrize("sizes", LAYOUTS, ids=str)
def test_coordinates_are_a_bijection_in_design_order(sizes: ParallelSizes) -> None:
    seen = set()
    for rank in range(sizes.world):
        coord = coord_of(rank, sizes)
        assert rank_of(coord, sizes) == rank
        assert rank == coord.pp * (sizes.dp * sizes.tp) + coord.dp * sizes.tp + coord.tp
        seen.add(coord)
    assert len(seen) == sizes.world


@pytest.mark.parametrize("sizes", LAYOUTS, ids=str)
def test_group_families_partition_the_world_along_one_axis(sizes: ParallelSizes) -> None:
    families = {
        "tp": (tensor_parallel_groups(sizes), sizes.tp, {"tp"}),
        "dp": (data_parallel_groups(sizes), sizes.dp, {"dp"}),
        "pp": (pipe_parallel_groups(sizes), sizes.pp, {"pp"}),
        "model": (model_parallel_groups(sizes), sizes.tp * sizes.pp, {"tp", "pp"}),
    }
    for name, (groups, group_size, varying) in families.items():
        members = sorted(r for g in groups for r in g)
        assert members == list(range(sizes.world)), f"{name} groups do not partition the world"
        for group in groups:
            assert len(group) == group_size
            assert group == sorted(group)
            coords = [coord_of(r, sizes) for r in group]
            for axis in {"tp", "dp", "pp"} - varying:
                assert len({getattr(c, axis) for c in coords}) == 1, f"{name} group {group} varies in {axis}"


@pytest.mark.parametrize("sizes", LAYOUTS, ids=str)
def test_embedding_groups_join_first_and_last_stage(sizes: ParallelSizes) -> None:
    groups = embedding_groups(sizes)
    assert len(groups) == sizes.dp * sizes.tp
    for group in groups:
        coords = [coord_of(r, sizes) for r in group]
        assert [c.pp for c in coords] == sorted({0, sizes.pp - 1})
        assert len({(c.dp, c.tp) for c in coords}) == 1


@pytest.mark.parametrize("bad", [-1, 8, 100])
def test_out_of_range_rank_is_rejected(bad: int) -> None:
    with pytest.raises(ValueError, match="outside world of size 8"):
        coord_of(bad, ParallelSizes(tp=2, dp=2, pp=2))


def test_out_of_range_coordinate_and_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="tp coordinate 2 is outside size 2"):
        rank_of(Coord(0, 0, 2), ParallelSizes(tp=2))
    with pytest.raises(ValueError, match="dp size must be >= 1"):
        ParallelSizes(dp=0)
