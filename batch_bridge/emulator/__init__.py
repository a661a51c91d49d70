"""A local emulator of Anthropic's Message Batches API, faithful enough that the official SDK
cannot tell it from the real service, with fault injection for testing clients.

    from batch_bridge.emulator import EmulatorConfig, run_emulator

    with run_emulator(EmulatorConfig(latency=0)) as emu:
        client = anthropic.Anthropic(api_key="sk-test", base_url=emu.base_url)
        emu.set_faults(http_errors=[529, 529])

It imports nothing from the rest of batch_bridge. See docs/emulator.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import EmulatorConfig, Faults
from .responder import ResponderError, default_responder

if TYPE_CHECKING:
    from .runner import Emulator, run_emulator, serve

__all__ = ["Emulator", "EmulatorConfig", "Faults", "ResponderError", "default_responder", "run_emulator", "serve"]
_RUNNER_NAMES = {"Emulator", "run_emulator", "serve"}


def __getattr__(name: str) -> Any:
    # The server (uvicorn, starlette) is imported on first use, so the processing process,
    # which imports this package for processing.py only, does not load it.
    if name in _RUNNER_NAMES:
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
