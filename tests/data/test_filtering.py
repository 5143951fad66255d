"""``octoray filter``: each CommitPackFT rule on hand-made rows, the funnel on a mined repository,
the tokenizer rule with a tiny local tokenizer, resume, and one-line errors."""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import subprocess
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from octoray.data import rules
from octoray.data.filtering import FUNNEL_KEYS, FilterConfig, _read_oasst, add_prompts
from octoray.data.subjects import reference_normalise
from octoray.errors import UserError
from tests.helpers import run_cli


def col(*values: object) -> pa.Array:
    return pa.array(list(values), pa.string())


def keep(mask: pa.Array) -> list[bool]:
    return mask.to_pylist()


EXT = {"Python": frozenset({".py", ".pyw"}), "TypeScript": frozenset({".ts", ".d.ts"})}


def ext_for(lang: str) -> frozenset[str]:
    return EXT.get(lang, frozenset())


@pytest.fixture(scope="module")
def shipped() -> rules.Tables:
    return rules.load_tables()


@pytest.fixture(scope="module")
def original(shared_dir: Path) -> rules.Tables:
    return rules.load_tables(shared_dir / "commitpack/good_starts_en.txt", shared_dir / "commitpack/bad_subjects.json")


# ------------------------------------------------------------------------------- rules one by one


def test_rule_content() -> None:
    old = col("a", "a", "a", "x" * 49_999, "x" * 50_000)
    new = col("b", "", "a", "y", "y")
    assert keep(rules.rule_content(old, new)) == [True, False, False, True, False]


def test_rule_no_hash() -> None:
    assert keep(rules.rule_no_hash(col("Fix crash in the parser", "Fix #12 in the parser", None))) == [True, False, False]


def test_rule_extension_uses_the_rows_language() -> None:
    files = col("src/a.py", "src/a.PY", "src/a.js", "Makefile", "types/x.d.ts", "a.py")
    langs = col("Python", "Python", "Python", "Python", "TypeScript", "Ruby")
    assert keep(rules.rule_extension(files, langs, ext_for)) == [True, True, False, False, True, False]


def test_rule_no_file_name() -> None:
    files = col("src/parser.py", "src/parser.py", "src/a.test.js", ".bashrc", "src/io.py")
    subjects = col("Fix the parser crash", "Fix the tokenizer crash", "Speed up a.test runs", "Add alias for git", "Fix IO")
    assert keep(rules.rule_no_file_name(files, subjects)) == [False, True, False, True, True]


def test_rule_subject_length() -> None:
    subjects = col("Fix a b c d", "Fix a b c", "Fix it up a", "Fix" + " a" * 497, "Fix" + " a" * 498,
                   "Fix    the  parser   crash   now")
    # 11 chars/5 words; 4 words; 11 chars/4 words; 997 chars; 999 chars; extra spaces are no words
    assert keep(rules.rule_subject_length(subjects)) == [True, False, False, True, True, True]
    assert keep(rules.rule_subject_length(col("Fix" + " a" * 499))) == [False]  # 1001 chars


def test_clean_subject_matches_the_original_cleaning() -> None:
    subjects = ["[core] parser: Fix the crash [skip ci]", "[a] [b]", "x: y: Fix it", "Fix the crash [#12]",
                "  Fix   spaced\tout words ", "[ui]", "module.py: Handle None in the loader", ""]
    cleaned = rules.clean_subject(col(*subjects)).to_pylist()
    assert cleaned == [rules.reference_clean_subject(s) for s in subjects]
    assert cleaned[0] == "Fix the crash" and cleaned[2] == "y: Fix it" and cleaned[4] == "Fix spaced out words"


def test_rule_capitalized() -> None:
    assert keep(rules.rule_capitalized(col("Fix it", "fix it", "1 fix", "Élargir", ""))) == [True, False, False, True, False]


def test_token_length_bounds_are_inclusive() -> None:
    assert keep(rules.token_length_ok([49, 50, 768, 769], 50, 768)) == [False, True, True, False]


