"""``scaling report RUN_DIR [RUN_DIR ...] [-o report.html]``: plot runs and compare them in one HTML page.

A RUN_DIR is a folder holding a ``metrics.jsonl``: an experiment run (``runs/EXPERIMENT/RUN_NAME``, with
its record.json and params.json) or a ``scaling train`` log dir (``logger.log_dir``; its parameters are a
``config.json``/``config.yml`` kept beside the metrics, if any). A folder whose one sub-folder holds the
metrics is read as that sub-folder. Runs still writing are read as far as they got.

Writes the page (default ``report.html``) and, beside it, the plots as PNG files in ``STEM_files/``
(``report_files/loss.png``, ...); missing folders are made. The page embeds every plot and needs nothing
else: no file, script or URL, so it can be mailed or opened offline.
Needs matplotlib: ``pip install 'scaling[report]'``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from scaling.core.config import ConfigError

__all__ = ["files_dir", "main"]

MISSING_MATPLOTLIB = "scaling report needs matplotlib: pip install 'scaling[report]'"


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="A folder with a metrics.jsonl.")
    parser.add_argument(
        "-o", "--output", type=Path, default=Path("report.html"), metavar="HTML",
        help="The page to write (default: report.html); the PNGs go to STEM_files/ beside it (folders are made).",
    )  # fmt: skip
    parser.add_argument("--title", default="scaling report", help="The page's heading.")
    return parser


def files_dir(output: Path) -> Path:
    """Where the PNGs of the page ``output`` go: ``report.html`` -> ``report_files/`` beside it."""
    return output.with_name(f"{output.stem}_files")


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401  (the optional extra; imported for real, so a broken install counts too)
    except ImportError:
        return False
    return True


def _write(output: Path, text: str) -> None:
    scratch = output.with_name(f".{output.name}.tmp")
    scratch.write_text(text, encoding="utf-8")
    scratch.replace(output)  # a page open in a browser is never seen half written


def _report(args: argparse.Namespace, prog: str) -> int:
    if not _has_matplotlib():  # first: a missing tool is worth knowing before fixing the run folders
        print(MISSING_MATPLOTLIB, file=sys.stderr)
        return 2
    from scaling.experiment.report.html import render_page
    from scaling.experiment.report.plots import draw_plots
    from scaling.experiment.report.reading import read_runs

    runs = read_runs(args.run_dirs)

    output: Path = args.output
    if output.is_dir():
        raise ConfigError(f"-o {output}: is a directory (expected the HTML file to write)")
    pngs = files_dir(output)
    try:
        plots = draw_plots(runs, pngs)
        _write(output, render_page(runs, plots, title=args.title))
    except OSError as exc:
        raise ConfigError(f"-o {output}: cannot write {exc.filename or output} ({exc.strerror or exc})") from None
    print(f"{prog}: wrote {output} ({len(runs)} run(s), {len(plots)} plot(s); PNGs in {pngs})")
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "scaling report") -> int:
    args = _parser(prog).parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return _report(args, prog)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
