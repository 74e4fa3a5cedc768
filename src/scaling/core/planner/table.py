"""Plans as text: the ranked table ``scaling plan`` prints and the budget block a run prints at start.

Both read the same :class:`~scaling.core.planner.layout.LayoutPlan`, so what a user sees before launching
is what the run says about itself when it starts.
"""

from __future__ import annotations

from collections.abc import Sequence

from scaling.core.planner.layout import LayoutPlan
from scaling.core.zero.memory import human_bytes

__all__ = ["budget_block", "plan_table"]


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f}"


def _comm(plan: LayoutPlan) -> str:
    c = plan.communication
    if c is None:
        return "-"
    parts = []
    for group, volume in (("tp", c.tp), ("dp", c.dp), ("pp", c.pp)):
        if volume:
            parts.append(f"{group} {_gb(volume)} {c.links.get(group, '?')}")  # type: ignore[call-overload]
    return ", ".join(parts) or "none"


def plan_table(plans: Sequence[LayoutPlan], *, top: int = 15, show_infeasible: int = 8) -> str:
    """The best ``top`` layouts that fit (memory in GiB per rank, communication in GiB per rank and step
    with its link), then up to ``show_infeasible`` that do not, each with why."""
    fitting = [p for p in plans if p.fits][:top]
    rows = [("#", "layout", "params", "grads", "optim", "acts", "peak", "bubble", "comm GiB/step", "step s",
             "tokens/s", "MFU")]  # fmt: skip
    for i, p in enumerate(fitting, 1):
        m, t = p.memory, p.time
        assert m is not None and t is not None
        rows.append((
            str(i), p.layout.describe(), _gb(m.parameters), _gb(m.gradients), _gb(m.optimizer), _gb(m.activations),
            _gb(m.peak), f"{t.bubble_fraction:.1%}", _comm(p), f"{t.step_s:.3g}", f"{p.tokens_per_s:,.0f}",
            f"{p.mfu:.1%}",
        ))  # fmt: skip
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    if not fitting:
        lines.append("(no layout fits)")
    infeasible = [p for p in plans if not p.fits]
    if infeasible and show_infeasible:
        lines.append("")
        lines.append(f"{len(infeasible)} layouts do not fit or cannot run, for example:")
        seen: set[str] = set()
        for p in infeasible:
            reason = "; ".join(p.infeasible)
            key = reason.split(" (")[0] if reason.startswith("needs") else reason
            if key in seen and len(seen) < show_infeasible:
                continue
            seen.add(key)
            lines.append(f"  {p.layout.describe()}: {reason}")
            if len(seen) >= show_infeasible:
                break
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
            f"({m.in_flight} micro-batches in flight), peak {human_bytes(m.peak)}{limit}"
        )
    if c is not None and t is not None:
        lines.append(f"  communication per rank and step: {_comm(plan)} (GiB, link)")
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
