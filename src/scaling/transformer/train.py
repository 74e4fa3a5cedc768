"""``scaling train CONFIG [-o key.path=value ...]`` / ``python -m scaling.transformer.train``.

Started by hand it launches the config's topology (locally through torchrun, or by the configured
runner); started as a rank it builds the model, optimizer, data and trainer, and trains.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from scaling.core.checkpoint import CheckpointError, find_checkpoint
from scaling.core.config import ConfigError
from scaling.core.data import BlendedDataset, DistributedDataLoader, MemoryMapDataset, weights_by_size
from scaling.core.logging import MetricsLogger, configure_logging
from scaling.core.optimizer.optimizer import Optimizer
from scaling.core.pipeline.module import ParallelModule
from scaling.core.planner.table import budget_block
from scaling.core.runner import launch
from scaling.core.runner.restarts import add_restarts_argument, restart_overrides
from scaling.core.runner.worker import BAD_INPUT_ERRORS, one_line, run_as_worker
from scaling.core.topology import RngTracker, Topology, init_distributed, shutdown_distributed
from scaling.core.trainer import Trainer, TrainingContext
from scaling.core.trainer.nonfinite import TrainingDiverged
from scaling.transformer.config import TransformerConfig
from scaling.transformer.data.checks import (
    check_data_tokenizer,
    check_data_vocabulary,
    check_tokenizer_fits,
    check_tokenizers_agree,
)
from scaling.transformer.data.datasets import FinetuningDataset, PretrainingDataset
from scaling.transformer.data.tokenizer import Tokenizer
from scaling.transformer.finetuning.apply import finetuning_adapter
from scaling.transformer.flops import token_flops
from scaling.transformer.model.layers import LanguageModelLoss, loss_tokens, transformer_layer_specs
from scaling.transformer.planning.command import config_plan, training_device
from scaling.transformer.preflight import check_before_launch

__all__ = ["main", "train"]


class _Subset:
    """A contiguous slice of a dataset (train / validation split without copying)."""

    def __init__(self, dataset: PretrainingDataset | FinetuningDataset | BlendedDataset, start: int, stop: int):
        self.dataset, self.start, self.stop = dataset, start, stop

    @property
    def source(self) -> str:
        """The data files, for messages (the loader names them when a batch does not fit)."""
        return str(getattr(self.dataset, "source", None) or type(self.dataset).__name__)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> object:
        return self.dataset[self.start + index]

    def collate(self, items: Sequence[object]) -> object:
        return self.dataset.collate(items)  # type: ignore[arg-type]


def _checkpoint_tokenizer(config: TransformerConfig) -> Path | None:
    """The ``tokenizer.json`` of the checkpoint this run loads, if it loads one that carries it."""
    load_dir = config.trainer.load_dir
    if load_dir is None or not load_dir.exists():
        return None
    try:
        path = find_checkpoint(load_dir) / "tokenizer.json"
    except CheckpointError:
        return None  # what is wrong with the checkpoint is reported by loading it
    return path if path.is_file() else None


def _datasets(config: TransformerConfig) -> tuple[_Subset, _Subset]:
    """Open the data (every check that the data, model and tokenizer fit is made here, cheaply, before launch).

    Raises ``DataFileError`` naming the file for data that cannot be read, ``ConfigError`` for data that does
    not fit the model, the tokenizer or the batch size.
    """
    data, arch, topology = config.data, config.architecture, config.topology
    tokenizer = Tokenizer.from_file(data.tokenizer) if data.tokenizer is not None else None
    saved_tokenizer = _checkpoint_tokenizer(config)
    if tokenizer is not None and saved_tokenizer is not None:
        check_tokenizers_agree(tokenizer, saved_tokenizer)
    reference: tuple[Tokenizer, str] | None = None  # what the data's recorded tokenizer must be
    if tokenizer is not None:
        reference = (tokenizer, "data.tokenizer")
    elif saved_tokenizer is not None:
        reference = (Tokenizer.from_file(saved_tokenizer), "the tokenizer of the checkpoint being loaded")
    full: PretrainingDataset | FinetuningDataset | BlendedDataset
    if data.finetuning_jsonl is not None:
        assert tokenizer is not None
        check_tokenizer_fits(tokenizer, arch.vocab_size)
        multiple = math.lcm(8, topology.model_parallel_size) if topology.sequence_parallel else 8
        full = FinetuningDataset(data.finetuning_jsonl, tokenizer, arch.sequence_length, pad_multiple=multiple)
    else:
        parts = []
        for prefix in data.prefixes:
            tokens = MemoryMapDataset(prefix)
            check_data_vocabulary(tokens, arch.vocab_size)
            if reference is not None:
                check_data_tokenizer(tokens, *reference)
            parts.append(PretrainingDataset(tokens, arch.sequence_length, arch.document_masking))
        if len(parts) == 1:
            full = parts[0]
        else:
            weights = data.weights or weights_by_size([len(p) for p in parts], alpha=1.0)
            full = BlendedDataset(parts, weights, sum(len(p) for p in parts), data.blend_cache_dir)
    held_out = max(int(len(full) * data.validation_fraction), topology.global_batch)
    if len(full) - held_out < topology.global_batch:
        source = data.finetuning_jsonl or ", ".join(str(p) for p in data.prefixes)
        raise ConfigError(
            f"data: {source} gives {len(full)} samples of {arch.sequence_length} tokens, too few for one training "
            f"and one validation global batch ({topology.global_batch} each = micro batch "
            f"{topology.micro_batch} x {topology.micro_batches} micro-batches x {topology.data_parallel_size} "
            "data parallel); prepare more data or lower the batch size"
        )
    return _Subset(full, 0, len(full) - held_out), _Subset(full, len(full) - held_out, len(full))


def build_module(config: TransformerConfig, topology: Topology, rng: RngTracker | None = None) -> ParallelModule:
    adapt = finetuning_adapter(config.finetuning, topology) if config.finetuning is not None else None
    return ParallelModule(
        transformer_layer_specs(config.architecture, topology, seed=config.trainer.seed),
        topology,
        LanguageModelLoss(topology),
        seed=config.trainer.seed,
        rng_tracker=rng,
        precision=config.precision,
        adapt=adapt,
        weight_fn=loss_tokens,
        sharding=config.optimizer.sharding,
        # Sharded stages build on the meta device and materialise layer by layer: the same weights, and
        # no rank ever holds the whole model.
        meta_init=config.optimizer.zero_stage > 0,
    )


def train(config: TransformerConfig) -> Trainer:
    topology = init_distributed(config.topology)
    coord = (topology.pp_rank, topology.dp_rank, topology.tp_rank)
    logger = configure_logging(config.logger, topology.global_rank, coord)
    if topology.global_rank == 0:  # the layout's budget, as `scaling plan` and `--plan-only` print it
        logger.info("%s", _budget(config))
    rng = RngTracker(config.trainer.seed, topology.coord, topology.device)
    module = build_module(config, topology, rng)
    optimizer = Optimizer.for_module(module, config.optimizer)
    train_set, validation_set = _datasets(config)
    train_data = DistributedDataLoader(
        train_set, topology, seed=config.trainer.seed, num_workers=config.data.num_workers
    )
    validation = DistributedDataLoader(validation_set, topology, shuffle=False)
    parameters = sum(p.numel() for p in module.parameters())
    # The whole model's size is in the trainer's start-up block; this rank's share only for debugging.
    logger.debug("this rank holds %.2fM parameters (%s)", parameters / 1e6, module.extra_repr())
    is_metrics_rank = topology.is_last_pipe_stage and topology.dp_rank == 0 and topology.tp_rank == 0
    metrics_logger = MetricsLogger(config.logger, enabled=is_metrics_rank, run_config=config.to_dict())
    if is_metrics_rank and config.logger.log_dir is not None:  # `scaling report` shows a run's parameters from it
        _write_run_config(Path(config.logger.log_dir), config)
    with train_data, validation, metrics_logger as metrics:  # the loaders' reader processes end with the run
        files = {"tokenizer.json": config.data.tokenizer} if config.data.tokenizer is not None else {}
        trainer = Trainer(
            config.trainer,
            TrainingContext(config, topology),
            module,
            optimizer,
            train_data,
            validation,
            metrics,
            rng,
            checkpoint_files=files,
            # Adapters skip the frozen weights' gradients: the 3 x forward count would overstate their MFU.
            flops=token_flops(config.architecture, config.topology.activation_checkpointing_type)
            if config.finetuning is None
            else None,
        )
        trainer.run()
    return trainer


def _write_run_config(log_dir: Path, config: TransformerConfig) -> None:
    """The resolved config beside ``metrics.jsonl`` as ``config.json`` (the latest attempt's, written
    atomically), so the metrics say what produced them."""
    import json

    log_dir.mkdir(parents=True, exist_ok=True)
    partial = log_dir / "config.json.partial"
    partial.write_text(json.dumps(config.to_dict(), indent=1, sort_keys=True, default=str) + "\n")
    partial.replace(log_dir / "config.json")


def _budget(config: TransformerConfig) -> str:
    """The plan of this config's layout on the device ``trainer.mfu_device`` names (see ``scaling plan``)."""
    device = training_device(config.trainer.mfu_device)
    return budget_block(config_plan(config, device), device.name)


