"""Benchmark: HumanEvalPack oracle execution on octoray's Ray actors, against a named baseline.

All sides execute the same programs (canonical solutions, ``declaration + canonical_solution``)
in the same sandbox code. The baseline (``--baseline``) is one of

* ``reference`` (default): the same Ray actors with ``Sandbox(accelerated=False)``, today's
  per-sample commands (cold javac, g++ parsing every header, ...) -- what the accelerated build
  paths are measured against;
* ``sequential``: a plain loop in one process with the accelerated sandbox -- what the actors'
  parallelism is measured against.

The programs run in ``--rounds`` slices, each side in fresh actors/processes per round,
alternating which side goes first (load drifts on a shared machine). Prints markdown tables: the
totals, and per language the passes, verdict agreement and seconds per sample.

    .venv/bin/python benchmarks/bench_eval.py --problems 164                 # full: 984 programs
    .venv/bin/python benchmarks/bench_eval.py --problems 10 --languages python,js,cpp
    .venv/bin/python benchmarks/bench_eval.py --problems 164 --baseline sequential --process-pool
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from octoray.evaluation import humanevalpack as hep  # noqa: E402


def _samples(problems: dict[str, list[dict]]) -> list[dict]:
    # Interleave languages so both executors see the same mix at every point of the run.
    rows = []
    for i in range(max(len(v) for v in problems.values())):
        for lang, items in problems.items():
            if i < len(items):
                p = items[i]
                rows.append({"task_id": p["task_id"], "language": lang, "task": "synthesize", "sample_idx": 0,
                             "code": p["declaration"] + p["canonical_solution"]})
    return rows


def _warm_shared_cache(cache: Path, problems: dict[str, list[dict]]) -> None:
    """Build what the sandbox caches *across* processes (Rust deps, the Go cache template, the
    javac class-data archive, the C++ precompiled header, the warm javac's classes) in a
    throwaway process, so neither side pays it; per-process caches (each process's copy of the
    Go build cache, the warm javac's JVM) stay cold for every side."""
    import json

    code = ("import sys, json; from pathlib import Path; from octoray.evaluation.sandbox.execution import Sandbox; "
            "p = json.loads(sys.stdin.read()); sb = Sandbox(cache_dir=Path(sys.argv[1])); "
            "[sb.execute(l, x, x['declaration'] + x['canonical_solution']) for l, x in p]")
    payload = json.dumps([(lang, items[0]) for lang, items in problems.items() if lang in ("rust", "go", "java", "cpp")])
    subprocess.run([sys.executable, "-c", code, str(cache)], input=payload, text=True, check=True, cwd=REPO)


# Child processes are spawned: forking a process that runs Ray (threads) is unsafe. A spawned
# child re-imports this script, whose top level puts the repository on sys.path.
_SPAWN = multiprocessing.get_context("spawn")


def _row(sample: dict, result) -> dict:
    return {"task_id": sample["task_id"], "language": sample["language"], "status": result.status,
            "duration_s": result.duration_s}


def _sequential_in_child(samples: list[dict], by_id: dict[str, dict], cache: Path,
                        scale: float) -> tuple[float, list[dict]]:
    """The baseline in a fresh process per round, like the actors: each side pays its own
    process's warm-ups (Go build cache copy, toolchain probes) every round."""
    with ProcessPoolExecutor(1, mp_context=_SPAWN) as pool:
        return pool.submit(_sequential, samples, by_id, str(cache), scale).result()


def _sequential(samples: list[dict], by_id: dict[str, dict], cache: str, scale: float) -> tuple[float, list[dict]]:
    from octoray.evaluation.sandbox.execution import Limits, Sandbox

    start = time.perf_counter()
    sandbox = Sandbox(cache_dir=Path(cache), limits=Limits(timeout_scale=scale))
    results = [_row(s, sandbox.execute(s["language"], by_id[s["task_id"]], s["code"])) for s in samples]
    return time.perf_counter() - start, results


_POOL_SANDBOX = None


def _pool_init(cache: str, scale: float) -> None:
    global _POOL_SANDBOX
    from octoray.evaluation.sandbox.execution import Limits, Sandbox

    _POOL_SANDBOX = Sandbox(cache_dir=Path(cache), limits=Limits(timeout_scale=scale))


def _pool_run(job: tuple[dict, dict]) -> dict:
    sample, problem = job
    return _row(sample, _POOL_SANDBOX.execute(sample["language"], problem, sample["code"]))


def _process_pool(samples: list[dict], by_id: dict[str, dict], cache: Path, scale: float,
                  workers: int) -> tuple[float, list[dict]]:
    """The hardware's own ceiling, no Ray: a plain process pool, one Sandbox per process, one
    sample per task (what a hand-written multiprocessing harness would do)."""
    start = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=_SPAWN, initializer=_pool_init,
                             initargs=(str(cache), scale)) as pool:
        results = list(pool.map(_pool_run, [(s, by_id[s["task_id"]]) for s in samples], chunksize=1))
    return time.perf_counter() - start, results


def _start_ray(actors: int) -> float:
    import os

    import ray

    # Ray start-up can crawl on a shared 2-core machine; wait for the raylet longer than the default.
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "300")
    t0 = time.perf_counter()
    ray.init(num_cpus=actors, include_dashboard=False, log_to_driver=False)
    return time.perf_counter() - t0


