"""``octoray mine``: git repositories -> CommitPack rows, on Ray Data.

Pipeline (each step streams; no git process per commit):

1. *Plan* (Ray Data, one task per repository): clone URLs bare (partial clone, blobs over the
   size cap left behind), detect the license at the mined head, list non-merge commits with
   ``git rev-list``, and cut the history into chunks of ``chunk_commits`` so one big repository
   still keeps every worker busy.
2. *Mine* (Ray Data, one task per chunk): ``git diff-tree --stdin`` finds single-file in-place
   modifications; ``git cat-file --batch`` streams their commit objects (message rules) and then
   their blobs (size cap, binary, UTF-8, language). Each chunk is written atomically to
   ``OUT/.work/<repo>/part-NNNNN.parquet`` with its drop counts beside it, so a rerun skips it.
3. *Finalize* (driver): deduplicate by commit SHA across repositories (forks are joined in
   ``repos``), publish the shards as ``OUT/data/train-NNNNN-of-NNNNN.parquet`` (a Hub-style dataset
   folder, :mod:`octoray.storage.layout`), then ``stats.json``, the ``README.md`` dataset card and, last,
   ``manifest.json``.

``OUT`` may be a local path, a shared mount or an object-store URI (``s3://bucket/prefix``); on a
multi-node cluster it must be one every node sees. Clones live in ``OUT/.repos`` on a file system,
and in each node's local cache (``~/.cache/octoray/repos``) when ``OUT`` is a URI: git needs a
real directory, and a node that finds no clone makes its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from octoray.cluster.connection import unreserved_ray_data
from octoray.cluster.resources import cluster_capacity, require_feasible
from octoray.data import dataset_card, gitio, repo_identity
from octoray.data.languages import LanguageTable, language_table
from octoray.data.licenses import LICENSE_FILE_NAMES, classify_license
from octoray.data.mine_config import MineConfig
from octoray.errors import UserError
from octoray.progress import progress_bar
from octoray.resumable import StageRun
from octoray.storage import layout
from octoray.storage.locations import Location, ObjectPath, copy_file, location, rmtree, scratch_dir
from octoray.storage.stage_dirs import (STATS, atomic_write_json, atomic_write_text, read_parquet, stage_listing,
                                        write_parquet_atomic)

STAGE = "mine"

#: CommitPack's exact noise messages, lower-cased (commitpack_sql_rules.json).
NOISE_MESSAGES = frozenset({
    "update readme.md", "initial commit", "update", "mirroring from micro.blog.", "update data.json",
    "update data.js", "add files via upload", "update readme", "can't you see i'm updating the time?",
    "pi push", "dummy", "update index.html", "first commit", "create readme.md", "heartbeat update",
    "updated readme", "update log", "test", "no message", "readme", "wip", "updates", "commit",
    "update _config.yaml",
})

#: Drop reasons, in the order mining applies them (stats.json keeps this order).
DROP_RULES = (
    "merge", "no_diff", "not_single_file", "not_modified_in_place", "unknown_language",
    "message_length", "noise_message", "merge_message", "update_filename", "license",
    "missing_object", "too_large", "binary", "not_utf8", "duplicate",
)

COLUMNS = ("commit", "old_file", "new_file", "old_contents", "new_contents", "subject", "message",
           "lang", "license", "repos", "repo", "parent", "author_date")

# git's own binary test: a NUL byte in the first 8000 bytes.
_BINARY_PROBE = 8000
_URL = re.compile(r"^(?:[a-z][a-z0-9+.-]*://|[\w.-]+@[\w.-]+:)", re.IGNORECASE)


#: The command line (octoray.stage_cli): ``octoray mine REPO_OR_URL... --out commits/``.
CONFIG = MineConfig
INPUT = "sources"


@dataclass(frozen=True)
class Source:
    """One repository to mine."""

    spec: str      # as the user gave it (a local path resolved)
    name: str      # its identity within the run (octoray.data.repo_identity): owner/name or a path suffix
    key: str       # unique, file-system safe
    is_url: bool


# ---------------------------------------------------------------------------------------------
# The stage


def run(cfg: MineConfig) -> Location:
    """Mine ``cfg.sources`` into ``cfg.out``; returns the output directory."""
    out = location(cfg.out)
    sources = resolve_sources(cfg.sources)
    language_table(cfg.languages_file)  # fail fast on a bad languages file, before Ray starts
    specs = [s.spec for s in sources]
    stage = StageRun(STAGE, out, cfg, inputs={"sources": specs})
    if stage.reusable(same=lambda previous: _same_sources(previous, sources, cfg)):
        return out
    ray = stage.start()  # before any work: every node must see out
    work = out / ".work"
    require_feasible("mine", [{"CPU": 1}], what="tasks of 1 CPU")
    # One task per CPU the cluster can have: an autoscaling cluster starts with none.
    workers = cfg.workers or max(1, int(min(cluster_capacity("CPU"), 256)))
    compute = ray.data.TaskPoolStrategy(size=workers)

    items = [dataclasses.asdict(s) for s in sources]
    # Each dataset below is one map over git work: no per-operator reservation, so every
    # worker starts at once (octoray.cluster.connection.unreserved_ray_data).
    with unreserved_ray_data():
        plans = list(ray.data.from_items(items, override_num_blocks=len(items))
                     .map(lambda row: _plan_repo(Source(**row), cfg, work), compute=compute).iter_rows())
        chunks = [chunk for plan in plans if not plan.get("error") and not plan.get("done")
                  for chunk in plan["chunks"]]
        repo_stats = {p["key"]: p for p in plans}
        pending = {p["key"]: len(p["chunks"]) for p in plans if not p.get("error") and not p.get("done")}
        chunk_stats: dict[str, list[dict]] = {key: [] for key in pending}

        total = sum(len(c["commits"]) for c in chunks)
        bar = progress_bar(total, desc="mining", unit="commit", enabled=cfg.progress and total > 0)
        if chunks:
            results = ray.data.from_items(chunks, override_num_blocks=len(chunks)).map(
                lambda chunk: _mine_chunk(chunk, cfg, work), compute=compute).iter_rows()
            for result in results:
                bar.update(result["n_commits"])
                key = result["key"]
                chunk_stats[key].append(result)
                pending[key] -= 1
                if pending[key] == 0:
                    repo_stats[key] = _finish_repo(work, repo_stats[key], chunk_stats[key])
        bar.close()

    for key, plan in repo_stats.items():
        if plan.get("done"):
            repo_stats[key] = json.loads((work / key / "done.json").read_text())
    failed = {s["name"]: s["error"] for s in repo_stats.values() if s.get("error")}
    finished = [s for s in repo_stats.values() if not s.get("error")]
    rows, files, duplicates = _finalize(out, work, [s["key"] for s in finished])
    stats = _aggregate_stats(repo_stats.values(), duplicates, rows)
    atomic_write_json(out / STATS, stats)
    card = dataset_card.mine_card(cfg, stats, dataset_card.summarize(out / f for f in files), columns=COLUMNS,
                                  failed=failed)
    atomic_write_text(out / layout.CARD, card)
    # Chunk shards and clones are resume state, as big as the data or bigger: not for the Hub.
    atomic_write_text(out / layout.UPLOAD_IGNORE, ".work/\n.repos/\n")
    # Each repository's identity, source and mined head: where lineage (octoray lineage) ends.
    repos = {name: {k: repo.get(k) for k in ("source", "head", "license", "commits_seen", "kept")}
             for name, repo in stats["repos"].items() if not repo.get("error")}
    manifest = stage.finish(rows=rows, files=files,
                            extra={"sources": specs, "repos": repos, "failed_repos": failed,
                                   "languages": table_source(cfg)})
    _print_summary(stage, stats, failed, manifest["seconds"])
    return out


def _same_sources(previous: dict[str, Any], sources: list[Source], cfg: MineConfig) -> "bool | str":
    """True when a finished output was mined from these sources at their current heads, else why not.

    Local repositories' heads are read here (one ``git rev-parse`` each); a URL's clone is not
    fetched again by a rerun, so its recorded head stands.
    """
    if previous.get("sources") != [s.spec for s in sources]:
        return "the sources changed"
    if previous.get("failed_repos"):
        return "retrying the repositories that failed"
    recorded = previous.get("repos") or {}
    for source in sources:
        if source.is_url:
            continue
        head = _range_id(Path(source.spec), cfg.ref)
        before = (recorded.get(source.name) or {}).get("head")
        if before != head:
            return f"{source.name} is at {(head or 'no commit')[:12]}, mined at {(before or 'none')[:12]}"
    return True


def _range_id(repo: Path, ref: str) -> str | None:
    """The commit mining starts from: ``ref``'s commit (None in an empty repository)."""
    if ref == "HEAD":
        return gitio.head_commit(repo, ref)
    return gitio.git(repo, "rev-parse", "--verify", "--quiet", ref, check=False).decode().strip() or None


