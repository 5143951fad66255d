"""Throughput of the CommitPackFT rules (without the tokenizer rule), rows/s on one core.

Compares, on the same synthetic CommitPack rows:

* **baseline: per-row Python** -- ``octoray.data.rules.reference_decision`` on each row dict,
  the way the original ``datasets.filter`` lambdas run (one Python call per row and rule), once
  on ready-made dicts and once including the Arrow -> dict conversion a per-row Ray Data UDF
  (``ds.filter(fn)``) pays;
* **octoray: vectorised Arrow** -- the batch predicates ``octoray filter`` runs inside its Ray
  Data ``map_batches`` stages (rules 1-7, then 9-10), on pyarrow batches of the default size
  and of 1024 rows;
* optionally (``--ray``) the whole ``octoray filter`` stage through Ray Data on every core.

Both single-core paths must reach the same decision for every row; the script checks it.

    .venv/bin/python benchmarks/bench_filter.py [--rows 100000] [--ray]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from octoray.data import rules  # noqa: E402
from octoray.data.languages import LINGUIST  # noqa: E402

SUBJECTS = [
    "Add retry limit to the download helper", "Fix crash when the config file is empty", "fix typo in docs",
    "Update README.md", "Bump version to 1.4.2", "[core] parser: Handle unicode escapes in strings",
    "Merge branch 'dev' into main", "Refactored the loader module", "Fix #123: wrong offset in the lexer",
    "Remove unused imports from the client", "WIP", "Use pathlib instead of os.path everywhere now",
    "Improve error message for missing keys [ci skip]", "Add tests for issue 42 regression in parser",
    "Implement streaming decode of large payloads", "Support Python 3.12 in the build matrix",
]
FILES = [("src/app.py", "Python"), ("lib/index.js", "JavaScript"), ("src/Main.java", "Java"),
         ("cmd/main.go", "Go"), ("src/lib.rs", "Rust"), ("src/util.cpp", "C++"), ("src/app.js", "Python")]


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    """CommitPack-like rows: realistic subjects, 0.5-3 KB files, a mix of languages."""
    rng = random.Random(seed)
    words = ["value", "index", "result", "config", "client", "buffer", "offset", "parse", "render", "token"]
    rows = []
    for i in range(n):
        path, lang = rng.choice(FILES)
        body = "\n".join(f"    {rng.choice(words)}_{j} = {rng.choice(words)}({j})" for j in range(rng.randint(20, 100)))
        new = body + "\n    return None\n" if rng.random() > 0.02 else body
        rows.append({"commit": f"{rng.getrandbits(160):040x}", "old_file": path, "new_file": path, "lang": lang,
                     "old_contents": body, "new_contents": new, "subject": rng.choice(SUBJECTS) + rng.choice(["", " again", " for real"])})
    return rows


def run_baseline(rows: list[dict], tables: rules.Tables) -> list[int]:
    starts = tuple(v + " " for v in tables.verbs)
    return [rules.reference_decision(r, tables, LINGUIST.extensions_for, verbs=starts)[0] for r in rows]


def run_vectorised(table, tables: rules.Tables, batch_rows: int) -> list[int]:
    """The stage's batch functions: rules 1-7 (``_first_rules``), then 9-10 on the survivors."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from octoray.data.filtering import _apply, _first_rules

    codes = np.zeros(table.num_rows, dtype=np.int64)
    for offset, batch in _batches(table, batch_rows):
        # "path" survives slimming; here it carries the row number so decisions map back.
        batch = batch.append_column("path", pa.array(np.arange(offset, offset + batch.num_rows)))
        out = _first_rules(batch, LINGUIST.extensions_for)
        live = out.filter(pc.equal(out.column("_drop"), 0))
        subject = live.column("subject")
        drop = _apply(live.column("_drop"), [
            ("imperative", lambda: rules.rule_imperative(subject, tables)),
            ("second_pass", lambda: rules.rule_second_pass(subject, live.column("commit"), 0)),
        ])
        codes[out.column("path").to_numpy()] = out.column("_drop").to_numpy()
        codes[live.column("path").to_numpy()] = drop.to_numpy(zero_copy_only=False)
    return codes.tolist()


