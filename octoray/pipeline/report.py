"""The run report: ``report.md`` and its PNGs, from the stage directories of one pipeline run.

Sections: the data funnel (mining drops, then the CommitPackFT rules), the hyperparameter search
(a row per trial, validation loss against steps), the loss curve, pass@k per task x language
beside OctoCoder's published pass@1, and serving latency. A stage that did not run
gets a line saying so rather than a missing section.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from octoray.evaluation.humanevalpack import LANGUAGES
from octoray.storage.layout import (BEST_FILE, EVAL_METRICS_FILE, LATENCY_FILE, LOSS_PNG, MANIFEST, METRICS_FILE,
                                    REPORT_FILE, STATS, stage_dirs)
from octoray.storage.locations import Location
from octoray.storage.stage_dirs import atomic_write_text

#: OctoCoder pass@1 (%) from the OctoPack paper (COMMITPACKFT.md), task -> language -> value.
OCTOCODER_PASS1 = {
    "fix": {"python": 30.4, "js": 28.4, "java": 30.6, "go": 30.2, "cpp": 26.1, "rust": 16.5},
    "explain": {"python": 35.1, "js": 24.5, "java": 27.3, "go": 21.1, "cpp": 24.1, "rust": 14.8},
    "synthesize": {"python": 46.2, "js": 39.2, "java": 38.2, "go": 30.4, "cpp": 35.6, "rust": 23.4},
}


def write_report(root: Location, out: Location) -> Location:
    """Write ``out/report.md`` (+ PNGs) from the stage directories under ``root``; returns its path.

    ``root`` and ``out`` may be paths or object-store locations (:mod:`octoray.storage.locations`); for the
    latter the report is drawn in a local temp directory and uploaded, ``report.md`` last.
    """
    from octoray.storage.locations import ObjectPath, upload_dir

    if isinstance(out, ObjectPath):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="octoray-report-") as tmp:
            write_report(root, Path(tmp))
            upload_dir(Path(tmp), out, last=REPORT_FILE)
        return out / REPORT_FILE
    out.mkdir(parents=True, exist_ok=True)
    dirs = stage_dirs(root)
    sections = [f"# octoray run report: `{root}`\n",
                _funnel_section(dirs["mine"], dirs["filter"], out),
                _tuning_section(dirs["tune"], dirs["train"], out),
                _training_section(dirs["train"], out),
                _eval_section(dirs["eval"], out),
                _latency_section(dirs["serve"], out)]
    path = out / REPORT_FILE
    atomic_write_text(path, "\n".join(sections))
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on workers or CI
    import matplotlib.pyplot as plt

    return plt


def _funnel_section(commits: Path, sft: Path, out: Path) -> str:
    mined, filtered = _read_json(commits / STATS), _read_json(sft / STATS)
    if mined is None and filtered is None:
        return "## Data funnel\n\nMining and filtering did not run.\n"
    steps: list[tuple[str, int]] = []
    if mined:
        left = mined["commits_seen"]
        steps.append(("commits seen", left))
        for rule, count in mined["dropped"].items():
            if count:
                left -= count
                steps.append((f"mine: {rule}", left))
    if filtered:
        funnel = filtered["funnel"]
        steps += [(f"filter: {rule}" if rule != "input" else "CommitPack rows", n) for rule, n in funnel.items()]
    lines = ["## Data funnel\n", "| step | rows left |", "|---|---:|"]
    lines += [f"| {name} | {n:,} |" for name, n in steps]
    if filtered:
        lines.append(f"\nCommitPackFT rows: {filtered.get('commitpackft_rows', 0):,}; OASST rows mixed in: "
                     f"{filtered.get('oasst_rows', 0):,}.")
        norm = filtered.get("subject_normalisation")
        if norm and "strip" in (norm.get("pr_suffix"), norm.get("emoji_prefix")):
            lines.append(f"Subject normalisation (pr_suffix={norm.get('pr_suffix')}, emoji_prefix="
                         f"{norm.get('emoji_prefix')}) rescued {norm.get('rescued', 0):,} of the CommitPackFT rows: "
                         "the paper's rules would drop them for a trailing PR number or a leading emoji.")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, max(3, 0.28 * len(steps))))
    names = [s[0] for s in steps][::-1]
    ax.barh(names, [max(s[1], 0) for s in steps][::-1], color="#4c72b0")
    ax.set_xlabel("rows left after the step")
    ax.set_title("CommitPack -> CommitPackFT funnel")
    fig.tight_layout()
    fig.savefig(out / "funnel.png", dpi=100)
    plt.close(fig)
    return "\n".join(lines) + "\n\n![funnel](funnel.png)\n"


def _tuning_section(tune_dir: Path, train_dir: Path, out: Path) -> str:
    """The search: a row per trial (hyperparameters, best val_loss, steps, how it ended) and a plot."""
    best = _read_json(tune_dir / BEST_FILE)
    if not best or not best.get("trials"):
        return "## Hyperparameter search\n\nTuning did not run.\n"
    trials, winner = best["trials"], best["best"]["trial_id"]
    keys = list(dict.fromkeys(k for t in trials for k in (t.get("config") or {})))
    lines = ["## Hyperparameter search\n",
             f"{best.get('search', 'random')} search with ASHA, {len(trials)} trials of up to "
             f"{best.get('max_steps', '?')} steps, {best.get('trial_steps', sum(t.get('steps', 0) for t in trials))} "
             f"trial-steps in all; best trial **{winner}** (val_loss {best['best']['val_loss']:.4f}).",
             "", "| trial | " + " | ".join(keys) + " | best val_loss | steps | ended |",
             "|---|" + "---:|" * len(keys) + "---:|---:|---|"]
    for t in trials:
        config = t.get("config") or {}
        ended = t.get("status") or ("stopped by ASHA" if t.get("stopped_early") else "completed")
        if t.get("error"):
            ended += f": {str(t['error'])[:120].replace('|', '/')}"
        name = f"**{t['trial_id']}**" if t["trial_id"] == winner else str(t["trial_id"])
        lines.append(f"| {name} | " + " | ".join(_cell(config.get(k)) for k in keys) +
                     f" | {_cell(t.get('val_loss'))} | {t.get('steps', '-')} | {ended} |")
    handoff = (_read_json(train_dir / MANIFEST) or {}).get("hparams_from")
    if handoff:
        start = "continued from its checkpoint" if handoff.get("checkpoint") else "trained from scratch"
        lines.append(f"\nThe train stage used trial {handoff['trial_id']}'s hyperparameters ({start}).")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in trials:
        curve = t.get("val_curve") or []
        if curve:
            is_best = t["trial_id"] == winner
            ax.plot([c[0] for c in curve], [c[1] for c in curve], marker="o", linewidth=2.5 if is_best else 1,
                    label=f"{t['trial_id']}{' (best)' if is_best else ''}")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("val_loss per trial (a line that ends early: stopped by ASHA)")
    if len(trials) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "tuning.png", dpi=100)
    plt.close(fig)
    return "\n".join(lines) + "\n\n![tuning](tuning.png)\n"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _training_section(run_dir: Path, out: Path) -> str:
    from octoray.training.metrics import plot_loss, read_metrics

    rows = read_metrics(run_dir / METRICS_FILE)
    if not rows:
        return "## Training\n\nTraining did not run.\n"
    plot_loss(run_dir / METRICS_FILE, out / LOSS_PNG)
    first, last = rows[0], rows[-1]
    tps = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    lines = ["## Training\n", f"Steps: {last['step']}; loss {first['loss']:.3f} -> {last['loss']:.3f}."]
    if tps:
        lines.append(f"Throughput: {sum(tps) / len(tps):,.0f} tokens/s (mean over logged steps).")
    mfu = [r["mfu"] for r in rows if r.get("mfu") is not None]
    if mfu:
        lines.append(f"MFU: {sum(mfu) / len(mfu):.1%}.")
    return "\n".join(lines) + "\n\n![loss](loss.png)\n"


def _eval_section(eval_dir: Path, out: Path) -> str:
    metrics = _read_json(eval_dir / EVAL_METRICS_FILE)
    if not metrics:
        return "## HumanEvalPack\n\nEvaluation did not run.\n"
    lines = ["## HumanEvalPack\n", "pass@k in % (OctoCoder's published pass@1 beside it; problems x samples).\n",
             "| task | language | pass@1 | pass@10 | OctoCoder pass@1 | problems | samples |",
             "|---|---|---:|---:|---:|---:|---:|"]
    bars: list[tuple[str, float, float | None]] = []
    for task, by_lang in metrics.items():
        for lang in sorted(by_lang, key=lambda l: LANGUAGES.index(l) if l in LANGUAGES else 99):
            m = by_lang[lang]
            ours = m.get("pass@1")
            p10 = m.get("pass@10")
            ref = OCTOCODER_PASS1.get(task, {}).get(lang)
            lines.append(f"| {task} | {lang} | {_pct(ours)} | {_pct(p10)} | {ref if ref is not None else '-'} | "
                         f"{m.get('n_problems', 0)} | {m.get('n_samples', 0)} |")
            bars.append((f"{task}\n{lang}", 100 * (ours or 0.0), ref))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(bars)), 4))
    xs = range(len(bars))
    ax.bar([x - 0.2 for x in xs], [b[1] for b in bars], width=0.4, label="this run")
    ax.bar([x + 0.2 for x in xs], [b[2] or 0 for b in bars], width=0.4, label="OctoCoder (paper)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([b[0] for b in bars], fontsize=8)
    ax.set_ylabel("pass@1 (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "passk.png", dpi=100)
    plt.close(fig)
    return "\n".join(lines) + "\n\n![pass@k](passk.png)\n"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _latency_section(serve_dir: Path, out: Path) -> str:
    latency = _read_json(serve_dir / LATENCY_FILE)
    if not latency:
        return "## Serving\n\nThe server was not probed.\n"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(latency["latencies_s"], bins=min(20, len(latency["latencies_s"])), color="#55a868")
    ax.set_xlabel("request latency (s)")
    ax.set_ylabel("requests")
    ax.set_title(f"{latency['requests']} requests, concurrency {latency['concurrency']}")
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=100)
    plt.close(fig)
    return ("## Serving\n\n| requests | concurrency | max_tokens | p50 s | p99 s | requests/s | tokens/s |\n"
            "|---:|---:|---:|---:|---:|---:|---:|\n"
            f"| {latency['requests']} | {latency['concurrency']} | {latency['max_tokens']} | {latency['p50_s']:.3f} | "
            f"{latency['p99_s']:.3f} | {latency['requests_per_s']:.2f} | {latency['tokens_per_s']:.1f} |\n\n"
            "![latency](latency.png)\n")
