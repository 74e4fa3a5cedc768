"""``scaling nodes`` pieces that need no SSH: probe judgement, Slurm text and plan, the Docker step, the
project tarball, the remote preamble (run in a local bash), the table and the command line's bad input."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from scaling.cluster.nodes import environment, slurm
from scaling.cluster.nodes.checks import judge_probe
from scaling.cluster.nodes.cluster import Cluster, Row
from scaling.cluster.nodes.command import main
from scaling.cluster.nodes.execute import shell_command
from scaling.cluster.nodes.table import failed_hosts, render
from scaling.experiment.project import ProjectConfig

FACTS = {
    "os": "Debian GNU/Linux 12 (bookworm)",
    "python": "3.11.7",
    "disk_free_kb": str(50 * 10**6),
    "gpus": "0",
    "hostname": "n1",
    "cpus": "16",
    "mem_mb": "64000",
}


def _statuses(rows: list[Row]) -> dict[str, str]:
    return {row.check: row.status for row in rows}


def test_probe_judgement_passes_a_good_node_and_names_each_shortfall() -> None:
    good = judge_probe("h", {**FACTS, "time": "100.5"}, 100.0, 101.0, min_free_gb=10, max_skew_s=2)
    assert set(_statuses(good).values()) == {"ok"}
    assert _statuses(good)["gpus"] == "ok" and [r.detail for r in good if r.check == "gpus"] == ["none"]

    bad = judge_probe(
        "h",
        {**FACTS, "python": "3.8.10", "disk_free_kb": "1000", "time": "110.0", "gpu_error": "NVML mismatch"},
        100.0,
        101.0,
        min_free_gb=10,
        max_skew_s=2,
    )
    by_check = {row.check: row for row in bad}
    assert {c for c, r in by_check.items() if r.failed} == {"python", "disk", "clock", "gpus"}
    assert "need >= 3.10" in by_check["python"].detail
    assert by_check["clock"].detail.startswith("+9.00 s off")
    assert "NVML mismatch" in by_check["gpus"].detail

    gpus = judge_probe(
        "h", {**FACTS, "gpus": "8", "gpu_name": "NVIDIA H100", "gpu_driver": "550.54", "time": "100"}, 100, 100, 1, 1
    )
    assert [r.detail for r in gpus if r.check == "gpus"] == ["8 x NVIDIA H100, driver 550.54"]


def test_slurm_config_text_and_plan(tmp_path: Path) -> None:
    facts = {"10.0.0.1": FACTS, "10.0.0.2": {**FACTS, "hostname": "n2", "gpus": "8", "cpus": "96"}}
    hosts = list(facts)
    conf = slurm.slurm_conf("My-Proj", hosts, facts).splitlines()
    assert "ClusterName=my_proj" in conf
    assert "SlurmctldHost=n1(10.0.0.1)" in conf
    assert "AuthType=auth/munge" in conf and "AccountingStorageType=accounting_storage/none" in conf
    assert "NodeName=n1 NodeAddr=10.0.0.1 CPUs=16 RealMemory=60800 State=UNKNOWN" in conf
    assert "NodeName=n2 NodeAddr=10.0.0.2 CPUs=96 RealMemory=60800 Gres=gpu:8 State=UNKNOWN" in conf
    with pytest.raises(ValueError, match="share the host name n1"):
        slurm.slurm_conf("p", hosts, {host: FACTS for host in hosts})
    assert slurm.gres_conf(hosts, facts).splitlines()[1:] == ["NodeName=n2 Name=gpu File=/dev/nvidia[0-7]"]

    plan = slurm.slurm_steps(tmp_path, ProjectConfig(name="proj", hosts=hosts), facts)
    key = (tmp_path / slurm.MUNGE_KEY).read_bytes()
    assert len(key) == slurm.MUNGE_KEY_BYTES and (tmp_path / slurm.MUNGE_KEY).stat().st_mode & 0o777 == 0o600
    assert slurm.munge_key(tmp_path) == key  # made once: every node and every run get the same key
    for host, steps in plan.items():
        assert [s.name for s in steps] == ["slurm packages", "munge key", "slurm config"]
        munge = steps[1]
        assert munge.stdin == key and key.hex() not in munge.script and munge.args == ("/etc/munge/munge.key",)
        assert steps[2].args[2:] == ("slurmctld slurmd" if host == hosts[0] else "slurmd", "/etc/slurm")
        assert "$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge" in steps[0].script
        assert "dpkg-query" in steps[0].script  # looks before it installs: a second run is unchanged


def _project(root: Path, **extra: object) -> Cluster:
    root.mkdir(parents=True, exist_ok=True)
    config = {"name": "demo", "hosts": ["a", "b"], **extra}
    (root / "scaling.yml").write_text(yaml.safe_dump(config))
    (root / "requirements.txt").write_text("torch==2.0\n")
    (root / "src").mkdir(exist_ok=True)
    (root / "src" / "experiments.py").write_text("x = 1\n")
    for junk in (".scaling/deploy_key", ".venv/bin/python", "runs/r1/log.txt", "src/__pycache__/x.pyc"):
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_text("junk")
    return Cluster.from_project(root, ProjectConfig.from_yaml(root / "scaling.yml"))


def test_project_tar_is_deterministic_and_leaves_out_keys_venvs_and_runs(tmp_path: Path) -> None:
    cluster = _project(tmp_path / "p")
    assert environment.project_files(cluster) == ["requirements.txt", "scaling.yml", "src/experiments.py"]
    first, count = environment.project_tar(cluster)
    assert count == 3 and environment.project_tar(cluster)[0] == first
    os.utime(tmp_path / "p" / "scaling.yml", (1, 1))  # a touched file with the same content: same hash
    assert environment.project_tar(cluster)[0] == first
    (tmp_path / "p" / "src" / "experiments.py").write_text("x = 2\n")
    assert environment.project_tar(cluster)[0] != first


def test_docker_and_deploy_key_steps(tmp_path: Path) -> None:
    cluster = _project(tmp_path / "p", runtime="docker")
    (tmp_path / "p" / ".scaling" / "deploy_key").unlink()
    _, _, digest = environment.project_steps(cluster)
    docker = environment.docker_step(cluster, digest)
    assert docker.args == (f"demo:{digest[:12]}",)
    assert '$DOCKER image inspect "$1"' in docker.script and '$DOCKER build --tag "$1" "$BASE/project"' in docker.script
    assert 'DOCKER="$SUDO docker"' in docker.script

    key = environment.deploy_key_step(cluster)
    private = (tmp_path / "p" / ".scaling" / "deploy_key").read_bytes()
    assert key.stdin == private
    secret_line = private.decode().splitlines()[1]
    assert secret_line not in environment.quoted(key)  # not on the remote command line


def _bash(script: str, env: dict[str, str]) -> str:
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30, env=env, check=True)
    return done.stdout.strip()


def test_preamble_places_the_project_and_uses_sudo_n_for_a_non_root_user(tmp_path: Path) -> None:
    cluster = _project(tmp_path / "p", node_dir="my dir".replace(" ", "_"))
    show = cluster.preamble() + 'echo "$BASE|$PY|$SUDO"'
    env = {"PATH": os.environ["PATH"], "HOME": "/home/u"}
    assert _bash(show, env) == "/home/u/my_dir/demo|python3|" + ("" if os.geteuid() == 0 else "sudo -n")
    assert _bash(show, {**env, "SCALING_NODE_DIR": "/scratch/n1"}).startswith("/scratch/n1/demo|")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "id").write_text("#!/bin/sh\necho 1000\n")
    (fake / "id").chmod(0o755)
    assert _bash(show, {**env, "PATH": f"{fake}:{env['PATH']}"}).endswith("|sudo -n")


def test_table_and_failed_hosts() -> None:
    rows = [Row("a", "ssh", "ok", "fine"), Row("b", "ssh", "failed", "refused"), Row("b", "venv", "skipped", "")]
    text = render(rows)
    assert text.splitlines()[0].split() == ["HOST", "CHECK", "STATUS", "DETAIL"]
    assert "b     ssh    failed   refused" in text
    assert failed_hosts(rows) == ["b"]
    assert shell_command(["echo hi && false"]) == "echo hi && false"
    assert shell_command(["echo", "a b"]) == "echo 'a b'"


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _project(tmp_path / "p")
    (tmp_path / "p" / "requirements.txt").unlink()
    assert main(["setup", "--project", str(tmp_path / "p")]) == 2
    assert "no pinned requirements" in capsys.readouterr().err
    assert main(["exec", "--project", str(tmp_path / "p")]) == 2
    assert "give the command after --" in capsys.readouterr().err
    (tmp_path / "p" / "scaling.yml").write_text("name: demo\nnode_dir: /abs\nrendezvous_port: 0\n")
    assert main(["check", "--project", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "node_dir" in err and "rendezvous_port" in err
