"""Launcher: hostfiles, exact command lines for 2-node pdsh / docker / Slurm, dry runs, and real local launches."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from scaling.core.config import ConfigError
from scaling.core.runner import RunnerConfig, launch, parse_hostfile, plan_launch, read_hostfile
from scaling.core.runner.command_line import load_launch_configs
from scaling.core.runner.command_line import main as runner_main
from scaling.core.runner.hostfile import Host

HOSTFILE = """
# two nodes, four processes each
worker-0 slots=4
worker-1   slots=4   # trailing comment
"""


def test_hostfile_parsing() -> None:
    assert parse_hostfile(HOSTFILE) == [Host("worker-0", 4), Host("worker-1", 4)]
    assert parse_hostfile(HOSTFILE) == [("worker-0", 4), ("worker-1", 4)]  # plain (host, slots) tuples
    assert parse_hostfile("a\nb slots=2\n") == [Host("a", None), Host("b", 2)]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("worker-0 slots=4\nworker-1 slots=four\n", "hosts:2: expected 'HOST' or 'HOST slots=N'"),
        ("worker-0\nworker-0 slots=2\n", "hosts:2: host 'worker-0' is already listed on line 1"),
        ("worker-0 slots=0\n", "hosts:1: host 'worker-0' has slots=0"),
        ("# nothing\n\n", "no hosts listed"),
        ("worker[0-3] slots=4\n", "hosts:1: expected 'HOST' or 'HOST slots=N'"),  # pdsh would start 4 nodes
    ],
)
def test_bad_hostfiles_name_file_and_line(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "hosts"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        read_hostfile(path)


def _two_nodes(tmp_path: Path, **extra: object) -> RunnerConfig:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(HOSTFILE)
    return RunnerConfig.from_dict(
        {"hostsfile": str(hostfile), "script": "train.py", "module": False, "script_args": ["cfg.yml"], **extra}
    )


ENV = {"NCCL_DEBUG": "INFO", "HF_HOME": "/data/hf cache"}


def test_pdsh_commands_for_two_nodes(tmp_path: Path) -> None:
    config = _two_nodes(tmp_path, runner_type="pdsh", env_forward=["NCCL_DEBUG", "HF_HOME"], master_port=6000)
    plan = plan_launch(config, 8, python="/venv/bin/python", cwd="/work/run", env=ENV)
    remote = (
        "cd /work/run && export NCCL_DEBUG=INFO && export HF_HOME='/data/hf cache' && "
        "python -m scaling.core.runner.agent --nnodes=2 --node-rank=%n --nproc-per-node=4 --master-addr=worker-0 "
        "--master-port=6000 --max-restarts=0 train.py cfg.yml"
    )
    assert plan.argv == ["pdsh", "-S", "-R", "ssh", "-f", "1024", "-w", "worker-0,worker-1", remote]
    assert [(n.host, n.node_rank) for n in plan.nodes] == [("worker-0", 0), ("worker-1", 1)]
    assert plan.nodes[0].command == remote.replace("%n", "0")
    assert plan.nodes[1].command == remote.replace("%n", "1")
    assert "--node-rank=1 " in plan.nodes[1].command


def test_pdsh_docker_wraps_the_launcher(tmp_path: Path) -> None:
    config = _two_nodes(
        tmp_path,
        runner_type="pdsh_docker",
        env_forward=["NCCL_DEBUG"],
        docker={"image": "scaling:latest", "mounts": ["/data:/data", "/ckpt:/ckpt"], "sudo": True},
    )
    plan = plan_launch(config, 8, python="python", cwd="/work/run", env=ENV)
    node1 = shlex.split(plan.nodes[1].command)
    assert node1[:6] == ["sudo", "docker", "run", "--rm", "--network=host", "--ipc=host"]
    assert node1[6:13] == ["--gpus=all", "-v", "/data:/data", "-v", "/ckpt:/ckpt", "-e", "NCCL_DEBUG=INFO"]
    assert node1[13:16] == ["-w", "/work/run", "scaling:latest"]
    assert node1[16:18] == ["bash", "-c"]
    assert node1[18] == (
        "python -m scaling.core.runner.agent --nnodes=2 --node-rank=1 --nproc-per-node=4 --master-addr=worker-0 "
        "--master-port=29500 --max-restarts=0 train.py cfg.yml"
    )


def test_slurm_script_for_two_nodes(tmp_path: Path) -> None:
    config = _two_nodes(
        tmp_path,
        runner_type="slurm",
        rank_logs=True,
        slurm={
            "job_name": "llm",
            "partition": "gpu",
            "time": "1:00:00",
            "gpus_per_node": 4,
            "extra_sbatch": ["--exclusive"],
        },
    )
    # logs: the run's logger.log_dir, the one log directory (the sbatch script, per-rank logs under ranks/)
    logs = tmp_path / "logs"
    plan = plan_launch(config, 8, python="python", cwd="/work/run", env=ENV, log_dir=logs)
    assert plan.argv == ["sbatch", str(logs / "llm.sbatch")]
    script = plan.sbatch_script
    assert script is not None
    for line in [
        "#SBATCH --job-name=llm",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=1:00:00",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --nodelist=worker-0,worker-1",
        "#SBATCH --exclusive",
        "cd /work/run",
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export MASTER_PORT=29500",
    ]:
        assert line in script.splitlines(), line
    srun = script.splitlines()[-1]
    assert srun.startswith("srun --kill-on-bad-exit=1 bash -c '")
    inner = shlex.split(srun)[-1]  # single-quoted: every node expands $SLURM_NODEID itself
    assert inner == (
        "python -m scaling.core.runner.agent --nnodes=$SLURM_NNODES --node-rank=$SLURM_NODEID --nproc-per-node=4 "
        "--rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT --rdzv-id=$SLURM_JOB_ID --max-restarts=0 "
        f"--log-dir={logs / 'ranks'} --tee=3 train.py cfg.yml"
    )
    assert script.startswith("#!/bin/bash\n")


def test_slurm_without_hosts_takes_nodes_from_gpus_per_node() -> None:
    config = RunnerConfig.from_dict(
        {"runner_type": "slurm", "master_addr": "head", "env_forward": ["NCCL_DEBUG"], "slurm": {"gpus_per_node": 4}}
    )
    plan = plan_launch(config, 16, python="python", cwd="/work/run", env=ENV)
    assert plan.argv == ["sbatch", "scaling.sbatch"]
    lines = (plan.sbatch_script or "").splitlines()
    assert "#SBATCH --nodes=4" in lines and not any("--nodelist" in line for line in lines)
    assert "export MASTER_ADDR=head" in lines and "export NCCL_DEBUG=INFO" in lines
    assert "--nproc-per-node=4" in lines[-1]


def test_local_command() -> None:
    plan = plan_launch(RunnerConfig(script="pkg.train", script_args=["a.yml"]), 4, python="py", cwd="/x", env={})
    assert plan.argv == [
        "py", "-m", "scaling.core.runner.agent", "--nnodes=1", "--nproc-per-node=4", "--standalone",
        "--max-restarts=0", "-m", "pkg.train", "a.yml",
    ]  # fmt: skip
    fixed = plan_launch(RunnerConfig(master_port=7000, max_restarts=2), 2, python="py", cwd="/x", env={})
    assert fixed.argv[3:9] == [
        "--nnodes=1", "--nproc-per-node=2", "--master-addr=127.0.0.1", "--master-port=7000", "--max-restarts=2",
        "-m",
    ]  # fmt: skip
    logged = plan_launch(
        RunnerConfig(module=False, script="t.py", rank_logs=True), 1, python="py", cwd="/", env={}, log_dir="logs"
    )
    assert logged.argv[5:] == ["--standalone", "--max-restarts=0", "--log-dir=logs/ranks", "--tee=3", "t.py"]


@pytest.mark.parametrize(
    ("config", "world", "fragment"),
    [
        ({"runner_type": "pdsh"}, 8, "needs hosts or a hostsfile"),
        ({"runner_type": "pdsh", "hosts": ["a", "b"], "nproc_per_node": 3}, 8, "2 node(s) x 3 processes = 6"),
        ({"runner_type": "pdsh", "hosts": ["a", "b", "c"]}, 8, "does not divide over 3 nodes"),
        (
            {"runner_type": "pdsh", "hosts": ["a"], "env_forward": ["NOT_SET_ANYWHERE"]},
            1,
            "not set in this environment",
        ),
        ({"runner_type": "slurm"}, 8, "slurm needs nproc_per_node"),
        ({"nproc_per_node": 3}, 4, "1 node(s) x 3 processes"),
        ({"runner_type": "slurm", "nproc_per_node": 3}, 8, "3 processes per node do not divide"),
    ],
)
def test_impossible_launches_are_explained(config: dict[str, object], world: int, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        plan_launch(RunnerConfig.from_dict(config), world, python="py", cwd="/x", env={})


def _write_config(tmp_path: Path, document: dict[str, object]) -> Path:
    path = tmp_path / "run.yml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_dry_run_prints_the_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write_config(
        tmp_path,
        {
            "topology": {"data_parallel_size": 8},
            "runner": {"runner_type": "pdsh", "hosts": ["n0", "n1"]},
            "trainer": {},
        },
    )
    assert runner_main([str(path), "--dry-run", "-o", "runner.master_port=7777"]) == 0
    out = capsys.readouterr().out
    assert "# node 0 (n0):" in out and "# node 1 (n1):" in out
    assert "--node-rank=1 --nproc-per-node=4 --master-addr=n0 --master-port=7777" in out


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ({"runner": {"master_port": 70000}}, "runner.master_port: Input should be less than or equal to 65535"),
        ({"runner": {"runer_type": "local"}}, "runner.runer_type: unknown field (did you mean 'runner_type'?)"),
        ({"runner": {"hosts": ["a"], "hostsfile": "h"}}, "runner.hostsfile: give hosts or hostsfile, not both"),
        ({"runner": {"runner_type": "pdsh_docker", "hosts": ["a"]}}, "runner.docker.image: runner_type 'pdsh_docker'"),
        ({"runner": {"docker": {"mounts": ["data"]}}}, "runner.docker.mounts: mount 'data' must be"),
        ({"runner": {"hosts": ["a,b"]}}, "runner.hosts: host 'a,b' must be a single host name"),
        ({"runner": {"env_forward": ["A;rm"]}}, "runner.env_forward: 'A;rm' is not an environment variable name"),
        ({"runner": []}, "runner: expected a mapping, got list"),
        ({"topology": {"world_size": 3, "model_parallel_size": 2}}, "topology.world_size: world_size (3)"),
    ],
)
def test_bad_launch_config_names_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], document: dict[str, object], fragment: str
) -> None:
    path = _write_config(tmp_path, document)
    assert runner_main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err
    assert fragment in err


def test_override_errors_name_the_field(tmp_path: Path) -> None:
    path = _write_config(tmp_path, {"runner": {}})
    with pytest.raises(ConfigError) as caught:
        load_launch_configs(path, ["runner.max_restarts=-1"])
    assert caught.value.problems == ["runner.max_restarts: Input should be greater than or equal to 0 (got -1)"]


def _fake_tool(bin_dir: Path, name: str) -> Path:
    """An executable ``name`` on PATH that records its arguments, one per line, next to itself."""
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / name
    tool.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{bin_dir}/{name}.args"\n')
    tool.chmod(0o755)
    return bin_dir / f"{name}.args"


def test_slurm_launch_writes_the_script_and_submits_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recorded = _fake_tool(tmp_path / "bin", "sbatch")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    config = RunnerConfig(runner_type="slurm", nproc_per_node=2)
    for _ in range(2):  # a resubmission replaces the script (sbatch has copied the old one)
        assert launch(config, 4, log_dir=tmp_path / "logs") == 0
    script = tmp_path / "logs" / "scaling.sbatch"
    assert recorded.read_text().splitlines() == [str(script)]
    assert "#SBATCH --nodes=2" in script.read_text().splitlines()


def test_pdsh_launch_runs_pdsh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recorded = _fake_tool(tmp_path / "bin", "pdsh")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert launch(RunnerConfig(runner_type="pdsh", hosts=["n0", "n1"], workdir="/w"), 2) == 0
    args = recorded.read_text().splitlines()
    assert args[:7] == ["-S", "-R", "ssh", "-f", "1024", "-w", "n0,n1"]
    assert args[7].startswith("cd /w && ") and "--node-rank=%n" in args[7]


def test_missing_tool_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(
        ConfigError, match=re.escape("runner.runner_type: 'pdsh' needs the 'pdsh' command, which is not on PATH")
    ):
        launch(RunnerConfig(runner_type="pdsh", hosts=["n0"]), 1)
    config = RunnerConfig(runner_type="slurm", nproc_per_node=1, rank_logs=True)
    with pytest.raises(ConfigError, match="'sbatch' command"):
        launch(config, 1, log_dir=tmp_path / "logs")
    assert not (tmp_path / "logs").exists()  # nothing written before the check


ALL_REDUCE_SCRIPT = """
import os, sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank = dist.get_rank()
value = torch.tensor([rank + 1.0])
dist.all_reduce(value)
with open(os.path.join(sys.argv[1], f"rank{rank}.txt"), "w") as f:
    f.write(f"{value.item()} {dist.get_world_size()} {os.environ['LOCAL_RANK']}")
