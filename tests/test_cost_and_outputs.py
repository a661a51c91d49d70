"""Cost (estimates, budgets, billed cost per row) and structured outputs (typed columns, parse_failed, tools)."""

from __future__ import annotations

import json
from importlib import resources

import duckdb
import pytest

from batch_bridge import api, bridge, outputs, state
from batch_bridge import collect as collect_mod
from batch_bridge.config import DEFAULT_MEMORY_LIMIT
from batch_bridge.emulator import EmulatorConfig, run_emulator
from batch_bridge.errors import BudgetExceeded
from batch_bridge.progress import Recorder
from helpers import current, load_staging, settings_for, write_project

RICH_SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["a", "b", "c"]},
        "confidence": {"type": "number", "description": "from 0 to 1"},
        "count": {"type": "integer"},
        "flagged": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "detail": {
            "type": "object",
            "properties": {"reason": {"type": "string"}, "score": {"type": "integer"}},
            "required": ["reason", "score"],
            "additionalProperties": False,
        },
        "spans": {
            "type": "array",
            "items": {"type": "object", "properties": {"start": {"type": "integer"}, "text": {"type": "string"}},
                      "required": ["start", "text"], "additionalProperties": False},
        },
    },
    "required": ["label", "confidence", "count", "flagged", "tags", "detail", "spans"],
    "additionalProperties": False,
}


def meta(**over):
    m = {"job": "items", "key": "id", "model": "claude-haiku-4-5", "max_tokens": 400, "prompt_column": "prompt",
         "system": "You label short texts."}
    m.update(over)
    return {k: v for k, v in m.items() if v is not None}


def setup(tmp_path, base_url, m, n=20):
    write_project(tmp_path, m)
    s = settings_for(tmp_path, base_url)
    load_staging(s, f"SELECT 'k' || i AS id, 'text number ' || i || ' about pricing' AS prompt FROM range({n}) t(i)")
    return s


def run(s):
    return bridge.run(s, bridge.load_jobs(s), api.build_client(s))


def plan_json(s):
    plans, est = bridge.plan(s, bridge.load_jobs(s))
    return bridge.plan_to_json(plans[0], est[plans[0].job.name])


def parquet_types(s, job="items"):
    con = duckdb.connect()
    return {r[0]: r[1] for r in con.execute(
        f"DESCRIBE SELECT * FROM read_parquet('{s.results_dir(job) / 'current.parquet'}')").fetchall()}


def test_schema_fields_become_typed_columns(tmp_path, emulator):
    s = setup(tmp_path, emulator.base_url, meta(output_schema=RICH_SCHEMA))
    run(s)
    types = parquet_types(s)
    assert types["label"] == "VARCHAR"
    assert types["confidence"] == "DOUBLE"
    assert types["count"] == "BIGINT"
    assert types["flagged"] == "BOOLEAN"
    assert types["tags"] == "VARCHAR[]"
    assert types["detail"] == "STRUCT(reason VARCHAR, score BIGINT)"
    assert types["spans"] == "STRUCT(\"start\" BIGINT, \"text\" VARCHAR)[]"
    rows = current(s, "items")
    assert {r["status"] for r in rows} == {"succeeded"}
    assert all(r["label"] in ("a", "b", "c") and isinstance(r["confidence"], float) for r in rows)
    assert all(isinstance(r["detail"]["reason"], str) for r in rows)
    # the output schema was sent as output_config.format
    line = json.loads(next(s.requests_dir.glob("*.jsonl")).read_text().splitlines()[0])
    assert line["params"]["output_config"] == {"format": {"type": "json_schema", "schema": RICH_SCHEMA}}


