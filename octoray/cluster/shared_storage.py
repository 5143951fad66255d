"""Refuse an output directory that the nodes of a multi-node Ray cluster do not all see.

On one node any path works. On a cluster, a stage's tasks (mining chunks, Ray Train workers,
Serve replicas) run on whichever node has room, and a plain local path on each node is a
*different* directory: the run would scatter its files over the nodes' disks and "finish" with
most of them missing. So before any work, the driver writes a probe file into the directory and a
zero-CPU task pinned to every alive node looks for it; a node that cannot see it stops the run
with one line naming the path and the fix. Object-store URIs need no probe.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from octoray.errors import UserError
from octoray.storage.locations import Location, ObjectPath

#: Paths already shown to be shared, per driver process (the pipeline checks its root once).
_VERIFIED: set[str] = set()
PROBE_TIMEOUT_S = 180


def require_shared_storage(ray: Any, loc: Location, what: str) -> None:
    """Raise a one-line UserError when ``loc`` (a local path) is not the same directory on every node.

    ``ray`` is the initialised ``ray`` module; ``what`` names the setting in the message
    (``"out"``, ``"mine --out"``...).
    """
    if isinstance(loc, ObjectPath):
        return
    path = Path(loc).resolve()
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2 or any(path == Path(v) or Path(v) in path.parents for v in _VERIFIED):
        return  # one node, or inside a directory already shown shared (the pipeline's root)
    path.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    probe = path / f".octoray-probe-{token}"
    probe.write_text(token)
    try:
        blind = _nodes_not_seeing(ray, nodes, str(probe), token)
    finally:
        probe.unlink(missing_ok=True)
    if blind:
        raise UserError(f"{what} {path} is not shared by the Ray cluster's nodes ({len(blind)} of {len(nodes)} "
                        f"cannot see it): use s3://… or gs://… (object storage) or a shared mount (NFS) there")
    _VERIFIED.add(str(path))


def _nodes_not_seeing(ray: Any, nodes: list[str], probe: str, token: str) -> list[str]:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, max_retries=0)
    def look(path: str) -> bool:
        try:
            return Path(path).read_text() == token
        except OSError:
            return False

    refs = {node: look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(probe)
            for node in nodes}
    blind = []
    for node, ref in refs.items():
        try:
            seen = ray.get(ref, timeout=PROBE_TIMEOUT_S)
        except ray.exceptions.TaskUnschedulableError:
            # Draining (a spot notice, `ray drain-node`) or gone since ray.nodes(): Ray places no
            # stage work there either, so its view of the path does not matter.
            continue
        except Exception:  # noqa: BLE001 - a node that died meanwhile is not our question
            if node not in {n["NodeID"] for n in ray.nodes() if n.get("Alive")}:
                continue
            raise
        if not seen:
            blind.append(node)
    return blind
