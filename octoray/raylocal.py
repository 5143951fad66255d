"""Connecting to Ray: the cluster named by ``RAY_ADDRESS`` (Ray Jobs set it), else an embedded local one."""

from __future__ import annotations

import logging
import warnings
from typing import Any


def ensure_ray(*, dashboard: bool = False, **init_kwargs: Any) -> Any:
    """``ray.init()`` once, quietly; returns the ``ray`` module.

    Inside a Ray Job (or with ``RAY_ADDRESS`` set) this joins that cluster; on a laptop it starts
    an embedded local Ray using every CPU, with its dashboard only when ``dashboard`` is set (it
    costs a process and memory; Ray's State API, which some libraries rely on, lives there).
    """
    import ray

    if not ray.is_initialized():
        init_kwargs.setdefault("log_to_driver", False)
        init_kwargs.setdefault("include_dashboard", dashboard)
        init_kwargs.setdefault("logging_level", logging.WARNING)
        ray.init(**init_kwargs)
    quiet_ray_data()
    return ray


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
    # Ray Data warns when a stage has fewer inputs than its concurrency cap: expected for small runs.
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks", category=UserWarning)
