"""Build real git repositories in tests, commit by commit, with the git CLI."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

MIT = ("MIT License\n\nCopyright (c) 2024 Test\n\nPermission is hereby granted, free of charge, to any person "
       "obtaining a copy of this software and associated documentation files (the \"Software\"), to deal in "
       "the Software without restriction.\n")
GPL3 = "                    GNU GENERAL PUBLIC LICENSE\n                       Version 3, 29 June 2007\n"


class GitRepo:
    """A work tree in ``path`` with helpers that each make one commit."""

    def __init__(self, path: Path, *, bare: bool = False) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self._tick = 0
        self.git("init", "-q", "-b", "main", *(["--bare"] if bare else []))
        if not bare:
            self.git("config", "user.email", "dev@example.com")
            self.git("config", "user.name", "Dev")

    def git(self, *args: str, input: bytes | None = None) -> str:  # noqa: A002
        self._tick += 1
        stamp = f"{1_700_000_000 + self._tick * 60} +0000"
        env = {**os.environ, "GIT_AUTHOR_DATE": stamp, "GIT_COMMITTER_DATE": stamp}
        out = subprocess.run(["git", "-C", str(self.path), *args], check=True, capture_output=True,
                             input=input, env=env)
        return out.stdout.decode()

    def write(self, name: str, content: str | bytes) -> None:
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)

    def commit(self, message: str, files: dict[str, str | bytes] | None = None, *,
               delete: tuple[str, ...] = (), allow_empty: bool = False) -> str:
        """Write ``files``, delete ``delete``, commit everything; returns the commit id."""
        for name, content in (files or {}).items():
            self.write(name, content)
        for name in delete:
            self.git("rm", "-q", name)
        self.git("add", "-A")
        self.git("commit", "-q", "--no-verify", *(["--allow-empty"] if allow_empty else []),
                 "-F", "-", input=message.encode())
        return self.head()

    def head(self) -> str:
        return self.git("rev-parse", "HEAD").strip()
