"""Which repository a source is: the name rows, ``stats.json``, the card and the summary use.

A source's identity is, in order of preference:

1. ``owner/name`` from its remote URL: the clone URL of a URL source, or ``remote.origin.url`` of
   a local repository when that is a hosted URL (``https://host/owner/name.git``,
   ``git@host:owner/name.git``). A remote that is itself a local path or ``file://`` URL names
   nothing more than the path does, so it is not used.
2. Otherwise the shortest suffix of the source's path that no other source of the run shares
   (``alice/project`` and ``bob/project``; ``repo`` alone when it is the only ``repo``).

Identities are unique within a run: when two sources would share one (the same upstream cloned
twice, or GitHub's and GitLab's ``owner/name``), each takes the next longer candidate of its own
(``host/owner/name``, then its path suffixes), and sources that no candidate tells apart (the same
directory given as a path and as a ``file://`` URL) are numbered ``name#2``, ``name#3`` in the
order given. The source path or URL is always kept beside the identity (``stats.json``
``repos[identity].source``, the card's source column).
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Optional, Sequence

#: ``scheme://[user@]host[:port]/path`` and scp-like ``user@host:path``.
_SCHEME_URL = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*)://(?:[^@/]*@)?(?P<host>[^/:]*)(?::\d+)?(?P<path>/.*)?$",
                         re.IGNORECASE)
_SCP_URL = re.compile(r"^(?:[\w.-]+@)?(?P<host>[\w.-]+):(?P<path>(?!//).+)$")


def hosted(url: str) -> Optional[tuple[str, str]]:
    """``(host, "owner/name")`` of a hosted git URL, or None for a local path, a ``file://`` URL or
    a URL with fewer than two path parts."""
    url = url.strip()
    match = _SCHEME_URL.match(url)
    if match:
        if match["scheme"].lower() == "file" or not match["host"]:
            return None
        host, path = match["host"].lower(), match["path"] or ""
    else:
        match = _SCP_URL.match(url)
        if not match or "/" in match["host"] or Path(url).exists():
            return None
        host, path = match["host"].lower(), match["path"]
    parts = [p for p in path.rstrip("/").removesuffix(".git").split("/") if p]
    if len(parts) < 2:
        return None
    return host, "/".join(parts[-2:])


def local_path(spec: str) -> Optional[str]:
    """The path of a local path or ``file://`` URL source, None for a hosted URL."""
    match = _SCHEME_URL.match(spec)
    if match:
        return match["path"] if match["scheme"].lower() == "file" else None
    return None if _SCP_URL.match(spec) and not Path(spec).exists() else spec


def path_suffixes(path: str) -> list[str]:
    """``repo``, ``x/repo``, ``y/x/repo`` ...: the suffixes of ``path``, shortest first, ``.git``
    dropped from the last part (a bare repository ``name.git`` is ``name``)."""
    parts = [p for p in PurePosixPath(path).parts if p != "/"]
    if parts:
        parts[-1] = parts[-1].removesuffix(".git") or parts[-1]
    return ["/".join(parts[len(parts) - k:]) for k in range(1, len(parts) + 1)]


def candidates(spec: str, origin: Optional[str] = None) -> list[str]:
    """The identities a source may take, preferred first (see the module docstring)."""
    found: list[str] = []
    for url in (spec, origin):
        named = hosted(url) if url else None
        if named:
            found += [named[1], f"{named[0]}/{named[1]}"]
            break
    path = local_path(spec)
    if path:
        found += path_suffixes(path)
    elif not found:
        found.append(spec)
    return list(dict.fromkeys(found))


def assign(options: Sequence[Sequence[str]]) -> list[str]:
    """One identity per source from each source's ``candidates``: the first that no other source
    could take, else its first, numbered ``#2`` ... in order when shared."""
    chosen: list[str] = []
    for i, own in enumerate(options):
        others = {c for j, theirs in enumerate(options) if j != i for c in theirs}
        chosen.append(next((c for c in own if c not in others), own[0]))
    seen: dict[str, int] = {}
    unique: list[str] = []
    for name in chosen:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return unique