def test_empty_results_file_has_the_typed_columns_before_any_answer(tmp_path, emulator):
    s = setup(tmp_path, emulator.base_url, meta(output_schema=RICH_SCHEMA), n=3)
    bridge.plan(s, bridge.load_jobs(s))
    assert not (s.results_dir("items") / "current.parquet").exists()  # plan writes nothing
    bridge.submit(s, bridge.load_jobs(s), api.build_client(s))  # publishes the (still empty) source
    types = parquet_types(s)
    assert types["detail"] == "STRUCT(reason VARCHAR, score BIGINT)" and types["status"] == "VARCHAR"
    assert current(s, "items") == []


def _bad_answer(params, custom_id=None):
    """A responder whose answers break the schema: one non-JSON, the rest with an enum value not allowed."""
    text = "not json at all" if custom_id == "k0" else json.dumps({"sentiment": "ecstatic"})
    return {"content": [{"type": "text", "text": text}], "stop_reason": "end_turn"}


def test_answers_that_do_not_match_the_schema_are_parse_failed_with_raw_text(tmp_path):
    schema = {"type": "object", "properties": {"sentiment": {"type": "string", "enum": ["positive", "negative"]}},
              "required": ["sentiment"], "additionalProperties": False}
    with run_emulator(EmulatorConfig(responder=_bad_answer)) as emu:
        s = setup(tmp_path, emu.base_url, meta(output_schema=schema), n=3)
        run(s)
        rows = {r["id"]: r for r in current(s, "items")}
        assert {r["status"] for r in rows.values()} == {"parse_failed"}
        assert rows["k0"]["output_text"] == "not json at all"
        assert json.loads(rows["k1"]["output_text"]) == {"sentiment": "ecstatic"}
        assert rows["k1"]["sentiment"] is None  # typed columns only for answers that match the schema
        assert all(r["cost_usd"] > 0 for r in rows.values())  # the answer was billed even if unusable
        p = plan_json(s)
        assert p["rows_to_send"] == 0 and p["skipped"]["parse_failed"]["rows"] == 3

        write_project(tmp_path, meta(output_schema=schema, retry_parse_failed=True))
        p = plan_json(s)
        assert p["rows_to_send"] == 3  # only when the job says so


_GOOD = {"label": "a", "confidence": 0.5, "count": 3, "flagged": True, "tags": ["x"],
         "detail": {"reason": "r", "score": 1}, "spans": [{"start": 0, "text": "t"}]}
# Answers to RICH_SCHEMA (valid and broken in each way the check covers) and to a schema with an optional
# and a nullable property; the k-th row is answered with the k-th.
CHECKED_ANSWERS = {
    "rich": [_GOOD, {**_GOOD, "label": "d"}, {**_GOOD, "confidence": "0.5"}, {**_GOOD, "confidence": 1},
             {**_GOOD, "count": 3.5}, {**_GOOD, "count": True}, {**_GOOD, "flagged": "yes"}, {**_GOOD, "tags": [1]},
             {**_GOOD, "tags": []}, {**_GOOD, "detail": {"reason": "r"}}, {**_GOOD, "detail": {"reason": "r", "score": 1, "x": 2}},
             {**_GOOD, "detail": None}, {**_GOOD, "spans": [{"start": 0, "text": "t", "x": 1}]}, {**_GOOD, "spans": []},
             {**_GOOD, "spans": [{"start": "0", "text": "t"}]}, {**_GOOD, "extra": 1}, {**_GOOD, "caf\u00e9": 1},
             {k: v for k, v in _GOOD.items() if k != "tags"}, {**_GOOD, "label": None}, dict(reversed(_GOOD.items())),
             [_GOOD], "a string", None],
    "optional": [{"a": None}, {"a": "x", "b": 1}, {}, {"b": 1}, {"a": None, "b": None}, {"a": 1}, {"a": "x", "c": 1},
                 {"a": "x", "b": "1"}],
}
OPTIONAL_SCHEMA = {"type": "object", "properties": {"a": {"type": ["string", "null"]}, "b": {"type": "integer"}},
                   "required": ["a"], "additionalProperties": False}


# After those, answers that no Python value writes: a property named twice is parse_failed.
TWICE_NAMED = ['{"a": "x", "a": "y"}', '{"a": "x", "b": 1, "b": 2}']


