"""imports.import_module: the collector paused for a first import of a large library, counted across
threads, restored whatever happens, and the library's objects moved out of its reach; and the SDK
client that api.client_on_first_use stands for, built in a thread of its own ahead of its first use.

Each case runs in a fresh interpreter: the collector's state and the frozen generation belong to the
process, and a module is imported once per process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def _run(tmp_path: Path, code: str, **modules: str) -> str:
    for name, body in modules.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    script = "import sys\nsys.path.insert(0, %r)\n" % str(tmp_path) + textwrap.dedent(code)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


# A module that makes many container objects at import (as a library's classes do) and records how many
# collections ran meanwhile and whether the collector was on at its end.
_BIG = """
    import gc
    runs = []
    gc.callbacks.append(lambda phase, info: runs.append(phase) if phase == "start" else None)
    kept = [{"n": i, "items": [i]} for i in range(100_000)]
    gc.callbacks.pop()
    collections_during_import = len(runs)
    enabled_at_end = gc.isenabled()
"""


def test_a_first_import_runs_without_collections_and_leaves_its_objects_frozen(tmp_path):
    out = _run(tmp_path, """
        import gc
        from batch_bridge import imports
        before = gc.get_freeze_count()
        m = imports.import_module("big")
        frozen = gc.get_freeze_count() - before
        again = imports.import_module("big")
        print(m.collections_during_import, m.enabled_at_end, gc.isenabled(), frozen >= 100_000,
              again is m, gc.get_freeze_count() - before == frozen)
    """, big=_BIG)
    assert out == "0 False True True True True"


def test_the_same_import_unpaused_is_collected_many_times(tmp_path):
    # The case above means something: imported plainly, the module's objects trigger collections.
    out = _run(tmp_path, """
        import importlib
        m = importlib.import_module("big")
        print(m.collections_during_import > 10, m.enabled_at_end)
    """, big=_BIG)
    assert out == "True True"


def test_a_failing_import_restores_the_collector(tmp_path):
    out = _run(tmp_path, """
        import gc
        from batch_bridge import imports
        try:
            imports.import_module("broken")
        except ZeroDivisionError:
            print("raised", gc.isenabled())
        try:
            imports.import_module("no_such_module_anywhere")
        except ModuleNotFoundError:
            print("missing", gc.isenabled())
    """, broken="x = 1 / 0\n")
    assert out.splitlines() == ["raised True", "missing True"]


def test_a_collector_the_caller_turned_off_stays_off(tmp_path):
    out = _run(tmp_path, """
        import gc
        from batch_bridge import imports
        gc.disable()
        imports.import_module("big")
        print(gc.isenabled())
    """, big=_BIG)
    assert out == "False"


def test_overlapping_imports_in_two_threads_resume_the_collector_only_when_both_end(tmp_path):
    # `slow` is still importing in a thread when the main thread's import of `big` ends: the collector
    # must stay paused until `slow` ends too, then run again.
    out = _run(tmp_path, """
        import gc, threading
        import started
        from batch_bridge import imports
        t = threading.Thread(target=imports.import_module, args=("slow",))
        t.start()
        started.begun.wait(30)
        imports.import_module("big")
        after_big = gc.isenabled()
        started.big_done.set()
        t.join(30)
        import slow
        print(after_big, slow.enabled_at_end, gc.isenabled())
    """, started="import threading\nbegun = threading.Event()\nbig_done = threading.Event()\n",
        slow="""
        import gc, started
        started.begun.set()
        started.big_done.wait(30)
        enabled_at_end = gc.isenabled()
    """, big=_BIG)
    assert out == "False False True"


# --- the SDK client, built beside the caller's work (api._OnFirstUse) -------------------------------


def test_the_client_is_built_in_a_thread_before_its_first_use(tmp_path):
    out = _run(tmp_path, """
        import threading, time
        from batch_bridge import api
        built = []

        class Client:
            name = "the client"

        def build():
            built.append(threading.current_thread().name)
            return Client()

        stand_in = api._OnFirstUse(build)
        deadline = time.monotonic() + 30
        while not built and time.monotonic() < deadline:
            time.sleep(0.01)
        print(built, stand_in.name, stand_in.name, built)
    """)
    # Built once, by its own thread, before any attribute was asked for; later uses reuse it.
    assert out == "['build-anthropic-client'] the client the client ['build-anthropic-client']"


def test_a_client_whose_build_fails_ahead_is_built_again_at_first_use_and_raises_there(tmp_path):
    out = _run(tmp_path, """
        import threading
        from batch_bridge import api
        calls = []

        def flaky():  # fails in the thread, works when the caller asks
            calls.append(threading.current_thread().name)
            if len(calls) == 1:
                raise OSError("no TLS context yet")
            return "built"

        stand_in = api._OnFirstUse(flaky)
        for t in threading.enumerate():
            if t.name == "build-anthropic-client":
                t.join(30)
        print(stand_in.upper(), calls)

        def broken():
            raise ValueError("base_url is not a URL")

        stand_in = api._OnFirstUse(broken)
        for t in threading.enumerate():
            if t.name == "build-anthropic-client":
                t.join(30)
        try:
            stand_in.messages
        except ValueError as e:
            print("raised:", e)
    """)
    assert out.splitlines() == ["BUILT ['build-anthropic-client', 'MainThread']", "raised: base_url is not a URL"]
