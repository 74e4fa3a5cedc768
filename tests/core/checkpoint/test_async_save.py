"""Asynchronous checkpoints: byte-identical to synchronous ones, at most one in flight, synchronous final
saves in the trainer, and random ``kill -9`` during background saves never loses the latest checkpoint."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from scaling.core.checkpoint import async_save, find_checkpoint, load_checkpoint, save_checkpoint
from scaling.core.checkpoint.async_save import AsyncCheckpointer
from scaling.core.checkpoint.discovery import verify_checkpoint
from scaling.core.checkpoint.files import read_json, read_tensors
from scaling.core.data import DistributedDataLoader
from scaling.core.optimizer.config import OptimizerConfig
from scaling.core.optimizer.optimizer import Optimizer
from scaling.core.pipeline.module import ParallelModule
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig
from scaling.core.trainer import Trainer, TrainerConfig, TrainingContext
from scaling.core.zero import gathered

from ..pipeline.tp_models import Loss, SampleWindows, batches, model_specs

OPTIMIZER = {"training_groups": [{"weight_decay": 0.1, "learning_rate_schedule": {"learning_rate": 1e-2}}]}


def _build(layout: dict[str, Any], zero_stage: int = 0) -> tuple[Topology, ParallelModule, Optimizer]:
    topo = Topology(TopologyConfig(**layout))
    config = OptimizerConfig.from_dict({**OPTIMIZER, "zero_stage": zero_stage})
    module = ParallelModule(model_specs(topo, 2, 0.0), topo, Loss(topo), seed=3, sharding=config.sharding)
    return topo, module, Optimizer.for_module(module, config)


def _train(topo: Topology, module: ParallelModule, optimizer: Optimizer, step: int) -> None:
    n = topo.config.micro_batches
    mine = batches(n * topo.dp_size, seed=200 + step)[topo.dp_rank * n : (topo.dp_rank + 1) * n]
    module.train_step(mine, step=step)
    optimizer.step(step)


def _contents(checkpoint: Path) -> dict[str, Any]:
    """Each file's meaning: tensors and header metadata of a safetensors file (its bytes are not reproducible:
    safetensors orders the metadata by a per-process hash), the manifest without its checksums, other bytes."""
    verify_checkpoint(checkpoint, checksums=True)  # the checksums match the files written
    out: dict[str, Any] = {}
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        name = path.relative_to(checkpoint).as_posix()
        if path.suffix == ".safetensors":
            out[name] = read_tensors(path)
        elif path.name == "manifest.json":
            out[name] = {k: v for k, v in read_json(path).items() if k != "checksums"} | {
                "files": sorted(read_json(path)["checksums"])
            }
        else:
            out[name] = path.read_bytes()
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (dict, list, tuple)):
        keys = a.keys() if isinstance(a, dict) else range(len(a))
        return type(a) is type(b) and len(a) == len(b) and all(_same(a[k], b[k]) for k in keys)
    return bool(a == b)


# Equality with a synchronous save ------------------------------------------------------------------


def _sync_and_async(layout: dict[str, Any], zero_stage: int, sync_dir: str, async_dir: str, extra: str) -> None:
    topo, module, optimizer = _build(layout, zero_stage)
    saver = AsyncCheckpointer()
    for step in range(2):
        _train(topo, module, optimizer, step)
    rank_state = {"torch_rng": torch.get_rng_state()}
    kwargs: dict[str, Any] = {"config": {"x": 1}, "rank_state": rank_state, "run_state": {"d": 2}}
    kwargs["files"] = {"tokenizer.json": extra}
    save_checkpoint(sync_dir, 2, module, optimizer, **kwargs)
    training_done = threading.Event()
    replay = async_save.HostCopies.replay

    def replay_after_training(self: async_save.HostCopies, writes: Any) -> None:
        assert training_done.wait(30)  # the files are written only after the weights moved on
        replay(self, writes)

    async_save.HostCopies.replay = replay_after_training  # type: ignore[method-assign]
    assert saver.save(async_dir, 2, module, optimizer, **kwargs) is None  # returned before it is published
    dist.barrier()
    if topo.global_rank == 0:
        Path(extra).unlink()  # a caller's temporary file, gone before the writer publishes
    assert saver.in_flight == 2 and not (Path(async_dir) / "latest").exists()
    _train(topo, module, optimizer, 2)  # changes parameters and optimizer state in place while in flight
    training_done.set()
    assert saver.wait() == Path(async_dir) / "global_step2"
    async_save.HostCopies.replay = replay  # type: ignore[method-assign]
    dist.barrier()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("layout", "zero_stage"),
    [({"data_parallel_size": 2}, 3), ({"model_parallel_size": 2}, 0)],
    ids=["dp2-zero3", "tp2"],
)
def test_an_async_checkpoint_equals_a_synchronous_one(tmp_path: Path, layout: dict[str, Any], zero_stage: int) -> None:
    sync_dir, async_dir = tmp_path / "sync", tmp_path / "async"
    extra = tmp_path / "tokenizer.json"
    extra.write_text('{"vocab": {}}')
    run_distributed(_sync_and_async, 2, layout, zero_stage, str(sync_dir), str(async_dir), str(extra), timeout_s=90)
    expected, actual = _contents(sync_dir / "global_step2"), _contents(async_dir / "global_step2")
    assert sorted(actual) == sorted(expected)
    assert any(name.startswith("optimizer/") for name in actual) and "rank_state/rank00001.safetensors" in actual
    assert actual["tokenizer.json"] == b'{"vocab": {}}'
    assert [name for name in expected if not _same(expected[name], actual[name])] == []
    assert (async_dir / "latest").read_text() == "global_step2"


# At most one in flight; a synchronous save waits ---------------------------------------------------


def _one_in_flight(save_dir: str) -> list[str]:
    topo, module, optimizer = _build({})
    saver = AsyncCheckpointer()
    events: list[str] = []
    begin, replay, sync = async_save.begin_save, async_save.HostCopies.replay, async_save.save_checkpoint

    def logged_begin(directory: Any, step: int, *args: Any) -> Any:
        events.append(f"begin {step}")
        return begin(directory, step, *args)

    def slow_replay(self: async_save.HostCopies, writes: Any) -> None:
        time.sleep(0.3)  # a slow disk: the next save arrives while this one is still being written
        replay(self, writes)
        events.append(f"written {writes.step}")

    def logged_sync(directory: Any, step: int, *args: Any, **kwargs: Any) -> Any:
        events.append(f"sync {step}")
        return sync(directory, step, *args, **kwargs)

    async_save.begin_save = logged_begin  # type: ignore[assignment]
    async_save.HostCopies.replay = slow_replay  # type: ignore[method-assign]
    async_save.save_checkpoint = logged_sync  # type: ignore[assignment]
    for step in (1, 2):
        _train(topo, module, optimizer, step)
        assert saver.save(save_dir, step, module, optimizer) is None
        assert saver.in_flight == step
    _train(topo, module, optimizer, 3)
    published = saver.save(save_dir, 3, module, optimizer, background=False)  # the final save
    assert published == Path(save_dir) / "global_step3" and saver.in_flight is None
    assert (Path(save_dir) / "latest").read_text() == "global_step3"
    return events


def test_at_most_one_save_in_flight_and_a_synchronous_save_waits_for_it(tmp_path: Path) -> None:
    events = run_distributed(_one_in_flight, 1, str(tmp_path), timeout_s=60)[0]
    assert events == ["begin 1", "written 1", "begin 2", "written 2", "sync 3"]
    for step in (1, 2, 3):
        verify_checkpoint(tmp_path / f"global_step{step}", checksums=True)


def _failing_background_save(save_dir: str) -> str:
    _, module, optimizer = _build({})
    saver = AsyncCheckpointer()
    with torch.no_grad():
        next(iter(module.parameters())).fill_(float("nan"))
    saver.save(save_dir, 1, module, optimizer)  # returns: the failure belongs to the writer
    try:
        saver.wait()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def test_a_failed_background_save_is_raised_by_the_next_wait_and_publishes_nothing(tmp_path: Path) -> None:
    message = run_distributed(_failing_background_save, 1, str(tmp_path), timeout_s=60)[0]
    assert message.startswith("CheckpointError:") and "is not finite at step 1" in message
    assert not (tmp_path / "latest").exists() and not list(tmp_path.glob("*global_step1*"))


# The trainer: interval saves in the background, the final one synchronous ---------------------------


def _trainer_run(save_dir: str) -> dict[str, Any]:
    topo = Topology(TopologyConfig(data_parallel_size=2, micro_batch_size=2, global_batch_size=8))
    module = ParallelModule(model_specs(topo, 2, 0.1), topo, Loss(topo), seed=1)
    optimizer = Optimizer.for_module(module, OptimizerConfig.from_dict(OPTIMIZER))
    config = TrainerConfig.from_dict(
        {
            "train_iterations": 4,
            "save_dir": save_dir,
            "save_interval": 1,
            "keep_last_n_checkpoints": 2,
            "async_save": True,
        }
    )
    trainer = Trainer(
        config, TrainingContext(config, topo), module, optimizer, DistributedDataLoader(SampleWindows(), topo)
    )
    calls: list[tuple[int, bool, bool]] = []  # step, background, whether latest already named the step on return
    save = AsyncCheckpointer.save

    def recorded(self: AsyncCheckpointer, directory: Any, step: int, *args: Any, **kwargs: Any) -> Any:
        result = save(self, directory, step, *args, **kwargs)
        latest = Path(directory) / "latest"
        calls.append((step, kwargs["background"], latest.exists() and latest.read_text() == f"global_step{step}"))
        return result

    AsyncCheckpointer.save = recorded  # type: ignore[method-assign,assignment]
    trainer.run()
    final = {n: gathered(p.detach()).clone() for n, p in module.named_parameters_canonical()}
    return {"calls": calls, "weights": final}


def _load_weights(path: str) -> dict[str, torch.Tensor]:
    _, module, optimizer = _build({})
    load_checkpoint(path, module, optimizer)
    return {n: p.detach().clone() for n, p in module.named_parameters_canonical()}


@pytest.mark.timeout(120)
def test_trainer_async_saves_in_the_background_and_the_final_save_is_synchronous(tmp_path: Path) -> None:
    result = run_distributed(_trainer_run, 2, str(tmp_path), timeout_s=90)[0]
    steps = [(step, background) for step, background, _ in result["calls"]]
    assert steps == [(1, True), (2, True), (3, True), (4, False)]
    assert result["calls"][-1][2], "the final save returned before it was published"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step3", "global_step4", "latest"]
    for step in (3, 4):
        verify_checkpoint(tmp_path / f"global_step{step}", checksums=True)
    assert read_json(tmp_path / "global_step4" / "manifest.json")["run_state"]["data"]["consumed"] == 32
    loaded = run_distributed(_load_weights, 1, str(tmp_path), timeout_s=60)[0]
    for name, weight in result["weights"].items():
        assert torch.equal(loaded[name], weight), name


# kill -9 during background saves ---------------------------------------------------------------------

TRIALS = 20
_BACKSTOP_S = 20.0  # a child the test failed to kill stops by itself


def _train_forever(save_dir: str, store_path: str) -> None:
    """A training loop that saves in the background after every step until it is killed."""
    torch.set_num_threads(1)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 1), rank=0, world_size=1)  # type: ignore[attr-defined]
    topo, module, optimizer = _build({})
    saver = AsyncCheckpointer()
    deadline = time.monotonic() + _BACKSTOP_S
    step = 0
    while time.monotonic() < deadline:
        _train(topo, module, optimizer, step)
        step += 1
        saver.save(save_dir, step, module, optimizer, rank_state={"torch_rng": torch.get_rng_state()}, keep_last=2)
    saver.wait()


def _zygote(conn: Any) -> None:
    """Forks one training loop per request: the fork already has torch and scaling imported, so a trial
    costs milliseconds to start instead of seconds. Runs no torch code itself, so forking it is safe."""
    pid = 0
    while (request := conn.recv()) is not None:
        if request == "reap":
            _, status = os.waitpid(pid, 0)
            conn.send(os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status))
            continue
        pid = os.fork()
        if pid == 0:  # the training loop
            code = 0
            try:
                _train_forever(*request)
            except BaseException:
                code = 1
            os._exit(code)
        conn.send(pid)


def _resume_each(save_dirs: list[str]) -> list[int]:
    """Load the latest checkpoint of every directory, compare with the uninterrupted run at that step, and
    take one more step from it (which must match the uninterrupted run's next step too)."""
    topo, reference, reference_optimizer = _build({})
    trajectory = [{n: p.detach().clone() for n, p in reference.named_parameters_canonical()}]
    steps = []
    for directory in save_dirs:
        _, module, optimizer = _build({})
        info = load_checkpoint(find_checkpoint(directory), module, optimizer)
        while len(trajectory) <= info.step + 1:
            _train(topo, reference, reference_optimizer, len(trajectory) - 1)
            trajectory.append({n: p.detach().clone() for n, p in reference.named_parameters_canonical()})
        for name, p in module.named_parameters_canonical():
            assert torch.equal(p.detach(), trajectory[info.step][name]), (directory, info.step, name)
        _train(topo, module, optimizer, info.step)
        for name, p in module.named_parameters_canonical():
            assert torch.equal(p.detach(), trajectory[info.step + 1][name]), (directory, info.step + 1, name)
        steps.append(info.step)
    return steps


@pytest.mark.timeout(120)
def test_random_kill_9_during_async_saves_always_leaves_a_checkpoint_that_verifies_and_resumes(
    tmp_path: Path,
) -> None:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed"])
    ours, theirs = ctx.Pipe()
    zygote = ctx.Process(target=_zygote, args=(theirs,), daemon=True)
    zygote.start()
    chance = random.Random(15)
    save_dirs, mid_save, started = [], 0, time.monotonic()
    try:
        for trial in range(TRIALS):
            save_dir = tmp_path / f"trial{trial}"
            ours.send((str(save_dir), str(tmp_path / f"store{trial}")))
            pid = ours.recv()
            try:
                deadline = time.monotonic() + 15
                while not (save_dir / "latest").exists():  # a first checkpoint to lose
                    assert time.monotonic() < deadline, f"trial {trial}: no checkpoint published"
                    time.sleep(0.005)
                time.sleep(chance.uniform(0.0, 0.2))
            finally:
                os.kill(pid, signal.SIGKILL)
                ours.send("reap")
                assert ours.recv() == signal.SIGKILL, f"trial {trial}: the training loop ended before it was killed"
            mid_save += any(p.name.endswith(".incomplete") for p in save_dir.iterdir())
            latest = find_checkpoint(save_dir)
            verify_checkpoint(latest, checksums=True)
            save_dirs.append(str(save_dir))
    finally:
        ours.send(None)
        zygote.join(10)
        if zygote.is_alive():
            zygote.kill()
            zygote.join(5)
    assert mid_save >= TRIALS // 2, f"only {mid_save} of {TRIALS} kills landed during a save"
    steps = run_distributed(_resume_each, 1, save_dirs, timeout_s=60)[0]
    assert all(step >= 1 for step in steps)
    assert time.monotonic() - started < 60