def test_rule_imperative_with_shipped_and_original_tables(shipped: rules.Tables, original: rules.Tables) -> None:
    subjects = col("Add retry to the client", "Added retry to the client", "Update readme", "Merge branch 'dev' into x",
                   "1.2.3 release of the thing", "v2.0.1", "deadbeef-0123", "Deal with empty input files",
                   "Avoid a crash on empty input", "Add <?xml header to output", "Fix signed-off-by parsing")
    expected_original = [True, False, False, False, False, False, False, True, False, False, False]
    assert keep(rules.rule_imperative(subjects, original)) == expected_original
    # octoray's table extends the original verbs ("avoid"); everything else decides the same.
    assert keep(rules.rule_imperative(subjects, shipped)) == [*expected_original[:8], True, False, False]
    assert len(original.verbs) == 257 and original.verbs <= shipped.verbs


def test_version_regex_matches_the_original_lookahead() -> None:
    import re

    for text in ["1.2.3", "1.2.3 fix the build now", "1.2.34 fix the build now", "v1.2.3-rc1", "10.20.3a"]:
        python = re.match(r"(?:v)?\d+\.\d+\.\d+(?=$|\S)", text) is not None
        arrow = rules._pc().match_substring_regex(col(text), rules.VERSION_RE).to_pylist()[0]
        assert arrow == python, text


def test_rule_second_pass() -> None:
    subjects = col(
        "Fix the crash in the parser",                  # kept
        "Fix crash (cherry picked from commit abc)",     # cherry-pick
        "Revert " + "a" * 40 + " in parser",             # SHA
        "Fix the crash in the parser [ci skip]",         # kept, tag removed
        "Fix what i broke yesterday",                    # first person
        "Add thanks to Bob for the fix",                 # thanks to ... for
        "Apply code review comments",                    # code review
        "Fix issue 42 in the parser",                    # issue number
        "Fix bug 7 in the parser",                        # bug number
        "Add WIP parser for the format",                 # wip as a word
        "Wipe caches before each test",                  # "wip" inside a word: kept (octoray)
        "Add link https://example.com to docs",          # URL
        "Solve Two Sum | LeetCode",                      # leetcode
        "Fix the parser [ci skip]",                      # 3 words after cleaning
        "Put the thingie in the thingie",                # joke subject
    )
    commits = col(*[f"{i:040x}" for i in range(len(subjects))])
    assert keep(rules.rule_second_pass(subjects, commits, seed=0)) == [
        True, False, False, True, False, False, False, False, False, False, True, False, False, False, False]
    assert rules.second_pass_subject(col("Fix the crash [ci skip]")).to_pylist() == ["Fix the crash"]


def test_version_bump_drop_is_seeded_per_commit() -> None:
    n = 2000
    subjects = col(*(["Bump version of parser to 2"] * n))
    commits = col(*[f"{i:040x}" for i in range(n)])
    first = keep(rules.rule_second_pass(subjects, commits, seed=0))
    assert 0.07 < sum(first) / n < 0.13  # ~10% kept
    # Same decision per commit whatever the batch order; another seed draws other commits.
    reversed_ = keep(rules.rule_second_pass(col(*reversed(subjects.to_pylist())),
                                            col(*reversed(commits.to_pylist())), seed=0))
    assert reversed_[::-1] == first
    assert keep(rules.rule_second_pass(subjects, commits, seed=1)) != first
    assert keep(rules.rule_second_pass(col("Bumping the parser is not it"), col("0" * 40), 0)) == [True]


