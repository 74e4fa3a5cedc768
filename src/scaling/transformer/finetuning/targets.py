"""Which projections a LoRA target names, and the error when a target names none.

A target is a name or a shell-style pattern (``fnmatch``), matched against a projection's own name
(``query``) and its name inside the decoder layer (``attention.query``, ``mlp.*``). A target that matches
nothing would otherwise train nothing and say nothing, so it is refused, naming the closest real names.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

__all__ = ["matches_target", "no_match_message", "unmatched_targets"]


def matches_target(pattern: str, qualified_name: str) -> bool:
    """Whether ``pattern`` names the module at ``qualified_name`` (e.g. ``attention.query``)."""
    return fnmatchcase(qualified_name, pattern) or fnmatchcase(qualified_name.rsplit(".", 1)[-1], pattern)


def unmatched_targets(patterns: Iterable[str], qualified_names: Iterable[str]) -> list[str]:
    """The patterns that match none of ``qualified_names``, in the given order."""
    names = list(qualified_names)
    return [p for p in patterns if not any(matches_target(p, name) for name in names)]


def no_match_message(pattern: str, qualified_names: Sequence[str]) -> str:
    """One line: the pattern and the (up to three) nearest module names, short or qualified."""
    candidates = sorted({*qualified_names, *(name.rsplit(".", 1)[-1] for name in qualified_names)})
    nearest = difflib.get_close_matches(pattern, candidates, n=3, cutoff=0.0)
    return f"LoRA target {pattern!r} matches no module; nearest module names: {', '.join(nearest)}"
