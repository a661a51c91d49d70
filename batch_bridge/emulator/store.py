"""Batches on disk, and the named state transitions that move them.

Layout under the state dir (one directory per batch, so delete is one rename + rmtree):

    emulator.json            clock anchor (see clock.py)
    uploads/                 create bodies while they stream in (deleted after parsing)
    batches/<id>/batch.json  metadata, written to a temp name and renamed (atomic)
    batches/<id>/requests.jsonl  one `{"custom_id","params"}` line per request, request order
    batches/<id>/results.jsonl   written once when the batch ends, never in request order

Metadata is small and kept in memory too (a dict guarded by a lock); request and result
bodies are only ever on disk, so memory does not grow with batch size.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

ProcessingStatus = Literal["in_progress", "canceling", "ended"]
ResultType = Literal["succeeded", "errored", "canceled", "expired"]
RESULT_TYPES: tuple[ResultType, ...] = ("succeeded", "errored", "canceled", "expired")

EXPIRY_SECONDS = 24 * 3600  # expires_at = created_at + 24 h
ARCHIVE_SECONDS = 29 * 24 * 3600  # results kept 29 days from created_at


class InvalidStateTransition(Exception):
    """A transition the API does not allow (e.g. cancel an ended batch); message says why."""


def rfc3339(ts: float | None) -> str | None:
    """Epoch seconds -> `2024-09-24T18:37:24.100435Z` (microseconds, Z), like the API."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Batch:
    """One batch's metadata; times are emulated epoch seconds."""

    id: str
    seq: int  # creation order, breaks ties between equal created_at values
    created_at: float
    request_count: int
    due_at: float  # when processing may start: created_at + latency
    created_real: float  # real time of creation, for the transient-404 fault
    processing_status: ProcessingStatus = "in_progress"
    ended_at: float | None = None
    cancel_initiated_at: float | None = None
    counts: dict[str, int] = field(default_factory=lambda: {t: 0 for t in RESULT_TYPES})

    @property
    def expires_at(self) -> float:
        return self.created_at + EXPIRY_SECONDS

    @property
    def archive_at(self) -> float:
        return self.created_at + ARCHIVE_SECONDS

    def is_archived(self, now: float) -> bool:
        return now >= self.archive_at

    def to_api(self, now: float, results_base: str, results_url_delay: float = 0.0) -> dict[str, Any]:
        """The `MessageBatch` object exactly as the API shapes it; `results_url` null for
        `results_url_delay` seconds after the batch ended (the fault of that name)."""
        ended = self.processing_status == "ended"
        has_results = ended and now >= (self.ended_at or now) + results_url_delay
        counts = self.counts if ended else {t: 0 for t in RESULT_TYPES}
        return {
            "id": self.id,
            "type": "message_batch",
            "processing_status": self.processing_status,
            "request_counts": {"processing": 0 if ended else self.request_count, **counts},
            "created_at": rfc3339(self.created_at),
            "expires_at": rfc3339(self.expires_at),
            "ended_at": rfc3339(self.ended_at),
            "cancel_initiated_at": rfc3339(self.cancel_initiated_at),
            "archived_at": rfc3339(self.archive_at) if self.is_archived(now) else None,
            "results_url": f"{results_base}/v1/messages/batches/{self.id}/results" if has_results else None,
        }


# --- named state transitions: each refuses an illegal move ------------------------------


def start_canceling(batch: Batch, now: float) -> None:
    """in_progress -> canceling (sets cancel_initiated_at)."""
    if batch.processing_status != "in_progress":
        raise InvalidStateTransition(
            f"Batch {batch.id} cannot be canceled: its processing_status is {batch.processing_status!r}; "
            "only in_progress batches can be canceled."
        )
    batch.processing_status = "canceling"
    batch.cancel_initiated_at = now


def end_batch(batch: Batch, ended_at: float, counts: dict[str, int]) -> None:
    """in_progress | canceling -> ended, with the final outcome counts."""
    if batch.processing_status == "ended":
        raise InvalidStateTransition(f"Batch {batch.id} has already ended.")
    if sum(counts.values()) != batch.request_count:
        raise InvalidStateTransition(
            f"Batch {batch.id}: outcome counts {counts} do not add up to {batch.request_count} requests."
        )
    batch.processing_status = "ended"
    batch.ended_at = ended_at
    batch.counts = {t: counts.get(t, 0) for t in RESULT_TYPES}


def check_deletable(batch: Batch) -> None:
    """Only ended batches can be deleted; an in-progress one must be canceled first."""
    if batch.processing_status != "ended":
        raise InvalidStateTransition(
            f"Batch {batch.id} cannot be deleted while its processing_status is {batch.processing_status!r}; "
            "cancel it and wait until it has ended."
        )


