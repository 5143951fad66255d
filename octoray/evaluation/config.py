"""The config of ``octoray eval`` and the benchmark's names it is checked against (a leaf: imports
nothing from octoray.evaluation, which imports these from here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Optional

from octoray.config import option
from octoray.errors import UserError

#: HumanEvalPack languages, in the order the paper reports them.
LANGUAGES = ("python", "js", "java", "go", "cpp", "rust")


#: The three HumanEvalPack tasks.
TASKS = ("fix", "explain", "synthesize")

#: The kinds of --generator, and the oracles' solution fields.
GENERATOR_KINDS = ("hf", "endpoint", "oracle", "file")


ORACLES = {"canonical": "canonical_solution", "buggy": "buggy_solution"}


def parse_generator(spec: str) -> tuple[str, str]:
    """``"hf:bigcode/octocoder"`` -> ``("hf", "bigcode/octocoder")``, or a one-line UserError."""
    kind, sep, arg = spec.partition(":")
    if not sep or kind not in GENERATOR_KINDS or not arg:
        raise UserError(f"bad --generator '{spec}': use hf:PATH_OR_ID, endpoint:URL, "
                        "oracle:canonical, oracle:buggy or file:SAMPLES.jsonl")
    if kind == "oracle" and arg not in ORACLES:
        raise UserError(f"bad --generator '{spec}': the oracles are oracle:canonical and oracle:buggy")
    return kind, arg


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
    model_dir: Optional[str] = option(None, "the model directory behind the generator, recorded in the manifest with its "
                                            "fingerprint (the pipeline sets it for its endpoint; hf:PATH names it itself)")

    def problems(self) -> list[str]:
        """Every problem with this config, for one ConfigError."""
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
