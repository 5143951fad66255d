"""The progress bar every stage draws on stderr, in the unit that matters to it (commits, rows, steps)."""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(total: int, *, desc: str, unit: str, enabled: bool = True, initial: int = 0,
                 mininterval: float = 0.1) -> Any:
    """A ``tqdm`` bar on stderr (stdout stays for results); ``enabled=False`` draws nothing.

    ``mininterval`` is tqdm's least time between redraws: a Ray worker's output travels to the
    driver line by line, so training redraws once a second rather than ten times.
    """
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, file=sys.stderr,
                mininterval=mininterval)
