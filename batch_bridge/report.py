"""`batch-bridge report`: one self-contained HTML page of what the enrichment did, cost and took.

The page is plain HTML with inline CSS and SVG drawn here, no script and nothing fetched, so it
opens from a file, a CI artifact or an e-mail attachment alike. Colours are the Okabe-Ito palette
(distinguishable with the common colour-vision deficiencies) and every series also has a pattern and
a text label with its number, so no figure depends on colour alone. Figures that `status --json`
reports carry `data-metric` attributes with the same names, so the two can be compared mechanically.
"""

from __future__ import annotations

import html
import math
import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Iterable

from . import state
from .config import Settings
from .pricing import load_prices
from .report_data import COST_PARTS, ReportData, gather, per_day

# Okabe-Ito.
BLACK, ORANGE, SKY, GREEN, YELLOW, BLUE, VERMILLION, PURPLE = (
    "#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7")
GREY = "#8C8C8C"
PART_STYLE = {"input": (BLUE, "solid", "input"), "output": (ORANGE, "diag", "output"),
              "cache_write": (PURPLE, "dots", "cache write"), "cache_read": (GREEN, "cross", "cache read")}
W = 760  # SVG user units; charts scale to the page width (and scroll sideways below a minimum)


def esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def num(n: int | float | None) -> str:
    return "-" if n is None else f"{n:,}" if isinstance(n, int) else f"{n:,.0f}"


def usd(x: float | None, digits: int = 4) -> str:
    return "unknown" if x is None else f"${x:,.{digits}f}"


def metric(name: str, text: str, tag: str = "span") -> str:
    return f'<{tag} data-metric="{esc(name)}">{esc(text)}</{tag}>'


class Svg:
    """An SVG being drawn, with the hatch patterns it uses declared once."""

    def __init__(self, height: int, label: str) -> None:
        self.h = height
        self.label = label
        self.body: list[str] = []
        self.defs: dict[str, str] = {}

    def fill(self, colour: str, pattern: str) -> str:
        if pattern == "solid":
            return colour
        pid = f"p{pattern}{colour[1:]}"
        shapes = {
            "diag": '<path d="M-1,1 l2,-2 M0,8 l8,-8 M7,9 l2,-2" stroke="#fff" stroke-width="2"/>',
            "rdiag": '<path d="M-1,7 l2,2 M0,0 l8,8 M7,-1 l2,2" stroke="#fff" stroke-width="2"/>',
            "dots": '<circle cx="4" cy="4" r="1.6" fill="#fff"/>',
            "cross": '<path d="M0,4 h8 M4,0 v8" stroke="#fff" stroke-width="1.4"/>',
            "hline": '<path d="M0,4 h8" stroke="#fff" stroke-width="2"/>',
        }[pattern]
        self.defs[pid] = (f'<pattern id="{pid}" width="8" height="8" patternUnits="userSpaceOnUse">'
                          f'<rect width="8" height="8" fill="{colour}"/>{shapes}</pattern>')
        return f"url(#{pid})"

    def add(self, s: str) -> None:
        self.body.append(s)

    def rect(self, x: float, y: float, w: float, h: float, colour: str, pattern: str = "solid", title: str = "") -> None:
        t = f"<title>{esc(title)}</title>" if title else ""
        self.add(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0):.1f}" height="{max(h, 0):.1f}" '
                 f'fill="{self.fill(colour, pattern)}" stroke="#fff" stroke-width="0.5">{t}</rect>')

    def text(self, x: float, y: float, s: str, anchor: str = "start", size: int = 12, colour: str = "#222",
             weight: str = "normal") -> None:
        self.add(f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}" fill="{colour}" '
                 f'font-weight="{weight}">{esc(s)}</text>')

    def line(self, x1: float, y1: float, x2: float, y2: float, colour: str = "#bbb", width: float = 1,
             dash: str = "") -> None:
        d = f' stroke-dasharray="{dash}"' if dash else ""
        self.add(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{colour}" '
                 f'stroke-width="{width}"{d}/>')

    def render(self) -> str:
        return (f'<svg viewBox="0 0 {W} {self.h}" role="img" aria-label="{esc(self.label)}" '
                f'xmlns="http://www.w3.org/2000/svg"><defs>{"".join(self.defs.values())}</defs>'
                + "".join(self.body) + "</svg>")


