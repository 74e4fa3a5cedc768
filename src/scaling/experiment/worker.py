"""What each rank of ``scaling run`` executes (started by torchrun, never by hand):

    python -m scaling.experiment.worker --project ROOT --experiment NAME --run-dir DIR

It dies with its launcher, sends its output to ``DIR/logs/rank_N.log`` (rank 0's to the console too),
loads the project's experiments, makes the run visible to the experiment through ``current_run()``
(name, directory, where to save checkpoints, the newest checkpoint to resume from, params, seed), and
runs it with the parameters recorded in ``DIR/params.json`` and the recorded seed, which ``Experiment.run``
applies before the function starts. Nothing is validated here that ``scaling run`` did not already check:
a rank that fails prints its traceback into its log and exits 1, and torchrun stops the others.

SIGTERM (a scheduler taking the nodes back) sets ``current_run().stop_requested`` when the experiment has
looked at that flag, so its loop can save a checkpoint and return; an experiment that never looked at it is
ended by SIGTERM at once, as without the handler.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from scaling.core.runner.lifetime import die_with_parent
from scaling.experiment.rank_output import attempt_header, rank_output
from scaling.experiment.records import RunPaths, now_iso

if TYPE_CHECKING:
    from scaling.experiment.run_context import RunContext

__all__ = ["main"]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scaling.experiment.worker", description=__doc__)
    parser.add_argument("--project", required=True, type=Path, help="The project root (holds scaling.yml).")
    parser.add_argument("--experiment", required=True, help="The experiment's name.")
    parser.add_argument("--run-dir", required=True, type=Path, help="The run directory `scaling run` prepared.")
    return parser.parse_args(argv)


def _run(project: Path, name: str, run_dir: Path) -> None:
    # Imported here, inside the redirected output: the project's own imports (torch...) print into the logs.
    from scaling.experiment.records import last_checkpoint, read_record
    from scaling.experiment.registry import find_experiment
    from scaling.experiment.run_context import RunContext, _set_current_run

    paths = RunPaths(run_dir)
    record = read_record(run_dir)
    values = json.loads(paths.params.read_text(encoding="utf-8"))
    experiment = find_experiment(project, name)
    seed = int(record["seed"])
    context = RunContext(
        name=run_dir.name,
        run_dir=run_dir,
        checkpoint_dir=paths.checkpoints,
        last_checkpoint=last_checkpoint(run_dir),
        params=experiment.parse(values),
        seed=seed,
    )
    _set_current_run(context)
    previous = signal.signal(signal.SIGTERM, _stop_handler(context))
    try:
        experiment.run(values, seed=seed)
    finally:
        signal.signal(signal.SIGTERM, previous)
        _set_current_run(None)
        _destroy_process_group()


def _stop_handler(context: RunContext) -> Callable[[int, FrameType | None], None]:
    """SIGTERM: ask the experiment to stop if it watches ``stop_requested``, else die of the signal as before."""

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if context.stop_watched:
            print(f"run {context.name}: SIGTERM received, stop requested (save and return)", file=sys.stderr)
            context.request_stop()
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    return on_sigterm


def _destroy_process_group() -> None:
    """A world the experiment's model initialised ends with the run (torch warns about one left open)."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    launcher = os.getppid()  # torchrun; read first, so a launcher that dies while we import is still noticed
    args = _parse(argv)
    die_with_parent(expected_parent=launcher)
    rank = int(os.environ.get("RANK", "0"))
    run_dir = args.run_dir.resolve()
    attempt = _attempt(run_dir)
    header = attempt_header(attempt, run_dir.name, rank, now_iso())
    with rank_output(RunPaths(run_dir).log(rank), console=rank == 0, header=header):
        try:
            _run(args.project.resolve(), args.experiment, run_dir)
        except KeyboardInterrupt:
            print(f"rank {rank}: interrupted", file=sys.stderr)
            return 130
        except SystemExit as exc:  # an experiment that calls sys.exit(code) ends with that code
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if code:
                print(f"rank {rank}: the experiment exited with code {code}", file=sys.stderr)
            return code
        except BaseException:
            traceback.print_exc()
            return 1
    return 0


def _attempt(run_dir: Path) -> object:
    try:
        return json.loads(RunPaths(run_dir).record.read_text(encoding="utf-8")).get("attempts", "?")
    except (OSError, ValueError, AttributeError):
        return "?"


if __name__ == "__main__":
    sys.exit(main())
