"""Shared helpers of the benchmark scripts: machine facts, the emulator subprocess, RSS sampling,
and a throw-away dbt project + DuckDB warehouse (built with tests/helpers.py, as the tests do).

Benchmarks print figures; they never assert on time.
"""

from __future__ import annotations

import compileall
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # tests/helpers.py: write_project, settings_for, load_staging
PY = sys.executable
BRIDGE_CLI = str(Path(PY).parent / "batch-bridge")
API_KEY = "sk-bench-key"

# The bridge's modules byte-compiled as they are now, as a wheel's install leaves them (`make install` does
# it once; edits since would otherwise be compiled again by every command where PYTHONDONTWRITEBYTECODE
# is set, as on the benchmark machine). The SDK scripts' own code is one small file each.
compileall.compile_dir(str(REPO / "batch_bridge"), quiet=1)


def machine() -> str:
    import anthropic
    import duckdb

    mem = psutil.virtual_memory().total / 2**30
    cpu = platform.processor() or platform.machine()
    return (f"nproc {os.cpu_count()}, RAM {mem:.1f} GiB, {cpu}, Linux {platform.release()}, "
            f"python {platform.python_version()}, duckdb {duckdb.__version__}, anthropic {anthropic.__version__}")


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


# --- emulator ------------------------------------------------------------------------------------


class Emulator:
    def __init__(self, proc: subprocess.Popen, base_url: str) -> None:
        self.proc = proc
        self.base_url = base_url
        self.ps = psutil.Process(proc.pid)

    def _family(self) -> list[psutil.Process]:
        # The server and its processing process (`--worker-process`, the CLI default).
        return [self.ps, *self.ps.children(recursive=True)]

    def cpu_seconds(self) -> float:
        """CPU seconds of the emulator: the server process and its live children."""
        total = 0.0
        for p in self._family():
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system
        return total

    def rss(self) -> int:
        """RSS of the server process plus its processing process."""
        total = 0
        for p in self._family():
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def cpu_split(self) -> dict[str, float]:
        """The emulator's own CPU seconds by stage (`GET /_emulator/stats`): create_parse, processing,
        process_total; an older emulator without them gives {}."""
        import json
        import urllib.request

        with urllib.request.urlopen(f"{self.base_url}/_emulator/stats", timeout=30) as r:
            return json.load(r).get("cpu_seconds", {})


@contextmanager
def emulator(latency: float = 2.0, *extra: str) -> Iterator[Emulator]:
    """`python -m batch_bridge.emulator --port 0` as a subprocess; its first stdout line is the base URL."""
    proc = subprocess.Popen(
        [PY, "-m", "batch_bridge.emulator", "--port", "0", "--latency", str(latency), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
    )
    try:
        line = proc.stdout.readline().strip() if proc.stdout else ""
        m = re.search(r"https?://\S+", line)
        if not m:
            raise RuntimeError(f"the emulator printed {line!r} instead of its base URL")
        yield Emulator(proc, m.group(0))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def sdk_client(base_url: str, **kw: Any):
    import anthropic

    return anthropic.Anthropic(api_key=API_KEY, base_url=base_url, **kw)


# --- RSS ------------------------------------------------------------------------------------------


class PeakRSS:
    """Samples a process and all its descendants every `interval` s; keeps the peak of their RSS sum,
    and their CPU seconds (user + system, all threads) so far at each sample."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.samples: list[tuple[float, int]] = []
        self.cpu: list[tuple[float, float]] = []
        self.system: list[tuple[float, float]] = []  # the system (kernel) part of it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                total, cpu, system = 0, 0.0, 0.0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                        times = p.cpu_times()
                        cpu += times.user + times.system
                        system += times.system
                    except psutil.Error:
                        pass
            except psutil.Error:
                break
            now = time.monotonic()
            self.samples.append((now, total))
            self.cpu.append((now, cpu))
            self.system.append((now, system))
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak_between(self, t0: float, t1: float) -> int:
        return max((r for t, r in self.samples if t0 <= t <= t1), default=0)


def run_measured(cmd: list[str], env: dict[str, str], *, cwd: Path | None = None) -> dict[str, Any]:
    """Run a command; wall time, peak RSS (with children, 20 ms sampling), CPU seconds so far at each
    sample, stdout, and stderr lines each stamped with the time it arrived."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[tuple[float, str]] = []
    out: list[str] = []

    def read_err() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append((time.monotonic() - t0, line.rstrip("\n")))

    def read_out() -> None:
        assert proc.stdout is not None
        out.append(proc.stdout.read())

    threads = [threading.Thread(target=read_err, daemon=True), threading.Thread(target=read_out, daemon=True)]
    with PeakRSS(proc.pid) as rss:
        for t in threads:
            t.start()
        rc = proc.wait()
        wall = time.monotonic() - t0
    for t in threads:
        t.join()
    if rc != 0:
        tail = "\n".join(line for _, line in lines[-20:])
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}:\n{tail}")
    return {"wall": wall, "peak_rss": rss.peak, "stderr": lines, "stdout": "".join(out), "t0": t0,
            "samples": [(t - t0, r) for t, r in rss.samples], "cpu_samples": [(t - t0, c) for t, c in rss.cpu],
            "system_samples": [(t - t0, c) for t, c in rss.system]}


