"""Load test of ``octoray serve`` on loopback: continuous batching vs the unbatched server (the baseline).

    .venv/bin/python benchmarks/bench_serve.py                      # tiny demo model, CPU
    .venv/bin/python benchmarks/bench_serve.py --model runs/demo/train/model --num-gpus 1   # on a GPU

For each mode -- ``batched`` (continuous batching, ``max_batch_size=32``) and the baseline
``unbatched`` (``max_batch_size=1``: one sequence at a time, everything else identical) -- the
script starts the server with :func:`octoray.serving.app.start`, then runs a closed-loop load at
each concurrency level, both modes back to back (redeployed in place on the same proxy, which one
first alternating; ``--rounds`` rounds, the ratios the median over rounds): ``c`` clients
each send a request as soon as their previous one is answered, until the level's request count
or time limit is reached (both bounded). Then the time to first token (TTFT) of a short streamed
request, alone and while ``--long`` long requests are being decoded. It prints markdown tables:
requests/s, generated tokens/s (from ``usage``), p50/p99 latency and the mean number of rows per
decode step the replica saw (from ``/healthz``), the batched/unbatched tokens/s ratio per level,
and the TTFT figures against the goals (>= 1.0x at concurrency 1, >= 5x at 32, loaded TTFT <= 3x alone).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model to serve (default: a tiny random GPTBigCode built here)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=4, help="requests per client at each level (min 16 per level)")
    p.add_argument("--time-limit-s", type=float, default=25.0, help="stop a level after this long")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    p.add_argument("--batch-size", type=int, default=32, help="max_batch_size of the batched mode")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs per replica (default: 1 if Ray sees one)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    p.add_argument("--port", type=int, default=8765, help="loopback port")
    p.add_argument("--long", type=int, default=31, help="long requests running during the loaded TTFT test")
    p.add_argument("--long-tokens", type=int, default=128, help="max_tokens of each of those long requests")
    p.add_argument("--ttft-repeats", type=int, default=3, help="short requests timed, alone and under load (median)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of both modes, alternating which goes first")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--decoder-only", action="store_true",
                   help="skip the server: time the batched decoder in-process (CPU seconds, robust on a busy machine)")
    return p.parse_args()


def prompts() -> list[str]:
    """24 code prompts of varied length: function heads from octoray's own source."""
    out = []
    for path in sorted((REPO / "octoray").rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if line.startswith("def ") and len(out) < 24:
                out.append("\n".join(lines[max(0, i - 4 * (len(out) % 4)):i + 1]) + "\n")
    return out


def build_tiny_model(out: Path) -> str:
    """The demo model the tests use: 2 layers, 128 wide, BPE trained on octoray's code."""
    from octoray.modeling import build_demo_model

    texts = [p.read_text(encoding="utf-8") for p in sorted((REPO / "octoray").rglob("*.py"))]
    return str(build_demo_model(out, texts, n_positions=1024))


async def load(url: str, concurrency: int, total: int, time_limit_s: float, max_tokens: int,
               texts: list[str]) -> dict[str, Any]:
    """Closed-loop load: ``concurrency`` clients, ``total`` requests at most, ``time_limit_s`` at most."""
    import aiohttp

    latencies: list[float] = []
    tokens = 0
    issued = 0
    deadline = time.perf_counter() + time_limit_s

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal issued, tokens
        while issued < total and time.perf_counter() < deadline:
            i = issued
            issued += 1
            body = {"prompt": texts[i % len(texts)], "max_tokens": max_tokens, "temperature": 0.8,
                    "top_p": 0.95, "seed": i}
            t0 = time.perf_counter()
            async with session.post(f"{url}/completions", json=body) as response:
                answer = await response.json()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {answer}")
            latencies.append(time.perf_counter() - t0)
            tokens += answer["usage"]["completion_tokens"]

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    latencies.sort()
    return {"requests": len(latencies), "seconds": elapsed, "req_s": len(latencies) / elapsed,
            "tok_s": tokens / elapsed, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


async def first_token_s(session: Any, url: str, prompt: str) -> float:
    """Seconds from sending a short streamed greedy request to its first text chunk (then hang up)."""
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    async with session.post(f"{url}/completions", json=body) as response:
        async for line in response.content:
            if line.startswith(b"data: {"):
                return time.perf_counter() - t0
    raise RuntimeError("the stream ended without a chunk")


async def ttft(url: str, texts: list[str], n_long: int, long_tokens: int, repeats: int) -> tuple[float, float]:
    """Median TTFT of a short request alone, and while ``n_long`` long streamed requests are running."""
    import aiohttp

    async def long_client(session: aiohttp.ClientSession, i: int) -> None:
        # closed loop, so ``n_long`` long requests are in the server for the whole measurement
        body = {"prompt": texts[i % len(texts)], "max_tokens": long_tokens, "temperature": 0, "stream": True}
        while True:
            async with session.post(f"{url}/completions", json=body) as response:
                async for _ in response.content:
                    pass

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=900)) as session:
        alone = [await first_token_s(session, url, "def main():") for _ in range(repeats)]
        longs = [asyncio.ensure_future(long_client(session, i)) for i in range(n_long)]
        deadline = time.perf_counter() + 120
        while stats(url).get("running", 0) < 1 and time.perf_counter() < deadline:
            await asyncio.sleep(0.2)  # every long one is running (batched) or waiting its turn (unbatched)
        await asyncio.sleep(1.0)
        loaded = [await first_token_s(session, url, "def main():") for _ in range(repeats)]
        for task in longs:  # hang up: the server frees their rows
            task.cancel()
        await asyncio.gather(*longs, return_exceptions=True)
    return statistics.median(alone), statistics.median(loaded)


