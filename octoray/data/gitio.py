"""Streaming git plumbing for mining: one process per pass, never one per commit.

Spawning git per commit costs far more than the work itself (DESIGN.md), so mining talks to three
long-lived plumbing processes per chunk of history: ``git rev-list`` (which commits),
``git diff-tree --stdin`` (which files each commit touched, blob ids only, no content diff), and
``git cat-file --batch`` (commit objects and blobs, streamed).
"""

from __future__ import annotations

import os
import subprocess
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

# Git's own plumbing must not prompt, page, or fetch promised objects behind our back.
GIT_ENV = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_PAGER": "cat", "LC_ALL": "C",
           "GIT_NO_REPLACE_OBJECTS": "1"}


class GitError(Exception):
    """A git command failed (bad repository, corrupt objects ...)."""


def git(repo: Path, *args: str, input: bytes | None = None, check: bool = True) -> bytes:  # noqa: A002
    """Run one git command in ``repo`` and return its stdout."""
    proc = subprocess.run(["git", "-C", str(repo), *args], input=input, capture_output=True, env=GIT_ENV)
    if check and proc.returncode != 0:
        message = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise GitError(message[-1] if message else f"git {args[0]} failed ({proc.returncode})")
    return proc.stdout


def git_dir(path: Path) -> Path | None:
    """The git directory of a work tree or bare repository, or None if ``path`` is not one."""
    proc = subprocess.run(["git", "-C", str(path), "rev-parse", "--absolute-git-dir"],
                          capture_output=True, env=GIT_ENV)
    return Path(proc.stdout.decode().strip()) if proc.returncode == 0 else None


def head_commit(repo: Path, ref: str = "HEAD") -> str | None:
    """The commit ``ref`` points to, or None for an empty repository."""
    proc = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
                          capture_output=True, env=GIT_ENV)
    return proc.stdout.decode().strip() or None if proc.returncode == 0 else None


def rev_list(repo: Path, ref: str, *flags: str) -> list[str]:
    """``git rev-list FLAGS REF`` as a list of commit ids (newest first)."""
    return git(repo, "rev-list", *flags, ref).decode().split()


@dataclass(frozen=True)
class FileChange:
    """One entry of ``git diff-tree --raw``."""

    status: str  # M, A, D, T ... (no R/C: renames are off, a rename is a D plus an A)
    old_blob: str
    new_blob: str
    path: str


def changed_files(repo: Path, commits: list[str]) -> Iterator[tuple[str, list[FileChange]]]:
    """``(commit, changes)`` for each commit, from one ``git diff-tree --stdin`` process.

    Commits without changes against their first parent (and root commits) yield no entry.
    """
    out = git(repo, "diff-tree", "--stdin", "-r", "--no-renames", "--raw", "-z", "--no-abbrev",
              input=("\n".join(commits) + "\n").encode())
    tokens = out.split(b"\0")
    commit: str | None = None
    changes: list[FileChange] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith(b":"):
            meta = token[1:].split(b" ")
            path = tokens[i + 1].decode("utf-8", "surrogateescape")
            changes.append(FileChange(meta[4].decode()[:1], meta[2].decode(), meta[3].decode(), path))
            i += 2
            continue
        if token:
            if commit is not None:
                yield commit, changes
            commit, changes = token.decode(), []
        i += 1
    if commit is not None:
        yield commit, changes


class CatFile:
    """A ``git cat-file --batch`` (or ``--batch-check``) process answering many object ids."""

    def __init__(self, repo: Path, check_only: bool = False) -> None:
        mode = "--batch-check" if check_only else "--batch"
        self._proc = subprocess.Popen(["git", "-C", str(repo), "cat-file", mode], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=GIT_ENV)
        self._check_only = check_only

    def __enter__(self) -> "CatFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the git process."""
        if self._proc.stdin and not self._proc.stdin.closed:
            self._proc.stdin.close()
        self._proc.stdout.close()  # type: ignore[union-attr]
        self._proc.wait()

    def objects(self, names: Iterable[str]) -> Iterator[tuple[str, str, int, bytes | None]]:
        """``(name, type, size, content)`` per name, in order; type "missing" when absent.

        Requests are written from a thread while answers are read here, so neither pipe fills up.
        ``content`` is None in check-only mode.
        """
        names = list(names)
        writer = threading.Thread(target=self._write, args=(names,), daemon=True)
        writer.start()
        stdout = self._proc.stdout
        assert stdout is not None
        for name in names:
            header = stdout.readline()
            if not header:
                raise GitError("git cat-file ended early (corrupt repository?)")
            parts = header.split()
            if len(parts) < 3 or parts[-1] == b"missing":  # "<name> missing" / "<name> ambiguous"
                yield name, "missing", 0, None
                continue
            obj_type, size = parts[1].decode(), int(parts[2])
            content = None
            if not self._check_only:
                content = stdout.read(size)
                stdout.read(1)  # the newline after each object
            yield name, obj_type, size, content
        writer.join()

    def _write(self, names: list[str]) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            stdin.write("".join(f"{n}\n" for n in names).encode("utf-8", "surrogateescape"))
            stdin.flush()
        except BrokenPipeError:
            pass  # the reader reports the failure


@dataclass(frozen=True)
class CommitInfo:
    """The parts of a commit object mining needs."""

    parents: tuple[str, ...]
    author_date: datetime
    message: str


def parse_commit(raw: bytes) -> CommitInfo:
    """Parse a raw commit object (headers, blank line, message)."""
    header, _, body = raw.partition(b"\n\n")
    parents: list[str] = []
    author_date = datetime.fromtimestamp(0, timezone.utc)
    encoding = "utf-8"
    for line in header.split(b"\n"):
        if line.startswith(b"parent "):
            parents.append(line[7:].decode())
        elif line.startswith(b"author "):
            fields = line.rsplit(b" ", 2)
            try:
                author_date = datetime.fromtimestamp(int(fields[1]), timezone.utc)
            except (ValueError, IndexError, OverflowError, OSError):
                pass  # a malformed date keeps the epoch rather than losing the commit
        elif line.startswith(b"encoding "):
            encoding = line[9:].decode("ascii", "replace").strip()
    try:
        message = body.decode(encoding)
    except (LookupError, UnicodeDecodeError):
        message = body.decode("utf-8", "replace")
    return CommitInfo(tuple(parents), author_date, message)
