"""Fault tolerance in the plain loop (``scaling.llama``): asynchronous saves and the hang watchdog."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from scaling.core.testing import DistributedTestFailure, run_distributed

LR = 3e-3


def _records(n: int = 48) -> list[dict[str, str]]:
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    return [{"prompt": f"Say {words[i % 8]}\n", "completion": words[(3 * i) % 8]} for i in range(n)]


def _setup(**options: Any) -> tuple[Any, Any, Any]:
    from scaling.llama import LlamaTiny
    from scaling.loaders import LlamaLoader
    from scaling.transformer import plain_world

    torch.set_num_threads(1)
    plain_world.reset_plain_world()
    model = LlamaTiny(zero_stage=3, precision="fp32", seed=5, **options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    loader = LlamaLoader(_records(), max_sequence_length=32, batch_size=8, seed=2)
    return model, optimizer, loader


def _weights(model: Any) -> dict[str, torch.Tensor]:
    from scaling.core.zero.tensors import gathered

    return {n: gathered(p.detach()).clone() for n, p in sorted(model.named_parameters_by_name().items())}


def _async_saves(out: str, dump_dir: str) -> dict[str, Any]:
    """Four steps with asynchronous saves after steps 2 and 3 (each publish held back 0.5 s, so training
    goes on while they are written) and a synchronous last save; the hang watchdog is on throughout."""
    import scaling.core.checkpoint.async_save as async_save

    original = async_save.publish

    def slow_publish(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.5)
        return original(*args, **kwargs)

    async_save.publish = slow_publish  # type: ignore[assignment]
    # A healthy run: a timeout with a margin for a loaded machine (a false report fails the test).
    model, optimizer, loader = _setup(hang_timeout_s=3.0, hang_dir=dump_dir)
    seen: dict[str, Any] = {"at": {}}
    for step, batch in enumerate(loader, start=1):
        optimizer.zero_grad()
        model(batch).backward()
        optimizer.step()
        if step in (2, 3):
            seen["at"][step] = _weights(model)
            path = model.save(out, optimizer=optimizer, loader=loader, asynchronous=True)
            seen[f"returned_{step}"] = str(path)
            seen[f"in_flight_{step}"] = model._saver.in_flight
            seen[f"published_2_after_{step}"] = (Path(out) / "global_step2" / "manifest.json").is_file()
        if step == 4:
            seen["final"] = str(model.save(out, optimizer=optimizer, loader=loader))
            seen["in_flight_after_final"] = model._saver.in_flight
            break
    model.stop_hang_watchdog()
    fresh, fresh_optimizer, fresh_loader = _setup()
    for step in (2, 3):
        info = fresh.load(Path(out) / f"global_step{step}", optimizer=fresh_optimizer, loader=fresh_loader)
        loaded = _weights(fresh)
        seen[f"loaded_{step}"] = info.step
        seen[f"equal_{step}"] = all(torch.equal(loaded[n], v) for n, v in seen["at"][step].items())
        seen[f"moved_{step}"] = not all(torch.equal(loaded[n], v) for n, v in _weights(model).items())
    del seen["at"]
    return seen


@pytest.mark.timeout(120)
def test_asynchronous_saves_hold_the_weights_of_their_step_one_at_a_time_and_the_last_is_synchronous(
    tmp_path: Path,
) -> None:
    out, dumps = tmp_path / "run", tmp_path / "hang"
    for seen in run_distributed(_async_saves, 2, str(out), str(dumps), timeout_s=110):
        assert seen["returned_2"] == str(out / "global_step2") and seen["returned_3"] == str(out / "global_step3")
        assert seen["in_flight_2"] == 2 and seen["in_flight_3"] == 3  # returned while still being written
        assert not seen["published_2_after_2"] and seen["published_2_after_3"]  # the second save waited
        assert seen["final"] == str(out / "global_step4") and seen["in_flight_after_final"] is None
        for step in (2, 3):  # training went on during the write: the files hold the step's own weights
            assert seen[f"loaded_{step}"] == step and seen[f"equal_{step}"] and seen[f"moved_{step}"]
    assert (out / "latest").read_text().strip() == "global_step4"
    assert not dumps.exists(), "the watchdog saw a hang in a healthy run"


def _stops_on_rank_1(dump_dir: str) -> None:
    import torch.distributed as dist

    model, optimizer, loader = _setup(hang_timeout_s=1.0, hang_dir=dump_dir)
    for step, batch in enumerate(loader):  # rank 0 leaves through the watchdog
        optimizer.zero_grad()
        model(batch).backward()
        optimizer.step()
        if step == 2 and dist.get_rank() == 1:
            time.sleep(0.3)  # a few publications show this step
            os.kill(os.getpid(), signal.SIGSTOP)  # the harness SIGKILLs it afterwards


@pytest.mark.timeout(60)
def test_a_stopped_rank_of_a_plain_loop_is_named_and_the_job_exits(tmp_path: Path) -> None:
    with pytest.raises(DistributedTestFailure) as failure:
        run_distributed(_stops_on_rank_1, 2, str(tmp_path), timeout_s=45)
    assert "rank 0" in str(failure.value) and "exited with code 1" in str(failure.value), failure.value
    text = (tmp_path / "rank_0.txt").read_text()
    line = text.splitlines()[0]
    assert "no rank made progress" in line, line
    assert "rank 1 did not arrive: rank 1 (dp 1, tp 0) stopped responding (last seen: step 2, optimizer step" in line
    assert "rank 0 (dp 0, tp 0) was doing: step 3, forward, waiting in all_gather" in text, text[:2000]
    assert "did not respond" in (tmp_path / "rank_1.txt").read_text()


def test_a_bad_hang_timeout_names_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    from scaling.transformer.plain.watch import HANG_TIMEOUT_ENV, hang_timeout

    with pytest.raises(ValueError, match=r"hang_timeout_s=0: expected a positive"):
        hang_timeout(0)
    monkeypatch.setenv(HANG_TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=r"SCALING_HANG_TIMEOUT_S='soon': expected a number"):
        hang_timeout(None)
    monkeypatch.setenv(HANG_TIMEOUT_ENV, "30")
    assert hang_timeout(None) == 30.0 and hang_timeout(2) == 2.0
    monkeypatch.delenv(HANG_TIMEOUT_ENV)
    assert hang_timeout(None) is None
