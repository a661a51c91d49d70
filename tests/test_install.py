"""Installed as a package into a fresh virtualenv, used in a project laid out like `dbt init` makes it.

One virtualenv for the module (created with `python -m venv`, nothing of this checkout on its
sys.path; dependencies from the package index). The README's "Use it in your dbt project" section
is run as written, every command of it, in order, by bash; then the built wheel is installed and its
`batch-bridge` runs `--version`, `emulator` and `sources`, and its dbt package works as a `local:` package.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import anthropic
import duckdb
import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TICKETS = 60


def _sh(cmd: list[str] | str, *, cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                       shell=isinstance(cmd, str), executable="/bin/bash" if isinstance(cmd, str) else None)
    assert r.returncode == 0, f"{cmd}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    """A user's machine: a HOME, a copy of the source (so no build output lands in the checkout), a fresh venv."""
    root = tmp_path_factory.mktemp("machine")
    src = root / "batch_bridge_src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "batch_bridge", src / "batch_bridge", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "home").mkdir()
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BATCH_BRIDGE_", "DBT_", "ANTHROPIC_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(HOME=str(root / "home"), PATH=f"{root / 'venv' / 'bin'}:{env.get('PATH', '')}",
               DBT_SEND_ANONYMOUS_USAGE_STATS="false")
    return root, src, root / "venv", env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Use it in your dbt project")
    end = text.index("\n## ", start + 3)
    return text[start:end]


def section_script(section: str, *, src: Path, project: Path, venv: Path, port: int) -> str:
    """The section as one bash script: sh blocks as they are, file blocks written to the path on their
    first line, the cron line's command; placeholders replaced by this machine's paths."""
    out = ["set -euo pipefail", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT", f"cd {project}"]
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S):
        if lang == "sh":
            out.append(body)
        elif lang in ("yaml", "sql"):
            first, rest = body.split("\n", 1)
            path = first.lstrip("#-").strip()
            assert re.fullmatch(r"[\w./]+", path), f"a {lang} block must start with its file path, got {first!r}"
            out.append(f"mkdir -p $(dirname {path}) && cat > {path} <<'BB_EOF'\n{rest}BB_EOF")
        elif lang == "cron":
            line = next(x for x in body.splitlines() if x.strip() and not x.startswith("#"))
            out.append(line.split(None, 5)[5])
        else:
            raise AssertionError(f"the section has a ```{lang} block the test does not know how to run")
    script = "\n".join(out) + "\n"
    return (script.replace("/path/to/batch_bridge", str(src)).replace("/srv/analytics/my_project", str(project))
            .replace(".venv/bin/", f"{venv}/bin/").replace("ANTHROPIC_API_KEY=...", "ANTHROPIC_API_KEY=sk-emulator")
            .replace("8765", str(port)))


def dbt_init_project(root: Path) -> Path:
    """What a user has before reading the section: a dbt-duckdb project as `dbt init` lays it out,
    its profile in ~/.dbt with a relative path, a seed and a staging model."""
    project = root / "my_project"
    (project / "models" / "staging").mkdir(parents=True)
    (project / "seeds").mkdir()
    (project / "dbt_project.yml").write_text(yaml.safe_dump({
        "name": "my_project", "version": "1.0.0", "config-version": 2, "profile": "my_project",
        "model-paths": ["models"], "seed-paths": ["seeds"], "clean-targets": ["target", "dbt_packages"],
        "models": {"my_project": {"+materialized": "view"}},
    }, sort_keys=False))
    rows = ["ticket_id,subject,body"] + [
        f"T{i:04d},Order {i} question,\"My order {i} {'was charged twice' if i % 3 else 'does not arrive'}. What now?\""
        for i in range(TICKETS)]
    (project / "seeds" / "tickets.csv").write_text("\n".join(rows) + "\n")
    (project / "models" / "staging" / "stg_tickets.sql").write_text("select * from {{ ref('tickets') }}\n")
    (root / "home" / ".dbt").mkdir(exist_ok=True)
    (root / "home" / ".dbt" / "profiles.yml").write_text(yaml.safe_dump({"my_project": {
        "target": "dev", "outputs": {"dev": {"type": "duckdb", "path": "dev.duckdb", "threads": 1}}}}))
    return project