def decoder_only(model: str, texts: list[str], batch_size: int, max_tokens: int) -> None:
    """The same sequences decoded one at a time vs ``batch_size`` at a time, in-process.

    Reports CPU seconds (``time.process_time``) as well as wall time: on a shared machine the CPU
    time of this process is what batching saves, whatever the other tenants do.
    """
    import torch

    from octoray.modeling import load_model, load_tokenizer
    from octoray.serving.decoding import BatchDecoder, Sequence

    torch.set_num_threads(1)  # what a 1-CPU replica gets (Ray sets OMP_NUM_THREADS=num_cpus)
    tokenizer = load_tokenizer(model)
    decoder = BatchDecoder(load_model(model).eval(), tokenizer)

    def seqs() -> list[Any]:
        return [Sequence(prompt_ids=tokenizer(texts[i % len(texts)])["input_ids"], max_tokens=max_tokens,
                         temperature=0.8, top_p=0.95, seed=i) for i in range(batch_size)]

    decoder.generate(seqs()[:2])  # warm-up
    print("| decoder mode | sequences | generated tokens | CPU s | CPU tokens/s | wall tokens/s |")
    print("|---|---:|---:|---:|---:|---:|")
    results = {}
    for mode, groups in (("one at a time (baseline)", [[s] for s in seqs()]), (f"batch of {batch_size}", [seqs()])):
        cpu, wall = time.process_time(), time.perf_counter()
        for group in groups:
            decoder.generate(group)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        tokens = sum(s.generated for group in groups for s in group)
        results[mode] = tokens / cpu
        print(f"| {mode} | {batch_size} | {tokens} | {cpu:.2f} | {tokens / cpu:.0f} | {tokens / wall:.0f} |")
    base, batched = results.values()
    print(f"\nbatched / one at a time, CPU tokens/s: {batched / base:.1f}x")


def stats(url: str) -> dict[str, int]:
    """The replica's counters from /healthz."""
    with urllib.request.urlopen(url.removesuffix("/v1") + "/healthz", timeout=30) as response:
        return json.loads(response.read())["stats"]


