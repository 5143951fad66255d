"""Where stage outputs live: a local or shared path, or an object-store URI (``s3://``, ``gs://``, ...).

:func:`location` turns what the user typed into either a :class:`pathlib.Path` (local disk, NFS)
or an :class:`ObjectPath` — a small ``Path``-like handle on a ``pyarrow.fs`` file system — so a
stage addresses its files the same way on both (``out / "manifest.json"``, ``.is_file()``,
``.read_text()``, ``.glob("*.parquet")``). What differs is how bytes are committed, and that lives
here and in :mod:`octoray.storage.stage_dirs`:

* object stores have no rename, but a single upload becomes visible only when it completes, so a
  file is written whole from memory or a local temp file and is never seen half-written;
* a stage's ``manifest.json`` is still written last and is the commit marker.

Credentials and endpoints come from the environment, as every AWS/GCP tool reads them
(``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL`` for S3-compatible stores, GCP's application default
credentials); octoray stores none. Ray workers get the URI string and open the file system in
their own process, so nothing secret is pickled.

Only ``pyarrow`` is imported, and only when a URI is used (``import octoray`` stays light).
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, Union

from octoray.errors import UserError

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
#: Local cache of downloaded directories (models); one per node.
CACHE_ENV = "OCTORAY_CACHE"
_COMPLETE = ".octoray-complete"


def is_uri(value: str | os.PathLike[str] | None) -> bool:
    """True for ``scheme://...`` other than ``file://`` (a local path in URI form)."""
    if value is None or isinstance(value, Path):
        return False
    match = _SCHEME.match(str(value))
    return bool(match) and match.group(1).lower() != "file"


def location(value: str | os.PathLike[str]) -> "Location":
    """A ``Path`` for local/shared paths (``file://`` stripped), an :class:`ObjectPath` for URIs."""
    if isinstance(value, ObjectPath):
        return value
    text = str(value)
    if is_uri(text):
        return ObjectPath(text)
    if text.lower().startswith("file://"):
        text = text[len("file://"):]
    return Path(text).expanduser()


def display(loc: "Location") -> str:
    """How a location is shown to the user and recorded in manifests (URIs as given, paths absolute)."""
    return str(loc) if isinstance(loc, ObjectPath) else str(Path(loc).resolve())


# ---------------------------------------------------------------------------------------------
# File systems: one per (scheme, bucket) per process, built from the environment


_FILESYSTEMS: dict[str, Any] = {}
_LOCK = threading.Lock()


def _filesystem(uri: str) -> tuple[Any, str]:
    """``(pyarrow file system, path inside it)`` for ``uri``."""
    scheme = _SCHEME.match(uri).group(1).lower()  # type: ignore[union-attr]
    rest = uri[len(scheme) + 3:]
    bucket = rest.split("/", 1)[0]
    key = f"{scheme}://{bucket}"
    with _LOCK:
        fs = _FILESYSTEMS.get(key)
        if fs is None:
            fs = _FILESYSTEMS[key] = _open_filesystem(scheme, uri)
    return fs, rest.rstrip("/")


def _open_filesystem(scheme: str, uri: str) -> Any:
    import pyarrow.fs as pafs

    if scheme in ("s3", "s3a"):
        # pyarrow reads AWS_* itself; the endpoint is passed explicitly so S3-compatible stores
        # (MinIO, Ceph, R2, a test server) work with the variable every AWS SDK honours.
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict[str, Any] = {}
        if endpoint:
            kwargs["endpoint_override"] = endpoint
            kwargs["scheme"] = "https" if endpoint.startswith("https") else "http"
            kwargs["region"] = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        elif os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"):
            kwargs["region"] = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return pafs.S3FileSystem(**kwargs)
    try:
        fs, _ = pafs.FileSystem.from_uri(uri)
        return fs
    except Exception as arrow_error:  # noqa: BLE001 - pyarrow raises ArrowInvalid/NotImplemented
        try:  # anything fsspec knows (abfs://, hf://, ...), through pyarrow's adapter
            import fsspec
            from pyarrow.fs import FSSpecHandler, PyFileSystem

            return PyFileSystem(FSSpecHandler(fsspec.filesystem(scheme)))
        except Exception:  # noqa: BLE001
            raise UserError(f"cannot open {uri}: {str(arrow_error).splitlines()[0]} "
                            "(supported: local paths, s3://, gs://, and fsspec URIs)") from None


