"""The emulator as a separate process: it serves, announces its URL, obeys the admin API and survives a restart."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import anthropic
import click
import httpx2
import pytest
from click.testing import CliRunner

from batch_bridge.emulator.cli import emulator


def start(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "batch_bridge.emulator", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:"), f"first stdout line should be the base URL, got {url!r}"
    return proc, url


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "state"


def test_help_is_a_click_command_with_an_example() -> None:
    assert isinstance(emulator, click.Command)
    result = CliRunner().invoke(emulator, ["-h"])
    assert result.exit_code == 0
    assert "--state-dir" in result.output and "ANTHROPIC_BASE_URL=http://127.0.0.1:8765" in result.output


def test_subprocess_serves_and_survives_a_restart(state_dir: Path) -> None:
    request = {
        "custom_id": "row-1",
        "params": {"model": "claude-haiku-4-5", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]},
    }
    proc, url = start("--state-dir", str(state_dir), "--api-key", "sk-only")
    try:
        with httpx2.Client(base_url=url) as admin:
            admin.post("/_emulator/config", json={"faults": {"http_errors": [529], "http_error_endpoints": ["create"]}})
            with anthropic.Anthropic(api_key="sk-only", base_url=url) as client:
                batch = client.messages.batches.create(requests=[request])
                deadline = time.monotonic() + 10
                while client.messages.batches.retrieve(batch.id).processing_status != "ended":
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                before = [r.to_json() for r in client.messages.batches.results(batch.id)]
            stats = admin.get("/_emulator/stats").json()
        assert stats["create_posts"] == 2 and stats["batches_created"] == 1
        assert stats["faults_fired"] == {"http_529": 1}
    finally:
        stop(proc)
    assert proc.returncode == 0
    assert (state_dir / "batches" / batch.id / "results.jsonl").exists()

    proc, url = start("--state-dir", str(state_dir), "--api-key", "sk-only")
    try:
        with anthropic.Anthropic(api_key="sk-only", base_url=url) as client:
            again = client.messages.batches.retrieve(batch.id)
            assert again.processing_status == "ended" and again.created_at == batch.created_at
            assert again.results_url == f"{url}/v1/messages/batches/{batch.id}/results"
            assert [r.to_json() for r in client.messages.batches.results(batch.id)] == before
        with anthropic.Anthropic(api_key="sk-other", base_url=url) as wrong:
            with pytest.raises(anthropic.AuthenticationError):
                wrong.messages.batches.list()
    finally:
        stop(proc)
    assert proc.stderr is None or proc.stderr.closed


def test_bad_responder_fails_with_a_clear_message() -> None:
    result = CliRunner().invoke(emulator, ["--port", "0", "--responder", "no_colon_here"])
    assert result.exit_code == 1
    assert "package.module:function" in result.output


def test_without_state_dir_the_temp_state_is_removed_on_stop() -> None:
    proc, url = start()
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith("emulator state dir: ")
        temp_dir = Path(line.split(": ", 1)[1].strip())
        assert (temp_dir / "batches").is_dir()
        assert httpx2.get(f"{url}/_emulator/stats").json()["batches"] == 0
    finally:
        stop(proc)
    assert proc.returncode == 0
    assert not temp_dir.exists()
