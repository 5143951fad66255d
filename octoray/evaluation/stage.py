"""``octoray eval``: HumanEvalPack generation, sandboxed execution on Ray actors, pass@k.

    octoray eval --generator hf:runs/demo/train/model --tasks fix,synthesize --languages python,go \\
        --humanevalpack-dir ../shared/humanevalpack --allow-code-execution --out eval [--limit N] [key=value ...]

Every field of :class:`EvalConfig` is a flag and a key (:mod:`octoray.stage_cli`); reads the
``eval:`` section of an optional CONFIG.yaml. Writes ``OUT/samples.parquet``,
``OUT/results.parquet``, ``OUT/metrics.json``, ``OUT/config.yaml`` and ``OUT/manifest.json``
(last). A rerun reuses the samples and executes only samples without a result.
"""

from __future__ import annotations

from typing import Any, Optional

from octoray.config import to_dict
from octoray.errors import UserError
from octoray.evaluation.config import EvalConfig
from octoray.resumable import StageRun
from octoray.stage_cli import FlagAlias
from octoray.storage.layout import EVAL_METRICS_FILE, RESULTS_FILE, SAMPLES_FILE
from octoray.storage.locations import Location, location
from octoray.storage.stage_dirs import atomic_write_json, read_json, write_parquet_atomic

STAGE = "eval"
#: The generation settings the samples came from, beside them.
SAMPLES_KEY = "samples.json"

#: Config fields that decide what the samples are; a rerun with other values must not reuse them.
_SAMPLE_FIELDS = ("generator", "tasks", "languages", "humanevalpack_dir", "limit", "template", "n_samples",
                  "temperature", "top_p", "max_length", "max_new_tokens", "seed", "endpoint_model")


def run(cfg: EvalConfig) -> Location:
    """Generate (or reuse) samples, execute them on Ray actors, write metrics; returns ``cfg.out``."""
    from octoray.evaluation import runner
    from octoray.evaluation.humanevalpack import load_problems
    from octoray.evaluation.passk import format_table

    if not cfg.allow_code_execution:
        raise UserError("refusing to execute model-generated code: pass --allow-code-execution "
                        "(programs run in octoray's sandbox, not a VM; use a disposable machine or container)")
    out = location(cfg.out)
    model = model_input(cfg)
    fingerprint = sample_settings(cfg, model)
    inputs: dict[str, Any] = {"humanevalpack_dir": cfg.humanevalpack_dir or "hub", **({"model": model} if model else {})}
    stage = StageRun(STAGE, out, cfg, inputs=inputs)
    if stage.reusable(same=lambda previous: _samples_match(out, fingerprint) or "other generation settings"):
        print(format_table(read_json(out / EVAL_METRICS_FILE)))
        return out
    if stage.stale and stage.changed_inputs(stage.previous or {}):
        stage.say("the model changed: its samples and results are dropped and generated again")
        clear(out)

    if cfg.generator.startswith("hf:") and not (out / SAMPLES_FILE).is_file():
        from octoray.modeling import preflight_model

        preflight_model(cfg.generator.removeprefix("hf:"))  # one line, before any Ray work
    all_problems = {lang: load_problems(lang, cfg.humanevalpack_dir) for lang in cfg.languages}
    problems = {lang: items[: cfg.limit] if cfg.limit else items for lang, items in all_problems.items()}
    ready = None
    if cfg.generator.startswith(("file:", "oracle:")) and not (out / SAMPLES_FILE).is_file():
        from octoray.evaluation import generators

        ready = generators.generate(cfg, problems, all_problems)  # no model: a bad row is one line before Ray starts
    stage.start(write_config=False, address=cfg.ray_address)
    runner.probe_toolchains(cfg.languages)  # a missing toolchain is one line, not a table of zeros
    stage.write_config()
    samples = _load_or_generate_samples(cfg, stage, fingerprint, problems, all_problems, ready)

    by_id = {p["task_id"]: p for items in problems.values() for p in items}
    results, executed = runner.execute(
        samples, by_id, out, num_actors=cfg.num_actors, in_flight_per_actor=cfg.in_flight_per_actor,
        flush_every=cfg.flush_every, cache_dir=cfg.sandbox_cache,
        timeout_scale=cfg.timeout_scale, accelerated=not cfg.reference_builds)
    metrics = runner.compute_metrics(results, cfg.tasks, cfg.languages)
    atomic_write_json(out / EVAL_METRICS_FILE, metrics)
    statuses: dict[str, int] = {}
    for row in results:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    stage.finish(rows=len(results), files=[SAMPLES_FILE, RESULTS_FILE, EVAL_METRICS_FILE],
                 extra={"executed_this_run": executed, "statuses": statuses, "model": model,
                        "generation": {k: v for k, v in fingerprint.items() if k != "model_fingerprint"}})
    print(format_table(metrics))
    stage.say(f"{len(results)} samples ({executed} executed this run) -> {out}")
    return out


