"""`make demo-plugin` / `python -m batch_bridge.demo_plugin`: the example project with plain `dbt build`s.

The profile target `plugin` runs the bridge inside dbt (batch_bridge.dbt_plugin). Three builds on the
local emulator: the first submits the rows of `stg_reviews_to_enrich` and never waits; once the batch
has ended the second collects it while resolving the results source, so `review_insights` is complete;
the third sends nothing. Uses `warehouse_plugin.duckdb` and `.batch_bridge_plugin/` in the repository
root (or wherever BATCH_BRIDGE_WAREHOUSE / BATCH_BRIDGE_HOME point), apart from `make demo`'s files.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import click

from .demo import DEMO_KEY, print_summary, repo_root, say, start_emulator, start_fresh, stop, summary


def dbt_build(root: Path) -> None:
    """A plain `dbt build` in a process of its own, as a scheduler runs it; its output is shown."""
    cmd = [sys.executable, "-c", "from dbt.cli.main import cli; cli()", "build", "--target", "plugin",
           "--project-dir", str(root / "dbt_project"), "--profiles-dir", str(root / "profiles")]
    click.echo("$ dbt build --target plugin", err=True)
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if "batch_bridge: " in line or "created sql table model main.review_insights" in line or "Done." in line \
                or "ERROR" in line:
            click.echo("  " + line, err=True)
    if out.returncode != 0:
        raise SystemExit(f"dbt build failed (exit {out.returncode}):\n{out.stdout[-4000:]}{out.stderr[-2000:]}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--latency", default=15.0, show_default=True,
              help="seconds each batch stays in_progress on the emulator (longer than a build, so build 1 ends first)")
def main(latency: float) -> None:
    """Run the example project three times with `dbt build` alone (the batch_bridge dbt plugin)."""
    from .api import build_client
    from .bridge import load_jobs
    from .config import resolve

    root = repo_root()
    os.environ.setdefault("BATCH_BRIDGE_WAREHOUSE", str(root / "warehouse_plugin.duckdb"))
    os.environ.setdefault("BATCH_BRIDGE_HOME", str(root / ".batch_bridge_plugin"))
    os.environ.setdefault("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")
    settings = resolve(project_dir=root / "dbt_project", profiles_dir=root / "profiles", target="plugin")
    start_fresh(settings, "demo-plugin")
    proc, url = start_emulator(latency)
    say(f"demo-plugin: emulator at {url} (latency {latency:g}s)")
    started = time.monotonic()
    try:
        os.environ["ANTHROPIC_BASE_URL"] = url
        os.environ["ANTHROPIC_API_KEY"] = DEMO_KEY
        settings = resolve(project_dir=root / "dbt_project", profiles_dir=root / "profiles", target="plugin")
        client = build_client(settings)
        say("demo-plugin: build 1 - the staging model submits its rows; dbt does not wait for the batch")
        dbt_build(root)
        say("demo-plugin: waiting for the batch to end (the next scheduled build would come later)")
        for b in client.messages.batches.list(limit=100):
            while client.messages.batches.retrieve(b.id).processing_status != "ended":
                time.sleep(0.5)
        say("demo-plugin: build 2 - resolving the results source collects the answers; the marts are complete")
        dbt_build(root)
        created = sum(1 for _ in client.messages.batches.list(limit=100))
        say("demo-plugin: build 3 - nothing changed, so nothing is sent")
        dbt_build(root)
        again = sum(1 for _ in client.messages.batches.list(limit=100))
        jobs = load_jobs(settings)
        print_summary(summary(settings, [j.name for j in jobs]), settings)
        click.echo(f"builds 1-2 created {created} batch(es); build 3 created {again - created}.")
        if again != created:
            raise SystemExit("unexpected: the third build submitted batches")
        say(f"demo-plugin: done in {time.monotonic() - started:.0f}s. `batch-bridge status` shows what the plugin did:")
        click.echo(f"  BATCH_BRIDGE_WAREHOUSE={settings.warehouse} BATCH_BRIDGE_HOME={settings.home} "
                   ".venv/bin/batch-bridge status --target plugin")
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
