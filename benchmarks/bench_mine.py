"""Mining throughput vs a plain ``git log --no-merges --numstat`` pass over the same repository.

    .venv/bin/python benchmarks/bench_mine.py [--repo PATH] [--commits 4000]

Without ``--repo`` it builds a repository with ``git fast-import`` whose files are real source
(this Python's standard library) and whose history has the shape of a real project: mostly
single-file edits, some multi-file commits, additions, renames and merges. Ray is started once,
before timing, so the numbers compare mining work, not cluster start-up.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from octoray.data import mining
from octoray.config import load_config
from octoray.cluster.connection import ensure_ray

SUBJECTS = ("Fix {n} handling in parser", "Add support for {n} option", "Refactor {n} helper",
            "Remove unused {n} import", "Improve error message for {n}", "Update docs for {n}",
            "Use faster path for {n}", "Handle empty {n} input", "wip", "Bump version", "Merge fixes")


def build_repo(path: Path, n_commits: int, seed: int = 0) -> Path:
    """A git repository with ``n_commits`` commits of real source files, via fast-import."""
    rng = random.Random(seed)
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:300]
    files = {f"src/{p.name}": p.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
             for p in sources}
    stream: list[bytes] = []

    def blob(text: str) -> bytes:
        data = text.encode()
        return b"data %d\n%s\n" % (len(data), data)

    def commit(mark: int, message: str, ops: list[bytes], parents: list[int]) -> None:
        stream.append(b"commit refs/heads/main\nmark :%d\n" % mark)
        stream.append(b"author Dev <dev@example.com> %d +0000\n" % (1_600_000_000 + mark * 60))
        stream.append(b"committer Dev <dev@example.com> %d +0000\n" % (1_600_000_000 + mark * 60))
        stream.append(blob(message)[:-1] + b"\n")
        for parent in parents[:1]:
            stream.append(b"from :%d\n" % parent)
        for parent in parents[1:]:
            stream.append(b"merge :%d\n" % parent)
        stream.extend(ops)
        stream.append(b"\n")

    mit = "MIT License\n\nPermission is hereby granted, free of charge, to any person obtaining a copy\n"
    ops = [b"M 100644 inline LICENSE\n" + blob(mit)]
    ops += [b"M 100644 inline %s\n" % name.encode() + blob("".join(lines)) for name, lines in files.items()]
    commit(1, "Import the sources", ops, [])
    for mark in range(2, n_commits + 1):
        names = list(files)
        roll = rng.random()
        touched = rng.sample(names, 3) if roll < 0.1 else [rng.choice(names)]
        ops = []
        for name in touched:
            lines = files[name]
            i = rng.randrange(len(lines)) if lines else 0
            lines.insert(i, f"# change {mark}: {rng.random():.6f}\n")
            ops.append(b"M 100644 inline %s\n" % name.encode() + blob("".join(lines)))
        if 0.1 <= roll < 0.15:
            new = f"src/new_{mark}.py"
            files[new] = [f"VALUE = {mark}\n"]
            ops = [b"M 100644 inline %s\n" % new.encode() + blob(files[new][0])]
        message = rng.choice(SUBJECTS).format(n=Path(touched[0]).stem) + "\n"
        commit(mark, message, ops, [mark - 1] + ([mark - 2] if rng.random() < 0.02 and mark > 3 else []))
    path.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    subprocess.run(["git", "-C", str(path), "fast-import", "--quiet"], input=b"".join(stream), check=True)
    subprocess.run(["git", "-C", str(path), "reset", "-q", "--hard", "main"], check=True)
    return path


def time_git_log(repo: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["git", "-C", str(repo), "log", "--no-merges", "--numstat"], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def time_mining(repo: Path, out: Path, workers: int, chunk: int) -> tuple[float, dict]:
    cfg = load_config(mining.MineConfig, None, [f"workers={workers}", f"chunk_commits={chunk}", "progress=false"],
                      values={"sources": [str(repo)], "out": str(out)})
    start = time.perf_counter()
    mining.run(cfg)
    import json

    return time.perf_counter() - start, json.loads((out / "stats.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, help="mine this repository instead of a generated one")
    parser.add_argument("--commits", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-mine-"))
    repo = args.repo or build_repo(tmp / "repo", args.commits)
    ensure_ray(num_cpus=2)
    mining.run(load_config(mining.MineConfig, None, ["progress=false"],
                           values={"sources": [str(repo)], "out": str(tmp / "warmup")}))  # warm workers
    git_s = statistics.median(time_git_log(repo) for _ in range(args.repeats))
    n_commits = int(subprocess.run(["git", "-C", str(repo), "rev-list", "--count", "HEAD"], capture_output=True,
                                   text=True, check=True).stdout)
    results = {}
    for workers in (1, 2):
        runs = [time_mining(repo, tmp / f"out-{workers}-{i}", workers, max(200, n_commits // 8))
                for i in range(args.repeats)]
        results[workers] = (statistics.median(r[0] for r in runs), runs[0][1])
    stats = results[1][1]
    single = stats["commits_seen"] - sum(stats["dropped"][k] for k in
                                         ("merge", "no_diff", "not_single_file", "not_modified_in_place"))
    print(f"repository: {args.repo or f'generated, {args.commits} commits'} ({n_commits} commits, "
          f"{single} single-file modifications, {stats['kept']} kept)\n")
    print("| run | wall s | single-file commits/s | vs git log |")
    print("|---|---|---|---|")
    print(f"| `git log --no-merges --numstat` (baseline) | {git_s:.2f} | - | 1.00x |")
    for workers, (seconds, _) in results.items():
        print(f"| octoray mine, {workers} worker{'s' if workers > 1 else ''} | {seconds:.2f} | "
              f"{single / seconds:,.0f} | {seconds / git_s:.2f}x |")
    print(f"\nspeed-up 1 -> 2 workers: {results[1][0] / results[2][0]:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
