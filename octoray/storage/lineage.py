"""``octoray lineage DIR [--json]``: from a stage's output back to the source repositories.

Every stage's ``manifest.json`` records its config, its content ``fingerprint`` and, in
``inputs``, where each input stage directory was and that input's fingerprint when it was read
(:mod:`octoray.storage.fingerprint`). Following the inputs gives the chain: eval -> the model's
train run -> (tune) -> sft -> commits -> each repository's source and mined head commit. A link
whose input has been rewritten since (its manifest now holds another fingerprint) is marked
``changed``; one that cannot be found (moved, deleted) is ``missing``, and the chain stops there.

DIR is any complete stage directory (a path or an object-store URI), or a pipeline's root (the
chain then starts at its last complete stage).
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Optional

from octoray.errors import UserError
from octoray.storage.fingerprint import short
from octoray.storage.layout import MODEL_DIR, stage_dirs
from octoray.storage.locations import Location, display, location
from octoray.storage.stage_dirs import read_manifest

#: A stage's config keys the text view shows (the JSON view has the whole config).
SHOWN_CONFIG = {
    "mine": ("ref", "license_per_commit", "allow_unlicensed", "max_file_bytes", "non_utf8"),
    "filter": ("template", "pr_suffix", "emoji_prefix", "tokenizer_rule", "decontam", "oasst_file", "seed"),
    "tune": ("search", "num_samples", "max_steps"),
    "train": ("model", "lr", "batch_size", "max_steps", "seq_len", "lora", "zero_stage", "seed"),
    "eval": ("tasks", "languages", "limit", "n_samples", "temperature", "top_p", "max_new_tokens", "seed"),
}
#: Pipeline stages, last first: where a pipeline root's chain starts.
_LAST_FIRST = ("eval", "train", "tune", "filter", "mine")


def chain(stage_dir: str | Location) -> list[dict[str, Any]]:
    """The lineage of ``stage_dir``: one entry per stage, ``stage_dir``'s first."""
    start = location(stage_dir)
    manifest = read_manifest(start)
    if manifest is None:
        start, manifest = _pipeline_start(start)
    if not manifest.get("complete"):
        raise UserError(f"{display(start)} is incomplete: rerun 'octoray {manifest.get('stage')}' to finish it")
    entries: list[dict[str, Any]] = []
    here: Optional[Location] = start
    expected: Optional[str] = None
    while here is not None and manifest is not None:
        entry = _entry(here, manifest)
        if expected is not None and expected != entry["fingerprint"]:
            entry["changed"] = f"read with fingerprint {expected}; it holds {entry['fingerprint']} now"
        entries.append(entry)
        here, expected, manifest = _next(here, manifest, entry)
    return entries


def _pipeline_start(root: Location) -> tuple[Location, dict[str, Any]]:
    dirs = stage_dirs(root)
    for stage in _LAST_FIRST:
        manifest = read_manifest(dirs[stage])
        if manifest and manifest.get("complete"):
            return dirs[stage], manifest
    raise UserError(f"{display(root)} holds no manifest.json: give a stage's output directory "
                    "(commits/, sft/, train/, tune/, eval/) or a pipeline's root")


def _entry(here: Location, manifest: dict[str, Any]) -> dict[str, Any]:
    entry = {"stage": manifest.get("stage"), "dir": display(here), "fingerprint": manifest.get("fingerprint"),
             "rows": manifest.get("rows"), "started_at": manifest.get("started_at"),
             "seconds": manifest.get("seconds"), "octoray_version": manifest.get("octoray_version"),
             "config": manifest.get("config") or {}, "inputs": manifest.get("inputs") or {}}
    for key in ("repos", "failed_repos", "data", "base_model", "seed", "checkpoint_step", "hparams_from",
                "generation", "model"):
        if key in manifest:
            entry[key] = manifest[key]
    return entry


