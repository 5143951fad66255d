"""Where files go: the one module that names a run's stage directories and the files in them.

A pipeline run (``runs/<name>/``, or any ``out=``) holds one directory per stage::

    commits/  sft/  tune/  train/  serve/  eval/  report/

Every stage directory but ``serve/`` and ``report/`` holds ``manifest.json`` (written last: the
commit marker) and ``config.yaml``. ``tune/`` holds ``best.json``; ``train/`` (RUN_DIR) holds
``metrics.jsonl``, ``loss.png`` and ``model/``; ``serve/`` holds ``latency.json``; ``eval/`` holds
``samples.parquet``, ``results.parquet`` and ``metrics.json``; ``report/`` holds ``report.md``.

A data stage directory is a Hub-style dataset folder, so pandas, pyarrow, duckdb, polars and
``datasets.load_dataset(DIR)`` open it as it is, and it uploads to the Hub unchanged::

    DIR/
      README.md                            dataset card; its YAML header declares data/train-*
      data/train-00000-of-00002.parquet    the rows: one split, "train", named as the Hub names shards
      data/train-00001-of-00002.parquet
      manifest.json  config.yaml  stats.json  (and resume sidecars)   octoray's own, outside data/

octoray 0.1 wrote the shards at the top level beside ``manifest.json`` (``commits-00000.parquet``,
``oasst.parquet``); every reader still accepts that *legacy* layout.

Everything here is a pure function of names relative to the stage directory ("data/train-…"),
never of a file system: the storage layer joins them onto a local path or an object-store URI.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Iterable, Mapping

# ---- the run: stages, their directories and their files ------------------------------------

#: The pipeline's stages, in the order they run (``pipeline.stages`` picks among them).
STAGES = ("mine", "filter", "tune", "train", "serve", "eval", "report")
#: Each stage's directory under a run's root.
STAGE_DIRS = {"mine": "commits", "filter": "sft", "tune": "tune", "train": "train", "serve": "serve",
              "eval": "eval", "report": "report"}
#: Written last into a complete stage directory: stage, config, inputs, rows, files, timings.
MANIFEST = "manifest.json"
#: The resolved config a stage ran with, beside its outputs.
RESOLVED_CONFIG = "config.yaml"
#: A data stage's counts (drops per rule, the funnel).
STATS = "stats.json"
#: tune/: the best trial, its hyperparameters and checkpoint, a row per trial.
BEST_FILE = "best.json"
#: RUN_DIR: the per-step metrics (rank 0), the loss plot and the exported Hugging Face model.
METRICS_FILE = "metrics.jsonl"
LOSS_PNG = "loss.png"
MODEL_DIR = "model"
#: serve/: the pipeline's latency probe against the running server.
LATENCY_FILE = "latency.json"
#: eval/: generated samples, their execution results and pass@k.
SAMPLES_FILE = "samples.parquet"
RESULTS_FILE = "results.parquet"
EVAL_METRICS_FILE = "metrics.json"
#: report/: the report (its PNGs beside it).
REPORT_FILE = "report.md"


def stage_dirs(root: Any) -> dict[str, Any]:
    """Each stage's directory under ``root`` (a path or a location): ``{"mine": root / "commits", ...}``."""
    return {stage: root / name for stage, name in STAGE_DIRS.items()}


# ---- a data stage directory (commits/, sft/): a Hub-style dataset folder ----------------------

#: The folder that holds the Parquet shards, and the one split they form.
DATA_DIR = "data"
SPLIT = "train"
#: The dataset card (the Hub renders it and reads its YAML header).
CARD = "README.md"
#: Paths the Hub skips when the folder is uploaded (``hf upload`` forwards a top-level
#: ``.gitignore`` and the Hub applies it): for private work state such as mining's clones.
UPLOAD_IGNORE = ".gitignore"
#: The data-files pattern the card declares for the split (the Hub's own ``data/{split}-*``).
DATA_FILES_PATTERN = f"{DATA_DIR}/{SPLIT}-*"
#: The same as a Parquet glob, for duckdb / polars / ``glob``.
DATA_GLOB = f"{DATA_FILES_PATTERN}.parquet"
#: Where shards of either layout can be: what a directory listing must cover (not ``.work/``,
#: ``.repos/`` or ``_funnel/``, which can be large and never hold shards).
LISTING_GLOBS = ("*.parquet", f"{DATA_DIR}/*.parquet")

_SUFFIX = ".parquet"


def shard_name(index: int, count: int) -> str:
    """The name of shard ``index`` of ``count``: ``data/train-00000-of-00003.parquet``.

    This is how the Hub (and ``datasets.push_to_hub``) names split shards; ``datasets`` infers the
    split from it even without a card. Writers fix ``count`` from their input before writing, so
    a resumed run names every shard exactly as the first attempt did.
    """
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} out of range for {count} shards")
    return f"{DATA_DIR}/{SPLIT}-{index:05d}-of-{count:05d}{_SUFFIX}"


def is_data_file(name: str) -> bool:
    """True for a Parquet shard of the current layout (``data/train-*.parquet``)."""
    return fnmatch.fnmatchcase(name, DATA_GLOB) and "/" not in name[len(DATA_DIR) + 1:]


def is_legacy_data_file(name: str) -> bool:
    """True for a Parquet shard of the legacy layout: a top-level ``*.parquet`` file."""
    return "/" not in name and name.endswith(_SUFFIX) and not name.startswith((".", "_"))


def data_files(manifest: Mapping[str, Any] | None, listing: Iterable[str] = ()) -> list[str]:
    """The Parquet shards of a stage directory, relative to it, in order — either layout.

    The manifest's ``files`` list is the truth (a complete stage wrote it last). Without one, the
    directory ``listing`` (relative names, recursive) decides: ``data/train-*.parquet`` when there
    are any, else the legacy top-level ``*.parquet``.
    """
    listed = [str(f) for f in (manifest or {}).get("files") or () if str(f).endswith(_SUFFIX)]
    if listed:
        return sorted(listed)
    names = sorted(str(n) for n in listing)
    current = [n for n in names if is_data_file(n)]
    return current or [n for n in names if is_legacy_data_file(n)]


def all_shards(listing: Iterable[str]) -> list[str]:
    """Every shard of either layout in a directory listing: what a writer removes to start over."""
    return sorted(n for n in map(str, listing) if is_data_file(n) or is_legacy_data_file(n))
