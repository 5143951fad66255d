"""The node types a cluster has or can launch, and a one-line refusal of a request none can hold.

Ray waits, silently and forever, for a request no node can satisfy. With an autoscaler that is
right while a node type that fits is still starting; it is wrong when none of the node types
fits (a GPU request on a CPU-only cluster, 2 workers x 8 GPUs on 4-GPU nodes). Without an
autoscaler the live nodes are all there will ever be. :func:`require_feasible` tells these apart
before a stage places its request:

* the autoscaler's node types come from the cluster config it publishes in the GCS (the same
  record Ray Train and Ray Data consult), with each type's resources and max count;
* with no such record (a laptop, a static ``ray start`` cluster) the live nodes are the limit.

A request that fits is left to Ray: it may wait for an autoscaled node to start (minutes for a
GPU node), which is what autoscaling means.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from octoray.errors import UserError

Bundle = Mapping[str, float]


@dataclass(frozen=True)
class NodeShape:
    """One kind of node the cluster has or can launch: its resources, and how many at most."""

    name: str
    resources: dict[str, float]
    max_count: int  # -1: no limit

    def holds(self, bundle: Bundle) -> bool:
        """Whether one node of this shape has room for ``bundle`` when idle."""
        return all(self.resources.get(key, 0.0) >= amount for key, amount in bundle.items() if amount > 0)

    def describe(self) -> str:
        resources = ", ".join(f"{k}: {_num(v)}" for k, v in sorted(self.resources.items())
                              if not _is_internal(k))
        count = "" if self.max_count < 0 else f" x<={self.max_count}"
        return f"{self.name} {{{resources}}}{count}"


def require_feasible(stage: str, bundles: Sequence[Bundle], *, what: str = "") -> None:
    """Stop with one line when no node the cluster has or can launch fits a bundle of the request.

    ``bundles`` are the per-worker / per-actor / per-task resource requests of the stage, e.g.
    ``[{"CPU": 1, "GPU": 1}] * 8`` for 8 training workers. Each bundle must fit on one node shape
    and the request as a whole within what all shapes together can offer.
    """
    shapes = cluster_shapes()
    if not shapes:
        return  # no information (not connected): let Ray decide
    wanted = [{k: float(v) for k, v in b.items() if v} for b in bundles]
    if not wanted:
        return
    label = what or f"{len(wanted)} x {_fmt(wanted[0])}"
    misfit = next((b for b in wanted if not any(s.holds(b) for s in shapes)), None)
    if misfit is None:
        misfit_total = _exceeds_total(wanted, shapes)
        if misfit_total is None:
            return
        key, need, have = misfit_total
        raise UserError(f"{stage}: asks for {label} ({_num(need)} {key} in all) but the cluster can "
                        f"have at most {_num(have)} {key}; node types: {_describe(shapes)}")
    raise UserError(f"{stage}: asks for {label}, and no node type can hold {_fmt(misfit)}; "
                    f"node types: {_describe(shapes)}")


def cluster_shapes() -> list[NodeShape]:
    """The node types of the connected cluster's autoscaler, else its live nodes (by resources)."""
    import ray

    if not ray.is_initialized():
        return []
    shapes = _autoscaler_shapes()
    if shapes or _autoscaler_without_config():
        return shapes
    live: dict[tuple, NodeShape] = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        resources = {k: float(v) for k, v in node.get("Resources", {}).items()}
        key = tuple(sorted((k, v) for k, v in resources.items() if not _is_internal(k)))
        shape = live.get(key)
        live[key] = NodeShape("node" if shape is None else shape.name, resources,
                              1 if shape is None else shape.max_count + 1)
    return [NodeShape(f"live node{'s' if s.max_count > 1 else ''}", s.resources, s.max_count)
            for s in live.values()]


def _autoscaler_shapes() -> list[NodeShape]:
    """Node types from the autoscaler's cluster config in the GCS; [] when there is none."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an internal API: no answer means "no autoscaler info"
        return []
    if config is None or not config.node_group_configs:
        return []
    shapes = [NodeShape(group.name, {k: float(v) for k, v in group.resources.items()}, int(group.max_count))
              for group in config.node_group_configs]
    # The head is a node too, though its group may say max_count 0 (it is never launched).
    return [s for s in shapes if s.max_count != 0 or _is_head(s.name)]


def _autoscaler_without_config() -> bool:
    """Whether an autoscaler that publishes no node types (Ray's v1 autoscaler, as ``ray up``
    runs it) manages the cluster: then the live nodes are not the limit, and nothing is known
    of the node types it may launch. KubeRay and autoscaler v2 publish them."""
    try:
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

        raw = _internal_kv_initialized() and _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        report = (json.loads(raw).get("autoscaler_report") or {}) if raw else {}
        # Every Ray head runs a monitor; without an autoscaling config (a laptop, a static
        # cluster) it is read-only and names each node's type "node_<node id>". A real autoscaler
        # maps nodes to the types of its config.
        return any(kind != f"node_{node}" for node, kind in (report.get("node_type_mapping") or {}).items())
    except Exception:  # noqa: BLE001 - internal API; no answer means no autoscaler known
        return False


def _exceeds_total(bundles: Sequence[dict[str, float]], shapes: Sequence[NodeShape]) -> tuple[str, float, float] | None:
    need: dict[str, float] = {}
    for bundle in bundles:
        for key, amount in bundle.items():
            need[key] = need.get(key, 0.0) + amount
    for key, amount in sorted(need.items()):
        if any(s.max_count < 0 and s.resources.get(key, 0) > 0 for s in shapes):
            continue
        have = sum(s.resources.get(key, 0.0) * max(s.max_count, 1) for s in shapes)
        if amount > have:
            return key, amount, have
    return None


def _is_head(name: str) -> bool:
    return "head" in name


def _is_internal(key: str) -> bool:
    """Ray's own per-node resources (node:IP, accelerator_type:X, object store): not requests."""
    return key.startswith(("node:", "accelerator_type:")) or key in ("object_store_memory", "memory")


def _describe(shapes: Sequence[NodeShape]) -> str:
    return "; ".join(s.describe() for s in shapes)


def _fmt(bundle: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {_num(v)}" for k, v in sorted(bundle.items())) + "}"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def resource_problems(name: str, resources: Mapping[str, Any] | None) -> list[str]:
    """Config check for an extra-resources mapping (``{fake_gpu: 1}``): names and amounts."""
    if resources is None:
        return []
    found = []
    for key, amount in resources.items():
        if key in ("CPU", "GPU", "memory"):
            found.append(f"{name}: '{key}' has its own setting; list only custom resources here")
        elif isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            found.append(f"{name}: '{key}' must be a number >= 0, got {amount!r}")
    return found


def cluster_capacity(key: str = "CPU") -> float:
    """The most of ``key`` the cluster can have at once: what its autoscaler may launch (node types
    x max count), else what its live nodes have. Sizing a stage by the CPUs alive *now* would
    pin an autoscaling cluster, which starts with none, to one worker forever."""
    import ray

    if not ray.is_initialized():
        return 0.0
    shapes = _autoscaler_shapes()
    if not shapes:
        # An autoscaler that keeps its node types to itself may launch any number: no bound.
        return float("inf") if _autoscaler_without_config() else float(ray.cluster_resources().get(key, 0.0))
    if any(s.max_count < 0 and s.resources.get(key, 0) > 0 for s in shapes):
        return float("inf")
    return sum(s.resources.get(key, 0.0) * max(s.max_count, 1 if _is_head(s.name) else 0) for s in shapes)