def test_decontamination_against_humanevalpack(shared_dir: Path) -> None:
    from octoray.evaluation.humanevalpack import load_problems

    problems = {lang: load_problems(lang, shared_dir / "humanevalpack") for lang in ("python", "java")}
    texts = [(p["task_id"], p["prompt"] + p["canonical_solution"]) for ps in problems.values() for p in ps]
    index = rules.build_ngram_index(texts, 13)
    py0, java5 = problems["python"][0], problems["java"][5]
    copied = "import os\n\n" + py0["prompt"] + py0["canonical_solution"] + "\n\nprint('hi')\n"
    partial = java5["prompt"]  # the prompt alone: ~47% of the problem's n-grams
    unrelated = "def add(a, b):\n    return a + b\n" * 20
    boilerplate = "import java.util.*;\nimport java.lang.*;\n\nclass Solution {\n    public int f() { return 1; }\n}\n"
    assert rules.overlap([copied], index)[1] == "Python/0"
    threshold = FilterConfig().decontam_threshold
    mask = rules.rule_decontam(col("", "", "", ""), col(copied, partial, unrelated, boilerplate), index, threshold)
    assert keep(mask) == [False, False, True, True]
    assert keep(rules.rule_decontam(col(partial), col(""), index, 0.5)) == [True]  # below a stricter bar


# ------------------------------------------------------------------------------- vectorised == per-row


def _rows() -> list[dict]:
    subjects = ["Add retry to the client loop", "[net] client: Add retry to the loop", "add retry to the client loop",
                "Fix #3 in client loop handling", "Fix the client.py loop handling", "Refactoring client loop code",
                "Bump version to 1.2.4 for release", "Fix what i broke in the loop", "Update readme", "Fix it",
                "Add retry to the client loop [ci skip]", "Use issue 7 workaround in loop", "Fix WIP loop retry code",
                "Avoid retry storms in the loop", "Handle empty input in loop again",
                "Add retry to the client loop (#12)", "🐛 Handle empty input in loop (GH-3)",
                ":bug: fix #4 in the client loop", "Bump retry from 1.2 to 1.3 (#99)", "✨ (#7, #8)"]
    rows = []
    for i, subject in enumerate(subjects):
        for j, (path, lang) in enumerate([("src/client.py", "Python"), ("src/x.ts", "Python"), ("lib/y.d.ts", "TypeScript")]):
            rows.append({"commit": f"{i * 10 + j:040x}", "subject": subject, "new_file": path, "lang": lang,
                         "old_contents": "a = 1\n" * (j + 1), "new_contents": "" if (i + j) % 7 == 0 else "a = 2\n"})
    return rows


@pytest.mark.parametrize("normalise", ["keep", "strip"])
@pytest.mark.parametrize("table_kind", ["shipped", "original"])
def test_vectorised_rules_match_the_per_row_reference(table_kind: str, normalise: str,
                                                      request: pytest.FixtureRequest) -> None:
    import numpy as np

    from octoray.data.filtering import _first_rules

    tables = request.getfixturevalue(table_kind)
    rows = _rows()
    batch = pa.Table.from_pylist(rows)
    # Dropped rows come back slimmed to (path, lang, _drop): a per-row "path" keeps them apart.
    batch = batch.append_column("path", batch.column("commit"))
    out = _first_rules(batch, ext_for, pr_suffix=normalise, emoji_prefix=normalise)
    drop = np.array(out.column("_drop").to_pylist())
    alive = out.filter(pa.array(drop == 0))
    later = np.zeros(alive.num_rows, dtype=int)
    subject = alive.column("subject")
    for name, mask in [("imperative", rules.rule_imperative(subject, tables)),
                       ("second_pass", rules.rule_second_pass(subject, alive.column("commit"), 0))]:
        later = np.where((later == 0) & ~np.array(mask.to_pylist()), rules.CODE[name], later)
    final = dict(zip(out.column("path").to_pylist(), drop.tolist()))
    final.update(zip(alive.column("path").to_pylist(), later.tolist()))
    strip = normalise == "strip"
    expected = {r["commit"]: rules.reference_decision(r, tables, ext_for, pr_suffix=strip, emoji_prefix=strip)[0]
                for r in rows}
    assert final == expected
    assert 0 < sum(v == 0 for v in final.values()) < len(rows)


# ------------------------------------------------------------------------------- tables, templates, OASST, config