class Store:
    """Thread-safe registry of batches backed by the state dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.batches_dir = root / "batches"
        self.uploads_dir = root / "uploads"
        self.batches_dir.mkdir(parents=True, exist_ok=True)
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._batches: dict[str, Batch] = {}
        self._seq = 0
        self._load()

    def _load(self) -> None:
        for leftover in self.uploads_dir.iterdir():  # bodies of creates interrupted by a stop
            leftover.unlink(missing_ok=True)
        for d in self.batches_dir.iterdir():
            meta = d / "batch.json"
            if d.name.startswith(".") or not meta.exists():
                # A half-deleted batch, or a create that never finished: not a batch.
                shutil.rmtree(d, ignore_errors=True)
                continue
            batch = Batch(**json.loads(meta.read_text()))
            self._batches[batch.id] = batch
            self._seq = max(self._seq, batch.seq)

    # --- files ---------------------------------------------------------------------------

    def new_upload_path(self) -> Path:
        return self.uploads_dir / f"{uuid.uuid4().hex}.json"

    def batch_dir(self, batch_id: str) -> Path:
        return self.batches_dir / batch_id

    def requests_path(self, batch_id: str) -> Path:
        return self.batch_dir(batch_id) / "requests.jsonl"

    def results_path(self, batch_id: str) -> Path:
        return self.batch_dir(batch_id) / "results.jsonl"

    def save(self, batch: Batch) -> None:
        """Write batch.json atomically (temp name + rename)."""
        path = self.batch_dir(batch.id) / "batch.json"
        tmp = path.with_suffix(".tmp")
        with self._lock:
            tmp.write_text(json.dumps(asdict(batch)))
            os.replace(tmp, path)

    # --- registry ------------------------------------------------------------------------

    def add(self, batch_id: str, created_at: float, request_count: int, due_at: float, created_real: float) -> Batch:
        """Register a batch whose requests.jsonl is already in place; it is visible from now on."""
        with self._lock:
            self._seq += 1
            batch = Batch(
                id=batch_id,
                seq=self._seq,
                created_at=created_at,
                request_count=request_count,
                due_at=due_at,
                created_real=created_real,
            )
            self.save(batch)
            self._batches[batch_id] = batch
            return batch

    def get(self, batch_id: str) -> Batch | None:
        with self._lock:
            return self._batches.get(batch_id)

    def unfinished(self) -> list[Batch]:
        with self._lock:
            return sorted((b for b in self._batches.values() if b.processing_status != "ended"), key=lambda b: b.seq)

    def count(self) -> int:
        with self._lock:
            return len(self._batches)

    def queued_requests(self) -> int:
        """Requests in batches not yet ended: what the workspace's processing-queue limit counts."""
        with self._lock:
            return sum(b.request_count for b in self._batches.values() if b.processing_status != "ended")

    def page(self, limit: int, after_id: str | None, before_id: str | None,
             created_real_before: float | None = None) -> tuple[list[Batch], bool]:
        """Newest first; `after_id` pages towards older batches, `before_id` towards newer ones. Batches
        created (in real time) after `created_real_before` are not listed yet (propagation delay)."""
        with self._lock:
            ordered = sorted((b for b in self._batches.values()
                              if created_real_before is None or b.created_real <= created_real_before),
                             key=lambda b: (b.created_at, b.seq), reverse=True)
        ids = [b.id for b in ordered]
        if after_id is not None:
            if after_id not in ids:
                return [], False
            rest = ordered[ids.index(after_id) + 1 :]
            return rest[:limit], len(rest) > limit
        if before_id is not None:
            if before_id not in ids:
                return [], False
            head = ordered[: ids.index(before_id)]
            return head[-limit:] if limit else [], len(head) > limit
        return ordered[:limit], len(ordered) > limit

    def reschedule(self, latency: float) -> None:
        """A new latency applies to batches still in progress too (due at created_at + latency), so a
        test or an operator can make waiting batches end now (latency 0) or hold them."""
        with self._lock:
            for b in self._batches.values():
                if b.processing_status == "in_progress":
                    b.due_at = b.created_at + latency
                    self.save(b)

    def cancel(self, batch: Batch, now: float) -> None:
        """start_canceling + persist."""
        with self._lock:
            start_canceling(batch, now)
            self.save(batch)

    def end(self, batch: Batch, ended_at: float, counts: dict[str, int]) -> None:
        """end_batch + persist."""
        with self._lock:
            end_batch(batch, ended_at, counts)
            self.save(batch)

    def delete(self, batch: Batch) -> None:
        """Forget an ended batch and remove its files."""
        with self._lock:
            check_deletable(batch)
            self._batches.pop(batch.id, None)
            d = self.batch_dir(batch.id)
            trash = self.batches_dir / f".deleted-{batch.id}"
            os.replace(d, trash)  # atomic: a crash leaves no half-deleted batch behind
        shutil.rmtree(trash, ignore_errors=True)
