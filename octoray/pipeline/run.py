"""``octoray pipeline CONFIG``: mine -> filter -> [tune] -> train -> serve -> eval -> report.

With 'tune' among the stages, the train stage trains with the best trial's hyperparameters
(``train.hparams`` = the tune directory; see :mod:`octoray.training.best_trial`).

Every stage writes its own directory under ``out`` (a path, a shared mount or an object-store URI
such as ``s3://bucket/runs/demo``) and is skipped when that output is complete,
so a pipeline killed anywhere (say, during training) is rerun with the same command and picks up
where it stopped: mining and filtering are not redone, training resumes from its last checkpoint.
All stages share one Ray: the embedded local one on a laptop, the cluster inside a Ray Job.

The config is a jobs/ YAML file: a ``pipeline:`` section (below) plus one section per stage
(``mine:``, ``filter:``, ``tune:``, ``train:``, ``serve:``, ``eval:``). Overrides on the command
line are ``--key value`` or ``key=value`` for the pipeline section and ``stage.key=value`` for a stage.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from octoray.config import load_config
from octoray.errors import UserError
from octoray.pipeline.config import PipelineConfig
from octoray.stage_cli import FlagAlias
from octoray.storage.layout import LATENCY_FILE, MODEL_DIR, STAGES, stage_dirs
from octoray.storage.locations import Location, location
from octoray.storage.stage_dirs import atomic_write_json, is_complete, read_manifest

#: The command line (octoray.stage_cli): ``octoray pipeline CONFIG.yaml [key=value | stage.key=value ...]``.
CONFIG = PipelineConfig
INPUT = None
NESTED = tuple(s for s in STAGES if s != "report")
FLAG_ALIASES = (FlagAlias("--data-dir", "humanevalpack_dir"),)


def load(path: str | Path | None, overrides: list[str] = (), nested: dict[str, list[str]] | None = None, *,  # type: ignore[assignment]
         values: dict[str, Any] | None = None, check_inputs: bool = True) -> tuple[PipelineConfig, dict[str, Any]]:
    """The pipeline config and every wanted stage's config, wired together and checked before any work.

    ``overrides`` set pipeline keys, ``nested[stage]`` that stage's keys (``train.max_steps=5`` on
    the command line). ``check_inputs`` is unused: each stage's inputs are the previous stage's output.
    """
    if path is None:
        raise UserError("give the pipeline's config file, e.g. octoray pipeline jobs/demo.yaml")
    cfg = load_config(PipelineConfig, path, overrides, section="pipeline", values=values)
    return cfg, stage_configs(path, nested or {}, cfg, _dirs(cfg))


def run(cfg: PipelineConfig, stage_cfgs: dict[str, Any]) -> Location:
    """Run the pipeline (``stage_cfgs`` from :func:`load`); returns the output root."""
    started = time.time()
    root, dirs = _root(cfg), _dirs(cfg)
    wanted = [s for s in STAGES if s in cfg.stages]
    print(f"octoray pipeline: {cfg.name} -> {root}  (stages: {' -> '.join(wanted)})", flush=True)

    from octoray.cluster.connection import ensure_ray

    # Ray's State API lives in the dashboard: tune needs it, and Ray Train's PlacementGroupCleaner
    # polls it while a run trains (see octoray.training.tuning and octoray.training.driver).
    ray = ensure_ray(dashboard=bool({"tune", "train"} & set(wanted)))
    from octoray.cluster.shared_storage import require_shared_storage

    require_shared_storage(ray, root, "out")  # before any work: every node must see the outputs
    verdicts: dict[str, str] = {}
    for stage in ("mine", "filter", "tune", "train"):
        if stage in wanted:
            _banner(stage, dirs[stage])
            before = read_manifest(dirs[stage])
            _run_stage(stage, stage_cfgs)
            verdicts[stage] = _verdict(stage, before, read_manifest(dirs[stage]))
    if "serve" in wanted:
        _banner("serve + eval", dirs["eval"])
        before = read_manifest(dirs["eval"])
        _serve_and_evaluate(cfg, stage_cfgs, dirs, evaluate="eval" in wanted)
        if "eval" in wanted:
            verdicts["eval"] = _verdict("eval", before, read_manifest(dirs["eval"]))
        if "train" in wanted and is_complete(dirs["train"], "train") and stage_cfgs["train"].export:
            from octoray.training import model_card

            # The card gets the results in its model-index: what the Hub shows for the model.
            path = model_card.write(dirs["train"], dirs["eval"] if is_complete(dirs["eval"], "eval") else None,
                                    name=cfg.name)
            print(f"model card: {path}")
    if verdicts:
        print("\noctoray pipeline: " + ", ".join(f"{stage} {verdict}" for stage, verdict in verdicts.items()), flush=True)
    if "report" in wanted:
        from octoray.pipeline import report

        _banner("report", dirs["report"])
        path = report.write_report(root, dirs["report"])
        print(f"report: {path}")
    print(f"\noctoray pipeline: done in {time.time() - started:.0f} s -> {root}")
    return root


def _verdict(stage: str, before: dict[str, Any] | None, after: dict[str, Any] | None) -> str:
    """``reused`` when a stage left its complete manifest as it was, else ``redone`` (or ``done``,
    the first time); printed per stage and at the end."""
    same = bool(before and before.get("complete") and after and before.get("started_at") == after.get("started_at")
                and before.get("fingerprint") == after.get("fingerprint"))
    verdict = "reused" if same else "redone" if before and before.get("complete") else "done"
    fingerprint = (after or {}).get("fingerprint") or ""
    print(f"== {stage}: {verdict} (fingerprint {fingerprint.split(':', 1)[-1][:12] or 'none'})", flush=True)
    return verdict


def _root(cfg: PipelineConfig) -> Location:
    return location(cfg.out or f"runs/{cfg.name}")


def _dirs(cfg: PipelineConfig) -> dict[str, Location]:
    """Each stage's output directory under the root."""
    return stage_dirs(_root(cfg))