def _checked_answer(params, custom_id=None):
    kind = params["messages"][-1]["content"].split()[0]
    answers, i = CHECKED_ANSWERS[kind], int(custom_id[1:])
    text = json.dumps(answers[i]) if i < len(answers) else TWICE_NAMED[i - len(answers)]
    return {"content": [{"type": "text", "text": text}], "stop_reason": "end_turn"}


@pytest.mark.parametrize("kind,schema", [("rich", RICH_SCHEMA), ("optional", OPTIONAL_SCHEMA)])
def test_the_loads_schema_check_agrees_with_a_json_schema_validator(tmp_path, kind, schema):
    """Each answer is loaded as succeeded exactly when the `jsonschema` package finds it valid (the
    check parses each object once into its properties' values, and checks each value alone, at every
    depth); an answer that names a property twice is parse_failed."""
    import jsonschema

    answers = CHECKED_ANSWERS[kind]
    with run_emulator(EmulatorConfig(responder=_checked_answer)) as emu:
        write_project(tmp_path, meta(output_schema=schema))
        s = settings_for(tmp_path, emu.base_url)
        n = len(answers) + len(TWICE_NAMED)
        load_staging(s, f"SELECT 'k' || i AS id, '{kind} answer ' || i AS prompt FROM range({n}) t(i)")
        run(s)
    got = {r["id"]: r["status"] for r in current(s, "items")}
    expected = {f"k{i}": "succeeded" if jsonschema.Draft202012Validator(schema).is_valid(a) else "parse_failed"
                for i, a in enumerate(answers)}
    expected.update({f"k{i}": "parse_failed" for i in range(len(answers), n)})
    assert got == expected
    assert 2 <= list(expected.values()).count("succeeded") < len(answers) - 4  # both verdicts are exercised


NESTED_SCHEMA = {
    "type": "object",
    "properties": {
        "a": {"type": "array", "items": {"type": "array", "items": {
            "type": "object",
            "properties": {"p": {"type": ["integer", "null"]},
                           "q": {"type": "object", "properties": {"r": {"type": "string", "enum": ["x", "y"]}},
                                 "required": ["r"], "additionalProperties": False}},
            "required": ["p"], "additionalProperties": False}}},
        "b": {"type": ["object", "null"], "properties": {"c": {"type": "boolean"}}, "additionalProperties": False},
        "we'ird \"key\"": {"type": "number"},
    },
    "required": ["a"], "additionalProperties": False,
}
NESTED_ANSWERS = [
    {"a": []}, {"a": [[{"p": 1}]]}, {"a": [[{"p": None, "q": {"r": "x"}}]]}, {"a": [[{"p": 1, "q": {"r": "z"}}]]},
    {"a": [[{"p": 1, "q": {}}]]}, {"a": [[{"q": {"r": "x"}}]]}, {"a": [[{"p": 1.5}]]}, {"a": [[{"p": 1, "z": 0}]]},
    {"a": [[1]]}, {"a": [{"p": 1}]}, {"a": [], "b": None}, {"a": [], "b": {"c": True}}, {"a": [], "b": {"c": 1}},
    {"a": [], "b": {"d": 1}}, {"a": [], "we'ird \"key\"": 2.5}, {"a": [], "we'ird \"key\"": "2"}, {}, {"b": None},
]


def test_nested_objects_are_checked_as_a_json_schema_validator_checks_them():
    """Objects in arrays in arrays, nullable objects and quoted property names: the check (each object
    parsed once, bound to a lambda's parameter at every depth) gives the `jsonschema` package's verdicts."""
    import jsonschema

    check = outputs.valid_sql(NESTED_SCHEMA, "j")
    con = duckdb.connect()
    got = [con.execute(f"SELECT coalesce({check}, false) FROM (SELECT json($t) AS j)", {"t": json.dumps(a)}).fetchone()[0]
           for a in NESTED_ANSWERS]
    expected = [jsonschema.Draft202012Validator(NESTED_SCHEMA).is_valid(a) for a in NESTED_ANSWERS]
    assert got == expected
    assert 4 <= sum(expected) <= len(expected) - 4  # both verdicts are exercised


