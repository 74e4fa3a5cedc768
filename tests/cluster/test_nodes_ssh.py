"""``scaling nodes`` against real sshd "nodes" on 127.0.0.2 and 127.0.0.3 (and a dead 127.0.0.4).

One module-scoped pair of sshd daemons serves one combined scenario, in the order an operator meets it:
first contact pins the host keys, setup installs, a second setup changes nothing, exec propagates a
failure, a dead host is named, and a node whose host key changed is refused.
"""

from __future__ import annotations

import ensurepip
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from tests.cluster.sshd_nodes import SSHD, SshdNodes

from scaling.cluster.nodes.command import main

NODES = ["127.0.0.2", "127.0.0.3"]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdNodes]:
    # A real service, as the Slurm tests need theirs: missing, the test fails saying so (never a silent skip).
    if not (os.geteuid() == 0 and Path(SSHD).exists()):
        pytest.fail(f"the sshd nodes need root and {SSHD}: `make test` installs openssh-server (.ci/install-services)")
    started = SshdNodes(tmp_path_factory.mktemp("sshd"), NODES)
    try:
        yield started
    finally:
        started.stop()


def _project(root: Path, nodes: SshdNodes, hosts: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "name": "demo",
        "hosts": hosts,
        "port": nodes.port,
        "ssh_identity": str(nodes.client_key),
        "rendezvous_port": nodes.port + 1 if nodes.port < 65535 else nodes.port - 1,
        # the venv is made from this interpreter; pinning the pip that its ensurepip bundles means the
        # pinned requirements are satisfied offline (pip installs nothing, but runs and checks them)
        "node_python": sys.executable,
        "venv_system_site_packages": True,
        "min_free_disk_gb": 0.001,
        # Slurm's files in each node's own home (the nodes share this machine's /etc); the service manager
        # and package database on the nodes are the fixture's stand-ins (sshd_nodes._FAKES)
        "slurm_conf_dir": "~/etc/slurm",
        "munge_key_file": "~/etc/munge/munge.key",
    }
    (root / "scaling.yml").write_text(yaml.safe_dump(config))
    (root / "requirements.txt").write_text(f"pip=={ensurepip.version()}\n")
    (root / "src").mkdir(exist_ok=True)
    (root / "src" / "experiments.py").write_text("# experiments\n")
    return root


def _table(out: str) -> dict[tuple[str, str], str]:
    """(host, check) -> status, from the closing table."""
    rows = [re.split(r"\s{2,}", line.strip()) for line in out.splitlines() if line.strip()]
    return {(row[0], row[1]): row[2] for row in rows if len(row) >= 3 and row[0] != "HOST"}


