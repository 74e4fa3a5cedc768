"""Communication volume per rank and step, checked against hand-computed figures, and the link each
parallel group lands on under the DESIGN.md rank order (tp fastest, then dp, then pp)."""

from __future__ import annotations

from typing import Any

import pytest

from scaling.core.planner import link_of, step_communication
from scaling.core.planner.communication import CommunicationVolume

TOKENS, HIDDEN = 4096, 1024  # one micro-batch of [tokens, hidden]
ACTIVATION = TOKENS * HIDDEN * 2  # bf16 bytes


def _volume(**overrides: Any) -> CommunicationVolume:
    base: dict[str, Any] = dict(
        tp=1,
        pp=1,
        dp=1,
        zero_stage=0,
        gpus_per_node=8,
        params_per_rank=1e6,
        trainable_per_rank=1e6,
        compute_bytes=2,
        reduce_bytes=2,
        layers_per_stage=4,
        tokens_per_micro_batch=TOKENS,
        hidden_size=HIDDEN,
        n_micro=1,
    )
    return step_communication(**(base | overrides))


def test_one_rank_sends_nothing() -> None:
    volume = _volume()
    assert (volume.tp, volume.dp, volume.pp, volume.total) == (0.0, 0.0, 0.0, 0.0)


def test_tensor_parallel_all_reduces() -> None:
    """tp=4, 4 layers, 3 micro-batches: 4 all-reduces per layer, each 2 * 3/4 of one activation."""
    volume = _volume(tp=4, n_micro=3)
    assert volume.tp == pytest.approx(3 * 4 * 4 * 2 * 0.75 * ACTIVATION)
    assert _volume(tp=4, n_micro=3, sequence_parallel=True).tp == volume.tp  # all-gather + reduce-scatter
    # two recomputed layers run their 2 forward all-reduces again
    assert _volume(tp=4, n_micro=3, recomputed_layers=2).tp == pytest.approx(volume.tp * (16 + 4) / 16)
    assert _volume(tp=1, n_micro=3).tp == 0.0
    assert volume.dp == 0.0 and volume.pp == 0.0


def test_data_parallel_by_zero_stage_with_one_micro_batch() -> None:
    """With m=1, equal dtypes and all parameters trainable, stages 0-2 each move 2 (d-1)/d of the
    parameter bytes (all-reduce, or reduce-scatter + all-gather); stage 3 gathers once more, 3 (d-1)/d."""
    grads = 1e6 * 2
    by_stage = {stage: _volume(dp=4, zero_stage=stage) for stage in range(4)}
    assert by_stage[0].dp == pytest.approx(2 * 0.75 * grads)
    assert by_stage[0].dp == pytest.approx(by_stage[1].dp)
    assert by_stage[1].dp == pytest.approx(by_stage[2].dp)
    assert by_stage[3].dp == pytest.approx(3 * 0.75 * grads)
    assert by_stage[3].dp > by_stage[2].dp
    assert _volume(dp=1, zero_stage=3).dp == 0.0


def test_data_parallel_with_gradient_accumulation() -> None:
    """m=4, d=2, fp32 reduction of bf16 parameters, half of them trainable."""
    share, grads, params, m = 0.5, 0.5e6 * 4, 1e6 * 2, 4
    kwargs: dict[str, Any] = dict(dp=2, n_micro=m, reduce_bytes=4, trainable_per_rank=0.5e6)
    stage0, stage1, stage2, stage3 = (_volume(zero_stage=stage, **kwargs) for stage in range(4))
    assert (stage0.dp_reduce, stage0.dp_gather) == pytest.approx((2 * share * grads, 0.0))
    assert (stage1.dp_reduce, stage1.dp_gather) == pytest.approx((share * grads, m * share * params))
    assert (stage2.dp_reduce, stage2.dp_gather) == pytest.approx((m * share * grads, m * share * params))
    assert (stage3.dp_reduce, stage3.dp_gather) == pytest.approx((m * share * grads, 2 * m * share * params))
    assert [v.dp_reduce_calls for v in (stage0, stage1, stage2, stage3)] == [1, 1, m, m]
    assert [v.dp_gather_calls for v in (stage0, stage1, stage2, stage3)] == [0, m, m, 2 * m]


def test_pipeline_messages() -> None:
    """A middle stage sends each micro-batch's activation on and its gradient back; with pp=2 and one
    chunk a rank sends only one of the two; interleaving sends once per chunk boundary."""
    assert _volume(pp=4, n_micro=3).pp == pytest.approx(3 * 2 * ACTIVATION)
    assert _volume(pp=2, n_micro=3).pp == pytest.approx(3 * 1 * ACTIVATION)
    # virtual stages 0..3, rank 0 holds 0 and 2: activations 0->1, 2->3 and the gradient 2->1
    assert _volume(pp=2, n_micro=4, n_chunks=2).pp == pytest.approx(4 * 3 * ACTIVATION)
    assert _volume(pp=4, n_micro=3).pp_message == ACTIVATION
    assert _volume(pp=4, tp=4, n_micro=3, sequence_parallel=True).pp_message == ACTIVATION / 4
    assert _volume(pp=1, n_micro=3, n_chunks=2).pp == 0.0


@pytest.mark.parametrize(
    ("group", "tp", "pp", "dp", "expected"),
    [
        ("tp", 8, 1, 1, "intra"),
        ("tp", 16, 1, 1, "inter"),
        ("tp", 8, 2, 4, "intra"),
        ("dp", 4, 1, 2, "intra"),
        ("dp", 4, 1, 4, "inter"),
        ("dp", 8, 1, 2, "inter"),
        ("pp", 2, 4, 1, "intra"),
        ("pp", 2, 4, 2, "inter"),
        ("pp", 1, 1, 64, "intra"),  # groups of one rank never leave their node
        ("tp", 3, 1, 3, "inter"),  # ranks 6..8 straddle the first node boundary
    ],
)
def test_link_of(group: str, tp: int, pp: int, dp: int, expected: str) -> None:
    assert link_of(group, tp, pp, dp, gpus_per_node=8) == expected  # type: ignore[arg-type]


def test_volume_names_the_links() -> None:
    volume = _volume(tp=4, dp=4, pp=2, gpus_per_node=8)
    assert volume.links == {"tp": "intra", "dp": "inter", "pp": "inter"}


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="zero_stage"):
        _volume(zero_stage=4)
    with pytest.raises(ValueError, match="tp must be >= 1"):
        _volume(tp=0)
    with pytest.raises(ValueError, match="recomputed_layers"):
        _volume(recomputed_layers=5)
