"""The skeleton every resumable stage runs in: mine, filter, tune, train and eval.

A stage's ``run(cfg)`` reads top to bottom around one :class:`StageRun`::

    stage = StageRun("filter", out, cfg, inputs={"commits": source})
    if stage.reusable(same=...):       # complete, from the same inputs and config: nothing to do
        return out                     # (complete but stale: it says why, and the stage redoes it)
    ray = stage.start()                # join or start Ray, check every node sees out, config.yaml
    ...                                # the stage's own work: atomic files, resumable
    stage.finish(rows=..., files=...)  # manifest.json, written last: the commit marker

Every message a stage prints goes through :meth:`StageRun.say`, so they all read
``octoray <stage>: ...``.

An input given as a mapping with a ``fingerprint`` (the input stage's content fingerprint,
:mod:`octoray.storage.fingerprint`) is compared with the one the manifest recorded: a complete
output made from other input bytes is never reused, whatever ``same`` says. The manifest gets the
output's own ``fingerprint``, so the next stage can do the same.
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from octoray.storage.fingerprint import fingerprint, short
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
    #: Why a complete output was not reused (set by :meth:`reusable`), None when it was not complete.
    stale: Optional[str] = None

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

    def reusable(self, same: Callable[[dict[str, Any]], "bool | str"]) -> bool:
        """True, saying so, when ``out`` is complete, made from inputs with the same fingerprints,
        and ``same(manifest)`` says the rest that changes its output (each stage knows its keys) is
        the same: True, or False / a reason (a string) when not. A complete output that is not
        reused is *stale*: this says why (:attr:`stale`), and the stage redoes it."""
        if not self.complete():
            return False
        previous = self.previous or {}
        why = self.changed_inputs(previous)
        if why is None:
            verdict = same(previous)
            why = verdict if isinstance(verdict, str) else (None if verdict else "its inputs or config changed")
        if why:
            self.stale = why
            self.say(f"{display(self.out)} is complete but stale ({why})")
            return False
        self.say(f"{display(self.out)} is already complete ({previous.get('rows', 0)} rows, "
                 f"fingerprint {short(previous.get('fingerprint'))}); nothing to do")
        return True

    def changed_inputs(self, previous: dict[str, Any]) -> Optional[str]:
        """The first input whose fingerprint differs from the one ``previous`` recorded, as a reason."""
        recorded = previous.get("inputs") or {}
        for name, value in self.inputs.items():
            if not isinstance(value, dict) or "fingerprint" not in value:
                continue
            before = recorded.get(name) if isinstance(recorded.get(name), dict) else {}
            if before.get("fingerprint") != value["fingerprint"]:
                return f"input {name} changed: fingerprint {short(before.get('fingerprint'))} -> {short(value['fingerprint'])}"
        return None

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

    def finish(self, *, rows: int, files: list[str], extra: Optional[dict[str, Any]] = None,
               content: Optional[list[str]] = None) -> dict[str, Any]:
        """Write ``manifest.json`` last (stage, config, inputs, rows, files, timings, and the
        ``fingerprint`` of ``content``: the files, or directories, that are the output's content,
        ``files`` by default); returns it."""
        digest = fingerprint(self.out, content if content is not None else files)
        return write_manifest(self.out, self.stage, self.cfg, rows=rows, files=files, started=self.started,
                              inputs=self.inputs, extra={"fingerprint": digest, **(extra or {})})
