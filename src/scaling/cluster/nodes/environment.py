"""Setup steps that put the project on a node: its files, its pinned environment (venv or Docker image),
and the deploy key git fetches it with.

The project travels as a tar stream on the SSH session's stdin (no rsync needed on the node), made
deterministically (sorted names, fixed times and owners) so its SHA-256 names the content: a node that
already holds that hash is unchanged and nothing is sent. The venv is recorded with the hash of the
pinned ``requirements.txt`` and the venv options; the Docker image is tagged with the project hash.
"""

from __future__ import annotations

import hashlib
import io
import os
import shlex
import subprocess
import tarfile
from pathlib import Path

from scaling.cluster.nodes.cluster import Cluster
from scaling.cluster.nodes.steps import Step
from scaling.experiment.deploy_key import KEY_DIR, KEY_NAME, deploy_key

__all__ = ["deploy_key_step", "docker_step", "project_files", "project_steps", "project_tar", "venv_step"]

_SKIP_DIRS = {".git", ".scaling", ".venv", "__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"}

_PROJECT_CHECK = r"""
if [ -f "$BASE/project.sha256" ] && [ "$(cat "$BASE/project.sha256")" = "$1" ] && [ -d "$BASE/project" ]; then
  echo "unchanged $BASE/project"
else
  echo "changed"
fi
"""

_PROJECT_SEND = r"""
mkdir -p "$BASE"
rm -rf "$BASE/project.new"
mkdir "$BASE/project.new"
tar -x -C "$BASE/project.new" -f -
rm -rf "$BASE/project"
mv "$BASE/project.new" "$BASE/project"
echo "$1" > "$BASE/project.sha256"
echo "changed $BASE/project ($2 files)"
"""

_VENV = r"""
V="$BASE/venv"
want="$1"
if [ -x "$V/bin/python" ] && [ "$(cat "$V/.scaling-requirements.sha256" 2>/dev/null)" = "$want" ]; then
  echo "unchanged $V"
  exit 0
fi
if [ -f "$V/pyvenv.cfg" ] && ! grep -qx "include-system-site-packages = $2" "$V/pyvenv.cfg"; then
  rm -rf "$V"  # made with the other --system-site-packages setting
fi
if [ ! -x "$V/bin/python" ]; then
  if [ "$2" = true ]; then "$PY" -m venv --system-site-packages "$V"; else "$PY" -m venv "$V"; fi
fi
"$V/bin/python" -m pip install --no-input --disable-pip-version-check --quiet \
  --requirement "$BASE/project/requirements.txt" >&2
echo "$want" > "$V/.scaling-requirements.sha256"
echo "changed $V"
"""

_DOCKER = r"""
if ! command -v docker >/dev/null 2>&1; then
  echo "docker is not installed on this node (runtime: docker in scaling.yml)" >&2
  exit 1
fi
DOCKER="docker"
docker info >/dev/null 2>&1 || DOCKER="$SUDO docker"
if $DOCKER image inspect "$1" >/dev/null 2>&1; then
  echo "unchanged image $1"
  exit 0
fi
$DOCKER build --tag "$1" "$BASE/project" >&2
echo "changed image $1"
"""

_DEPLOY_KEY = r"""
umask 077
mkdir -p "$BASE"
state=unchanged
place() {  # NEW TARGET: TARGET becomes NEW unless it already holds exactly that
  if [ -f "$2" ] && cmp -s "$1" "$2"; then rm -f "$1"; else mv "$1" "$2"; state=changed; fi
}
cat > "$BASE/.deploy_key.new"
place "$BASE/.deploy_key.new" "$BASE/deploy_key"
chmod 600 "$BASE/deploy_key"
{
  echo '#!/bin/sh'
  echo '# written by scaling nodes setup: git reaches the repository with the deploy key'
  echo '# the git host is pinned on first contact in its own file (accept-new: recorded once, then checked)'
  printf 'exec ssh -i "%s" -o IdentitiesOnly=yes -o BatchMode=yes' "$BASE/deploy_key"
  printf ' -o StrictHostKeyChecking=accept-new'
  printf ' -o UserKnownHostsFile="%s" "$@"\n' "$BASE/git_known_hosts"
} > "$BASE/.git-ssh.new"
place "$BASE/.git-ssh.new" "$BASE/git-ssh"
chmod 700 "$BASE/git-ssh"
echo "$state key in $BASE/deploy_key; fetch with GIT_SSH_COMMAND=$BASE/git-ssh git clone ..."
"""


