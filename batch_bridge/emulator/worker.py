"""The background thread that turns due batches into results files and ends them.

One thread, on purpose: the prompt cache and the fault counters see requests in a stable
order, so results are reproducible, and the HTTP event loop stays free. A batch is
processed when it is due (`created_at + latency` on the emulated clock), when its cancel has
settled (`cancel_initiated_at + cancel_latency`), or when it expires (24 h).

Results are written to BUCKETS files chosen by a hash of `custom_id` and then concatenated,
so the results file is deliberately not in request order (the API makes no order promise),
while memory stays constant: requests are read one JSONL line at a time.
"""

from __future__ import annotations

import logging
import shutil
import threading
import zlib
from typing import Any, Literal

from . import ids, models
from .jsonl import dumps as _dumps
from .jsonl import loads_line
from .clock import Clock
from .config import EmulatorConfig
from .faults import FaultState
from .responder import Responder, ResponderError, finish_message
from .stats import Stats
from .store import Batch, Store
from .usage import PromptCache
from .validate import check_params

log = logging.getLogger("batch_bridge.emulator")

BUCKETS = 16
_CHECK_EVERY = 256  # requests between looks at the clock / a cancel while processing
Mode = Literal["process", "cancel", "expire"]


def errored_line(custom_id: str, error_type: str, message: str) -> str:
    return _dumps(
        {
            "custom_id": custom_id,
            "result": {
                "type": "errored",
                "error": {"type": "error", "error": {"type": error_type, "message": message}, "request_id": None},
            },
        }
    )


def _simple_line(custom_id: str, result_type: str) -> str:
    # custom_id matches ^[a-zA-Z0-9_-]+$, so no escaping is needed.
    return f'{{"custom_id":"{custom_id}","result":{{"type":"{result_type}"}}}}'


class Worker(threading.Thread):
    """Processes due batches until `stop()`."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        config: EmulatorConfig,
        faults: FaultState,
        responder: Responder,
        cache: PromptCache,
        stats: Stats,
    ) -> None:
        super().__init__(name="emulator-worker", daemon=True)
        self.store = store
        self.clock = clock
        self.config = config
        self.faults = faults
        self.responder = responder
        self.cache = cache
        self.stats = stats
        self._wake = threading.Event()
        self._stopping = threading.Event()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self.join(timeout=30)

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
                        with self.stats.cpu("processing"):
                            self._process(batch, mode)
                        wait = 0.0
                    else:
                        wait = min(wait, self.clock.real_seconds(due - now))
            except Exception:  # keep serving; a broken batch must not stop the others
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

    def _process(self, batch: Batch, mode: Mode) -> None:
        """Write the batch's results file and end it."""
        directory = self.store.batch_dir(batch.id)
        work = directory / "work"
        work.mkdir(exist_ok=True)
        buckets = [
            open(work / f"{k:02d}.jsonl", "w", encoding="utf-8", newline="\n", buffering=1 << 18)
            for k in range(BUCKETS)
        ]
        counts = {"succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        complete_fraction = self.config.cancel_complete_fraction
        seed = self.config.faults.seed
        rest: Literal["canceled", "expired"] | None = {"process": None, "cancel": None, "expire": "expired"}[mode]
        try:
            with open(self.store.requests_path(batch.id), "rb") as requests:
                for n, raw in enumerate(requests):
                    item = loads_line(raw)
                    cid: str = item["custom_id"]
                    if mode == "process" and rest is None and n % _CHECK_EVERY == 0:
                        # Requests not yet sent to the "model" when a cancel or the expiry
                        # arrives end canceled / expired; the ones already done stay done.
                        if batch.cancel_initiated_at is not None:
                            rest = "canceled"
                        elif self.clock.now() >= batch.expires_at:
                            rest = "expired"
                    if rest is not None:
                        kind, line = rest, _simple_line(cid, rest)
                    elif mode == "cancel" and ids.fraction(seed, "cancel", cid) >= complete_fraction:
                        kind, line = "canceled", _simple_line(cid, "canceled")
                    else:
                        kind, line = self._answer(cid, item["params"], raw)
                    counts[kind] += 1
                    out = buckets[zlib.crc32(cid.encode()) % BUCKETS]
                    out.write(line)
                    out.write("\n")
        finally:
            for f in buckets:
                f.close()
        results = self.store.results_path(batch.id)
        tmp = results.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            for k in range(BUCKETS):
                with open(work / f"{k:02d}.jsonl", "rb") as part:
                    shutil.copyfileobj(part, out, 1 << 20)
        tmp.replace(results)
        shutil.rmtree(work, ignore_errors=True)
        ended_at = min(self.clock.now(), batch.expires_at)
        self.store.end(batch, ended_at, counts)
        self.stats.incr("batches_ended")
        self.stats.incr("requests_processed", batch.request_count)
        for kind in ("errored", "expired", "canceled"):
            if counts[kind]:
                self.stats.incr(f"results_{kind}", counts[kind])

    def _answer(self, cid: str, params: Any, raw: bytes) -> tuple[str, str]:
        problem = check_params(params)
        if problem is not None:
            return "errored", errored_line(cid, "invalid_request_error", problem)
        injected = self.faults.request_outcome(cid)
        if injected == "expired":
            self.stats.fault("expired")
            return "expired", _simple_line(cid, "expired")
        if injected is not None:
            self.stats.fault("errored")
            return "errored", errored_line(cid, injected, _fault_message(injected))
        try:
            answer = self.responder(params, cid)
        except ResponderError as exc:
            return "errored", errored_line(cid, exc.error_type, exc.message)
        except Exception as exc:  # a plug-in bug becomes an api_error for that request only
            return "errored", errored_line(cid, "api_error", f"responder raised {type(exc).__name__}: {exc}")
        if answer.get("type") == "error":
            err = answer.get("error") or {}
            return "errored", errored_line(cid, err.get("type", "api_error"), err.get("message", ""))
        info = models.lookup(params["model"])
        min_tokens = self.config.cache_min_tokens
        if min_tokens is None:
            min_tokens = info.cache_min_tokens if info else 1024
        input_usage = self.cache.account(params, min_tokens)
        message = finish_message(answer, params, input_usage, ids.stable_id("msg", raw))
        return "succeeded", _dumps({"custom_id": cid, "result": {"type": "succeeded", "message": message}})


def _fault_message(error_type: str) -> str:
    return "Overloaded" if error_type == "overloaded_error" else "Internal server error"
