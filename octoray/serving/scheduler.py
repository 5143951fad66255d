"""The batching scheduler of an ``octoray serve`` replica: sequences of concurrent requests decoded together.

:class:`BatchScheduler` takes the sequences of each request (prompt x ``n``), gathers them with
Ray Serve's ``@serve.batch`` and decodes up to ``max_batch_size`` of them at a time on one
:class:`~octoray.serving.decoding.BatchDecoder`. It knows nothing of HTTP (that is
:mod:`octoray.serving.replica`) nor of sampling (that is :mod:`octoray.serving.decoding`).
"""

from __future__ import annotations

import asyncio

from octoray.serving.decoding import BatchDecoder, Sequence


class BatchScheduler:
    """One replica's batch queue in front of its decoder, and what it has served so far."""

    def __init__(self, decoder: BatchDecoder, *, max_batch_size: int, batch_wait_timeout_s: float,
                 max_concurrent_batches: int) -> None:
        from ray import serve

        self.decoder = decoder
        self.max_batch_size = max_batch_size
        #: served so far by this replica, shown by /healthz (the benchmark reads the batch sizes)
        self.stats = {"requests": 0, "sequences": 0, "completion_tokens": 0, "batches": 0, "largest_batch": 0}
        # serve.batch on the bound method, so max_batch_size can come from the config. Serve forms
        # the next batch as soon as requests arrive, not when the model is free, so several small
        # batches can wait at once: they all enter _generate_batch (max_concurrent_batches) and
        # are merged there, up to max_batch_size, into the decode batch that runs next.
        self._waiting: list[Sequence] = []
        self._model_lock = asyncio.Lock()
        self._generate = serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s,
                                     max_concurrent_batches=max_concurrent_batches)(self._generate_batch)

    async def run(self, seqs: list[Sequence]) -> None:
        """Decode one request's sequences (sharing batches with other requests); return when all are done."""
        self.stats["requests"] += 1
        self.stats["sequences"] += len(seqs)
        try:
            await asyncio.gather(*(self._generate(seq) for seq in seqs))
        except asyncio.CancelledError:  # client went away: let the running batch drop these rows
            for seq in seqs:
                seq.cancelled = True
            raise

    async def _generate_batch(self, seqs: list[Sequence]) -> list[Sequence]:
        """``@serve.batch`` target: queue ``seqs``; whoever holds the model decodes what waits.

        Each turn takes up to ``max_batch_size`` waiting sequences (oldest first, from any batch
        Serve formed) and decodes them together until each one finishes; a call returns once
        its own sequences are done, whichever call's turn decoded them.
        """
        self._waiting.extend(seqs)
        while not all(seq.done for seq in seqs):
            async with self._model_lock:
                if all(seq.done for seq in seqs):
                    break
                take = self._waiting[:self.max_batch_size]
                del self._waiting[:len(take)]
                if not take:
                    break  # ours were taken by a turn that failed; reported below
                await self._decode([seq for seq in take if not seq.done])
        if any(not seq.done or seq.finish_reason == "error" for seq in seqs):
            raise RuntimeError("generation failed in this request's batch (see the replica log)")
        return seqs

    async def _decode(self, live: list[Sequence]) -> None:
        """Decode ``live`` together until each one finishes.

        The forward passes run in a worker thread so the event loop keeps taking requests and
        flushing streamed pieces; sequence bookkeeping (detokenising, stop strings) stays here.
        """
        if not live:
            return
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(live))
        try:
            batch = await asyncio.to_thread(self.decoder.prefill, live)
            while keep := self.decoder.advance(batch):
                await asyncio.to_thread(self.decoder.step, batch, keep)
        except BaseException:
            for seq in live:  # no caller may wait forever on a row of a failed batch
                if not seq.done:
                    seq.finish_reason = "error"
            raise
        finally:
            self.stats["completion_tokens"] += sum(seq.generated for seq in live)