def _fingerprint(public_key: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-l", "-f", str(public_key)], capture_output=True, text=True, timeout=30)
    return out.stdout.split()[1]


@pytest.mark.timeout(240)
def test_nodes_scenario(nodes: SshdNodes, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _project(tmp_path / "proj", nodes, NODES)

    # check: first contact pins both host keys, prints their fingerprints, every row passes
    assert main(["check", "--project", str(root)]) == 0
    out, err = capsys.readouterr()
    for address in NODES:
        assert f"{address}: first contact, pinned host key" in err
        assert _fingerprint(nodes.workdir / address / "host_key.pub") in err
        assert f"{address}  port {nodes.port + 1 if nodes.port < 65535 else nodes.port - 1}" in out
    assert "failed" not in out
    assert (root / ".scaling" / "known_hosts").read_text().count("ssh-ed25519") == 2

    # setup --slurm: ships the project, makes the venv, installs the deploy key, configures Slurm
    assert main(["setup", "--slurm", "--project", str(root)]) == 0
    out, err = capsys.readouterr()
    private_key = (root / ".scaling" / "deploy_key").read_text()
    assert private_key.strip().splitlines()[1] not in out + err  # the key never reaches a log
    for address in NODES:
        base = nodes.node_dir(address) / "demo"
        assert (base / "project" / "src" / "experiments.py").read_text() == "# experiments\n"
        assert not (base / "project" / ".scaling").exists()
        assert (base / "venv" / "bin" / "python").exists()
        assert (base / "deploy_key").read_text() == private_key
        assert (base / "deploy_key").stat().st_mode & 0o777 == 0o600
        for step in ("project", "venv", "deploy key", "munge key", "slurm config"):
            assert _table(out)[(address, step)] == "changed", out
        home = nodes.node_dir(address)
        assert (home / "etc" / "munge" / "munge.key").read_bytes() == (root / ".scaling" / "munge.key").read_bytes()
        assert (home / "etc" / "munge" / "munge.key").stat().st_mode & 0o777 == 0o400
        conf = (home / "etc" / "slurm" / "slurm.conf").read_text().splitlines()
        nodes_lines = [line for line in conf if line.startswith("NodeName=")]
        assert len(nodes_lines) == 2, conf
        for line, node in zip(nodes_lines, NODES, strict=True):
            name = node.replace(".", "-")
            assert re.fullmatch(rf"NodeName={name} NodeAddr={node} CPUs=\d+ RealMemory=\d+ State=UNKNOWN", line), line
        daemons = "munge slurmctld slurmd" if address == NODES[0] else "munge slurmd"
        assert (home / "restarts").read_text().split() == daemons.split()
    assert "first contact" not in err  # pinned keys are kept

    # a second setup changes nothing (no daemon restarted) and says so
    assert main(["setup", "--slurm", "--project", str(root)]) == 0
    out, _ = capsys.readouterr()
    table = _table(out)
    steps = ("project", "venv", "deploy key", "slurm packages", "munge key", "slurm config")
    assert [table[(a, s)] for a in NODES for s in steps] == ["unchanged"] * 12
    assert "changed" not in table.values()
    assert (nodes.node_dir(NODES[1]) / "restarts").read_text().split() == ["munge", "slurmd"]
    assert "every host was already set up: nothing changed" in out

    # an edited file ships again; the pinned environment and the key stay as they are
    (root / "src" / "experiments.py").write_text("# experiments, edited\n")
    assert main(["setup", "--project", str(root)]) == 0
    table = _table(capsys.readouterr().out)
    assert [table[(a, s)] for a in NODES for s in ("project", "venv", "deploy key")] == [
        "changed",
        "unchanged",
        "unchanged",
    ] * 2
    base = nodes.node_dir(NODES[0]) / "demo" / "project"
    assert (base / "src" / "experiments.py").read_text() == "# experiments, edited\n"

    # exec: output prefixed by host, the first failing host's status propagated and the host named
    fail_on = nodes.node_dir(NODES[1])
    command = f'echo "hello from $PWD"; test "$SCALING_NODE_DIR" != {fail_on} || exit 7'
    assert main(["exec", "--project", str(root), "--", command]) == 7
    out, err = capsys.readouterr()
    for address in NODES:
        assert f"{address} | hello from {nodes.node_dir(address) / 'demo' / 'project'}" in out
    assert f"failed on {NODES[1]} (exit 7)" in err
    assert main(["exec", "--project", str(root), "--", "true"]) == 0
    capsys.readouterr()

    # the deploy key lets a node fetch the repository: each node clones a repository from the other test
    # node over SSH with the installed key and wrapper (the key authorized there, as a deploy key would be)
    repo = tmp_path / "repo.git"
    subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True, timeout=30)
    work = tmp_path / "work"
    subprocess.run(["git", "clone", "-q", str(repo), str(work)], check=True, timeout=30, capture_output=True)
    (work / "README").write_text("fetched with the deploy key\n")
    git = ["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "add", "README"], check=True, timeout=30)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True, timeout=30)
    subprocess.run([*git, "push", "-q", "origin", "HEAD"], check=True, timeout=30, capture_output=True)
    authorized = nodes.workdir / "authorized_keys"
    authorized.write_text(authorized.read_text() + (root / ".scaling" / "deploy_key.pub").read_text())
    clone = f'GIT_SSH_COMMAND="$BASE/git-ssh" git clone -q ssh://{NODES[1]}:{nodes.port}{repo} "$BASE/clone"'
    assert main(["exec", "--project", str(root), "--", f'{clone} && cat "$BASE/clone/README"']) == 0
    out, _ = capsys.readouterr()
    assert all(f"{address} | fetched with the deploy key" in out for address in NODES), out

    # a host with nothing listening fails, is named in the table and the exit status; the others pass
    dead = "127.0.0.4"
    three = _project(tmp_path / "three", nodes, [*NODES, dead])
    (three / ".scaling").mkdir()
    (three / ".scaling" / "known_hosts").write_text((root / ".scaling" / "known_hosts").read_text())
    assert main(["check", "--project", str(three), "--connect-timeout", "3"]) == 1
    out, err = capsys.readouterr()
    table = _table(out)
    assert table[(dead, "ssh")] == "failed"
    assert any(line.startswith(dead) and "Connection refused" in line for line in out.splitlines()), out
    assert f"failed on 1 host(s): {dead}" in err
    assert all(status == "ok" for (host, _), status in table.items() if host != dead), out

    # a node whose host key changed is refused, with both fingerprints; the other node is unaffected
    old = _fingerprint(nodes.workdir / NODES[1] / "host_key.pub")
    nodes.new_host_key(NODES[1])
    new = _fingerprint(nodes.workdir / NODES[1] / "host_key.pub")
    assert main(["setup", "--project", str(root)]) == 1
    out, err = capsys.readouterr()
    assert f"{NODES[1]}: HOST KEY MISMATCH" in out
    assert old in out and new in out
    assert f"failed on 1 host(s): {NODES[1]}" in err
    assert _table(out)[(NODES[0], "deploy key")] == "unchanged"
    pinned = (root / ".scaling" / "known_hosts").read_text()
    assert pinned.count("ssh-ed25519") == 2  # the changed key was not recorded
    assert main(["exec", "--project", str(root), "--", "true"]) == 1
    _, err = capsys.readouterr()
    assert "HOST KEY MISMATCH" in err
