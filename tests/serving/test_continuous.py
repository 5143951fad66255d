"""Continuous batching (``octoray.serving.scheduler``) in-process: no Ray, no HTTP, a real tiny model.

The scheduler is driven on an asyncio loop exactly as a replica drives it; every check compares
against the same sequences decoded alone (``BatchDecoder.generate``), fp32 on CPU.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO_ROOT

PROMPTS = ["def add(a, b):", "import os\nclass Config:\n    def __init__(self, path):\n        self.path =",
           "for i in range(10):", "x = ", "class A:\n    pass\n\n\ndef main(argv):\n    return"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from octoray.modeling import build_demo_model

    texts = [p.read_text(encoding="utf-8") for p in sorted((REPO_ROOT / "octoray").rglob("*.py"))]
    return build_demo_model(tmp_path_factory.mktemp("continuous") / "model", texts, n_positions=2048)


@pytest.fixture(scope="module")
def decoder(model_dir: Path):
    from octoray.modeling import load_model, load_tokenizer
    from octoray.serving.decoding import BatchDecoder

    return BatchDecoder(load_model(str(model_dir)).eval(), load_tokenizer(str(model_dir)))


def _seq(decoder: Any, prompt: str, max_tokens: int, **kwargs: Any) -> Any:
    from octoray.serving.decoding import Sequence

    return Sequence(prompt_ids=decoder.tokenizer(prompt)["input_ids"], max_tokens=max_tokens, **kwargs)


def _alone(decoder: Any, prompt: str, max_tokens: int, **kwargs: Any) -> Any:
    seq = _seq(decoder, prompt, max_tokens, **kwargs)
    decoder.generate([seq])
    return seq


def _scheduler(decoder: Any, **kwargs: Any) -> Any:
    from octoray.serving.scheduler import BatchScheduler

    return BatchScheduler(decoder, **{"max_batch_size": 8, **kwargs})


SETTINGS = [dict(max_tokens=96, temperature=0.0), dict(max_tokens=40, temperature=0.0),
            dict(max_tokens=64, temperature=0.9, seed=3), dict(max_tokens=7, temperature=0.0),
            dict(max_tokens=80, temperature=0.7, top_p=0.5, seed=11)]


def test_rows_joining_a_running_batch_decode_like_alone(decoder) -> None:
    """Requests arriving one after another join the running batch (left-padded caches of other
    widths, rows leaving in between) and still get exactly their tokens decoded alone."""
    alone = [_alone(decoder, p, **s) for p, s in zip(PROMPTS, SETTINGS)]
    scheduler = _scheduler(decoder, max_prefill_tokens=16)  # small budget: joins spread over steps
    together = [_seq(decoder, p, **s) for p, s in zip(PROMPTS, SETTINGS)]

    async def main() -> None:
        async def arrive(i: int) -> None:
            while scheduler.stats["steps"] < 5 * i:  # the i-th joins while the others decode
                await asyncio.sleep(0)
            await scheduler.run([together[i]])
        await asyncio.gather(*(arrive(i) for i in range(len(together))))

    asyncio.run(main())
    assert [s.token_ids for s in together] == [s.token_ids for s in alone]
    assert [s.text for s in together] == [s.text for s in alone]
    assert all(s.text == decoder.decode(s.token_ids) for s in together)  # incremental detokenisation
    assert scheduler.stats["batches"] == 1 and scheduler.stats["largest_batch"] >= 3


def test_short_request_overtakes_a_long_one(decoder) -> None:
    scheduler = _scheduler(decoder)
    long, short = _seq(decoder, PROMPTS[1], 256, temperature=0.0), _seq(decoder, PROMPTS[0], 8, temperature=0.0)
    finished: list[str] = []
    long_tokens_at: dict[str, int] = {}

    async def main() -> None:
        async def one(name: str, seq: Any, after_steps: int) -> None:
            while scheduler.stats["steps"] < after_steps:
                await asyncio.sleep(0)
            long_tokens_at["submitted"] = long.generated
            await scheduler.run([seq])
            finished.append(name)

        async def first_token() -> None:
            while not short.generated:
                await asyncio.sleep(0)
            long_tokens_at["first"] = long.generated
        await asyncio.gather(one("long", long, 0), one("short", short, 10), first_token())

    asyncio.run(main())
    assert finished == ["short", "long"] and long.generated == 256 and short.generated == 8
    assert short.token_ids == _alone(decoder, PROMPTS[0], 8, temperature=0.0).token_ids
    # the long row runs several steps per hand-off, yet the newcomer is prefilled at the next step
    assert long_tokens_at["first"] - long_tokens_at["submitted"] <= 2


def test_a_lone_row_decodes_several_steps_per_handoff(decoder) -> None:
    """One request on an idle scheduler: few thread hand-offs (the step loop stays in the decode
    thread), every step still counted, and the same tokens as decoding it in one call."""
    scheduler = _scheduler(decoder, max_steps_per_handoff=16)
    seq = _seq(decoder, PROMPTS[2], 64, temperature=0.0, ignore_eos=True)
    asyncio.run(scheduler.run([seq]))
    assert seq.token_ids == _alone(decoder, PROMPTS[2], 64, temperature=0.0, ignore_eos=True).token_ids
    assert scheduler.stats["steps"] == 63 == scheduler.stats["row_steps"]  # the prefill gave the first token
    assert scheduler.stats["handoffs"] == 1 + 4  # the prefill, then 63 steps in runs of at most 16


def test_a_failing_request_fails_alone(decoder) -> None:
    """A prompt the model cannot embed (token id past the vocabulary) fails its own request only,
    whether it arrives with others (one prefill) or joins a running batch."""
    from octoray.serving.decoding import Sequence

    vocab = decoder.model.get_input_embeddings().num_embeddings
    alone = [_alone(decoder, p, 24, temperature=0.0) for p in PROMPTS[:3]]
    for late in (False, True):
        scheduler = _scheduler(decoder)
        good = [_seq(decoder, p, 24, temperature=0.0) for p in PROMPTS[:3]]
        bad = Sequence(prompt_ids=[1, vocab + 7], max_tokens=24)

        async def main() -> list[Any]:
            runs = [scheduler.run([s]) for s in good]
            if late:
                await asyncio.sleep(0)
            return await asyncio.gather(*runs, scheduler.run([bad]), return_exceptions=True)

        outcomes = asyncio.run(main())
        assert outcomes[:3] == [None] * 3 and isinstance(outcomes[3], RuntimeError)
        assert bad.finish_reason == "error"
        assert [s.token_ids for s in good] == [s.token_ids for s in alone]


def test_cancelled_request_frees_its_rows_and_capacity_is_bounded(decoder) -> None:
    from octoray.serving.scheduler import Overloaded

    scheduler = _scheduler(decoder, capacity=2)
    long, other = _seq(decoder, PROMPTS[1], 1500, temperature=0.0), _seq(decoder, PROMPTS[0], 48, temperature=0.0)

    async def main() -> None:
        task = asyncio.ensure_future(scheduler.run([long]))
        second = asyncio.ensure_future(scheduler.run([other]))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):  # the third request is refused at once
            scheduler.submit([_seq(decoder, "y", 4)])
        while scheduler.running < 2:
            await asyncio.sleep(0.001)
        task.cancel()  # as Serve does when the HTTP client goes away
        with pytest.raises(asyncio.CancelledError):
            await task
        tokens = other.generated
        while scheduler.running > 1:
            await asyncio.sleep(0.001)
        # the row left at the next step: the decode thread's run of steps ends there too
        assert other.generated - tokens <= 2
        await second

    asyncio.run(main())
    assert long.cancelled and long.generated < 1500 and other.generated == 48
    assert other.token_ids == _alone(decoder, PROMPTS[0], 48, temperature=0.0).token_ids
    assert scheduler.running == 0 and scheduler.stats["rejected"] == 1


def test_non_finite_logits_fail_the_row(model_dir: Path) -> None:
    """A model whose weights went NaN (a corrupt checkpoint) yields errors, not text."""
    import torch

    from octoray.modeling import load_model, load_tokenizer
    from octoray.serving.decoding import BatchDecoder

    model = load_model(str(model_dir)).eval()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    broken = BatchDecoder(model, load_tokenizer(str(model_dir)))
    seq = _seq(broken, PROMPTS[0], 4, temperature=0.0)
    broken.generate([seq])
    assert seq.finish_reason == "error" and seq.token_ids == []
