"""The processing process: a child Python process that runs `process_batch` for the worker.

Why a separate process: the per-request work (~25 µs each, pure Python) holds the GIL, so in
the server process it starves the HTTP side: with a batch being processed, a create body is
parsed at half speed and every poll and results chunk waits for the interpreter. A
`ProcessingChild` is long-lived (started with the first batch it gets) and processes one batch at
a time; `worker.py` runs one per lane and decides which batches may run at once.

A plain `python -c` subprocess rather than a multiprocessing spawn: spawn re-imports the host's
`__main__`, so a script without an `if __name__ == "__main__"` guard would start its emulator
again inside the child; and a fresh interpreter inherits no lock held by the server's threads.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any, Callable

from .processing import Interruption, Job, Outcome, process_batch
from .responder import Responder, load_responder
from .usage import CacheNeeded, NoPromptCache, PromptCache


class ProcessingChild:
    """One processing process and the pipe to it.

    Its own prompt cache serves the jobs not marked `cache_free`. Messages are pickles over a
    socketpair (`multiprocessing.connection.Connection`): the parent sends ("init", sys.path,
    responder) once, then ("process", Job), ("interrupt", kind), ("clear_cache",) or ("stop",);
    the child answers init with True, each job with an Outcome or ("cache_needed",), and a
    failure with ("error", traceback text).
    """

    def __init__(self, responder_spec: str | Responder | None) -> None:
        parent_end, child_end = socket.socketpair()
        code = f"from batch_bridge.emulator.child import child_main; child_main({child_end.fileno()})"
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code], pass_fds=[child_end.fileno()], stdin=subprocess.DEVNULL
        )
        child_end.close()
        self._conn = Connection(parent_end.detach())
        self._send_lock = threading.Lock()
        self._send(("init", list(sys.path), responder_spec))
        answer = self._conn.recv() if self._conn.poll(120) else ("error", "no answer within 120 s")
        if answer is not True:
            self.stop()
            raise RuntimeError(f"the processing process could not start:\n{answer[1]}")

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.poll() is None

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self._conn.send(message)

    def run(self, job: Job, interrupted: Callable[[], Interruption | None], stopping: threading.Event) -> Outcome:
        """Process `job` in the child; forward a cancel or the expiry when `interrupted()` says so."""
        self._send(("process", job))
        forwarded = job.mode != "process"
        while not self._conn.poll(0.05):
            if stopping.is_set() or not self.alive():
                self.stop()
                raise RuntimeError(f"processing of {job.batch_id} stopped: the processing process is gone")
            if not forwarded:
                why = interrupted()
                if why is not None:
                    self._send(("interrupt", why))
                    forwarded = True
        answer = self._conn.recv()
        if answer == ("cache_needed",):
            raise CacheNeeded()
        if isinstance(answer, tuple):
            raise RuntimeError(f"processing of {job.batch_id} failed in the processing process:\n{answer[1]}")
        return answer  # type: ignore[no-any-return]

    def clear_cache(self) -> None:
        self._send(("clear_cache",))

    def stop(self) -> None:
        """Ask the child to exit; kill it if it does not within 0.5 s (e.g. mid-batch)."""
        try:
            self._send(("stop",))
        except OSError:
            pass
        try:
            self._proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=5)
        self._conn.close()


def child_main(fd: int) -> None:
    """The processing process: serve jobs from the parent until "stop" or the parent is gone."""
    # Ctrl-C in a terminal reaches the whole process group; the parent decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(fd)
    _, sys_path, responder_spec = conn.recv()
    sys.path[:] = sys_path  # a plug-in responder importable in the parent is importable here
    try:
        responder = load_responder(responder_spec)
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(True)
    cache = PromptCache()
    later: list[tuple[Any, ...]] = []  # messages that arrived while a batch was being processed
    interruption: list[Interruption] = []

    def interrupted() -> Interruption | None:
        while conn.poll():
            message = conn.recv()
            if message[0] == "interrupt":
                interruption.append(message[1])
            else:
                later.append(message)
        return interruption[0] if interruption else None

    while True:
        if later:
            message = later.pop(0)
        else:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the server is gone
                return
        if message[0] == "stop":
            return
        if message[0] == "clear_cache":
            cache.clear()
        elif message[0] == "process":  # a late "interrupt" of a finished batch is ignored
            interruption.clear()
            start = time.process_time()
            job: Job = message[1]
            try:
                outcome = process_batch(job, responder, NoPromptCache() if job.cache_free else cache, interrupted)
            except CacheNeeded:
                conn.send(("cache_needed",))
                continue
            except Exception:
                conn.send(("error", traceback.format_exc()))
                continue
            outcome.cpu_seconds = time.process_time() - start
            conn.send(outcome)
