"""Wiring and lifecycle: build the parts from an EmulatorConfig, serve, shut down cleanly.

`run_emulator` is for tests and scripts (a uvicorn server in a thread, on a socket we bind
ourselves so port 0 gives a free port with no race); `serve` is the blocking CLI entry.
"""

from __future__ import annotations

import pickle
import shutil
import signal
import socket
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import uvicorn

from .clock import Clock
from .config import EmulatorConfig, Faults, update_config, update_faults
from .faults import FaultState
from .responder import load_responder
from .server import EmulatorApp
from .stats import Stats
from .store import Store
from . import tokens
from .usage import PromptCache
from .worker import Worker


@dataclass
class Emulator:
    """A running emulator: its URL, live config and counters."""

    config: EmulatorConfig
    root: Path
    store: Store
    clock: Clock
    stats: Stats
    cache: PromptCache
    worker: Worker
    app: EmulatorApp
    base_url: str = ""
    _temp_root: bool = field(default=False, repr=False)

    def set_faults(self, **changes: Any) -> None:
        """Change fault knobs of the running emulator, e.g. `set_faults(http_errors=[529, 529])`."""
        update_faults(self.config.faults, changes)

    def clear_faults(self) -> None:
        self.config.faults = Faults(seed=self.config.faults.seed)

    def configure(self, **changes: Any) -> None:
        """Change runtime config, e.g. `configure(latency=5.0, time_scale=3600)`."""
        update_config(self.config, changes)
        if "latency" in changes:
            self.store.reschedule(self.config.latency)
        self.worker.wake()

    def clear_cache(self) -> None:
        """Forget the prompt cache (in the worker thread or the processing process)."""
        self.worker.clear_cache()

    def counters(self) -> dict[str, Any]:
        """The same dict `GET /_emulator/stats` returns."""
        return {**self.stats.snapshot(), "batches": self.store.count(), "tokenizer": tokens.describe()}


def build(config: EmulatorConfig) -> Emulator:
    """Create the store, clock, worker and ASGI app for `config` (nothing is served yet)."""
    temp = config.state_dir is None
    root = Path(tempfile.mkdtemp(prefix="batch-bridge-emulator-")) if temp else Path(config.state_dir)  # type: ignore[arg-type]
    root.mkdir(parents=True, exist_ok=True)
    clock = Clock(lambda: config.time_scale, anchor_path=root / "emulator.json")
    store = Store(root)
    stats = Stats()
    tokens.counter()  # loaded now, so that a missing tokenizer file is logged when the emulator starts
    cache = PromptCache()
    faults = FaultState(config)
    if config.worker_processes and callable(config.responder):
        _check_picklable(config.responder)
    worker = Worker(store, clock, config, load_responder(config.responder), cache, stats)
    app = EmulatorApp(config, store, clock, worker, faults, stats)
    return Emulator(config, root, store, clock, stats, cache, worker, app, _temp_root=temp)


def _check_picklable(responder: Any) -> None:
    problem = "it is defined in __main__" if getattr(responder, "__module__", None) == "__main__" else None
    if problem is None:
        try:
            pickle.dumps(responder)
        except Exception as exc:
            problem = f"it cannot be pickled ({exc})"
    if problem is not None:
        raise ValueError(
            f"worker_processes > 0 runs the responder in child processes, which import it by name; "
            f"{responder!r} will not do: {problem}. Pass 'package.module:function' or a function of an "
            "importable module, or set worker_processes=0."
        )


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this; without it a JSON answer (headers and body are two
    # writes) waits ~40 ms for the client's delayed ACK on every reused connection.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)  # listening before the URL is announced: early clients wait in the backlog
    sock.set_inheritable(True)
    return sock


def _url(host: str, sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _ForegroundServer(uvicorn.Server):
    """uvicorn re-raises SIGINT/SIGTERM after its shutdown, which would kill the process before
    the worker stops and the temp state dir is removed; here a signal is a normal, clean exit."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def _uvicorn_config(emu: Emulator, in_process: bool) -> uvicorn.Config:
    return uvicorn.Config(
        emu.app,
        http="h11",  # connection-level faults reach the transport through h11's cycle
        loop="asyncio",
        lifespan="off",
        access_log=False,  # request lines would be noise at 100k-request scale
        log_level=emu.config.log_level,
        log_config=None if in_process else uvicorn.config.LOGGING_CONFIG,
        timeout_graceful_shutdown=2,
        timeout_keep_alive=30,
    )


def _shutdown(emu: Emulator) -> None:
    emu.worker.stop()
    if emu._temp_root:
        shutil.rmtree(emu.root, ignore_errors=True)


@contextmanager
def run_emulator(config: EmulatorConfig | None = None) -> Iterator[Emulator]:
    """Serve an emulator in a background thread: `with run_emulator() as emu: emu.base_url`."""
    config = config or EmulatorConfig()
    emu = build(config)
    sock = _bind(config.host, config.port)
    emu.base_url = _url(config.host, sock)
    server = uvicorn.Server(_uvicorn_config(emu, in_process=True))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="emulator-http", daemon=True)
    emu.worker.start()
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the emulator's HTTP server stopped during startup; see the log above")
            thread.join(timeout=0.01)
        yield emu
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
        _shutdown(emu)


def serve(config: EmulatorConfig) -> None:
    """Serve in the foreground until SIGINT/SIGTERM; the first stdout line is the base URL."""
    emu = build(config)
    sock = _bind(config.host, config.port)
    emu.base_url = _url(config.host, sock)
    print(emu.base_url, flush=True)
    print(f"emulator state dir: {emu.root}", file=sys.stderr, flush=True)
    emu.worker.start()
    try:
        _ForegroundServer(_uvicorn_config(emu, in_process=False)).run(sockets=[sock])
    finally:
        sock.close()
        _shutdown(emu)
