"""Content fingerprints of stage outputs: which exact bytes a stage wrote, cheaply.

A stage's fingerprint is ``sha256:<hex>`` over the sorted ``(name, file digest)`` pairs of the
files that are its content (a data stage's shards, train's ``model/``). A file's digest is:

* on a file system, the SHA-256 of its bytes (read once, streamed, when the stage finishes);
* on object storage, the object's own checksum — its ``ETag`` with its size, one HEAD request per
  object and no download (S3 computes the ETag from the uploaded bytes; an object rewritten with
  other bytes gets another) — and the SHA-256 of its bytes only where the store gives none.

So the same bytes on a disk and in a bucket have different fingerprints (the two digests differ);
within one place the fingerprint changes exactly when the content does. Downstream stages copy
their inputs' fingerprints from the inputs' manifests (never re-read the data), and compare them
on a rerun (:mod:`octoray.resumable`).
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Optional

from octoray.storage.locations import Location, ObjectPath

#: Files inside a directory that are not its content: the model card is rewritten after eval.
EXCLUDED = frozenset({"README.md"})
_CHUNK = 1 << 20


def file_digest(path: Location) -> str:
    """The digest of one file: its object-store checksum, else the SHA-256 of its bytes."""
    if isinstance(path, ObjectPath):
        etag = _etag(path)
        if etag:
            return etag
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def _etag(path: ObjectPath) -> Optional[str]:
    """``etag:<tag>:<size>`` from the object's metadata (pyarrow reads it with the HEAD request
    that opening the object makes), or None when the store gives none."""
    try:
        with path.fs.open_input_file(path.path) as handle:
            size = handle.size()
            meta = handle.metadata()
    except (OSError, NotImplementedError, AttributeError):
        return None
    pairs = {(k.decode() if isinstance(k, bytes) else k).lower(): (v.decode() if isinstance(v, bytes) else v)
             for k, v in (meta.items() if meta is not None else [])}
    tag = pairs.get("etag") or pairs.get("md5") or pairs.get("crc32c")
    return f"etag:{tag.strip(chr(34))}:{size}" if tag else None


def content_files(stage_dir: Location, names: Iterable[str]) -> list[tuple[str, Location]]:
    """``(relative name, location)`` of every file ``names`` stand for: a name that is a directory
    (``model``) stands for the files under it, :data:`EXCLUDED` left out."""
    found: list[tuple[str, Location]] = []
    for name in names:
        path = stage_dir / name
        if path.is_file():
            found.append((name, path))
        elif path.is_dir():
            base = str(path).rstrip("/")
            for inner in path.rglob("*"):
                if inner.is_file() and inner.name not in EXCLUDED:
                    found.append((f"{name}/{str(inner)[len(base) + 1:]}", inner))
    return sorted(found, key=lambda pair: pair[0])


def fingerprint(stage_dir: Location, names: Iterable[str]) -> str:
    """The fingerprint of the files ``names`` (relative to ``stage_dir``; directories expanded)."""
    digest = hashlib.sha256()
    for name, path in content_files(stage_dir, names):
        digest.update(f"{name}\t{file_digest(path)}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def short(value: Optional[str]) -> str:
    """The first 12 hex digits of a fingerprint, for messages (``none`` when there is none)."""
    if not value:
        return "none"
    return value.split(":", 1)[-1][:12]