def fs_path(loc: "Location") -> tuple[Any, str]:
    """``(pyarrow file system, path)`` for any location, for pyarrow / Ray Data ``filesystem=``."""
    if isinstance(loc, ObjectPath):
        return loc.fs, loc.path
    import pyarrow.fs as pafs

    return pafs.LocalFileSystem(), str(Path(loc).resolve())


class ObjectPath:
    """A ``pathlib.Path``-like handle on an object-store key (or key prefix: a "directory").

    Covers what the stages use: ``/``, ``name``/``parent``/``suffix``, ``exists``/``is_file``/
    ``is_dir``, ``read_*``/``write_*`` (whole objects), ``glob``/``rglob``/``iterdir``,
    ``unlink``, ``mkdir`` (a no-op: prefixes need no creation) and ``open`` for reading or writing.
    Picklable (only the URI travels); the file system is opened lazily per process.
    """

    __slots__ = ("uri",)

    def __init__(self, uri: str) -> None:
        match = _SCHEME.match(uri)
        if not match:
            raise ValueError(f"not a URI: {uri}")
        scheme = match.group(1).lower()
        rest = re.sub(r"/+", "/", uri[match.end():]).strip("/")
        if not rest:
            raise UserError(f"{uri}: a URI needs a bucket (e.g. {scheme}://bucket/prefix)")
        self.uri = f"{scheme}://{rest}"

    # -- naming ---------------------------------------------------------------------------------
    def __truediv__(self, other: str | os.PathLike[str]) -> "ObjectPath":
        return ObjectPath(f"{self.uri}/{str(other).strip('/')}")

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"ObjectPath({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __lt__(self, other: "ObjectPath") -> bool:  # sorted(), as for Path
        return self.uri < other.uri

    def __reduce__(self) -> tuple[Any, ...]:
        return (ObjectPath, (self.uri,))

    @property
    def name(self) -> str:
        """The last component."""
        return self.uri.rsplit("/", 1)[-1] if self.uri.count("/") > 2 else ""

    @property
    def parent(self) -> "ObjectPath":
        """The enclosing prefix (the bucket is its own parent)."""
        return ObjectPath(self.uri.rsplit("/", 1)[0]) if self.uri.count("/") > 2 else self

    @property
    def suffix(self) -> str:
        """The file extension, with its dot."""
        return Path(self.name).suffix

    @property
    def stem(self) -> str:
        """The name without its extension."""
        return Path(self.name).stem

    def with_name(self, name: str) -> "ObjectPath":
        """This path with another last component."""
        return self.parent / name

    def with_suffix(self, suffix: str) -> "ObjectPath":
        """This path with another extension."""
        return self.parent / (self.stem + suffix)

    def resolve(self) -> "ObjectPath":
        """Itself: a URI is already absolute."""
        return self

    def expanduser(self) -> "ObjectPath":
        """Itself."""
        return self

    @property
    def fs(self) -> Any:
        """The pyarrow file system (opened once per process)."""
        return _filesystem(self.uri)[0]

    @property
    def path(self) -> str:
        """The path inside :attr:`fs` (``bucket/key``)."""
        return _filesystem(self.uri)[1]

    # -- queries ------------------------------------------------------------------------------
    def _info(self) -> Any:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        """Whether an object or a non-empty prefix exists here."""
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        """Whether an object exists at exactly this key."""
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        """Whether objects exist under this prefix."""
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.Directory

    def iterdir(self) -> Iterator["ObjectPath"]:
        """Direct children (objects and sub-prefixes)."""
        yield from (ObjectPath(f"{self.uri.split('://')[0]}://{info.path}") for info in self._list(False))

    def _list(self, recursive: bool) -> list[Any]:
        import pyarrow.fs as pafs

        try:
            return self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True, recursive=recursive))
        except FileNotFoundError:
            return []

    def glob(self, pattern: str) -> Iterator["ObjectPath"]:
        """Direct children whose name matches ``pattern`` (``fnmatch``; no ``/`` in patterns)."""
        return iter(sorted((p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern)), key=str))

    def rglob(self, pattern: str) -> Iterator["ObjectPath"]:
        """Objects at any depth under this prefix whose name matches ``pattern``."""
        import pyarrow.fs as pafs

        scheme = self.uri.split("://")[0]
        found = [ObjectPath(f"{scheme}://{i.path}") for i in self._list(True) if i.type == pafs.FileType.File]
        return iter(sorted((p for p in found if fnmatch.fnmatchcase(p.name, pattern)), key=str))

    # -- whole-object I/O ---------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        """The object's bytes (``FileNotFoundError`` when absent, as ``Path`` raises)."""
        if not self.is_file():
            raise FileNotFoundError(self.uri)
        with self.fs.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        """The object decoded as text."""
        return self.read_bytes().decode(encoding, errors)

    def write_bytes(self, data: bytes) -> int:
        """Upload ``data`` as one object: it appears whole when the upload completes, or not at all."""
        with self.fs.open_output_stream(self.path) as stream:
            stream.write(data)
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        """Upload ``text`` as one object."""
        return self.write_bytes(text.encode(encoding))

    def open(self, mode: str = "r", encoding: str = "utf-8") -> Any:
        """Read (``r``/``rb``) or write (``w``/``wb``, buffered and uploaded on close) an object."""
        if "a" in mode or "+" in mode:
            raise OSError(f"{self.uri}: object stores cannot append or update in place (mode {mode!r})")
        if "r" in mode:
            data = self.read_bytes()
            return io.BytesIO(data) if "b" in mode else io.StringIO(data.decode(encoding))
        return _UploadOnClose(self, binary="b" in mode, encoding=encoding)

    def unlink(self, missing_ok: bool = False) -> None:
        """Delete the object."""
        if not self.is_file():
            if missing_ok:
                return
            raise FileNotFoundError(self.uri)
        self.fs.delete_file(self.path)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: a prefix exists as soon as an object is written under it."""


class _UploadOnClose(io.StringIO):
    """A text/binary writer that uploads its whole content as one object when closed cleanly."""

    def __init__(self, target: ObjectPath, binary: bool, encoding: str) -> None:
        super().__init__()
        self._target, self._binary, self._encoding = target, binary, encoding
        self._bytes = io.BytesIO() if binary else None

    def write(self, data: Any) -> int:  # type: ignore[override]
        if self._bytes is not None:
            return self._bytes.write(data)
        return super().write(data)

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is None:  # a failed writer uploads nothing
            self._upload()
        super().close()

    def close(self) -> None:
        if not self.closed:
            self._upload()
        super().close()

    def _upload(self) -> None:
        data = self._bytes.getvalue() if self._bytes is not None else self.getvalue().encode(self._encoding)
        self._target.write_bytes(data)
        self._bytes = io.BytesIO() if self._bytes is not None else None
        self.seek(0)
        self.truncate()


Location = Union[Path, ObjectPath]


# ---------------------------------------------------------------------------------------------
# Whole-tree operations


def rmtree(loc: Location) -> None:
    """Delete a directory / prefix and everything under it; missing is fine."""
    if isinstance(loc, ObjectPath):
        if loc.is_dir():
            loc.fs.delete_dir(loc.path)  # contents too (delete_dir_contents would leave a marker)
        if loc.is_file():  # some stores keep an explicit "directory" marker object
            loc.fs.delete_file(loc.path)
        return
    shutil.rmtree(loc, ignore_errors=True)


def copy_file(src: Location, dst: Location) -> None:
    """Copy one file; on object stores a server-side copy (no bytes through this process)."""
    if isinstance(src, ObjectPath) and isinstance(dst, ObjectPath) and src.fs is dst.fs:
        src.fs.copy_file(src.path, dst.path)
        return
    if not isinstance(src, ObjectPath) and not isinstance(dst, ObjectPath):
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        return
    upload_file(src, dst) if not isinstance(src, ObjectPath) else download_file(src, Path(dst))


def upload_file(local: Path, dst: Location) -> None:
    """Copy a local file to ``dst`` whole (streamed; the object appears when the upload completes)."""
    import pyarrow.fs as pafs

    fs, path = fs_path(dst)
    if not isinstance(dst, ObjectPath):
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(str(Path(local).resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def download_file(src: ObjectPath, local: Path) -> None:
    """Copy one object to a local file."""
    import pyarrow.fs as pafs

    local.parent.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(src.path, str(local), source_filesystem=src.fs, destination_filesystem=pafs.LocalFileSystem())


def upload_dir(local: Path, dst: Location, *, skip_existing: bool = False, last: str | None = None) -> None:
    """Copy every file under ``local`` to ``dst`` keeping the tree; ``skip_existing`` leaves files
    already there (same size) alone, so a resumed upload never sends a finished file twice;
    top-level file ``last`` goes last (a reader that looks for it then finds everything)."""
    files = sorted(Path(local).rglob("*"), key=lambda p: (p.relative_to(local).as_posix() == last, str(p)))
    for path in files:
        if not path.is_file():
            continue
        target = dst / path.relative_to(local).as_posix()
        if skip_existing and _same_size(target, path.stat().st_size):
            continue
        if isinstance(dst, ObjectPath):
            upload_file(path, target)
        else:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def _same_size(target: Location, size: int) -> bool:
    if isinstance(target, ObjectPath):
        import pyarrow.fs as pafs

        info = target._info()  # one request: type and size
        return info.type == pafs.FileType.File and info.size == size
    return Path(target).is_file() and Path(target).stat().st_size == size


def download_dir(src: ObjectPath, local: Path) -> None:
    """Copy every object under ``src`` into ``local`` keeping the tree."""
    import pyarrow.fs as pafs

    local.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(src.path, str(local), source_filesystem=src.fs, destination_filesystem=pafs.LocalFileSystem())


def cache_root() -> Path:
    """This node's octoray cache: ``$OCTORAY_CACHE`` or ``~/.cache/octoray``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "octoray").expanduser()


