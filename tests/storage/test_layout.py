"""Data stage directories as Hub-style dataset folders: shard names, old/new layout detection,
the dataset card, and octoray's readers on both layouts (fast: no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from octoray.data import dataset_card
from octoray.data.mining import MineConfig
from octoray.storage import layout
from octoray.storage.stage_dirs import stage_listing, write_manifest, write_parquet_atomic
from tests.helpers.sft import write_sft


def test_shard_names_are_the_hubs_and_sort_in_order() -> None:
    names = [layout.shard_name(i, 12) for i in range(12)]
    assert names[0] == "data/train-00000-of-00012.parquet" and names == sorted(names)
    assert all(layout.is_data_file(n) and not layout.is_legacy_data_file(n) for n in names)
    with pytest.raises(ValueError):
        layout.shard_name(3, 3)


def test_datasets_infers_the_split_from_the_shard_names(tmp_path: Path) -> None:
    """Even without the card, ``datasets`` finds our shards and puts them in the train split."""
    from datasets.data_files import get_data_patterns

    for i in range(2):
        (tmp_path / layout.shard_name(i, 2)).parent.mkdir(exist_ok=True)
        (tmp_path / layout.shard_name(i, 2)).write_bytes(b"")
    (tmp_path / "manifest.json").write_text("{}")
    patterns = get_data_patterns(str(tmp_path))
    assert list(patterns) == ["train"] and patterns["train"][0].startswith("data/train-")


@pytest.mark.parametrize(("name", "current", "legacy"), [
    ("data/train-00000-of-00001.parquet", True, False),
    ("commits-00000.parquet", False, True),
    ("oasst.parquet", False, True),
    ("data/.train-00000-of-00001.parquet.123.tmp", False, False),  # a write in progress
    ("data/train-x/y.parquet", False, False),
    (".commits-00000.parquet.tmp", False, False),
    ("_funnel/commits-00000.parquet.json", False, False),
    ("manifest.json", False, False),
])
def test_which_names_are_shards(name: str, current: bool, legacy: bool) -> None:
    assert layout.is_data_file(name) is current and layout.is_legacy_data_file(name) is legacy


def test_data_files_from_the_manifest_or_a_listing() -> None:
    new = {"files": ["data/train-00001-of-00002.parquet", "data/train-00000-of-00002.parquet"]}
    assert layout.data_files(new) == sorted(new["files"])
    assert layout.data_files({"files": ["commits-00000.parquet", "model"]}) == ["commits-00000.parquet"]
    listing = ["commits-00000.parquet", "data/train-00000-of-00001.parquet"]
    assert layout.data_files(None, listing) == ["data/train-00000-of-00001.parquet"]  # the new layout wins
    assert layout.data_files({}, ["b.parquet", "a.parquet", "stats.json"]) == ["a.parquet", "b.parquet"]
    assert layout.all_shards(listing + ["stats.json", "data/.x.tmp"]) == listing


def test_stage_listing_skips_work_dirs(tmp_path: Path) -> None:
    for name in ("data/train-00000-of-00001.parquet", "commits-00000.parquet", ".work/k/part-00000.parquet",
                 "_funnel/x.parquet.json", "manifest.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert stage_listing(tmp_path) == ["commits-00000.parquet", "data/train-00000-of-00001.parquet"]


@pytest.mark.parametrize(("rows", "label"), [(0, "n<1K"), (999, "n<1K"), (1000, "1K<n<10K"),
                                             (702_062, "100K<n<1M"), (4_000_000_000, "1B<n<10B")])
def test_size_categories(rows: int, label: str) -> None:
    assert dataset_card.size_category(rows) == label


def _card_header(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_mine_card_header_and_body() -> None:
    cfg = MineConfig(sources=("/src/a",), out="commits")
    stats = {"commits_seen": 10, "kept": 4, "dropped": {"merge": 2, "no_diff": 4},
             "repos": {"a": {"source": "/src/a", "license": "mit", "commits_seen": 6, "kept": 3},
                       "b|c": {"source": "https://x/b|c", "license": "apache-2.0", "commits_seen": 4, "kept": 1}}}
    summary = dataset_card.DataSummary(rows=4, languages={"Python": 3, "Rust": 1},
                                       licenses={"mit": 3, "apache-2.0": 1})
    text = dataset_card.mine_card(cfg, stats, summary, columns=["commit", "lang"], failed={"z/y": "clone failed"})
    meta = _card_header(text)
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}]
    assert meta["license"] == ["apache-2.0", "mit"] and meta["language"] == ["code"]
    assert meta["size_categories"] == ["n<1K"]
    assert "| merge | 8 | 2 |" in text and "| no_diff | 4 | 4 |" in text  # rows left, dropped
    assert "| b\\|c | https://x/b\\|c | apache-2.0 | 4 | 1 |" in text  # a "|" cannot break the table
    assert "| Python | 3 |" in text and "z/y (clone failed)" in text
    assert f"octoray {dataset_card.__version__}" in text and "out: commits" in text  # version, resolved config


def test_unlicensed_rows_make_the_license_unknown() -> None:
    assert dataset_card.hub_license(["mit", "", "mit"]) == ["mit", "unknown"]
    assert dataset_card.hub_license([]) == "unknown"


def test_command_line() -> None:
    assert dataset_card.command_line(["/x/.venv/bin/octoray", "mine", "a b", "--out", "c"]) == "octoray mine 'a b' --out c"
    assert dataset_card.command_line(["/x/octoray/cli.py", "filter", "c"]) == "octoray filter c"
    assert dataset_card.command_line(["bench.py", "-q"]) == "bench.py -q"


def test_summarize_counts_languages_licenses_and_repositories(tmp_path: Path) -> None:
    rows = [{"lang": "Python", "license": "mit", "repo": "a"}, {"lang": "Python", "license": "mit", "repo": "a"},
            {"lang": "Go", "license": "", "repo": "b"}, {"lang": None, "license": None, "repo": None}]  # OASST
    for i, chunk in enumerate((rows[:1], rows[1:])):
        pq.write_table(pa.Table.from_pylist(chunk, schema=pa.schema([(c, pa.string()) for c in ("lang", "license", "repo")])),
                       tmp_path / f"{i}.parquet")
    summary = dataset_card.summarize(sorted(tmp_path.glob("*.parquet")))
    assert summary.rows == 4 and summary.languages == {"Python": 2, "Go": 1}
    assert summary.licenses == {"mit": 2, "": 1} and summary.repos == {"a": ("mit", 2), "b": ("", 1)}


# ------------------------------------------------------------------ readers on both layouts


@pytest.mark.parametrize("legacy", [False, True])
def test_train_reads_sft_in_either_layout(tmp_path: Path, legacy: bool) -> None:
    from octoray.training.sft_data import sft_files, sft_texts

    sft = write_sft(tmp_path / "sft", n=7, oasst=2, legacy=legacy)
    files = sft_files(sft)
    assert [Path(f).relative_to(sft).as_posix() for f in files] == json.loads((sft / "manifest.json").read_text())["files"]
    assert ("/data/" in files[0]) is not legacy
    assert len(sft_texts(sft, limit=100)) == 9


def test_train_reads_a_legacy_sft_without_a_file_list(tmp_path: Path) -> None:
    """octoray 0.1's filter listed its shards; a directory without the list falls back to looking."""
    from octoray.training.sft_data import sft_files

    sft = write_sft(tmp_path / "sft", n=3, legacy=True)
    write_parquet_atomic(pq.read_table(sft / "part-00000.parquet"), sft / "oasst.parquet")
    write_manifest(sft, "filter", MineConfig(), rows=6, files=[], started=0.0)
    assert [Path(f).name for f in sft_files(sft)] == ["oasst.parquet", "part-00000.parquet"]


def test_a_shard_without_rows_opens_everywhere(tmp_path: Path) -> None:
    """A filter shard that kept nothing is still shard i of N; datasets, pandas and pyarrow read it."""
    import datasets
    import pandas as pd

    schema = pa.schema([("prompt", pa.string()), ("completion", pa.string())])
    write_parquet_atomic(schema.empty_table(), tmp_path / layout.shard_name(0, 2))
    write_parquet_atomic(pa.table({"prompt": ["p"], "completion": ["c"]}, schema=schema),
                         tmp_path / layout.shard_name(1, 2))
    assert pq.read_schema(tmp_path / layout.shard_name(0, 2)) == schema
    assert len(pd.read_parquet(tmp_path / "data")) == 1
    assert datasets.load_dataset(str(tmp_path), split="train", cache_dir=str(tmp_path / ".hf"))["prompt"] == ["p"]
