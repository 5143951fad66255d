"""The Hub model card (``RUN_DIR/model/README.md``) of every exported model.

The YAML header is what the Hub, ``huggingface_hub.ModelCard.load`` and model browsers read:
``license`` (from the training data's licenses: one id, or ``other`` with the ids listed),
``base_model`` (a hub id; left out for the demo model and local directories, named in the body),
``datasets`` (where the SFT data is: replace it with the dataset's Hub id after uploading it),
``tags``, ``pipeline_tag``, ``library_name`` and, once the model is evaluated, ``model-index``
with HumanEvalPack pass@k per task and language (written with ``huggingface_hub``'s own
``EvalResult`` so its model-index reader parses it back). The body: the data funnel, the
hyperparameters actually used, hardware and time, and the lineage (``octoray lineage``).

``octoray train`` writes the card when it exports; the pipeline writes it again after eval, with
the results. The card is not part of the model's fingerprint (:data:`octoray.storage.fingerprint.EXCLUDED`).
"""

from __future__ import annotations

import json
from typing import Any, Optional

import yaml

from octoray import __version__
from octoray.storage.layout import CARD as DATA_CARD
from octoray.storage.layout import EVAL_METRICS_FILE, MODEL_DIR, STATS
from octoray.storage.locations import Location, location
from octoray.storage.stage_dirs import atomic_write_text, read_manifest

CARD = "README.md"
#: HumanEvalPack's names: the dataset's task names and its language configs' display names.
TASK_NAMES = {"fix": "HumanEvalFix", "explain": "HumanEvalExplain", "synthesize": "HumanEvalSynthesize"}
LANGUAGE_NAMES = {"python": "Python", "js": "JavaScript", "java": "Java", "go": "Go", "cpp": "C++", "rust": "Rust"}
HUMANEVALPACK = "bigcode/humanevalpack"


def write(run_dir: str | Location, eval_dir: Optional[str | Location] = None, *, name: Optional[str] = None) -> Location:
    """Write ``run_dir/model/README.md`` from the run's manifest (and ``eval_dir``'s results); returns it."""
    from octoray.storage.lineage import chain, render

    run_dir = location(run_dir)
    manifest = read_manifest(run_dir) or {}
    sft = _sft_dir(manifest)
    sft_card = _card_header(sft / DATA_CARD) if sft is not None else {}
    sft_stats = _read_json(sft / STATS) if sft is not None else {}
    metrics = _read_json(location(eval_dir) / EVAL_METRICS_FILE) if eval_dir is not None else {}
    eval_manifest = read_manifest(location(eval_dir)) if eval_dir is not None else None
    name = name or (run_dir.parent.name if run_dir.name == "train" else run_dir.name)
    lineage = render(chain(location(eval_dir) if eval_manifest else run_dir))
    text = render_card(manifest, name=name, data_license=sft_card.get("license"), sft_stats=sft_stats,
                       metrics=metrics if eval_manifest else {}, eval_config=(eval_manifest or {}).get("config"),
                       lineage=lineage)
    path = run_dir / MODEL_DIR / CARD
    # An unchanged card is left alone: a rerun that reuses every stage rewrites nothing (in object
    # storage, not even a timestamp).
    if not (path.is_file() and path.read_text() == text):
        atomic_write_text(path, text)
    return path


