"""Repository license detection: license file text -> SPDX id.

CommitPack kept repositories under permissive licenses, judged by each repository's license at
scrape time (GitHub's licensee on the default branch). octoray reads the license file at the mined
head (or, as an option, at every commit) and classifies its text with the distinctive phrases of
each license below. ``SPDX-License-Identifier:`` lines win when present.
"""

from __future__ import annotations

import re

#: Root-level file names that hold a repository's license, most specific first.
LICENSE_FILE_NAMES = (
    "LICENSE", "LICENSE.md", "LICENSE.txt", "LICENSE.rst", "LICENCE", "LICENCE.md", "LICENCE.txt",
    "COPYING", "COPYING.md", "COPYING.txt", "UNLICENSE", "license", "license.md", "license.txt",
    "License", "License.md", "License.txt", "MIT-LICENSE", "MIT-LICENSE.txt", "LICENSE-MIT",
    "LICENSE-APACHE", "COPYING.LESSER",
)

# (spdx id, phrases that must all occur, where). The copyleft families are told apart by their
# title, read only in the head of the text: GPL-3.0's body names the AGPL and MPL-2.0's names the
# GPL. Order matters, the first match wins.
_HEAD_CHARS = 400
_RULES: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    # (spdx id, phrases, head only)
    ("agpl-3.0", ("gnu affero general public license", "version 3"), True),
    ("lgpl-2.1", ("gnu lesser general public license", "version 2.1"), True),
    ("lgpl-2.0", ("gnu library general public license", "version 2"), True),
    ("lgpl-3.0", ("gnu lesser general public license", "version 3"), True),
    ("gpl-3.0", ("gnu general public license", "version 3"), True),
    ("gpl-2.0", ("gnu general public license", "version 2"), True),
    ("mpl-2.0", ("mozilla public license", "2.0"), True),
    ("epl-2.0", ("eclipse public license", "2.0"), True),
    ("epl-1.0", ("eclipse public license", "1.0"), True),
    ("apache-2.0", ("apache license", "version 2.0"), True),
    ("artistic-2.0", ("the artistic license 2.0",), True),
    ("unlicense", ("this is free and unencumbered software released into the public domain",), False),
    ("cc0-1.0", ("cc0 1.0 universal",), False),
    ("cc0-1.0", ("creative commons legal code", "cc0"), False),
    ("bsl-1.0", ("boost software license",), False),
    ("isc", ("permission to use, copy, modify, and/or distribute this software for any purpose",), False),
    ("isc", ("permission to use, copy, modify, and distribute this software for any purpose", "isc"), False),
    ("bsd-3-clause", ("redistribution and use in source and binary forms", "neither the name"), False),
    ("bsd-3-clause", ("redistribution and use in source and binary forms", "may not be used to endorse"), False),
    ("bsd-2-clause", ("redistribution and use in source and binary forms",), False),
    ("mit", ("permission is hereby granted, free of charge, to any person obtaining a copy",), False),
    ("apache-2.0", ("licensed under the apache license, version 2.0",), False),
)

_SPDX_LINE = re.compile(r"spdx-license-identifier:\s*([a-z0-9.+-]+)")
_SPACE = re.compile(r"[\s*#/>]+")


def classify_license(text: str) -> str | None:
    """The lower-case SPDX id of a license text, or None when it is not recognised."""
    normalised = _SPACE.sub(" ", text.lower().replace("\u2019", "'")).strip()
    spdx = _SPDX_LINE.search("\n".join(text.lower().splitlines()[:5]))
    if spdx:
        return spdx.group(1).removesuffix("-only").removesuffix("-or-later")
    head = normalised[:_HEAD_CHARS]
    for spdx_id, phrases, head_only in _RULES:
        where = head if head_only else normalised
        if all(phrase in where for phrase in phrases):
            return spdx_id
    return None