def sample_settings(cfg: EvalConfig, model: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The settings that decide the samples (and the model's fingerprint, when known);
    ``humanevalpack_dir`` keeps its old name ``data_dir`` here so samples written before the rename
    are still reused."""
    found = {("data_dir" if k == "humanevalpack_dir" else k): v for k, v in to_dict(cfg).items() if k in _SAMPLE_FIELDS}
    if model and model.get("fingerprint"):
        found["model_fingerprint"] = model["fingerprint"]
    return found


def model_input(cfg: EvalConfig) -> Optional[dict[str, Any]]:
    """The model the samples come from, as the manifest records it: its directory, the train run
    it was exported by, and its fingerprint (the run's; else the directory's own). None for
    generators without a model (oracles, sample files) and endpoints nobody named."""
    from octoray.storage.lineage import model_run_dir
    from octoray.storage.fingerprint import fingerprint
    from octoray.storage.locations import display, is_uri
    from octoray.storage.stage_dirs import read_manifest

    path = cfg.model_dir
    if path is None and cfg.generator.startswith(("hf:", "vllm:")):
        path = cfg.generator.split(":", 1)[1]
    if not path:
        return None
    where = location(path)
    if not is_uri(path) and not where.is_dir():
        return {"path": path, "fingerprint": None}  # a hub id: the id is all there is to record
    where = where.resolve()
    run_dir = model_run_dir(str(where))
    recorded = read_manifest(run_dir).get("fingerprint") if run_dir is not None else None
    if recorded:
        return {"path": display(where), "run_dir": display(run_dir), "fingerprint": recorded}
    # a model outside a train run, or one a version before fingerprints exported: its own bytes
    return {"path": display(where), "fingerprint": fingerprint(where, ["."])}


def clear(out: Location) -> None:
    """Remove an evaluation's outputs (manifest first: an interrupted clear is just incomplete)."""
    from octoray.storage.layout import MANIFEST
    from octoray.storage.locations import rmtree

    (out / MANIFEST).unlink(missing_ok=True)
    for name in (EVAL_METRICS_FILE, SAMPLES_FILE, SAMPLES_KEY, RESULTS_FILE):
        (out / name).unlink(missing_ok=True)
    rmtree(out / "results.parts")


def _samples_match(out: Location, fingerprint: dict[str, Any]) -> bool:
    path = out / SAMPLES_KEY
    return path.is_file() and (out / SAMPLES_FILE).is_file() and read_json(path) == fingerprint


def _load_or_generate_samples(cfg: EvalConfig, stage: StageRun, fingerprint: dict[str, Any],
                              problems: dict[str, list[dict[str, Any]]],
                              all_problems: dict[str, list[dict[str, Any]]],
                              ready: Optional[list[dict[str, Any]]] = None) -> list[dict[str, Any]]:
    """Reuse OUT/samples.parquet when it came from the same generation settings, else generate
    (or take ``ready``, samples a model-free generator already made).

    Sampled completions differ run to run, so results of old samples must never be mixed with
    new ones: samples from other settings are an error, not silently replaced.
    """
    import pyarrow as pa

    from octoray.evaluation import generators
    from octoray.storage.stage_dirs import read_parquet

    out = stage.out
    if (out / SAMPLES_FILE).is_file():
        if _samples_match(out, fingerprint):
            stage.say(f"reusing {out / SAMPLES_FILE}")
            return read_parquet(out / SAMPLES_FILE).to_pylist()
        raise UserError(f"{out} holds samples from other generation settings ({out / SAMPLES_KEY}); "
                        "use a new --out or delete that directory")
    if (out / RESULTS_FILE).exists() or (out / "results.parts").exists():
        raise UserError(f"{out} holds results but no samples; use a new --out or delete that directory")
    samples = ready if ready is not None else generators.generate(cfg, problems, all_problems)
    out.mkdir(parents=True, exist_ok=True)
    columns = ("task_id", "language", "task", "sample_idx", "prompt", "completion", "description", "code")
    table = pa.Table.from_pydict({c: [s[c] for s in samples] for c in columns})
    write_parquet_atomic(table, out / SAMPLES_FILE)
    atomic_write_json(out / SAMPLES_KEY, fingerprint)
    return samples


#: The command line (octoray.stage_cli): ``octoray eval --generator G --allow-code-execution --out eval/``.
CONFIG = EvalConfig
INPUT = None
FLAG_ALIASES = (FlagAlias("--endpoint", "generator", "endpoint:{}", deprecated=False),
                FlagAlias("--data-dir", "humanevalpack_dir"))