def _train_this_rank(config: TransformerConfig) -> int:
    """One rank's whole run; after a graceful stop (SIGTERM, SIGINT) rank 0 says so in one line."""
    trainer = train(config)
    stopped = trainer.context.step < config.trainer.train_iterations
    if stopped and trainer.context.topology.global_rank == 0:
        cause = signal.Signals(trainer.stop_signal).name if trainer.stop_signal else "a signal to another rank"
        save_dir = config.trainer.save_dir
        saved = f"checkpoint saved to {save_dir}" if save_dir is not None else "no checkpoint (trainer.save_dir unset)"
        print(f"stopped at step {trainer.context.step} on {cause}; {saved}", file=sys.stderr, flush=True)
    shutdown_distributed()
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "scaling train") -> int:
    """Train; returns the exit code: 0 (done, or stopped gracefully), 2 (bad input), 1 (anything else).

    Started by hand, everything that can be checked before the ranks start is checked here
    (``check_before_launch``), then the ranks are launched. Started as a rank, errors are reported to the
    launcher (``run_as_worker``), which prints the first one once.
    """
    parser = argparse.ArgumentParser(prog=prog, description="Train a transformer on the topology in CONFIG.")
    parser.add_argument("config", help="YAML config (see `scaling config template --class "
                        "scaling.transformer.config:TransformerConfig`).")  # fmt: skip
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument(
        "--plan-only",
        action="store_true",
        help="print the layout's predicted memory, communication and step time (as at start-up) and stop; "
        "the device is trainer.mfu_device's (see `scaling plan` for every layout)",
    )
    add_restarts_argument(parser)
    args = parser.parse_args(argv)
    args.override += restart_overrides(args)  # --max-restarts N is -o runner.max_restarts=N
    if "RANK" in os.environ:  # a rank of a launched world
        rank = int(os.environ["RANK"])
        return run_as_worker(
            lambda: _train_this_rank(TransformerConfig.from_yaml(args.config, args.override)),
            prog,
            rank,
            one_line_errors=(TrainingDiverged,),
        )
    try:
        config = TransformerConfig.from_yaml(args.config, args.override)
        if args.plan_only:  # the plan needs no data, checkpoints or processes
            print(_budget(config))
            return 0
        check_before_launch(config)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except BAD_INPUT_ERRORS as exc:
        print(f"{prog}: {one_line(exc)}", file=sys.stderr)
        return 2
    if config.topology.n_ranks > 1 or config.runner.max_restarts > 0:  # torchrun restarts even one rank
        script_args = [args.config, *[a for o in args.override for a in ("-o", o)]]
        runner = config.runner.model_copy(
            update={"script": "scaling.transformer.train", "module": True, "script_args": script_args}
        )
        try:
            return launch(runner, config.topology.n_ranks, log_dir=config.logger.log_dir)
        except ConfigError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 2
    return run_as_worker(partial(_train_this_rank, config), prog, 0, one_line_errors=(TrainingDiverged,))


if __name__ == "__main__":
    raise SystemExit(main(prog="python -m scaling.transformer.train"))
