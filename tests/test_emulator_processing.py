"""Batch processing in child processes (`worker_processes`, 2 for the CLI) against the worker thread:
same results, same cache and fault decisions, cancel/expiry/restart still work, through the real SDK."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anthropic
import psutil
import pytest

from batch_bridge.emulator import EmulatorConfig, Faults, run_emulator
from helpers import wait_ended

LONG_SYSTEM = "You label short product reviews with care and precision. " * 110  # 1,100 tokens: > 1,024


def request(cid: str, text: str, **extra: Any) -> dict[str, Any]:
    params = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 60,
        "system": [{"type": "text", "text": LONG_SYSTEM, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": text}],
        **extra,
    }
    return {"custom_id": cid, "params": params}


def run_batches(config: EmulatorConfig) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Two batches (the second meets the prompt cache the first wrote): results by custom_id, and counters."""
    texts = ["I love it, great value", "terrible, broken on arrival", "it is a blender", "ok I guess"]
    out = []
    with run_emulator(config) as emu, anthropic.Anthropic(api_key="k", base_url=emu.base_url) as client:
        for b in range(2):
            reqs = [request(f"b{b}-r{i}", f"{texts[i % 4]} #{i}") for i in range(120)]
            reqs.append(request(f"b{b}-bad", "x", max_tokens=10**6))  # invalid params: errored
            batch = client.messages.batches.create(requests=reqs)
            wait_ended(client, batch.id)
            out.append({r.custom_id: r.to_json() for r in client.messages.batches.results(batch.id)})
        return out, emu.counters()


def test_child_process_gives_the_same_results_as_the_thread() -> None:
    faults = {"seed": 7, "errored_fraction": 0.1, "expired_fraction": 0.05}
    # Every cache lookup hits (cache_hit_rate 1.0), so a read in the second batch shows the child kept its cache.
    in_thread, thread_counters = run_batches(EmulatorConfig(faults=Faults(**faults), cache_hit_rate=1.0))
    in_child, child_counters = run_batches(EmulatorConfig(faults=Faults(**faults), cache_hit_rate=1.0, worker_processes=2))

    assert in_child == in_thread
    assert child_counters["faults_fired"] == thread_counters["faults_fired"] != {}
    first, second = in_child
    usage = lambda r: anthropic.types.messages.MessageBatchIndividualResponse.model_validate_json(r).result.message.usage  # noqa: E731
    succeeded = [cid for cid, r in second.items() if '"succeeded"' in r]
    assert all(usage(second[cid]).cache_read_input_tokens > 0 for cid in succeeded)  # the child kept its cache
    assert any(usage(r).cache_creation_input_tokens > 0 for r in first.values() if '"succeeded"' in r)
    cpu = child_counters["cpu_seconds"]
    assert set(cpu) == {"create_parse", "processing", "process_total"} and cpu["processing"] > 0


def test_batches_in_flight_together_give_the_sequential_results() -> None:
    """Batches due at once, alternately meeting the cache and not: two processes, one order's results."""

    def run(config: EmulatorConfig) -> list[dict[str, str]]:
        with run_emulator(config) as emu, anthropic.Anthropic(api_key="k", base_url=emu.base_url) as client:
            ids = []
            for b in range(6):
                extra = {} if b % 2 else {"system": "short, below any cache minimum"}
                reqs = [request(f"b{b}-r{i}", f"great product {i % 7}", **extra) for i in range(300)]
                ids.append(client.messages.batches.create(requests=reqs).id)
            for batch_id in ids:
                wait_ended(client, batch_id)
            return [{r.custom_id: r.to_json() for r in client.messages.batches.results(i)} for i in ids]

    faults = Faults(seed=3, errored_fraction=0.05)
    sequential = run(EmulatorConfig(latency=0.5, faults=faults))
    parallel = run(EmulatorConfig(latency=0.5, faults=copy.deepcopy(faults), worker_processes=2))
    assert parallel == sequential
    assert '"cache_read_input_tokens":0' not in sequential[3]["b3-r0"].replace(" ", "")  # read what b1 wrote


