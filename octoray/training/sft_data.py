"""The SFT data as Ray Datasets for training: read ``sft/``, mix in OASST, shuffle, pack, split.

Used by ``octoray train`` (:mod:`octoray.training.driver`) and by every ``octoray tune`` trial.
"""

from __future__ import annotations

import functools
import zlib
from typing import Any

from octoray.errors import UserError
from octoray.storage.locations import Location, location
from octoray.training.train_config import TrainConfig


def sft_files(data_dir: Location) -> list[str]:
    """The Parquet shards of an ``sft/`` directory (paths, or URIs when it is in object storage),
    in either layout (:func:`octoray.storage.layout.data_files`)."""
    from octoray.storage.layout import data_files
    from octoray.storage.stage_dirs import read_manifest, stage_listing

    data_dir = location(data_dir)
    files = [str(data_dir / name) for name in data_files(read_manifest(data_dir), stage_listing(data_dir))]
    if not files:
        raise UserError(f"no Parquet shards in {data_dir}")
    return files


def sft_texts(data_dir: Location, limit: int) -> list[str]:
    """Up to ``limit`` prompt+completion strings, to train the demo tokenizer on."""
    from octoray.storage.stage_dirs import read_parquet

    texts: list[str] = []
    for path in sft_files(data_dir):
        table = read_parquet(location(path), columns=["prompt", "completion"])
        texts.extend(p + c for p, c in zip(table["prompt"].to_pylist(), table["completion"].to_pylist()))
        if len(texts) >= limit:
            break
    return texts[:limit]


def prepare_datasets(cfg: TrainConfig, data_dir: Location, model_path: str) -> tuple[dict[str, Any], dict[str, int]]:
    """Ray Data: read ``sft/``, mix in OASST at ``oasst_ratio``, shuffle, pack, split off validation.

    Built with ``preserve_order``, so a rerun of the same command gets the same sequences in the
    same blocks in the same order (a resume then skips to its data position in the very order the
    first attempt read; see :mod:`octoray.training.resume`).
    """
    from ray.data import DataContext

    # Each Dataset keeps a copy of the context current when it was made; the driver's own is
    # put back afterwards, so nothing else in this process inherits the setting.
    context = DataContext.get_current()
    before = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    try:
        return _prepare(cfg, data_dir, model_path)
    finally:
        context.execution_options.preserve_order = before


def _prepare(cfg: TrainConfig, data_dir: Location, model_path: str) -> tuple[dict[str, Any], dict[str, int]]:
    import ray.data

    from octoray.storage.locations import fs_path
    from octoray.storage.stage_dirs import parquet_file
    from octoray.training.packing import pack_batch

    files = sft_files(data_dir)
    schema = parquet_file(location(files[0])).schema_arrow
    missing = [c for c in ("prompt", "completion") if c not in schema.names]
    if missing:
        raise UserError(f"{data_dir} lacks column(s) {', '.join(missing)}: is it the output of 'octoray filter'?")
    has_source = "source" in schema.names
    columns = ["prompt", "completion"] + (["source"] if has_source else [])
    filesystem, _ = fs_path(location(files[0]))
    ds = ray.data.read_parquet([fs_path(location(f))[1] for f in files], filesystem=filesystem).select_columns(columns)
    counts: dict[str, int] = {}
    if cfg.oasst_ratio is not None and has_source:
        ds, counts = _mix_oasst(ds, files, cfg.oasst_ratio, cfg.seed)
    ds = ds.random_shuffle(seed=cfg.seed)
    packed = ds.map_batches(pack_batch, batch_format="numpy", batch_size=512,
                            fn_kwargs={"tokenizer_path": model_path, "seq_len": cfg.seq_len,
                                       "target_only": cfg.target_only}).materialize()
    total = packed.count()
    datasets = {"train": packed}
    n_val = 0
    if cfg.val_fraction > 0:
        train, val = packed.train_test_split(test_size=cfg.val_fraction)
        n_val = val.count()
        if n_val < cfg.num_workers:
            raise UserError(f"val_fraction {cfg.val_fraction} leaves {n_val} validation sequences for "
                            f"{cfg.num_workers} workers: raise it or add data")
        datasets = {"train": train.materialize(), "val": val.materialize()}
    n_train = total - n_val
    if n_train < cfg.micro_batch * cfg.num_workers:
        raise UserError(f"only {n_train} packed training sequences of {cfg.seq_len} tokens, fewer than "
                        f"micro_batch x num_workers = {cfg.micro_batch * cfg.num_workers}: add data or lower seq_len")
    counts.update({"train_sequences": n_train, "val_sequences": n_val})
    return datasets, counts


def _mix_oasst(ds: Any, files: list[str], ratio: float, seed: int) -> tuple[Any, dict[str, int]]:
    """Keep every commit row and a seeded sample of OASST rows so they make up ~``ratio`` of the mix.

    Each OASST row is kept when a hash of (seed, row) falls under ``take / n_oasst``: one fused
    filter in the read tasks instead of filter + shuffle + limit + union, and the same rows on
    every rerun (the driver counts them with the same rule for the manifest).
    """
    from octoray.storage.stage_dirs import read_parquet

    oasst_rows: list[tuple[str, str]] = []
    n_total = 0
    for f in files:
        table = read_parquet(location(f), columns=["source", "prompt", "completion"])
        n_total += table.num_rows
        oasst_rows.extend((p, c) for s, p, c in zip(table["source"].to_pylist(), table["prompt"].to_pylist(),
                                                   table["completion"].to_pylist()) if s == "oasst")
    n_oasst, n_commits = len(oasst_rows), n_total - len(oasst_rows)
    wanted = round(ratio / (1.0 - ratio) * n_commits)
    if wanted > n_oasst:
        print(f"octoray train: oasst_ratio {ratio} wants {wanted} OASST rows, only {n_oasst} exist; using all")
    keep = min(1.0, wanted / n_oasst) if n_oasst else 0.0
    rule = functools.partial(_keep_row, keep=keep, seed=seed)
    kept = sum(rule({"source": "oasst", "prompt": p, "completion": c}) for p, c in oasst_rows)
    return ds.filter(rule), {"commit_rows": n_commits, "oasst_rows": kept}


def _keep_row(row: dict[str, Any], *, keep: float, seed: int) -> bool:
    if row["source"] != "oasst":
        return True
    digest = zlib.crc32(f"{seed}\0{row['prompt']}\0{row['completion']}".encode("utf-8"))
    return digest / 2**32 < keep