def test_table_files_are_checked(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('{"bad_subject_exact": "x"}')
    with pytest.raises(UserError, match="bad_subject_exact"):
        rules.load_tables(None, tmp_path / "bad.json")
    with pytest.raises(UserError, match="not found"):
        rules.load_tables(tmp_path / "missing.txt")


def test_templates() -> None:
    table = pa.table({"subject": col("Fix it"), "old_contents": col("a\n"), "new_contents": col("b\n")})
    octo = add_prompts(table, "octocoder").to_pylist()[0]
    assert octo["prompt"] + octo["completion"] == "Question: Fix it\na\n\n\nAnswer:\nb\n"
    assert octo["source"] == "commitpackft"
    tags = add_prompts(table, "commit_tags").to_pylist()[0]
    assert tags["prompt"] == "<commit_before>a\n<commit_msg>Fix it<commit_after>" and tags["completion"] == "b\n"


def test_oasst_rows_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "oasst.jsonl"
    good.write_text('{"input": "What is 2+2?", "output": "4"}\n\n{"input": "Hi", "output": "Hello"}\n')
    assert _read_oasst(good, None) == [("What is 2+2?", "4"), ("Hi", "Hello")]
    assert _read_oasst(good, 1) == [("What is 2+2?", "4")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "output": "b"}\n{"input": "a"\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        _read_oasst(bad, None)
    bad.write_text('{"input": "a", "output": 3}\n')
    with pytest.raises(UserError, match=r":1: expected an object"):
        _read_oasst(bad, None)


def test_config_problems_are_listed_together() -> None:
    from octoray.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(FilterConfig, None, ["min_tokens=900", "decontam_threshold=2", "decontam_languages=[py]"],
                    values={"commits": "c", "out": "o"})
    text = str(err.value)
    assert "min_tokens" in text and "decontam_threshold" in text and "decontam_languages" in text


def test_partial_output_resumes_only_with_the_same_input_and_rules(tmp_path: Path) -> None:
    from octoray.data.filtering import _prepare_out

    out = tmp_path / "sft"
    shard = out / "data" / "train-00000-of-00001.parquet"
    source = {"dir": "/c", "rows": 10, "started_at": "2026-01-01T00:00:00Z"}
    cfg = FilterConfig(commits="/c", out=str(out))
    _prepare_out(out, cfg, source)
    shard.parent.mkdir()
    shard.write_bytes(b"x")
    (out / "_funnel" / "commits-00000.parquet.json").write_text("{}")
    _prepare_out(out, FilterConfig(commits="/c", out=str(out), actors=4), source)  # speed only: resume
    assert shard.is_file()
    _prepare_out(out, cfg, {**source, "rows": 11})  # re-mined input: start over
    assert not shard.exists()
    shard.write_bytes(b"x")
    _prepare_out(out, FilterConfig(commits="/c", out=str(out), seed=1), {**source, "rows": 11})  # other rules
    assert not shard.exists() and not (out / "_funnel" / "commits-00000.parquet.json").exists()
    # A partial output of octoray 0.1 (shards beside manifest.json) starts over: new shards go under data/.
    cfg = FilterConfig(commits="/c", out=str(out), seed=1)
    (out / "commits-00000.parquet").write_bytes(b"x")
    (out / "_funnel" / "commits-00000.parquet.json").write_text("{}")
    _prepare_out(out, cfg, {**source, "rows": 11})
    assert not (out / "commits-00000.parquet").exists() and not (out / "_funnel" / "commits-00000.parquet.json").exists()


def _sft_rows(sft: Path) -> list[dict]:
    files = json.loads((sft / "manifest.json").read_text())["files"]
    return pa.concat_tables([pq.read_table(sft / f) for f in files]).to_pylist()


def _check_hub_folder(sft: Path, cache: Path) -> None:
    """``datasets.load_dataset(DIR)`` and ``pandas.read_parquet(DIR/data)`` give exactly the manifest's rows."""
    import datasets
    import pandas as pd
    import yaml

    from octoray.data.mining import COLUMNS

    manifest = json.loads((sft / "manifest.json").read_text())
    n = len(manifest["files"])
    assert manifest["files"] == [f"data/train-{i:05d}-of-{n:05d}.parquet" for i in range(n)]
    columns = [*COLUMNS, "prompt", "completion", "source"]
    ds = datasets.load_dataset(str(sft), split="train", cache_dir=str(cache))
    assert ds.num_rows == manifest["rows"] and ds.column_names == columns
    assert sorted(ds["prompt"]) == sorted(r["prompt"] for r in _sft_rows(sft))
    frame = pd.read_parquet(sft / "data")
    assert len(frame) == manifest["rows"] and list(frame.columns) == columns
    text = (sft / "README.md").read_text()
    meta = yaml.safe_load(text.split("---\n", 2)[1])
    (declared,) = meta["configs"][0]["data_files"]
    assert declared["split"] == "train"
    assert sorted(p.relative_to(sft).as_posix() for p in sft.glob(declared["path"])) == manifest["files"]
    assert meta["language"] == ["code", "en"] and meta["size_categories"] == ["n<1K"]
    stats = json.loads((sft / "stats.json").read_text())
    funnel = stats["funnel"]  # the funnel, with the rows each rule dropped
    assert f"| decontam | {funnel['decontam']} | {funnel['second_pass'] - funnel['decontam']} |" in text
    assert f"rescued {stats['subject_normalisation']['rescued']} kept rows" in text


def _fake_mine_dir(path: Path, rows: int) -> Path:
    from octoray.data.mining import _schema
    from octoray.storage.stage_dirs import write_manifest, write_parquet_atomic

    table = _schema().empty_table()
    write_parquet_atomic(table, path / "commits-00000.parquet")
    write_manifest(path, "mine", FilterConfig(), rows=rows, files=["commits-00000.parquet"], started=0.0)
    return path


@pytest.mark.parametrize("case", ["missing", "not_mine", "empty", "bad_option", "bad_oasst"])
def test_cli_bad_input_is_one_line(case: str, tmp_path: Path) -> None:
    commits, out = tmp_path / "commits", tmp_path / "sft"
    extra: list[str] = ["decontam=false", "tokenizer_rule=false"]
    if case == "not_mine":
        commits.mkdir()
        (commits / "manifest.json").write_text(json.dumps({"stage": "train", "complete": True}))
    elif case != "missing":
        commits.mkdir()
        _fake_mine_dir(commits, 0)
    if case == "bad_option":
        extra.append("min_tokenz=3")
    if case == "bad_oasst":
        (tmp_path / "o.jsonl").write_text("not json\n")
        extra.append(f"oasst_file={tmp_path / 'o.jsonl'}")
        # a non-empty (but row-less) mine output, so the OASST file is what fails
        from octoray.data.mining import _schema
        pq.write_table(pa.Table.from_pylist([{"commit": "0" * 40, "subject": "Fix it"}], schema=_schema()),
                       commits / "commits-00000.parquet")
    result = run_cli("filter", commits, "--out", out, *extra)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("octoray filter: error: "), result.stderr
    assert "Traceback" not in result.stderr
    expected = {"missing": "not found", "not_mine": "not an output of 'octoray mine'", "empty": "no commits",
                "bad_option": "did you mean 'min_tokens'", "bad_oasst": "o.jsonl:1: not valid JSON"}[case]
    assert expected in lines[0]


class _GatedHub(http.server.BaseHTTPRequestHandler):
    """Answers every request as the Hub answers one for a gated model without accepted access."""

    paths: list[str] = []

    def _gated(self) -> None:
        self.paths.append(self.path)
        self.send_response(401)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", "Access to model bigcode/starcoder is restricted. You must have access "
                                            "to it and be authenticated to access it. Please log in.")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _gated  # noqa: N815 - http.server's names

    def log_message(self, *args: object) -> None:
        pass


def test_gated_default_tokenizer_says_what_to_do(tmp_path: Path) -> None:
    """The real loader (transformers -> huggingface_hub) against a local endpoint that answers like the Hub."""
    commits = tmp_path / "commits"
    from octoray.data.mining import _schema
    from octoray.storage.layout import shard_name
    from octoray.storage.stage_dirs import write_manifest, write_parquet_atomic

    write_parquet_atomic(pa.Table.from_pylist([{"commit": "0" * 40, "subject": "Fix it"}], schema=_schema()),
                         commits / shard_name(0, 1))
    write_manifest(commits, "mine", FilterConfig(), rows=1, files=[shard_name(0, 1)], started=0.0)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GatedHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HOME": str(tmp_path / "hf"),
               "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_TOKEN": "", "HF_HUB_ETAG_TIMEOUT": "5"}
        result = run_cli("filter", commits, "--out", tmp_path / "sft", "decontam=false", env=env)
    finally:
        server.shutdown()
    assert any("bigcode/starcoder" in path for path in _GatedHub.paths), "the loader never asked the endpoint"
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("octoray filter: error: cannot load tokenizer 'bigcode/starcoder': it is a gated model")
    for advice in ("accept its licence at https://huggingface.co/bigcode/starcoder", "hf auth login", "model="):
        assert advice in lines[0]