def _batches(table, batch_rows: int):
    import pyarrow as pa

    offset = 0
    for batch in table.to_batches(max_chunksize=batch_rows):
        yield offset, pa.Table.from_batches([batch])
        offset += batch.num_rows


def run_ray(rows: list[dict], workdir: Path) -> float:
    """The whole stage through Ray Data (read, rules, actor stage, write); returns seconds."""
    import pyarrow as pa

    from octoray.data import filtering
    from octoray.config import load_config
    from octoray.data.mining import _schema
    from octoray.storage.stage_dirs import write_manifest, write_parquet_atomic

    commits = workdir / "commits"
    full = [{**r, "message": r["subject"], "license": "mit", "repos": "x", "repo": "x", "parent": "", "author_date": None}
            for r in rows]
    files = []
    for i in range(0, len(full), 25_000):
        name = f"commits-{i // 25_000:05d}.parquet"
        write_parquet_atomic(pa.Table.from_pylist(full[i:i + 25_000], schema=_schema()), commits / name)
        files.append(name)
    write_manifest(commits, "mine", filtering.FilterConfig(), rows=len(rows), files=files, started=time.time())
    cfg = load_config(filtering.FilterConfig, None, ["tokenizer_rule=false", "decontam=false", "progress=false"],
                      values={"commits": str(commits), "out": str(workdir / "sft")})
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    start = time.perf_counter()
    filtering.run(cfg)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--ray", action="store_true", help="also time the whole stage through Ray Data")
    args = parser.parse_args()

    import pyarrow as pa

    rows = synthetic_rows(args.rows)
    tables = rules.load_tables()
    table = pa.Table.from_pylist(rows)
    LINGUIST.extensions_for("Python")  # warm enry's import outside the timings

    from octoray.data.filtering import FilterConfig

    # CPU seconds of this process: "rows/s per core", and robust to other load on the machine.
    results = []
    start = time.process_time()
    base = run_baseline(rows, tables)
    results.append(("baseline: per-row Python on ready-made dicts (reference_decision)", time.process_time() - start))
    # What a per-row UDF in Ray Data (ds.filter(fn)) also pays: Arrow batches -> Python dicts.
    start = time.process_time()
    base_rd = run_baseline([row for _, b in _batches(table, FilterConfig().batch_size) for row in b.to_pylist()], tables)
    results.append(("baseline: per-row Python incl. Arrow -> dict rows (as ds.filter(fn) runs)",
                    time.process_time() - start))
    assert base_rd == base
    for batch_rows in (FilterConfig().batch_size, 1024):
        start = time.process_time()
        vec = run_vectorised(table, tables, batch_rows)
        results.append((f"octoray: vectorised Arrow, {batch_rows}-row batches", time.process_time() - start))
        if base != vec:
            bad = sum(a != b for a, b in zip(base, vec))
            raise SystemExit(f"decisions differ on {bad} of {len(rows)} rows")
    kept = sum(c == 0 for c in vec)

    print(f"{len(rows):,} synthetic rows, rules 1-7 + 9-10 (no tokenizer, no decontamination); "
          f"{kept:,} kept, identical decisions\n")
    print("| implementation | cores | CPU seconds | rows/s per core | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds in results:
        print(f"| {name} | 1 | {seconds:.2f} | {len(rows) / seconds:,.0f} | {results[0][1] / seconds:.1f}x |")
    if args.ray:
        import os

        with tempfile.TemporaryDirectory() as tmp:
            seconds = run_ray(rows, Path(tmp))
        print(f"| octoray filter end to end (Ray Data, read + write; wall seconds) | {os.cpu_count()} | {seconds:.2f} | "
              f"{len(rows) / seconds:,.0f} | {results[0][1] / seconds:.1f}x |")


if __name__ == "__main__":
    main()
