"""The background thread that ends due batches: it decides when and where, `processing.py` does the work.

A batch is processed when it is due (`created_at + latency` on the emulated clock), when its
cancel has settled (`cancel_initiated_at + cancel_latency`), or when it expires (24 h).

Results must be reproducible, and the only state one request leaves for the next is the prompt
cache (fault draws are a pure function of seed and custom_id). So:

* `worker_processes = 0`: this thread processes the batches one after the other.
* `worker_processes = N`: N child processes (`ProcessingChild`, one "lane" thread each) do the
  work, off the server's GIL. Lane 0's child owns the prompt cache and takes the lowest due
  batch once no lower batch is still in flight, with the cache, exactly as the sequential
  order would. Every other dispatch is speculative: a batch processed apart from the cache
  (`Job.cache_free`), which stops at its first request the cache could apply to and is then
  left for lane 0. A batch no cache applies to (the usual bridge job: a short shared system
  prompt) neither reads nor writes the cache, so where and when it runs changes nothing, and
  the results are identical to processing everything in order.
* A large batch due alone while lanes are idle (at least `split_min_requests` requests) is split
  into one part per idle lane, each a consecutive range of its requests processed apart from the
  cache; the parts' bucket files are joined into the file one process would have written. A part
  that meets the cache sends the whole batch back to lane 0, as above.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from typing import Union

from .clock import Clock
from .config import EmulatorConfig
from .child import ProcessingChild
from collections import Counter

from .processing import Interruption, Job, Mode, Outcome, drop_parts, join_parts, process_batch
from .responder import Responder
from .stats import Stats
from .store import Batch, Store
from .usage import CacheNeeded, PromptCache

log = logging.getLogger("batch_bridge.emulator")
RETRY_SECONDS = 0.5  # a batch whose processing failed is tried again after this long
_Result = Union[Outcome, Exception]


class Worker(threading.Thread):
    """Processes due batches until `stop()`."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        config: EmulatorConfig,
        responder: Responder,
        cache: PromptCache,
        stats: Stats,
    ) -> None:
        super().__init__(name="emulator-worker", daemon=True)
        self.store = store
        self.clock = clock
        self.config = config
        self.responder = responder
        self.cache = cache  # used when processing runs in this thread
        self.stats = stats
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lanes = [_Lane(k, self) for k in range(config.worker_processes)]
        self._finished: queue.SimpleQueue[tuple[_Lane, Batch, Job, _Result]] = queue.SimpleQueue()
        self._cache_needed: set[str] = set()  # batches a speculative run found to need the cache
        self._parts_done: dict[str, list[tuple[Job, _Result]]] = {}  # split batches: their parts back so far
        self._retry_at: dict[str, float] = {}

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self.join(timeout=30)
        for lane in self._lanes:
            lane.stop()

    def clear_cache(self) -> None:
        """Forget every cached prompt prefix (wherever processing runs)."""
        self.cache.clear()
        if self._lanes:
            self._lanes[0].clear_cache()

    def run(self) -> None:
        for lane in self._lanes:
            lane.start()
        while not self._stopping.is_set():
            try:
                wait = self._step()
            except Exception:  # keep serving; a broken batch must not stop the others
                if self._stopping.is_set():
                    return
                log.exception("emulator worker failed; retrying")
                wait = RETRY_SECONDS
            self._wake.wait(timeout=max(wait, 0.001))
            self._wake.clear()

    # --- scheduling -------------------------------------------------------------------------

    def _step(self) -> float:
        """Record finished batches, start due ones; return how long to sleep at most."""
        while True:
            try:
                lane, batch, job, result = self._finished.get_nowait()
            except queue.Empty:
                break
            lane.batch = None
            if job.parts > 1:
                self._part_back(batch, job, result)
            else:
                self._record(batch, job, result)
        due, wait = self._due()
        if not self._lanes:
            if due:  # one batch per step: the next one's mode is looked at again afterwards
                batch, mode = due[0]
                self._record(batch, *self._in_thread(batch, mode))
                return 0.0
            return wait
        self._dispatch(due)
        return wait

    def _due(self) -> tuple[list[tuple[Batch, Mode]], float]:
        """Unfinished batches that are due and not in flight, in creation order; the wait until the next."""
        now, real_now = self.clock.now(), time.monotonic()
        in_flight = {lane.batch.id for lane in self._lanes if lane.batch is not None}
        due: list[tuple[Batch, Mode]] = []
        wait = 0.5
        for batch in self.store.unfinished():
            if batch.id in in_flight:
                continue
            retry = self._retry_at.get(batch.id, 0.0)
            if retry > real_now:
                wait = min(wait, retry - real_now)
                continue
            mode, due_at = self._next_step(batch)
            if now >= due_at:
                due.append((batch, mode))
            else:
                wait = min(wait, self.clock.real_seconds(due_at - now))
        return due, wait

    def _dispatch(self, due: list[tuple[Batch, Mode]]) -> None:
        idle = [lane for lane in self._lanes if lane.batch is None]
        if len(due) == 1 and len(idle) > 1 and self._splits(*due[0]):
            batch, mode = due.pop()
            self.stats.incr("batches_split")
            for k, lane in enumerate(idle):
                lane.assign(batch, self._job(batch, mode, cache_free=True, part=k, parts=len(idle)))
            return
        lowest_in_flight = min((lane.batch.seq for lane in self._lanes if lane.batch is not None), default=None)
        for lane in self._lanes:
            if lane.batch is not None or not due:
                continue
            first, mode = due[0]
            if lane.index == 0 and (lowest_in_flight is None or first.seq < lowest_in_flight):
                # Nothing earlier is undecided: this batch meets the cache as in sequential order.
                lane.assign(first, self._job(first, mode, cache_free=False))
                due.pop(0)
                continue
            pick = next((k for k, (b, _) in enumerate(due) if b.id not in self._cache_needed), None)
            if pick is None:
                continue
            batch, mode = due.pop(pick)
            lane.assign(batch, self._job(batch, mode, cache_free=True))
            lowest_in_flight = batch.seq if lowest_in_flight is None else min(lowest_in_flight, batch.seq)

    def _splits(self, batch: Batch, mode: Mode) -> bool:
        return (mode == "process" and batch.request_count >= self.config.split_min_requests
                and batch.id not in self._cache_needed)

    def _part_back(self, batch: Batch, job: Job, result: _Result) -> None:
        """Keep a part's result; once every part is back, end the batch with their sum (or send it back)."""
        done = self._parts_done.setdefault(batch.id, [])
        done.append((job, result))
        if len(done) < job.parts:
            return
        del self._parts_done[batch.id]
        results = [r for _, r in done]
        failed = next((r for r in results if isinstance(r, CacheNeeded)), None) or next(
            (r for r in results if isinstance(r, Exception)), None)
        if failed is not None:
            drop_parts(job.results_path)
            self._record(batch, job, failed)
            return
        join_parts(job.results_path, job.parts)
        outcomes = [r for r in results if isinstance(r, Outcome)]
        total = Outcome(counts={kind: sum(o.counts[kind] for o in outcomes) for kind in outcomes[0].counts},
                        faults=sum((o.faults for o in outcomes), Counter()),
                        cpu_seconds=sum(o.cpu_seconds for o in outcomes))
        self._record(batch, job, total)

    def _next_step(self, batch: Batch) -> tuple[Mode, float]:
        if batch.processing_status == "canceling" and batch.cancel_initiated_at is not None:
            settle = batch.cancel_initiated_at + self.config.cancel_latency
            return "cancel", min(settle, batch.expires_at)
        if batch.due_at >= batch.expires_at:
            return "expire", batch.expires_at
        return "process", batch.due_at

    def interruption(self, batch: Batch) -> Interruption | None:
        """Whether the rest of a batch being processed ends canceled or expired instead."""
        if batch.cancel_initiated_at is not None:
            return "canceled"
        if self.clock.now() >= batch.expires_at:
            return "expired"
        return None

    # --- one batch --------------------------------------------------------------------------

    def _job(self, batch: Batch, mode: Mode, cache_free: bool, part: int = 0, parts: int = 1) -> Job:
        return Job(
            batch_id=batch.id,
            requests_path=self.store.requests_path(batch.id),
            results_path=self.store.results_path(batch.id),
            mode=mode,
            faults=copy.deepcopy(self.config.faults),
            cancel_complete_fraction=self.config.cancel_complete_fraction,
            cache_min_tokens=self.config.cache_min_tokens,
            cache_hit_rate=self.config.cache_hit_rate,
            cache_free=cache_free,
            part=part,
            parts=parts,
            lines=batch.request_count,
        )

    def _in_thread(self, batch: Batch, mode: Mode) -> tuple[Job, _Result]:
        job = self._job(batch, mode, cache_free=False)
        start = time.thread_time()
        try:
            outcome = process_batch(job, self.responder, self.cache, lambda: self.interruption(batch))
        except Exception as exc:
            return job, exc
        outcome.cpu_seconds = time.thread_time() - start
        return job, outcome

    def _record(self, batch: Batch, job: Job, result: _Result) -> None:
        """End the batch with its outcome; or note why it has to be processed again."""
        if isinstance(result, CacheNeeded):
            self._cache_needed.add(batch.id)
            return
        if isinstance(result, Exception):
            if not self._stopping.is_set():
                log.error("emulator worker failed on batch %s; retrying: %s", batch.id, result, exc_info=result)
            self._retry_at[batch.id] = time.monotonic() + RETRY_SECONDS
            return
        self._cache_needed.discard(batch.id)
        self._retry_at.pop(batch.id, None)
        self.stats.add_cpu("processing", result.cpu_seconds)
        self.store.end(batch, min(self.clock.now(), batch.expires_at), result.counts)
        self.stats.incr("batches_ended")
        self.stats.incr("requests_processed", batch.request_count)
        for kind in ("errored", "expired", "canceled"):
            if result.counts[kind]:
                self.stats.incr(f"results_{kind}", result.counts[kind])
        for name, n in result.faults.items():
            self.stats.fault(name, n)