def swatch(colour: str, pattern: str) -> str:
    s = Svg(14, "")
    s.rect(0, 0, 14, 14, colour, pattern)
    return (f'<svg class="sw" viewBox="0 0 14 14" width="14" height="14" aria-hidden="true"><defs>'
            f'{"".join(s.defs.values())}</defs>{"".join(s.body)}</svg>')


def figure(chart_id: str, title: str, svg: str, legend: str = "", note: str = "") -> str:
    return (f'<figure class="chart" id="{esc(chart_id)}" data-chart="{esc(chart_id)}"><figcaption>{esc(title)}'
            f'</figcaption><div class="plot">{svg}</div>{legend}'
            + (f'<p class="note">{note}</p>' if note else "") + "</figure>")


def nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    e = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * e:
            return m * e
    return 10 * e


# --- charts -----------------------------------------------------------------------------------


def stacked_hbar(label: str, segments: list[tuple[str, int, str, str]], total: int | None = None) -> str:
    """One horizontal bar of (name, count, colour, pattern) parts, labelled inside where they fit."""
    s = Svg(56, label)
    total = total if total is not None else sum(v for _, v, _, _ in segments)
    x = 0.0
    if not total:
        s.rect(0, 8, W, 40, "#eeeeee")
        s.text(W / 2, 33, "no rows yet", "middle")
        return s.render()
    for name, v, colour, pattern in segments:
        if v <= 0:
            continue
        w = W * v / total
        s.rect(x, 8, w, 40, colour, pattern, f"{name}: {v:,}")
        if w > 60:
            s.add(f'<rect x="{x + w / 2 - 28:.1f}" y="19" width="56" height="18" rx="3" fill="#fff" opacity="0.85"/>')
            s.text(x + w / 2, 32, f"{v:,}", "middle", 12, "#000", "bold")
        x += w
    return s.render()


def legend(items: Iterable[tuple[str, str, str, str]], metric_names: Iterable[str | None] | None = None) -> str:
    """HTML legend rows: swatch, name, number (with its data-metric name)."""
    names = list(metric_names) if metric_names is not None else None
    out = []
    for i, (name, value, colour, pattern) in enumerate(items):
        m = names[i] if names else None
        v = metric(m, value) if m else esc(value)
        out.append(f"<li>{swatch(colour, pattern)}<span class='lname'>{esc(name)}</span><span class='lval'>{v}</span></li>")
    return f"<ul class='legend'>{''.join(out)}</ul>"


def stacked_columns(label: str, cats: list[str], parts: list[dict[str, float]], marks: list[float | None],
                    mark_name: str) -> str:
    """Vertical stacked bars (one per category) of the cost parts, with a marker (the estimate) beside each."""
    h, top, bottom, left = 260, 16, 58, 70
    s = Svg(h, label)
    n = max(len(cats), 1)
    vmax = nice_max(max([sum(p.values()) for p in parts] + [m or 0 for m in marks] + [0]))
    plot_h = h - top - bottom
    slot = (W - left - 10) / n
    bw = min(48.0, slot * 0.42)
    for k in range(5):
        v = vmax * k / 4
        y = top + plot_h - plot_h * k / 4
        s.line(left, y, W - 10, y, "#e2e2e2")
        s.text(left - 6, y + 4, usd(v, 0 if vmax >= 20 else 2 if vmax >= 0.2 else 4) if v else "0", "end", 12, "#555")
    if not cats:
        s.text(W / 2, h / 2, "no batches in this window", "middle")
    for i, (cat, p, m) in enumerate(zip(cats, parts, marks)):
        x = left + slot * i + slot / 2 - bw - 2
        y = top + plot_h
        for part in COST_PARTS:
            v = p.get(part, 0.0)
            if v <= 0:
                continue
            hh = plot_h * v / vmax
            colour, pattern, name = PART_STYLE[part]
            y -= hh
            s.rect(x, y, bw, hh, colour, pattern, f"{cat} {name}: {usd(v)}")
        if m is not None:
            hh = plot_h * m / vmax
            s.add(f'<rect x="{x + bw + 4:.1f}" y="{top + plot_h - hh:.1f}" width="{bw:.1f}" height="{hh:.1f}" '
                  f'fill="none" stroke="{BLACK}" stroke-width="1.5" stroke-dasharray="4 2">'
                  f'<title>{esc(cat)} {esc(mark_name)}: {esc(usd(m))}</title></rect>')
        if n <= 16 or i % math.ceil(n / 16) == 0:
            s.text(left + slot * i + slot / 2, h - bottom + 16, cat, "middle", 12, "#333")
    s.line(left, top + plot_h, W - 10, top + plot_h, "#888")
    return s.render()


