"""One rank's program: build topology, model, optimizer, data and trainer from the config; train; report."""

from __future__ import annotations

import torch

from examples.mlp_example.config import MLPConfig
from examples.mlp_example.context import MLPContext
from examples.mlp_example.data import Digits
from examples.mlp_example.model import ClassificationLoss, layer_specs, model_input
from scaling.core.data import DistributedDataLoader
from scaling.core.logging import MetricsLogger, configure_logging
from scaling.core.optimizer.optimizer import Optimizer
from scaling.core.pipeline.module import ParallelModule
from scaling.core.topology import RngTracker, init_distributed
from scaling.core.trainer import Trainer


def train(config: MLPConfig) -> dict[str, float]:
    """Train and return {"test_accuracy", "final_loss"} (the same on every rank)."""
    topology = init_distributed(config.topology)
    logger = configure_logging(
        config.logger, topology.global_rank, (topology.pp_rank, topology.dp_rank, topology.tp_rank)
    )
    seed = config.trainer.seed
    rng = RngTracker(seed, topology.coord, topology.device)
    module = ParallelModule(
        layer_specs(config.model, topology),
        topology,
        ClassificationLoss(topology),
        input_fn=model_input,
        seed=seed,
        rng_tracker=rng,
        precision=config.precision,
        sharding=config.optimizer.sharding,
    )
    optimizer = Optimizer.for_module(module, config.optimizer)
    train_data = DistributedDataLoader(Digits("train"), topology, seed=seed)
    test_data = DistributedDataLoader(Digits("test"), topology, shuffle=False)
    context = MLPContext(config, topology)
    is_logger = context.is_reporting_rank
    with MetricsLogger(config.logger, enabled=is_logger, run_config=config.to_dict()) as metrics:
        trainer = Trainer(
            config.trainer,
            context,
            module,
            optimizer,
            train_data,
            eval_data=test_data,
            metrics=metrics,
            rng_tracker=rng,
        )
        trainer.run()
        correct = []
        for _ in range(test_data.steps_per_epoch):  # every test sample that fills a global batch, once
            correct.append(module.eval_step(test_data.next_batches()).metrics.get("accuracy", torch.tensor(0.0)))
        accuracy = torch.stack(correct).mean().reshape(1) if correct else torch.zeros(1)
        if topology.pp_size > 1:  # the accuracy lives on the last stage; report it everywhere
            source = topology.pp_ranks[-1]
            torch.distributed.broadcast(accuracy, src=source, group=topology.pp_group)
        losses = [entry["loss"] for entry in trainer.history if "loss" in entry]
        final_loss = losses[-1] if losses else float("nan")
        if is_logger:
            metrics.log(trainer.context.step, {"test_accuracy": float(accuracy)})
            logger.info(
                "test accuracy %.4f after %d steps (final loss %.4f)", float(accuracy), trainer.context.step, final_loss
            )
    return {"test_accuracy": float(accuracy), "final_loss": final_loss}
