"""`batch-bridge report`: a real project with real batches on the emulator, the page opened in Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from batch_bridge import api, bridge
from batch_bridge.cli import cli
from batch_bridge.emulator import EmulatorConfig, run_emulator
from batch_bridge.report_data import parse_since
from batch_bridge.errors import ConfigError
from helpers import load_staging, settings_for, write_project

SYSTEM = "You label short product reviews for a retail analytics team. " * 30  # long enough to be cached


def meta(**over):
    m = {"job": "items", "key": "id", "model": "claude-haiku-4-5", "max_tokens": 60, "prompt_column": "prompt",
         "system": SYSTEM, "max_requests_per_batch": 70}
    m.update(over)
    return m


def staging(changed: int = 0) -> str:
    """260 keyed rows (every 10th repeats another row's prompt: deduplicated), a NULL key, a blank prompt."""
    text = (f"CASE WHEN i < {changed} THEN 'changed review ' || i "
            "WHEN i % 10 = 9 THEN 'review ' || (i - 1) || ' is fine' ELSE 'review ' || i || ' is fine' END")
    return (f"SELECT 'r' || lpad(i::VARCHAR, 4, '0') AS id, {text} AS prompt FROM range(260) t(i) "
            "UNION ALL SELECT NULL, 'no key' UNION ALL SELECT 'blank', '  '")


@pytest.fixture(scope="module")
def emulator():
    with run_emulator(EmulatorConfig(latency=0, cache_min_tokens=64)) as emu:
        yield emu


@pytest.fixture(scope="module")
def project(tmp_path_factory, emulator):
    """Three runs: with errors and expiries, a retry, then changed rows submitted and not collected."""
    root = tmp_path_factory.mktemp("report")
    write_project(root, meta())
    s = settings_for(root, emulator.base_url)
    load_staging(s, staging())
    jobs = bridge.load_jobs(s)
    client = api.build_client(s)
    emulator.set_faults(errored_fraction=0.15, errored_types=("overloaded_error", "invalid_request_error"),
                        expired_fraction=0.05)
    bridge.run(s, jobs, client)
    emulator.clear_faults()
    bridge.run(s, jobs, client)  # the retryable ones again
    load_staging(s, staging(changed=8))
    emulator.configure(latency=3600)  # the changed rows stay in flight
    bridge.submit(s, jobs, client)
    emulator.configure(latency=0)
    return root, s


def env_of(root: Path, s) -> dict[str, str]:
    return {"BATCH_BRIDGE_WAREHOUSE": str(s.warehouse), "ANTHROPIC_API_KEY": "sk-test",
            "DBT_PROJECT_DIR": str(root / "dbt_project"), "DBT_PROFILES_DIR": str(root / "profiles")}


# --- the page in a real browser -----------------------------------------------------------------

# Records, after layout, where each chart's plot is and how wide the page is, and posts it to the
# frame around the page (injected into a copy of the page).
PROBE = """<script>
const r = {width: document.documentElement.scrollWidth, height: document.documentElement.scrollHeight,
           viewport: innerWidth, charts: {}, dom: document.documentElement.outerHTML};
for (const f of document.querySelectorAll('figure[data-chart]')) {
  const b = f.querySelector('.plot').getBoundingClientRect();
  r.charts[f.dataset.chart] = [b.left + scrollX, b.top + scrollY, b.width, b.height];
}
parent.postMessage(JSON.stringify(r), '*');
</script>"""
# The page is shown in a frame of the width under test: headless Chromium keeps its window at least
# 500 px wide, a frame can be as narrow as a phone (and media queries follow the frame's width).
FRAME = """<!doctype html><html><head><title>-</title><style>body{{margin:0}}iframe{{border:0;display:block}}</style>
</head><body><iframe src="{src}" width="{width}" height="{height}"></iframe>
<script>addEventListener('message', e => {{ document.title = e.data; }});</script></body></html>"""
# The colour each chart draws its data in (Okabe-Ito), so a chart with its frame but no data fails.
CHART_COLOURS = {"rows": (0x00, 0x9E, 0x73), "answers": (0x00, 0x9E, 0x73), "cost-day": (0xE6, 0x9F, 0x00),
                 "cost-batch": (0xE6, 0x9F, 0x00), "timeline": (0x00, 0x72, 0xB2), "durations": (0x56, 0xB4, 0xE9),
                 "cache": (0x00, 0x9E, 0x73)}


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert exe, "Chromium is needed for this test: apt-get install -y chromium (.ci/run installs it)"
    return exe


def browser(args: list[str], page: Path, src: str, width: int, height: int) -> str:
    """Open `src` (a file next to `page`) in a frame `width` x `height` px in headless Chromium."""
    frame = page.with_name(f"frame-{width}-{src}")
    frame.write_text(FRAME.format(src=src, width=width, height=height))
    out = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1",
         "--virtual-time-budget=5000", f"--window-size={max(width, 500)},{height}", *args, frame.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def layout(page: Path, width: int) -> dict:
    """The page laid out by Chromium `width` px wide: chart boxes, page size, and the DOM it rendered."""
    probe = page.with_name("probe-" + page.name)
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = browser(["--dump-dom"], page, probe.name, width, 2000)
    title = re.search(r"<title>(.*?)</title>", dom, re.S).group(1)
    return json.loads(html.unescape(title))


def screenshot(page: Path, width: int, height: int) -> "Image.Image":
    from PIL import Image

    shot = page.with_name(f"shot-{width}.png")
    browser([f"--screenshot={shot}"], page, page.name, width, height)
    return Image.open(shot).convert("RGB")


class Metrics(HTMLParser):
    """Text of every element carrying data-metric, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.found: dict[str, list[str]] = {}
        self._open: list[str | None] = []

    def handle_starttag(self, tag, attrs):
        self._open.append(dict(attrs).get("data-metric"))
        if self._open[-1]:
            self.found.setdefault(self._open[-1], []).append("")

    def handle_endtag(self, tag):
        if self._open:
            self._open.pop()

    def handle_data(self, data):
        name = next((n for n in reversed(self._open) if n), None)
        if name:
            self.found[name][-1] += data


def metrics(dom: str) -> dict[str, str]:
    p = Metrics()
    p.feed(dom)
    for name, texts in p.found.items():
        assert len(set(texts)) == 1, f"{name} shows different numbers: {texts}"
    return {k: v[0] for k, v in p.found.items()}


def count(text: str) -> int:
    return int(text.replace(",", ""))


def money(text: str) -> float:
    return float(text.replace("$", "").replace(",", ""))


def test_page_opens_in_chromium_with_every_chart_drawn_and_the_numbers_of_status(project, tmp_path):
    root, s = project
    env = env_of(root, s)
    st = CliRunner().invoke(cli, ["status", "--json"], env=env, catch_exceptions=False)
    assert st.exit_code == 0, st.output
    job = json.loads(st.stdout)["jobs"][0]
    out = tmp_path / "page" / "report.html"
    r = CliRunner().invoke(cli, ["report", "--out", str(out)], env=env, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(out) and out.is_file()
    page = out.read_text()
    # Self-contained: nothing to fetch (the only URL is the SVG namespace, which is a name, not a request).
    assert not re.search(r"<script|<link|<img|<iframe|@import|url\(\s*['\"]?(https?:|//)", page)
    assert set(re.findall(r"https?://[^\s\"'<>)]+", page)) == {"http://www.w3.org/2000/svg"}

    # The rows add up: every key in one class, plus the rows that never became keys.
    rows = job["rows"]
    assert rows["in_flight"] == 8 and rows["stale"] > 0 and job["dedupe"]["rows"] > 0
    unstored = sum(v["rows"] for k, v in job["never_sent_by_reason"].items() if k in ("null_key", "empty_prompt"))
    assert rows["succeeded"] + rows["in_flight"] + rows["failed"] + rows["never_sent"] == rows["known_keys"] + unstored
    assert sum(job["failures_by_type"].values()) == rows["failed"] > 0
    assert sum(v["rows"] for v in job["never_sent_by_reason"].values()) == rows["never_sent"] == 2

    box = layout(out, 1280)
    assert box["viewport"] == 1280
    shown = metrics(box["dom"])
    name = job["job"]
    for k in ("succeeded", "in_flight", "failed", "never_sent", "stale"):
        assert count(shown[f"{name}.rows.{k}"]) == rows[k], k
    assert count(shown[f"{name}.rows.total"]) == rows["known_keys"] + unstored
    for k, v in job["failures_by_type"].items():
        assert count(shown[f"{name}.failures_by_type.{k}"]) == v
    for k, v in job["never_sent_by_reason"].items():
        assert count(shown[f"{name}.never_sent_by_reason.{k}"]) == v["rows"]
    for k, v in job["tokens"].items():
        assert count(shown[f"{name}.tokens.{k}"]) == v
    assert count(shown[f"{name}.dedupe.rows"]) == job["dedupe"]["rows"]
    assert count(shown[f"{name}.billed_requests"]) == job["billed_requests"]
    assert money(shown[f"{name}.cost_usd"]) == round(job["cost_usd"], 4) > 0
    for lane, v in job["lanes"].items():  # per lane (this project answers through batches only)
        if v["billed_requests"] or v["rows_answered"]:
            assert count(shown[f"{name}.lanes.{lane}.rows_answered"]) == v["rows_answered"]
            assert money(shown[f"{name}.lanes.{lane}.cost_usd"]) == round(v["cost_usd"], 4)
    assert count(shown[f"{name}.lanes.batch.rows_answered"]) == rows["succeeded"]
    # Batch prices are half the synchronous ones: the same tokens would have cost twice as much.
    assert money(shown[f"{name}.sync_usd"]) == round(2 * job["cost_usd"], 4)

    # Every chart is drawn: its box holds ink, and some of it is the chart's data colour.
    expected = {f"{kind}-{name}" for kind in CHART_COLOURS}
    assert expected <= set(box["charts"]), sorted(box["charts"])
    img = screenshot(out, 1280, int(box["height"]) + 20)
    for chart in expected:
        x, y, w, h = (int(v) for v in box["charts"][chart])
        assert w > 600 and h > 30, (chart, w, h)
        region = img.crop((x, y, x + w, y + h))
        colours = region.getcolors(maxcolors=w * h)
        total = w * h
        ink = sum(n for n, c in colours if sum(c) < 720)  # anything not (near) white
        data = sum(n for n, c in colours if all(abs(a - b) <= 24 for a, b in zip(c, CHART_COLOURS[chart.rsplit("-", 1)[0]])))
        assert ink / total > 0.02, f"{chart} looks blank ({ink} of {total} pixels drawn)"
        assert data >= 200, f"{chart} has no data drawn in its colour ({data} pixels)"

    # A phone: the page itself does not scroll sideways (wide charts scroll inside their own box).
    phone = layout(out, 390)
    assert phone["viewport"] == 390 and phone["width"] <= 390, (phone["viewport"], phone["width"])
    assert all(w <= 390 for _, _, w, _ in phone["charts"].values())
    shot = screenshot(out, 390, 2400)
    assert shot.getcolors(maxcolors=390 * 2400) and len(shot.getcolors(maxcolors=390 * 2400)) > 20


def test_estimate_made_before_each_submission_is_recorded_beside_what_was_billed(project):
    import duckdb

    _, s = project
    con = duckdb.connect(str(s.state_path), read_only=True)
    try:
        rows = con.execute(
            "SELECT s.request_count, s.estimated_cost_usd, s.estimated_input_tokens + s.estimated_cache_write_tokens "
            "+ s.estimated_cache_read_tokens, s.estimated_sync_usd, sum(r.cost_usd) "
            "FROM submissions s JOIN batches b USING (batch_id) LEFT JOIN responses r USING (batch_id) GROUP BY ALL"
        ).fetchall()
    finally:
        con.close()
    assert len(rows) >= 5
    for n, est, prompt_tokens, sync, billed in rows:
        assert est > 0 and prompt_tokens >= n and sync > est  # every request has a prompt; batch is cheaper
        # The estimate is of the same order as the bill of the requests it was made for.
        if billed:
            assert 0.1 < est / billed < 20


def test_since_accepts_windows_and_refuses_anything_else(project, tmp_path):
    root, s = project
    assert parse_since("30d").days == 30 and parse_since("12h").total_seconds() == 43200
    assert parse_since("2w").days == 14 and parse_since("all") is None
    for bad in ("30", "-3d", "0d", "3 months", ""):
        with pytest.raises(ConfigError, match="--since"):
            parse_since(bad)
    r = CliRunner().invoke(cli, ["report", "--since", "soon", "--out", str(tmp_path / "x.html")], env=env_of(root, s))
    assert r.exit_code == 2 and "--since 'soon'" in r.output and "30d" in r.output
    assert not (tmp_path / "x.html").exists()