def cost_legend() -> str:
    items = [(PART_STYLE[p][2], "", PART_STYLE[p][0], PART_STYLE[p][1]) for p in COST_PARTS]
    est = "<li><svg class='sw' viewBox='0 0 14 14' width='14' height='14' aria-hidden='true'><rect x='1' y='1' " \
          "width='12' height='12' fill='none' stroke='#000' stroke-dasharray='3 2'/></svg>" \
          "<span class='lname'>estimate before submission (dashed outline)</span></li>"
    return legend(items).replace("</ul>", est + "</ul>")


def timeline(label: str, batches: list[dict[str, Any]], now: datetime) -> str:
    """Each batch on a row: create -> end (solid), end -> collect (hatched), with its request count."""
    rows = [b for b in batches if b["created_at"]]
    row_h, top, left, right = 18, 26, 128, 84
    h = top + row_h * max(len(rows), 1) + 20
    s = Svg(h, label)
    if not rows:
        s.text(W / 2, 40, "no batches in this window", "middle")
        return s.render()
    t0 = min(b["created_at"] for b in rows)
    t1 = max([b["collected_at"] or b["ended_at"] or now for b in rows] + [t0 + timedelta(seconds=1)])
    span = (t1 - t0).total_seconds()
    pw = W - left - right

    def x(t: datetime) -> float:
        return left + pw * (t - t0).total_seconds() / span

    for k in range(5):
        t = t0 + timedelta(seconds=span * k / 4)
        s.line(x(t), top - 6, x(t), h - 18, "#e2e2e2")
        s.text(x(t), top - 10, t.strftime("%m-%d %H:%M:%S") if span < 86400 * 2 else t.strftime("%m-%d %H:%M"),
               "middle", 12, "#555")
    for i, b in enumerate(rows):
        y = top + i * row_h
        end = b["ended_at"] or now
        s.text(left - 6, y + 12, b["batch_id"][-14:], "end", 12, "#333")
        s.rect(x(b["created_at"]), y + 2, max(x(end) - x(b["created_at"]), 2), row_h - 5, BLUE, "solid",
               f"{b['batch_id']}: created {b['created_at']:%Y-%m-%d %H:%M:%S}, "
               + (f"ended {b['ended_at']:%H:%M:%S}" if b["ended_at"] else "still running"))
        if b["collected_at"] and b["ended_at"]:
            s.rect(x(b["ended_at"]), y + 2, max(x(b["collected_at"]) - x(b["ended_at"]), 2), row_h - 5, ORANGE, "diag",
                   f"{b['batch_id']}: collected {b['collected_at']:%Y-%m-%d %H:%M:%S}")
        elif not b["ended_at"]:
            s.rect(x(b["created_at"]), y + 2, max(x(now) - x(b["created_at"]), 2), row_h - 5, SKY, "dots",
                   f"{b['batch_id']}: {b['processing_status']}")
        s.text(W - right + 6, y + 12, f"{b['requests']:,} req", "start", 12, "#333")
    return s.render()


def histogram(label: str, values: list[float]) -> str:
    """Batch durations (create -> end) in bins, with the count on each bar."""
    h, top, bottom, left = 200, 16, 40, 40
    s = Svg(h, label)
    if not values:
        s.text(W / 2, h / 2, "no ended batches in this window", "middle")
        return s.render()
    lo, hi = min(values), max(values)
    bins = min(12, max(1, len(set(values))))
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    cmax = max(counts)
    plot_h, slot = h - top - bottom, (W - left - 10) / bins
    for i, c in enumerate(counts):
        hh = plot_h * c / cmax
        x = left + slot * i
        bw = min(slot - 4, 90)
        s.rect(x + (slot - bw) / 2, top + plot_h - hh, bw, hh, SKY, "solid", f"{c} batch(es)")
        if c:
            s.text(x + slot / 2, top + plot_h - hh - 3 if hh < plot_h - 12 else top + 12, str(c), "middle", 12, "#000")
        s.text(x + slot / 2, h - bottom + 14, duration(lo + width * i), "middle", 12, "#333")
    s.text(W - 10, h - 6, "batch duration, created -> ended (bin start)", "end", 12, "#555")
    s.line(left, top + plot_h, W - 10, top + plot_h, "#888")
    return s.render()