def test_forced_tool_output(tmp_path, emulator):
    tool = {"name": "record_label", "description": "Record the label of a text.",
            "input_schema": {"type": "object", "properties": {"label": {"type": "string", "enum": ["x", "y"]},
                                                              "score": {"type": "number"}},
                             "required": ["label", "score"], "additionalProperties": False}}
    s = setup(tmp_path, emulator.base_url, meta(output_tool=tool), n=5)
    run(s)
    rows = current(s, "items")
    assert {r["status"] for r in rows} == {"succeeded"} and {r["stop_reason"] for r in rows} == {"tool_use"}
    assert all(r["label"] in ("x", "y") and isinstance(r["score"], float) for r in rows)
    assert parquet_types(s)["label"] == "VARCHAR"
    line = json.loads(next(s.requests_dir.glob("*.jsonl")).read_text().splitlines()[0])
    assert line["params"]["tool_choice"] == {"type": "tool", "name": "record_label"}
    assert line["params"]["tools"] == [tool]


PRICES = json.loads((resources.files("batch_bridge") / "prices.json").read_text())


def test_cost_columns_match_a_hand_computation_with_caching(tmp_path):
    system = "You label short texts. " + "Follow the labelling guide carefully. " * 60
    with run_emulator(EmulatorConfig(cache_min_tokens=100)) as emu:
        s = setup(tmp_path, emu.base_url, meta(system=system, cache_ttl="1h", output_schema=None), n=30)
        run(s)
        rows = current(s, "items")
    price = PRICES["models"]["claude-haiku-4-5"]
    assert sum(r["cache_creation_input_tokens"] or 0 for r in rows) > 0
    assert sum(r["cache_read_input_tokens"] or 0 for r in rows) > 0
    for r in rows:
        con = duckdb.connect()
        u = con.execute(
            f"SELECT input_tokens, output_tokens, cache_creation_input_tokens, cache_read_input_tokens "
            f"FROM read_parquet('{s.results_dir('items') / 'history' / '*.parquet'}') WHERE custom_id = ?",
            [r["custom_id"]]).fetchone()
        inp, out, cw, cr = (x or 0 for x in u)
        # 1h cache writes cost 2x base input, reads 0.1x; the batch discount halves everything.
        hand = 0.5 * (inp * price["input"] + out * price["output"] + cw * price["input"] * 2.0
                      + cr * price["input"] * 0.1) / 1e6
        assert r["cost_usd"] == pytest.approx(hand, rel=1e-9)


def test_errored_canceled_expired_are_free(tmp_path, emulator):
    emulator.set_faults(errored_fraction=0.5, expired_fraction=0.3)
    s = setup(tmp_path, emulator.base_url, meta(), n=40)
    run(s)
    rows = current(s, "items")
    assert {r["status"] for r in rows} >= {"errored", "expired", "succeeded"}
    assert all(r["cost_usd"] == 0 for r in rows if r["status"] != "succeeded")
    assert all(r["cost_usd"] > 0 for r in rows if r["status"] == "succeeded")


def test_unknown_model_price_is_unknown_not_zero(tmp_path, emulator):
    s = setup(tmp_path, emulator.base_url, meta(model="claude-3-opus-20240229", max_tokens=100), n=4)
    plans, est = bridge.plan(s, bridge.load_jobs(s))
    assert est["items"].batch_usd is None and "no price" in est["items"].method
    with pytest.raises(BudgetExceeded, match="unknown"):
        bridge.submit(s, bridge.load_jobs(s), api.build_client(s), max_cost=10.0)
    run(s)
    rows = current(s, "items")
    assert {r["status"] for r in rows} == {"succeeded"}
    assert all(r["cost_usd"] is None for r in rows)


