"""Execute samples on Ray actors, stream results to Parquet, resume, and compute pass@k.

One :class:`Executor` actor per CPU (by default) holds one sandbox; the driver keeps a bounded
number of samples in flight per actor, so a long Rust compile on one actor never stalls the
others and memory stays flat however many samples there are. Results are appended as Parquet
part files under ``results.parts/`` every ``flush_every`` results; a rerun reads them (and any
consolidated ``results.parquet``) and executes only what is missing. At the end all parts are
consolidated into ``results.parquet`` (atomic) and removed.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from octoray.evaluation.passk import cell_metrics
from octoray.storage.layout import RESULTS_FILE
from octoray.storage.stage_dirs import write_parquet_atomic

PARTS = "results.parts"
KEY = ("task_id", "language", "task", "sample_idx")
RESULT_COLUMNS = (*KEY, "status", "stderr_tail", "duration_s")

Key = tuple[str, str, str, int]


def key_of(row: dict[str, Any]) -> Key:
    """The identity of one sample: task_id, language, task, sample_idx."""
    return (str(row["task_id"]), str(row["language"]), str(row["task"]), int(row["sample_idx"]))


class Executor:
    """Ray actor body: one sandbox, executing one sample per call (see :func:`execute`)."""

    def __init__(self, problems: dict[str, dict[str, Any]], cache_dir: str | None,
                 timeout_scale: float = 1.0, accelerated: bool = True) -> None:
        from octoray.evaluation.sandbox.execution import Limits, Sandbox

        self.problems = problems
        self.sandbox = Sandbox(cache_dir=Path(cache_dir) if cache_dir else None,
                               limits=Limits(timeout_scale=timeout_scale), accelerated=accelerated)

    def toolchain_problems(self, languages: Sequence[str]) -> dict[str, str]:
        """``language -> what is missing`` for this actor's node; empty when all are usable.
        Also warms the dependency caches, so no sample pays for them."""
        import ray

        node = ray.get_runtime_context().get_node_id()[:8]
        found = {lang: self.sandbox.toolchain_problem(lang) for lang in languages}
        return {lang: f"{problem} (node {node})" for lang, problem in found.items() if problem}

    def run(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Execute one sample's code against its problem's tests; one results row."""
        problem = self.problems[sample["task_id"]]
        result = self.sandbox.execute(sample["language"], problem, sample["code"])
        return {**{k: sample[k] for k in KEY}, "status": result.status,
                "stderr_tail": result.stderr_tail, "duration_s": float(result.duration_s)}


def read_results(out_dir: Path) -> list[dict[str, Any]]:
    """Every result already on disk (consolidated file and part files), first copy of a key wins."""
    from octoray.storage.stage_dirs import read_parquet

    paths = [out_dir / RESULTS_FILE] if (out_dir / RESULTS_FILE).is_file() else []
    paths += sorted((out_dir / PARTS).glob("part-*.parquet")) if (out_dir / PARTS).is_dir() else []
    seen: dict[Key, dict[str, Any]] = {}
    for path in paths:
        for row in read_parquet(path).to_pylist():
            seen.setdefault(key_of(row), row)
    return list(seen.values())


def execute(samples: Sequence[dict[str, Any]], problems: dict[str, dict[str, Any]], out_dir: Path, *,
            num_actors: int = 0, in_flight_per_actor: int = 2, flush_every: int = 64,
            cache_dir: Path | None = None, timeout_scale: float = 1.0,
            accelerated: bool = True) -> tuple[list[dict[str, Any]], int]:
    """Execute every sample not executed yet; return (all results for ``samples``, executed now).

    ``problems`` maps task_id -> problem row. ``num_actors`` 0 means one per CPU in the cluster.
    ``cache_dir`` None is the sandbox's default (shared by all actors of a node: prebuilt Rust
    dependencies are built once there and reused by later runs). ``accelerated=False`` runs
    today's per-sample build commands (see :class:`~octoray.evaluation.sandbox.execution.Sandbox`).
    """
    import ray
    from tqdm import tqdm

    from octoray.storage.locations import location

    out_dir = location(out_dir)  # a path or an object-store URI
    wanted = {key_of(s) for s in samples}
    done = {key_of(r): r for r in read_results(out_dir) if key_of(r) in wanted}
    pending = [s for s in samples if key_of(s) not in done]
    if pending:
        from octoray.cluster.resources import require_feasible

        require_feasible("eval", [{"CPU": 1}], what="execution actors of 1 CPU")
        # One per *free* CPU: CPUs held by others (a Serve replica in the pipeline) would leave
        # extra actors pending forever, with samples queued on them.
        num_actors = num_actors or max(1, int(ray.available_resources().get("CPU", 1)))
        num_actors = min(num_actors, len(pending))
        # Only the problems this run touches travel, once, through the object store.
        needed = {s["task_id"] for s in pending}
        problems_ref = ray.put({tid: p for tid, p in problems.items() if tid in needed})
        cache = str(cache_dir) if cache_dir else None
        actor_cls = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(Executor)

        def new_actor() -> Any:
            return actor_cls.remote(problems_ref, cache, timeout_scale, accelerated)

        actors = [new_actor() for _ in range(num_actors)]
        try:
            _require_toolchains(actors, sorted({s["language"] for s in pending}))
            new_rows = _dispatch(actors, new_actor, pending, out_dir, in_flight_per_actor, flush_every, tqdm)
        finally:
            for actor in actors:
                ray.kill(actor)
        for row in new_rows:
            done[key_of(row)] = row
    results = [done[key_of(s)] for s in samples]
    consolidate(out_dir, results)
    return results, len(pending)