def rate_bars(label: str, names: list[str], rates: list[float | None]) -> str:
    """A bar per batch from 0 to 100 %: the share of its prompt tokens read from the cache."""
    h, top, bottom, left = 180, 16, 40, 44
    s = Svg(h, label)
    plot_h = h - top - bottom
    for k in range(0, 5):
        y = top + plot_h - plot_h * k / 4
        s.line(left, y, W - 10, y, "#e2e2e2")
        s.text(left - 6, y + 4, f"{25 * k}%", "end", 12, "#555")
    if not names:
        s.text(W / 2, h / 2, "no batches in this window", "middle")
    slot = (W - left - 10) / max(len(names), 1)
    for i, (n, r) in enumerate(zip(names, rates)):
        x = left + slot * i
        if r is None:
            s.text(x + slot / 2, top + plot_h - 4, "n/a", "middle", 12, "#555")
        else:
            hh = max(plot_h * r, 1.5)
            bw = min(slot * 0.6, 60)
            s.rect(x + (slot - bw) / 2, top + plot_h - hh, bw, hh, GREEN, "cross", f"{n}: {r:.1%}")
            s.text(x + slot / 2, top + plot_h - hh - 3, f"{r:.0%}", "middle", 12, "#000")
        if len(names) <= 16 or i % math.ceil(len(names) / 16) == 0:
            s.text(x + slot / 2, h - bottom + 14, n, "middle", 12, "#333")
    s.line(left, top + plot_h, W - 10, top + plot_h, "#888")
    return s.render()


def duration(sec: float | None) -> str:
    if sec is None:
        return "-"
    if sec < 10:
        return f"{sec:.1f}s"
    if sec < 120:
        return f"{sec:.0f}s"
    if sec < 7200:
        return f"{sec / 60:.0f}m"
    return f"{sec / 3600:.1f}h"


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


# --- sections ----------------------------------------------------------------------------------

FAILED_PATTERNS = ("diag", "cross", "rdiag", "dots", "hline", "solid")
NEVER_PATTERNS = ("dots", "hline", "diag", "rdiag", "cross", "solid")


def _rows_section(key: str, j: dict[str, Any]) -> str:
    r = j["rows"]
    segs: list[tuple[str, int, str, str]] = [("enriched", r["succeeded"], GREEN, "solid"),
                                               ("in flight", r["in_flight"], SKY, "dots")]
    names: list[str | None] = [f"{key}.rows.succeeded", f"{key}.rows.in_flight"]
    for i, (t, n) in enumerate(j["failures_by_type"].items()):
        segs.append((f"failed: {t}", n, VERMILLION, FAILED_PATTERNS[i % len(FAILED_PATTERNS)]))
        names.append(f"{key}.failures_by_type.{t}")
    for i, (t, v) in enumerate(j["never_sent_by_reason"].items()):
        segs.append((f"never sent: {t}", v["rows"], GREY, NEVER_PATTERNS[i % len(NEVER_PATTERNS)]))
        names.append(f"{key}.never_sent_by_reason.{t}")
    bar = stacked_hbar(f"rows of {key} by state", segs)
    leg = legend([(n, f"{v:,}", c, p) for n, v, c, p in segs], names)
    total = r["succeeded"] + r["in_flight"] + r["failed"] + r["never_sent"]
    m = {k: metric(f"{key}.rows.{k}", f"{v:,}") for k, v in r.items()}
    summary = (f"<p class='kpis'>rows {metric(key + '.rows.total', f'{total:,}')} · enriched {m['succeeded']} · "
               f"in flight {m['in_flight']} · failed {m['failed']} · never sent {m['never_sent']}</p>")
    shown = [("current answer", r["succeeded"], GREEN, "solid"), ("stale answer (input changed since)", r["stale"], ORANGE, "diag"),
             ("no answer", max(total - r["succeeded"] - r["stale"], 0), "#DDDDDD", "solid")]
    answer_bar = stacked_hbar(f"answers dbt shows for {key}", shown)
    answer_leg = legend([(n, f"{v:,}", c, p) for n, v, c, p in shown],
                        [f"{key}.rows.succeeded_shown", f"{key}.rows.stale", None])
    ded = j.get("dedupe") or {"rows": 0, "saved_usd": 0.0}
    dedupe = (f"<p class='kpis'>deduplicated: {metric(key + '.dedupe.rows', num(ded['rows']))} rows answered by "
              f"another row's identical request, saving {metric(key + '.dedupe.saved_usd', usd(ded['saved_usd']))}</p>")
    return (summary + figure(f"rows-{key}", "Rows by state", bar, leg,
                             "In flight: submitted, not yet collected. Failed: the latest answer for the row's current "
                             "input is an error (by type). Never sent: refused before sending (by reason).")
            + figure(f"answers-{key}", "What dbt shows (stale: a newer input has no answer yet)", answer_bar, answer_leg)
            + dedupe)


