"""Importing the two large libraries a command may need, the SDK and dbt, without Python's cyclic
garbage collector walking them over and over.

`import anthropic` makes ~146,000 objects (~3,400 modules and their pydantic classes), dbt's import
~100,000; they are alive until the process ends, and neither import makes much garbage. The
collector runs every 700 new objects, and every full collection walks every tracked object, so
while the import runs it walks the growing heap again and again, and after it every full collection
walks the library's objects once more (measured: 0.17 s of a `run`'s CPU spent collecting, 0.8 s of a
command that parses the project; with this module 0.015 s and 0.07 s).

So the collector is paused while the library is imported and the objects alive then are moved out of
its reach (`gc.freeze()`): the library's modules and classes are never collected anyway. What else was
alive at that moment is kept out of reach too: cycles among those objects that become garbage later
are not freed before the process ends. That is bounded by what existed at the freeze, once per library
per process.

The collector is one per process and the SDK is imported in a thread beside the main thread's work,
which may import dbt meanwhile, so pauses are counted: the collector runs again when the last one
ends, and only if it ran when the first began.
"""

from __future__ import annotations

import gc
import importlib
import sys
import threading
from types import ModuleType

_lock = threading.Lock()
_pauses = 0
_was_enabled = False


def import_module(name: str) -> ModuleType:
    """`importlib.import_module(name)`, with the collector paused for a first import (see above)."""
    module = sys.modules.get(name)
    if module is not None:
        return module
    _pause()
    try:
        module = importlib.import_module(name)
        gc.freeze()
        return module
    finally:
        _resume()


def _pause() -> None:
    global _pauses, _was_enabled
    with _lock:
        if _pauses == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _pauses += 1


def _resume() -> None:
    global _pauses
    with _lock:
        _pauses -= 1
        if _pauses == 0 and _was_enabled:
            gc.enable()
