"""Connecting to Ray: the cluster named by ``RAY_ADDRESS`` (Ray Jobs set it), else an embedded local one."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import warnings
from collections.abc import Iterator
from typing import Any


def ensure_ray(*, dashboard: bool = False, **init_kwargs: Any) -> Any:
    """``ray.init()`` once, quietly; returns the ``ray`` module.

    Inside a Ray Job (or with ``RAY_ADDRESS`` set) this joins that cluster; on a laptop it starts
    an embedded local Ray using every CPU, with its dashboard only when ``dashboard`` is set (it
    costs a process and memory; Ray's State API, which some libraries rely on, lives there).
    """
    import ray

    if not ray.is_initialized():
        # Ray announces on every start that it turned token auth on for the local cluster; an
        # embedded cluster that lives and dies with this process needs no such line on stderr
        # (bad input is meant to be one line there).
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        init_kwargs.setdefault("log_to_driver", False)
        init_kwargs.setdefault("include_dashboard", dashboard)
        init_kwargs.setdefault("logging_level", logging.WARNING)
        if not _joins_a_cluster(init_kwargs):
            _quiet_library_deprecations(init_kwargs)
            if init_kwargs["include_dashboard"]:
                _pin_state_api(init_kwargs)
        ray.init(**init_kwargs)
    quiet_ray_data()
    return ray


def _joins_a_cluster(init_kwargs: dict[str, Any]) -> bool:
    return bool(init_kwargs.get("address") or os.environ.get("RAY_ADDRESS"))


def _quiet_library_deprecations(init_kwargs: dict[str, Any]) -> None:
    """Workers of an embedded Ray ignore deprecation warnings (unless PYTHONWARNINGS says otherwise).

    They come from one library calling another (DeepSpeed calling a deprecated torch collective,
    Ray Train a deprecated Ray Data option), once per worker, and ask nothing of the user.
    """
    runtime_env = dict(init_kwargs.get("runtime_env") or {})
    env_vars = dict(runtime_env.get("env_vars") or {})
    quiet = "ignore::DeprecationWarning,ignore::FutureWarning"
    env_vars.setdefault("PYTHONWARNINGS", os.environ.get("PYTHONWARNINGS", quiet))
    runtime_env["env_vars"] = env_vars
    init_kwargs["runtime_env"] = runtime_env


def _pin_state_api(init_kwargs: dict[str, Any]) -> None:
    """Point every State API call of this job, in the driver and in every worker, at our dashboard.

    Without an address the State API looks for "the" Ray on the machine and gives up when it
    finds several ("Found multiple active Ray instances"), e.g. two users' local Rays on one
    host. Ray Train's PlacementGroupCleaner, which frees the worker placement group of a trial
    that ASHA stopped, asks exactly that question from inside the cluster; unanswered, the
    group holds its CPUs and later trials and stages wait for them. The dashboard's port is
    chosen here so its address can go into the job's runtime environment before Ray starts.
    """
    port = init_kwargs.setdefault("dashboard_port", _free_port())
    url = f"http://127.0.0.1:{port}"
    runtime_env = dict(init_kwargs.get("runtime_env") or {})
    runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), "RAY_API_SERVER_ADDRESS": url}
    init_kwargs["runtime_env"] = runtime_env
    init_kwargs.setdefault("dashboard_host", "127.0.0.1")
    os.environ["RAY_API_SERVER_ADDRESS"] = url


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def has_state_api() -> bool:
    """Whether the connected Ray answers State API calls (its dashboard is running)."""
    from ray.util.state import list_nodes

    try:
        list_nodes(limit=1, timeout=10)
    except Exception:  # ServerUnavailable and friends: no dashboard behind the address
        return False
    return True


def quiet_ray_data() -> None:
    """Keep Ray Data's per-dataset INFO lines and progress bars off the user's terminal.

    Stages draw their own progress bar in the unit that matters (commits, rows, samples).
    """
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # ... and its note that they are off (we turned them off).
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # Ray Data warns when a stage has fewer inputs than its concurrency cap: expected for small runs.
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks", category=UserWarning)


@contextlib.contextmanager
def unreserved_ray_data() -> Iterator[None]:
    """Ray Data without per-operator resource reservation, for datasets created inside.

    Ray Data reserves a share of the cluster for each operator so that a long pipeline never
    starves its later operators. A one-operator fan-out (a ``map`` over git work items) gains
    nothing from that, and on a small cluster the reservation keeps it on one CPU until the
    shared pool ramps up: on 2 CPUs, 8 tasks of 0.35 s ran as 1-1-1-2-2... (2.6 s) with it and
    2-2-2-2 (1.6 s) without. Datasets capture the context when they are created, so this only
    affects datasets created inside the block.
    """
    import ray

    ctx = ray.data.DataContext.get_current()
    previous = ctx.op_resource_reservation_enabled
    ctx.op_resource_reservation_enabled = False
    try:
        yield
    finally:
        ctx.op_resource_reservation_enabled = previous