def _cost_section(key: str, j: dict[str, Any], batches: list[dict[str, Any]]) -> str:
    cost, sync = j["cost_usd"], j["sync_usd_same_tokens"]
    saving = (sync - j["cost_usd_known_part"]) if sync is not None else None
    t = j["tokens"]
    tk = {k: metric(f"{key}.tokens.{k}", f"{v:,}") for k, v in t.items()}
    pct = f" ({saving / sync:.0%})" if saving is not None and sync else ""
    head = (f"<p class='kpis'>billed (all time) {metric(key + '.cost_usd', usd(cost))} for "
            f"{metric(key + '.billed_requests', num(j['billed_requests']))} answers · at synchronous prices "
            f"{metric(key + '.sync_usd', usd(sync))} · saved {metric(key + '.saving_usd', usd(saving))}{pct}</p>"
            f"<p class='kpis'>tokens: input {tk['input']} · output {tk['output']} · cache write {tk['cache_write']} · "
            f"cache read {tk['cache_read']}</p>")
    lanes = "".join(
        f" · {lane}: {metric(f'{key}.lanes.{lane}.rows_answered', num(v['rows_answered']))} rows answered, "
        f"{metric(f'{key}.lanes.{lane}.cost_usd', usd(v['cost_usd']))} billed"
        + (" (standard prices)" if lane == "sync" else " (batch prices)")
        for lane, v in (j.get("lanes") or {}).items() if v["billed_requests"] or v["rows_answered"])
    head += f"<p class='kpis'>by lane{lanes}</p>" if lanes else ""
    w = j["window"]
    est = (f"<p class='kpis'>in this window: {w['batches']} batch(es), billed {usd(w['cost_usd'])}; estimated before "
           f"submission {usd(w['estimate_usd']) if w['estimated_batches'] else 'not recorded'}"
           + (f" for {w['estimated_batches']} of them" if w['estimated_batches'] and w['estimated_batches'] < w['batches'] else "")
           + "</p>")
    days = per_day(batches)
    day_chart = stacked_columns(f"cost per day of {key}", [d["day"][5:] for d in days],
                                [d["cost_parts_usd"] for d in days], [d["estimate_usd"] for d in days], "estimate")
    batch_chart = stacked_columns(f"cost per batch of {key}", [b["batch_id"][-6:] for b in batches],
                                  [b["cost_parts_usd"] for b in batches],
                                  [b["estimate"]["cost_usd"] if b["estimate"] else None for b in batches], "estimate")
    rows = "".join(
        f"<tr><td class='id'>{esc(b['batch_id'])}</td><td>{esc(b['job'])}</td><td>{b['requests']:,}</td>"
        + "".join(f"<td>{usd(b['cost_parts_usd'][p])}</td>" for p in COST_PARTS)
        + f"<td>{usd(b['cost_usd'])}</td><td>{usd(b['estimate']['cost_usd']) if b['estimate'] else 'not recorded'}</td>"
        f"<td>{usd(b['sync_usd'])}</td></tr>" for b in batches)
    table = ("<div class='scroll'><table><thead><tr><th>batch</th><th>job</th><th>requests</th><th>input</th>"
             "<th>output</th><th>cache write</th><th>cache read</th><th>billed</th><th>estimate</th>"
             f"<th>synchronous</th></tr></thead><tbody>{rows}</tbody></table></div>") if batches else ""
    return (head + est + figure(f"cost-day-{key}", "Cost per day (by the day each batch ended)", day_chart, cost_legend())
            + figure(f"cost-batch-{key}", "Cost per batch, billed beside the estimate made before submitting it",
                     batch_chart, cost_legend()) + table)


