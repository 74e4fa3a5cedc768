"""``scaling nodes check``: what a node must offer before it can train (OS, Python, disk, clock, GPUs, network).

One probe script per host (run in parallel threads) reports facts as ``key=value`` lines, parsed and judged
here, so the thresholds live in Python with their tests rather than in shell. The rendezvous check is
cross-node: each host in turn listens on the rendezvous port for a few seconds while every other host
connects to it, so it finds firewalls and wrong addresses before a 64-GPU job hangs at ``init_process_group``.
Listening one host at a time also lets several "nodes" share one machine (as in the tests).
"""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from scaling.cluster.nodes import known_hosts, ssh
from scaling.cluster.nodes.cluster import Cluster, Row
from scaling.cluster.nodes.ssh import Node

__all__ = ["check_all", "judge_probe", "parallel", "pin_all"]

T = TypeVar("T")
R = TypeVar("R")
MIN_PYTHON = (3, 10)
LISTEN_SECONDS = 8.0

_PROBE = r"""
echo "os=$( (. /etc/os-release && echo "$PRETTY_NAME") 2>/dev/null || uname -sr)"
echo "python=$("$PY" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null || echo missing)"
mkdir -p "$BASE"
echo "disk_free_kb=$(df -Pk "$BASE" | awk 'NR==2 {print $4}')"
if command -v nvidia-smi >/dev/null 2>&1; then
  if gpus=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1); then
    echo "gpus=$(printf '%s\n' "$gpus" | grep -c .)"
    echo "gpu_driver=$(printf '%s\n' "$gpus" | head -n 1 | awk -F', *' '{print $NF}')"
    echo "gpu_name=$(printf '%s\n' "$gpus" | head -n 1 | awk -F', *' '{print $1}')"
  else
    echo "gpu_error=$(printf '%s' "$gpus" | tr '\n' ' ')"
  fi
else
  echo "gpus=0"
fi
echo "hostname=$(hostname -s 2>/dev/null || hostname)"
echo "cpus=$(nproc 2>/dev/null || echo 1)"
echo "mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo 2>/dev/null || echo 0)"
echo "time=$(date +%s.%N)"
"""

_LISTEN = r"""
exec "$PY" -c '
import socket, sys, time
port, expected, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    server.bind(("", port))
except OSError as exc:
    print("busy", exc, flush=True)
    sys.exit(3)
server.listen(16)
print("listening", flush=True)
deadline, accepted = time.monotonic() + seconds, 0
while accepted < expected and time.monotonic() < deadline:
    server.settimeout(max(0.05, deadline - time.monotonic()))
    try:
        server.accept()[0].close()
    except (socket.timeout, OSError):
        break
    accepted += 1
print("accepted", accepted, flush=True)
' "$1" "$2" "$3"
"""

_CONNECT = r"""
"$PY" -c '
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
' "$1" "$2" "$3"
"""


def parallel(items: Sequence[T], work: Callable[[T], R]) -> list[R]:
    """``work`` on every item in its own thread, results in the items' order."""
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=min(32, len(items))) as pool:
        return list(pool.map(work, items))


def pin_all(cluster: Cluster, say: Callable[[str], None]) -> dict[str, Row]:
    """Pin every host's key (first contact); returns a failed row for each host that cannot be pinned."""

    def pin(node: Node) -> list[Row]:
        try:
            recorded = known_hosts.pin(node.known_hosts, node.host, node.port, node.connect_timeout)
        except known_hosts.HostKeyError as exc:
            return [Row(node.host, "ssh", "failed", str(exc))]
        if recorded:
            say(f"{node.host}: first contact, pinned host key {', '.join(recorded)} in {node.known_hosts}")
        return []

    failures = parallel(cluster.nodes, pin)
    return {rows[0].host: rows[0] for rows in failures if rows}


def judge_probe(
    host: str, facts: dict[str, str], sent: float, received: float, min_free_gb: float, max_skew_s: float
) -> list[Row]:
    """The check rows of one host from its probe's facts (``sent``/``received``: this machine's clock)."""
    rows = [Row(host, "os", "ok", facts.get("os", "unknown"))]
    python = facts.get("python", "missing")
    try:
        version = tuple(int(part) for part in python.split(".")[:2])
        ok = version >= MIN_PYTHON
    except ValueError:
        ok = False
    need = ".".join(map(str, MIN_PYTHON))
    rows.append(Row(host, "python", "ok" if ok else "failed", python if ok else f"{python} (need >= {need})"))
    try:
        free_gb = int(facts.get("disk_free_kb", "")) * 1024 / 1e9
        status = "ok" if free_gb >= min_free_gb else "failed"
        rows.append(Row(host, "disk", status, f"{free_gb:.1f} GB free (need >= {min_free_gb:g})"))
    except ValueError:
        rows.append(Row(host, "disk", "failed", "free space unknown"))
    try:
        remote = float(facts.get("time", ""))
        skew = remote - sent if remote < sent else (remote - received if remote > received else 0.0)
        status = "ok" if abs(skew) <= max_skew_s else "failed"
        rows.append(Row(host, "clock", status, f"{skew:+.2f} s off (max {max_skew_s:g}; ±{received - sent:.2f})"))
    except ValueError:
        rows.append(Row(host, "clock", "failed", "time unknown"))
    if "gpu_error" in facts:
        rows.append(Row(host, "gpus", "failed", f"nvidia-smi failed: {facts['gpu_error'].strip()}"))
    elif facts.get("gpus", "0") == "0":
        rows.append(Row(host, "gpus", "ok", "none"))
    else:
        detail = f"{facts['gpus']} x {facts.get('gpu_name', '?')}, driver {facts.get('gpu_driver', '?')}"
        rows.append(Row(host, "gpus", "ok", detail))
    return rows


