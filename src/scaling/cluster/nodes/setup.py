"""``scaling nodes setup``: the checks, then the project, its environment, the deploy key and optionally Slurm.

Only a host that passed every check is set up (a broken node stays as it was, and the table says why);
the hosts are set up in parallel, the steps of one host in order. Slurm needs the facts of every host to
write one ``slurm.conf``, so it is configured only when all hosts passed.
"""

from __future__ import annotations

from collections.abc import Callable

from scaling.cluster.nodes import environment, slurm
from scaling.cluster.nodes.checks import check_all, parallel
from scaling.cluster.nodes.cluster import Cluster, Row
from scaling.cluster.nodes.ssh import Node
from scaling.cluster.nodes.steps import Step, run_steps

__all__ = ["setup_all"]


def _node_steps(cluster: Cluster, node: Node, check: Step, send: Step, rest: list[Step]) -> list[Row]:
    shipped = run_steps(cluster, node, [check])
    if shipped[0].status == "changed":
        shipped = run_steps(cluster, node, [send])
    if shipped[0].failed:
        return shipped + [Row(node.host, step.name, "skipped", "after project failed") for step in rest]
    return shipped + run_steps(cluster, node, rest)


def setup_all(cluster: Cluster, say: Callable[[str], None], with_slurm: bool = False) -> list[Row]:
    """Every check and setup step on every host; the rows of the closing table."""
    # the local half first: a project that cannot be shipped (no requirements.txt) fails before any SSH
    check, send, digest = environment.project_steps(cluster)
    runtime = (
        environment.docker_step(cluster, digest)
        if cluster.config.runtime == "docker"
        else environment.venv_step(cluster)
    )
    common = [runtime, environment.deploy_key_step(cluster)]
    rows, facts = check_all(cluster, say)
    bad = {row.host for row in rows if row.failed}
    healthy = [node for node in cluster.nodes if node.host not in bad]
    plan: dict[str, list[Step]] = {node.host: list(common) for node in healthy}
    skipped: list[Row] = []
    if with_slurm:
        if bad:
            why = f"not configured: {', '.join(sorted(bad))} failed the checks"
            skipped = [Row(node.host, "slurm", "skipped", why) for node in healthy]
        else:
            try:
                per_host = slurm.slurm_steps(cluster.root, cluster.config, facts)
            except ValueError as exc:
                skipped = [Row(node.host, "slurm", "failed", str(exc)) for node in healthy]
            else:
                for host, steps in per_host.items():
                    plan[host] += steps
    done = parallel(healthy, lambda node: _node_steps(cluster, node, check, send, plan[node.host]))
    by_host: dict[str, list[Row]] = {}
    for row in [*rows, *(r for node_rows in done for r in node_rows), *skipped]:
        by_host.setdefault(row.host, []).append(row)
    return [row for node in cluster.nodes for row in by_host.get(node.host, [])]
