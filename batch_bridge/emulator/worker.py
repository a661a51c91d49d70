"""The background thread that ends due batches: it decides when, `processing.py` does the work.

One thread, on purpose: batches are processed one after the other, so the prompt cache and the
fault counters see requests in a stable order and results are reproducible. A batch is
processed when it is due (`created_at + latency` on the emulated clock), when its cancel has
settled (`cancel_initiated_at + cancel_latency`), or when it expires (24 h).

The per-request work runs in this thread, or, with `worker_process` on (the CLI default), in a
child process (`ProcessingChild`) so it never holds the server's GIL; this thread then only
waits for it and forwards a cancel or the expiry that arrives meanwhile.
"""

from __future__ import annotations

import copy
import logging
import threading
import time

from .clock import Clock
from .config import EmulatorConfig
from .processing import Interruption, Job, Mode, Outcome, ProcessingChild, process_batch
from .responder import Responder
from .stats import Stats
from .store import Batch, Store
from .usage import PromptCache

log = logging.getLogger("batch_bridge.emulator")


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
        self._child: ProcessingChild | None = None  # started with the first batch
        self._wake = threading.Event()
        self._stopping = threading.Event()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self.join(timeout=30)
        if self._child is not None:
            self._child.stop()

    def clear_cache(self) -> None:
        """Forget every cached prompt prefix (wherever processing runs)."""
        self.cache.clear()
        if self._child is not None:
            self._child.clear_cache()

    def run(self) -> None:
        while not self._stopping.is_set():
            wait = 0.5
            try:
                for batch in self.store.unfinished():
                    if self._stopping.is_set():
                        return
                    now = self.clock.now()
                    mode, due = self._next_step(batch)
                    if now >= due:
                        self._process(batch, mode)
                        wait = 0.0
                    else:
                        wait = min(wait, self.clock.real_seconds(due - now))
            except Exception:  # keep serving; a broken batch must not stop the others
                if self._stopping.is_set():
                    return
                log.exception("emulator worker failed; retrying")
                wait = 0.5
            self._wake.wait(timeout=max(wait, 0.001))
            self._wake.clear()

    def _next_step(self, batch: Batch) -> tuple[Mode, float]:
        if batch.processing_status == "canceling" and batch.cancel_initiated_at is not None:
            settle = batch.cancel_initiated_at + self.config.cancel_latency
            return "cancel", min(settle, batch.expires_at)
        if batch.due_at >= batch.expires_at:
            return "expire", batch.expires_at
        return "process", batch.due_at

    def _interruption(self, batch: Batch) -> Interruption | None:
        if batch.cancel_initiated_at is not None:
            return "canceled"
        if self.clock.now() >= batch.expires_at:
            return "expired"
        return None

    def _process(self, batch: Batch, mode: Mode) -> None:
        """Write the batch's results file (here or in the child) and end it."""
        job = Job(
            batch_id=batch.id,
            requests_path=self.store.requests_path(batch.id),
            results_path=self.store.results_path(batch.id),
            mode=mode,
            faults=copy.deepcopy(self.config.faults),
            cancel_complete_fraction=self.config.cancel_complete_fraction,
            cache_min_tokens=self.config.cache_min_tokens,
        )
        outcome = self._run_job(job, batch)
        self.stats.add_cpu("processing", outcome.cpu_seconds)
        ended_at = min(self.clock.now(), batch.expires_at)
        self.store.end(batch, ended_at, outcome.counts)
        self.stats.incr("batches_ended")
        self.stats.incr("requests_processed", batch.request_count)
        for kind in ("errored", "expired", "canceled"):
            if outcome.counts[kind]:
                self.stats.incr(f"results_{kind}", outcome.counts[kind])
        for name, n in outcome.faults.items():
            self.stats.fault(name, n)

    def _run_job(self, job: Job, batch: Batch) -> Outcome:
        if not self.config.worker_process:
            start = time.thread_time()
            outcome = process_batch(job, self.responder, self.cache, lambda: self._interruption(batch))
            outcome.cpu_seconds = time.thread_time() - start
            return outcome
        if self._child is None or not self._child.alive():
            # A child that died (e.g. a plug-in responder that crashed the interpreter) is
            # replaced; its prompt cache is lost, as on a restart.
            self._child = ProcessingChild(self.config.responder)
        return self._child.run(job, lambda: self._interruption(batch), self._stopping)
