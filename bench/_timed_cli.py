"""`batch-bridge` with phase stamps: the real CLI (`batch_bridge.cli.main`), with a few core functions
wrapped so that each call writes `@@phase <name> <start> <end>` (CLOCK_MONOTONIC, comparable across
processes on Linux) to stderr when it returns. Nothing else changes; the wrappers cost microseconds.

Used by bench_scale.py and bench_submit_memory.py to split wall time and peak RSS by phase.

    .venv/bin/python bench/_timed_cli.py run --poll-interval 1
"""

from __future__ import annotations

import bisect
import sys
import time
from collections import Counter, defaultdict
from typing import Any, Callable

from batch_bridge import api, bridge, collect, results, state, submit


def _stamp(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*a: Any, **kw: Any) -> Any:
        t = time.monotonic()
        try:
            return fn(*a, **kw)
        finally:
            sys.stderr.write(f"@@phase {name} {t:.6f} {time.monotonic():.6f}\n")
            sys.stderr.flush()
    return wrapper


def _stamp_history(write: Callable[..., Any]) -> Callable[..., Any]:
    """results._write with the writes of history parts stamped ("publish_history")."""
    stamped = _stamp("publish_history", write)

    def wrapper(con: Any, query: str, dest: Any, *a: Any, **kw: Any) -> Any:
        if dest.parent.name == "history" and dest.stem != "_schema":
            return stamped(con, query, dest, *a, **kw)
        return write(con, query, dest, *a, **kw)
    return wrapper


def _stamp_open_close(connect: Callable[..., Any]) -> Callable[..., Any]:
    """state.connect with its open ("state_open") and its close, a checkpoint ("state_close"), stamped."""
    from contextlib import contextmanager

    def _write(name: str, t: float) -> None:
        sys.stderr.write(f"@@phase {name} {t:.6f} {time.monotonic():.6f}\n")
        sys.stderr.flush()

    @contextmanager
    def wrapped(*a: Any, **kw: Any) -> Any:
        cm = connect(*a, **kw)
        t = time.monotonic()
        con = cm.__enter__()
        _write("state_open", t)
        try:
            yield con
        except BaseException:
            t = time.monotonic()
            if not cm.__exit__(*sys.exc_info()):
                _write("state_close", t)
                raise
            _write("state_close", t)
        else:
            t = time.monotonic()
            cm.__exit__(None, None, None)
            _write("state_close", t)
    return wrapped


def install() -> None:
    bridge.load_jobs = _stamp("manifest", bridge.load_jobs)
    submit.plan_jobs = _stamp("plan", submit.plan_jobs)
    submit.write_requests = _stamp("write_requests", submit.write_requests)
    api.create_batch = _stamp("upload", api.create_batch)
    api.retrieve = _stamp("poll", api.retrieve)
    api.download_results = _stamp("download", api.download_results)
    collect.load_downloaded = _stamp("load", collect.load_downloaded)
    collect._insert_responses = _stamp("load_insert", collect._insert_responses)  # one slice's read + INSERT
    collect._finish_batch = _stamp("load_finish", collect._finish_batch)  # a batch marked collected
    state.fold_outcomes = _stamp("fold", state.fold_outcomes)  # loaded answers folded into the summaries
    bridge.publish = _stamp("publish", bridge.publish)
    results._write = _stamp_history(results._write)
    # Finer stamps inside "other", for the time a job of many batches spends between them.
    collect._cut_slice = _stamp("load_cut", collect._cut_slice)
    submit.send_pending = _stamp("send_pending", submit.send_pending)
    submit.pending_submissions = _stamp("pending", submit.pending_submissions)
    collect.refresh = _stamp("refresh", collect.refresh)
    state.connect = _stamp_open_close(state.connect)
    sleep = _stamp("sleep", time.sleep)
    for fn in (bridge.run, bridge.wait, bridge.submit, bridge.collect, bridge.sync):
        if fn.__kwdefaults__ and "sleep" in fn.__kwdefaults__:
            fn.__kwdefaults__["sleep"] = sleep


# Exclusive attribution when phases nest or overlap: the first active one in this order wins.
PRIORITY = ("fold", "publish_history", "publish", "write_requests", "download", "upload", "poll", "sleep", "load_insert", "load_finish", "load_cut",
            "load", "plan", "manifest", "state_open", "state_close", "refresh", "pending", "send_pending")


def parse(lines: list[tuple[float, str]]) -> tuple[list[tuple[str, float, float]], list[tuple[float, str]]]:
    """Split stderr into phase intervals and the other (progress) lines."""
    phases, other = [], []
    for t, line in lines:
        if line.startswith("@@phase "):
            _, name, a, b = line.split()
            phases.append((name, float(a), float(b)))
        else:
            other.append((t, line))
    return phases, other


class Timeline:
    """The phase active at each moment (innermost by PRIORITY, "other" outside them all), found by a binary
    search: built once in one sweep over the phases' bounds, as a 10M-row run has tens of thousands of
    phases and a sample or a segment each, which a scan of every phase per question made quadratic."""

    def __init__(self, phases: list[tuple[str, float, float]]):
        self.bounds = sorted({a for _, a, _ in phases} | {b for _, _, b in phases})
        delta: dict[float, Counter[str]] = defaultdict(Counter)  # phases opening (+1) and closing (-1) at a bound
        for name, a, b in phases:
            if name in PRIORITY and a < b:
                delta[a][name] += 1
                delta[b][name] -= 1
        open_: Counter[str] = Counter()
        self.names: list[str] = []  # the phase of [bounds[i], bounds[i + 1])
        for x in self.bounds:
            open_.update(delta.get(x, {}))
            self.names.append(next((p for p in PRIORITY if open_[p] > 0), "other"))

    def at(self, t: float) -> str:
        i = bisect.bisect_right(self.bounds, t) - 1
        return self.names[i] if 0 <= i < len(self.bounds) - 1 else "other"


def exclusive(phases: list[tuple[str, float, float]], t0: float, t1: float,
              timeline: Timeline | None = None) -> dict[str, float]:
    """Seconds of [t0, t1] attributed to each phase (innermost by PRIORITY), 'other' for the rest."""
    timeline = timeline or Timeline(phases)
    points = sorted({t0, t1, *(a for _, a, _ in phases), *(b for _, _, b in phases)})
    points = [p for p in points if t0 <= p <= t1]
    out: dict[str, float] = {}
    for a, b in zip(points, points[1:]):
        name = timeline.at((a + b) / 2)
        out[name] = out.get(name, 0.0) + (b - a)
    return out


if __name__ == "__main__":
    install()
    from batch_bridge.cli import main

    sys.argv[0] = "batch-bridge"
    main()


def peaks(timeline: Timeline, samples: list[tuple[float, int]]) -> dict[str, int]:
    """The largest sample (e.g. RSS) taken while each phase was active."""
    out: dict[str, int] = {}
    for t, value in samples:
        name = timeline.at(t)
        out[name] = max(out.get(name, 0), value)
    return out