def scratch_dir(loc: Location, kind: str) -> Path:
    """A local working directory tied to ``loc`` (stable across reruns on this node)."""
    digest = hashlib.sha1(str(loc).encode()).hexdigest()[:16]
    path = cache_root() / kind / f"{digest}-{(loc.name or 'root')[:40]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def local_copy(name: str | os.PathLike[str], kind: str = "models") -> str:
    """A local path for ``name``: unchanged for paths and hub ids, a per-node cached download for a
    URI (fetched once per node and per URI; concurrent callers on one node each download to their
    own temp dir and the first to finish wins, so no reader ever sees a half-copied directory)."""
    if not is_uri(str(name)):
        return str(name)
    src = ObjectPath(str(name))
    dest = scratch_dir(src, kind) / "files"
    if (dest / _COMPLETE).is_file():
        return str(dest)
    if not src.is_dir():
        raise UserError(f"{src}: no such directory in object storage")
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=dest.parent))
    try:
        download_dir(src, tmp)
        (tmp / _COMPLETE).write_text(str(src))
        if dest.exists() and not (dest / _COMPLETE).is_file():
            shutil.rmtree(dest, ignore_errors=True)  # a copy left incomplete by a killed process
        try:
            os.replace(tmp, dest)
        except OSError:  # another process on this node finished first
            if not (dest / _COMPLETE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)
