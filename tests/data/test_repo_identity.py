"""Repository identity (octoray.data.repo_identity): many sources with one directory name, forks.

Seven real repositories mirrored as ``<owner+name>/repo`` (the layout ``git clone --mirror``
scripts produce) and a fork pair cloned as ``alice/project`` and ``bob/project``, mined in one run.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from octoray.data import mining, repo_identity
from tests.helpers import run_cli
from tests.helpers.gitrepo import GPL3, MIT, GitRepo

#: owner+name, its hosted remote (None: a local mirror without one), its license, its kept commits.
MIRRORS = [
    ("acme+parser", "https://github.com/acme/parser.git", MIT, 3),
    ("acme+lexer", "git@github.com:acme/lexer.git", MIT, 2),
    ("zeta+util", None, MIT, 4),
    ("zeta+cli", None, MIT, 1),
    ("omega+gpl", None, GPL3, 3),            # GPL: every commit dropped by the license rule
    ("gitlab+parser", "https://gitlab.com/acme/parser", MIT, 2),  # same owner/name as acme+parser
    ("solo+tool", None, MIT, 2),
]


def _mirror(root: Path, dirname: str, remote: str | None, license_text: str, kept: int) -> Path:
    repo = GitRepo(root / dirname / "repo")
    repo.commit(f"Start {dirname}", {"LICENSE": license_text, "m.py": "v = 0\n"})
    for i in range(1, kept + 1):
        repo.commit(f"Set the value of {dirname} to {i}", {"m.py": f"v = {i}  # {dirname}\n"})
    if remote:
        repo.git("remote", "add", "origin", remote)
    return repo.path


def _forks(root: Path) -> tuple[Path, Path]:
    alice = GitRepo(root / "alice" / "project")
    alice.commit("Start the shared project", {"LICENSE": MIT, "p.py": "p = 0\n"})
    alice.commit("Change the shared value to one", {"p.py": "p = 1\n"})  # in both forks
    bob = root / "bob" / "project"
    subprocess.run(["git", "clone", "-q", str(alice.path), str(bob)], check=True)
    alice.commit("Change the value on alice's side", {"p.py": "p = 2\n"})
    fork = GitRepo(bob)  # re-initialising a clone keeps its history
    fork.commit("Change the value on bob's side", {"p.py": "p = 3\n"})
    return alice.path, bob


def test_identities_from_remotes_and_shortest_path_suffixes() -> None:
    options = [repo_identity.candidates(spec, origin) for spec, origin in [
        ("/m/acme+parser/repo", "https://github.com/acme/parser.git"),
        ("/m/zeta+util/repo", None),
        ("/m/zeta+cli/repo", None),
        ("/w/alice/project", "/w/elsewhere/project"),  # a local remote names nothing more
        ("/w/bob/project", None),
        ("https://gitlab.com/acme/parser", None),
        ("git@github.com:bigcode/octopack.git", None),
        ("/w/solo", None),
        ("file:///w/solo", None),                      # the same directory again
    ]]
    assert repo_identity.assign(options) == [
        "github.com/acme/parser", "zeta+util/repo", "zeta+cli/repo", "alice/project", "bob/project",
        "gitlab.com/acme/parser", "bigcode/octopack", "solo", "solo#2"]
    assert repo_identity.hosted("file:///srv/a/b.git") is None
    assert repo_identity.hosted("ssh://git@host:2222/team/sub/name.git") == ("host", "sub/name")


def test_resolve_sources_reads_remote_origin(tmp_path: Path) -> None:
    paths = [_mirror(tmp_path, d, r, lic, n) for d, r, lic, n in MIRRORS[:3]]
    sources = mining.resolve_sources([str(p) for p in paths])
    assert [s.name for s in sources] == ["acme/parser", "acme/lexer", "zeta+util/repo"]
    assert [s.spec for s in sources] == [str(p.resolve()) for p in paths]  # the path kept beside it
    assert len({s.key for s in sources}) == 3


@pytest.mark.ray
def test_seven_mirrors_named_repo_and_a_fork_pair_in_one_run(tmp_path: Path) -> None:
    root = tmp_path / "mirrors"
    paths = [_mirror(root, *spec) for spec in MIRRORS]
    alice, bob = _forks(tmp_path / "forks")
    listing = tmp_path / "sources.txt"
    listing.write_text("".join(f"{p}\n" for p in [*paths, alice, bob]))
    out = tmp_path / "commits"
    result = run_cli("mine", listing, "--out", out, "workers=2", "progress=false")
    assert result.returncode == 0, result.stderr
    assert "mined 9 repositories" in result.stdout

    expected_names = ["github.com/acme/parser", "acme/lexer", "zeta+util/repo", "zeta+cli/repo", "omega+gpl/repo",
                      "gitlab.com/acme/parser", "solo+tool/repo"]
    stats = json.loads((out / "stats.json").read_text())
    assert sorted(stats["repos"]) == sorted([*expected_names, "alice/project", "bob/project"])
    for name, path, (_, _, license_text, kept) in zip(expected_names, paths, MIRRORS):
        entry = stats["repos"][name]
        assert entry["source"] == str(path.resolve())
        # An independent count: every commit after the first changes m.py in place.
        assert entry["kept"] == (0 if license_text is GPL3 else kept), name
        assert entry["license"] == ("gpl-3.0" if license_text is GPL3 else "mit")
    manifest = json.loads((out / "manifest.json").read_text())
    rows = [r for f in manifest["files"] for r in pq.read_table(out / f).to_pylist()]
    by_repo: dict[str, int] = {}
    for row in rows:
        by_repo[row["repo"]] = by_repo.get(row["repo"], 0) + 1
    forks = {name: by_repo.pop(name) for name in ("alice/project", "bob/project")}
    assert by_repo == {n: k for n, (_, _, lic, k) in zip(expected_names, MIRRORS) if lic is not GPL3}
    assert sum(forks.values()) == 3  # alice's side, bob's side, and the shared commit once
    assert stats["dropped"]["duplicate"] == 1
    shared = next(r for r in rows if r["subject"] == "Change the shared value to one")
    assert shared["repos"] == "alice/project,bob/project"  # the fork pair joined
    assert {r["repos"] for r in rows if r["subject"] != shared["subject"]} == {r["repo"] for r in rows
                                                                              if r["subject"] != shared["subject"]}
    card = (out / "README.md").read_text()
    for name, path, (_, _, license_text, _) in zip(expected_names, paths, MIRRORS):
        lic = "gpl-3.0" if license_text is GPL3 else "mit"
        assert f"| {name} | {path.resolve()} | {lic} |" in card
