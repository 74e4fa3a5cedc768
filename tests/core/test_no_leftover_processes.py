"""`make test` leaves no processes behind: the session check in tests/conftest.py finds, kills and reports
what a test left running (here a test that starts a process and forgets it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .processes import alive

_LEAKY_TEST = """
import subprocess, sys
from pathlib import Path

def test_forgets_its_child():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    Path("child.pid").write_text(str(child.pid))
"""


@pytest.mark.timeout(120)
def test_a_process_left_running_by_a_test_fails_the_session_and_is_killed(tmp_path: Path) -> None:
    shutil.copy(Path(__file__).parents[1] / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_leaky.py").write_text(_LEAKY_TEST)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), "test_leaky.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    child = int((tmp_path / "child.pid").read_text())
    assert result.returncode != 0, result.stdout
    assert "the tests left 1 processes running (now killed)" in result.stdout, result.stdout
    assert str(child) in result.stdout
    deadline = time.monotonic() + 10
    while alive([child]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive([child]) == []