def _ray(samples: list[dict], by_id: dict[str, dict], cache: Path, scale: float, actors: int,
         accelerated: bool) -> tuple[float, list[dict]]:
    from octoray.evaluation import runner
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        results, _ = runner.execute(samples, by_id, Path(out), num_actors=actors, cache_dir=cache,
                                    timeout_scale=scale, accelerated=accelerated)
        wall = time.perf_counter() - start
    return wall, results


SIDES = {"reference": "Ray actors, reference builds (accelerated=False)",
         "sequential": "sequential loop, one Sandbox",
         "ray": "octoray Ray actors",
         "pool": "plain process pool, no Ray"}


def _per_language(results: dict[str, list[dict]], languages: list[str]) -> None:
    """Per language and side: passes, samples whose verdict differs from the baseline's, and
    the median seconds per sample after each language's first (the warm-up: Go's build cache,
    the warm javac's JVM, Rust's rlibs)."""
    sides = list(results)
    print("\n| language | " + " | ".join(f"passed {s}" for s in sides) + " | verdicts unlike "
          f"{sides[0]} | " + " | ".join(f"s/sample {s}" for s in sides) + f" | {sides[0]} / ray |")
    print("|---" * (2 * len(sides) + 3) + "|")
    for lang in languages:
        rows = {side: [r for r in v if r["language"] == lang] for side, v in results.items()}
        base = {r["task_id"]: r["status"] for r in rows[sides[0]]}
        differ = sorted({r["task_id"] for side in sides[1:] for r in rows[side] if base.get(r["task_id"]) != r["status"]})
        order = {r["task_id"]: i for i, r in enumerate(rows[sides[0]])}
        cost = {side: statistics.median([r["duration_s"] for r in sorted(v, key=lambda r: order.get(r["task_id"], 0))[1:]] or [0])
                for side, v in rows.items()}
        print(f"| {lang} | " + " | ".join(str(sum(r["status"] == "pass" for r in rows[s])) for s in sides)
              + f" | {', '.join(differ) or 'none'} | " + " | ".join(f"{cost[s]:.3f}" for s in sides)
              + f" | {cost[sides[0]] / max(cost['ray'], 1e-9):.2f}x |")


