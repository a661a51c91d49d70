"""Soak: cycles of `batch-bridge pipeline` against an emulator with every unkind knob on at once, random
faults and random SIGKILLs, checking the promise after every cycle.

Each cycle changes the rows (new keys, edited prompts), draws the emulator's faults at random (create
429/529/500, errors after the batch was stored, slow creates past the client's timeout, connection
resets, a propagation delay, another client's batches of our size, a processing-queue limit, cut result
streams, transient 404s, errored and expired answers) and, one time in three, a crash point at which the
bridge SIGKILLs itself. After every cycle:
  - no input paid twice: no input has two billed answers, and no two of our batches that ended with
    answers hold the same input;
  - no foreign answer loaded: every loaded answer answers a request of its own submission, and batches
    proven foreign have no answers;
  - every row is answered, in flight, or not sent with a recorded reason.
At the end the faults are cleared and `batch-bridge run` converges: every row answered (or refused with
its reason), and every batch on the API that is not another client's is recorded (nothing paid unseen).

    .venv/bin/python bench/soak.py --cycles 30 [--seed 7] [--command pipeline|sync]   # make soak
The staging model is a view over a raw table the soak edits, so `sync` cycles (no dbt) see the changes
too. A shorter soak of `sync` cycles runs in `make test` (tests/test_soak.py). Prints figures; exits 1
when an invariant breaks.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import duckdb  # noqa: E402

from batch_bridge.bridge import CRASH_POINTS  # noqa: E402
from batch_bridge.emulator import EmulatorConfig, run_emulator  # noqa: E402
from helpers import settings_for, write_project  # noqa: E402

META = {"job": "items", "key": "id", "model": "claude-haiku-4-5", "max_tokens": 40, "prompt_column": "prompt",
        "max_requests_per_batch": 40, "max_attempts": 5}
STAGING_SQL = "select id, prompt from main.raw_items"


class InvariantBroken(AssertionError):
    pass


def _faults(rng: random.Random) -> dict[str, Any]:
    """A random mix of the emulator's unkind knobs for one cycle."""
    f: dict[str, Any] = {"seed": rng.randrange(10**6), "retry_after": round(rng.uniform(0.05, 0.3), 2),
                         "retry_after_format": rng.choice(["seconds", "ms", "http-date"])}
    if rng.random() < 0.4:
        f["http_errors"] = rng.choices([429, 529, 500], k=rng.randint(1, 3))
        f["http_error_endpoints"] = rng.choice([("create",), ("retrieve", "list", "results")])
    if rng.random() < 0.3:
        f["create_errors_after_store"] = [rng.choice([500, 502, 504])]
    if rng.random() < 0.25:
        f["slow_create_seconds"], f["slow_create_times"] = 2.5, 1
    if rng.random() < 0.25:
        f["connection_resets"] = rng.randint(1, 2)
        f["connection_reset_endpoints"] = rng.choice([("create",), ("retrieve", "results")])
    if rng.random() < 0.5:
        f["propagation_seconds"] = round(rng.uniform(0.2, 1.5), 2)
    if rng.random() < 0.4:
        f["neighbour_batches"] = rng.randint(1, 2)
        f["neighbour_offset_seconds"] = rng.choice([-2.0, -0.5, 0.5])
    if rng.random() < 0.3:
        f["results_cut_after_bytes"], f["results_cut_times"] = rng.choice([200, 2000]), 1
    if rng.random() < 0.3:
        f["not_found_first_calls"] = rng.randint(1, 2)
    if rng.random() < 0.3:
        f["errored_fraction"], f["errored_types"] = 0.1, ("overloaded_error", "api_error")
    if rng.random() < 0.2:
        f["expired_fraction"] = 0.1
    return f


