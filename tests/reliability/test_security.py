"""Security of inputs: ids and names cannot inject SQL (every statement the engine runs is
checked for the values it was given), payloads are never unpickled, and the CLI's
`resume --input` is validated against the stored schema before anything is written.
"""

from __future__ import annotations

import ast
import collections
import importlib
import json
import os
import pickle
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import waystation as ws

from .support import ROOT, SAFETY, check_all, integrity, journal, query, run_row, spawn, tables

PACKAGE = ROOT / "waystation"
INJECTION = "'; DROP TABLE runs; --"
CHECKS = collections.Counter[str]()


@pytest.fixture(scope="module", autouse=True)
def _report_checks() -> Any:
    yield
    print("\nsecurity inputs tried:", dict(CHECKS))


@ws.stage
async def echo(text: str) -> str:
    return text


gate = ws.gate("answer", schema=str)


@ws.stage
async def after(echo: str, answer: str) -> str:
    return f"{echo}|{answer}"


def echo_pipeline(name: str, version: str = "1") -> ws.Pipeline:
    return ws.Pipeline(name, [echo, gate, after], version=version)


def row_counts(db: Path) -> dict[str, int]:
    return {t: query(db, f"SELECT COUNT(*) FROM {t}")[0][0] for t in ("runs", "transitions")}


# -- SQL in ids and names ------------------------------------------------------------------


SQLISH = [
    INJECTION,
    "x' OR '1'='1",
    'x" OR "1"="1',
    "1; DELETE FROM transitions",
    "a%",
    "_",
    "*",
    "\\",
    "--",
    "/*",
    "\x00",
    "run\n; DROP TABLE transitions",
    "ü'ß",
]


async def test_sql_in_run_ids_is_refused_or_harmless(db: Path) -> None:
    """Run ids carrying SQL: start refuses them (InvalidInput), lookups find nothing
    (RunNotFound); the tables and their rows are intact."""
    p = echo_pipeline("ids")
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        paused = await engine.start(p, {"text": "t"}, timeout=SAFETY)
        before = row_counts(db)
        for bad in SQLISH:
            CHECKS["sql-ish run ids"] += 1
            with pytest.raises(ws.InvalidInput):
                await engine.start(p, {"text": "t"}, run_id=bad)
            for call in (
                engine.get(bad),
                engine.history(bad),
                engine.resume(bad, "x"),
                engine.cancel(bad),
                engine.retry(bad),
                engine.tree(bad),
            ):
                with pytest.raises(ws.RunNotFound):
                    await call
            assert [r.run_id for r in await engine.list(after=bad)] in ([paused.run_id], [])
        assert row_counts(db) == before
        assert (await engine.get(paused.run_id)).status == "paused"
    assert tables(db) >= {"runs", "transitions", "budgets"}
    check_all(db)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    name=st.sampled_from(SQLISH) | st.text(min_size=1, max_size=30).filter(str.isprintable),
    version=st.sampled_from(SQLISH) | st.text(min_size=1, max_size=10),
    key=st.sampled_from(SQLISH) | st.text(min_size=1, max_size=30),
    text=st.sampled_from(SQLISH) | st.text(max_size=30),
)
def test_names_keys_and_values_with_sql_are_stored_harmlessly(
    tmp_path: Path, name: str, version: str, key: str, text: str
) -> None:
    """Pipeline names and versions, idempotency keys, inputs and answers with quotes and SQL
    are either refused with a WaystationError or stored and read back exactly; the tables
    and the other runs are intact."""
    import asyncio

    CHECKS["sql-ish names, versions, keys, values"] += 1
    db = tmp_path / f"names-{CHECKS['sql-ish names, versions, keys, values']}.db"

    async def body() -> None:
        try:
            p = echo_pipeline(name, version)
        except ws.PipelineDefinitionError:
            return
        witness_p = echo_pipeline("witness")
        async with ws.Engine.open(db, pipelines=[p, witness_p]) as engine:
            witness = await engine.start(witness_p, {"text": "w"}, timeout=SAFETY)
            try:
                run = await engine.start(p, {"text": text}, idempotency_key=key, timeout=SAFETY)
            except ws.WaystationError:
                return
            assert (run.pipeline, run.pipeline_version, run.idempotency_key) == (
                name,
                str(version),
                key,
            )
            assert [r.run_id for r in await engine.list(pipeline=name)] == [run.run_id]
            again = await engine.start(p, {"text": "other"}, idempotency_key=key)
            assert again.run_id == run.run_id
            done = await engine.resume(run.run_id, text, timeout=SAFETY)
            assert done.output == f"{text}|{text}"
            assert (await engine.get(witness.run_id)).status == "paused"
        assert tables(db) >= {"runs", "transitions", "budgets"}
        assert row_counts(db)["runs"] == 2

    asyncio.run(body())


