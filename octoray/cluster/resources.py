"""What a stage asks of the Ray cluster: can it ever be held, and holding it for a bounded time.

**Can it ever fit** (:func:`require_feasible`, :func:`cluster_capacity`).

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

**Holding it** (:func:`wait_for_resources`, :func:`placement_groups`,
:func:`release_placement_groups`). Two failure modes motivate this half. A Ray Train run whose
worker group cannot be placed waits for ever: Ray Train retries ``WorkerGroupStartupTimeoutError`` without limit
(``FailureConfig.controller_failure_limit`` defaults to -1). And a Ray Tune search can leave a
trial's worker placement group behind when Tune kills the trial (ASHA, an error) before Ray
Train's ``PlacementGroupCleaner`` has registered it; placement groups belong to the job, not to
the actor that made them, so it keeps its CPUs until the driver exits. Together they hung a
pipeline: the train stage waited for CPUs a tune-stage placement group still held.

So a stage (1) records which placement groups exist when it starts and removes whatever it
created when it ends (:func:`placement_groups` / :func:`release_placement_groups`), and (2)
reserves its workers' bundles up front with a deadline (:func:`wait_for_resources`), failing with
one line that names what it waited for and what holds the cluster. The reservation is a real
placement group, so on an autoscaling cluster it is also the demand that adds nodes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from octoray.errors import UserError

# ---- can it ever fit ------------------------------------------------------------------------

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
    """``{CPU: 1, GPU: 0.5}``; Ray's own ``bundle_group_*`` bookkeeping keys left out."""
    shown = {k: v for k, v in bundle.items() if not k.startswith("bundle_group")}
    return "{" + ", ".join(f"{k}: {_num(v)}" for k, v in sorted(shown.items())) + "}"


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


# ---- holding it for a bounded time ----------------------------------------------------------

#: Placement-group states that still hold (or are about to hold) resources.
_LIVE_STATES = ("PENDING", "PREPARED", "CREATED", "RESCHEDULING")


def placement_groups() -> dict[str, dict[str, Any]]:
    """Every placement group Ray's GCS knows, by hex id (also without the dashboard)."""
    import ray.util

    return dict(ray.util.placement_group_table())


def live_placement_groups(exclude: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """Placement groups that still hold resources, minus the ids in ``exclude``."""
    skip = set(exclude)
    return {pg_id: info for pg_id, info in placement_groups().items()
            if pg_id not in skip and info.get("state") in _LIVE_STATES}


def release_placement_groups(before: Iterable[str], timeout_s: float = 60.0) -> list[str]:
    """Remove every live placement group created since ``before`` (a set of ids); return their ids.

    Ray Train's own cleaner may be removing them at the same moment; removing a removed group is
    harmless. Waits (bounded) until the GCS reports them gone, so the next stage sees the CPUs.
    """
    import ray.util
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    leftover = _of_this_job(live_placement_groups(exclude=before))
    for pg_id in leftover:
        try:
            ray.util.remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
        except Exception:  # noqa: BLE001 - already removed by its owner between list and remove
            pass
    deadline = time.monotonic() + timeout_s
    while leftover and time.monotonic() < deadline:
        if not set(live_placement_groups()) & set(leftover):
            break
        time.sleep(0.2)
    return sorted(leftover)


def _of_this_job(groups: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Only the groups this driver's job created (trials' and their controllers' included): on a
    shared cluster another job's placement groups are not ours to remove. The creator is known to
    the State API only; without it (a local Ray without dashboard) every group is this job's."""
    import ray

    if not groups:
        return groups
    try:
        from ray.util.state import list_placement_groups

        creators = {pg.placement_group_id: pg.creator_job_id
                    for pg in list_placement_groups(limit=10_000, detail=True, timeout=30)}
    except Exception:  # noqa: BLE001 - no State API: a local Ray, where every job is ours
        return groups
    job = ray.get_runtime_context().get_job_id()
    return {pg_id: info for pg_id, info in groups.items() if creators.get(pg_id, job) == job}


def wait_for_resources(bundles: list[dict[str, float]], *, what: str, timeout_s: float,
                       strategy: str = "PACK") -> None:
    """Block until the cluster can place ``bundles`` (as Ray Train would), at most ``timeout_s``.

    Raises a one-line :class:`UserError` naming the bundles and what holds the cluster when the
    deadline passes. The probe placement group is removed either way.
    """
    import ray.util
    from ray.util.placement_group import placement_group

    probe = placement_group(bundles, strategy=strategy, name="octoray-resource-probe")
    try:
        ready = probe.wait(timeout_seconds=max(0.0, timeout_s))
    finally:
        ray.util.remove_placement_group(probe)
    if not ready:
        raise UserError(f"{what} could not get {describe_bundles(bundles)} ({strategy}) within {timeout_s:.0f} s: "
                        f"{describe_cluster(exclude={probe.id.hex()})}")


def describe_bundles(bundles: list[dict[str, float]]) -> str:
    """``2 x {CPU: 1}`` for equal bundles, else each bundle."""
    text = [_fmt(b) for b in bundles]
    return f"{len(text)} x {text[0]}" if len(set(text)) == 1 else ", ".join(text)


def describe_cluster(exclude: Iterable[str] = ()) -> str:
    """One clause: free vs total CPUs/GPUs and the placement groups that hold them."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    parts = [f"{free.get(k, 0):g} of {total[k]:g} {k} free" for k in ("CPU", "GPU") if total.get(k)]
    holders = live_placement_groups(exclude=exclude)
    if holders:
        listed = [f"{pg_id[:12]} ({info.get('state')}, {info.get('name') or 'unnamed'}, "
                  f"{describe_bundles(list(info.get('bundles', {}).values()))})"
                  for pg_id, info in sorted(holders.items())[:5]]
        more = f" and {len(holders) - 5} more" if len(holders) > 5 else ""
        parts.append(f"held by placement group(s) {', '.join(listed)}{more}")
    else:
        parts.append("no placement group holds them (other tasks or actors do; see 'ray status')")
    return "; ".join(parts)
