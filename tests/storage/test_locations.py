"""octoray.storage.locations + octoray.storage.stage_dirs on a real S3-compatible server (moto_server on 127.0.0.1).

What is checked against the server is read back with an independent pyarrow S3 file system
(``S3Server.filesystem()``), not through the code under test.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from octoray.errors import UserError
from octoray.storage import locations as storage
from octoray.storage import stage_dirs as outputs
from octoray.storage.locations import ObjectPath


@dataclass(frozen=True)
class _Cfg:
    shards: int = 1


def test_location_tells_uris_from_paths(tmp_path: Path) -> None:
    assert isinstance(storage.location("s3://bucket/x"), ObjectPath)
    assert isinstance(storage.location("gs://bucket/x/"), ObjectPath)
    assert storage.location(f"file://{tmp_path}") == tmp_path
    assert storage.location(str(tmp_path)) == tmp_path
    assert storage.location("runs/demo") == Path("runs/demo")
    assert not storage.is_uri("C:/x") and not storage.is_uri("runs/x") and storage.is_uri("s3://b/k")


def test_object_path_names() -> None:
    p = ObjectPath("s3://bucket//runs/demo/")
    assert str(p) == "s3://bucket/runs/demo"
    assert str(p / "commits" / "manifest.json") == "s3://bucket/runs/demo/commits/manifest.json"
    q = p / "a" / "part-00001.parquet"
    assert (q.name, q.suffix, q.stem) == ("part-00001.parquet", ".parquet", "part-00001")
    assert str(q.with_suffix(".json")) == "s3://bucket/runs/demo/a/part-00001.json"
    assert str(q.with_name("x")) == "s3://bucket/runs/demo/a/x"
    assert q.parent.parent == p and p.resolve() is p
    assert ObjectPath("s3://bucket").parent == ObjectPath("s3://bucket")
    with pytest.raises(UserError, match="needs a bucket"):
        ObjectPath("s3://")
    import pickle

    assert pickle.loads(pickle.dumps(q)) == q
    assert sorted([p / "b", p / "a"]) == [p / "a", p / "b"]


def test_outputs_round_trip_on_s3(s3_server) -> None:
    bucket = s3_server.bucket()
    out = storage.location(f"s3://{bucket}/runs/demo/commits")
    assert not out.exists() and not out.is_dir() and outputs.read_manifest(out) is None
    with pytest.raises(UserError, match="not found"):
        outputs.require_stage_output(out, "mine", "commits")
    table = pa.table({"commit": ["a", "b"], "n": [1, 2]})
    outputs.write_parquet_atomic(table, out / "data" / "commits-00000.parquet")
    outputs.atomic_write_json(out / "stats.json", {"kept": 2})
    assert out.is_dir() and (out / "stats.json").is_file() and not (out / "data").is_file()
    with pytest.raises(UserError, match="is not an output"):
        outputs.require_stage_output(out, "mine", "commits")
    outputs.write_manifest(out, "mine", _Cfg(), rows=2, files=["data/commits-00000.parquet"], started=0.0)
    assert outputs.is_complete(out, "mine") and not outputs.is_complete(out, "filter")
    assert outputs.require_stage_output(f"s3://{bucket}/runs/demo/commits", "mine", "commits")["rows"] == 2

    # Read back with a file system built independently of octoray.
    fs = s3_server.filesystem()
    assert s3_server.keys(bucket) == ["runs/demo/commits/data/commits-00000.parquet",
                                      "runs/demo/commits/manifest.json", "runs/demo/commits/stats.json"]
    assert pq.read_table(f"{bucket}/runs/demo/commits/data/commits-00000.parquet", filesystem=fs).equals(table)
    with fs.open_input_stream(f"{bucket}/runs/demo/commits/manifest.json") as stream:
        manifest = json.loads(stream.read())
    assert manifest["stage"] == "mine" and manifest["complete"] is True

    assert [p.name for p in out.glob("*.json")] == ["manifest.json", "stats.json"]
    assert [p.name for p in out.rglob("*.parquet")] == ["commits-00000.parquet"]
    assert sorted(p.name for p in out.iterdir()) == ["data", "manifest.json", "stats.json"]
    (out / "stats.json").unlink()
    (out / "stats.json").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError):
        (out / "stats.json").unlink()
    with pytest.raises(UserError, match="missing file"):
        outputs.read_json(out / "stats.json")
    storage.rmtree(out)
    assert s3_server.keys(bucket) == [] and not out.exists()


def test_failed_writes_leave_no_object(s3_server) -> None:
    bucket = s3_server.bucket()
    target = storage.location(f"s3://{bucket}/x/shard.parquet")
    with pytest.raises(Exception):
        outputs.write_parquet_atomic("not a table", target)
    with pytest.raises(RuntimeError):
        with (target.parent / "log.txt").open("w") as handle:
            handle.write("half")
            raise RuntimeError("writer died")
    assert s3_server.keys(bucket) == []
    with (target.parent / "log.txt").open("w") as handle:
        handle.write("whole\n")
    assert (target.parent / "log.txt").read_text() == "whole\n"
    with pytest.raises(OSError, match="cannot append"):
        (target.parent / "log.txt").open("a")


def test_upload_skips_finished_files_and_models_download_once(s3_server, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    bucket = s3_server.bucket()
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"n": 1}')
    (src / "sub" / "weights.bin").write_bytes(b"\0" * 1000)
    dst = storage.location(f"s3://{bucket}/model")
    storage.upload_dir(src, dst)
    assert s3_server.keys(bucket) == ["model/config.json", "model/sub/weights.bin"]
    # A rerun with skip_existing sends only what is missing: prove it by changing a finished
    # file locally (same size) and seeing the bucket keep the old bytes.
    (src / "config.json").write_text('{"n": 2}')
    (src / "extra.txt").write_text("new")
    storage.upload_dir(src, dst, skip_existing=True)
    assert (dst / "config.json").read_text() == '{"n": 1}' and (dst / "extra.txt").read_text() == "new"

    local = Path(storage.local_copy(str(dst)))
    assert (local / "sub" / "weights.bin").stat().st_size == 1000
    assert json.loads((local / "config.json").read_text()) == {"n": 1}
    (dst / "config.json").unlink()  # the cache is per node and per URI: no second download
    assert storage.local_copy(str(dst)) == str(local) and (local / "config.json").is_file()
    assert storage.local_copy("bigcode/starcoder") == "bigcode/starcoder"
    with pytest.raises(UserError, match="no such directory"):
        storage.local_copy(f"s3://{bucket}/nothing-here")


def test_bad_uris_are_one_line_errors(tmp_path: Path) -> None:
    from tests.helpers import run_cli

    with pytest.raises(UserError, match="cannot open"):
        storage.location("nosuchscheme://bucket/x").exists()
    result = run_cli("filter", "s3://", "--out", str(tmp_path / "sft"))
    assert result.returncode == 2 and "needs a bucket" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
