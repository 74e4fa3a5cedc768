"""Assign parameters to training groups by name pattern, split by weight decay. Pure: names in, names out."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from scaling.core.config import ConfigError
from scaling.core.optimizer.config import TrainingGroupConfig

__all__ = ["ParamSlot", "assign_groups", "check_patterns", "pattern_match_counts"]


@dataclass(frozen=True)
class ParamSlot:
    """Parameters of one group with one weight decay: the unit the optimizer flattens and shards."""

    group: TrainingGroupConfig
    weight_decay: float
    names: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.group.name}/{'decay' if self.weight_decay else 'no_decay'}"


def pattern_match_counts(names: Sequence[str], groups: Sequence[TrainingGroupConfig]) -> list[int]:
    """How many of ``names`` each pattern matches, patterns in config order (all groups flattened).

    A pipeline stage sees only its own parameters; summing these counts over stages tells whether a
    pattern matches anything in the whole model.
    """
    return [sum(fnmatch.fnmatchcase(n, p) for n in names) for g in groups for p in g.parameters]


def check_patterns(groups: Sequence[TrainingGroupConfig], counts: Sequence[int]) -> None:
    """Raise for the first pattern that matched no parameter of the whole model."""
    flat = [(i, g, p) for i, g in enumerate(groups) for p in g.parameters]
    for (index, group, pattern), count in zip(flat, counts, strict=True):
        if count == 0:
            raise ConfigError(
                f"optimizer.training_groups.{index}.parameters: pattern {pattern!r} of group "
                f"{group.name!r} matches no parameter"
            )


def assign_groups(names: Sequence[str], groups: Sequence[TrainingGroupConfig]) -> list[ParamSlot]:
    """Each name joins the first group with a matching pattern; a name matching none is an error."""
    members: dict[str, list[str]] = {g.name: [] for g in groups}
    for name in names:
        group = next((g for g in groups if any(fnmatch.fnmatchcase(name, p) for p in g.parameters)), None)
        if group is None:
            raise ConfigError(
                f"optimizer.training_groups: parameter {name!r} matches no group's patterns "
                f"({[p for g in groups for p in g.parameters]})"
            )
        members[group.name].append(name)
    slots: list[ParamSlot] = []
    for group in groups:
        decay: list[str] = []
        no_decay: list[str] = []
        for name in members[group.name]:
            excluded = any(fnmatch.fnmatchcase(name, p) for p in group.no_weight_decay)
            (no_decay if excluded or group.weight_decay == 0 else decay).append(name)
        if decay:
            slots.append(ParamSlot(group, group.weight_decay, tuple(decay)))
        if no_decay:
            slots.append(ParamSlot(group, 0.0, tuple(no_decay)))
    return slots