def render_card(manifest: dict[str, Any], *, name: str, data_license: Any, sft_stats: dict[str, Any],
                metrics: dict[str, Any], eval_config: Optional[dict[str, Any]], lineage: str) -> str:
    """The card's text (header and body)."""
    from huggingface_hub import ModelCardData

    config = manifest.get("config") or {}
    base = manifest.get("base_model") or config.get("model")
    licenses = data_license if isinstance(data_license, list) else [data_license or "unknown"]
    data = manifest.get("data") or {}
    sft_path = ((manifest.get("inputs") or {}).get("sft") or {}).get("path")
    card_data = ModelCardData(
        license=licenses[0] if len(licenses) == 1 else "other",
        base_model=base if _is_hub_id(base) else None,
        datasets=[sft_path] if sft_path else None,
        tags=["code", "octopack", "octoray", "commitpackft"],
        pipeline_tag="text-generation",
        library_name="transformers",
        model_name=name,
        eval_results=eval_results(metrics) or None,
    )
    hyper = manifest.get("hyperparameters") or {}
    hardware = manifest.get("hardware") or {}
    funnel = sft_stats.get("funnel") or {}
    body = [
        f"# {name}",
        f"A causal language model instruction-tuned on commits with octoray {manifest.get('octoray_version', __version__)} "
        "(the OctoPack recipe on Ray: CommitPack -> CommitPackFT -> OctoCoder -> HumanEvalPack), "
        f"from base model `{base}`" + ("" if _is_hub_id(base) else " (not a Hub model: the tiny demo model or a local "
                                       "directory, so the header names no `base_model`)") + ".",
        "## Training data\n\n"
        f"`{sft_path}`: {data.get('rows')} rows (fingerprint `{data.get('fingerprint')}`), licenses "
        f"{', '.join(f'`{lic}`' for lic in licenses)}. Rows left after each CommitPackFT rule:\n\n"
        + _table(["step", "rows left"], [[rule, f"{left:,}"] for rule, left in funnel.items()]),
        "## Hyperparameters\n\n"
        + _table(["key", "value"], [[k, f"`{json.dumps(v)}`"] for k, v in sorted(hyper.items())])
        + (f"\n\nFrom tune trial `{manifest['hparams_from'].get('trial_id')}`." if manifest.get("hparams_from") else ""),
        "## Hardware and time\n\n"
        f"{hardware.get('num_workers')} Ray Train worker(s) on {hardware.get('device')}, precision "
        f"{hardware.get('precision')}, DeepSpeed ZeRO-{hardware.get('zero_stage')}; {manifest.get('seconds')} s "
        f"from {manifest.get('started_at')}; seed {manifest.get('seed')}; exported at step "
        f"{manifest.get('checkpoint_step')}; model fingerprint `{manifest.get('fingerprint')}`.",
    ]
    if metrics:
        rows = [[TASK_NAMES.get(task, task), LANGUAGE_NAMES.get(lang, lang),
                 *(_percent(cell.get(k)) for k in ("pass@1", "pass@10")), str(cell.get("n_problems"))]
                for task, per_lang in metrics.items() for lang, cell in per_lang.items()]
        settings = {k: (eval_config or {}).get(k) for k in ("n_samples", "temperature", "top_p", "max_new_tokens", "limit")}
        body.append("## Evaluation\n\nHumanEvalPack, executed in octoray's sandbox ("
                    + ", ".join(f"{k}={v}" for k, v in settings.items()) + "):\n\n"
                    + _table(["task", "language", "pass@1", "pass@10", "problems"], rows))
    body.append("## Lineage\n\nFrom `octoray lineage` (each stage's output, its fingerprint and settings, back to "
                "the source repositories and their head commits):\n\n```\n" + lineage + "\n```")
    return f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(body) + "\n"


def eval_results(metrics: dict[str, Any]) -> list[Any]:
    """``huggingface_hub.EvalResult`` per task, language and pass@k of a ``metrics.json``."""
    from huggingface_hub import EvalResult

    results = []
    for task, per_lang in metrics.items():
        for lang, cell in per_lang.items():
            for key, value in cell.items():
                if not key.startswith("pass@") or value is None:
                    continue
                results.append(EvalResult(
                    task_type="text-generation", task_name=f"{TASK_NAMES.get(task, task)} {LANGUAGE_NAMES.get(lang, lang)}",
                    dataset_type=HUMANEVALPACK, dataset_name=f"{TASK_NAMES.get(task, task)} {LANGUAGE_NAMES.get(lang, lang)}",
                    dataset_config=lang, dataset_split="test", metric_type=key, metric_name=key,
                    metric_value=round(float(value), 4), verified=False))
    return results


def _sft_dir(manifest: dict[str, Any]) -> Optional[Location]:
    path = ((manifest.get("inputs") or {}).get("sft") or {}).get("path")
    return location(path) if path else None


def _card_header(path: Location) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    if not text.startswith("---\n"):
        return {}
    return yaml.safe_load(text.split("---\n", 2)[1]) or {}


def _read_json(path: Location) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _is_hub_id(model: Any) -> bool:
    """``owner/name`` on the Hub, not ``demo``, a path or a URI."""
    text = str(model or "")
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and "://" not in text


def _percent(value: Any) -> str:
    return "" if value is None else f"{100 * float(value):.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)