@pytest.mark.timeout(900)
def test_readme_section_runs_as_written_in_a_dbt_init_project(machine):
    root, src, venv, env = machine
    project = dbt_init_project(root)
    section = readme_section()
    script = section_script(section, src=src, project=project, venv=venv, port=free_port())
    assert "pip install" in script and "sources --write" in script and "pipeline" in script
    (root / "readme_section.sh").write_text(script)
    # `pip install` is the section's first command: dbt is not in the venv before it. The script runs in
    # a process group of its own, so the emulator it starts in the background ends with it, whatever happens.
    proc = subprocess.Popen(["bash", str(root / "readme_section.sh")], cwd=project, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=840)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 0, output[-6000:]

    site = _sh([str(venv / "bin" / "python"), "-c", "import batch_bridge; print(batch_bridge.__file__)"],
               cwd=root, env=env).stdout.strip()
    assert site.startswith(str(venv)), site  # the installed package, not this checkout
    with duckdb.connect(str(project / "dev.duckdb"), read_only=True) as con:
        n, answered, categories = con.execute(
            "select count(*), count(category), count(distinct category) from tickets_triaged").fetchone()
        bad = con.execute("select count(*) from tickets_triaged "
                          "where category not in ('billing', 'bug', 'how_to', 'other')").fetchone()[0]
    assert (n, answered, bad) == (TICKETS, TICKETS, 0) and categories >= 1
    assert "| T00" in output  # `dbt show` printed the mart
    # The generated source is what dbt read; the scheduled run (the cron line) found nothing new to send.
    generated = yaml.safe_load((project / "models" / "sources" / "batch_bridge.yml").read_text())
    assert [t["name"] for t in generated["sources"][0]["tables"]] == ["ticket_triage"]
    log = (project / "bb.log").read_text()
    assert "submitted 0 batch(es)" in log, log[-2000:]
    # Everything in the project folder, as dbt resolves the profile's relative path.
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.duckdb")
                  if ".batch_bridge" not in p.parts) == ["my_project/dev.duckdb"]
    assert (project / ".batch_bridge" / "results" / "ticket_triage" / "current.parquet").is_dir()


@pytest.mark.timeout(900)
def test_built_wheel_installs_and_runs_from_outside_the_source_tree(machine, tmp_path):
    root, src, venv, env = machine
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    _sh([*pip, "wheel", "--no-deps", "--quiet", "-w", str(root / "dist"), str(src)], cwd=root, env=env)
    wheel = next((root / "dist").glob("batch_bridge-*.whl"))
    _sh([*pip, "install", "--quiet", "--force-reinstall", "--no-deps", str(wheel)], cwd=root, env=env)
    _sh([*pip, "install", "--quiet", str(wheel)], cwd=root, env=env)  # its dependencies, if not there yet
    bb = str(venv / "bin" / "batch-bridge")

    assert re.fullmatch(r"batch-bridge, version \d+\.\d+\.\d+\n", _sh([bb, "--version"], cwd=tmp_path, env=env).stdout)

    # The emulator ships in the wheel: start it, use it through the SDK, stop it.
    proc = subprocess.Popen([bb, "emulator", "--port", "0"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        with anthropic.Anthropic(api_key="sk-test-wheel", base_url=url) as client:
            batch = client.messages.batches.create(requests=[{"custom_id": "a", "params": {
                "model": "claude-haiku-4-5", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}}])
            assert client.messages.batches.retrieve(batch.id).id == batch.id
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    # `sources` in a project of its own (profile in the project folder), and the dbt package as `local:`.
    project = tmp_path / "shop"
    (project / "models").mkdir(parents=True)
    (project / "dbt_project.yml").write_text(yaml.safe_dump(
        {"name": "shop", "version": "1.0.0", "config-version": 2, "profile": "shop", "model-paths": ["models"]}))
    (project / "profiles.yml").write_text(yaml.safe_dump({"shop": {"target": "dev", "outputs": {
        "dev": {"type": "duckdb", "path": "shop.duckdb"}}}}))
    (project / "models" / "stg_notes.sql").write_text("select 1 as note_id, 'hello' as prompt\n")
    (project / "models" / "_jobs.yml").write_text(yaml.safe_dump({"models": [{"name": "stg_notes", "config": {
        "meta": {"batch_bridge": {"job": "notes", "key": "note_id", "model": "claude-haiku-4-5", "max_tokens": 20,
                                  "prompt_column": "prompt"}}}}]}))
    out = _sh([bb, "sources", "--profiles-dir", "."], cwd=project, env=env).stdout
    assert yaml.safe_load(out)["sources"][0]["tables"][0]["name"] == "notes"

    package = Path(_sh([bb, "dbt-package-path"], cwd=project, env=env).stdout.strip())
    assert package.is_relative_to(venv) and (package / "dbt_project.yml").is_file()
    (project / "packages.yml").write_text(yaml.safe_dump({"packages": [{"local": str(package)}]}))
    (project / "models" / "notes_pending.sql").write_text(
        "select * from {{ batch_bridge.batch_bridge_results('notes') }}\n")
    dbt = str(venv / "bin" / "dbt")
    _sh([dbt, "deps", "--profiles-dir", "."], cwd=project, env=env)
    _sh([dbt, "compile", "--select", "notes_pending", "--profiles-dir", "."], cwd=project, env=env)
    compiled = next((project / "target" / "compiled").rglob("notes_pending.sql")).read_text()
    assert "read_parquet('.batch_bridge/results/notes/current.parquet')" in compiled