class TracingConnection(sqlite3.Connection):
    """Records the SQL text (not the parameters) of every statement it is given."""

    statements: list[str] = []

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
        TracingConnection.statements.append(sql)
        return super().execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
        TracingConnection.statements.append(sql)
        return super().executemany(sql, *args)

    def executescript(self, sql: str) -> sqlite3.Cursor:  # type: ignore[override]
        TracingConnection.statements.append(sql)
        return super().executescript(sql)

    def cursor(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:  # type: ignore[override]
        return super().cursor(TracingCursor)


class TracingCursor(sqlite3.Cursor):
    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
        TracingConnection.statements.append(sql)
        return super().execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
        TracingConnection.statements.append(sql)
        return super().executemany(sql, *args)


@pytest.fixture
def traced_sql(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every connection opened during the test records the SQL text it runs."""
    original = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        kwargs["factory"] = TracingConnection
        return original(*args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect)
    TracingConnection.statements = []
    yield TracingConnection.statements


async def test_no_statement_is_built_from_a_value(db: Path, traced_sql: list[str]) -> None:
    """A marker goes into every value a caller controls (run id, pipeline name and version,
    idempotency key, input, answer, list filters, lookups of unknown runs, retry, cancel):
    no SQL text the engine executes contains it. Every value went in as a parameter."""
    marker = "ZQXmark"
    p = echo_pipeline(f"p'{marker}", version=f"v'{marker}")
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(
            p, {"text": f"t'{marker}"}, run_id=f"{marker}-1", idempotency_key=f"k'{marker}"
        )
        await engine.list(pipeline=f"p'{marker}", after=f"{marker}-0", status="paused")
        await engine.resume(run.run_id, f"a'{marker}", timeout=SAFETY)
        second = await engine.start(p, {"text": marker}, run_id=f"{marker}-2")
        await engine.cancel(second.run_id)
        await engine.retry(second.run_id, timeout=SAFETY)
        for call in (engine.get, engine.history, engine.cancel):
            with pytest.raises(ws.RunNotFound):
                await call(f"{marker}-none")
        await engine.history(run.run_id)
        await engine.replay(run.run_id, from_stage=0, timeout=SAFETY)
        await engine.prune(older_than=3600)
    CHECKS["statements traced"] += len(traced_sql)
    assert len(traced_sql) > 10, "the tracing connection saw no statements"
    built = [s for s in traced_sql if marker in s]
    assert not built, f"SQL built from caller values: {built[:3]}"
    assert integrity(db) == [("ok",)]


def flowing_names(expr: ast.expr) -> set[str]:
    """Names whose value can end up in `expr`'s result (a conditional's test cannot)."""
    if isinstance(expr, ast.IfExp):
        return flowing_names(expr.body) | flowing_names(expr.orelse)
    return {n.id for n in ast.walk(expr) if isinstance(n, ast.Name)}


def test_sql_is_only_formatted_from_internal_names() -> None:
    """Static check of the package: SQL passed to execute*() is a literal, or is formatted
    only from module constants and locals built from them (never from a parameter of the
    function that runs it)."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            params = {a.arg for a in (*fn.args.args, *fn.args.kwonlyargs, *fn.args.posonlyargs)}
            for call in ast.walk(fn):
                if not (
                    isinstance(call, ast.Call)
                    and isinstance(call.func, ast.Attribute)
                    and call.func.attr in ("execute", "executemany", "executescript")
                    and call.args
                ):
                    continue
                sql = call.args[0]
                if not isinstance(sql, ast.JoinedStr):
                    continue
                for part in sql.values:
                    if isinstance(part, ast.FormattedValue):
                        if flowing_names(part.value) & params:
                            offenders.append(
                                f"{path.relative_to(ROOT)}:{call.lineno}: {ast.unparse(part)}"
                            )
    CHECKS["SQL call sites inspected"] += 1
    assert not offenders, offenders


# -- payloads are never unpickled ------------------------------------------------------------


def test_the_package_never_imports_pickle_or_evaluates_payloads() -> None:
    """No pickle, marshal, shelve, dill or eval/exec anywhere in the package: payloads are
    msgspec (JSON) only."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = [a.name for a in node.names]
                if isinstance(node, ast.ImportFrom) and node.module:
                    mods.append(node.module)
                for mod in mods:
                    if mod.split(".")[0] in ("pickle", "cPickle", "marshal", "shelve", "dill"):
                        found.append(f"{path.name}:{node.lineno} imports {mod}")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("eval", "exec")
            ):
                found.append(f"{path.name}:{node.lineno} calls {node.func.id}")
    CHECKS["package files scanned"] += len(list(PACKAGE.rglob("*.py")))
    assert not found, found


class Boom:
    """Unpickling this would create `marker` (it never must)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


async def test_a_tampered_payload_is_never_unpickled(tmp_path: Path) -> None:
    """Pickles planted in the journal and the run row (as blobs and as text) are not
    unpickled by get/history/resume/recovery; reading them gives a WaystationError."""
    db = tmp_path / "runs.db"
    marker = tmp_path / "unpickled"
    p = echo_pipeline("tamper")
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p, {"text": "t"}, timeout=SAFETY)
    blob = pickle.dumps(Boom(str(marker)))
    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE transitions SET payload = ? WHERE run_id = ? AND event = 'succeeded'",
            (blob, run.run_id),
        )
        conn.execute("UPDATE run_inputs SET input = ? WHERE run_id = ?", (blob.hex(), run.run_id))
    conn.close()
    CHECKS["tampered payloads"] += 2
    raw: list[str] = []
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        for name, call in (
            ("get", lambda: engine.get(run.run_id)),
            ("history", lambda: engine.history(run.run_id)),
            ("resume", lambda: engine.resume(run.run_id, "x", timeout=SAFETY)),
            ("list", lambda: engine.list()),
        ):
            try:
                await call()
            except ws.WaystationError:
                pass
            except Exception as exc:
                raw.append(f"{name}: {type(exc).__module__}.{type(exc).__name__}: {exc}")
    assert not marker.exists(), "a payload was unpickled"
    assert not raw, f"a corrupt payload surfaced as a raw exception: {raw}"


