"""``octoray eval``: HumanEvalPack generation, sandboxed execution on Ray actors, pass@k.

    octoray eval --generator hf:runs/demo/train/model --tasks fix,synthesize --languages python,go \\
        --humanevalpack-dir ../shared/humanevalpack --allow-code-execution --out eval [--limit N] [key=value ...]

Every field of :class:`EvalConfig` is a flag and a key (:mod:`octoray.stage_cli`); reads the
``eval:`` section of an optional CONFIG.yaml. Writes ``OUT/samples.parquet``,
``OUT/results.parquet``, ``OUT/metrics.json``, ``OUT/config.yaml`` and ``OUT/manifest.json``
(last). A rerun reuses the samples and executes only samples without a result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path
from typing import Any, Literal, Optional

from octoray.config import option, to_dict
from octoray.errors import UserError
from octoray.stage_cli import FlagAlias
from octoray.evaluation.humanevalpack import LANGUAGES, TASKS
from octoray.outputs import (atomic_write_json, is_complete, read_json, write_manifest,
                             write_parquet_atomic, write_resolved_config)

STAGE = "eval"
SAMPLES = "samples.parquet"
SAMPLES_KEY = "samples.json"
METRICS = "metrics.json"

#: Config fields that decide what the samples are; a rerun with other values must not reuse them.
_SAMPLE_FIELDS = ("generator", "tasks", "languages", "humanevalpack_dir", "limit", "template", "n_samples",
                  "temperature", "top_p", "max_length", "max_new_tokens", "seed", "endpoint_model")


@dataclass(frozen=True)
class EvalConfig:
    """Everything ``octoray eval`` needs; see docs/evaluation.md."""

    #: Old key names, still read from YAML files and key=value (``data_dir`` was this stage's own name).
    KEY_ALIASES: ClassVar[dict[str, str]] = {"data_dir": "humanevalpack_dir"}

    generator: str = option("", "hf:PATH_OR_ID | endpoint:URL (base like http://host:8000/v1) | "
                                "oracle:canonical | oracle:buggy | file:SAMPLES.jsonl")
    tasks: tuple[str, ...] = option(TASKS, "HumanEvalPack tasks: fix, explain, synthesize")
    languages: tuple[str, ...] = option(LANGUAGES, "languages: python, js, java, go, cpp, rust")
    humanevalpack_dir: Optional[str] = option(None, "directory of HumanEvalPack <language>.jsonl files "
                                                    "(default: the hub dataset bigcode/humanevalpack)")
    out: str = option("eval", "output directory: a path or a URI (s3://bucket/prefix)")
    allow_code_execution: bool = option(False, "required: executes model-generated programs on this machine/cluster")
    limit: Optional[int] = option(None, "only the first N problems of each language (smoke runs)")
    template: Literal["octocoder", "instruct", "continue"] = option(
        "octocoder", "prompt template: octocoder (Question/Answer), instruct, continue (synthesize only)")
    n_samples: int = option(20, "samples per problem and task for model generators (paper: 20); oracles give 1")
    temperature: float = option(0.2, "sampling temperature (0 = greedy)")
    top_p: float = option(0.95, "nucleus sampling top_p")
    max_length: int = option(2048, "hf: most tokens of prompt + completion (prompts are cut from the left)")
    max_new_tokens: int = option(512, "most tokens generated per completion")
    seed: int = option(0, "hf: torch seed of each generation actor")
    batch_size: int = option(8, "hf: sequences per generate() call")
    gen_actors: int = option(1, "hf: generation actors (model copies) in the Ray Data actor pool")
    gen_num_cpus: float = option(1.0, "hf: CPUs reserved per generation actor")
    gen_num_gpus: float = option(0.0, "hf: GPUs per generation actor (1 on a GPU cluster)")
    endpoint_model: str = option("", "endpoint: model name sent to the server; unset = first of GET /models")
    concurrency: int = option(8, "endpoint: most requests in flight")
    retries: int = option(5, "endpoint: retries per request on connection errors, 429 and 5xx")
    request_timeout_s: float = option(600.0, "endpoint: seconds per HTTP request")
    num_actors: int = option(0, "execution actors, each one sandbox and 1 CPU; 0 = one per free CPU in the cluster")
    in_flight_per_actor: int = option(2, "samples queued per execution actor (bounds in-flight work)")
    flush_every: int = option(64, "results per appended Parquet part file (the resume granularity)")
    sandbox_cache: Optional[Path] = option(None, "sandbox cache dir (work dirs, prebuilt Rust deps); unset = the sandbox default in $TMPDIR")
    timeout_scale: float = option(1.0, "multiplies the per-language execution timeouts (slow or shared machines)")
    reference_builds: bool = option(False, "build every sample with the reference harness's own commands (cold javac, "
                                           "no precompiled C++ header, go test): the same verdicts, ~2x slower; "
                                           "for checking a verdict (docs/execution.md)")
    ray_address: Optional[str] = option(None, "Ray cluster to connect to, e.g. 10.0.0.1:6379 (default: RAY_ADDRESS, else a new local Ray)")

    def problems(self) -> list[str]:
        """Every problem with this config, for one ConfigError."""
        from octoray.evaluation.generators import parse_generator

        found = []
        if not self.generator:
            found.append("generator: required (--generator hf:PATH | endpoint:URL | oracle:canonical | "
                         "oracle:buggy | file:SAMPLES.jsonl)")
        else:
            try:
                parse_generator(self.generator)
            except UserError as exc:
                found.append(str(exc))
        for name, allowed in (("tasks", TASKS), ("languages", LANGUAGES)):
            values = getattr(self, name)
            bad = [v for v in values if v not in allowed]
            if bad:
                found.append(f"{name}: unknown {', '.join(map(repr, bad))} (choose from {', '.join(allowed)})")
            if not values:
                found.append(f"{name}: at least one needed")
            if len(set(values)) != len(values):
                found.append(f"{name}: listed twice")
        if self.template == "continue" and set(self.tasks) != {"synthesize"}:
            found.append("template: 'continue' only fits --tasks synthesize (fix/explain need an instruction)")
        for name in ("n_samples", "max_length", "max_new_tokens", "batch_size", "gen_actors", "concurrency",
                     "in_flight_per_actor", "flush_every"):
            if getattr(self, name) < 1:
                found.append(f"{name}: must be at least 1")
        for name in ("num_actors", "retries"):
            if getattr(self, name) < 0:
                found.append(f"{name}: must be 0 or more")
        if self.limit is not None and self.limit < 1:
            found.append("limit: must be at least 1")
        if self.timeout_scale <= 0:
            found.append("timeout_scale: must be > 0")
        if self.temperature < 0:
            found.append("temperature: must be >= 0")
        if not 0 < self.top_p <= 1:
            found.append("top_p: must be in (0, 1]")
        return found


def run(cfg: EvalConfig) -> Path:
    """Generate (or reuse) samples, execute them on Ray actors, write metrics; returns ``cfg.out``."""
    from octoray.evaluation import runner
    from octoray.evaluation.humanevalpack import load_problems
    from octoray.evaluation.passk import format_table

    if not cfg.allow_code_execution:
        raise UserError("refusing to execute model-generated code: pass --allow-code-execution "
                        "(programs run in octoray's sandbox, not a VM; use a disposable machine or container)")
    started = time.time()
    from octoray.storage import location

    out = location(cfg.out)
    fingerprint = _fingerprint(cfg)
    if is_complete(out, STAGE) and _samples_match(out, fingerprint):
        print(f"{out} is complete; nothing to do")
        print(format_table(read_json(out / METRICS)))
        return out

    if cfg.generator.startswith("hf:") and not (out / SAMPLES).is_file():
        from octoray.modeling import preflight_model

        preflight_model(cfg.generator.removeprefix("hf:"))  # one line, before any Ray work
    all_problems = {lang: load_problems(lang, cfg.humanevalpack_dir) for lang in cfg.languages}
    problems = {lang: items[: cfg.limit] if cfg.limit else items for lang, items in all_problems.items()}
    _init_ray(cfg)
    runner.probe_toolchains(cfg.languages)  # a missing toolchain is one line, not a table of zeros
    samples = _load_or_generate_samples(cfg, out, fingerprint, problems, all_problems)

    by_id = {p["task_id"]: p for items in problems.values() for p in items}
    results, executed = runner.execute(
        samples, by_id, out, num_actors=cfg.num_actors, in_flight_per_actor=cfg.in_flight_per_actor,
        flush_every=cfg.flush_every, cache_dir=cfg.sandbox_cache,
        timeout_scale=cfg.timeout_scale, accelerated=not cfg.reference_builds)
    metrics = runner.compute_metrics(results, cfg.tasks, cfg.languages)
    atomic_write_json(out / METRICS, metrics)
    write_resolved_config(out, cfg)
    statuses: dict[str, int] = {}
    for row in results:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    write_manifest(out, STAGE, cfg, rows=len(results), files=[SAMPLES, runner.RESULTS, METRICS],
                   started=started, inputs={"humanevalpack_dir": cfg.humanevalpack_dir or "hub"},
                   extra={"executed_this_run": executed, "statuses": statuses})
    print(format_table(metrics))
    print(f"{len(results)} samples ({executed} executed this run) -> {out}")
    return out


def _init_ray(cfg: EvalConfig) -> None:
    from octoray.raylocal import ensure_ray

    ensure_ray(address=cfg.ray_address)


def _fingerprint(cfg: EvalConfig) -> dict[str, Any]:
    """The settings that decide the samples; ``humanevalpack_dir`` keeps its old name ``data_dir`` here
    so samples written before the rename are still reused."""
    return {("data_dir" if k == "humanevalpack_dir" else k): v for k, v in to_dict(cfg).items() if k in _SAMPLE_FIELDS}


def _samples_match(out: Path, fingerprint: dict[str, Any]) -> bool:
    path = out / SAMPLES_KEY
    return path.is_file() and (out / SAMPLES).is_file() and read_json(path) == fingerprint


def _load_or_generate_samples(cfg: EvalConfig, out: Path, fingerprint: dict[str, Any],
                              problems: dict[str, list[dict[str, Any]]],
                              all_problems: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Reuse OUT/samples.parquet when it came from the same generation settings, else generate.

    Sampled completions differ run to run, so results of old samples must never be mixed with
    new ones: samples from other settings are an error, not silently replaced.
    """
    import pyarrow as pa

    from octoray.evaluation import generators
    from octoray.outputs import read_parquet

    if (out / SAMPLES).is_file():
        if _samples_match(out, fingerprint):
            print(f"reusing {out / SAMPLES}")
            return read_parquet(out / SAMPLES).to_pylist()
        raise UserError(f"{out} holds samples from other generation settings ({out / SAMPLES_KEY}); "
                        "use a new --out or delete that directory")
    if (out / "results.parquet").exists() or (out / "results.parts").exists():
        raise UserError(f"{out} holds results but no samples; use a new --out or delete that directory")
    samples = generators.generate(cfg, problems, all_problems)
    out.mkdir(parents=True, exist_ok=True)
    columns = ("task_id", "language", "task", "sample_idx", "prompt", "completion", "description", "code")
    table = pa.Table.from_pydict({c: [s[c] for s in samples] for c in columns})
    write_parquet_atomic(table, out / SAMPLES)
    atomic_write_json(out / SAMPLES_KEY, fingerprint)
    return samples


#: The command line (octoray.stage_cli): ``octoray eval --generator G --allow-code-execution --out eval/``.
CONFIG = EvalConfig
INPUT = None
FLAG_ALIASES = (FlagAlias("--endpoint", "generator", "endpoint:{}", deprecated=False),
                FlagAlias("--data-dir", "humanevalpack_dir"))