# --- projects -------------------------------------------------------------------------------------


def job_meta(**over: Any) -> dict[str, Any]:
    meta = {"job": "items", "key": "id", "model": "claude-haiku-4-5", "max_tokens": 200,
            "system": "You label short product reviews.", "prompt_column": "prompt"}
    meta.update(over)
    return meta


def rows_sql(n: int, prompt_chars: int = 200) -> str:
    """n staging rows: id VARCHAR ('r0000001'), and a prompt of about `prompt_chars` characters."""
    filler = "the parcel arrived late but the product itself is good value for money and works well "
    reps = max(1, prompt_chars // len(filler) + 1)
    return (f"SELECT 'r' || lpad(i::VARCHAR, 8, '0') AS id, "
            f"left('review ' || i || ': ' || repeat('{filler}', {reps}), {prompt_chars}) AS prompt "
            f"FROM range({n}) t(i)")


@contextmanager
def workdir(keep: bool = False, prefix: str = "bb_bench_") -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield d
    finally:
        if not keep:
            shutil.rmtree(d, ignore_errors=True)


def make_project(root: Path, n: int, base_url: str | None, *, prompt_chars: int = 200, meta: dict | None = None,
                 **env: str):
    """A dbt project with one staging model and its table loaded directly into the warehouse file."""
    from helpers import load_staging, settings_for, write_project

    write_project(root, meta or job_meta())
    s = settings_for(root, base_url, api_key=API_KEY, BATCH_BRIDGE_LOCK_TIMEOUT="60", **env)
    load_staging(s, rows_sql(n, prompt_chars))
    return s


def staging_as_view(s) -> None:
    """The staging table renamed and a view of the old name over it (dbt's default materialization)."""
    import duckdb

    con = duckdb.connect(str(s.warehouse))
    try:
        con.execute("ALTER TABLE main.stg_items RENAME TO stg_items_rows")
        con.execute("CREATE VIEW main.stg_items AS SELECT * FROM main.stg_items_rows")
    finally:
        con.close()


def cli_env(root: Path, base_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "BATCH_BRIDGE_", "DBT_"))}
    env.update({
        "ANTHROPIC_API_KEY": API_KEY, "ANTHROPIC_BASE_URL": base_url,
        "BATCH_BRIDGE_WAREHOUSE": str(root / "warehouse.duckdb"),
        "DBT_PROJECT_DIR": str(root / "dbt_project"), "DBT_PROFILES_DIR": str(root / "profiles"),
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false", "BATCH_BRIDGE_LOCK_TIMEOUT": "60",
        **extra,
    })
    return env


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    cols = list(zip(header, *rows))
    widths = [max(len(str(c)) for c in col) for col in cols]
    fmt = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)])