def _banner(stage: str, out: Location) -> None:
    print(f"\n== {stage} -> {out}", flush=True)


def stage_configs(config_path: str | Path, by_stage: dict[str, list[str]], cfg: PipelineConfig,
                   dirs: dict[str, Location]) -> dict[str, Any]:
    """Each wanted stage's typed config, wired to the previous stage's directory."""
    from octoray.data.filter_config import FilterConfig
    from octoray.data.mine_config import MineConfig
    configs: dict[str, Any] = {}
    problems: list[str] = []

    def load(stage: str, cls: type, values: dict[str, Any], check: Any = None) -> None:
        try:
            configs[stage] = load_config(cls, config_path, by_stage.get(stage, []), section=stage, values=values,
                                         check=check)
        except UserError as exc:
            problems.append(f"[{stage}] {exc}")

    wanted = set(cfg.stages)
    if "mine" in wanted:
        load("mine", MineConfig, {"sources": list(cfg.sources), "out": str(dirs["mine"])})
    if "filter" in wanted:
        load("filter", FilterConfig, {"commits": str(dirs["mine"]), "out": str(dirs["filter"]),
                                                "humanevalpack_dir": cfg.humanevalpack_dir})
    if wanted & {"train", "tune", "serve"}:
        from octoray.training.train_config import TrainConfig

        # After a tune, training starts from the best trial's hyperparameters (train/config.yaml
        # and the log say which); train.hparams=null on the command line keeps the train: section's.
        hparams = str(dirs["tune"]) if "tune" in wanted and "train" in wanted else None
        load("train", TrainConfig, {"data": str(dirs["filter"]), "out": str(dirs["train"]),
                                             "hparams": hparams})
    if "tune" in wanted:
        from octoray.training import tuning
        from octoray.training.tune_config import TuneConfig

        # The search space against the trial budget (the train: section), before any work.
        check = (lambda t: tuning.check_search_space(t, configs["train"])) if "train" in configs else None
        load("tune", TuneConfig, {"data": str(dirs["filter"]), "out": str(dirs["tune"])}, check)
    if "serve" in wanted:
        from octoray.serving.config import ServeConfig

        load("serve", ServeConfig, {"model": str((dirs["train"] / MODEL_DIR).resolve()),
                                            "model_name": cfg.name})
    if "eval" in wanted:
        from octoray.evaluation.config import EvalConfig

        load("eval", EvalConfig, {"generator": "endpoint:http://placeholder/v1", "out": str(dirs["eval"]),
                                  "humanevalpack_dir": cfg.humanevalpack_dir,
                                  "allow_code_execution": cfg.allow_code_execution,
                                  "model_dir": str((dirs["train"] / MODEL_DIR).resolve())})
    if problems:
        raise UserError("; ".join(problems))
    return configs