def test_a_large_batch_due_alone_is_split_across_the_processes_with_the_sequential_file() -> None:
    """One batch no cache applies to, in two parts: the same results in the same order as one process
    writes; one that meets the cache goes back, whole, to the process that owns the cache."""

    def run(config: EmulatorConfig) -> tuple[list[list[str]], dict[str, Any]]:
        with run_emulator(config) as emu, anthropic.Anthropic(api_key="k", base_url=emu.base_url) as client:
            files = []
            for extra in ({"system": "short, below any cache minimum"}, {}):  # {}: the long cached system
                reqs = [request(f"r{i}", f"great product {i % 11}", **extra) for i in range(1_500)]
                batch = client.messages.batches.create(requests=reqs)
                wait_ended(client, batch.id)
                files.append([r.to_json() for r in client.messages.batches.results(batch.id)])
            return files, emu.counters()

    faults = Faults(seed=5, errored_fraction=0.05, expired_fraction=0.02)
    sequential, _ = run(EmulatorConfig(faults=faults, cache_hit_rate=1.0))
    split, counters = run(EmulatorConfig(faults=copy.deepcopy(faults), cache_hit_rate=1.0, worker_processes=2,
                                         split_min_requests=1_000))
    assert counters["batches_split"] == 2  # both were split; the second's parts met the cache
    assert split == sequential
    assert len(split[0]) == 1_500 and split[0] != sorted(split[0])  # unordered, as the API's files are
    reads = [json.loads(line)["result"]["message"]["usage"]["cache_read_input_tokens"]
             for line in split[1] if '"succeeded"' in line]
    assert len(reads) > 1_000 and sum(r > 0 for r in reads) == len(reads) - 1  # all but the first hit the cache


def test_child_process_handles_cancel_expiry_and_a_restart(tmp_path: Path) -> None:
    config = EmulatorConfig(worker_processes=2, state_dir=tmp_path / "state", latency=3600)
    with run_emulator(config) as emu, anthropic.Anthropic(api_key="k", base_url=emu.base_url) as client:
        canceled = client.messages.batches.create(requests=[request(f"c{i}", "hi") for i in range(5)])
        client.messages.batches.cancel(canceled.id)
        assert wait_ended(client, canceled.id).request_counts.canceled == 5

        emu.configure(time_scale=4 * 86_400, latency=2 * 86_400)  # would need 2 days: expires after 24 h
        expired = client.messages.batches.create(requests=[request(f"e{i}", "hi") for i in range(5)])
        assert wait_ended(client, expired.id).request_counts.expired == 5

        emu.configure(time_scale=1, latency=0.5)  # due just after the restart below
        pending = client.messages.batches.create(requests=[request("p", "hi")])

    with run_emulator(config) as emu, anthropic.Anthropic(api_key="k", base_url=emu.base_url) as client:
        assert wait_ended(client, pending.id).request_counts.succeeded == 1
        emu.clear_cache()  # reaches the child; the next identical prompt writes the cache again
        again = client.messages.batches.create(requests=[request("q", "hi")])
        wait_ended(client, again.id)
        [result] = list(client.messages.batches.results(again.id))
        assert result.result.message.usage.cache_creation_input_tokens > 0  # type: ignore[union-attr]


def test_child_process_imports_a_plugin_responder_from_the_hosts_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "child_responder.py").write_text(
        "import os\n"
        "def respond(params, custom_id):\n"
        "    return {'content': [{'type': 'text', 'text': f'pid {os.getpid()}'}]}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with run_emulator(EmulatorConfig(worker_processes=2, responder="child_responder:respond")) as emu:
        with anthropic.Anthropic(api_key="k", base_url=emu.base_url) as client:
            batch = client.messages.batches.create(requests=[request("a", "hi")])
            wait_ended(client, batch.id)
            [result] = list(client.messages.batches.results(batch.id))
    text = result.result.message.content[0].text  # type: ignore[union-attr]
    assert text.startswith("pid ") and int(text[4:]) != psutil.Process().pid
    sys.modules.pop("child_responder", None)


def test_child_process_refuses_a_responder_it_cannot_import() -> None:
    with pytest.raises(ValueError, match="worker_processes > 0"):
        with run_emulator(EmulatorConfig(worker_processes=2, responder=lambda params, cid: {"content": []})):
            pass


def test_cli_emulator_processes_in_a_child_that_ends_with_it() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "batch_bridge.emulator", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        with anthropic.Anthropic(api_key="k", base_url=url) as client:
            batch = client.messages.batches.create(requests=[request(f"r{i}", "great") for i in range(10)])
            assert wait_ended(client, batch.id).request_counts.succeeded == 10
        children = psutil.Process(proc.pid).children()
        assert len(children) >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        psutil.wait_procs(children, timeout=10)
        assert not any(c.is_running() for c in children), "the processing process outlived the server"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