def _time_section(key: str, batches: list[dict[str, Any]], now: datetime) -> str:
    durations = [b["duration_seconds"] for b in batches if b["duration_seconds"] is not None]
    p50, p90 = quantile(durations, 0.5), quantile(durations, 0.9)
    tl_leg = legend([("created -> ended", "", BLUE, "solid"), ("ended -> collected", "", ORANGE, "diag"),
                     ("still running", "", SKY, "dots")])
    kp = (f"<p class='kpis'>{len(durations)} ended batch(es): median {metric(key + '.duration.p50', duration(p50))}, "
          f"90th percentile {metric(key + '.duration.p90', duration(p90))}, longest {duration(max(durations) if durations else None)}</p>")
    return (figure(f"timeline-{key}", "Batches over time, with request counts", timeline(f"timeline of {key}", batches, now), tl_leg)
            + kp + figure(f"durations-{key}", "Distribution of batch durations", histogram(f"durations of {key}", durations)))


def _cache_section(key: str, batches: list[dict[str, Any]]) -> str:
    names = [b["batch_id"][-6:] for b in batches]
    rates = [b["cache_hit_rate"] for b in batches]
    return figure(f"cache-{key}", "Cache hit rate per batch (prompt tokens read from the cache)",
                  rate_bars(f"cache hit rate of {key}", names, rates))


def _errors_section(errors: list[dict[str, Any]]) -> str:
    if not errors:
        return "<p class='kpis'>No errored, expired, canceled or unparsable answers in this window.</p>"
    rows = "".join(
        f"<tr><td>{esc(e['job'])}</td><td>{esc(e['type'])}</td><td>{e['answers']:,}</td>"
        f"<td>{e['latest_at']:%Y-%m-%d %H:%M}</td><td class='id'>{'<br>'.join(esc(x) for x in e['examples'] or [])}</td>"
        f"<td class='msg'>{esc((e['message'] or '')[:200])}</td></tr>" for e in errors[:30])
    return ("<div class='scroll'><table><thead><tr><th>job</th><th>type</th><th>answers</th><th>latest</th>"
            f"<th>example custom_ids</th><th>latest message</th></tr></thead><tbody>{rows}</tbody></table></div>")


