"""``octoray mine`` on real git repositories: every CommitPack rule and every bad input."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from octoray.config import load_config
from octoray.data import mining
from octoray.data.languages import LINGUIST, load_languages_file
from octoray.data.licenses import classify_license
from octoray.errors import UserError
from tests.helpers import REPO_ROOT, run_cli
from tests.helpers.gitrepo import GPL3, KEPT_SUBJECTS, MIT, GitRepo, build_rules_repo

EXPECTED_DROPS = {
    "merge": 1, "no_diff": 2, "not_single_file": 2, "not_modified_in_place": 2, "unknown_language": 1,
    "message_length": 1, "noise_message": 1, "merge_message": 1, "update_filename": 1, "binary": 1,
    "not_utf8": 1, "too_large": 1,
}
SEEN = 18


@pytest.fixture(scope="module")
def rules_repo(tmp_path_factory: pytest.TempPathFactory) -> GitRepo:
    return build_rules_repo(tmp_path_factory.mktemp("rules") / "rules")


def _mine_without_ray(repo: Path, tmp: Path, **overrides: object) -> tuple[dict, list[dict]]:
    cfg = load_config(mining.MineConfig, None, [f"{k}={v}" for k, v in overrides.items()],
                      values={"sources": [str(repo)], "out": str(tmp)})
    source = mining.resolve_sources(cfg.sources)[0]
    plan = mining._plan_repo(source, cfg, tmp / ".work", tmp / ".repos")
    results = [mining._mine_chunk(chunk, cfg, tmp / ".work") for chunk in plan["chunks"]]
    stats = mining._finish_repo(tmp / ".work", plan, results)
    rows = [row for key in [source.key] for p in sorted((tmp / ".work" / key).glob("part-*.parquet"))
            for row in pq.read_table(p).to_pylist()]
    return stats, rows


def test_every_rule_counts_and_keeps_the_right_commits(rules_repo: GitRepo, tmp_path: Path) -> None:
    stats, rows = _mine_without_ray(rules_repo.path, tmp_path, max_file_bytes=1000)
    assert stats["commits_seen"] == SEEN
    assert stats["dropped"] == EXPECTED_DROPS
    assert stats["kept"] == 3 == SEEN - sum(EXPECTED_DROPS.values())
    assert {r["subject"] for r in rows} == KEPT_SUBJECTS
    first = next(r for r in rows if r["subject"].startswith("Fix off-by-one"))
    assert first["message"] == "Fix off-by-one error in parser loop\n\nThe loop ran one step too far."
    assert (first["old_contents"], first["new_contents"], first["lang"], first["license"]) == ("x = 1\n", "x = 2\n", "Python", "mit")
    assert first["old_file"] == first["new_file"] == "a.py" and len(first["parent"]) == 40
    assert next(r for r in rows if r["old_file"] == "main.rs")["lang"] == "Rust"


def test_replace_rule_keeps_non_utf8_text(rules_repo: GitRepo, tmp_path: Path) -> None:
    stats, rows = _mine_without_ray(rules_repo.path, tmp_path, max_file_bytes=1000, non_utf8="replace")
    assert "not_utf8" not in stats["dropped"]
    assert "\ufffd" in next(r for r in rows if r["old_file"] == "latin.py")["new_contents"]


def test_small_chunks_give_the_same_result(rules_repo: GitRepo, tmp_path: Path) -> None:
    stats, rows = _mine_without_ray(rules_repo.path, tmp_path, max_file_bytes=1000, chunk_commits=3)
    assert stats["dropped"] == EXPECTED_DROPS and len(rows) == 3


def test_license_rules(tmp_path: Path) -> None:
    gpl = GitRepo(tmp_path / "gpl")
    gpl.commit("Start the project", {"LICENSE": GPL3, "a.py": "a = 1\n"})
    gpl.commit("Fix the value of a", {"a.py": "a = 2\n"})
    stats, rows = _mine_without_ray(gpl.path, tmp_path / "o1")
    assert stats["license"] == "gpl-3.0" and stats["dropped"]["license"] == 2 and rows == []
    bare = GitRepo(tmp_path / "nolicense")
    bare.commit("Start the project", {"a.py": "a = 1\n"})
    bare.commit("Fix the value of a", {"a.py": "a = 2\n"})
    assert _mine_without_ray(bare.path, tmp_path / "o2")[0]["kept"] == 0
    assert _mine_without_ray(bare.path, tmp_path / "o3", allow_unlicensed="true")[0]["kept"] == 1


def test_license_per_commit(tmp_path: Path) -> None:
    repo = GitRepo(tmp_path / "relicensed")
    repo.commit("Start under the GPL", {"LICENSE": GPL3, "a.py": "a = 1\n"})
    repo.commit("Fix the value of a", {"a.py": "a = 2\n"})
    repo.commit("Relicense the project to MIT", {"LICENSE": MIT})
    repo.commit("Fix the value of a again", {"a.py": "a = 3\n"})
    at_head = _mine_without_ray(repo.path, tmp_path / "o1")[1]
    per_commit = _mine_without_ray(repo.path, tmp_path / "o2", license_per_commit="true")[1]
    # Linguist knows LICENSE as Text, so the relicensing commit itself is a (prose) row too.
    assert {r["subject"] for r in at_head} == {"Fix the value of a", "Relicense the project to MIT",
                                               "Fix the value of a again"}
    assert {r["subject"] for r in per_commit} == {"Relicense the project to MIT", "Fix the value of a again"}


@pytest.mark.parametrize(("message", "reason"), [
    ("Fix", "message_length"), ("x" * 10_000, "message_length"), ("Update README", "noise_message"),
    ("  First Commit \n", "noise_message"), ("Merged the thing", "merge_message"), ("Update a.py", "update_filename"),
    ("Update a.py to fix the bug", None), ("Fix the parser", None),
])
def test_message_rules(message: str, reason: str | None) -> None:
    assert mining._message_drop_reason(message, "src/a.py", mining.MineConfig()) == reason


def test_license_classifier() -> None:
    assert classify_license(MIT) == "mit"
    assert classify_license(GPL3) == "gpl-3.0"
    assert classify_license("SPDX-License-Identifier: Apache-2.0\n") == "apache-2.0"
    assert classify_license("All rights reserved.") is None


def test_language_tables(shared_dir: Path) -> None:
    original = load_languages_file(shared_dir / "commitpack" / "programming_languages.json")
    assert original.language_for_path("src/x.C") == "C++" and original.language_for_path("x.c") == "C"
    assert original.language_for_path("Makefile") == "Makefile" and original.language_for_path("x.nope") is None
    assert LINGUIST.language_for_path("lib.rs", b"fn main() {}\n") == "Rust"
    assert ".py" in LINGUIST.extensions_for("Python")


def test_bad_sources_are_all_reported(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError) as err:
        mining.resolve_sources([str(tmp_path / "missing"), str(tmp_path / "plain")])
    assert "no such path" in str(err.value) and "not a git repository" in str(err.value)


def test_list_file_and_urls(tmp_path: Path, rules_repo: GitRepo) -> None:
    listing = tmp_path / "repos.txt"
    listing.write_text(f"# my repos\n{rules_repo.path}\nhttps://github.com/bigcode/octopack.git\n\n")
    sources = mining.resolve_sources([str(listing)])
    assert [s.name for s in sources] == ["rules", "bigcode/octopack"]
    assert [s.is_url for s in sources] == [False, True]


# ---------------------------------------------------------------------------------------------
# Through the CLI and Ray


def _stats(out: Path) -> dict:
    return json.loads((out / "stats.json").read_text())


@pytest.mark.ray
def test_cli_end_to_end_forks_resume_and_bad_repos(tmp_path: Path, rules_repo: GitRepo) -> None:
    fork = tmp_path / "fork"
    subprocess.run(["git", "clone", "-q", str(rules_repo.path), str(fork)], check=True)
    shallow = tmp_path / "shallow"
    subprocess.run(["git", "clone", "-q", "--depth", "2", f"file://{rules_repo.path}", str(shallow)], check=True)
    empty = GitRepo(tmp_path / "empty")
    broken = tmp_path / "broken"
    subprocess.run(["git", "clone", "-q", "--bare", str(rules_repo.path), str(broken)], check=True)
    blob = subprocess.run(["git", "-C", str(rules_repo.path), "rev-parse", "HEAD:main.rs"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (broken / "objects" / blob[:2] / blob[2:]).unlink()  # a corrupt repository: a blob is gone
    out = tmp_path / "commits"
    sources = [rules_repo.path, fork, f"file://{rules_repo.path}", shallow, empty.path, broken,
               "file:///nonexistent/repo.git"]
    result = run_cli("mine", *sources, "--out", out, "max_file_bytes=1000", "chunk_commits=5", "workers=2")
    assert result.returncode == 0, result.stderr
    assert "kept" in result.stdout and "Traceback" not in result.stderr

    stats = _stats(out)
    manifest = json.loads((out / "manifest.json").read_text())
    rows = [r for f in manifest["files"] for r in pq.read_table(out / f).to_pylist()]
    assert list(rows[0]) == list(mining.COLUMNS)
    assert {r["subject"] for r in rows} == KEPT_SUBJECTS  # every fork's copy deduplicated
    joined = next(r for r in rows if r["subject"].startswith("Fix off-by-one"))["repos"].split(",")
    # One identity per source: the path and the file:// URL of one directory are "rules" and "rules#2".
    assert sorted(joined) == ["broken", "fork", "rules", "rules#2"]
    per_repo = stats["repos"]
    assert per_repo["empty"]["commits_seen"] == 0
    assert per_repo["shallow"]["commits_seen"] == 2
    assert per_repo["broken"]["dropped"]["missing_object"] == 1 and per_repo["broken"]["kept"] == 2
    assert stats["dropped"]["duplicate"] == sum(r["kept"] for r in per_repo.values()) - 3
    assert manifest["complete"] and manifest["rows"] == 3
    assert list(manifest["failed_repos"]) == ["repo"]  # one bad repository sinks nothing
    assert "FAILED repo" in result.stdout

    # A rerun retries only the failed repository; the finished ones' shards are not rewritten.
    parts = {p: p.stat().st_mtime_ns for p in (out / ".work").rglob("part-*.parquet")}
    redo = run_cli("mine", *sources, "--out", out, "max_file_bytes=1000", "chunk_commits=5")
    assert redo.returncode == 0, redo.stderr
    assert "already complete" not in redo.stdout
    assert {p: p.stat().st_mtime_ns for p in (out / ".work").rglob("part-*.parquet")} == parts
    assert _stats(out)["kept"] == 3


@pytest.mark.ray
def test_own_history_matches_git_log(tmp_path: Path) -> None:
    """Mine this project's history; check the counts against an independent git log pass."""
    if not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = tmp_path / "own"
    result = run_cli("mine", REPO_ROOT, "--out", out, "allow_unlicensed=true")
    assert result.returncode == 0, result.stderr
    stats = _stats(out)["repos"]["main" if REPO_ROOT.name == "main" else REPO_ROOT.name]
    log = subprocess.run(["git", "-C", str(REPO_ROOT), "log", "--no-merges", "--no-renames", "--format=@%H",
                          "--name-status"], capture_output=True, text=True, check=True).stdout
    commits = [[line for line in block.splitlines() if line.strip()] for block in log.split("@") if block.strip()]
    single_modified = sum(1 for c in commits if len(c) == 2 and c[1].startswith("M\t"))
    merges = int(subprocess.run(["git", "-C", str(REPO_ROOT), "rev-list", "--merges", "--count", "HEAD"],
                                capture_output=True, text=True, check=True).stdout)
    dropped = stats["dropped"]
    assert stats["commits_seen"] == len(commits) + merges
    structural = sum(dropped.get(k, 0) for k in ("merge", "no_diff", "not_single_file", "not_modified_in_place"))
    assert stats["commits_seen"] - structural == single_modified
    again = run_cli("mine", REPO_ROOT, "--out", out, "allow_unlicensed=true")
    assert again.returncode == 0 and "already complete" in again.stdout


