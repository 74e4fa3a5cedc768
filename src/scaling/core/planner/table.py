"""Plans as text: the ranked table ``scaling plan`` prints and the budget block a run prints at start.

Both read the same :class:`~scaling.core.planner.layout.LayoutPlan`, so what a user sees before launching
is what the run says about itself when it starts.
"""

from __future__ import annotations

from collections.abc import Sequence

from scaling.core.planner.layout import LayoutPlan
from scaling.core.zero.memory import human_bytes

__all__ = ["budget_block", "plan_table"]


def _unit(largest: float) -> tuple[str, float]:
    """GiB for real models, MiB for the small ones tests and laptops plan."""
    return ("GiB", 2.0**30) if largest >= 2**30 else ("MiB", 2.0**20)


def _comm(plan: LayoutPlan, scale: float) -> str:
    c = plan.communication
    if c is None:
        return "-"
    parts = []
    for group, volume in (("tp", c.tp), ("dp", c.dp), ("pp", c.pp)):
        if volume:
            parts.append(f"{group} {volume / scale:.1f} {c.links.get(group, '?')}")  # type: ignore[call-overload]
    return ", ".join(parts) or "none"


def plan_table(plans: Sequence[LayoutPlan], *, top: int = 15, show_infeasible: int = 8) -> str:
    """The best ``top`` layouts that fit (memory in GiB per rank, communication in GiB per rank and step
    with its link), then up to ``show_infeasible`` that do not, each with why."""
    fitting = [p for p in plans if p.fits][:top]
    unit, scale = _unit(max((p.memory.peak for p in fitting if p.memory is not None), default=0))
    comm_unit, comm_scale = _unit(max((p.communication.total for p in fitting if p.communication), default=0))
    rows: list[tuple[str, ...]] = [("#", "layout", f"params {unit}", "grads", "optim", "acts", "peak", "bubble",
             f"comm {comm_unit}/step", "step s", "tokens/s", "MFU")]  # fmt: skip
    for i, p in enumerate(fitting, 1):
        m, t = p.memory, p.time
        assert m is not None
        timing = (f"{t.bubble_fraction:.1%}", f"{t.step_s:.3g}", f"{p.tokens_per_s:,.0f}", f"{p.mfu:.1%}") if t else (
            "-", "-", "-", "-")  # fmt: skip
        rows.append((
            str(i), p.layout.describe(), *(f"{v / scale:.1f}" for v in (m.parameters, m.gradients, m.optimizer,
            m.activations, m.peak)), timing[0], _comm(p, comm_scale), *timing[1:],
        ))  # fmt: skip
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    if not fitting:
        lines.append("(no layout fits)")
    infeasible = [p for p in plans if not p.fits]
    if infeasible and show_infeasible:
        lines += [
            "",
            f"{len(infeasible)} layouts do not fit or cannot run; the closest to fitting and one of each other reason:",
        ]
        too_big = [p for p in infeasible if p.memory is not None]  # ordered by how far they are from fitting
        others: dict[str, LayoutPlan] = {}
        for p in infeasible:
            if p.memory is None:
                for reason in p.infeasible:
                    others.setdefault(reason, p)
        shown = [(p, "; ".join(p.infeasible)) for p in too_big[: max(1, show_infeasible // 2)]]
        shown += [(p, reason) for reason, p in others.items()]
        for p, reason in shown[:show_infeasible]:
            lines.append(f"  {p.layout.describe()}: {reason}")
    return "\n".join(lines)


def budget_block(plan: LayoutPlan, device: str) -> str:
    """The chosen layout's budget, printed when a run starts and by ``scaling train --plan-only``."""
    m, t, c = plan.memory, plan.time, plan.communication
    lines = [f"plan for {plan.layout.describe()} on {device}:"]
    if m is not None:
        limit = f" of {human_bytes(plan.device_memory)}" if plan.device_memory else ""
        lines.append(
            f"  memory per rank: parameters {human_bytes(m.parameters)}, gradients {human_bytes(m.gradients)}, "
            f"optimizer {human_bytes(m.optimizer)}, activations {human_bytes(m.activations)} "
            f"({m.in_flight} micro-batch{'es' if m.in_flight != 1 else ''} in flight), "
            f"peak {human_bytes(m.peak)}{limit}"
        )
    if c is not None:
        unit, scale = _unit(c.total)
        lines.append(f"  communication per rank and step: {_comm(plan, scale)} ({unit}, link)")
    if t is None and m is not None:
        lines.append("  step time: not predicted (the device has no peak FLOP/s; set trainer.mfu_device)")
    elif t is not None:
        lines.append(
            f"  predicted step {t.step_s:.3g} s: compute {t.compute_s:.3g}, recompute {t.recompute_s:.3g}, "
            f"tp {t.tp_comm_s:.3g}, dp {t.dp_comm_s:.3g}, pp {t.pp_comm_s:.3g}, bubble {t.bubble_s:.3g} "
            f"({t.bubble_fraction:.1%}), optimizer {t.optimizer_s:.3g}; {plan.tokens_per_s:,.0f} tokens/s, "
            f"MFU {plan.mfu:.1%}"
        )
        if t.assumed:
            lines.append(f"  assumed: {', '.join(t.assumed)}")
    for reason in plan.infeasible:
        lines.append(f"  does not fit: {reason}")
    return "\n".join(lines)
