"""``scaling show-deploy-key [--project DIR]``: the project's SSH deploy key, created once, public part printed.

The nodes fetch the project's repository with this key (registered as a read-only deploy key on GitHub),
and the generated workflows reach the nodes with it, so it belongs to the project, not to a person. It is
an ed25519 key made by OpenSSH's ``ssh-keygen`` (no passphrase: nothing is there to type it on a node)
in ``.scaling/deploy_key``: the directory ``0700``, the private key ``0600``, ``.scaling/`` listed in
``.gitignore`` so it is never committed. The command prints only the public key; the private key is
never printed or logged. Calling it again prints the same key and changes nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from scaling.experiment.project import ProjectError, find_project

__all__ = ["KEY_COMMENT", "KEY_DIR", "DeployKeyError", "deploy_key", "ensure_gitignored", "main"]

KEY_DIR = ".scaling"
KEY_NAME = "deploy_key"
KEY_COMMENT = "scaling-deploy-key"
_IGNORED = {".scaling", ".scaling/", "/.scaling", "/.scaling/"}


class DeployKeyError(RuntimeError):
    """The key cannot be created or read (the message says why and what to do)."""


def _keygen(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("ssh-keygen") is None:
        raise DeployKeyError(
            "ssh-keygen is not installed: install the OpenSSH client (e.g. `apt-get install openssh-client`)"
        )
    done = subprocess.run(["ssh-keygen", *args], capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise DeployKeyError(f"ssh-keygen {args[0]} failed: {' '.join(done.stderr.split())}")
    return done


def _create(private: Path, public: Path) -> None:
    """A new pair, made under temporary names and renamed into place private key first: an interruption
    leaves no half pair (at worst a private key whose public half is derived again next time)."""
    scratch = private.with_name(f".{private.name}.{os.getpid()}.tmp")
    for path in (scratch, scratch.with_name(scratch.name + ".pub")):
        path.unlink(missing_ok=True)
    _keygen("-q", "-t", "ed25519", "-N", "", "-C", KEY_COMMENT, "-f", str(scratch))
    os.chmod(scratch, 0o600)
    os.replace(scratch, private)
    os.replace(scratch.with_name(scratch.name + ".pub"), public)


def deploy_key(root: Path) -> tuple[str, bool]:
    """(the public key line, whether it was created now) of the project at ``root``."""
    directory = root / KEY_DIR
    private, public = directory / KEY_NAME, directory / f"{KEY_NAME}.pub"
    created = False
    if not directory.exists():
        directory.mkdir(mode=0o700)
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
    if not private.exists():
        if public.exists():
            raise DeployKeyError(
                f"{public} exists without its private key {private}: remove it (and the deploy key registered "
                "with it) to create a new pair"
            )
        _create(private, public)
        created = True
    elif not public.exists():  # derive it again from the private key (the same key, so nothing to re-register)
        public.write_text(_keygen("-y", "-f", str(private)).stdout, encoding="utf-8")
    try:
        text = public.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise DeployKeyError(f"cannot read {public}: {exc}") from None
    if not text.startswith("ssh-"):
        raise DeployKeyError(f"{public} does not hold an OpenSSH public key")
    return text, created


def ensure_gitignored(root: Path) -> bool:
    """Add ``.scaling/`` to ``root/.gitignore`` unless it is listed; returns whether the file changed."""
    path = root / ".gitignore"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if any(line.strip() in _IGNORED for line in text.splitlines()):
        return False
    if text and not text.endswith("\n"):
        text += "\n"
    path.write_text(f"{text}# the project's deploy key (scaling show-deploy-key): never commit it\n.scaling/\n")
    return True


def main(argv: Sequence[str] | None = None, prog: str = "scaling show-deploy-key") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Print the project's SSH deploy key (public part), creating it in .scaling/ on first use. "
        "Register it as a read-only deploy key of the repository so the nodes can fetch the code.",
    )
    parser.add_argument(
        "--project", metavar="DIR", help="The project (or a folder inside it); default the current directory."
    )
    args = parser.parse_args(argv)
    try:
        root = find_project(args.project)
        ensure_gitignored(root)
        key, created = deploy_key(root)
    except (ProjectError, DeployKeyError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if created:
        print(f"{prog}: created {root / KEY_DIR / KEY_NAME} (git-ignored); its public key:", file=sys.stderr)
    print(key)
    return 0