def _card_header(stage_dir: Path) -> dict:
    text = (stage_dir / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


@pytest.mark.ray
def test_output_is_a_hub_dataset_folder(tmp_path: Path, rules_repo: GitRepo, ray_local) -> None:
    """``datasets.load_dataset(DIR)`` and ``pandas.read_parquet(DIR/data)`` give exactly the manifest's rows."""
    import datasets
    import pandas as pd

    out = tmp_path / "commits"

    def mine(*sources: Path) -> dict:
        mining.run(load_config(mining.MineConfig, None, ["max_file_bytes=1000", "chunk_commits=5", "progress=false"],
                               values={"sources": [str(s) for s in sources], "out": str(out)}))
        return json.loads((out / "manifest.json").read_text())

    manifest = mine(rules_repo.path)
    n = len(manifest["files"])
    assert n == 2 and manifest["files"] == [f"data/train-{i:05d}-of-{n:05d}.parquet" for i in range(n)]
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == manifest["rows"] == 3 and ds.column_names == list(mining.COLUMNS)
    assert set(ds["subject"]) == KEPT_SUBJECTS
    frame = pd.read_parquet(out / "data")
    assert len(frame) == manifest["rows"] and list(frame.columns) == list(mining.COLUMNS)

    meta = _card_header(out)
    (declared,) = meta["configs"][0]["data_files"]
    assert declared["split"] == "train"
    assert sorted(p.relative_to(out).as_posix() for p in out.glob(declared["path"])) == manifest["files"]
    assert meta["license"] == "mit" and meta["size_categories"] == ["n<1K"] and "code" in meta["language"]
    card = (out / "README.md").read_text()
    assert "| rules |" in card and "| binary | 4 | 1 |" in card and "| Python | 2 |" in card
    assert (out / ".gitignore").read_text().split() == [".work/", ".repos/"]

    # Mined again with another repository, the shard count changes: shards of the earlier count
    # and of octoray 0.1's flat layout are gone, so the data glob holds exactly the new rows.
    (out / "commits-00000.parquet").write_bytes((out / manifest["files"][0]).read_bytes())
    other = GitRepo(tmp_path / "other")
    other.commit("Start the other project", {"LICENSE": MIT, "o.py": "o = 1\n"})
    for i in range(2, 8):
        other.commit(f"Change the value of o to {i}", {"o.py": f"o = {i}\n"})
    manifest = mine(rules_repo.path, other.path)
    assert manifest["rows"] == 9 and len(manifest["files"]) == 4
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet") if ".work" not in p.parts) == \
        manifest["files"]
    assert len(datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf2"))) == 9


def test_not_a_repository_is_one_line(tmp_path: Path) -> None:
    result = run_cli("mine", tmp_path, "--out", tmp_path / "o")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "not a git repository" in result.stderr


def test_bad_option_is_one_line(tmp_path: Path) -> None:
    result = run_cli("mine", ".", "--out", tmp_path / "o", "chunk_comits=5", "workers=-1")
    assert result.returncode == 2
    assert "did you mean 'chunk_commits'" in result.stderr and "workers must be >= 0" in result.stderr


def test_unreserved_ray_data_is_scoped() -> None:
    import ray.data

    from octoray.cluster.connection import unreserved_ray_data

    ctx = ray.data.DataContext.get_current()
    before = ctx.op_resource_reservation_enabled
    with unreserved_ray_data():
        assert ray.data.DataContext.get_current().op_resource_reservation_enabled is False
    assert ctx.op_resource_reservation_enabled == before
