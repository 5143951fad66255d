"""Small, learnable ``sft/`` directories for the training and tuning tests (written like 'octoray filter')."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

NAMES = ("alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta")
OPS = (("add", "+"), ("subtract", "-"), ("multiply", "*"))


@dataclass(frozen=True)
class WrittenBy:
    """What the manifest records as the config that produced these rows."""

    generator: str = "tests/helpers/sft.py"


def sft_rows(n: int, seed: int = 0, oasst: int = 0) -> list[dict[str, str]]:
    """``n`` commit rows with a fixed, learnable edit, plus ``oasst`` chat rows."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, (verb, op) = rng.choice(NAMES), rng.choice(OPS)
        old = f"def {name}(a, b):\n    return a\n"
        new = f"def {name}(a, b):\n    return a {op} b\n"
        subject = f"Make {name} {verb} its arguments"
        rows.append({"prompt": f"Question: {subject}\n{old}\n\nAnswer:\n", "completion": new,
                     "source": "commitpackft", "lang": "Python"})
    for i in range(oasst):
        rows.append({"prompt": f"Question: Say hello to {NAMES[i % len(NAMES)]} number {i}\n\nAnswer:\n",
                     "completion": f"Hello, {NAMES[i % len(NAMES)]}!", "source": "oasst", "lang": "English"})
    return rows


def write_sft(out_dir: Path, n: int = 200, seed: int = 0, oasst: int = 0, *, legacy: bool = False) -> Path:
    """Write an sft/ directory (one Parquet shard + a complete 'filter' manifest).

    The shard goes where 'octoray filter' puts it (``data/train-00000-of-00001.parquet``), or with
    ``legacy`` at the top level as octoray 0.1 did.
    """
    import pyarrow as pa

    from octoray.storage.layout import shard_name
    from octoray.storage.stage_dirs import write_manifest, write_parquet_atomic

    rows = sft_rows(n, seed, oasst)
    name = "part-00000.parquet" if legacy else shard_name(0, 1)
    write_parquet_atomic(pa.Table.from_pylist(rows), out_dir / name)
    write_manifest(out_dir, "filter", WrittenBy(), rows=len(rows), files=[name], started=time.time())
    return out_dir
