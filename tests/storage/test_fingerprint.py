"""Content fingerprints (octoray.storage.fingerprint) and the stale check they drive (octoray.resumable)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from octoray.resumable import StageRun
from octoray.storage.fingerprint import fingerprint, file_digest
from octoray.storage.lineage import chain
from octoray.storage.locations import location
from octoray.storage.stage_dirs import input_record, read_manifest


@dataclass(frozen=True)
class Settings:
    """A stage's config (any dataclass: the manifest records it)."""

    k: int = 1


def _stage(tmp: Path, name: str, shard: bytes, inputs: dict | None = None) -> dict:
    out = tmp / name
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "data" / "train-00000-of-00001.parquet").write_bytes(shard)
    stage = StageRun(name, out, Settings(1), inputs=inputs or {})
    return stage.finish(rows=1, files=["data/train-00000-of-00001.parquet"])


def test_local_fingerprint_is_over_the_bytes_and_names(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.bin").write_bytes(b"weights")
    (tmp_path / "model" / "README.md").write_text("card")  # not content: rewritten after eval
    assert file_digest(tmp_path / "model" / "w.bin") == "sha256:" + hashlib.sha256(b"weights").hexdigest()
    before = fingerprint(tmp_path, ["model"])
    (tmp_path / "model" / "README.md").write_text("card with results")
    assert fingerprint(tmp_path, ["model"]) == before
    (tmp_path / "model" / "w.bin").write_bytes(b"weights2")
    assert fingerprint(tmp_path, ["model"]) != before


def test_object_store_fingerprint_uses_etags(s3_server) -> None:
    bucket = s3_server.bucket()
    out = location(f"s3://{bucket}/run/commits")
    (out / "a.parquet").write_bytes(b"one")
    digest = file_digest(out / "a.parquet")
    assert digest.startswith("etag:") and digest.endswith(":3")  # from the HEAD, no download
    first = fingerprint(out, ["a.parquet"])
    (out / "a.parquet").write_bytes(b"two")
    assert fingerprint(out, ["a.parquet"]) != first


def test_a_changed_input_makes_a_complete_stage_stale(tmp_path: Path, capsys) -> None:
    commits = _stage(tmp_path, "mine", b"rows v1")
    sft = _stage(tmp_path, "filter", b"sft", inputs={"commits": input_record(tmp_path / "mine", commits)})
    assert sft["inputs"]["commits"]["fingerprint"] == commits["fingerprint"] != sft["fingerprint"]

    same = StageRun("filter", tmp_path / "filter", Settings(1), inputs={"commits": input_record(tmp_path / "mine", commits)})
    assert same.reusable(same=lambda previous: True)
    assert "already complete" in capsys.readouterr().out

    remined = _stage(tmp_path, "mine", b"rows v2")
    stale = StageRun("filter", tmp_path / "filter", Settings(1), inputs={"commits": input_record(tmp_path / "mine", remined)})
    assert not stale.reusable(same=lambda previous: True)
    assert stale.stale and stale.stale.startswith("input commits changed: fingerprint ")
    assert "is complete but stale (input commits changed" in capsys.readouterr().out
    settings = StageRun("filter", tmp_path / "filter", Settings(2), inputs={"commits": input_record(tmp_path / "mine", commits)})
    assert not settings.reusable(same=lambda previous: "the filter config changed")
    assert settings.stale == "the filter config changed"

    # Lineage marks the link whose input was rewritten after it was read.
    links = chain(tmp_path / "filter")
    assert [link["stage"] for link in links] == ["filter", "mine"]
    assert "changed" in links[1] and remined["fingerprint"] in links[1]["changed"]
    assert read_manifest(tmp_path / "mine")["fingerprint"] == remined["fingerprint"]
    assert json.loads((tmp_path / "filter" / "manifest.json").read_text())["fingerprint"] == sft["fingerprint"]