# ------------------------------------------------------------------------------- the funnel on a mined repository

BODY = "\n".join(f"def helper_{i}(value):\n    return value * {i} + offset_{i}" for i in range(8)) + "\n"


def _git(repo: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@x", "GIT_AUTHOR_DATE": "2024-01-01T00:00:00Z",
           "GIT_COMMITTER_DATE": "2024-01-01T00:00:00Z"}
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env=env)


def _commit(repo: Path, path: str, text: str, message: str) -> None:
    (repo / path).write_text(text)
    _git(repo, "add", path)
    _git(repo, "commit", "-q", "-m", message)


def _build_repo(repo: Path, shared_dir: Path) -> dict[str, str]:
    """One commit per rule (plus two keepers); returns message -> the rule expected to drop it."""
    from octoray.evaluation.humanevalpack import load_problems

    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    files = {"LICENSE": "MIT License\n\nCopyright (c) 2024 t\n\nPermission is hereby granted, free of charge, to any "
                        "person obtaining a copy of this software and associated documentation files (the "
                        "\"Software\"), to deal in the Software without restriction, including without limitation "
                        "the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies "
                        "of the Software, and to permit persons to whom the Software is furnished to do so, subject "
                        "to the following conditions:\n\nThe above copyright notice and this permission notice shall "
                        "be included in all copies or substantial portions of the Software.\n\nTHE SOFTWARE IS "
                        "PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT "
                        "LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND "
                        "NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, "
                        "DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING "
                        "FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE "
                        "SOFTWARE.\n",
             "src/net.py": BODY, "lib/util.js": BODY.replace("def ", "function ").replace(":\n", " {\n"),
             "src/big.py": "x = 1\n" * 10_000, "CMakeLists.txt": "cmake_minimum_required(VERSION 3.10)\nproject(x)\n",
             "src/tiny.py": "x = 1\n", "src/closeness.py": "import math\n"}
    for path, text in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "Import the project files")  # many files: mining drops it
    py0 = load_problems("python", shared_dir / "humanevalpack")[0]
    plan = [  # (file, new text, message, rule expected to drop it or "")
        ("src/net.py", BODY + "RETRIES = 3\n", "Add retry limit to the download helper", ""),
        ("lib/util.js", files["lib/util.js"] + "const EMPTY = [];\n", "Handle empty input in the tokenizer loop", ""),
        ("src/big.py", "x = 2\n" * 10_000, "Change every constant in the table", "content"),
        ("src/net.py", BODY + "RETRIES = 4\n", "Fix #12 crash in the download helper", "no_hash"),
        ("CMakeLists.txt", "cmake_minimum_required(VERSION 3.20)\nproject(x)\n", "Raise the minimum CMake version now",
         "extension"),
        ("src/net.py", BODY + "RETRIES = 5\n", "Make net timeouts configurable per request", "no_file_name"),
        ("src/net.py", BODY + "RETRIES = 6\n", "Fix it right now", "subject_length"),
        ("lib/util.js", files["lib/util.js"] + "const NONE = [];\n", "[ui] core: Fix the loop", "clean_subject"),
        ("lib/util.js", files["lib/util.js"] + "const ALL = [];\n", "add caching of parsed results to the loader",
         "capitalized"),
        ("src/tiny.py", "x = 2\n", "Change the default value of the flag", "token_length"),
        ("src/net.py", BODY + "RETRIES = 7\n", "Refactoring of the download helper internals", "imperative"),
        ("src/net.py", BODY + "RETRIES = 8\n", "Add retry support, see issue 42 for details", "second_pass"),
        ("src/closeness.py", "import math\n\n" + py0["prompt"] + py0["canonical_solution"],
         "Add a helper to compare nearby numbers", "decontam"),
        # Kept only because the subject is normalised first (pr_suffix / emoji_prefix = strip).
        ("src/net.py", BODY + "RETRIES = 9\n", "Add jitter to the retry delay (#31)", ""),
        ("lib/util.js", files["lib/util.js"] + "const SOME = [];\n", "✨ Handle null input in the loop helper", ""),
    ]
    for path, text, message, _ in plan:
        _commit(repo, path, text, message)
    return {message: rule for _, _, message, rule in plan}


