"""The closing table of ``scaling nodes setup|check``: one block per node, a line per check."""

from __future__ import annotations

from collections.abc import Sequence

from scaling.cluster.nodes.cluster import Row

__all__ = ["failed_hosts", "render"]


def render(rows: Sequence[Row]) -> str:
    """Columns host, check, status, detail, padded to the widest entry; hosts in the order of ``rows``."""
    header = Row("HOST", "CHECK", "STATUS", "DETAIL")
    table = [header, *rows]
    widths = [max(len(getattr(row, field)) for row in table) for field in ("host", "check", "status")]
    lines = []
    previous = None
    for row in table:
        if previous is not None and row.host != previous:
            lines.append("")
        previous = row.host if row is not header else None
        cells = (row.host.ljust(widths[0]), row.check.ljust(widths[1]), row.status.ljust(widths[2]), row.detail)
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def failed_hosts(rows: Sequence[Row]) -> list[str]:
    """Hosts with at least one failed row, in order of first appearance."""
    return list(dict.fromkeys(row.host for row in rows if row.failed))
