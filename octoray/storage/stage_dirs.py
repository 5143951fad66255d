"""Stage output directories: atomic writes, manifests, completeness.

Every stage writes Parquet shards plus ``manifest.json`` (and often ``stats.json``) into its own
directory (where inside it: :mod:`octoray.storage.layout`), which may be a local/shared path or an
object-store URI (:mod:`octoray.storage.locations`).
On a file system, files are written under a temporary name and renamed when whole; on an object
store, where there is no rename, each file is one upload that becomes visible only when complete.
Either way a crash never leaves a half-written shard that a rerun would trust.
``manifest.json`` is written last: its presence with ``"complete": true`` is what makes a stage
skip on rerun (on object storage it is the commit marker).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

from octoray import __version__
from octoray.config import dump_yaml, to_dict
from octoray.errors import UserError
from octoray.storage.layout import MANIFEST, RESOLVED_CONFIG, STATS  # noqa: F401 - STATS: for the data stages
from octoray.storage.locations import Location, ObjectPath, fs_path, is_uri, location, upload_file


def atomic_write_bytes(path: Location, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and an atomic rename
    (on object storage: one upload, visible only once complete)."""
    if isinstance(path, ObjectPath):
        path.write_bytes(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Location, text: str) -> None:
    """Atomically write UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Location, data: Any) -> None:
    """Atomically write indented JSON."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_parquet_atomic(table: Any, path: Location) -> None:
    """Write a pyarrow Table as one Parquet file, atomically."""
    if isinstance(path, ObjectPath):
        # Written to local disk first, then uploaded whole: a writer that dies mid-way leaves
        # no object behind (an unfinished multipart upload is never visible).
        with tempfile.TemporaryDirectory(prefix="octoray-upload-") as tmp:
            local = Path(tmp) / path.name
            _write_table(table, local)
            upload_file(local, path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        _write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_table(table: Any, path: Path) -> None:
    import pyarrow.parquet as pq

    if table.num_rows:
        pq.write_table(table, path, compression="zstd")
    else:
        # No row group at all, only the schema: pq.write_table would write one empty row group,
        # and readers that size batches by the first row group (datasets) fail on it.
        pq.ParquetWriter(path, table.schema, compression="zstd").close()


def read_parquet(path: Location, columns: list[str] | None = None) -> Any:
    """One Parquet file as a pyarrow Table, from any location."""
    import pyarrow.parquet as pq

    fs, where = fs_path(path)
    return pq.read_table(where, columns=columns, filesystem=fs)


def parquet_file(path: Location) -> Any:
    """A ``pyarrow.parquet.ParquetFile`` (metadata, schema) for any location."""
    import pyarrow.parquet as pq

    fs, where = fs_path(path)
    return pq.ParquetFile(fs.open_input_file(where))


def stage_listing(stage_dir: Location) -> list[str]:
    """Names (relative, ``/``-separated) of the files where a stage directory may hold shards.

    Which places to look is :data:`octoray.storage.layout.LISTING_GLOBS`; this only lists them, on any
    location (object stores list one prefix level at a time, so each pattern is dir + name).
    """
    from octoray.storage.layout import LISTING_GLOBS

    found = []
    for pattern in LISTING_GLOBS:
        folder, _, name = pattern.rpartition("/")
        base = stage_dir / folder if folder else stage_dir
        found += [f"{folder}/{p.name}" if folder else p.name for p in base.glob(name) if p.is_file()]
    return sorted(found)


def read_json(path: Location) -> Any:
    """Read a JSON file, with a one-line error when it is missing or broken."""
    try:
        return json.loads(location(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"missing file: {path}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None


def read_manifest(out_dir: Location) -> dict[str, Any] | None:
    """The manifest of a stage directory, or None when there is none (yet)."""
    try:
        return json.loads((location(out_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, IsADirectoryError):
        return None
    except json.JSONDecodeError:
        return None  # a torn manifest means "not complete"; the stage reruns


def is_complete(out_dir: Location, stage: str) -> bool:
    """True when ``out_dir`` holds a complete output of ``stage``."""
    return manifest_complete(read_manifest(out_dir), stage)


def manifest_complete(manifest: dict[str, Any] | None, stage: str) -> bool:
    """True when ``manifest`` (:func:`read_manifest`'s) is a complete output of ``stage``."""
    return bool(manifest and manifest.get("stage") == stage and manifest.get("complete"))


def require_stage_output(in_dir: Location, stage: str, what: str) -> dict[str, Any]:
    """The manifest of a complete ``stage`` output in ``in_dir``, or a one-line UserError."""
    in_dir = location(in_dir)
    if not in_dir.is_dir():
        raise UserError(f"{what} directory not found: {in_dir}")
    manifest = read_manifest(in_dir)
    if manifest is None or manifest.get("stage") != stage:
        raise UserError(f"{in_dir} is not an output of 'octoray {stage}' (no {MANIFEST} from that stage)")
    if not manifest.get("complete"):
        raise UserError(f"{in_dir} is incomplete: rerun 'octoray {stage}' to finish it")
    return manifest


def input_record(in_dir: Location, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """How a stage records an input stage directory in its manifest's ``inputs``: where it is, its
    rows, and its content fingerprint (copied from its manifest, never recomputed)."""
    from octoray.storage.locations import display

    return {"path": display(location(in_dir)), "rows": manifest.get("rows"), "fingerprint": manifest.get("fingerprint")}


def write_resolved_config(out_dir: Location, cfg: Any) -> None:
    """Write the fully resolved config beside the outputs, for reproducibility."""
    atomic_write_text(location(out_dir) / RESOLVED_CONFIG, dump_yaml(cfg))


def write_manifest(
    out_dir: Location,
    stage: str,
    cfg: Any,
    *,
    rows: int,
    files: Iterable[str],
    started: float,
    inputs: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the manifest that marks ``out_dir`` complete, and return it."""
    manifest = {
        "stage": stage,
        "complete": True,
        "octoray_version": __version__,
        "rows": rows,
        "files": sorted(files),
        "config": to_dict(cfg),
        "inputs": dict(inputs or {}),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 3),
        **dict(extra or {}),
    }
    atomic_write_json(location(out_dir) / MANIFEST, manifest)
    return manifest


def iter_jsonl(path: Location) -> Iterator[tuple[str, Any]]:
    """``(where, value)`` per non-blank line of a JSONL file; ``where`` is ``path:line`` for errors.

    A line that is not JSON stops with a one-line UserError naming the file and line.
    """
    with location(path).open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{line_no}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None


def input_dir_problems(*, data: Optional[str], out: Optional[str], hparams: Optional[str] = None) -> list[str]:
    """The input checks of train and tune: ``data`` and ``out`` given, ``data`` and ``hparams`` existing
    directories when local; object-store URIs are not checked (that would need the network)."""

    found = []
    if not data:
        found.append("data: required (--data SFT_DIR, the output of 'octoray filter')")
    if not out:
        found.append("out: required (--out DIR)")
    for key, value, what in (("data", data, "SFT data"), ("hparams", hparams, "tune")):
        if value and not is_uri(value) and not location(value).is_dir():
            found.append(f"{key}: {what} directory not found: {value}")
    return found