class _Lane(threading.Thread):
    """One processing child and the thread that waits for it, one batch at a time."""

    def __init__(self, index: int, worker: Worker) -> None:
        super().__init__(name=f"emulator-lane-{index}", daemon=True)
        self.index = index
        self.worker = worker
        self.batch: Batch | None = None  # in flight; set and cleared by the worker thread only
        self._jobs: queue.SimpleQueue[tuple[Batch, Job] | None] = queue.SimpleQueue()
        self._child: ProcessingChild | None = None
        self._child_lock = threading.Lock()

    def assign(self, batch: Batch, job: Job) -> None:
        self.batch = batch
        self._jobs.put((batch, job))

    def clear_cache(self) -> None:
        with self._child_lock:
            if self._child is not None:
                self._child.clear_cache()

    def stop(self) -> None:
        self._jobs.put(None)
        self.join(timeout=10)
        with self._child_lock:
            if self._child is not None:
                self._child.stop()

    def run(self) -> None:
        worker = self.worker
        while (item := self._jobs.get()) is not None:
            batch, job = item
            result: _Result
            try:
                with self._child_lock:
                    if self._child is None or not self._child.alive():
                        # A child that died (e.g. a plug-in responder crashed the interpreter) is
                        # replaced; lane 0's prompt cache is then lost, as on a restart.
                        self._child = ProcessingChild(worker.config.responder)
                    child = self._child
                result = child.run(job, lambda: worker.interruption(batch), worker._stopping)
            except Exception as exc:
                result = exc
            worker._finished.put((self, batch, job, result))
            worker.wake()
