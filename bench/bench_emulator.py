"""Benchmark: one 100,000-request (~200 MB) batch through the emulator, run as a subprocess.

Prints wall time for create, processing and download, the emulator's CPU seconds by stage, and
its peak RSS (server plus processing processes) next to the body size: the point is that the
emulator streams (RSS stays far below the body size). Twice, side by side: the batch processed in
parts across the two processing processes (as a large batch due alone is), and in one.

    .venv/bin/python bench/bench_emulator.py [--requests 100000] [--text-bytes 2000]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from typing import Iterator

import anthropic
import httpx2

from _common import PeakRSS

WORDS = (
    "the quick brown fox jumps over lazy dog great terrible service product order delivery refund "
    "excellent awful price quality support customer happy late broken love hate fast slow package"
).split()


_TEXTS: dict[int, list[str]] = {}


def _texts(text_bytes: int) -> list[str]:
    """1,000 distinct review texts of ~text_bytes each, built once (the client must not be the bottleneck)."""
    if text_bytes not in _TEXTS:
        rng = random.Random(42)
        texts = []
        for _ in range(1000):
            words: list[str] = []
            size = 0
            while size < text_bytes:
                w = rng.choice(WORDS)
                words.append(w)
                size += len(w) + 1
            texts.append(" ".join(words))
        _TEXTS[text_bytes] = texts
    return _TEXTS[text_bytes]


def item_bytes(i: int, text_bytes: int) -> bytes:
    request = {
        "custom_id": f"row-{i:07d}",
        "params": {
            "model": "claude-haiku-4-5",
            "max_tokens": 256,
            "messages": [{"role": "user", "content": f"Classify review {i}: " + _texts(text_bytes)[i % 1000]}],
        },
    }
    return json.dumps(request, separators=(",", ":")).encode()


def body_chunks(n: int, text_bytes: int) -> Iterator[bytes]:
    yield b'{"requests":['
    buf: list[bytes] = []
    for i in range(n):
        buf.append((b"," if i else b"") + item_bytes(i, text_bytes))
        if len(buf) == 500:
            yield b"".join(buf)
            buf = []
    if buf:
        yield b"".join(buf)
    yield b"]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--text-bytes", type=int, default=2_000)
    args = parser.parse_args()

    print(f"building body size for {args.requests:,} requests ...", file=sys.stderr)
    size = sum(len(c) for c in body_chunks(args.requests, args.text_bytes))
    # Side by side: the batch processed in parts across the two processing processes (the default for
    # a batch due alone), and in one of them (a split minimum above the batch's size).
    split = measure(args, size, [])
    whole = measure(args, size, ["--split-min-requests", str(args.requests + 1)])
    mb = 1024 * 1024
    print(f"requests                 {args.requests:,}")
    print(f"create body              {size / mb:,.1f} MB")
    for name, r in (("split in 2 parts", split), ("one process", whole)):
        print(f"--- processing {name}")
        print(f"create (upload+validate) {r['create']:6.2f} s  ({size / mb / r['create']:,.0f} MB/s)")
        print(f"processing (to ended)    {r['process']:6.2f} s  ({args.requests / r['process']:,.0f} requests/s)")
        print(f"download, raw httpx2     {r['raw']:6.2f} s  ({r['raw_bytes'] / mb:,.1f} MB, {r['raw_bytes'] / mb / r['raw']:,.0f} MB/s)")
        print(f"download, SDK results()  {r['sdk']:6.2f} s  ({r['lines'] / r['sdk']:,.0f} lines/s; SDK reads 64-byte chunks)")
        cpu = r["cpu"]
        if cpu:
            print(f"emulator CPU, parsing    {cpu['create_parse']:6.2f} s  ({cpu['create_parse'] / args.requests * 1e6:.1f} µs/request)")
            print(f"emulator CPU, processing {cpu['processing']:6.2f} s  ({cpu['processing'] / args.requests * 1e6:.1f} µs/request)")
        print(f"emulator RSS idle        {r['idle_rss'] / mb:,.1f} MB")
        print(f"emulator RSS peak        {r['peak_rss'] / mb:,.1f} MB")
        print(f"peak RSS / body size     {r['peak_rss'] / size:.3f}")
    print(f"RATIO processing wall, split / one process = {split['process'] / whole['process']:.2f}x")


def measure(args: argparse.Namespace, size: int, flags: list[str]) -> dict:
    """One emulator subprocess (with `flags`), one batch: create, wait until ended, download twice."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "batch_bridge.emulator", "--port", "0", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    sampler = PeakRSS(proc.pid, interval=0.01).__enter__()  # the server and its processing children
    time.sleep(0.3)
    idle_rss = sampler.peak
    try:
        t0 = time.perf_counter()
        with httpx2.Client(base_url=url, timeout=600) as http:
            response = http.post(
                "/v1/messages/batches",
                content=body_chunks(args.requests, args.text_bytes),
                headers={"content-length": str(size), "content-type": "application/json", "x-api-key": "sk-bench"},
            )
        response.raise_for_status()
        batch_id = response.json()["id"]
        t_create = time.perf_counter() - t0

        with anthropic.Anthropic(api_key="sk-bench", base_url=url) as client:
            t1 = time.perf_counter()
            while (batch := client.messages.batches.retrieve(batch_id)).processing_status != "ended":
                time.sleep(0.1)
            t_process = time.perf_counter() - t1

            t2 = time.perf_counter()
            raw_bytes = 0
            with httpx2.Client(timeout=600) as http, http.stream(
                "GET", batch.results_url or "", headers={"x-api-key": "sk-bench"}
            ) as stream:
                for chunk in stream.iter_bytes(1 << 20):
                    raw_bytes += len(chunk)
            t_raw = time.perf_counter() - t2

            t3 = time.perf_counter()
            lines = sum(1 for _ in client.messages.batches.results(batch_id))
            t_sdk = time.perf_counter() - t3
            stats = httpx2.get(f"{url}/_emulator/stats").json()
    finally:
        sampler.__exit__(None, None, None)
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()

    assert lines == args.requests == batch.request_counts.succeeded, (lines, batch.request_counts)
    assert stats["batches_split"] == (0 if flags else 1), stats["batches_split"]
    return {"create": t_create, "process": t_process, "raw": t_raw, "raw_bytes": raw_bytes, "sdk": t_sdk,
            "lines": lines, "cpu": stats.get("cpu_seconds", {}), "idle_rss": idle_rss, "peak_rss": sampler.peak}


if __name__ == "__main__":
    main()