@pytest.mark.ray
def test_funnel_on_a_mined_repository(tmp_path: Path, shared_dir: Path, ray_local) -> None:
    from octoray.config import load_config
    from octoray.data import filtering, mining
    from octoray.modeling import load_tokenizer, train_bpe_tokenizer

    expected = _build_repo(tmp_path / "repo", shared_dir)
    commits = mining.run(load_config(mining.MineConfig, None, ["allow_unlicensed=true", "chunk_commits=8", "progress=false"],
                                     values={"sources": [str(tmp_path / "repo")], "out": str(tmp_path / "commits")}))
    mined = pa.concat_tables([pq.read_table(p) for p in sorted(commits.glob("data/*.parquet"))])
    assert sorted(mined.column("subject").to_pylist()) == sorted(expected)  # every planned commit was mined
    assert len(list(commits.glob("data/*.parquet"))) == 2

    # A tiny byte-level BPE tokenizer, saved and loaded back like a hub model.
    tok_dir = tmp_path / "tok"
    train_bpe_tokenizer(mined.column("old_contents").to_pylist() * 2, vocab_size=512).save_pretrained(tok_dir)
    tok = load_tokenizer(str(tok_dir))
    lengths = {r["subject"]: len(tok(r["old_contents"] + tok.eos_token + r["new_contents"],
                                     add_special_tokens=False)["input_ids"]) for r in mined.to_pylist()}
    assert lengths["Change the default value of the flag"] < 50
    assert all(50 <= lengths[m] <= 768 for m, rule in expected.items() if rule in ("", "decontam", "second_pass"))

    oasst = tmp_path / "oasst.jsonl"
    oasst.write_text('{"input": "What is Ray?", "output": "A framework."}\n{"input": "Hi", "output": "Hello"}\n')
    cfg = load_config(FilterConfig, None, [f"model={tok_dir}", f"humanevalpack_dir={shared_dir / 'humanevalpack'}",
                                           f"oasst_file={oasst}", "oasst_limit=1", "progress=false"],
                      values={"commits": str(commits), "out": str(tmp_path / "sft")})
    out = filtering.run(cfg)

    stats = json.loads((out / "stats.json").read_text())
    order = list(FUNNEL_KEYS)
    assert list(stats["funnel"]) == order
    n = len(expected)
    dropped_by = {rule: sum(r == rule for r in expected.values()) for rule in rules.RULES}
    left, want = n, {"input": n}
    for rule in rules.RULES:
        left -= dropped_by[rule]
        want[rule] = left
    assert stats["funnel"] == want
    assert stats["funnel_by_language"]["JavaScript"]["decontam"] == 2
    assert stats["rows"] == 5 and stats["oasst_rows"] == 1
    assert stats["subject_normalisation"] == {"pr_suffix": "strip", "emoji_prefix": "strip", "rescued": 2,
                                              "rescued_by_language": {"JavaScript": 1, "Python": 1}}

    files = json.loads((out / "manifest.json").read_text())["files"]
    table = pa.concat_tables([pq.read_table(out / f) for f in files])
    by_source = {s: table.filter(pa.compute.equal(table.column("source"), s)) for s in ("commitpackft", "oasst")}
    assert sorted(by_source["commitpackft"].column("subject").to_pylist()) == sorted(
        reference_normalise(m, True, True) for m, rule in expected.items() if rule == "")
    assert "Add jitter to the retry delay" in by_source["commitpackft"].column("subject").to_pylist()
    row = by_source["commitpackft"].to_pylist()[0]
    assert row["prompt"] == f"Question: {row['subject']}\n{row['old_contents']}\n\nAnswer:\n"
    assert row["completion"] == row["new_contents"]
    assert by_source["oasst"].to_pylist()[0]["prompt"] == "Question: What is Ray?\n\nAnswer:\n"
    _check_hub_folder(out, tmp_path / "hf")

    # octoray 0.1's flat commits/ layout (shards beside manifest.json) is read as well.
    legacy = tmp_path / "commits_v01"
    legacy.mkdir()
    mine_manifest = json.loads((commits / "manifest.json").read_text())
    flat = [f"commits-{i:05d}.parquet" for i in range(len(mine_manifest["files"]))]
    for new, old in zip(mine_manifest["files"], flat):
        (legacy / old).write_bytes((commits / new).read_bytes())
    (legacy / "manifest.json").write_text(json.dumps({**mine_manifest, "files": flat}))
    from_legacy = filtering.run(dataclasses.replace(cfg, commits=str(legacy), out=str(tmp_path / "sft_v01")))
    assert json.loads((from_legacy / "stats.json").read_text()) == stats
    assert _sft_rows(from_legacy) == _sft_rows(out)

    # Rerun on a complete output: nothing to do (no Ray needed, so through the CLI).
    again = run_cli("filter", commits, "--out", out, f"model={tok_dir}", f"oasst_file={oasst}", "oasst_limit=1",
                    f"humanevalpack_dir={shared_dir / 'humanevalpack'}", "progress=false")
    assert again.returncode == 0 and "nothing to do" in again.stdout

    # A partial output resumes: only the shard without its funnel sidecar is filtered again.
    first, second = sorted(p.name for p in commits.glob("data/*.parquet"))
    (out / "manifest.json").unlink()
    (out / "_funnel" / f"{second}.json").unlink()
    kept_mtime = (out / "_funnel" / f"{first}.json").stat().st_mtime_ns
    filtering.run(cfg)
    assert (out / "_funnel" / f"{first}.json").stat().st_mtime_ns == kept_mtime
    assert json.loads((out / "stats.json").read_text()) == stats

    # The paper's rules as published: '#' (rule 2) and the emoji (rule 7) drop the two again.
    paper = filtering.run(dataclasses.replace(cfg, out=str(tmp_path / "sft_paper"), pr_suffix="keep",
                                              emoji_prefix="keep"))
    paper_stats = json.loads((paper / "stats.json").read_text())
    assert paper_stats["funnel"]["no_hash"] == stats["funnel"]["no_hash"] - 1
    assert paper_stats["funnel"]["capitalized"] == stats["funnel"]["capitalized"] - 2
    assert paper_stats["commitpackft_rows"] == stats["commitpackft_rows"] - stats["subject_normalisation"]["rescued"]
    assert paper_stats["subject_normalisation"]["rescued"] == 0