def main() -> int:
    """Run both modes at every level and print the table."""
    args = parse_args()
    import ray

    from octoray.serving.app import ServeConfig, shutdown, start

    levels = [int(c) for c in args.concurrency.split(",")]
    texts = prompts()
    if args.decoder_only:
        with tempfile.TemporaryDirectory() as tmp:
            decoder_only(args.model or build_tiny_model(Path(tmp) / "model"), texts, args.batch_size, args.max_tokens)
        return 0
    for attempt in range(3):  # on a crowded machine the raylet can miss Ray's 30 s start-up window
        try:
            ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            break
        except Exception:  # noqa: BLE001 - Ray raises a bare Exception for this
            if attempt == 2:
                raise
            ray.shutdown()
    device = "GPU" if ray.cluster_resources().get("GPU", 0) and args.num_gpus != 0 else "CPU"
    rows = []
    ttfts: dict[str, list[tuple[float, float]]] = {}
    modes = [("batched", args.batch_size), ("unbatched (baseline)", 1)]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_tiny_model(Path(tmp) / "model")
        def deploy(batch_size: int) -> str:
            cfg = ServeConfig(model=model, port=args.port, max_batch_size=batch_size,
                              max_ongoing_requests=max(128, 2 * max(levels)), num_gpus=args.num_gpus,
                              num_cpus=args.num_cpus)
            url = start(cfg)  # on the same port start() updates the running app in place
            asyncio.run(load(url, 2, 4, 60, args.max_tokens, texts))  # warm-up: first batches allocate
            return url

        for round_ in range(1, args.rounds + 1):
            # Both modes of a level back to back (this machine's speed drifts over minutes), which
            # one first alternating, since the one after a redeploy can start colder.
            for step, c in enumerate(levels):
                for mode, batch_size in (modes if (round_ + step) % 2 else modes[::-1]):
                    url = deploy(batch_size)
                    before = stats(url)
                    row = asyncio.run(load(url, c, max(16, args.requests * c), args.time_limit_s, args.max_tokens,
                                           texts))
                    after = stats(url)
                    row["mean_batch"] = (after["row_steps"] - before["row_steps"]) / max(1, after["steps"] - before["steps"])
                    row["decode_busy"] = (after["decode_busy_s"] - before["decode_busy_s"]) / row["seconds"]
                    rows.append({"round": round_, "mode": mode, "concurrency": c, **row})
                    print(f"round {round_} {mode:>22} c={c:<3} {row['tok_s']:8.1f} tok/s  {row['req_s']:6.2f} req/s  "
                          f"p50 {row['p50_ms']:7.0f} ms  p99 {row['p99_ms']:7.0f} ms  batch {row['mean_batch']:.1f}  "
                          f"decode busy {row['decode_busy']:.0%}",
                          file=sys.stderr, flush=True)
            for mode, batch_size in (modes if round_ % 2 else modes[::-1]):
                url = deploy(batch_size)
                alone, loaded = asyncio.run(ttft(url, texts, args.long, args.long_tokens, args.ttft_repeats))
                ttfts.setdefault(mode, []).append((alone, loaded))
                print(f"round {round_} {mode:>22} TTFT alone {1000 * alone:7.0f} ms, with {args.long} long running "
                      f"{1000 * loaded:7.0f} ms", file=sys.stderr, flush=True)
        shutdown()
    print(f"\n{device}, model {'tiny demo GPTBigCode (2x128)' if not args.model else args.model}, "
          f"max_tokens={args.max_tokens}, {os.cpu_count()} CPU cores, replica num_cpus={args.num_cpus}\n")
    print("| round | mode | concurrency | requests | req/s | gen tokens/s | p50 latency (ms) | p99 latency (ms) "
          "| mean rows/step | decode thread busy |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['round']} | {r['mode']} | {r['concurrency']} | {r['requests']} | {r['req_s']:.2f} | "
              f"{r['tok_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['mean_batch']:.1f} | {r['decode_busy']:.0%} |")
    rounds = range(1, args.rounds + 1)
    print("\n| concurrency | tokens/s batched ÷ unbatched, per round | median |\n|---:|---|---:|")
    for c in levels:
        def tok_s(batched: bool, round_: int) -> float:
            return next(r["tok_s"] for r in rows if (r["mode"] == "batched") == batched
                        and r["concurrency"] == c and r["round"] == round_)
        ratios = [tok_s(True, n) / tok_s(False, n) for n in rounds]
        print(f"| {c} | {', '.join(f'{x:.2f}x' for x in ratios)} | {statistics.median(ratios):.2f}x |")
    print(f"\n| mode | TTFT alone (ms), per round | with {args.long} long requests running (ms) "
          "| loaded ÷ alone, per round | median |")
    print("|---|---|---|---|---:|")
    for mode, pairs in ttfts.items():
        ratios = [b / a for a, b in pairs]  # each round's two figures were taken seconds apart
        print(f"| {mode} | {', '.join(f'{1000 * a:.0f}' for a, _ in pairs)} | "
              f"{', '.join(f'{1000 * b:.0f}' for _, b in pairs)} | {', '.join(f'{x:.1f}x' for x in ratios)} | "
              f"{statistics.median(ratios):.1f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ttft_s": ttfts}, indent=2))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
