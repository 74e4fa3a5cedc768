"""Tensor-parallel layers against their dense counterparts, for tp = 1, 2, 4.

Every rank builds the dense reference from the same seed (the full-size initialisation the parallel
layers slice), runs the same input, and checks outputs, input gradients and its shard of the weight
gradients. A failure names the layer and the tp rank.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from scaling.core.nn import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    all_gather_from_sp,
    copy_to_tp,
    gather_from_tp,
    get_param_meta,
    reduce_from_tp,
    reduce_scatter_to_sp,
    scatter_to_sp,
    scatter_to_tp,
    shard,
    unshard,
    vocab_parallel_cross_entropy,
)
from scaling.core.nn.param_meta import init_normal, init_zeros, local_slice_of_init
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig

TOL = {"rtol": 1e-5, "atol": 1e-6}


def _dense(shape: tuple[int, ...], seed: int, zeros: bool = False) -> torch.Tensor:
    full = local_slice_of_init(shape, init_zeros if zeros else init_normal(), seed, None, 0, 1)
    return full.requires_grad_(True)


def _input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _check_comm_pairs(topo: Topology) -> None:
    group, tp, rank = topo.tp_group, topo.tp_size, topo.tp_rank
    x = (_input((2, 4, 8), 0) + rank).requires_grad_(True)  # differs per rank where that matters
    # copy_to_tp: identity forward, backward sums the gradients of all ranks.
    copy_to_tp(x, group).mul(rank + 1).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, torch.full_like(x, sum(range(1, tp + 1))))
    # reduce_from_tp: forward sums over ranks, backward passes the gradient through.
    x.grad = None
    out = reduce_from_tp(x, group)
    torch.testing.assert_close(out, sum(_input((2, 4, 8), 0) + r for r in range(tp)))
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))
    # scatter/gather along the last dim and along the sequence are inverse and conjugate.
    same = _input((2, 4, 8), 1).requires_grad_(True)
    mine = scatter_to_tp(same, group)
    torch.testing.assert_close(mine, same.chunk(tp, -1)[rank])
    gathered = gather_from_tp(mine, group)
    torch.testing.assert_close(gathered, same)
    (gathered * (rank + 1)).sum().backward()  # backward of gather keeps my slice: weight rank+1 on my slice
    expected = torch.zeros_like(same)
    for r in range(tp):
        expected.chunk(tp, -1)[r].fill_(r + 1)  # scatter's backward all-gathers every rank's slice
    torch.testing.assert_close(same.grad, expected)
    seq = _input((2, 4, 8), 2).requires_grad_(True)
    shard_seq = scatter_to_sp(seq, group)
    torch.testing.assert_close(shard_seq, seq.chunk(tp, 1)[rank])
    full = all_gather_from_sp(shard_seq, group)
    torch.testing.assert_close(full, seq)
    back = reduce_scatter_to_sp(full * (rank + 1), group)  # sum over ranks, keep my shard
    torch.testing.assert_close(back, seq.chunk(tp, 1)[rank] * sum(range(1, tp + 1)))


def _check_column_row(topo: Topology) -> None:
    tp, rank = topo.tp_size, topo.tp_rank
    x_full = _input((2, 4, 8), 3)
    for gather in (False, True):
        column = ColumnParallelLinear(8, 12, topo, seed=10, gather_output=gather)
        w, b = _dense((12, 8), 10), _dense((12,), 11, zeros=True)
        x = x_full.clone().requires_grad_(True)
        x_ref = x_full.clone().requires_grad_(True)
        y = column(x)
        y_ref = x_ref @ w.t() + b
        torch.testing.assert_close(y, y_ref if gather else y_ref.chunk(tp, -1)[rank], **TOL)
        weight_out = _input(tuple(y_ref.shape), 4)
        (y * (weight_out if gather else weight_out.chunk(tp, -1)[rank])).sum().backward()
        (y_ref * weight_out).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, **TOL, msg=f"column gather={gather} input grad")
        torch.testing.assert_close(column.weight.grad, shard(w.grad, 0, rank, tp), **TOL)
        torch.testing.assert_close(column.bias.grad, shard(b.grad, 0, rank, tp), **TOL)
        assert get_param_meta(column.weight).tp_split_dim == 0

    for parallel_input in (True, False):
        row = RowParallelLinear(12, 8, topo, seed=20, input_is_parallel=parallel_input)
        w, b = _dense((8, 12), 20), _dense((8,), 21, zeros=True)
        z_full = _input((2, 4, 12), 5)
        z = (z_full.chunk(tp, -1)[rank] if parallel_input else z_full).clone().requires_grad_(True)
        z_ref = z_full.clone().requires_grad_(True)
        y, y_ref = row(z), z_ref @ w.t() + b
        torch.testing.assert_close(y, y_ref, **TOL)
        weight_out = _input((2, 4, 8), 6)
        (y * weight_out).sum().backward()
        (y_ref * weight_out).sum().backward()
        expected_z_grad = z_ref.grad.chunk(tp, -1)[rank] if parallel_input else z_ref.grad
        torch.testing.assert_close(z.grad, expected_z_grad, **TOL)
        torch.testing.assert_close(row.weight.grad, shard(w.grad, 1, rank, tp), **TOL)
        torch.testing.assert_close(row.bias.grad, b.grad, **TOL)
        assert get_param_meta(row.weight).tp_split_dim == 1 and get_param_meta(row.bias).is_replicated


def _check_mlp_block(topo: Topology) -> None:
    """Column -> gelu -> Row equals the dense two-layer MLP (with or without sequence parallelism)."""
    tp, rank = topo.tp_size, topo.tp_rank
    sp = topo.config.sequence_parallel and tp > 1
    up, down = ColumnParallelLinear(8, 16, topo, seed=30), RowParallelLinear(16, 8, topo, seed=40)
    w1, b1, w2, b2 = _dense((16, 8), 30), _dense((16,), 31, True), _dense((8, 16), 40), _dense((8,), 41, True)
    x_full = _input((2, 4, 8), 7)
    x = (x_full.chunk(tp, 1)[rank] if sp else x_full).clone().requires_grad_(True)
    x_ref = x_full.clone().requires_grad_(True)
    y = down(nn.functional.gelu(up(x)))
    y_ref = nn.functional.gelu(x_ref @ w1.t() + b1) @ w2.t() + b2
    torch.testing.assert_close(y, y_ref.chunk(tp, 1)[rank] if sp else y_ref, **TOL)
    weight_out = _input((2, 4, 8), 8)
    (y * (weight_out.chunk(tp, 1)[rank] if sp else weight_out)).sum().backward()
    (y_ref * weight_out).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad.chunk(tp, 1)[rank] if sp else x_ref.grad, **TOL)
    torch.testing.assert_close(up.weight.grad, shard(w1.grad, 0, rank, tp), **TOL)
    torch.testing.assert_close(down.weight.grad, shard(w2.grad, 1, rank, tp), **TOL)
    bias_grad = down.bias.grad.clone()
    if sp:  # partial over this rank's tokens: the engine sums it over tp ranks
        assert get_param_meta(down.bias).partial_grad_over_tp
        dist.all_reduce(bias_grad, group=topo.tp_group)
    torch.testing.assert_close(bias_grad, b2.grad, **TOL)


def _check_embedding_and_loss(topo: Topology) -> None:
    tp, rank = topo.tp_size, topo.tp_rank
    embedding = VocabParallelEmbedding(16, 8, topo, seed=50)
    table = _dense((16, 8), 50)
    tokens = torch.randint(0, 16, (2, 4), generator=torch.Generator().manual_seed(9))
    out, ref = embedding(tokens), table[tokens]
    sp = topo.config.sequence_parallel and tp > 1
    torch.testing.assert_close(out, ref.chunk(tp, 1)[rank] if sp else ref)
    weight_out = _input((2, 4, 8), 10)
    (out * (weight_out.chunk(tp, 1)[rank] if sp else weight_out)).sum().backward()
    (ref * weight_out).sum().backward()
    torch.testing.assert_close(embedding.weight.grad, shard(table.grad, 0, rank, tp), **TOL)

    logits_full = _input((2, 5, 16), 11) * 30  # large logits: the max shift must keep it stable
    logits_full[0, 0, 3] = 1e4
    target = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(12))
    target[1, 2] = -100
    target[0, 4] = -100
    logits = logits_full.chunk(tp, -1)[rank].clone().requires_grad_(True)
    logits_ref = logits_full.clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(logits, target, topo.tp_group)
    loss_ref = nn.functional.cross_entropy(logits_ref.flatten(0, 1), target.flatten(), reduction="none").view(2, 5)
    torch.testing.assert_close(loss, loss_ref, **TOL)
    assert loss[1, 2] == 0 and loss[0, 4] == 0
    weights = _input((2, 5), 13)
    (loss * weights).sum().backward()
    (loss_ref * weights).sum().backward()
    torch.testing.assert_close(logits.grad, logits_ref.grad.chunk(tp, -1)[rank], **TOL)
    assert torch.all(logits.grad[1, 2] == 0)


def _all_checks(sequence_parallel: bool) -> int:
    world = dist.get_world_size()
    topo = Topology(TopologyConfig(model_parallel_size=world, sequence_parallel=sequence_parallel))
    _check_comm_pairs(topo)
    if not sequence_parallel:  # under SP the layers take sequence shards: covered by the block below
        _check_column_row(topo)
    _check_mlp_block(topo)
    _check_embedding_and_loss(topo)
    return topo.tp_rank


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_parallel_layers_equal_dense(tp: int) -> None:
    assert run_distributed(_all_checks, tp, False) == list(range(tp))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_layers_equal_dense(tp: int) -> None:
    assert run_distributed(_all_checks, tp, True) == list(range(tp))


def test_init_slices_equal_the_tp1_weights() -> None:
    full = local_slice_of_init((12, 8), init_normal(), 5, None, 0, 1)
    for tp in (2, 4):
        for dim in (0, 1):
            shards = [local_slice_of_init((12, 8), init_normal(), 5, dim, r, tp) for r in range(tp)]
            assert torch.equal(unshard(shards, dim), full)
    with pytest.raises(ValueError, match="cannot split dim 1 of size 8 evenly over 3"):
        shard(full, 1, 0, 3)
