"""A rank-aware text logger: every line says which process wrote it.

``2026-11-24 11:40:00 INFO [rank 3 pp0 dp1 tp1] message``: with hundreds of ranks writing into one
stream, a line without its coordinates is useless for debugging.

On a terminal, rank 0 may be drawing a progress bar on the last line while other ranks (other processes:
they cannot go through rank 0's bar) write theirs. Each line therefore starts by returning to column 0
and clearing that line, so it replaces the half-drawn bar instead of being glued to its end; the bar is
drawn again below it at its next update. Rank 0's own lines go through the bar (``tqdm.write``) while
it is shown.
"""

from __future__ import annotations

import logging
import os
import sys

from scaling.core.logging.config import LoggerConfig

__all__ = ["configure_logging", "get_logger"]

_ROOT = "scaling"
_HANDLER_NAME = "scaling-rank-aware"


_CLEAR_LINE = "\r\x1b[2K"  # carriage return, then erase the whole line (a progress bar drawn there)


class _LineClearingFormatter(logging.Formatter):
    """Prefixes every record with :data:`_CLEAR_LINE`; used only when the stream is a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        return _CLEAR_LINE + super().format(record)


class _RankFilter(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank_prefix = self.prefix
        return True


def get_logger(name: str = _ROOT) -> logging.Logger:
    """A logger under the ``scaling`` hierarchy (``get_logger("scaling.trainer")``)."""
    return logging.getLogger(name if name.startswith(_ROOT) else f"{_ROOT}.{name}")


def configure_logging(
    config: LoggerConfig | None = None,
    rank: int | None = None,
    coord: tuple[int, int, int] | None = None,
) -> logging.Logger:
    """Install (or replace) the rank-aware handler on the ``scaling`` logger; safe to call repeatedly.

    ``rank`` defaults to ``$RANK``; ``coord`` is (pp, dp, tp) once the topology is known.
    """
    config = config or LoggerConfig()
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    prefix = f"rank {rank}"
    if coord is not None:
        pp, dp, tp = coord
        prefix += f" pp{pp} dp{dp} tp{tp}"
    logger = logging.getLogger(_ROOT)
    logger.setLevel(config.log_level.upper())
    logger.propagate = False
    for handler in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    formatter = _LineClearingFormatter if sys.stderr.isatty() else logging.Formatter
    handler.setFormatter(formatter("%(asctime)s %(levelname)s [%(rank_prefix)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler.addFilter(_RankFilter(prefix))
    logger.addHandler(handler)
    return logger
