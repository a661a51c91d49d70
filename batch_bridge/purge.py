"""Retention for the archives: request files and raw result files hold user data, so they are kept only
as long as they are useful and then removed by `purge`.

An archive is removable once nothing can need it again: its submission was abandoned, or its batch was
collected (its rows are in `responses`) or lost (its rows are sent again from new files). Files of
batches still in flight (prepared, creating, submitted, downloaded) are never touched, whatever their
age: a crash-recovery or a load still reads them. Files no journal row refers to (left by a run killed
before its journal was committed, or `.part` downloads) are removable too. Age is the file's mtime.

The state keeps a note on each submission/batch whose archive was purged; nothing else changes, so
`status` and the results source are unaffected. The caller holds the project lock (`state.exclusive`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import state
from .config import Settings
from .errors import ConfigError

DAY = 86400.0


@dataclass
class PurgeReport:
    older_than_days: float
    dry_run: bool
    removed: list[str] = field(default_factory=list)  # paths removed (or, with dry_run, that would be)
    bytes: int = 0
    kept_in_flight: int = 0  # archive files kept because their batch may still need them
    kept_recent: int = 0  # removable files younger than the retention

    def to_json(self) -> dict[str, object]:
        return {"older_than_days": self.older_than_days, "dry_run": self.dry_run, "removed": self.removed,
                "bytes": self.bytes, "kept_in_flight": self.kept_in_flight, "kept_recent": self.kept_recent}


def _note(old: str | None, text: str) -> str:
    return f"{old}; {text}" if old else text


def purge(
    settings: Settings, older_than_days: float | None = None, dry_run: bool = False, *,
    now: Callable[[], float] = time.time,
) -> PurgeReport:
    """Remove request and raw result archives of finished batches older than the retention."""
    days = older_than_days if older_than_days is not None else settings.retention_days
    if days is None:
        raise ConfigError(
            "no retention given: pass --older-than DAYS or set BATCH_BRIDGE_RETENTION_DAYS",
            hint="e.g. BATCH_BRIDGE_RETENTION_DAYS=30 keeps 30 days of request and result archives",
        )
    if days < 0:
        raise ConfigError(f"retention {days:g} days must be >= 0")
    report = PurgeReport(older_than_days=float(days), dry_run=dry_run)
    cutoff = now() - days * DAY
    with state.connect(settings) as con:
        subs = con.execute(
            "SELECT s.submission_id, s.state, s.request_file, b.local_state, s.note FROM bb_state.submissions s "
            "LEFT JOIN bb_state.batches b ON b.batch_id = s.batch_id"
        ).fetchall()
        batches = con.execute(
            "SELECT batch_id, local_state, result_file, note FROM bb_state.batches"
        ).fetchall()
        done_subs: dict[Path, tuple[str, str | None]] = {}
        keep: set[Path] = set()
        for sub_id, sub_state, request_file, local_state, note in subs:
            path = Path(request_file)
            finished = sub_state == "abandoned" or (sub_state == "created" and local_state in ("collected", "lost", "foreign"))
            if finished:
                done_subs[path] = (sub_id, note)
            else:
                keep.add(path)
        done_batches: dict[Path, tuple[str, str | None]] = {}
        for batch_id, local_state, result_file, note in batches:
            path = Path(result_file) if result_file else settings.raw_results_dir / f"{batch_id}.jsonl"
            if local_state in ("collected", "lost", "foreign"):
                done_batches[path] = (batch_id, note)
            else:
                keep.add(path)
                keep.add(path.with_name(path.name + ".part"))

        candidates: list[Path] = []
        for d in (settings.requests_dir, settings.raw_results_dir):
            if d.is_dir():
                candidates += sorted(p for p in d.iterdir() if p.is_file())
        stamp = state.utcnow().isoformat(timespec="seconds") + "Z"
        for path in candidates:
            if path in keep:
                report.kept_in_flight += 1
                continue
            st = path.stat()
            if st.st_mtime > cutoff:
                report.kept_recent += 1
                continue
            report.removed.append(str(path))
            report.bytes += st.st_size
            if dry_run:
                continue
            path.unlink(missing_ok=True)
            if path in done_subs:
                sub_id, note = done_subs[path]
                con.execute("UPDATE bb_state.submissions SET note = ? WHERE submission_id = ?",
                            [_note(note, f"request file purged at {stamp}"), sub_id])
            if path in done_batches:
                batch_id, note = done_batches[path]
                con.execute("UPDATE bb_state.batches SET note = ? WHERE batch_id = ?",
                            [_note(note, f"result file purged at {stamp}"), batch_id])
    return report