def _next(here: Location, manifest: dict[str, Any],
          entry: dict[str, Any]) -> tuple[Optional[Location], Optional[str], Optional[dict[str, Any]]]:
    """The input stage directory of ``manifest`` (its location, the fingerprint it was read with,
    its manifest), or Nones at the end of the chain. Marks ``entry`` when the input is gone."""
    inputs = manifest.get("inputs") or {}
    stage = manifest.get("stage")
    record: dict[str, Any] = {}
    if stage == "filter":
        record = inputs.get("commits") or {}
        path = record.get("dir") or record.get("path")
    elif stage in ("train", "tune"):
        record = inputs.get("sft") or {}
        path = record.get("path")
    elif stage == "eval":
        record = inputs.get("model") or {}
        path = record.get("run_dir")
    else:
        return None, None, None
    if not path:
        return None, None, None
    found = _find(path, here)
    if found is None:
        entry["missing"] = f"input {path} not found"
        return None, None, None
    return found, record.get("fingerprint"), read_manifest(found)


def _find(path: str, here: Location) -> Optional[Location]:
    """``path`` as recorded, or (a run moved as a whole) its namesake beside ``here``."""
    for candidate in (location(path), here.parent / location(path).name):
        manifest = read_manifest(candidate)
        if manifest and manifest.get("complete"):
            return candidate
    return None


def render(entries: list[dict[str, Any]]) -> str:
    """The text view: each stage with its fingerprint, key settings and inputs; repositories last."""
    lines: list[str] = []
    for entry in entries:
        stage = entry["stage"]
        lines.append(f"{stage:<7}{entry['dir']}")
        lines.append(f"       fingerprint {short(entry['fingerprint'])}  rows {entry.get('rows')}  "
                     f"at {entry.get('started_at')}  ({entry.get('seconds')} s, octoray {entry.get('octoray_version')})")
        config = entry["config"]
        shown = [f"{k}={json.dumps(config[k])}" for k in SHOWN_CONFIG.get(stage, ()) if k in config]
        if shown:
            lines.append(f"       config {' '.join(shown)}")
        if stage == "eval" and entry.get("model"):
            model = entry["model"]
            lines.append(f"       model {model.get('path')}  fingerprint {short(model.get('fingerprint'))}  "
                         f"generator {entry['config'].get('generator')}")
        if stage == "train":
            data = entry.get("data") or {}
            lines.append(f"       data fingerprint {short(data.get('fingerprint'))} ({data.get('rows')} rows)  "
                         f"base_model {entry.get('base_model')}  seed {entry.get('seed')}  "
                         f"exported step {entry.get('checkpoint_step')}")
            trial = entry.get("hparams_from") or {}
            if trial:
                lines.append(f"       hyperparameters from tune trial {trial.get('trial_id')} ({trial.get('tune_dir')})")
        for flag in ("changed", "missing"):
            if entry.get(flag):
                lines.append(f"       {flag.upper()}: {entry[flag]}")
        if stage == "mine":
            repos = entry.get("repos") or {}
            lines.append(f"       {len(repos)} repositor{'y' if len(repos) == 1 else 'ies'}:")
            width = max((len(name) for name in repos), default=0)
            for name, repo in sorted(repos.items()):
                lines.append(f"         {name:<{width}}  {(repo.get('head') or 'empty')[:12]:<12}  "
                             f"{repo.get('license') or 'no license'}  {repo.get('source')}")
            for name, error in (entry.get("failed_repos") or {}).items():
                lines.append(f"         FAILED {name}: {error}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The command line: octoray lineage DIR [--json]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``octoray lineage``'s arguments."""
    parser.add_argument("dir", metavar="DIR", help="a complete stage directory (commits/, sft/, train/, tune/, "
                                                   "eval/), a pipeline's root, a path or a URI")
    parser.add_argument("--json", action="store_true", help="print the chain as one JSON list (first: DIR's stage)")


def main(args: argparse.Namespace) -> int:
    """Print the lineage of ``args.dir``."""
    entries = chain(args.dir)
    print(json.dumps(entries, indent=2, default=str) if args.json else render(entries))
    return 0


def model_run_dir(model: str) -> Optional[Location]:
    """The train run directory a model directory was exported into (``RUN_DIR/model``), or None."""
    path = location(model)
    if path.name == MODEL_DIR:
        manifest = read_manifest(path.parent)
        if manifest and manifest.get("stage") == "train":
            return path.parent
    return None
