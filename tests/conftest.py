from __future__ import annotations

import os

import anthropic
import dbt.version
import duckdb
import pytest

from batch_bridge.emulator import EmulatorConfig, run_emulator

os.environ.setdefault("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")


def pytest_report_header(config):
    return (f"duckdb {duckdb.__version__}, dbt-core {dbt.version.__version__}, "
            f"anthropic {anthropic.__version__}")


@pytest.fixture
def emulator():
    """An in-process emulator on a free port (latency 0); tests change its faults at will."""
    with run_emulator(EmulatorConfig(latency=0)) as emu:
        yield emu


@pytest.fixture
def emu(emulator):
    """The emulator tests' name for the same fixture."""
    return emulator


@pytest.fixture
def client(emu):
    """The official SDK pointed at the emulator."""
    with anthropic.Anthropic(api_key="sk-test", base_url=emu.base_url) as c:
        yield c