def overall(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """The jobs' figures added up (failure types and reasons by name)."""
    def add(dicts: Iterable[dict[str, int]], keys: Iterable[str] = ()) -> dict[str, int]:
        out: dict[str, int] = dict.fromkeys(keys, 0)
        for d in dicts:
            for k, v in d.items():
                out[k] = out.get(k, 0) + v
        return out

    never: dict[str, dict[str, Any]] = {}
    for j in jobs:
        for k, v in j["never_sent_by_reason"].items():
            never.setdefault(k, {"rows": 0, "why": v["why"]})["rows"] += v["rows"]
    known = [j["cost_usd"] for j in jobs]
    syncs = [j["sync_usd_same_tokens"] for j in jobs]
    return {
        "job": "all jobs",
        "rows": add((j["rows"] for j in jobs), ("known_keys", "succeeded", "in_flight", "failed", "never_sent", "stale")),
        "failures_by_type": dict(sorted(add(j["failures_by_type"] for j in jobs).items(), key=lambda kv: -kv[1])),
        "never_sent_by_reason": never,
        "dedupe": {"rows": sum(j["dedupe"]["rows"] for j in jobs), "saved_usd": sum(j["dedupe"]["saved_usd"] for j in jobs)},
        "cost_usd": None if any(c is None for c in known) else sum(known),
        "cost_usd_known_part": sum(j["cost_usd_known_part"] for j in jobs),
        "sync_usd_same_tokens": None if any(s is None for s in syncs) else sum(syncs),
        "billed_requests": sum(j["billed_requests"] for j in jobs),
        "tokens": add((j["tokens"] for j in jobs), COST_PARTS),
        "window": {k: sum(j["window"][k] for j in jobs) for k in ("batches", "cost_usd", "estimate_usd", "estimated_batches")},
    }


CSS = """
:root{--fg:#1d1d1d;--muted:#5a5a5a;--line:#e3e3e3}
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--fg);margin:0;background:#fafafa}
main{max-width:1200px;margin:0 auto;padding:16px 20px 48px}
h1{font-size:24px;margin:8px 0 2px}h2{font-size:20px;margin:28px 0 8px;border-bottom:2px solid var(--fg);padding-bottom:4px}
h3{font-size:16px;margin:18px 0 6px;color:#333}
.sub{color:var(--muted);margin:0 0 12px}
nav a{margin-right:12px}
section.job{background:#fff;border:1px solid var(--line);border-radius:8px;padding:4px 18px 14px;margin:18px 0}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:8px 24px}
@media (max-width:900px){.grid{grid-template-columns:1fr}}
figure.chart{margin:10px 0 14px}
figcaption{font-weight:600;margin-bottom:4px}
.plot{overflow-x:auto}
.plot svg{width:100%;max-width:960px;min-width:480px;height:auto;display:block}
.legend{list-style:none;padding:0;margin:6px 0 0;display:flex;flex-wrap:wrap;gap:4px 16px}
.legend li{display:flex;align-items:center;gap:6px}
.legend .lval{font-weight:600;font-variant-numeric:tabular-nums}
.sw{flex:none;border:1px solid #999}
.kpis{margin:6px 0;font-variant-numeric:tabular-nums}
.kpis [data-metric]{font-weight:700}
.note{color:var(--muted);font-size:13px;margin:4px 0}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:13px;font-variant-numeric:tabular-nums;margin:8px 0;min-width:100%}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid var(--line);vertical-align:top}
td.id{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;white-space:nowrap}
td.msg{max-width:360px}
@media (max-width:600px){.plot svg{min-width:600px}main{padding:10px}section.job{padding:2px 10px 10px}body{font-size:14px}h1{font-size:20px}}
"""


def _job_block(key: str, title: str, j: dict[str, Any], batches: list[dict[str, Any]],
               errors: list[dict[str, Any]], now: datetime) -> str:
    return (f"<section class='job' id='job-{esc(key)}'><h2>{esc(title)}</h2>"
            "<h3>Rows</h3>" + _rows_section(key, j)
            + "<h3>Cost</h3>" + _cost_section(key, j, batches)
            + "<h3>Time</h3>" + _time_section(key, batches, now)
            + "<h3>Cache</h3>" + _cache_section(key, batches)
            + "<h3>Latest errors</h3>" + _errors_section(errors) + "</section>")


def render(data: ReportData, project: str = "") -> str:
    """The whole page as a string."""
    now = data.generated_at
    window = f"since {data.since:%Y-%m-%d %H:%M} UTC" if data.since else "all time"
    blocks = []
    if len(data.jobs) != 1:
        blocks.append(_job_block("overall", "All jobs", overall(data.jobs), data.batches, data.errors, now))
    for j in data.jobs:
        blocks.append(_job_block(j["job"], f"Job {j['job']}", j, [b for b in data.batches if b["job"] == j["job"]],
                                 [e for e in data.errors if e["job"] == j["job"]], now))
    nav = "".join(f"<a href='#job-{esc(j['job'])}'>{esc(j['job'])}</a>" for j in data.jobs)
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>batch-bridge report{(' - ' + esc(project)) if project else ''}</title><style>{CSS}</style></head><body><main>"
        f"<h1>batch-bridge report{(': ' + esc(project)) if project else ''}</h1>"
        f"<p class='sub'>Generated {now:%Y-%m-%d %H:%M} UTC from the bridge's own state. Row counts and totals are "
        f"as of now (the same as <code>batch-bridge status</code>); costs per day, batches and errors: {esc(window)}. "
        "Costs at batch prices (50% of synchronous).</p>"
        f"<nav>{nav}</nav>" + "".join(blocks) + "</main></body></html>"
    )


def write_report(settings: Settings, jobs: list[str], out: Path, since: timedelta | None) -> Path:
    """Gather from the state file, render, and write `out` atomically. Returns its absolute path."""
    book = load_prices(settings.prices_file)
    with state.connect(settings) as con:
        data = gather(con, jobs, book, since)
    page = render(data, settings.project_dir.name)
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out
