"""AdamW with ZeRO (stage 1, via the deprecated zero: true) on data-parallel (and tp/pp) layouts equals
torch.optim.AdamW on one process.

The reference trains the same tiny tensor-parallel LM (tp=1) with a plain loop over all micro-batches,
``torch.nn.utils.clip_grad_norm_`` and ``torch.optim.AdamW`` over the same parameter groups and learning
rates. The parallel run must give the same loss at every step and the same weights after training
(fp32, relative tolerance 1e-6 on a 1e-6 absolute floor).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from scaling.core.nn import unshard
from scaling.core.optimizer.config import OptimizerConfig
from scaling.core.optimizer.lr_schedule import learning_rate_at
from scaling.core.optimizer.optimizer import Optimizer
from scaling.core.optimizer.param_groups import assign_groups
from scaling.core.pipeline.module import ParallelModule
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig
from scaling.core.zero import gathered

from ..pipeline.tp_models import Loss, batches, model_specs

N_BLOCKS, N_MICRO = 2, 2
TOL = {"rtol": 1e-6, "atol": 1e-6}

OPTIMIZER = {
    "gradient_clipping": 0.5,  # small enough to clip on some steps
    "training_groups": [
        {
            "name": "blocks",
            "parameters": ["layers.1.*", "layers.2.*"],
            "weight_decay": 0.1,
            "learning_rate_schedule": {
                "learning_rate": 3e-2,
                "learning_rate_warmup_steps": 2,
                "learning_rate_decay_steps": 10,
                "learning_rate_minimum": 1e-3,
            },
        },
        {
            "name": "embedding",
            "parameters": ["layers.0.*"],
            "weight_decay": 0.05,
            "learning_rate_schedule": {"learning_rate": 1e-2, "learning_rate_decay_style": "constant"},
        },
    ],
}


def _step_batches(step: int, dp: int) -> list[dict[str, torch.Tensor]]:
    return batches(N_MICRO * dp, seed=1000 + step)


def _reference(steps: int, dp: int) -> dict[str, Any]:
    topo = Topology(TopologyConfig())
    layers = torch.nn.ModuleList(spec.build() for spec in model_specs(topo, N_BLOCKS, 0.0))
    layers[-1].weight = layers[0].weight
    loss_fn = Loss(topo)
    config = OptimizerConfig.from_dict(OPTIMIZER)
    named = [(f"layers.{n}", p) for n, p in layers.named_parameters()]
    by_name = dict(named)
    slots = assign_groups([n for n, _ in named], config.training_groups)
    adam = torch.optim.AdamW(
        [{"params": [by_name[n] for n in s.names], "weight_decay": s.weight_decay} for s in slots],
        betas=(config.beta1, config.beta2),
        eps=config.eps,
    )
    losses, norms = [], []
    for step in range(steps):
        adam.zero_grad()
        micro_batches = _step_batches(step, dp)
        step_losses = []
        for batch in micro_batches:
            x: Any = batch
            for layer in layers:
                x = layer(x)
            loss, _ = loss_fn(x, batch)
            (loss / len(micro_batches)).backward()
            step_losses.append(loss.detach())
        losses.append(torch.stack(step_losses).mean())
        norms.append(torch.nn.utils.clip_grad_norm_([p for _, p in named], config.gradient_clipping))
        for slot, group in zip(slots, adam.param_groups, strict=True):
            group["lr"] = learning_rate_at(step, slot.group.learning_rate_schedule)
        adam.step()
    return {"losses": torch.stack(losses), "norms": torch.stack(norms), "weights": {n: p.detach() for n, p in named}}


def _parallel(layout: dict[str, Any], steps: int, zero: bool) -> dict[str, Any]:
    topo = Topology(TopologyConfig(**layout, gradient_accumulation_steps=N_MICRO))
    config = OptimizerConfig.from_dict({**OPTIMIZER, "zero": zero})
    module = ParallelModule(model_specs(topo, N_BLOCKS, 0.0), topo, Loss(topo), sharding=config.sharding)
    optimizer = Optimizer.for_module(module, config)
    losses, norms, clipped = [], [], []
    for step in range(steps):
        mine = _step_batches(step, topo.dp_size)[topo.dp_rank * N_MICRO : (topo.dp_rank + 1) * N_MICRO]
        losses.append(module.train_step(mine, step=step).loss)
        result = optimizer.step(step)
        norms.append(result.grad_norm)
        clipped.append(result.grad_norm_clipped)
    weights = {
        n: (gathered(p.detach()).clone(), module.param_table[n].tp_split_dim)
        for n, p in module.named_parameters_canonical()
    }
    state_bytes = sum(
        t.numel() * t.element_size()
        for slot in optimizer.shard_state_dict()["slots"]
        for t in (slot["master"], slot["exp_avg"], slot["exp_avg_sq"])
    )
    return {
        "coord": (topo.pp_rank, topo.dp_rank, topo.tp_rank),
        "losses": torch.stack(losses),
        "norms": torch.stack(norms),
        "clipped": torch.stack(clipped),
        "weights": weights,
        "state_bytes": state_bytes,
    }


def _full_weights(results: list[dict[str, Any]], tp: int) -> dict[str, torch.Tensor]:
    by_name: dict[str, dict[int, tuple[torch.Tensor, int | None]]] = {}
    for r in results:
        _pp, dp, tp_rank = r["coord"]
        for name, value in r["weights"].items():
            if dp == 0:
                by_name.setdefault(name, {})[tp_rank] = value
    full = {}
    for name, shards in by_name.items():
        split = shards[0][1]
        full[name] = shards[0][0] if split is None else unshard([shards[t][0] for t in range(tp)], split)
    return full


LAYOUTS = [
    ({"data_parallel_size": 2}, True),
    ({"data_parallel_size": 4}, True),
    ({"model_parallel_size": 2, "data_parallel_size": 2}, True),
    ({"pipe_parallel_size": 2, "data_parallel_size": 2}, True),
    ({"model_parallel_size": 2, "pipe_parallel_size": 2, "data_parallel_size": 2}, True),
    ({"data_parallel_size": 2}, False),
]


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("layout", "zero"), LAYOUTS, ids=lambda v: str(v))
@pytest.mark.parametrize("steps", [1, 10])
def test_training_matches_torch_adamw(layout: dict[str, Any], zero: bool, steps: int) -> None:
    tp, dp = layout.get("model_parallel_size", 1), layout.get("data_parallel_size", 1)
    world = tp * layout.get("pipe_parallel_size", 1) * dp
    results = run_distributed(_parallel, world, layout, steps, zero, timeout_s=200)
    expected = run_distributed(_reference, 1, steps, dp, timeout_s=100)[0]
    for r in results:
        torch.testing.assert_close(r["losses"], expected["losses"], **TOL, msg=f"losses on {r['coord']}")
        torch.testing.assert_close(r["norms"], expected["norms"], **TOL, msg=f"grad norms on {r['coord']}")
        after = expected["norms"].clamp(max=OPTIMIZER["gradient_clipping"])  # the reported norm after clipping
        torch.testing.assert_close(r["clipped"], after, rtol=1e-5, atol=1e-5, msg=f"clipped norms on {r['coord']}")
    full = _full_weights(results, tp)
    reference = expected["weights"]
    assert set(full) == set(reference), set(full) ^ set(reference)
    for name, weight in full.items():
        torch.testing.assert_close(weight, reference[name], **TOL, msg=f"weight {name}")
    if zero and dp > 1 and tp == 1 and layout.get("pipe_parallel_size", 1) == 1:
        sizes = [r["state_bytes"] for r in results]
        assert max(sizes) - min(sizes) <= 3 * 4 * dp * len(OPTIMIZER["training_groups"]) * 2  # balanced up to padding
