"""The continuous-batching scheduler of an ``octoray serve`` replica.

:class:`BatchScheduler` owns one running batch on a
:class:`~octoray.serving.decoding.BatchDecoder` and schedules it one iteration (one token) at a
time, as vLLM and TGI do: at each step the sequences that arrived meanwhile are prefilled (within
a token budget, ``max_prefill_tokens``) and join the running batch, every row advances by one
token, and a row that finishes leaves at once, so a short request never waits for a long one.
While nothing waits to join and no row finishes, the decode thread runs several steps per
hand-off (up to ``max_steps_per_handoff``): a step of one row on a small model costs about as much
as the thread hand-off and bookkeeping around it, which would otherwise make one request on an
idle replica ~20 % slower than decoding it in one call.
It also bounds what a replica holds (:class:`Overloaded` past ``capacity``). It knows nothing of
HTTP (that is :mod:`octoray.serving.replica`) nor of sampling (that is
:mod:`octoray.serving.decoding`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from octoray.serving.decoding import BatchDecoder, Sequence

logger = logging.getLogger("octoray.serve")


class Overloaded(Exception):
    """The replica holds as many requests as it may: the caller answers 429."""


@dataclass(eq=False)
class _Request:
    seqs: list[Sequence]
    done: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class _FromThread:
    """An ``asyncio.Queue`` fed from the decode thread: each put is handed to the event loop."""

    def __init__(self, queue: asyncio.Queue, loop: asyncio.AbstractEventLoop) -> None:
        self.queue, self.loop = queue, loop

    def put_nowait(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class BatchScheduler:
    """One replica's running batch, the sequences waiting to join it, and what it has served so far."""

    def __init__(self, decoder: BatchDecoder, *, max_batch_size: int, max_prefill_tokens: int = 4096,
                 capacity: Optional[int] = None, on_step: Optional[Callable[[list[_Request], float], None]] = None,
                 max_steps_per_handoff: int = 16) -> None:
        self.decoder = decoder
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_steps_per_handoff = max_steps_per_handoff
        self.capacity = capacity
        #: called on the event loop after each step with the requests held (health probes left out)
        #: and the time: the replica's metrics (octoray.serving.metrics.ServeMetrics.on_step)
        self.on_step = on_step
        #: served so far by this replica, shown by /healthz (the benchmark reads steps and row_steps)
        self.stats = {"requests": 0, "sequences": 0, "completion_tokens": 0, "batches": 0, "largest_batch": 0,
                      "steps": 0, "row_steps": 0, "handoffs": 0, "rejected": 0,
                      "decode_busy_s": 0.0}
        self._requests: list[_Request] = []
        self._waiting: deque[Sequence] = deque()
        self._probes: set[Sequence] = set()  # health-check sequences: first in line, beyond max_batch_size
        self._batch: Any = None  # the running decoding batch (decoding._Batch), None when idle
        self._keep: list[int] = []  # its rows still going
        self._joinable = True  # False once a cache type kv_cache cannot join: new rows wait for an empty batch
        self._stepped: list[int] = []  # rows decoded at each step of the last hand-off (for stats)
        self._wake: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None

    @property
    def running(self) -> int:
        """Sequences in the running batch."""
        return len(self._keep)

    @property
    def queued(self) -> int:
        """Requests held that have a sequence not yet in the batch."""
        return sum(1 for r in self._requests if any(s in self._waiting for s in r.seqs))

    async def run(self, seqs: list[Sequence], *, probe: bool = False) -> None:
        """Decode one request's sequences (sharing the batch with other requests); return when all are done.

        :meth:`submit` then :meth:`wait`: raises :class:`Overloaded` at once when the replica is
        full, RuntimeError when one of these sequences failed.
        """
        await self.wait(self.submit(seqs, probe=probe))

    def submit(self, seqs: list[Sequence], *, probe: bool = False) -> _Request:
        """Queue one request's sequences for the next step (call on the event loop).

        Raises :class:`Overloaded` when the replica already holds ``capacity`` requests. ``probe``
        (the health check) goes first and counts against neither ``capacity`` nor ``max_batch_size``.
        """
        held = len(self._requests) - len(self._probes)
        if not probe and self.capacity is not None and held >= self.capacity:
            self.stats["rejected"] += 1
            raise Overloaded(f"this replica already holds {held} requests")
        loop = asyncio.get_running_loop()
        self._start(loop)
        request = _Request(seqs, loop.create_future())
        for seq in seqs:
            if isinstance(seq.queue, asyncio.Queue):
                seq.queue = _FromThread(seq.queue, loop)
        self._requests.append(request)
        if probe:
            self._probes.update(seqs)
            self._waiting.extendleft(reversed(seqs))
        else:
            self.stats["requests"] += 1
            self.stats["sequences"] += len(seqs)
            self._waiting.extend(seqs)
        self._wake.set()
        return request

    async def wait(self, request: _Request) -> None:
        """Until every sequence of ``request`` is done; cancelled (client gone, timeout), it frees their rows."""
        try:
            await asyncio.shield(request.done)
        except asyncio.CancelledError:  # the next step drops these rows
            for seq in request.seqs:
                seq.cancelled = True
            raise
        finally:
            if request in self._requests:
                self._requests.remove(request)
            self._probes.difference_update(request.seqs)
        if any(seq.finish_reason == "error" for seq in request.seqs):
            raise RuntimeError("generation failed for this request (see the replica log)")

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._loop())

    async def _loop(self) -> None:
        """The engine: one iteration per token while there is work, asleep otherwise."""
        try:
            await self._iterations()
        except BaseException as exc:  # a bug here must not leave any caller waiting forever
            for request in self._requests:
                if not request.done.done():
                    request.done.set_exception(RuntimeError(f"the scheduler stopped: {exc!r}"))
            self._batch, self._keep = None, []
            raise

    async def _iterations(self) -> None:
        while True:
            if self._batch is None and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            fresh = self._admit()
            if self._batch is None and fresh:
                self.stats["batches"] += 1
            began = time.perf_counter()
            try:
                self._batch = await asyncio.to_thread(self._iterate, self._batch, fresh)
            except Exception:  # noqa: BLE001 - the loop must outlive a failed step
                logger.exception("decoding step failed; its rows fail, the replica goes on")
                for seq in [*(self._batch.seqs if self._batch is not None else []), *fresh]:
                    if not seq.done:
                        seq.finish_reason = "error"
                self._batch, self._keep = None, []
            # hand-off to hand-back: with the rest of the wall time it shows how long the decode
            # thread waited for the event loop
            self.stats["decode_busy_s"] += time.perf_counter() - began
            self._settle()

    def _admit(self) -> list[Sequence]:
        """Waiting sequences that join now: free rows, within the prefill budget (one at least)."""
        while self._waiting and self._waiting[0].done:
            self._waiting.popleft()  # cancelled before it started
        if self._batch is not None and not self._joinable:
            return []
        fresh: list[Sequence] = []
        budget = self.max_prefill_tokens
        while self._waiting:
            seq = self._waiting[0]
            probe = seq in self._probes
            if seq.done:
                self._waiting.popleft()
                continue
            if not probe and len(self._keep) + len(fresh) >= self.max_batch_size:
                break
            if fresh and len(seq.prompt_ids) > budget:
                break
            budget -= len(seq.prompt_ids)
            fresh.append(self._waiting.popleft())
        return fresh

    def _iterate(self, batch: Any, fresh: list[Sequence]) -> Any:
        """One hand-off to the decode thread: prefill ``fresh`` and join it, then one step for every
        row; without ``fresh``, more steps while no row finishes and nothing could join (so a
        newcomer still joins at the next step, and a finished request is answered at once)."""
        keep = self._keep
        self._stepped = []
        if fresh:
            joined = self._prefill(fresh)
            if joined is not None:
                if batch is None:
                    self._joinable = self.decoder.joinable(joined)
                batch = self.decoder.join(batch, keep, joined, self.decoder.advance(joined))
                keep = list(range(len(batch.seqs))) if batch is not None else []
        while batch is not None and keep:
            self.decoder.step(batch, keep)
            rows = len(keep)
            self._stepped.append(rows)
            keep = self.decoder.advance(batch)
            # after a prefill, back to the event loop at once: the first tokens' times are measured there
            if (fresh or len(keep) < rows or self._could_join(len(keep))
                    or len(self._stepped) >= self.max_steps_per_handoff):
                break
        self._keep = keep
        return batch if keep else None

    def _could_join(self, running: int) -> bool:
        """Whether a waiting sequence could join a batch of ``running`` rows now (read from the decode
        thread: the event loop only appends to these, and the GIL makes each read whole)."""
        if not self._waiting or not self._joinable:
            return False
        return running < self.max_batch_size or bool(self._probes)

    def _prefill(self, fresh: list[Sequence]) -> Any:
        """Prefill ``fresh`` together; if that fails, one at a time, so only the failing ones fail."""
        try:
            return self.decoder.prefill(fresh)
        except Exception:  # noqa: BLE001
            if len(fresh) == 1:
                logger.exception("prefill failed for one sequence")
                fresh[0].finish_reason = "error"
                return None
        joined = None
        for seq in fresh:
            one = self._prefill([seq])
            if one is not None:
                joined = one if joined is None else self.decoder.join(joined, list(range(len(joined.seqs))),
                                                                      one, list(range(len(one.seqs))))
        return joined

    def _settle(self) -> None:
        """After a step, on the event loop: count, report, and wake the requests whose rows are all done."""
        self.stats["handoffs"] += 1
        self.stats["steps"] += len(self._stepped)
        self.stats["row_steps"] += sum(self._stepped)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], *self._stepped, 0)
        if self.on_step is not None:
            try:
                self.on_step([r for r in self._requests if not self._probes.intersection(r.seqs)], time.monotonic())
            except Exception:  # noqa: BLE001 - metrics must never stop decoding
                logger.exception("the step hook failed")
        finished = [r for r in self._requests if all(seq.done for seq in r.seqs)]
        for request in finished:
            # removed here, not only by wait(): a request whose waiter never ran must not hold a place
            self._requests.remove(request)
            if not request.done.done():
                if not self._probes.intersection(request.seqs):
                    self.stats["completion_tokens"] += sum(seq.generated for seq in request.seqs)
                request.done.set_result(None)
