"""Which programming language a file is in.

By default octoray uses GitHub Linguist's language table through go-enry (a maintained Go port of
Linguist, Python bindings ``enry-python``): the extension picks the candidates and Linguist's
content heuristics settle ambiguous extensions (``.h`` C vs C++, ``.rs`` Rust vs RenderScript,
``.pl`` Perl vs Prolog). ``languages_file`` swaps in a fixed ``{language: [extensions]}`` table such
as CommitPack's original 358-language ``programming_languages.json``, to reproduce its decisions
exactly (pure extension lookup, no content heuristics).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from octoray.errors import UserError

#: Bytes of content handed to Linguist's heuristics; they only look at the start of a file.
_HEURISTIC_BYTES = 16_384


@dataclass(frozen=True)
class LanguageTable:
    """A language lookup: Linguist (``table is None``) or a fixed extension table."""

    table: Mapping[str, frozenset[str]] | None = None  # language -> extensions, as given
    source: str = "linguist"

    @functools.cached_property
    def _by_extension(self) -> dict[str, str]:
        by_ext: dict[str, str] = {}
        for language, extensions in (self.table or {}).items():
            for ext in extensions:
                by_ext.setdefault(ext, language)  # first language listing an extension wins
        return by_ext

    def language_for_path(self, path: str, content: bytes | None = None) -> str | None:
        """The language of ``path`` (with ``content`` to settle ambiguity), or None if unknown."""
        if self.table is None:
            return _linguist_language(path, content)
        name = os.path.basename(path)
        if name in self._by_extension:  # whole file names such as "Makefile", "Dockerfile"
            return self._by_extension[name]
        # Longest matching suffix, exact case first: the original table lists ".C" (C++) apart from ".c" (C).
        dot = name.find(".", 1 if name.startswith(".") else 0)
        while dot != -1:
            suffix = name[dot:]
            language = self._by_extension.get(suffix) or self._by_extension.get(suffix.lower())
            if language:
                return language
            dot = name.find(".", dot + 1)
        return None

    def extensions_for(self, language: str) -> frozenset[str]:
        """Lower-cased extensions (with the dot) that belong to ``language``."""
        if self.table is None:
            return _linguist_extensions(language)
        return frozenset(ext.lower() for ext in self.table.get(language, ()) if ext.startswith("."))


def _linguist_language(path: str, content: bytes | None) -> str | None:
    name = os.path.basename(path)
    if content is None:
        return _linguist_by_name(name)
    import enry

    return enry.get_language(name, content[:_HEURISTIC_BYTES]) or None


@functools.lru_cache(maxsize=65_536)
def _linguist_by_name(name: str) -> str | None:
    """Linguist's first candidate from the file name alone ("Makefile", then the extension)."""
    import enry

    return enry.get_language_by_filename(name).language or enry.get_language_by_extension(name).language or None


@functools.lru_cache(maxsize=4096)
def _linguist_extensions(language: str) -> frozenset[str]:
    import enry

    return frozenset(ext.lower() for ext in enry.get_language_extensions(language))


LINGUIST = LanguageTable()


def load_languages_file(path: str | Path) -> LanguageTable:
    """A fixed table from a JSON file ``{"Python": [".py", ...], "Makefile": ["Makefile", ...]}``.

    That is CommitPack's format: entries starting with a dot are extensions, others whole file names.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"languages file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"languages file {path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict) or not all(
        isinstance(exts, list) and all(isinstance(e, str) and e for e in exts) for exts in data.values()
    ):
        raise UserError(f"languages file {path} must map language names to lists of extensions ('.py') or file names")
    return LanguageTable({lang: frozenset(exts) for lang, exts in data.items()}, source=str(path))


def language_table(languages_file: str | Path | None) -> LanguageTable:
    """Linguist by default, or the fixed table in ``languages_file``."""
    return LINGUIST if languages_file is None else load_languages_file(languages_file)
