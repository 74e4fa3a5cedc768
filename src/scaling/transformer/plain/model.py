"""``ShardedTransformer``: a sharded decoder for a plain PyTorch loop, with nothing magic besides the model.

Built on the engine's own pieces: this rank's tensor-parallel slices of the layers, FSDP2 over the
data-parallel ranks (``fully_shard`` for ZeRO 1-3; at stage 0 ``DistributedDataParallel`` in fp32 and FSDP2's
``replicate`` in bf16/fp16, which keeps fp32 masters as the parameters), meta-device construction
materialised layer by layer from the seeded init recipe, and the layout-independent checkpoint format.
So ``model.parameters()`` are the fp32 sharded masters and any ``torch.optim`` optimizer over them is
ZeRO-sharded with no wrapper, ``loss.backward()`` reduces gradients inside backward (nobody has to call
anything between backward and ``optimizer.step()``), and ``model.save`` writes what ``scaling generate``,
``scaling train`` and ``pretrained=`` read.

Fault tolerance in the plain loop: ``model.save(..., asynchronous=True)`` takes host copies in the step and
writes and publishes the checkpoint in the background (the trainer's
:class:`~scaling.core.checkpoint.async_save.AsyncCheckpointer`: at most one in flight, the next save or
:meth:`ShardedTransformer.wait_for_save` waits for it; a synchronous save, the last one, waits too), and
``hang_timeout_s=`` (or ``SCALING_HANG_TIMEOUT_S``) starts the hang watchdog that the model's forward,
backward and every optimizer step beat (:mod:`scaling.transformer.plain.watch`).

The loss is the token mean over the whole data-parallel batch, as one process would compute it on the
concatenated batch: each rank divides its token-loss sum by the global token count (so ranks with more
loss tokens weigh more), and the value returned is the global mean on every rank.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from scaling.core.checkpoint import load_checkpoint, save_checkpoint
from scaling.core.checkpoint.async_save import AsyncCheckpointer
from scaling.core.checkpoint.io import CheckpointInfo
from scaling.core.nn.comm import gather_from_tp
from scaling.core.nn.precision import Precision, PrecisionConfig
from scaling.core.pipeline.module import ParallelModule
from scaling.core.topology import Topology
from scaling.core.zero.policy import Offload, ShardingPolicy
from scaling.transformer.data.tokenizer import Tokenizer
from scaling.transformer.flops import FlopsPerToken, flops_per_token
from scaling.transformer.model.config import TransformerArchitectureConfig, check_against_tensor_parallel
from scaling.transformer.model.layers import LanguageModelLoss, loss_tokens, transformer_layer_specs
from scaling.transformer.plain.batches import normalise_batch
from scaling.transformer.plain.optimizer_state import TorchOptimizerState
from scaling.transformer.plain.watch import PlainLoopWatch, hang_timeout
from scaling.transformer.plain_world import plain_topology

__all__ = ["PRECISIONS", "ShardedTransformer"]

PRECISIONS = {
    "bf16": Precision.BFLOAT16,
    "bfloat16": Precision.BFLOAT16,
    "fp16": Precision.FLOAT16,
    "float16": Precision.FLOAT16,
    "fp32": Precision.FLOAT32,
    "float32": Precision.FLOAT32,
}


def _precision(value: str) -> Precision:
    if value not in PRECISIONS:
        raise ValueError(f"precision={value!r}: expected one of {', '.join(PRECISIONS)}")
    return PRECISIONS[value]


class ShardedTransformer(nn.Module):
    """The decoder of ``architecture``, sharded over this process's world, for a plain training loop.

    Args:
        architecture: the model's shape (see ``scaling.transformer.presets`` for the named ones).
        zero_stage: 0 (replicated), 1 or 2 (sharded optimizer state and gradients), 3 (also parameters).
            In a plain loop gradients are reduced after every backward unless inside :meth:`no_sync`, so
            stage 1 differs from 2 only in the memory an accumulation inside ``no_sync`` holds.
        precision: compute dtype, "bf16", "fp16" (use ``scaling.training.Scaler``) or "fp32"; the
            parameters the optimizer sees are fp32 masters in every case.
        tp: tensor-parallel ranks per replica; data parallel is the rest of the launched world.
        offload: keep shards, gradients and optimizer state in CPU memory (FSDP2's CPU offload).
        activation_checkpointing: recompute each layer's activations in backward.
        seed: the init recipe's seed: the same seed gives the same weights on every layout.
        tokenizer: saved with the checkpoints (a ``Tokenizer`` or a tokenizer.json path; default the
            byte-level tokenizer ``scaling.loaders`` uses by default).
        device: "auto" (the topology's choice: the local GPU when launched with CUDA, else CPU), "cpu",
            "cuda", or "meta" (shapes only, no memory, no process group: counting parameters of a 70B).
        hang_timeout_s: when no rank progresses for this many seconds, every rank dumps its stacks and
            last collectives to ``hang_dir`` and the job exits naming the rank(s) that did not arrive;
            default ``SCALING_HANG_TIMEOUT_S``, else no watchdog.
        hang_dir: where the hang dumps go (``rank_N.txt``).
    """

    def __init__(
        self,
        architecture: TransformerArchitectureConfig,
        *,
        zero_stage: int = 3,
        precision: str = "bf16",
        tp: int = 1,
        offload: bool = False,
        activation_checkpointing: bool = False,
        seed: int = 0,
        tokenizer: Tokenizer | str | Path | None = None,
        device: str = "auto",
        hang_timeout_s: float | None = None,
        hang_dir: str | Path = "hang",
    ) -> None:
        super().__init__()
        timeout = hang_timeout(hang_timeout_s)  # bad input fails before any process group is touched
        self._watch: PlainLoopWatch | None = None
        self._saver: AsyncCheckpointer | None = None  # created by the first asynchronous save (collective)
        self.architecture = architecture
        self.precision = _precision(precision)
        self.zero_stage = zero_stage
        self.seed = seed
        self._tokenizer = tokenizer
        self._forward_calls = 0
        # Stage 0: DistributedDataParallel's in-place buckets in fp32 (the fastest replicated reduction);
        # FSDP2's replicate in bf16/fp16, where the fp32 masters must be the parameters the optimizer sees.
        ddp = zero_stage == 0 and self.precision == Precision.FLOAT32 and not offload
        self.sharding = ShardingPolicy(
            stage=zero_stage,
            offload=Offload.CPU if offload else Offload.NONE,
            replicate=zero_stage == 0 and not ddp,
            reduced_by_caller=ddp,
        )
        if device == "meta":
            self.topology = Topology.single(device="meta")
            check_against_tensor_parallel(architecture, tp)
            with torch.device("meta"):
                layers = [spec.build() for spec in transformer_layer_specs(architecture, self.topology, seed=seed)]
            self.transformer: nn.Module = nn.Module()
            self.transformer.layers = nn.ModuleDict({str(i): layer for i, layer in enumerate(layers)})
            self._engine: ParallelModule | None = None
            return
        self.topology = plain_topology(tp, activation_checkpointing=activation_checkpointing, device=device)
        check_against_tensor_parallel(architecture, tp)
        engine = ParallelModule(
            transformer_layer_specs(architecture, self.topology, seed=seed),
            self.topology,
            LanguageModelLoss(self.topology),
            seed=seed,
            precision=PrecisionConfig(precision=self.precision),
            weight_fn=loss_tokens,
            sharding=self.sharding,
            meta_init=self.sharding.uses_fsdp,
        )
        if any(record.partial_grad_over_tp for record in engine.param_table.values()):
            raise ValueError("sequence parallelism is not supported in a plain loop; use `scaling train`")
        self.transformer = engine
        self._engine = engine
        self._ddp: DistributedDataParallel | None = None
        if ddp and self.topology.dp_size > 1:
            # Not a registered submodule: the parameters are the engine's, listed once, under its names.
            wrapped = DistributedDataParallel(
                engine, process_group=self.topology.dp_group, gradient_as_bucket_view=True, broadcast_buffers=False
            )
            object.__setattr__(self, "_ddp", wrapped)
        if timeout is not None:
            self._watch = PlainLoopWatch.for_process(timeout, Path(hang_dir), self.topology)

    # The loop ---------------------------------------------------------------------------------------------
    @property
    def engine(self) -> ParallelModule:
        if self._engine is None:
            raise RuntimeError("a model built with device='meta' has shapes only; it cannot run or save")
        return self._engine

    @property
    def device(self) -> torch.device:
        return self.topology.device

    @property
    def flops_per_token(self) -> FlopsPerToken:
        """FLOPs per trained token at the architecture's sequence length, for MFU in a loop of your own:
        ``f.model`` (forward + backward); with activation checkpointing the hardware count is
        ``f.hardware(recomputed_layers(f, "every_layer"))`` (:mod:`scaling.transformer.flops`, docs/metrics.md)."""
        return flops_per_token(self.architecture)

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The loss (a scalar) when ``batch`` has targets (``targets`` or Hugging Face ``labels``), else the
        logits ``[b, s, vocab]`` (gathered over tensor-parallel ranks)."""
        engine = self.engine
        inputs = normalise_batch(batch, self.device)
        step = self._forward_calls
        self._forward_calls += 1
        run = self._ddp if self._ddp is not None else engine
        if self._watch is not None:
            self._watch.forward(step)
        logits = run(inputs, chunk=0, micro=0, step=step)
        if "targets" not in inputs:
            return gather_from_tp(logits, self.topology.tp_group) if self.topology.tp_size > 1 else logits
        mean, metrics = engine.loss_fn(logits, inputs)
        loss = self._global_token_mean(mean * metrics["loss_tokens"], metrics["loss_tokens"])
        if self._watch is not None:
            self._watch.backward_of(loss)
        return loss

    def _global_token_mean(self, local_sum: torch.Tensor, local_tokens: torch.Tensor) -> torch.Tensor:
        """A loss whose value is the token mean over every data-parallel rank's batch and whose gradient,
        averaged over those ranks by FSDP2, is that mean's gradient: each rank's share of the global sum,
        times the number of ranks the average divides by. (Summing in FSDP2 instead would need a
        pre-multiplied reduction that gloo lacks.)"""
        dp, group = self.topology.dp_size, self.topology.dp_group
        tokens = local_tokens.detach().float().clone()
        if dp > 1:
            dist.all_reduce(tokens, group=group)
        share = local_sum / tokens.clamp(min=1)
        total = share.detach().clone()
        if dp > 1:
            dist.all_reduce(total, group=group)
        scaled = share * dp
        return scaled + (total - scaled).detach()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally; the first backward after the block reduces all of them at once."""
        engine = self.engine
        if self._ddp is not None:
            with self._ddp.no_sync():
                yield
            return
        if not isinstance(engine, FSDPModule):  # one data-parallel rank: nothing to defer
            yield
            return
        engine.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            engine.set_requires_gradient_sync(True)

    def named_parameters_by_name(self) -> dict[str, nn.Parameter]:
        """Layout-free name (``layers.{i}.{key}``, as in checkpoints) -> this rank's parameter."""
        return self.engine.named_parameters_by_name()

    def grads_for_norm(self) -> tuple[list[torch.Tensor], dist.ProcessGroup | None]:
        """This rank's gradient parts that the global norm counts (each weight once over the world) and the
        group to sum their squares over: every rank when shards differ over dp, else the tp group."""
        engine = self.engine
        params = engine.named_parameters_by_name()
        grads = []
        for name in engine.names_counted_in_norm():
            grad = engine.grad_sync.grad(name)
            if grad is not None and params[name].requires_grad:
                grads.append(grad)
        group = dist.group.WORLD if self.sharding.sharded else self.topology.tp_group
        return grads, group

    # Saving -------------------------------------------------------------------------------------------------
    def _tokenizer_file(self, directory: Path) -> Path:
        tokenizer = self._tokenizer if self._tokenizer is not None else Tokenizer.byte_level()
        if isinstance(tokenizer, (str, Path)):
            return Path(tokenizer)
        path = directory / "tokenizer.json"
        tokenizer.tokenizer.save(str(path))
        return path

    def _optimizer_state(self, optimizer: torch.optim.Optimizer | None) -> TorchOptimizerState | None:
        if optimizer is None:
            return None
        return TorchOptimizerState(optimizer, self.engine.named_parameters_by_name(), self.zero_stage)

    def save(
        self,
        directory: str | Path,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        loader: Any | None = None,
        scaler: Any | None = None,
        step: int | None = None,
        asynchronous: bool = False,
    ) -> Path:
        """Write ``directory/global_step{step}`` (collective: every rank calls it), one layer gathered at a
        time; with ``optimizer`` (Adam/AdamW), ``loader`` and ``scaler`` (``scaling.training.Scaler``) state
        when given, so the loop resumes exactly with :meth:`load`. ``step`` defaults to the optimizer's step
        count (0 without). Returns the checkpoint directory. Never overwrites a saved checkpoint.

        ``asynchronous``: return once this rank's shards are copied to host memory; the files are written
        and the checkpoint published in the background while training goes on (the returned directory
        exists once published: :meth:`wait_for_save`). Every save first waits for the one in flight, so at
        most one is; make the last save of a run synchronous (or call :meth:`wait_for_save`) so the process
        does not end while one is written. A background failure is raised by the next save or wait."""
        engine = self.engine
        state = self._optimizer_state(optimizer)
        if step is None:
            step = max(state.steps_taken().values(), default=0) if state is not None else 0
        config = {
            "architecture": self.architecture.to_dict(),
            "precision": PrecisionConfig(precision=self.precision).to_dict(),
            "finetuning": None,
        }
        run_state = {
            **({"loader": loader.state_dict()} if loader is not None else {}),
            **({"scaler": scaler.state_dict()} if scaler is not None else {}),
        }
        watching = self._watch.saving() if self._watch is not None else contextlib.nullcontext()
        with watching, tempfile.TemporaryDirectory(prefix="scaling-save-") as scratch:
            files = {"tokenizer.json": self._tokenizer_file(Path(scratch))}  # read before the save returns
            if asynchronous and self._saver is None:
                self._saver = AsyncCheckpointer()  # collective: the writer's own gloo group
            if self._saver is None:
                return save_checkpoint(directory, step, engine, state, config=config, run_state=run_state, files=files)
            published = self._saver.save(
                directory, step, engine, state, background=asynchronous, config=config, run_state=run_state,
                files=files,
            )  # fmt: skip
            return published if published is not None else Path(directory) / f"global_step{step}"

    def wait_for_save(self) -> Path | None:
        """Block until the asynchronous save in flight (if any) is published; re-raise its failure. Returns
        the newest checkpoint saved through it (None when there was no asynchronous save)."""
        return self._saver.wait() if self._saver is not None else None

    def stop_hang_watchdog(self) -> None:
        """Stop the hang watchdog of this process (before a stretch in which ranks wait on each other longer
        than the timeout without training, e.g. rank 0 alone evaluating); nothing without one."""
        if self._watch is not None:
            self._watch.stop()

    def load(
        self,
        path: str | Path,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        loader: Any | None = None,
        scaler: Any | None = None,
    ) -> CheckpointInfo:
        """Load weights (any layout and stage saved them), and the optimizer, loader and scaler state when
        given; a state asked for that the checkpoint lacks is an error, not a silent fresh start."""
        engine = self.engine
        self.wait_for_save()  # loading what is still being written would find it incomplete
        state = self._optimizer_state(optimizer)
        info = load_checkpoint(path, engine, state)
        for key, target in (("loader", loader), ("scaler", scaler)):
            if target is not None:
                saved = info.run_state.get(key)
                if saved is None:
                    raise ValueError(f"{info.path} has no {key} state (saved without {key}=)")
                target.load_state_dict(saved)
        return info

    def _staging(self, beside: Path, purpose: str) -> Path:
        """A directory every rank agrees on (rank 0 names it), next to ``beside`` so it is on the same
        (shared) file system as the result."""
        name = [f".{beside.name}.{purpose}-{os.getpid()}"]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(name, src=0)
        return beside.parent / name[0]

    def _on_rank_zero(self, action: Callable[[], Any]) -> Any:
        """``action()`` on global rank 0; its result, or its error, on every rank (no rank waits forever on a
        rank that failed, and no rank reports success for a failed export)."""
        outcome: list[Any] = [None, None]
        if self.topology.global_rank == 0:
            try:
                outcome = [action(), None]
            except Exception as exc:  # re-raised on every rank below
                outcome = [None, exc]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(outcome, src=0)
        if outcome[1] is not None:
            raise outcome[1]
        return outcome[0]

    def save_huggingface_model(self, directory: str | Path, *, dtype: str | None = None) -> Path:
        """A Hugging Face ``LlamaForCausalLM`` folder (config, safetensors, tokenizer) that
        ``transformers.AutoModelForCausalLM.from_pretrained`` loads. Collective; written through a
        ``scaling`` checkpoint (one layer gathered at a time) that is removed afterwards. ``directory`` must
        be absent or empty: nothing already there is touched."""
        out = Path(directory)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise FileExistsError(f"{out} exists and is not an empty directory; refusing to overwrite it")
        staging = self._staging(out, "checkpoint")
        try:
            checkpoint = self.save(staging)

            def export() -> Path:
                from scaling.transformer.convert.to_hf import save_huggingface

                return save_huggingface(checkpoint, out, dtype=dtype)

            result: Path = self._on_rank_zero(export)
        finally:
            if self.topology.global_rank == 0:
                shutil.rmtree(staging, ignore_errors=True)
        return result

    save_huggingface = save_huggingface_model

    def push_to_hub(
        self, repo_id: str, *, private: bool = True, token: str | None = None, staging_dir: str | Path | None = None
    ) -> str:
        """Export as :meth:`save_huggingface_model` does and upload to the Hugging Face Hub (``huggingface_hub``
        needed; the token from ``token``, ``HF_TOKEN`` or the stored login). Returns the commit URL.

        The export is staged in ``staging_dir`` (default: the system's temporary directory; with several
        nodes it must be a shared file system, like any checkpoint directory) and removed afterwards."""
        from scaling.transformer.convert.hub import push_to_hub

        if importlib.util.find_spec("huggingface_hub") is None:  # before gathering anything
            raise ImportError("push_to_hub needs the huggingface_hub package: pip install huggingface_hub")
        base = Path(staging_dir) if staging_dir is not None else Path(tempfile.gettempdir())
        folder = self._staging(base / "scaling-hub-export", "hub")
        try:
            self.save_huggingface_model(folder)
            url: str = self._on_rank_zero(lambda: push_to_hub(folder, repo_id, token=token, private=private))
        finally:
            if self.topology.global_rank == 0:
                shutil.rmtree(folder, ignore_errors=True)
        return url

    def extra_repr(self) -> str:
        t = self.topology
        return f"zero_stage={self.zero_stage}, precision={self.precision.value}, tp={t.tp_size}, dp={t.dp_size}"