# -- the CLI validates --input before writing ------------------------------------------------


APP = """
from typing import Annotated

import msgspec

import waystation as ws


class Payment(msgspec.Struct, forbid_unknown_fields=True):
    amount: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
    currency: Annotated[str, msgspec.Meta(min_length=3, max_length=3)]
    by: Annotated[str, msgspec.Meta(min_length=1)]


payment = ws.gate("payment", schema=Payment, reason="how much was paid?")


@ws.stage
async def book(n: int, payment: Payment) -> str:
    return f"{n}: {payment.amount} {payment.currency} by {payment.by}"


pipelines = [ws.Pipeline("cli-payment", [payment, book])]
"""
"""A service's app module, written to a temporary directory: the CLI can import it only
when run from there."""


def load_app(directory: Path) -> list[ws.Pipeline]:
    """Write APP under a fresh module name into `directory` and import it."""
    name = f"cliapp_{directory.name.replace('-', '_')}_{os.getpid()}"
    (directory / f"{name}.py").write_text(APP)
    sys.path.insert(0, str(directory))
    try:
        module = importlib.import_module(name)
    finally:
        sys.path.remove(str(directory))
    found: list[ws.Pipeline] = module.pipelines
    return found


async def paused_payment(db: Path, app: list[ws.Pipeline]) -> str:
    async with ws.Engine.open(db, pipelines=app) as engine:
        run = await engine.start(app[0], {"n": 7}, run_id="pay-1", timeout=SAFETY)
    assert run.status == "paused" and run.pause is not None
    schema = run.pause.schema
    assert schema["$defs"]["Payment"]["properties"]["amount"]["minimum"] == 0
    return run.run_id


def cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


BAD_INPUTS = {
    "not JSON": "{amount: 5",
    "wrong type": json.dumps({"amount": "five", "currency": "EUR", "by": "ann"}),
    "missing field": json.dumps({"amount": 5, "currency": "EUR"}),
    "unknown field": json.dumps({"amount": 5, "currency": "EUR", "by": "ann", "x": 1}),
    "below minimum": json.dumps({"amount": -5, "currency": "EUR", "by": "ann"}),
    "above maximum": json.dumps({"amount": 10**7, "currency": "EUR", "by": "ann"}),
    "too long": json.dumps({"amount": 5, "currency": "EURO", "by": "ann"}),
    "too short": json.dumps({"amount": 5, "currency": "EUR", "by": ""}),
    "huge int": json.dumps({"amount": 10**30, "currency": "EUR", "by": "ann"}),
    "SQL": json.dumps({"amount": 5, "currency": "EUR", "by": INJECTION})[:-1],
}


@pytest.mark.parametrize("importable", [True, False], ids=["types-importable", "schema-only"])
async def test_cli_resume_input_is_validated_before_anything_is_written(
    tmp_path: Path, importable: bool
) -> None:
    """`waystation --db DB resume RUN --input JSON` (no --app) with answers that break the
    stored JSON Schema (type, required, additionalProperties, minimum/maximum, lengths):
    exit status 2, and the run row and journal are exactly as before. With the answer's type
    importable the CLI decodes with it; without (another machine, a tool's venv) it has only
    the stored schema, and must still refuse what the schema refuses."""
    db = tmp_path / "runs.db"
    app_dir, elsewhere = tmp_path / "app", tmp_path / "elsewhere"
    app_dir.mkdir()
    elsewhere.mkdir()
    app = load_app(app_dir)
    run_id = await paused_payment(db, app)
    before_rows, before_row = journal(db, run_id), run_row(db, run_id)
    cwd = app_dir if importable else elsewhere
    accepted = []
    for label, text in BAD_INPUTS.items():
        CHECKS["CLI resume inputs"] += 1
        cli = await spawn(
            "-m", "waystation", "--db", str(db), "resume", run_id, "--input", text,
            cwd=cwd, env=cli_env(),
        )  # fmt: skip
        code, out, err = await cli.finish()
        if code != 2:
            accepted.append(f"{label}: exit {code} {out.strip()} {err.strip()}"[:200])
            break  # the run is no longer paused: later checks would say nothing
        assert "error" in err.lower()
        assert journal(db, run_id) == before_rows, label
        assert run_row(db, run_id) == before_row, label
    assert not accepted, f"invalid --input accepted and written: {accepted}"
    # A valid answer is recorded (the run waits for a worker) and a worker finishes it.
    good = json.dumps({"amount": 5, "currency": "EUR", "by": "ann"})
    cli = await spawn(
        "-m", "waystation", "--db", str(db), "resume", run_id, "--input", good,
        cwd=cwd, env=cli_env(),
    )  # fmt: skip
    code, out, err = await cli.finish()
    assert code == 0, err
    assert run_row(db, run_id)["status"] in ("pending", "running")  # type: ignore[index]
    async with ws.Engine.open(db, pipelines=app) as engine:
        done = await engine.wait(run_id, timeout=SAFETY)
    assert done.status == "succeeded" and done.output == "7: 5 EUR by ann"
    check_all(db)
