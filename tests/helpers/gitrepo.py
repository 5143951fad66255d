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


KEPT_SUBJECTS = {"Fix off-by-one error in parser loop", "Tweak e on the branch side", "Fix rust main output"}


def build_rules_repo(path: Path) -> GitRepo:
    """One commit per CommitPack rule (tests/data/test_mining.py: EXPECTED_DROPS); KEPT_SUBJECTS survive."""
    repo = GitRepo(path)
    repo.commit("Initial import of everything", {
        "LICENSE": MIT, "a.py": "x = 1\n", "b.js": "let b = 1;\n", "notes.xyz123": "n\n", "img.py": "i = 1\n",
        "latin.py": "l = 1\n", "big.py": "b = 1\n", "e.py": "e = 1\n", "main.rs": "fn main() {}\n"})
    repo.commit("Fix off-by-one error in parser loop\n\nThe loop ran one step too far.", {"a.py": "x = 2\n"})
    repo.commit("Refactor two files together", {"a.py": "x = 3\n", "b.js": "let b = 2;\n"})
    repo.commit("Add module c for helpers", {"c.py": "c = 1\n"})
    repo.commit("Remove module c entirely", delete=("c.py",))
    repo.git("mv", "b.js", "d.js")
    repo.commit("Rename b to d for clarity")
    repo.commit("Change the notes file text", {"notes.xyz123": "m\n"})
    repo.commit("Fix", {"a.py": "x = 4\n"})
    repo.commit("initial commit", {"a.py": "x = 5\n"})
    repo.commit("Merge upstream changes into a", {"a.py": "x = 6\n"})
    repo.commit("Update a.py", {"a.py": "x = 7\n"})
    repo.commit("Change image bytes in img", {"img.py": b"\x89PNG\x00\x00binary"})
    repo.commit("Change latin encoded module", {"latin.py": b"s = '\xe9t\xe9'\n"})
    repo.commit("Grow big module beyond the cap", {"big.py": "b = 2\n" * 400})
    repo.commit("Empty commit for testing", allow_empty=True)
    repo.git("checkout", "-q", "-b", "side")
    repo.commit("Tweak e on the branch side", {"e.py": "e = 2\n"})
    repo.git("checkout", "-q", "main")
    repo.git("merge", "-q", "--no-ff", "-m", "Merge branch side", "side")
    repo.commit("Fix rust main output", {"main.rs": 'fn main() { println!("hi"); }\n'})
    return repo