def project_files(cluster: Cluster) -> list[str]:
    """The project's files to ship (relative POSIX paths, sorted): what git tracks or would track when the
    project is a git checkout, else every file; never the deploy key folder, venvs, caches or run records."""
    root = cluster.root
    skip_top = {cluster.config.runs_dir.strip("/").split("/")[0]}
    names: list[str] = []
    try:
        listed = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            timeout=60,
            check=True,
        ).stdout.decode()
        names = [name for name in listed.split("\0") if name and (root / name).is_file()]
    except (OSError, subprocess.SubprocessError):
        for directory, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
            names += [str((Path(directory) / f).relative_to(root).as_posix()) for f in files]
    return sorted(
        name for name in names if not (set(Path(name).parts) & _SKIP_DIRS) and Path(name).parts[0] not in skip_top
    )


def project_tar(cluster: Cluster) -> tuple[bytes, int]:
    """A deterministic tar of :func:`project_files` (same content, same bytes) and its file count."""
    buffer = io.BytesIO()
    names = project_files(cluster)
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            path = cluster.root / name
            info = tarfile.TarInfo(name)
            info.size = path.stat().st_size
            info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
            info.mtime = 0
            with path.open("rb") as file:
                tar.addfile(info, file)
    return buffer.getvalue(), len(names)


def project_steps(cluster: Cluster) -> tuple[Step, Step, str]:
    """(the check step, the send step, the project hash): the sender runs only when the check says changed."""
    data, count = project_tar(cluster)
    digest = hashlib.sha256(data).hexdigest()
    check = Step("project", _PROJECT_CHECK, (digest,), timeout=60)
    send = Step("project", _PROJECT_SEND, (digest, str(count)), stdin=data, timeout=600)
    return check, send, digest


def venv_step(cluster: Cluster) -> Step:
    """Install the pinned ``requirements.txt`` into ``$BASE/venv`` unless that exact pin is installed."""
    requirements = cluster.root / "requirements.txt"
    if not requirements.is_file():
        raise FileNotFoundError(
            f"{requirements}: no pinned requirements to install on the nodes (`scaling init` writes one)"
        )
    system = "true" if cluster.config.venv_system_site_packages else "false"
    digest = hashlib.sha256(
        requirements.read_bytes() + f"\0{cluster.config.node_python}\0{system}".encode()
    ).hexdigest()
    return Step("venv", _VENV, (digest, system), timeout=1800)


def docker_image(cluster: Cluster, project_digest: str) -> str:
    return f"{cluster.config.name.lower()}:{project_digest[:12]}"


def docker_step(cluster: Cluster, project_digest: str) -> Step:
    """Build the project's image on the node (tagged by content) unless that tag exists there."""
    return Step("docker image", _DOCKER, (docker_image(cluster, project_digest),), timeout=3600)


def deploy_key_step(cluster: Cluster) -> Step:
    """Install the project's deploy key (created if needed) on the node; the key travels on stdin only."""
    deploy_key(cluster.root)
    private = (cluster.root / KEY_DIR / KEY_NAME).read_bytes()
    return Step("deploy key", _DEPLOY_KEY, stdin=private, timeout=60)


def quoted(step: Step) -> str:
    """The remote command line of ``step`` (for dry runs and tests): shows that no secret is in it."""
    return shlex.join(["bash", "-c", step.script, "scaling-node", *step.args])
