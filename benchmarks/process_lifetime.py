"""How long a broken rank holds a 2-process `scaling train` (tiny model, CPU, gloo).

Run from the repository root: ``python benchmarks/process_lifetime.py kill9`` (seconds from ``kill -9`` of
rank 1 to the whole job's exit) or ``python benchmarks/process_lifetime.py stop [--collective-timeout S]
[--stall-warning S]`` (seconds from SIGSTOP of rank 1 to rank 0's first stall warning and to the job's exit;
the defaults are those of the config, 60 s and 600 s, so the exit then takes over 10 minutes).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib

from tests.core.processes import SCALING, Started, rank_pids, tiny_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["kill9", "stop"])
    parser.add_argument("--collective-timeout", type=float, help="topology.collective_timeout_s (default: config's)")
    parser.add_argument("--stall-warning", type=float, help="trainer.stall_warning_s (default: config's)")
    args = parser.parse_args()
    overrides = []
    if args.collective_timeout is not None:
        overrides += ["-o", f"topology.collective_timeout_s={args.collective_timeout}"]
    if args.stall_warning is not None:
        overrides += ["-o", f"trainer.stall_warning_s={args.stall_warning}"]
    with tempfile.TemporaryDirectory() as tmp:
        run = Started([str(SCALING), "train", str(tiny_run(Path(tmp))), *overrides])
        victim = None
        try:
            run.wait_for("step 3/", 180)
            victim = rank_pids(run.process.pid)[1]
            start = time.monotonic()
            if args.what == "kill9":
                os.kill(victim, signal.SIGKILL)
            else:
                os.kill(victim, signal.SIGSTOP)
                run.wait_for("has made no progress", 3600)
                print(f"SIGSTOP of rank 1 -> first warning on rank 0: {time.monotonic() - start:.1f} s", flush=True)
            code = run.wait(3600)
            print(f"{'kill -9' if args.what == 'kill9' else 'SIGSTOP'} of rank 1 -> job exit (code {code}): "
                  f"{time.monotonic() - start:.1f} s")  # fmt: skip
            print("last line: " + run.lines[-1].rstrip())
        finally:
            if victim is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, signal.SIGCONT)
            run.kill_all()


if __name__ == "__main__":
    main()
