"""The run report renders from stage outputs, and the pipeline's overrides route to stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from octoray import stage_cli
from octoray.errors import UserError
from octoray.pipeline import report
from octoray.pipeline import run as pipeline

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)


def test_report_renders_every_section(tmp_path: Path) -> None:
    _write(tmp_path / "commits/stats.json", {"commits_seen": 10, "kept": 4, "dropped": {"merge": 2, "no_diff": 4}})
    _write(tmp_path / "sft/stats.json", {"funnel": {"input": 4, "content": 3, "imperative": 2},
                                         "commitpackft_rows": 2, "oasst_rows": 1,
                                         "subject_normalisation": {"pr_suffix": "strip", "emoji_prefix": "keep",
                                                                   "rescued": 1, "rescued_by_language": {"Go": 1}}})
    _write(tmp_path / "train/metrics.jsonl", "".join(json.dumps({"step": s, "loss": 5.0 - s / 10,
                                                                 "tokens_per_s": 100.0}) + "\n" for s in range(1, 6)))
    _write(tmp_path / "eval/metrics.json", {"fix": {"python": {"pass@1": 0.25, "pass@10": None,
                                                               "n_problems": 4, "n_samples": 8}}})
    _write(tmp_path / "serve/latency.json", {"requests": 3, "concurrency": 2, "max_tokens": 8, "p50_s": 0.1,
                                             "p99_s": 0.3, "requests_per_s": 5.0, "tokens_per_s": 40.0,
                                             "latencies_s": [0.1, 0.1, 0.3]})
    text = report.write_report(tmp_path, tmp_path / "report").read_text()
    assert "| mine: merge | 8 |" in text and "| filter: imperative | 2 |" in text
    assert "Subject normalisation (pr_suffix=strip, emoji_prefix=keep) rescued 1 of the CommitPackFT rows" in text
    assert "loss 4.900 -> 4.500" in text
    assert "| fix | python | 25.0 | - | 30.4 | 4 | 8 |" in text
    assert "| 3 | 2 | 8 | 0.100 | 0.300 |" in text
    for png in ("funnel.png", "loss.png", "passk.png", "latency.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == PNG_MAGIC
        assert f"({png})" in text


def test_report_says_what_did_not_run(tmp_path: Path) -> None:
    text = report.write_report(tmp_path, tmp_path / "report").read_text()
    assert "Mining and filtering did not run" in text and "Evaluation did not run" in text


def test_stage_overrides_are_routed_and_checked(tmp_path: Path) -> None:
    def parse(*words: str) -> None:
        stage_cli.parse("pipeline", ["jobs/demo.yaml", *words, "--out", str(tmp_path)], pipeline)

    with pytest.raises(UserError, match="unknown section 'trian'"):
        parse("trian.max_steps=3")
    with pytest.raises(UserError, match=r"\[train\].*max_stpes"):
        parse("train.max_stpes=3")
    with pytest.raises(UserError, match="'eval' queries the served model"):
        parse("stages=[mine, eval]")


def test_report_names_no_rescue_when_the_paper_rules_ran(tmp_path: Path) -> None:
    _write(tmp_path / "sft/stats.json", {"funnel": {"input": 4, "no_hash": 1}, "commitpackft_rows": 1, "oasst_rows": 0,
                                         "subject_normalisation": {"pr_suffix": "keep", "emoji_prefix": "keep",
                                                                   "rescued": 0, "rescued_by_language": {}}})
    text = report.write_report(tmp_path, tmp_path / "report").read_text()
    assert "| filter: no_hash | 1 |" in text and "Subject normalisation" not in text