def _state(home: Path, sql: str) -> list[tuple]:
    con = duckdb.connect(str(home / "bb_state.duckdb"), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def check(home: Path, warehouse: Path) -> dict[str, int]:
    """The promise, from the bridge's state; raises InvariantBroken. Returns row counts by outcome."""
    billed_twice = _state(home, "SELECT input_hash FROM responses WHERE status IN ('succeeded', 'parse_failed') "
                                "GROUP BY ALL HAVING count(*) > 1")
    if billed_twice:
        raise InvariantBroken(f"{len(billed_twice)} input(s) paid twice")
    both = _state(home, """
        SELECT sr.input_hash FROM sent_requests sr
        JOIN submissions su USING (submission_id) JOIN batches b ON b.batch_id = su.batch_id
        JOIN responses r ON r.batch_id = b.batch_id AND r.request_custom_id = sr.request_custom_id
        WHERE r.status IN ('succeeded', 'parse_failed')
        GROUP BY ALL HAVING count(DISTINCT b.batch_id) > 1""")
    if both:
        raise InvariantBroken(f"{len(both)} input(s) answered in two of our batches")
    foreign_loaded = _state(home, """
        SELECT count(*) FROM responses r ANTI JOIN sent_requests s
          ON s.submission_id = (SELECT submission_id FROM batches b WHERE b.batch_id = r.batch_id)
         AND s.request_custom_id = r.request_custom_id""")[0][0]
    foreign_loaded += _state(home, "SELECT count(*) FROM responses WHERE batch_id IN (SELECT batch_id FROM foreign_batches)")[0][0]
    if foreign_loaded:
        raise InvariantBroken(f"{foreign_loaded} answer(s) loaded that are not ours")
    # Every current row: answered, in flight, or not sent with a recorded reason.
    con = duckdb.connect()
    try:
        con.execute(f"ATTACH '{home / 'bb_state.duckdb'}' AS s (READ_ONLY)")
        con.execute(f"ATTACH '{warehouse}' AS w (READ_ONLY)")
        rows = dict(con.execute("""
            WITH latest AS (SELECT custom_id, arg_max(input_hash, seen_at) AS h FROM s.key_versions GROUP BY ALL),
            flying AS (
                SELECT DISTINCT sr.input_hash FROM s.sent_requests sr JOIN s.submissions su USING (submission_id)
                LEFT JOIN s.batches b ON b.batch_id = su.batch_id
                WHERE su.state IN ('prepared', 'creating')
                   OR (su.state = 'created' AND coalesce(b.local_state, 'submitted') IN ('submitted', 'downloaded'))),
            ok AS (SELECT DISTINCT input_hash FROM s.responses WHERE status = 'succeeded'),
            outcome AS (SELECT input_hash, bool_or(status <> 'succeeded') AS failed FROM s.responses GROUP BY ALL)
            SELECT CASE WHEN ok.input_hash IS NOT NULL THEN 'answered'
                        WHEN f.input_hash IS NOT NULL THEN 'in_flight'
                        WHEN o.failed THEN 'failed_retryable'
                        ELSE 'unsent' END AS what, count(*)
            FROM w.main.raw_items r
            LEFT JOIN latest l ON l.custom_id = r.id
            LEFT JOIN ok ON ok.input_hash = l.h LEFT JOIN flying f ON f.input_hash = l.h
            LEFT JOIN outcome o ON o.input_hash = l.h
            GROUP BY ALL""").fetchall())
        unsent_keys = con.execute("""
            SELECT count(*) FROM w.main.raw_items r
            WHERE r.id NOT IN (SELECT custom_id FROM s.key_versions)""").fetchone()[0]
    finally:
        con.close()
    # Rows the last (possibly killed) cycle did not reach are new to the bridge: the next run plans them.
    rows["not_yet_planned"] = unsent_keys
    return rows


def _orphans(client: Any, home: Path) -> list[str]:
    """Batches on the API that are neither recorded as ours nor another client's (paid and unseen)."""
    ours = {r[0] for r in _state(home, "SELECT batch_id FROM batches WHERE local_state <> 'foreign'")}
    out = []
    for b in client.messages.batches.list(limit=1000):
        if b.id in ours:
            continue
        if b.processing_status != "ended":
            out.append(b.id)
            continue
        ids = {r.custom_id for r in client.messages.batches.results(b.id)}
        if not all(i.startswith("neighbour") for i in ids):
            out.append(b.id)
    return out


def soak(cycles: int, seed: int, workdir: Path, quiet: bool = False, command: str = "pipeline") -> dict[str, Any]:
    rng = random.Random(seed)
    root = workdir
    project = write_project(root, META, sql=STAGING_SQL, materialized="view")
    figures: Counter[str] = Counter()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    with run_emulator(EmulatorConfig(latency=0.3)) as emu:
        s = settings_for(root, emu.base_url)
        next_id = 0

        def mutate(new: int, edits: int) -> None:
            nonlocal next_id
            con = duckdb.connect(str(s.warehouse))
            try:
                con.execute("CREATE TABLE IF NOT EXISTS main.raw_items (id VARCHAR, prompt VARCHAR)")
                con.execute("INSERT INTO main.raw_items SELECT 'k' || lpad((i + $n)::VARCHAR, 5, '0'), "
                            "'review ' || (i + $n) || ' of ' || $seed FROM range($new) t(i)",
                            {"n": next_id, "new": new, "seed": seed})
                next_id += new
                if edits:
                    con.execute("UPDATE main.raw_items SET prompt = prompt || ' (edited ' || $c || ')' "
                                "WHERE hash(id, $r) % $n < $k", {"c": figures["cycles"], "k": edits, "n": next_id,
                                                                   "r": rng.randrange(10**6)})
            finally:
                con.close()

        env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCH_BRIDGE_", "ANTHROPIC_"))}
        env.update({"BATCH_BRIDGE_WAREHOUSE": str(s.warehouse), "ANTHROPIC_API_KEY": "sk-soak",
                    "ANTHROPIC_BASE_URL": emu.base_url, "BATCH_BRIDGE_POLL_INTERVAL": "0.2",
                    "BATCH_BRIDGE_LOCK_TIMEOUT": "30", "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
                    "BATCH_BRIDGE_RECONCILE_GRACE": "3", "BATCH_BRIDGE_CREATE_TIMEOUT": "1.5"})
        args = [sys.executable, "-m", "batch_bridge.cli", command, "--project-dir", str(project),
                "--profiles-dir", str(root / "profiles"), "--json"]
        build = [sys.executable, "-m", "batch_bridge.cli", "dbt", "--project-dir", str(project),
                 "--profiles-dir", str(root / "profiles"), "build"]
        mutate(120, 0)
        subprocess.run(build, env=env, capture_output=True, text=True, timeout=600, check=True)
        for cycle in range(cycles):
            figures["cycles"] += 1
            if cycle:
                mutate(rng.randint(0, 60), rng.randint(0, 20))
            emu.clear_faults()
            faults = _faults(rng)
            emu.set_faults(**faults)
            emu.configure(queue_limit_requests=rng.choice([None, 60, 120]))
            run_env = {**env, "BATCH_BRIDGE_MAX_QUEUED_REQUESTS": str(rng.choice([50, 100, 100_000]))}
            point = rng.choice(CRASH_POINTS) if rng.random() < 1 / 3 else None
            if point:
                run_env["BATCH_BRIDGE_FAULT"] = point
            r = subprocess.run(args, env=run_env, capture_output=True, text=True, timeout=600)
            killed = r.returncode == -signal.SIGKILL
            figures["kills"] += killed
            figures[f"exit_{r.returncode}"] += 1
            if r.returncode not in (0, -signal.SIGKILL):
                figures["failed_runs"] += 1
                if "Traceback" in r.stderr:
                    raise InvariantBroken(f"cycle {cycle}: a crash, not an error message:\n{r.stderr[-3000:]}")
            for k in faults:
                figures[f"knob_{k}"] += 1
            rows = check(s.home, s.warehouse)
            say(f"cycle {cycle + 1:2d}: exit {r.returncode:3d}{' (' + point + ')' if killed else '':24s} "
                f"faults {','.join(sorted(k for k in faults if k not in ('seed', 'retry_after', 'retry_after_format')))}"
                f" -> rows {json.dumps(rows, sort_keys=True)}")
        fired = emu.counters()["faults_fired"]
        # Converge: no faults, then run until nothing is left to send or collect.
        emu.clear_faults()
        emu.configure(queue_limit_requests=None)
        final = [sys.executable, "-m", "batch_bridge.cli", "run", "--project-dir", str(project),
                 "--profiles-dir", str(root / "profiles"), "--json", "--timeout", "300"]
        for _ in range(3):
            r = subprocess.run(final, env={**env, "BATCH_BRIDGE_RECONCILE_GRACE": "0"}, capture_output=True,
                               text=True, timeout=900)
            if r.returncode == 0 and not json.loads(r.stdout)["submitted"]:
                break
        rows = check(s.home, s.warehouse)
        from batch_bridge import api as api_mod
        orphans = _orphans(api_mod.build_client(s), s.home)
        if orphans:
            raise InvariantBroken(f"{len(orphans)} batch(es) on the API are ours and unrecorded: {orphans}")
        if set(rows) - {"answered", "failed_retryable", "not_yet_planned"} or rows.get("not_yet_planned"):
            raise InvariantBroken(f"after convergence rows are left: {rows}")
        c = emu.counters()
        foreign = _state(s.home, "SELECT count(*) FROM foreign_batches")[0][0]
        adopted = _state(s.home, "SELECT count(*) FROM submissions WHERE adopted")[0][0]
        return {"cycles": cycles, "seed": seed, "command": command, "kills": figures["kills"], "runs_exit_nonzero": figures["failed_runs"],
                "rows": rows, "batches_created": c["batches_created"],
                "neighbour_batches": c["neighbour_batches_created"], "adopted": adopted,
                "foreign_released": foreign, "faults_fired": dict(fired),
                "knobs_drawn": {k[5:]: v for k, v in figures.items() if k.startswith("knob_")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=30)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--command", choices=["pipeline", "sync"], default="pipeline")
    a = p.parse_args(argv)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bb-soak-") as d:
        try:
            out = soak(a.cycles, a.seed, Path(d), command=a.command)
        except InvariantBroken as e:
            print(f"INVARIANT BROKEN: {e}")
            return 1
    out["wall_seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
