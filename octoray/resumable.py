"""The skeleton every resumable stage runs in: mine, filter, tune, train and eval.

A stage's ``run(cfg)`` reads top to bottom around one :class:`StageRun`::

    stage = StageRun("filter", out, cfg, inputs={"commits": source})
    if stage.reusable(same=...):       # complete, from the same inputs and config: nothing to do
        return out
    ray = stage.start()                # join or start Ray, check every node sees out, config.yaml
    ...                                # the stage's own work: atomic files, resumable
    stage.finish(rows=..., files=...)  # manifest.json, written last: the commit marker

Every message a stage prints goes through :meth:`StageRun.say`, so they all read
``octoray <stage>: ...``.
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from octoray.storage.locations import Location, display
from octoray.storage.stage_dirs import manifest_complete, read_manifest, write_manifest, write_resolved_config


@dataclass
class StageRun:
    """One run of stage ``stage`` over its output directory ``out``."""

    stage: str
    out: Location
    cfg: Any
    #: What the output is made from (directories, row counts, sources), recorded in the manifest.
    inputs: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def say(self, message: str, *, err: bool = False) -> None:
        """Print ``octoray <stage>: message`` (on stderr with ``err``)."""
        print(f"octoray {self.stage}: {message}", file=sys.stderr if err else sys.stdout, flush=True)

    @functools.cached_property
    def previous(self) -> Optional[dict[str, Any]]:
        """The manifest ``out`` holds (None when there is none), read once."""
        return read_manifest(self.out)

    def complete(self) -> bool:
        """``out`` holds a complete output of this stage (whatever it was made from)."""
        return manifest_complete(self.previous, self.stage)

    def reusable(self, same: Callable[[dict[str, Any]], bool]) -> bool:
        """True, saying so, when ``out`` is complete and ``same(manifest)`` says it was made from the
        same inputs and config (each stage knows which of its keys change its output)."""
        if not self.complete():
            return False
        previous = self.previous or {}
        if not same(previous):
            return False
        self.say(f"{display(self.out)} is already complete ({previous.get('rows', 0)} rows); nothing to do")
        return True

    def start(self, *, flag: str = "--out", write_config: bool = True, **ray_options: Any) -> Any:
        """Join the Ray cluster (RAY_ADDRESS or ``address``) or start a local one, check that every
        node sees ``out`` (one line naming ``flag`` if not) and, with ``write_config``, create it
        and write ``config.yaml``; returns the ``ray`` module. A stage with checks of its own to
        make before it writes anything passes ``write_config=False`` and calls
        :meth:`write_config` after them."""
        from octoray.cluster.connection import ensure_ray
        from octoray.cluster.shared_storage import require_shared_storage

        ray = ensure_ray(**ray_options)
        require_shared_storage(ray, self.out, f"{self.stage} {flag}")
        if write_config:
            self.write_config()
        return ray

    def write_config(self) -> None:
        """Create ``out`` and write the resolved config there (``config.yaml``)."""
        self.out.mkdir(parents=True, exist_ok=True)
        write_resolved_config(self.out, self.cfg)

    def finish(self, *, rows: int, files: list[str], extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Write ``manifest.json`` last (stage, config, inputs, rows, files, timings); returns it."""
        return write_manifest(self.out, self.stage, self.cfg, rows=rows, files=files, started=self.started,
                              inputs=self.inputs, extra=extra)
