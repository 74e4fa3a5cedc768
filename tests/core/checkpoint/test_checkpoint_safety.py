"""Nothing saved is lost, nothing is resumed silently wrong, nothing non-finite is published (issue 10).

Each test runs the real ``Trainer`` (or ``save_checkpoint``) in a world of one in this process, on the
tiny model of ``tests/core/pipeline/tp_models.py``: a few steps, a few seconds. A failure names the
rule of the checkpoint contract that broke: a fresh start beside saved checkpoints, a broken ``latest``,
a swallowed load error, leftovers of crashed saves, a bad save directory, an unchecked copied file, a
resume past ``train_iterations``, or a non-finite tensor that reached a published checkpoint.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from scaling.core.checkpoint import CheckpointError, check_save_dir, find_checkpoint, save_checkpoint, verify_file
from scaling.core.checkpoint import files as checkpoint_files
from scaling.core.config import ConfigError
from scaling.core.data import DistributedDataLoader
from scaling.core.optimizer.config import OptimizerConfig
from scaling.core.optimizer.optimizer import Optimizer
from scaling.core.pipeline.module import ParallelModule
from scaling.core.topology import Topology, TopologyConfig
from scaling.core.topology.topology import init_distributed
from scaling.core.trainer import Trainer, TrainerConfig, TrainingContext

from ..pipeline.tp_models import Loss, SampleWindows, model_specs

OPTIMIZER = {"training_groups": [{"learning_rate_schedule": {"learning_rate": 1e-2}}]}


@pytest.fixture
def topology() -> Iterator[Topology]:
    """A world of one in this process."""
    created = not dist.is_initialized()
    init_distributed(TopologyConfig(device="cpu"))
    yield Topology(TopologyConfig(micro_batch_size=2, global_batch_size=8, device="cpu"), device="cpu")
    if created:
        dist.destroy_process_group()


def _trainer(topo: Topology, **trainer: Any) -> Trainer:
    module = ParallelModule(model_specs(topo, 1, 0.0), topo, Loss(topo), seed=1)
    optimizer = Optimizer.for_module(module, OptimizerConfig.from_dict(OPTIMIZER))
    config = TrainerConfig.from_dict({k: str(v) if isinstance(v, Path) else v for k, v in trainer.items()})
    data = DistributedDataLoader(SampleWindows(), topo)
    return Trainer(config, TrainingContext(config, topo), module, optimizer, data)


def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes: what "untouched" means."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _saved_run(topo: Topology, save_dir: Path, steps: int = 4, interval: int = 2) -> dict[str, bytes]:
    _trainer(topo, train_iterations=steps, save_dir=save_dir, save_interval=interval).run()
    return _snapshot(save_dir)


# 1. A fresh start beside saved checkpoints is refused --------------------------------------------
def test_typo_in_load_dir_never_deletes_checkpoints(tmp_path: Path, topology: Topology) -> None:
    save_dir = tmp_path / "ckpt"
    before = _saved_run(topology, save_dir)
    typo = tmp_path / "ckpt_typo"
    run = _trainer(topology, train_iterations=8, save_dir=save_dir, load_dir=typo, keep_last_n_checkpoints=1)
    with pytest.raises(ConfigError) as error:
        run.run()
    message = str(error.value)
    assert f"trainer.load_dir {typo} holds no checkpoint" in message and f"trainer.save_dir {save_dir}" in message
    assert "global_step4" in message and "\n" not in message
    assert run.context.step == 0  # refused before any step
    assert _snapshot(save_dir) == before


def test_unset_load_dir_beside_checkpoints_is_refused_unless_allowed(tmp_path: Path, topology: Topology) -> None:
    save_dir = tmp_path / "ckpt"
    before = _saved_run(topology, save_dir)
    with pytest.raises(
        ConfigError, match=r"already holds checkpoints \(newest global_step4\) but trainer.load_dir is unset"
    ):
        _trainer(topology, train_iterations=8, save_dir=save_dir, keep_last_n_checkpoints=1).run()
    assert _snapshot(save_dir) == before
    allowed = _trainer(topology, train_iterations=1, save_dir=save_dir, allow_fresh_start_beside_checkpoints=True)
    assert allowed.run().step == 1  # asked for explicitly: starts from scratch
    assert (save_dir / "latest").read_text() == "global_step1"


# 2. A broken `latest` falls back to the newest checkpoint that verifies -------------------------
@pytest.mark.parametrize("damage", ["empty", "unreadable", "missing target", "missing file"])
def test_broken_latest_resumes_from_the_newest_checkpoint_that_verifies(
    tmp_path: Path, topology: Topology, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    save_dir = tmp_path / "ckpt"
    _saved_run(topology, save_dir)
    latest, newest = save_dir / "latest", save_dir / "global_step4"
    expected = "global_step4"
    if damage == "empty":
        latest.write_text("")
    elif damage == "unreadable":
        latest.write_bytes(b"\xff\xfe\x00")
    elif damage == "missing target":
        latest.write_text("global_step9")
    elif damage == "missing file":  # latest names a directory whose weights are gone: step 2 is the newest good one
        (newest / "model" / "layer_00001.safetensors").unlink()
        expected = "global_step2"
    resumed = _trainer(topology, train_iterations=6, save_dir=save_dir, load_dir=save_dir)
    with caplog.at_level(logging.WARNING, logger="scaling"):
        assert resumed.load()
    assert resumed.context.step == int(expected.removeprefix("global_step"))  # never step 0
    assert any(f"resuming from {save_dir / expected} instead" in r.getMessage() for r in caplog.records)
    names = sorted(p.name for p in save_dir.iterdir())
    assert not [n for n in names if "unpublished" in n] and {"global_step2", "global_step4"} <= set(names)
    resumed.run()  # trains on and publishes again
    assert (save_dir / "latest").read_text() == "global_step6"


def test_latest_naming_a_damaged_file_fails_naming_it_and_renames_nothing(tmp_path: Path, topology: Topology) -> None:
    """Checksums are checked as each file is read (hashing every file twice would double the load time)."""
    save_dir = tmp_path / "ckpt"
    _saved_run(topology, save_dir)
    layer = save_dir / "global_step4" / "optimizer" / "layer_00001.safetensors"
    layer.write_bytes(layer.read_bytes()[:-1] + b"\x00")
    before = sorted(p.name for p in save_dir.iterdir())
    run = _trainer(topology, train_iterations=6, save_dir=save_dir, load_dir=save_dir)
    with pytest.raises(CheckpointError, match=f"checkpoint file {layer} does not match the checksum"):
        run.run()
    assert run.history == [] and sorted(p.name for p in save_dir.iterdir()) == before


def test_broken_latest_without_a_good_checkpoint_names_the_file(tmp_path: Path, topology: Topology) -> None:
    save_dir = tmp_path / "ckpt"
    _saved_run(topology, save_dir, steps=2)
    (save_dir / "latest").write_text("")
    (save_dir / "global_step2" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=rf"{save_dir / 'latest'} is empty; no other global_step directory"):
        _trainer(topology, train_iterations=4, save_dir=save_dir, load_dir=save_dir).run()


# 3. Loading never swallows a damaged checkpoint -------------------------------------------------
@pytest.mark.parametrize("damage", ["manifest", "step", "model file", "rank state"])
def test_damaged_checkpoint_fails_naming_the_file_instead_of_starting_fresh(
    tmp_path: Path, topology: Topology, damage: str
) -> None:
    save_dir = tmp_path / "ckpt"
    _saved_run(topology, save_dir, steps=2)
    checkpoint = save_dir / "global_step2"
    manifest = checkpoint / "manifest.json"
    if damage == "manifest":
        manifest.unlink()
        named = f"no checkpoint at {checkpoint}"
    elif damage == "step":
        manifest.write_text(json.dumps({k: v for k, v in json.loads(manifest.read_text()).items() if k != "step"}))
        named = f"checkpoint file {manifest} records no step"
    elif damage == "model file":
        (checkpoint / "model" / "layer_00000.safetensors").unlink()
        named = f"checkpoint file {checkpoint / 'model' / 'layer_00000.safetensors'} is missing"
    else:
        (checkpoint / "rank_state" / "rank00000.safetensors").unlink()
        named = f"checkpoint file {checkpoint / 'rank_state' / 'rank00000.safetensors'} is missing"
    elsewhere = tmp_path / "new_run"  # nothing there: only the damaged checkpoint could stop a fresh start
    run = _trainer(topology, train_iterations=4, save_dir=elsewhere, load_dir=checkpoint)
    with pytest.raises(CheckpointError) as error:
        run.run()
    assert named in str(error.value)
    assert run.context.step == 0 and not elsewhere.exists()


def test_only_a_missing_or_empty_load_dir_starts_fresh(tmp_path: Path, topology: Topology) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".global_step1.incomplete").mkdir()  # a first save that crashed: nothing saved
    for load_dir in (tmp_path / "missing", tmp_path / "empty"):
        assert _trainer(topology, train_iterations=1, load_dir=load_dir).run().step == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=f"no checkpoint at {tmp_path / 'other'}"):
        _trainer(topology, train_iterations=1, load_dir=tmp_path / "other").run()


# 4. Retention removes what crashed saves left, never anything newer -----------------------------
def test_retention_removes_what_crashed_saves_left(tmp_path: Path, topology: Topology) -> None:
    save_dir = tmp_path / "ckpt"
    _saved_run(topology, save_dir, steps=2)
    for name in (".global_step1.incomplete", ".global_step2.unpublished", ".global_step1.unpublished"):
        (save_dir / name / "model").mkdir(parents=True)
    for name in (".global_step9.incomplete", ".global_step9.unpublished"):  # newer than anything published
        (save_dir / name).mkdir()
    _trainer(topology, train_iterations=4, save_dir=save_dir, load_dir=save_dir, save_interval=2).run()
    names = sorted(p.name for p in save_dir.iterdir())
    assert names == [".global_step9.incomplete", ".global_step9.unpublished", "global_step2", "global_step4", "latest"]


# 5. The save directory is checked before the first step; a failing write leaves nothing --------
def test_save_dir_that_cannot_take_a_checkpoint_fails_before_the_first_step(
    tmp_path: Path, topology: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    run = _trainer(topology, train_iterations=3, save_dir=a_file)
    with pytest.raises(ConfigError, match=f"^trainer.save_dir {a_file} is a file, not a directory$"):
        run.run()
    assert run.context.step == 0
    with pytest.raises(ConfigError, match="cannot be created"):
        check_save_dir(a_file / "below")
    with pytest.raises(ConfigError, match=r"has [\d.]+ MiB free, one checkpoint needs about"):
        check_save_dir(tmp_path / "new", expected_bytes=2**62)
    seen: list[int] = []
    real = shutil.disk_usage
    monkeypatch.setattr("scaling.core.checkpoint.preflight.shutil.disk_usage", lambda p: seen.append(1) or real(p))
    run = _trainer(topology, train_iterations=1, save_dir=tmp_path / "ok")
    bytes_needed = run._checkpoint_bytes()
    params = sum(p.numel() for n, p in run.module.named_parameters_canonical() if not run.module.is_tied_copy(n))
    assert bytes_needed == params * (4 + 12)  # fp32 weights + master + two moments
    run.run()
    assert seen  # the space was checked


def test_disk_full_during_save_names_the_file_and_leaves_no_incomplete(
    tmp_path: Path, topology: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_dir = tmp_path / "ckpt"
    before = _saved_run(topology, save_dir, steps=2)
    real = checkpoint_files.save_file
    calls: list[str] = []

    def full_disk(tensors: Any, filename: str, metadata: Any = None) -> None:
        calls.append(filename)
        if len(calls) == 2:  # the second file of the save: the first one is already written
            real(tensors, filename, metadata=metadata)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint_files, "save_file", full_disk)
    run = _trainer(topology, train_iterations=4, save_dir=save_dir, load_dir=save_dir)
    with pytest.raises(CheckpointError) as error:
        run.run()
    target = Path(calls[1]).name.removeprefix(".").split(".tmp")[0]
    assert f"could not write checkpoint file {save_dir / '.global_step4.incomplete'}" in str(error.value)
    assert target in str(error.value) and "No space left on device" in str(error.value)
    assert sorted(p.name for p in save_dir.iterdir()) == ["global_step2", "latest"]
    assert _snapshot(save_dir) == before


# 6. Files copied into a checkpoint are checksummed and verified ----------------------------------
def test_copied_files_are_checksummed_and_verified(tmp_path: Path, topology: Topology) -> None:
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text('{"model": "stand-in"}')
    module = ParallelModule(model_specs(topology, 1, 0.0), topology, Loss(topology))
    checkpoint = save_checkpoint(tmp_path / "ckpt", 1, module, files={"tokenizer.json": tokenizer})
    checksums = json.loads((checkpoint / "manifest.json").read_text())["checksums"]
    assert "tokenizer.json" in checksums
    assert verify_file(checkpoint / "tokenizer.json", checkpoint, checksums) == checkpoint / "tokenizer.json"
    (checkpoint / "tokenizer.json").write_text('{"model": "edited"}')
    with pytest.raises(CheckpointError, match=r"tokenizer\.json does not match the checksum"):
        verify_file(checkpoint / "tokenizer.json", checkpoint, checksums)
    (checkpoint / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is missing"):
        find_checkpoint(checkpoint)


# 8. train_iterations at or below the checkpoint's step -------------------------------------------
def test_resume_of_a_complete_run_says_so_and_writes_nothing(
    tmp_path: Path, topology: Topology, caplog: pytest.LogCaptureFixture
) -> None:
    save_dir = tmp_path / "ckpt"
    before = _saved_run(topology, save_dir)
    again = _trainer(topology, train_iterations=4, save_dir=save_dir, load_dir=save_dir)
    with caplog.at_level(logging.INFO, logger="scaling"):
        again.run()
    assert [r.getMessage() for r in caplog.records if "complete" in r.getMessage()] == [
        f"{save_dir / 'global_step4'} is at step 4 = trainer.train_iterations: the run is complete, nothing to do"
    ]
    assert again.history == [] and _snapshot(save_dir) == before


def test_train_iterations_below_the_checkpoint_step_is_an_error_naming_both(tmp_path: Path, topology: Topology) -> None:
    save_dir = tmp_path / "ckpt"
    before = _saved_run(topology, save_dir)
    with pytest.raises(ConfigError, match=r"train_iterations \(3\) is below the step of the checkpoint .* \(4\)"):
        _trainer(topology, train_iterations=3, save_dir=save_dir, load_dir=save_dir).run()
    assert _snapshot(save_dir) == before


# 9. Never published with non-finite weights or optimizer state -----------------------------------
@pytest.mark.parametrize("where", ["weight", "optimizer state"])
def test_non_finite_tensors_are_never_published(tmp_path: Path, topology: Topology, where: str) -> None:
    save_dir = tmp_path / "ckpt"
    before = _saved_run(topology, save_dir, steps=2)
    run = _trainer(topology, train_iterations=2, save_dir=save_dir, load_dir=save_dir)
    run.load()
    name, param = list(run.module.named_parameters_canonical())[2]
    if where == "weight":
        with torch.no_grad():
            param.view(-1)[0] = float("nan")
        expected = f"parameter {name!r} is not finite at step 3"
    else:
        run.optimizer.parameter_state(name)["exp_avg_sq"].view(-1)[0] = float("inf")  # a view of the state
        expected = f"optimizer state exp_avg_sq of parameter {name!r} is not finite at step 3"
    run.context.step = 3
    with pytest.raises(CheckpointError, match=f"^{expected}: the checkpoint is not saved$"):
        run.save()
    assert sorted(p.name for p in save_dir.iterdir()) == ["global_step2", "latest"]
    assert _snapshot(save_dir) == before


def _rank_one_runs_out_of_space(save_dir: str) -> str:
    """Two data-parallel ranks; only rank 1 fails to write (its rank-state file), after step 1 was saved."""
    from scaling.core.checkpoint import writes

    topo = Topology(TopologyConfig(data_parallel_size=2, micro_batch_size=2, global_batch_size=8))
    module = ParallelModule(model_specs(topo, 1, 0.0), topo, Loss(topo), seed=1)
    state = {"torch_rng": torch.get_rng_state()}
    save_checkpoint(save_dir, 1, module, rank_state=state)
    if topo.global_rank == 1:

        def full_disk(path: Path, *args: Any, **kwargs: Any) -> str:
            raise OSError(errno.ENOSPC, "No space left on device")

        writes.write_tensors = full_disk  # type: ignore[assignment]
    try:
        save_checkpoint(save_dir, 2, module, rank_state=state)
    except CheckpointError as exc:
        return str(exc)
    return "saved"


def test_a_write_error_on_one_rank_fails_the_save_on_every_rank(tmp_path: Path) -> None:
    from scaling.core.testing import run_distributed

    errors = run_distributed(_rank_one_runs_out_of_space, 2, str(tmp_path), timeout_s=60)
    failed = tmp_path / ".global_step2.incomplete" / "rank_state" / "rank00001.safetensors"
    assert errors == [f"could not write checkpoint file {failed}: No space left on device"] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step1", "latest"]
    assert (tmp_path / "latest").read_text() == "global_step1"
