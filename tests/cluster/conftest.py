"""Fixtures of the queue tests: one private Slurm for the whole session, and a tiny project to queue.

The cluster (:mod:`tests.cluster.slurm_cluster`: two nodes of 2 CPUs, both slurmds on this machine) is
started once, on first use, and stopped at the end: every job it still has is cancelled and waited for, then
its daemons are killed by their pid files.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.cluster.slurm_cluster import SlurmCluster

EXPERIMENTS = '''
import json
import os
import time

import torch

from scaling.experiment import current_run, experiment, param


@experiment("mark", seed=0)
@param("seconds", default=1.0, description="how long to work")
@param("fail", default=0, description="raise when not 0")
def mark(params):
    """Writes when it started and ended (wall clock), for the order and overlap checks."""
    run = current_run()
    start = time.time()
    time.sleep(params.seconds)
    if params.fail:
        raise RuntimeError(f"failing on purpose ({params.fail})")
    times = {"start": start, "end": time.time(), "node": os.environ.get("SLURMD_NODENAME"),
             "world_size": int(os.environ.get("WORLD_SIZE", "1"))}  # fmt: skip
    if int(os.environ.get("RANK", "0")) == 0:
        (run.run_dir / "times.json").write_text(json.dumps(times))


def _problem():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)


@experiment("train", seed=0)
@param("steps", default=10, description="optimizer steps in total")
@param("step_seconds", default=0.0, description="sleep after each step")
def train(params):
    """A linear model with momentum SGD: saves model, optimizer and step after every step; resumes from it."""
    run = current_run()
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = _problem()
    step = 0
    state_file = run.checkpoint_dir / "state.pt" if run is not None else None
    if state_file is not None and state_file.exists():
        state = torch.load(state_file, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        print(f"resumed from step {step}")

    def save():
        run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        scratch = state_file.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, scratch)
        os.replace(scratch, state_file)
        (run.run_dir / "saved_step").write_text(str(step))

    while step < params.steps:
        if run is not None and run.stop_requested:
            print(f"stop requested at step {step}: saving")
            save()
            return None
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if run is not None:
            save()
        time.sleep(params.step_seconds)
    weights = [p.detach().flatten().tolist() for p in model.parameters()]
    if run is not None:
        (run.run_dir / "final.json").write_text(json.dumps(weights))
    return weights
'''


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    root = tmp_path_factory.mktemp("slurm")
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True, timeout=10).stdout.strip()
    cluster = SlurmCluster(root, host, cpus=2, nodes=2)
    try:
        cluster.start()
        yield cluster
    finally:
        jobs = cluster.run("squeue", "-h", "-o", "%i", timeout=10).stdout.split() if cluster.conf.exists() else []
        for job in jobs:
            cluster.run("scancel", job, timeout=10)
        deadline = time.monotonic() + 30
        while jobs and time.monotonic() < deadline:
            if not cluster.run("squeue", "-h", "-o", "%i", timeout=10).stdout.split():
                break
            time.sleep(0.3)
        cluster.stop()


@pytest.fixture(scope="session")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("queued_project")
    (root / "src").mkdir()
    (root / "src" / "experiments.py").write_text(EXPERIMENTS)
    (root / "scaling.yml").write_text("name: queued\nexperiments:\n  - src/experiments.py\n")
    return root
