"""From repository to score, traceable: fingerprints, stale inputs, ``octoray lineage``, the model card.

One small pipeline (mine -> filter -> train -> serve -> eval) run three times, as a user would:
first; then after re-mining with one more repository (filter, train and eval are redone, the
lineage shows the new fingerprints); then with nothing changed (every stage is reused).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import run_cli
from tests.helpers.gitrepo import MIT, GitRepo

OPS = ["+", "-", "*", "%", "//", "**", "&", "|"]


def _project(path: Path, name: str, n: int) -> Path:
    """A repository whose commits pass CommitPackFT's rules (imperative subjects, one file each)."""
    repo = GitRepo(path)
    repo.commit(f"Add the {name} helpers module", {"LICENSE": MIT, "calc.py": "def f(a, b):\n    return a\n"})
    for i in range(n):
        op = OPS[i % len(OPS)]
        repo.commit(f"Make {name} combine its arguments with {op} in step {i}",
                    {"calc.py": f"def f(a, b):\n    # step {i}\n    return a {op} b\n"})
    return repo.path


def _pipeline(out: Path, sources: list[Path], shared_dir: Path) -> str:
    result = run_cli("pipeline", "jobs/demo.yaml", "--out", out, "--humanevalpack-dir", shared_dir / "humanevalpack",
                     f"sources=[{','.join(map(str, sources))}]", "stages=[mine,filter,train,serve,eval]",
                     "filter.decontam=false", "train.max_steps=3", "train.warmup_steps=1", "train.checkpoint_every=3",
                     "eval.tasks=[synthesize]", "eval.languages=[python]", "eval.limit=1", "eval.n_samples=1",
                     "eval.max_new_tokens=8", "latency_requests=2", "latency_concurrency=1", timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


def _lineage(stage_dir: Path) -> list[dict]:
    result = run_cli("lineage", stage_dir, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.long
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.toolchain
def test_stale_inputs_are_redone_and_lineage_follows(tmp_path: Path, shared_dir: Path) -> None:
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    first, second = _project(tmp_path / "src" / "alpha", "alpha", 12), _project(tmp_path / "src" / "beta", "beta", 12)
    out = tmp_path / "run"
    log = _pipeline(out, [first], shared_dir)
    assert "octoray pipeline: mine done, filter done, train done, eval done" in log
    chain = _lineage(out / "eval")
    assert [e["stage"] for e in chain] == ["eval", "train", "filter", "mine"]
    assert all(e["fingerprint"].startswith("sha256:") for e in chain)
    assert chain[0]["model"]["fingerprint"] == chain[1]["fingerprint"]            # eval <- the model
    assert chain[1]["data"]["fingerprint"] == chain[2]["fingerprint"]             # model <- the sft data
    assert chain[2]["inputs"]["commits"]["fingerprint"] == chain[3]["fingerprint"]  # sft <- the commits
    assert list(chain[3]["repos"]) == ["alpha"] and len(chain[3]["repos"]["alpha"]["head"]) == 40
    assert chain[1]["checkpoint_step"] == 3 and chain[1]["seed"] == 0

    # The model card: loads with huggingface_hub, its model-index holds the eval's results.
    card = ModelCard.load(out / "train" / "model" / "README.md")
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    name, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert name == "demo"
    assert {(r.dataset_type, r.dataset_config, r.metric_type): r.metric_value for r in results} == {
        ("bigcode/humanevalpack", "python", "pass@1"): round(metrics["synthesize"]["python"]["pass@1"], 4)}
    assert card.data.license == "mit" and card.data.pipeline_tag == "text-generation"
    assert card.data.library_name == "transformers" and "## Lineage" in card.text
    assert f"fingerprint {chain[3]['fingerprint'][7:19]}" in card.text  # the commits' (short), in the lineage
    # Before eval, the card the export wrote already loads (no model-index yet) - checked by the
    # redo below, which writes it again from scratch.

    # One more repository: mine, filter, train and eval are all redone from the new data.
    log = _pipeline(out, [first, second], shared_dir)
    assert "octoray pipeline: mine redone, filter redone, train redone, eval redone" in log
    assert "is complete but stale (input commits changed" in log
    assert "is complete but stale (input sft changed" in log
    assert "serve + eval: " in log and "is complete but stale (the model changed" in log
    again = _lineage(out / "eval")
    assert sorted(again[3]["repos"]) == ["alpha", "beta"]
    for old, new in zip(chain, again):
        assert old["fingerprint"] != new["fingerprint"], old["stage"]
    assert again[0]["model"]["fingerprint"] == again[1]["fingerprint"]
    assert [json.loads(line)["step"] for line in (out / "train" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    # Nothing changed: every stage is reused, and says so.
    log = _pipeline(out, [first, second], shared_dir)
    assert "octoray pipeline: mine reused, filter reused, train reused, eval reused" in log
    assert [e["fingerprint"] for e in _lineage(out / "eval")] == [e["fingerprint"] for e in again]
    text = run_cli("lineage", out)  # a pipeline's root: the chain from its last stage
    assert text.returncode == 0 and "alpha" in text.stdout and "beta" in text.stdout