def test_a_budget_below_a_cent_is_named_as_given(tmp_path, emulator):
    s = setup(tmp_path, emulator.base_url, meta(budget_usd=0.0001), n=20)
    client = api.build_client(s)
    before = {b.id for b in client.messages.batches.list(limit=1000)}
    with pytest.raises(BudgetExceeded) as e:
        bridge.submit(s, bridge.load_jobs(s), client)
    assert "budget_usd of job 'items' = $0.0001; nothing was sent" in e.value.message
    assert {b.id for b in client.messages.batches.list(limit=1000)} == before


def test_estimate_is_close_to_billed_cost_and_learns_from_history(tmp_path, emulator):
    s = setup(tmp_path, emulator.base_url, meta(output_schema={
        "type": "object", "properties": {"sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
                                         "summary": {"type": "string"}},
        "required": ["sentiment", "summary"], "additionalProperties": False}), n=200)
    _, est = bridge.plan(s, bridge.load_jobs(s), client=api.build_client(s))
    first = est["items"].batch_usd
    run(s)
    billed = sum(r["cost_usd"] for r in current(s, "items"))
    assert first == pytest.approx(billed, rel=0.25)
    assert est["items"].sync_usd == pytest.approx(2 * est["items"].batch_usd, rel=0.5)
    # New rows of the same shape: the estimate now uses observed answers and gets closer.
    load_staging(s, "SELECT 'k' || i AS id, 'text number ' || i || ' about pricing' AS prompt FROM range(400) t(i)")
    _, est2 = bridge.plan(s, bridge.load_jobs(s), client=api.build_client(s))
    assert "earlier answers" in est2["items"].method
    run(s)
    con = duckdb.connect()
    billed2 = con.execute(
        f"SELECT sum(cost_usd) FROM read_parquet('{s.results_dir('items') / 'current.parquet'}') "
        "WHERE NOT regexp_full_match(id, 'k([0-9]|[1-9][0-9]|1[0-9][0-9])')").fetchone()[0]
    assert est2["items"].batch_usd == pytest.approx(billed2, rel=0.10)


def _long_answer(params, custom_id=None):
    """A 20,000-character answer per request (a long summary), the same for every run."""
    return {"content": [{"type": "text", "text": (f"{custom_id}: " + "a long and careful answer " * 800)[:20_000]}],
            "stop_reason": "end_turn"}


def test_long_answers_load_and_publish_in_row_groups_capped_in_bytes(tmp_path):
    """2,000 answers of 20 KB (40 MB) at the default memory limit: everything is loaded and published,
    and Parquet row groups are capped in bytes (a 16,384-row group of such answers would be one 300 MB
    column chunk, a single allocation beyond the default memory limit)."""
    with run_emulator(EmulatorConfig(responder=_long_answer)) as emu:
        write_project(tmp_path, meta(max_tokens=8000))
        s = settings_for(tmp_path, emu.base_url)
        load_staging(s, "SELECT 'k' || i AS id, 'text number ' || i AS prompt FROM range(2000) t(i)")
        _, waited = run(s)
        assert waited.collected == {"items": 2000}, waited
    out = s.results_dir("items")
    con = duckdb.connect()
    n, shortest = con.execute(
        f"SELECT count(*), min(length(output_text)) FROM read_parquet('{out / 'current.parquet'}')").fetchone()
    assert (n, shortest) == (2000, 20_000)
    for f in [*(out / "current.parquet").glob("*.parquet"), *(out / "history").glob("msgbatch_*.parquet")]:
        groups = con.execute(
            f"SELECT row_group_id, sum(total_uncompressed_size) FROM parquet_metadata('{f}') GROUP BY ALL").fetchall()
        assert len(groups) > 1 and max(size for _, size in groups) < 16 * 1024 * 1024, (f.name, groups)
    with state.connect(s) as con:
        (size, lines) = con.execute("SELECT result_bytes, result_lines FROM bb_state.batches").fetchone()
    assert lines == 2000 and size > 2000 * 20_000  # what gives the publish its room for these rows


