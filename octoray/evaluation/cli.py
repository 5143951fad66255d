"""``octoray eval``: HumanEvalPack generation, sandboxed execution on Ray actors, pass@k.

    octoray eval --generator hf:runs/demo/model --tasks fix,synthesize --languages python,go \\
        --data-dir ../shared/humanevalpack --allow-code-execution --out eval [--limit N] [key=value ...]

Reads the ``eval:`` section of an optional CONFIG.yaml. Writes ``OUT/samples.parquet``,
``OUT/results.parquet``, ``OUT/metrics.json``, ``OUT/config.yaml`` and ``OUT/manifest.json``
(last). A rerun reuses the samples and executes only samples without a result.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from octoray.config import help_lines, load_config, option, split_overrides, to_dict
from octoray.errors import UserError
from octoray.evaluation.humanevalpack import LANGUAGES, TASKS, TEMPLATES
from octoray.outputs import (atomic_write_json, is_complete, read_json, write_manifest,
                             write_parquet_atomic, write_resolved_config)

STAGE = "eval"
SAMPLES = "samples.parquet"
SAMPLES_KEY = "samples.json"
METRICS = "metrics.json"

#: Config fields that decide what the samples are; a rerun with other values must not reuse them.
_SAMPLE_FIELDS = ("generator", "tasks", "languages", "data_dir", "limit", "template", "n_samples",
                  "temperature", "top_p", "max_length", "max_new_tokens", "seed", "endpoint_model")


@dataclass(frozen=True)
class EvalConfig:
    """Everything ``octoray eval`` needs; see docs/evaluation.md."""

    generator: str = option("", "hf:PATH_OR_ID | endpoint:URL (base like http://host:8000/v1) | "
                                "oracle:canonical | oracle:buggy | file:SAMPLES.jsonl")
    tasks: tuple[str, ...] = option(TASKS, "HumanEvalPack tasks: fix, explain, synthesize")
    languages: tuple[str, ...] = option(LANGUAGES, "languages: python, js, java, go, cpp, rust")
    data_dir: Optional[Path] = option(None, "directory of <language>.jsonl files; unset = hub bigcode/humanevalpack")
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
    ray_address: str = option("", "Ray cluster address; unset = RAY_ADDRESS or a local Ray")

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
    fingerprint = {k: v for k, v in to_dict(cfg).items() if k in _SAMPLE_FIELDS}
    if is_complete(out, STAGE) and _samples_match(out, fingerprint):
        print(f"{out} is complete; nothing to do")
        print(format_table(read_json(out / METRICS)))
        return out

    if cfg.generator.startswith("hf:") and not (out / SAMPLES).is_file():
        from octoray.modeling import preflight_model

        preflight_model(cfg.generator.removeprefix("hf:"))  # one line, before any Ray work
    all_problems = {lang: load_problems(lang, cfg.data_dir) for lang in cfg.languages}
    problems = {lang: items[: cfg.limit] if cfg.limit else items for lang, items in all_problems.items()}
    _init_ray(cfg)
    runner.probe_toolchains(cfg.languages)  # a missing toolchain is one line, not a table of zeros
    samples = _load_or_generate_samples(cfg, out, fingerprint, problems, all_problems)

    by_id = {p["task_id"]: p for items in problems.values() for p in items}
    results, executed = runner.execute(
        samples, by_id, out, num_actors=cfg.num_actors, in_flight_per_actor=cfg.in_flight_per_actor,
        flush_every=cfg.flush_every, cache_dir=cfg.sandbox_cache,
        timeout_scale=cfg.timeout_scale)
    metrics = runner.compute_metrics(results, cfg.tasks, cfg.languages)
    atomic_write_json(out / METRICS, metrics)
    write_resolved_config(out, cfg)
    statuses: dict[str, int] = {}
    for row in results:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    write_manifest(out, STAGE, cfg, rows=len(results), files=[SAMPLES, runner.RESULTS, METRICS],
                   started=started, inputs={"data_dir": str(cfg.data_dir) if cfg.data_dir else "hub"},
                   extra={"executed_this_run": executed, "statuses": statuses})
    print(format_table(metrics))
    print(f"{len(results)} samples ({executed} executed this run) -> {out}")
    return out


def _init_ray(cfg: EvalConfig) -> None:
    from octoray.raylocal import ensure_ray

    ensure_ray(address=cfg.ray_address or None)


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``octoray eval`` flags; any field is also settable as ``key=value``."""
    parser.description = "Evaluate a model (or oracle) on HumanEvalPack: generate, execute, pass@k."
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "config keys (key=value, or the eval: section of CONFIG.yaml):\n" + "\n".join(help_lines(EvalConfig))
    parser.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value]",
                        help="optional YAML config (eval: section) and key=value overrides")
    parser.add_argument("--generator", help="hf:PATH_OR_ID | endpoint:URL | oracle:canonical | oracle:buggy | file:SAMPLES.jsonl")
    parser.add_argument("--endpoint", metavar="URL", help="alias for --generator endpoint:URL")
    parser.add_argument("--tasks", help="comma-separated: fix,explain,synthesize")
    parser.add_argument("--languages", help="comma-separated: python,js,java,go,cpp,rust")
    parser.add_argument("--data-dir", help="directory of <language>.jsonl (default: the hub)")
    parser.add_argument("--allow-code-execution", action="store_true", default=None,
                        help="allow executing generated programs (required)")
    parser.add_argument("--out", help="output directory (default: eval)")
    parser.add_argument("--limit", type=int, help="first N problems per language")
    parser.add_argument("--template", help=f"prompt template: {', '.join(TEMPLATES)}")
    parser.add_argument("--n-samples", type=int, help="samples per problem and task")


def main(args: argparse.Namespace) -> int:
    """Entry point of ``octoray eval``."""
    positional, overrides = split_overrides(args.args)
    if len(positional) > 1:
        raise UserError(f"expected at most one CONFIG.yaml, got {' '.join(positional)}")
    generator = args.generator
    if args.endpoint:
        if generator and generator != f"endpoint:{args.endpoint}":
            raise UserError("give either --generator or --endpoint, not both")
        generator = f"endpoint:{args.endpoint}"
    values = {"generator": generator, "tasks": args.tasks, "languages": args.languages,
              "data_dir": args.data_dir, "allow_code_execution": args.allow_code_execution,
              "out": args.out, "limit": args.limit, "template": args.template, "n_samples": args.n_samples}
    cfg = load_config(EvalConfig, positional[0] if positional else None, overrides, section=STAGE, values=values)
    run(cfg)
    return 0
