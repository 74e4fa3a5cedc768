"""The optimizer is a ``torch.optim.Optimizer`` over named parameters: it trains a plain module in a plain
loop (no engine, no process group) exactly like ``torch.optim.AdamW`` with ``clip_grad_norm_``, with its
parameter groups chosen by name pattern, and keeps fp32 masters for bf16 parameters."""

from __future__ import annotations

import torch
from torch import nn

from scaling.core.optimizer.config import OptimizerConfig
from scaling.core.optimizer.lr_schedule import learning_rate_at
from scaling.core.optimizer.optimizer import Optimizer

CONFIG = {
    "gradient_clipping": 0.3,
    "training_groups": [
        {"name": "first", "parameters": ["0.*"], "weight_decay": 0.1,
         "learning_rate_schedule": {"learning_rate": 1e-2, "learning_rate_warmup_steps": 2}},
        {"name": "rest", "parameters": ["*"], "learning_rate_schedule": {"learning_rate": 3e-3}},
    ],
}  # fmt: skip


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def test_a_plain_module_trains_like_torch_adamw() -> None:
    config = OptimizerConfig.from_dict(CONFIG)
    ours, reference = _model(), _model()
    optimizer = Optimizer(ours.named_parameters(), config)
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert [g["names"] for g in optimizer.param_groups] == [["0.weight"], ["0.bias"], ["2.weight", "2.bias"]]
    groups = [
        {"params": [reference[0].weight], "weight_decay": 0.1},
        {"params": [reference[0].bias], "weight_decay": 0.0},  # biases get no decay by default
        {"params": [reference[2].weight, reference[2].bias], "weight_decay": 0.0},
    ]
    adam = torch.optim.AdamW(groups, betas=(config.beta1, config.beta2), eps=config.eps)
    schedules = [config.training_groups[i].learning_rate_schedule for i in (0, 0, 1)]
    torch.manual_seed(1)
    for step in range(8):
        x, y = torch.randn(5, 6), torch.randn(5, 3)
        optimizer.zero_grad()
        nn.functional.mse_loss(ours(x), y).backward()
        result = optimizer.step()  # the step counter advances by itself in a plain loop
        adam.zero_grad()
        nn.functional.mse_loss(reference(x), y).backward()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), config.gradient_clipping)
        for group, schedule in zip(adam.param_groups, schedules, strict=True):
            group["lr"] = learning_rate_at(step, schedule)
        adam.step()
        torch.testing.assert_close(result.grad_norm, norm, rtol=1e-6, atol=1e-7)
    for (name, p), q in zip(ours.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def test_bf16_parameters_update_through_fp32_masters() -> None:
    layer = nn.Linear(4, 4, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    config = OptimizerConfig.from_dict(
        {"gradient_clipping": 0, "training_groups": [{"learning_rate_schedule": {"learning_rate": 1e-4}}]}
    )
    optimizer = Optimizer(layer.named_parameters(), config)
    for _ in range(30):
        layer.weight.grad = torch.ones_like(layer.weight)
        optimizer.step()
    master = optimizer.parameter_state("weight")["master"]
    assert master.dtype == torch.float32
    # Thirty updates of ~1e-4 each: the master holds them, and the bf16 weight shows their sum.
    torch.testing.assert_close(master, torch.full((4, 4), 1 - 30e-4), rtol=0, atol=2e-5)
    assert torch.equal(layer.weight, master.to(torch.bfloat16))
