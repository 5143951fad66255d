"""The config of ``octoray mine`` (a leaf: imports nothing from octoray.data, so every module of the
stage, and the pipeline, can import it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from octoray.config import option

#: CommitPack's permissive list (commitpack_sql_rules.json), as lower-case SPDX ids.
PERMISSIVE = frozenset({
    "mit", "artistic-2.0", "isc", "cc0-1.0", "epl-1.0", "mpl-2.0", "unlicense", "apache-2.0",
    "bsd-3-clause", "agpl-3.0", "lgpl-2.1", "bsd-2-clause",
})



@dataclass(frozen=True)
class MineConfig:
    """Options of ``octoray mine`` (``key=value`` on the command line, or a ``mine:`` YAML section)."""

    sources: tuple[str, ...] = option((), "repositories: work trees, bare repos, clone URLs, or files listing them")
    out: str = option("", "output directory (commits/)")
    ref: str = option("HEAD", "the history to mine: a ref or revision range passed to git rev-list")
    workers: int = option(0, "parallel mining tasks (0 = every CPU of the Ray cluster)")
    chunk_commits: int = option(2000, "most commits per mining task (and per output shard); big histories "
                                      "are split into such ranges")
    languages_file: str | None = option(None, "JSON {language: [extensions]} to use instead of Linguist "
                                              "(e.g. CommitPack's programming_languages.json)")
    permissive_licenses: tuple[str, ...] = option(tuple(sorted(PERMISSIVE)), "SPDX ids kept (CommitPack's list)")
    allow_unlicensed: bool = option(False, "also keep repositories without a recognised license file")
    license_per_commit: bool = option(False, "judge the license at each commit instead of at the mined head")
    min_message_chars: int = option(5, "messages must be longer than this (exclusive bound)")
    max_message_chars: int = option(10_000, "messages must be shorter than this (exclusive bound)")
    max_file_bytes: int = option(1_000_000, "skip commits whose old or new file is larger (huge blobs)")
    non_utf8: Literal["drop", "replace"] = option("drop", "file contents that are not UTF-8: drop the commit, "
                                                          "or decode with U+FFFD replacements")
    clone_dir: str | None = option(None, "where URLs are cloned (default OUT/.repos; with OUT a URI, "
                                         "a cache on each node)")
    progress: bool = option(True, "show a progress bar")

    def problems(self) -> list[str]:
        """Every invalid value, as messages."""
        found = []
        if not self.sources:
            found.append("no repositories given")
        if not self.out:
            found.append("out: required (--out DIR)")
        for name in ("chunk_commits", "max_file_bytes"):
            if getattr(self, name) <= 0:
                found.append(f"{name} must be positive")
        if self.workers < 0:
            found.append("workers must be >= 0")
        if self.min_message_chars >= self.max_message_chars:
            found.append("min_message_chars must be below max_message_chars")
        unknown = sorted(set(self.permissive_licenses) - {s.lower() for s in self.permissive_licenses})
        if unknown:
            found.append(f"permissive_licenses must be lower-case SPDX ids: {', '.join(unknown)}")
        return found