def _run_stage(stage: str, stage_cfgs: dict[str, Any]) -> None:
    """Run one stage; each stage itself skips work its output already holds."""
    if stage == "mine":
        from octoray.data import mining
        mining.run(stage_cfgs["mine"])
    elif stage == "filter":
        from octoray.data import filtering
        filtering.run(stage_cfgs["filter"])
    elif stage == "tune":
        from octoray.training import tuning
        tuning.run(stage_cfgs["tune"], stage_cfgs["train"])  # trials start from the train: section
    elif stage == "train":
        from octoray.training import driver
        driver.run(stage_cfgs["train"])


def _serve_and_evaluate(cfg: PipelineConfig, stage_cfgs: dict[str, Any], dirs: dict[str, Location],
                        evaluate: bool) -> None:
    """Serve the trained model, evaluate through the endpoint, probe latency, stop the server."""
    latency_file = dirs["serve"] / LATENCY_FILE
    stale = _stale_eval(stage_cfgs["eval"], dirs) if evaluate else None
    if (not evaluate or is_complete(dirs["eval"], "eval")) and latency_file.is_file() and not stale:
        print("serve + eval: already complete; nothing to do")
        return
    if stale:
        from octoray.evaluation.stage import clear

        # The endpoint's URL differs run to run, so the eval stage cannot tell its own samples
        # from another model's: the pipeline, which knows the model, starts the eval over.
        print(f"serve + eval: {dirs['eval']} is complete but stale ({stale}); evaluating again")
        clear(dirs["eval"])
        latency_file.unlink(missing_ok=True)
    from octoray.serving import app as serving

    url = serving.start(stage_cfgs["serve"])
    print(f"serving {cfg.name} at {url}", flush=True)
    try:
        if evaluate:
            from octoray.evaluation import stage as evaluation
            evaluation.run(replace(stage_cfgs["eval"], generator=f"endpoint:{url}"))
        latency = measure_latency(url, cfg.name, cfg.latency_requests, cfg.latency_concurrency)
        atomic_write_json(latency_file, latency)
        print(f"serving latency: p50 {latency['p50_s']:.3f} s, p99 {latency['p99_s']:.3f} s over "
              f"{latency['requests']} requests at concurrency {latency['concurrency']}")
    finally:
        serving.shutdown()


def _stale_eval(eval_cfg: Any, dirs: dict[str, Location]) -> str | None:
    """Why a complete eval of the pipeline must be redone (another model, other generation
    settings), or None when it stands (or there is none yet)."""
    from octoray.evaluation.stage import model_input, sample_settings
    from octoray.storage.fingerprint import short

    previous = read_manifest(dirs["eval"])
    if not (previous and previous.get("complete")):
        return None
    model = model_input(eval_cfg) or {}
    before = (previous.get("inputs") or {}).get("model") or {}
    if before.get("fingerprint") != model.get("fingerprint"):
        return f"the model changed: fingerprint {short(before.get('fingerprint'))} -> {short(model.get('fingerprint'))}"
    wanted = {k: v for k, v in sample_settings(eval_cfg, model).items() if k != "generator"}
    recorded = {k: v for k, v in (previous.get("generation") or {}).items() if k != "generator"}
    wanted.pop("model_fingerprint", None)
    if wanted != recorded:
        changed = sorted(k for k in set(wanted) | set(recorded) if wanted.get(k) != recorded.get(k))
        return f"generation settings changed: {', '.join(changed)}"
    return None


def measure_latency(url: str, model: str, requests: int, concurrency: int, max_tokens: int = 32) -> dict[str, Any]:
    """Latency of ``requests`` completion calls at ``concurrency``, measured from the client."""
    import requests as http

    prompt = "Question: Write a function that returns the sum of a list.\n\nAnswer:\ndef total(xs):"

    def one(i: int) -> tuple[float, int]:
        start = time.perf_counter()
        response = http.post(f"{url}/completions", timeout=300, json={
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.2, "seed": i})
        response.raise_for_status()
        return time.perf_counter() - start, response.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    latencies = sorted(r[0] for r in results)
    return {
        "requests": requests, "concurrency": concurrency, "max_tokens": max_tokens,
        "p50_s": statistics.median(latencies), "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "mean_s": statistics.fmean(latencies), "requests_per_s": requests / wall,
        "tokens_per_s": sum(r[1] for r in results) / wall, "latencies_s": latencies,
    }
