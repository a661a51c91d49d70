"""Counters a test reads to prove what happened on the wire (e.g. "3 create POSTs, 1 batch"),
and the emulator's own CPU time, so a benchmark can tell whether the emulator is its bottleneck.

CPU time is measured per thread (`time.thread_time`) around the two heavy stages, create
parsing and batch processing (or reported by the processing processes, which run the latter
when `worker_processes` > 0); whatever the server process spent besides those is HTTP and the rest.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from contextlib import contextmanager
from typing import Any, Iterator


class Stats:
    """Thread-safe counters; `snapshot()` is what `GET /_emulator/stats` returns."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: Counter[str] = Counter()
        self._endpoints: Counter[str] = Counter()
        self._faults: Counter[str] = Counter()
        self._cpu: Counter[str] = Counter()
        self._creates_in_flight = 0  # a gauge, not a counter: `reset()` leaves it alone
        # The latest requests as (monotonic seconds, endpoint, x-stainless-retry-count): what shows that
        # a client waited a retry-after out between a refused request and its retry.
        self._arrivals: deque[tuple[float, str, int]] = deque(maxlen=10_000)

    @contextmanager
    def create_in_flight(self) -> Iterator[None]:
        with self._lock:
            self._creates_in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._creates_in_flight -= 1

    def incr(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counters[name] += n

    def endpoint(self, name: str, retry_count: int = 0) -> None:
        with self._lock:
            self._endpoints[name] += 1
            self._arrivals.append((time.monotonic(), name, retry_count))

    def arrivals(self) -> list[tuple[float, str, int]]:
        """The latest requests, oldest first: (monotonic seconds, endpoint, the SDK's retry count)."""
        with self._lock:
            return list(self._arrivals)

    def fault(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._faults[name] += n

    @contextmanager
    def cpu(self, stage: str) -> Iterator[None]:
        """Add the calling thread's CPU time inside the block to `cpu_seconds[stage]`."""
        start = time.thread_time()
        try:
            yield
        finally:
            spent = time.thread_time() - start
            with self._lock:
                self._cpu[stage] += spent

    def add_cpu(self, stage: str, seconds: float) -> None:
        """CPU time spent elsewhere (the processing process) on `stage`."""
        with self._lock:
            self._cpu[stage] += seconds

    def reset(self) -> None:
        with self._lock:
            self._counters.clear()
            self._endpoints.clear()
            self._faults.clear()
            self._cpu.clear()
            self._arrivals.clear()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                # every POST /v1/messages/batches that reached the emulator, faulted or not
                "create_posts": self._endpoints["create"],
                "batches_created": self._counters["batches_created"],
                "requests_created": self._counters["requests_created"],
                "batches_ended": self._counters["batches_ended"],
                "requests_processed": self._counters["requests_processed"],
                # batches processed in parts across the processing processes (worker.py)
                "batches_split": self._counters["batches_split"],
                "creates_rejected": self._counters["creates_rejected"],
                # POST /v1/messages (synchronous) answered with a message, or with an error
                "messages_answered": self._counters["messages_answered"],
                "messages_refused": self._counters["messages_refused"],
                # batches of "another client" stored by the neighbour_batches fault (not in batches_created)
                "neighbour_batches_created": self._counters["neighbour_batches_created"],
                # creates being read or stored right now: a client killed after sending a whole body
                # still gets its batch created, so a test waits for 0 before counting batches
                "creates_in_flight": self._creates_in_flight,
                "auth_failures": self._counters["auth_failures"],
                # answered POST /v1/messages/count_tokens (a count the plan keeps is not asked again)
                "tokens_counted": self._counters["tokens_counted"],
                "results_bytes_sent": self._counters["results_bytes_sent"],
                "http_requests": sum(self._endpoints.values()),
                "requests_by_endpoint": dict(self._endpoints),
                "faults_fired": dict(self._faults),
                # CPU seconds of the two heavy stages since the last reset, and of the server process
                # since it started (never reset; in-process it includes the host's own threads; it
                # does not include the processing processes).
                "cpu_seconds": {
                    "create_parse": round(self._cpu["create_parse"], 3),
                    "processing": round(self._cpu["processing"], 3),
                    "process_total": round(time.process_time(), 3),
                },
            }
