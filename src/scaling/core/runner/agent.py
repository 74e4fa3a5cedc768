"""``python -m scaling.core.runner.agent [torchrun arguments]``: torchrun, with one job, one lifetime and
one message.

This is ``torch.distributed.run`` (rendezvous, worker start, restarts, per-rank logs: all unchanged), run
inside a process that

* dies with its parent (``scaling train``, ``scaling launch``, pdsh, srun): a parent-death SIGTERM makes
  torchrun stop its workers, which save and exit, instead of training on for hours;
* gives its workers a report directory (``scaling.core.runner.reports``) and, when ranks fail, prints the
  first failure once (the rank and the cause; the traceback only for errors that are not bad input) and
  exits with that rank's code, 2 for bad input, instead of torchrun's per-rank tracebacks and summary;
* turns a graceful stop (SIGTERM, SIGINT: the workers save and return) into exit code 0 without torchrun's
  ``SignalException`` traceback;
* restarts (``--max-restarts N``) only what a restart can mend: after a rank dies or crashes it prints one
  line naming the rank and the cause and torchrun starts the world again (each rank resumes from the newest
  complete checkpoint, see ``scaling.core.runner.restarts``); bad input (exit code 2) is not retried, it
  would fail the same way. The launcher's start time goes to the workers (``SCALING_JOB_START``) for goodput.

torchrun's own log lines are silenced unless ``LOGLEVEL`` is set (torchrun's own switch for them). After a
signal, ranks that have not exited get SIGKILL after ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds (torchrun's
setting, default 30): a graceful stop must save within it. After a rank's failure the others get SIGTERM and,
``FAILURE_GRACE_S`` later at most, SIGKILL: without the failed rank no step and no checkpoint can complete
(collectives would only wait for it), so the world stops within seconds, to restart or to report.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scaling.core.runner.lifetime import AGENT_PID_ENV, die_with_parent
from scaling.core.runner.reports import REPORT_DIR_ENV, WorkerReport, done_ranks, read_reports
from scaling.core.runner.restarts import JOB_START_ENV

__all__ = ["FAILURE_GRACE_S", "main", "summarize_failure"]

FAILURE_GRACE_S = 3  # seconds the survivors of a failed rank get between SIGTERM and SIGKILL


def _quiet_torchrun() -> None:
    if "LOGLEVEL" in os.environ:
        return  # the user asked for torchrun's logs
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def summarize_failure(reports: Sequence[WorkerReport], exits: Mapping[int, tuple[int, float]]) -> tuple[str, int]:
    """The one message for a failed world and the exit code to return.

    ``reports`` come from the ranks that caught their error (most telling first, see ``read_reports``);
    ``exits`` are the ranks torchrun saw fail: exit code (negative: killed by that signal) and when. An error a
    rank raised itself explains the failure best; then a rank that died without a word (killed, out of memory)
    before the others reported (one killed later was killed by torchrun's own shutdown); the errors of
    collectives, which only say that a peer went away or timed out, come last. A rank killed by SIGTERM is the
    last suspect: that is how torchrun stops the ranks still running once one has failed.
    """
    own = [r for r in reports if not r.collective]
    if own:
        return _format(own[0]), own[0].exit_code
    reported = {r.rank for r in reports}
    first_report = min((r.time for r in reports), default=float("inf"))
    silent = sorted(
        ((rank, code, when) for rank, (code, when) in exits.items() if rank not in reported),
        key=lambda item: (item[1] == -signal.SIGTERM, item[2], item[0]),
    )
    for rank, code, when in silent:
        early = not reports or when <= int(first_report) + 1  # torchrun's times are whole seconds
        if code < 0 and code != -signal.SIGTERM and early:
            return f"rank {rank} was killed by {signal.Signals(-code).name}", 1
    if reports:
        return _format(reports[0]), reports[0].exit_code
    for rank, code, _ in silent:
        if code < 0:
            return f"rank {rank} was killed by {signal.Signals(-code).name}", 1
        if code == 2:
            return "", 2  # a script that reports bad input itself (and exits 2) has said all there is
        return f"rank {rank} exited with code {code}", code or 1
    return "the run failed", 1


def _format(report: WorkerReport) -> str:
    if report.exit_code == 2:
        return f"rank {report.rank}: {report.message}"
    if report.collective:  # where it waited says little; which peer and why is what matters
        return (
            f"rank {report.rank} failed in a collective: {report.message}\n(another rank stopped, died or is too "
            "slow; collectives wait topology.collective_timeout_s)"
        )
    head = f"{report.traceback.rstrip()}\n" if report.traceback else ""
    return f"{head}rank {report.rank} failed: {report.message}"


def _local_worker_count(args: Any) -> int | None:
    value = str(getattr(args, "nproc_per_node", ""))
    return int(value) if value.isdigit() else None


def _after_signal(directory: Path, signum: int, workers: int | None) -> int:
    """Exit code after torchrun passed ``signum`` on to its workers and waited for them."""
    reports = read_reports(directory)
    if reports:
        message, code = summarize_failure(reports, {})
        print(message, file=sys.stderr)
        return code
    done = done_ranks(directory)
    if not done:
        return 128 + signum  # the script does not report (or no rank got to finish): stopped by the signal
    if workers is not None and len(done) < workers:
        timeout = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30")
        print(
            f"{workers - len(done)} of {workers} ranks did not stop within the shutdown timeout ({timeout} s, "
            "TORCH_ELASTIC_SHUTDOWN_TIMEOUT) and were killed",
            file=sys.stderr,
        )
        return 1
    return 0


def _shutdown_timeout(args: Any) -> int:
    configured = getattr(args, "shutdown_timeout", None)
    return int(configured if configured is not None else os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30"))


def _use_shutdown_timeout_everywhere(seconds: int) -> None:
    """torch stops the workers of a failed world with a fixed 30 s grace (its process context's ``close`` and
    the agent's ``_stop_workers`` ignore ``--shutdown-timeout`` / ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``), so a
    rank that cannot react to SIGTERM (stopped, hung in a kernel) holds the job that long. Use the configured
    timeout there too (a no-op where torch's internals differ)."""
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing.api import PContext

    if hasattr(LocalElasticAgent, "_stop_workers") and hasattr(LocalElasticAgent, "_shutdown"):

        def stop_workers(self: Any, worker_group: Any) -> None:
            # Only a failed world (before a restart or the final report) is stopped here; signals go to _shutdown.
            self._shutdown(timeout=min(seconds, FAILURE_GRACE_S))

        LocalElasticAgent._stop_workers = stop_workers  # type: ignore[method-assign]
    close = PContext.close

    def close_within(self: Any, death_sig: signal.Signals | None = None, timeout: int = seconds) -> None:
        close(self, death_sig, min(timeout, seconds))

    PContext.close = close_within  # type: ignore[method-assign]


def _announce_restarts(directory: Path) -> None:
    """Before torchrun restarts a failed world: one line naming the rank and the cause; no restart for bad
    input (exit code 2), which would fail again the same way. A no-op where torch's internals differ."""
    from torch.distributed.elastic.agent.server.api import WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    if not hasattr(LocalElasticAgent, "_monitor_workers"):
        return
    monitor = LocalElasticAgent._monitor_workers

    def monitor_and_announce(self: Any, worker_group: Any) -> Any:
        result = monitor(self, worker_group)
        remaining = getattr(self, "_remaining_restarts", 0)
        if result.state in {WorkerState.FAILED, WorkerState.UNHEALTHY} and remaining > 0:
            exits = {rank: (f.exitcode, float(f.timestamp)) for rank, f in (result.failures or {}).items()}
            message, code = summarize_failure(read_reports(directory), exits)
            if code == 2:
                self._remaining_restarts = 0  # bad input: report it now instead of repeating it
            else:
                done = worker_group.spec.max_restarts - remaining + 1
                cause = message.splitlines()[-1] if message else "a rank failed"
                print(
                    f"{cause}; restarting the world from the last checkpoint (restart {done} of "
                    f"{worker_group.spec.max_restarts})",
                    file=sys.stderr,
                    flush=True,
                )
        return result

    LocalElasticAgent._monitor_workers = monitor_and_announce  # type: ignore[method-assign]


def main(argv: Sequence[str] | None = None) -> int:
    die_with_parent(signal.SIGTERM)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    _quiet_torchrun()
    args = parse_args(list(sys.argv[1:] if argv is None else argv))  # type: ignore[no-untyped-call]
    _use_shutdown_timeout_everywhere(_shutdown_timeout(args))
    directory = Path(tempfile.mkdtemp(prefix="scaling-run-"))
    os.environ[REPORT_DIR_ENV] = str(directory)  # the workers inherit this environment
    os.environ[AGENT_PID_ENV] = str(os.getpid())
    os.environ[JOB_START_ENV] = str(time.time())  # the workers of every attempt inherit it: the job's wall time
    _announce_restarts(directory)
    if getattr(args, "max_restarts", 0):
        # torchrun keeps one rendezvous store for all attempts, so a restarted world could read the addresses
        # its predecessors left there (gloo: "connection refused"); a fresh store per attempt has none.
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    try:
        run(args)  # type: ignore[no-untyped-call]
        return 0
    except SignalException as exc:
        return _after_signal(directory, int(exc.sigval), _local_worker_count(args))
    except ChildFailedError as exc:
        exits = {rank: (failure.exitcode, float(failure.timestamp)) for rank, failure in exc.failures.items()}
        message, code = summarize_failure(read_reports(directory), exits)
        if message:
            print(message, file=sys.stderr)
        return code
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
