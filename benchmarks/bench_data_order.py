"""What ``preserve_order`` costs the training data path, and whether the shard order repeats.

    .venv/bin/python benchmarks/bench_data_order.py                  # 4000 SFT rows in 16 shards, 3 rounds
    .venv/bin/python benchmarks/bench_data_order.py --rows 16000 --shards 32 --rounds 5

Both sides build the packed datasets with octoray's own ``prepare_datasets`` (read, shuffle,
pack, materialize) and then read one epoch of two train shards the way Ray Train hands them out
(``streaming_split(2, equal=True)``, each shard iterated by its own actor with
``iter_torch_batches``): side ``off`` as Ray Train's default (locality hints, the driver's
``preserve_order`` false), side ``on`` as octoray now does (``preserve_order`` for the build and
the split). They alternate for ``--rounds`` rounds (this machine's load drifts). Also reported:
whether two epochs (and two builds) give every shard the same sequences in the same order.
Prints a markdown table.

On one node every block is local, so this measures the ordering's own cost (the executor holding
finished blocks back until their turn); the cost on a cluster is the locality given up: a worker
may fetch a block from another node's object store (a packed 2048-token sequence is 32 KiB).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers.sft import WrittenBy, sft_rows  # noqa: E402 - the same learnable rows the tests use


def write_shards(out_dir: Path, rows: int, shards: int) -> Path:
    """An sft/ directory of ``rows`` rows in ``shards`` Parquet files (as 'octoray filter' writes
    them): Ray Data reads one block per file, so the order of blocks is what is measured."""
    import pyarrow as pa

    from octoray.storage.layout import shard_name
    from octoray.storage.stage_dirs import write_manifest, write_parquet_atomic

    table = sft_rows(rows)
    names = [shard_name(i, shards) for i in range(shards)]
    for i, name in enumerate(names):
        write_parquet_atomic(pa.Table.from_pylist(table[i::shards]), out_dir / name)
    write_manifest(out_dir, "filter", WrittenBy(), rows=rows, files=names, started=time.time())
    return out_dir


def _reader():
    import ray

    @ray.remote(num_cpus=0)
    class Reader:
        """One training worker's side of the data path: iterate its shard, digest the order."""

        def epoch(self, shard, micro_batch: int) -> tuple[float, int, str]:
            digest = hashlib.sha256()
            started, n = time.perf_counter(), 0
            for batch in shard.iter_torch_batches(batch_size=micro_batch, drop_last=True):
                digest.update(batch["input_ids"].numpy().tobytes())
                n += 1
            return time.perf_counter() - started, n, digest.hexdigest()[:12]

    return Reader


def one_side(cfg, sft: Path, model_path: str, ordered: bool, readers: list) -> dict:
    """Build the datasets and read two epochs of two shards; times and order digests."""
    import ray
    from ray.data import DataContext, ExecutionOptions

    from octoray.training import sft_data

    started = time.perf_counter()
    if ordered:
        datasets, _ = sft_data.prepare_datasets(cfg, sft, model_path)
    else:
        datasets, _ = sft_data._prepare(cfg, sft, model_path)  # the build without the setting
    build_s = time.perf_counter() - started
    ds = datasets["train"].copy(datasets["train"])
    if ordered:
        ds.context.execution_options = ExecutionOptions(preserve_order=True)
    else:  # Ray Train's default_ingest_options, with its locality hints (the workers' nodes)
        ds.context.execution_options = ExecutionOptions(preserve_order=DataContext.get_current().execution_options.preserve_order)
    node = ray.get_runtime_context().get_node_id()
    shards = ds.streaming_split(len(readers), equal=True, locality_hints=[node] * len(readers))
    epochs = []
    for _ in range(2):
        epochs.append(ray.get([r.epoch.remote(s, cfg.micro_batch) for r, s in zip(readers, shards)]))
    return {"build_s": build_s, "epoch_s": [max(t for t, _, _ in e) for e in epochs],
            "batches": sum(n for _, n, _ in epochs[0]), "order": [tuple(d for _, _, d in e) for e in epochs]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4000, help="SFT rows written")
    parser.add_argument("--shards", type=int, default=16, help="Parquet files (one block each)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating on/off rounds")
    args = parser.parse_args()

    import ray

    from octoray.config import from_mapping
    from octoray.training.driver import resolve_model
    from octoray.training.train_config import TrainConfig

    work = Path(tempfile.mkdtemp(prefix="octoray-bench-order-"))
    sft = write_shards(work / "sft", args.rows, args.shards)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = from_mapping(TrainConfig, {"model": "demo", "demo_embd": 64, "demo_vocab": 512, "data": str(sft),
                                     "out": str(work / "run"), "seq_len": 128, "num_workers": 2, "device": "cpu",
                                     "micro_batch": 1, "batch_size": 4})
    model_path = resolve_model(cfg, sft, work / "run")
    Reader = _reader()
    readers = [Reader.remote() for _ in range(2)]
    results: dict[bool, list[dict]] = {True: [], False: []}
    for round_no in range(args.rounds):
        for ordered in ((True, False) if round_no % 2 == 0 else (False, True)):
            results[ordered].append(one_side(cfg, sft, model_path, ordered, readers))
        print(f"round {round_no + 1}/{args.rounds}: on build {results[True][-1]['build_s']:.2f} s epoch "
              f"{results[True][-1]['epoch_s'][1]:.3f} s; off build {results[False][-1]['build_s']:.2f} s epoch "
              f"{results[False][-1]['epoch_s'][1]:.3f} s", flush=True)

    print(f"\n{args.rows} SFT rows in {args.shards} shards, packed to seq 128 ({results[True][0]['batches']} micro-batches of 1 per epoch), "
          f"2 shards read by 2 actors, {args.rounds} alternating rounds, one node\n")
    print("| preserve_order | build (read, shuffle, pack, materialize) s | epoch of 2 shards s | "
          "same order epoch 1 = epoch 2 | same order across builds |")
    print("|---|---:|---:|---|---|")
    for ordered in (False, True):
        rows = results[ordered]
        build = statistics.median(r["build_s"] for r in rows)
        epoch = statistics.median(r["epoch_s"][1] for r in rows)  # the second epoch: no first-use costs
        same_epochs = all(r["order"][0] == r["order"][1] for r in rows)
        same_builds = len({r["order"][0] for r in rows}) == 1
        print(f"| {'on (octoray)' if ordered else 'off (Ray default)'} | {build:.2f} | {epoch:.3f} | "
              f"{'yes' if same_epochs else 'no'} | {'yes' if same_builds else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