def _longer_answer(params, custom_id=None):
    """A 60,000-character answer per request (a long report)."""
    return {"content": [{"type": "text", "text": (f"{custom_id}: " + "a long and careful answer " * 2400)[:60_000]}],
            "stop_reason": "end_turn"}


def _one_huge_answer(params, custom_id=None):
    """A 33 MiB answer for request k1 (DuckDB's 16 MiB default
    maximum_object_size reads lines up to its 32 MiB buffer), short ones otherwise."""
    text = "x" * (33 * 2**20) if custom_id == "k1" else f"{custom_id}: fine"
    usage = {"input_tokens": 10, "output_tokens": len(text) // 4}  # given: the emulator need not tokenize it
    return {"content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "usage": usage}


def test_an_answer_longer_than_the_readers_default_loads_whole(tmp_path):
    """The JSON reader's maximum_object_size follows the longest line of the slice it reads: a result line
    of 33 MiB (beyond what DuckDB's 16 MiB default reads) loads whole, next to ordinary ones in its slice."""
    with run_emulator(EmulatorConfig(responder=_one_huge_answer)) as emu:
        write_project(tmp_path, meta(max_tokens=20000))
        s = settings_for(tmp_path, emu.base_url)
        load_staging(s, "SELECT 'k' || i AS id, 'text number ' || i AS prompt FROM range(3) t(i)")
        jobs, client = bridge.load_jobs(s), api.build_client(s)
        bridge.submit(s, jobs, client)
        bridge.wait(s, jobs, client, timeout=60)
        report = bridge.collect(s, jobs, client)
        client.close()
    assert report.loaded == {"items": 3}
    rows = {r["id"]: r for r in current(s, "items")}
    assert {k: r["status"] for k, r in rows.items()} == {"k0": "succeeded", "k1": "succeeded", "k2": "succeeded"}
    assert len(rows["k1"]["output_text"]) == 33 * 2**20 and rows["k2"]["output_text"] == "k2: fine"


def test_a_slice_of_ordinary_lines_reads_with_the_default_buffer_whatever_its_size(tmp_path):
    """A slice's reader is sized by its longest line, not by the slice: 33 MiB of 700-byte lines reads with
    DuckDB's 16 MiB default (a bound of the slice's size gave 33 MiB, a 66 MiB buffer counted against
    the memory limit), and a line spanning many copy chunks is measured whole."""
    line = b'{"custom_id":"k","result":{"type":"succeeded"}}' + b" " * 650 + b"\n"
    src = tmp_path / "results.jsonl"
    src.write_bytes(line * (33 * 2**20 // len(line)))
    with open(src, "rb") as f:
        lines, end, longest = collect_mod._cut_slice(f, 0, tmp_path / "slice", 32 * 2**20)
    assert end > 32 * 2**20 and lines == end // len(line) and longest >= len(line)
    assert collect_mod._object_size(longest) == collect_mod.MAX_RESULT_LINE == 16 * 2**20
    long_line = b'{"custom_id":"k","pad":"' + b"y" * (5 * 2**20 + 123) + b'"}\n'
    src.write_bytes(line * 10 + long_line + line * 10)
    with open(src, "rb") as f:
        lines, end, longest = collect_mod._cut_slice(f, 0, tmp_path / "slice", 2 * len(line))
        assert (lines, end) == (2, 2 * len(line))
        lines, end, longest = collect_mod._cut_slice(f, end, tmp_path / "slice", 32 * 2**20)
    assert lines == 19 and end == src.stat().st_size and longest == len(long_line)


def test_long_answers_get_room_by_default_but_a_limit_the_user_set_is_a_cap(tmp_path):
    """2,000 answers of 60 KB: with BATCH_BRIDGE_MEMORY_LIMIT set by the user to the default's value
    (128MB) DuckDB runs out loading them, the file is kept, only whole committed slices are loaded; the
    default (the load's own limit plus room for a few vectors of rows that wide) loads the rest from the
    same file."""
    assert DEFAULT_MEMORY_LIMIT == "128MB"
    with run_emulator(EmulatorConfig(responder=_longer_answer)) as emu:
        write_project(tmp_path, meta(max_tokens=20000))
        s = settings_for(tmp_path, emu.base_url)
        load_staging(s, "SELECT 'k' || i AS id, 'text number ' || i AS prompt FROM range(2000) t(i)")
        jobs, client = bridge.load_jobs(s), api.build_client(s)
        capped = s.with_(memory_limit=DEFAULT_MEMORY_LIMIT, memory_limit_set=True)
        bridge.submit(capped, jobs, client)  # prompts are short: no room needed to plan them
        bridge.wait(capped, jobs, client, timeout=60)  # ended, not collected
        with pytest.raises(duckdb.Error) as e:
            bridge.collect(capped, jobs, client)
        assert state.is_out_of_memory(e.value), e.value
        with state.connect(s) as con:
            assert con.execute("SELECT local_state, count(*) FROM bb_state.batches GROUP BY ALL").fetchall() == [
                ("downloaded", 1)]
            # The batch loads in slices, each committed with its position: what is in `responses` is exactly
            # the committed slices, and the batch is not folded in (not collected) until its last slice.
            (partial,) = con.execute("SELECT count(*) FROM bb_state.responses").fetchone()
            assert con.execute("SELECT loaded_lines FROM bb_state.batches").fetchone() == (partial,)
            assert partial < 2000
            assert con.execute("SELECT count(*) FROM bb_state.input_outcomes").fetchone() == (0,)
        report = bridge.collect(s, jobs, client)
        client.close()
    assert report.loaded == {"items": 2000 - partial}  # the rest, from the next slice on
    with state.connect(s) as con:
        assert con.execute("SELECT count(*), count(DISTINCT request_custom_id) FROM bb_state.responses").fetchone() == (2000, 2000)
    assert len(current(s, "items")) == 2000
    # Checkpointed with the room: a WAL left behind would be replayed on every open, and checkpointing it
    # later, under the default limit, fails (FATAL at 128MB for 2,000 answers of 100 KB).
    assert not s.state_path.with_name(s.state_path.name + ".wal").exists()


SUMMARY_SCHEMA = {
    "type": "object",
    "properties": {"sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
                   "topics": {"type": "array", "items": {"type": "string"}}, "summary": {"type": "string"}},
    "required": ["sentiment", "topics", "summary"], "additionalProperties": False,
}


def _summary_answer(params, custom_id=None):
    """An answer that fits SUMMARY_SCHEMA with a 1,200-character summary (a line of ~1.6 KB); its usage
    given, so the emulator need not tokenize it."""
    text = json.dumps({"sentiment": "positive", "topics": ["price", "quality"],
                       "summary": (f"{custom_id} " + "a careful summary of the review " * 40)[:1200]})
    return {"content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 20, "output_tokens": 300}}


def test_answers_whose_schema_checks_need_more_than_the_load_limit_load_by_default(tmp_path):
    """An output_schema is checked in DuckDB's JSON functions, which hold copies of the answers they
    parse: 12,000 answers of ~1.6 KB (below the width that gets room) need more than the load's own
    limit for that. By default the slice that ran out runs again with more room and everything loads,
    each answer checked, and the job's next batch starts with that room; with the same limit set by
    the user it stays a cap, and nothing of the slice that ran out is kept."""
    rows = 24_000  # batches of 12,000, 11,999 and 1 answers: the large ones 19 MB, a first slice of 16 MiB
    with run_emulator(EmulatorConfig(responder=_summary_answer)) as emu:
        write_project(tmp_path, meta(output_schema=SUMMARY_SCHEMA, max_tokens=1000, max_requests_per_batch=rows // 2))
        s = settings_for(tmp_path, emu.base_url)
        load_staging(s, f"SELECT 'k' || i AS id, 'review number ' || i AS prompt FROM range({rows}) t(i)")
        jobs, client = bridge.load_jobs(s), api.build_client(s)
        bridge.submit(s, jobs, client)
        bridge.wait(s, jobs, client, timeout=60)
        capped = s.with_(memory_limit=f"{state.LOADING_BASE_BYTES // 2**20}MiB", memory_limit_set=True)
        with pytest.raises(duckdb.Error) as e:
            bridge.collect(capped, jobs, client)
        assert state.is_out_of_memory(e.value), e.value
        with state.connect(s) as con:  # the slice that ran out kept nothing of its batch
            assert con.execute("SELECT count(*) FROM bb_state.responses JOIN bb_state.batches USING (batch_id) "
                               "WHERE local_state = 'downloaded'").fetchone() == (0,)
        steps = Recorder()
        bridge.collect(s, jobs, client, progress=steps)
        client.close()
    with state.connect(s) as con:
        assert con.execute("SELECT count(*), count(DISTINCT request_custom_id) FROM bb_state.responses").fetchone() == (rows, rows)
    grew = [m for m in steps.steps if "a slice of its results needed more than" in m]
    batches = {m.split("batch ")[1].split(":")[0] for m in grew}
    assert grew and len(batches) == 1, grew  # the other large batch started with the room the first grew to
    rows_out = current(s, "items")
    assert len(rows_out) == rows and {r["status"] for r in rows_out} == {"succeeded"}
    assert {r["sentiment"] for r in rows_out} == {"positive"}


def _short_answer(params, custom_id=None):
    """A short answer, its usage given: the emulator need not tokenize the long prompt."""
    return {"content": [{"type": "text", "text": f"{custom_id}: fine"}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 5000, "output_tokens": 3}}


def test_long_prompts_get_room_by_default_but_a_limit_the_user_set_is_a_cap(tmp_path):
    """2,000 prompts of 20 KB: DuckDB's JSON encoding of a vector of them needs several hundred MB. With
    BATCH_BRIDGE_MEMORY_LIMIT set by the user to the default's value the plan runs out of it and nothing
    is journalled or written; by default the plan gets the room and sends every prompt as it is."""
    prompt = """repeat('a "quoted" \\ line' || chr(10) || i, 1200)"""  # ~20 KB, with characters JSON escapes
    with run_emulator(EmulatorConfig(responder=_short_answer)) as emu:
        write_project(tmp_path, meta())
        s = settings_for(tmp_path, emu.base_url)
        load_staging(s, f"SELECT 'k' || i AS id, {prompt} AS prompt FROM range(2000) t(i)")
        jobs, client = bridge.load_jobs(s), api.build_client(s)
        capped = s.with_(memory_limit=DEFAULT_MEMORY_LIMIT, memory_limit_set=True)
        with pytest.raises(duckdb.Error) as e:
            bridge.submit(capped, jobs, client)
        assert state.is_out_of_memory(e.value), e.value
        with state.connect(s) as con:
            assert con.execute("SELECT count(*) FROM bb_state.submissions").fetchone() == (0,)
        assert not list(s.requests_dir.glob("*.jsonl")) if s.requests_dir.exists() else True
        report = bridge.submit(s, jobs, client)
        client.close()
    assert report.plans[0].send_requests == 2000 and len(report.batches) == 1, report
    lines = [json.loads(x) for f in s.requests_dir.glob("*.jsonl") for x in f.read_text().splitlines()]
    sent = {x["custom_id"]: x["params"]["messages"][0]["content"] for x in lines}
    con = duckdb.connect(str(s.warehouse), read_only=True)
    expected = dict(con.execute(f"SELECT 'k' || i, {prompt} FROM range(2000) t(i)").fetchall())
    con.close()
    assert sent == expected and len(expected["k7"]) > 20_000