dist.destroy_process_group()
sys.exit(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
"""


@pytest.mark.timeout(120)
def test_real_local_launch_all_reduces(tmp_path: Path) -> None:
    script = tmp_path / "all_reduce.py"
    script.write_text(ALL_REDUCE_SCRIPT)
    config = RunnerConfig(script=str(script), module=False, script_args=[str(tmp_path)], rank_logs=True)
    assert launch(config, world_size=2, log_dir=tmp_path / "logs") == 0
    assert (tmp_path / "rank0.txt").read_text() == "3.0 2 0"
    assert (tmp_path / "rank1.txt").read_text() == "3.0 2 1"
    # torchrun's per-rank logs: <logger.log_dir>/ranks/<run id>/attempt_0/<local rank>/{stdout,stderr}.log
    assert len(list((tmp_path / "logs" / "ranks").glob("*/attempt_0/*/stderr.log"))) == 2


@pytest.mark.timeout(120)
def test_failing_local_launch_returns_non_zero(tmp_path: Path) -> None:
    script = tmp_path / "all_reduce.py"
    script.write_text(ALL_REDUCE_SCRIPT)
    failing = RunnerConfig(script=str(script), module=False, script_args=[str(tmp_path), "1"])
    assert launch(failing, world_size=2) != 0


@pytest.mark.timeout(180)
def test_world_check_example_runs_through_the_cli(tmp_path: Path) -> None:
    import subprocess

    log_dir = tmp_path / "out"
    path = _write_config(
        tmp_path,
        {
            "topology": {"model_parallel_size": 2, "pipe_parallel_size": 2},
            "runner": {"script_args": [str(tmp_path / "run.yml")]},
            "logger": {"log_dir": str(log_dir)},
        },
    )
    result = subprocess.run(
        [sys.executable, "-m", "scaling.cli.main", "launch", str(path)], capture_output=True, text=True, timeout=170
    )
    assert result.returncode == 0, result.stderr
    assert "world check passed: 4 ranks (tp=2, pp=2, dp=1)" in result.stderr
    assert (log_dir / "metrics.jsonl").read_text().startswith('{"step": 0, "world_size": 4')


@pytest.mark.timeout(180)
def test_world_check_failure_is_one_line_from_the_launcher(tmp_path: Path) -> None:
    """Every rank fails to read the config it was given: the user reads it once, with exit code 2."""
    import subprocess

    missing = tmp_path / "missing.yml"
    path = _write_config(tmp_path, {"topology": {"pipe_parallel_size": 2}, "runner": {"script_args": [str(missing)]}})
    result = subprocess.run(
        [sys.executable, "-m", "scaling.cli.main", "launch", str(path)], capture_output=True, text=True, timeout=170
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if str(missing) in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