def probe_toolchains(languages: Sequence[str]) -> None:
    """Stop with one line naming a language and what it is missing, before any work starts.

    Runs where execution will run (a Ray task asking for the executors' one CPU), and checks
    only what is cheap to check; the executors' full probe follows in :func:`execute`.
    """
    import ray

    from octoray.evaluation.sandbox.toolchains import toolchain_problem

    def check(langs: Sequence[str]) -> dict[str, str]:
        found = {lang: toolchain_problem(lang) for lang in langs}
        return {lang: problem for lang, problem in found.items() if problem}

    problems = ray.get(ray.remote(num_cpus=1)(check).remote(list(languages)))
    _raise_toolchain_problems(problems)


def _require_toolchains(actors: Sequence[Any], languages: Sequence[str]) -> None:
    """Every executor probes (and warms) the toolchains of ``languages``; one line if any lacks one."""
    import ray

    problems: dict[str, str] = {}
    for found in ray.get([actor.toolchain_problems.remote(languages) for actor in actors]):
        for lang, problem in found.items():
            problems.setdefault(lang, problem)
    _raise_toolchain_problems(problems)


def _raise_toolchain_problems(problems: dict[str, str]) -> None:
    from octoray.errors import UserError

    if problems:
        lang = sorted(problems)[0]
        others = f" (also: {', '.join(sorted(problems)[1:])})" if len(problems) > 1 else ""
        raise UserError(f"cannot execute {lang} samples: {problems[lang]}{others}")


def _dispatch(actors: list[Any], new_actor: Callable[[], Any], pending: Sequence[dict[str, Any]],
              out_dir: Path, depth: int, flush_every: int, tqdm: Any) -> list[dict[str, Any]]:
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    queue = list(reversed(pending))  # pop() from the end keeps the samples' order
    load = {i: 0 for i in range(len(actors))}
    in_flight: dict[Any, tuple[int, Any, dict[str, Any]]] = {}
    buffer: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    with tqdm(total=len(pending), desc="execute", unit="sample") as bar:
        while queue or in_flight:
            # Top every actor up to `depth` calls: the next sample is queued on the actor while
            # it still runs the current one, so no actor idles between samples.
            for i in sorted(load, key=load.get):
                while queue and load[i] < depth:
                    sample = queue.pop()
                    slim = {k: sample[k] for k in (*KEY, "code")}  # prompts need not travel
                    in_flight[actors[i].run.remote(slim)] = (i, actors[i], sample)
                    load[i] += 1
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=None)
            for ref in ready:
                i, actor, sample = in_flight.pop(ref)
                load[i] -= 1
                try:
                    row = ray.get(ref)
                except (RayActorError, RayTaskError) as exc:
                    # The executor itself broke (not the sample's program, whose failures are
                    # statuses): record the sample as an error and replace a dead actor once.
                    if isinstance(exc, RayActorError) and actors[i] is actor:
                        actors[i] = new_actor()
                    row = {**{k: sample[k] for k in KEY}, "status": "error",
                           "stderr_tail": f"executor failed: {str(exc).splitlines()[0][:500]}", "duration_s": 0.0}
                buffer.append(row)
                bar.update(1)
            if len(buffer) >= flush_every:
                _write_part(out_dir, buffer)
                rows += buffer
                buffer = []
    if buffer:
        _write_part(out_dir, buffer)
        rows += buffer
    return rows


def _write_part(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    # time_ns names sort in write order and never collide within one driver.
    write_parquet_atomic(results_table(rows), out_dir / PARTS / f"part-{time.time_ns()}.parquet")


def results_table(rows: Iterable[dict[str, Any]]) -> Any:
    """Results rows as a pyarrow Table with the fixed results schema."""
    import pyarrow as pa

    schema = pa.schema([("task_id", pa.string()), ("language", pa.string()), ("task", pa.string()),
                        ("sample_idx", pa.int64()), ("status", pa.string()),
                        ("stderr_tail", pa.string()), ("duration_s", pa.float64())])
    rows = list(rows)
    return pa.Table.from_pydict({c: [r[c] for r in rows] for c in RESULT_COLUMNS}, schema=schema)


def consolidate(out_dir: Path, results: Sequence[dict[str, Any]]) -> None:
    """Write all results as one sorted ``results.parquet`` (atomically), then drop the parts."""
    ordered = sorted(results, key=sort_key)
    write_parquet_atomic(results_table(ordered), out_dir / RESULTS_FILE)
    parts = out_dir / PARTS
    from octoray.storage.locations import rmtree

    rmtree(parts)  # the parts are inside results.parquet now


def sort_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """Order rows by task, language, problem number, sample."""
    number = re.search(r"(\d+)$", str(row["task_id"]))
    return (row["task"], row["language"], int(number.group(1)) if number else 0, row["task_id"], row["sample_idx"])


def compute_metrics(results: Sequence[dict[str, Any]], tasks: Sequence[str],
                    languages: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """metrics.json: task -> language -> {pass@1, pass@10, n_problems, n_samples}."""
    counts: dict[tuple[str, str], dict[str, list[int]]] = {}
    for row in results:
        per_problem = counts.setdefault((row["task"], row["language"]), {})
        n_c = per_problem.setdefault(row["task_id"], [0, 0])
        n_c[0] += 1
        n_c[1] += row["status"] == "pass"
    metrics: dict[str, dict[str, dict[str, Any]]] = {}
    for task in tasks:
        for language in languages:
            per_problem = counts.get((task, language))
            if per_problem:
                metrics.setdefault(task, {})[language] = cell_metrics([tuple(v) for v in per_problem.values()])
    return metrics