def _rounds(samples: list[dict], rounds: int) -> list[list[dict]]:
    """Contiguous slices of the interleaved list: every round holds every language."""
    size = -(-len(samples) // rounds)
    return [samples[i: i + size] for i in range(0, len(samples), size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=164, help="problems per language (164 = all)")
    parser.add_argument("--languages", default=",".join(hep.LANGUAGES))
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "humanevalpack"))
    parser.add_argument("--actors", type=int, default=2, help="execution actors (= CPUs given to Ray)")
    parser.add_argument("--baseline", choices=("reference", "sequential"), default="reference",
                        help="reference: the same actors with today's per-sample builds; "
                             "sequential: one process, accelerated builds")
    parser.add_argument("--rounds", type=int, default=4,
                        help="split the programs into this many rounds; the sides alternate which "
                             "goes first, so load drifting on a shared machine hits all of them")
    parser.add_argument("--timeout-scale", type=float, default=3.0,
                        help="scale the per-language timeouts (shared machines; same for every side)")
    parser.add_argument("--process-pool", action="store_true",
                        help="also time a plain process pool of --actors workers (no Ray): the "
                             "ceiling the machine allows, to tell Ray's overhead from the hardware's")
    args = parser.parse_args()

    languages = [x for x in args.languages.split(",") if x]
    problems = {lang: hep.load_problems(lang, args.data_dir)[: args.problems] for lang in languages}
    by_id = {p["task_id"]: p for items in problems.values() for p in items}
    samples = _samples(problems)
    sides = [args.baseline, "ray"] + (["pool"] if args.process_pool else [])
    wall = {side: 0.0 for side in sides}
    results: dict[str, list[dict]] = {side: [] for side in sides}
    ratios = []
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        cache = Path(tmp) / "sandbox"
        _warm_shared_cache(cache, problems)
        # Ray first: its idle daemons then load the machine equally during every measurement.
        init_s = _start_ray(args.actors)
        for r, chunk in enumerate(_rounds(samples, args.rounds)):
            run = {"reference": lambda: _ray(chunk, by_id, cache, args.timeout_scale, args.actors, False),
                   "sequential": lambda: _sequential_in_child(chunk, by_id, cache, args.timeout_scale),
                   "ray": lambda: _ray(chunk, by_id, cache, args.timeout_scale, args.actors, True),
                   "pool": lambda: _process_pool(chunk, by_id, cache, args.timeout_scale, args.actors)}
            round_wall = {}
            for side in (sides if r % 2 == 0 else sides[::-1]):
                round_wall[side], rows = run[side]()
                wall[side] += round_wall[side]
                results[side] += rows
            ratios.append(round_wall[args.baseline] / round_wall["ray"])
            print(f"round {r + 1}/{args.rounds}: {len(chunk)} programs, " + ", ".join(
                f"{side} {round_wall[side]:.1f} s" for side in sides) + f", speedup {ratios[-1]:.2f}x", flush=True)
    import ray

    ray.shutdown()

    n = len(samples)
    base = wall[args.baseline]
    print(f"\n{n} canonical programs ({args.problems} problems x {', '.join(languages)}), {args.actors} actors, "
          f"{args.rounds} rounds, timeout_scale {args.timeout_scale}; per-round speedups "
          f"{', '.join(f'{x:.2f}x' for x in ratios)} (median {statistics.median(ratios):.2f}x)\n")
    print("| executor | programs | passed | wall s | programs/s | speedup |")
    print("|---|---|---|---|---|---|")
    for side in sides:
        label = SIDES[side] + (f" ({args.actors})" if side != "sequential" else "") + (" (baseline)" if side == args.baseline else "")
        print(f"| {label} | {n} | {sum(r['status'] == 'pass' for r in results[side])} | {wall[side]:.1f} | "
              f"{n / wall[side]:.2f} | {base / wall[side]:.2f}x |")
    print(f"| octoray Ray actors incl. ray.init ({init_s:.1f} s) | {n} | - | {wall['ray'] + init_s:.1f} | "
          f"{n / (wall['ray'] + init_s):.2f} | {base / (wall['ray'] + init_s):.2f}x |")
    _per_language(results, languages)


if __name__ == "__main__":
    main()
