"""What a stage holds on the Ray cluster: a bounded wait for its resources, and a clean exit.

Two failure modes motivate this module. A Ray Train run whose worker group cannot be placed
waits for ever: Ray Train retries ``WorkerGroupStartupTimeoutError`` without limit
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

import time
from typing import Any, Iterable

from octoray.errors import UserError

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
    text = [_resources(b) for b in bundles]
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


def _resources(bundle: dict[str, float]) -> str:
    shown = {k: v for k, v in bundle.items() if not k.startswith("bundle_group")}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"