def table_source(cfg: MineConfig) -> str:
    """Which language table the run used, for the manifest."""
    return cfg.languages_file or "linguist (go-enry)"


def resolve_sources(specs: Iterable[str]) -> list[Source]:
    """Expand list files, tell URLs from local repositories, and check local paths up front."""
    expanded: list[str] = []
    problems: list[str] = []
    for spec in specs:
        path = Path(spec)
        if not _URL.match(spec) and path.is_file():
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            expanded.extend(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
        else:
            expanded.append(spec)
    specs: list[str] = []
    origins: list[str | None] = []
    for spec in expanded:
        is_url = bool(_URL.match(spec))
        origin = None
        if not is_url:
            path = Path(spec)
            if not path.exists():
                problems.append(f"{spec}: no such path")
                continue
            if gitio.git_dir(path) is None:
                problems.append(f"{spec}: not a git repository")
                continue
            spec = str(path.resolve())
            origin = gitio.git(path, "config", "--get", "remote.origin.url", check=False).decode().strip() or None
        if spec in specs:
            continue
        specs.append(spec)
        origins.append(origin)
    if problems:
        raise UserError("; ".join(problems))
    if not specs:
        raise UserError("no repositories to mine")
    names = repo_identity.assign([repo_identity.candidates(s, o) for s, o in zip(specs, origins)])
    sources: list[Source] = []
    for spec, name in zip(specs, names):
        # The key names the work directory: the identity (readable) and the source (unique).
        digest = hashlib.sha1(f"{spec}\0{name}".encode()).hexdigest()[:10]
        sources.append(Source(spec, name, f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-{digest}", bool(_URL.match(spec))))
    return sources


# ---------------------------------------------------------------------------------------------
# Plan: one task per repository


def _clone_root(cfg: MineConfig, work: Location) -> Path:
    """Where URLs are cloned on this node: ``clone_dir``, ``OUT/.repos``, or a local cache for a URI ``OUT``."""
    if cfg.clone_dir:
        return Path(cfg.clone_dir)
    return scratch_dir(work.parent, "repos") if isinstance(work, ObjectPath) else Path(work.parent) / ".repos"


def _plan_repo(source: Source, cfg: MineConfig, work: Location, clone_root: Path | None = None) -> dict[str, Any]:
    """Clone if needed (into ``clone_root``, default :func:`_clone_root`), detect the license, list
    commits, cut them into chunks."""
    plan: dict[str, Any] = {"key": source.key, "name": source.name, "source": source.spec, "chunks": []}
    try:
        repo = _clone(source, clone_root or _clone_root(cfg, work)) if source.is_url else Path(source.spec)
        head = gitio.head_commit(repo, cfg.ref) if cfg.ref == "HEAD" else None
        range_id = head or _range_id(repo, cfg.ref) or ""
        done = work / source.key / "done.json"
        if done.is_file() and json.loads(done.read_text()).get("head") == range_id:
            return {**plan, "done": True}
        if cfg.ref == "HEAD" and head is None:  # an empty repository: nothing to mine, not an error
            stats = {**plan, "head": None, "license": None, "commits_seen": 0, "merges": 0,
                     "dropped": {}, "kept": 0, "note": "empty repository"}
            atomic_write_json(done, stats)
            return {**plan, "done": True}
        commits = gitio.rev_list(repo, cfg.ref, "--no-merges")
        merges = int(gitio.git(repo, "rev-list", "--merges", "--count", cfg.ref).decode().strip() or 0)
        license_id = _license_at(repo, cfg.ref)
        plan.update(head=range_id, license=license_id, commits_seen=len(commits) + merges, merges=merges,
                    repo=str(repo), partial=_is_partial(repo))
        if not cfg.license_per_commit and not _license_ok(license_id, cfg):
            plan["license_dropped"] = len(commits)
            commits = []
        _reset_stale_work(work / source.key, range_id, cfg)
        size = cfg.chunk_commits
        plan["chunks"] = [
            {"key": source.key, "name": source.name, "repo": str(repo), "license": license_id,
             "partial": plan["partial"], "index": i, "commits": commits[start:start + size],
             "source": dataclasses.asdict(source)}
            for i, start in enumerate(range(0, len(commits), size))
        ]
        if not plan["chunks"]:  # nothing to mine (unlicensed, or only merges): finish now
            plan["chunks"] = [{"key": source.key, "name": source.name, "repo": str(repo),
                               "license": license_id, "partial": False, "index": 0, "commits": []}]
    except (gitio.GitError, OSError, UnicodeDecodeError) as exc:
        plan["error"] = str(exc) or type(exc).__name__
    return plan


def _clone(source: Source, clone_root: Path) -> Path:
    """A bare clone of ``source`` under ``clone_root`` (reused when already there)."""
    dest = clone_root / f"{source.key}.git"
    if gitio.head_commit(dest) is not None:
        return dest
    if dest.exists():
        shutil.rmtree(dest)  # a clone interrupted half-way
    clone_root.mkdir(parents=True, exist_ok=True)
    tmp = clone_root / f".{source.key}.{os.getpid()}.tmp"  # tasks on one node may race
    shutil.rmtree(tmp, ignore_errors=True)
    # Partial clone: blobs over 1 MB (the default size cap) stay on the server. Servers without
    # filter support ignore the flag and send everything.
    proc = subprocess.run(["git", "clone", "--bare", "--quiet", "--filter=blob:limit=1m", source.spec, str(tmp)],
                          capture_output=True, env=gitio.GIT_ENV)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise gitio.GitError(f"clone failed: {lines[-1] if lines else proc.returncode}")
    # Mining never fetches a promised blob lazily (one round trip per blob): with the promisor
    # switched off, a filtered-out blob reads as "missing", which mining counts as too large.
    for key in ("remote.origin.promisor", "extensions.partialclone"):
        subprocess.run(["git", "-C", str(tmp), "config", "--unset", key], capture_output=True)
    subprocess.run(["git", "-C", str(tmp), "config", "octoray.partial", "true"], capture_output=True)
    try:
        os.replace(tmp, dest)
    except OSError:  # another task on this node finished the same clone first
        shutil.rmtree(tmp, ignore_errors=True)
        if gitio.head_commit(dest) is None:
            raise
    return dest


def _is_partial(repo: Path) -> bool:
    return gitio.git(repo, "config", "--get", "octoray.partial", check=False).strip() == b"true"


def _reset_stale_work(repo_work: Location, range_id: str, cfg: MineConfig) -> None:
    """Keep finished chunks only when they were cut from the same history with the same size."""
    plan_file = repo_work / "plan.json"
    expected = {"head": range_id, "chunk_commits": cfg.chunk_commits}
    if plan_file.is_file() and json.loads(plan_file.read_text()) == expected:
        return
    rmtree(repo_work)
    atomic_write_json(plan_file, expected)


def _license_at(repo: Path, rev: str) -> str | None:
    """SPDX id of the first recognised root license file at ``rev``."""
    listing = gitio.git(repo, "ls-tree", "--name-only", rev, check=False).decode("utf-8", "replace").split("\n")
    present = set(listing)
    names = [n for n in LICENSE_FILE_NAMES if n in present]
    if not names:
        return None
    with gitio.CatFile(repo) as cat:
        for _, obj_type, _, content in cat.objects(f"{rev}:{n}" for n in names):
            if obj_type == "blob" and content is not None:
                found = classify_license(content[:200_000].decode("utf-8", "replace"))
                if found:
                    return found
    return None


def _license_ok(license_id: str | None, cfg: MineConfig) -> bool:
    if license_id is None:
        return cfg.allow_unlicensed
    return license_id in cfg.permissive_licenses


# ---------------------------------------------------------------------------------------------
# Mine: one task per chunk of history


def _mine_chunk(chunk: dict[str, Any], cfg: MineConfig, work: Location) -> dict[str, Any]:
    """Mine one chunk into ``.work/<key>/part-NNNNN.parquet``; return its drop counts."""
    part = work / chunk["key"] / f"part-{chunk['index']:05d}.parquet"
    sidecar = part.with_suffix(".json")
    base = {"key": chunk["key"], "index": chunk["index"], "n_commits": len(chunk["commits"])}
    if part.is_file() and sidecar.is_file():
        return {**base, **json.loads(sidecar.read_text())}  # finished by an earlier run
    try:
        source = Source(**chunk["source"]) if chunk.get("source") else None
        if source is not None and source.is_url and chunk["commits"]:
            # With OUT on object storage clones are node-local: this node may not have it yet.
            chunk = {**chunk, "repo": str(_clone(source, _clone_root(cfg, work)))}
        rows, dropped = _mine_commits(chunk, cfg, language_table(cfg.languages_file))
    except (gitio.GitError, OSError) as exc:
        return {**base, "error": str(exc) or type(exc).__name__, "dropped": {}, "kept": 0}
    import pyarrow as pa

    schema = _schema()
    columns = {name: [row[name] for row in rows] for name in schema.names}
    write_parquet_atomic(pa.table(columns, schema=schema), part)
    result = {"dropped": dict(dropped), "kept": len(rows)}
    atomic_write_json(sidecar, result)
    return {**base, **result}


def _mine_commits(chunk: dict[str, Any], cfg: MineConfig, table: LanguageTable) -> tuple[list[dict], Counter]:
    """The CommitPack rows of one chunk's commits, and how many commits each rule dropped.

    Each step streams one git plumbing process over the commits still standing and leaves the
    rest to the next: changed files -> commit messages -> licenses -> blob sizes -> blob contents.
    """
    repo = Path(chunk["repo"])
    dropped: Counter = Counter()
    commits: list[str] = chunk["commits"]
    if not commits:
        return [], dropped
    candidates = _single_file_changes(repo, commits, table, dropped)
    infos = _kept_messages(repo, candidates, cfg, dropped)
    licenses = _licenses(repo, chunk, infos, cfg, dropped)
    contents = _contents(repo, chunk, candidates, infos, cfg, dropped)
    rows = _rows(chunk, candidates, infos, licenses, contents, cfg, table, dropped)
    return rows, dropped


def _single_file_changes(repo: Path, commits: list[str], table: LanguageTable,
                         dropped: Counter) -> dict[str, gitio.FileChange]:
    """Commits that modify exactly one file of a known language in place (blob ids only)."""
    candidates: dict[str, gitio.FileChange] = {}
    with_diff = 0
    for sha, changes in gitio.changed_files(repo, commits):
        with_diff += 1
        if len(changes) != 1:
            dropped["not_single_file"] += 1
        elif changes[0].status != "M":
            dropped["not_modified_in_place"] += 1
        elif table.language_for_path(changes[0].path) is None:
            dropped["unknown_language"] += 1
        else:
            candidates[sha] = changes[0]
    dropped["no_diff"] += len(commits) - with_diff  # root commits, empty commits
    return candidates


def _kept_messages(repo: Path, candidates: dict[str, gitio.FileChange], cfg: MineConfig,
                   dropped: Counter) -> dict[str, gitio.CommitInfo]:
    """The commit objects of ``candidates`` whose messages pass the message rules."""
    infos: dict[str, gitio.CommitInfo] = {}
    with gitio.CatFile(repo) as cat:
        for sha, obj_type, _, raw in cat.objects(candidates):
            if obj_type != "commit" or raw is None:
                dropped["missing_object"] += 1
                continue
            info = gitio.parse_commit(raw)
            reason = _message_drop_reason(info.message, candidates[sha].path, cfg)
            if reason:
                dropped[reason] += 1
            else:
                infos[sha] = info
    return infos


def _licenses(repo: Path, chunk: dict[str, Any], infos: dict[str, gitio.CommitInfo], cfg: MineConfig,
              dropped: Counter) -> dict[str, str | None]:
    """Each kept commit's license: the repository's at the mined head, or (``license_per_commit``)
    its own, dropping those not permitted."""
    licenses = {sha: chunk["license"] for sha in infos}
    if cfg.license_per_commit:
        for sha in list(infos):
            licenses[sha] = _license_at(repo, sha)
            if not _license_ok(licenses[sha], cfg):
                dropped["license"] += 1
                del infos[sha]
    return licenses


def _contents(repo: Path, chunk: dict[str, Any], candidates: dict[str, gitio.FileChange],
              infos: dict[str, gitio.CommitInfo], cfg: MineConfig, dropped: Counter) -> dict[str, bytes]:
    """The old and new blobs of the kept commits, sizes checked first (too large, or never fetched
    by a partial clone: dropped) so no oversized blob is read."""
    blob_ids = {b for sha in infos for b in (candidates[sha].old_blob, candidates[sha].new_blob)}
    sizes: dict[str, int | None] = {}
    with gitio.CatFile(repo, check_only=True) as check:
        for blob, obj_type, size, _ in check.objects(sorted(blob_ids)):
            sizes[blob] = size if obj_type == "blob" else None
    wanted: list[str] = []
    for sha in list(infos):
        change = candidates[sha]
        blob_sizes = (sizes.get(change.old_blob), sizes.get(change.new_blob))
        if None in blob_sizes:
            # In a partial clone, blobs over the clone's size filter were never fetched.
            dropped["too_large" if chunk["partial"] else "missing_object"] += 1
            del infos[sha]
        elif max(blob_sizes) > cfg.max_file_bytes:  # type: ignore[type-var]
            dropped["too_large"] += 1
            del infos[sha]
        else:
            wanted.extend((change.old_blob, change.new_blob))
    contents: dict[str, bytes] = {}
    with gitio.CatFile(repo) as cat:
        for blob, obj_type, _, content in cat.objects(dict.fromkeys(wanted)):
            if obj_type == "blob" and content is not None:
                contents[blob] = content
    return contents


def _rows(chunk: dict[str, Any], candidates: dict[str, gitio.FileChange], infos: dict[str, gitio.CommitInfo],
          licenses: dict[str, str | None], contents: dict[str, bytes], cfg: MineConfig, table: LanguageTable,
          dropped: Counter) -> list[dict[str, Any]]:
    """CommitPack rows of the kept commits whose contents are text in a known language."""
    rows: list[dict[str, Any]] = []
    for sha, info in infos.items():
        change = candidates[sha]
        old, new = contents.get(change.old_blob), contents.get(change.new_blob)
        if old is None or new is None:
            dropped["missing_object"] += 1
            continue
        if b"\0" in old[:_BINARY_PROBE] or b"\0" in new[:_BINARY_PROBE]:
            dropped["binary"] += 1
            continue
        texts = _decode(old, cfg.non_utf8), _decode(new, cfg.non_utf8)
        if None in texts:
            dropped["not_utf8"] += 1
            continue
        lang = table.language_for_path(change.path, new)
        if lang is None:
            dropped["unknown_language"] += 1
            continue
        message = info.message.rstrip()
        rows.append({
            "commit": sha, "old_file": change.path, "new_file": change.path,
            "old_contents": texts[0], "new_contents": texts[1],
            "subject": message.split("\n", 1)[0], "message": message, "lang": lang,
            "license": licenses[sha] or "", "repos": chunk["name"], "repo": chunk["name"],
            "parent": info.parents[0] if info.parents else "", "author_date": info.author_date,
        })
    return rows


def _message_drop_reason(message: str, path: str, cfg: MineConfig) -> str | None:
    """The CommitPack message rule a commit message breaks, or None."""
    text = message.strip()
    if not cfg.min_message_chars < len(text) < cfg.max_message_chars:
        return "message_length"
    lowered = text.lower()
    if lowered in NOISE_MESSAGES:
        return "noise_message"
    if lowered.startswith("merge"):
        return "merge_message"
    if text == f"Update {os.path.basename(path)}":  # GitHub's web-editor default message
        return "update_filename"
    return None


def _decode(data: bytes, rule: str) -> str | None:
    """UTF-8 (a leading BOM dropped); otherwise None, or U+FFFD replacements with rule "replace"."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace") if rule == "replace" else None


def _schema() -> Any:
    import pyarrow as pa

    fields = [(name, pa.string()) for name in COLUMNS if name != "author_date"]
    return pa.schema([*fields, ("author_date", pa.timestamp("s", tz="UTC"))])


# ---------------------------------------------------------------------------------------------
# Finish: per repository, then the whole run


def _finish_repo(work: Location, plan: dict[str, Any], results: list[dict]) -> dict[str, Any]:
    """Sum a repository's chunk counts; mark it done unless a chunk failed."""
    dropped: Counter = Counter()
    for result in results:
        dropped.update(result.get("dropped", {}))
    dropped["merge"] += plan.get("merges", 0)
    dropped["license"] += plan.get("license_dropped", 0)
    stats = {k: plan[k] for k in ("key", "name", "source", "head", "license", "commits_seen", "merges")}
    stats.update(dropped={rule: dropped[rule] for rule in DROP_RULES if dropped[rule]},
                 kept=sum(r.get("kept", 0) for r in results))
    errors = [r["error"] for r in results if r.get("error")]
    if errors:
        return {**stats, "error": errors[0]}
    atomic_write_json(work / plan["key"] / "done.json", stats)
    return stats


def _finalize(out: Location, work: Location, keys: list[str]) -> tuple[int, list[str], int]:
    """Deduplicate every finished repository's rows by commit and publish the output shards.

    Only the small ``commit``/``repo`` columns are read to find duplicates. A chunk shard without
    duplicates or forks is published as it is (a hard link, no rewrite of file contents); only
    shards that lose a duplicate row or gain fork names in ``repos`` are rewritten. Shards are
    named ``data/train-i-of-n`` (:func:`octoray.storage.layout.shard_name`): the count is known here, after
    every chunk is mined. Shards of an earlier finalize that are not in the new list, and shards
    of the legacy flat layout, are removed so the data glob holds exactly the manifest's rows.
    """
    import pyarrow as pa

    parts = [p for key in keys for p in sorted((work / key).glob("part-*.parquet"))]
    seen: set[str] = set()
    holders: dict[str, set[str]] = {}
    part_commits: list[list[str]] = []
    keep_masks: list[list[bool]] = []
    for part in parts:
        meta = read_parquet(part, columns=["commit", "repo"])
        commits = meta["commit"].to_pylist()
        mask = []
        for commit, repo in zip(commits, meta["repo"].to_pylist()):
            holders.setdefault(commit, set()).add(repo)
            mask.append(commit not in seen)
            seen.add(commit)
        part_commits.append(commits)
        keep_masks.append(mask)
    published = [(part, commits, mask) for part, commits, mask in zip(parts, part_commits, keep_masks) if any(mask)]
    names = [layout.shard_name(i, len(published)) for i in range(len(published))] or [layout.shard_name(0, 1)]
    for stale in set(layout.all_shards(stage_listing(out))) - set(names):
        (out / stale).unlink()
    files: list[str] = []
    rows = 0
    for (part, commits, mask), name in zip(published, names):
        forked = any(len(holders[c]) > 1 for c, keep in zip(commits, mask) if keep)
        if all(mask) and not forked:
            _publish(part, out / name)
        else:
            table = read_parquet(part).filter(pa.array(mask))
            repos = [",".join(sorted(holders[c])) for c, keep in zip(commits, mask) if keep]
            table = table.set_column(table.schema.get_field_index("repos"), "repos", pa.array(repos, pa.string()))
            write_parquet_atomic(table, out / name)
        files.append(name)
        rows += sum(mask)
    if not files:  # readers still get a shard with the schema
        write_parquet_atomic(_schema().empty_table(), out / names[0])
        files.append(names[0])
    duplicates = sum(len(m) for m in keep_masks) - rows
    return rows, files, duplicates


def _publish(part: Location, dest: Location) -> None:
    """Put a finished chunk shard into the output without copying its bytes where possible."""
    if isinstance(dest, ObjectPath):  # a server-side copy: the bytes stay in the bucket
        copy_file(part, dest)
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(part, tmp)
    except OSError:  # another file system, or no hard links: copy
        shutil.copyfile(part, tmp)
    os.replace(tmp, dest)


def _aggregate_stats(repos: Iterable[dict[str, Any]], duplicates: int, rows: int) -> dict[str, Any]:
    repos = list(repos)
    dropped: Counter = Counter()
    for repo in repos:
        dropped.update(repo.get("dropped", {}))
    dropped["duplicate"] += duplicates
    return {
        "commits_seen": sum(r.get("commits_seen", 0) for r in repos),
        "kept": rows,
        "dropped": {rule: dropped[rule] for rule in DROP_RULES},
        "repos": {r["name"]: {"commits_seen": 0, "kept": 0, "dropped": {},
                              **{k: v for k, v in r.items() if k != "chunks"}} for r in repos},
    }


def _print_summary(stage: StageRun, stats: dict[str, Any], failed: dict[str, str], seconds: float) -> None:
    n_repos = len(stats["repos"])
    print()
    stage.say(f"mined {n_repos} repositor{'y' if n_repos == 1 else 'ies'} in {seconds:.1f} s -> {stage.out}")
    print(f"  commits seen {stats['commits_seen']:>9,}")
    for rule, count in stats["dropped"].items():
        if count:
            print(f"  - {rule:<22}{count:>9,}")
    print(f"  kept         {stats['kept']:>9,}")
    for name, error in failed.items():
        print(f"  FAILED {name}: {error} (rerun to retry)")