def probe(cluster: Cluster, node: Node) -> tuple[list[Row], dict[str, str]]:
    sent = time.time()
    try:
        result = ssh.run(node, cluster.preamble() + _PROBE, timeout=60)
    except (ssh.SshError, known_hosts.HostKeyError) as exc:
        return [Row(node.host, "ssh", "failed", str(exc))], {}
    received = time.time()
    if not result.ok:
        return [Row(node.host, "ssh", "failed", f"probe failed: {result.error_line()}")], {}
    facts = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    config = cluster.config
    rows = [Row(node.host, "ssh", "ok", f"{node.destination}:{node.port}, host key pinned")]
    rows += judge_probe(node.host, facts, sent, received, config.min_free_disk_gb, config.max_clock_skew_s)
    return rows, facts


def _reachability(cluster: Cluster, target: Node, sources: Sequence[Node]) -> Row:
    """Listen on ``target``'s rendezvous port while every node of ``sources`` connects to it."""
    port = cluster.config.rendezvous_port
    name = f"port {port}"
    listener = ssh.popen(target, cluster.preamble() + _LISTEN, str(port), str(len(sources)), str(LISTEN_SECONDS))
    lines: queue.Queue[str] = queue.Queue()
    assert listener.stdout is not None
    stdout = listener.stdout

    def pump() -> None:
        for line in stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        try:
            first = lines.get(timeout=LISTEN_SECONDS + cluster.nodes[0].connect_timeout)
        except queue.Empty:
            first = ""
        if not first.startswith("listening"):
            detail = first.strip() or "the listener did not start"
            return Row(target.host, name, "failed", f"cannot listen on {port}: {detail}")

        def connect(source: Node) -> list[Row]:
            try:
                done = ssh.run(source, cluster.preamble() + _CONNECT, target.host, str(port), "3", timeout=30)
            except (ssh.SshError, known_hosts.HostKeyError) as exc:
                return [Row(source.host, name, "failed", str(exc))]
            return [] if done.ok else [Row(source.host, name, "failed", done.error_line())]

        failed = [rows[0].host for rows in parallel(sources, connect) if rows]
    finally:
        try:
            listener.wait(timeout=LISTEN_SECONDS + 5)
        except subprocess.TimeoutExpired:
            listener.kill()
            listener.wait()
    if failed:
        return Row(target.host, name, "failed", f"{target.host}:{port} not reachable from {', '.join(failed)}")
    return Row(target.host, name, "ok", f"reachable from {len(sources)} other node(s)")


def check_all(cluster: Cluster, say: Callable[[str], None]) -> tuple[list[Row], dict[str, dict[str, str]]]:
    """Every check on every host: the rows, and each reachable host's probe facts (GPUs etc.) by host."""
    pin_failures = pin_all(cluster, say)
    reachable = [node for node in cluster.nodes if node.host not in pin_failures]
    results = parallel(reachable, lambda node: probe(cluster, node))
    rows_by_host: dict[str, list[Row]] = {host: [row] for host, row in pin_failures.items()}
    facts: dict[str, dict[str, str]] = {}
    for node, (rows, node_facts) in zip(reachable, results, strict=True):
        rows_by_host[node.host] = rows
        if node_facts:
            facts[node.host] = node_facts
    alive = [node for node in reachable if not any(r.check == "ssh" and r.failed for r in rows_by_host[node.host])]
    if len(alive) > 1:
        for target in alive:
            others = [node for node in alive if node is not target]
            rows_by_host[target.host].append(_reachability(cluster, target, others))
    elif alive:
        port = cluster.config.rendezvous_port
        why = "one node: no peers" if len(cluster.nodes) == 1 else "no other node reachable"
        rows_by_host[alive[0].host].append(Row(alive[0].host, f"port {port}", "skipped", why))
    return [row for node in cluster.nodes for row in rows_by_host.get(node.host, [])], facts
