"""Bad input gets a clear error and loses nothing: each case of issue 2, one test each."""

from __future__ import annotations

import asyncio
import inspect
import sqlite3
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

import waystation as ws

SAFETY = 30  # seconds; a safety net against hangs, never a timing assertion


class Expense(msgspec.Struct):
    employee: str
    amount: float


class Decision(msgspec.Struct):
    approved: bool
    by: str


# Two versions of one type, as a deploy would change it: same module and name, a new field.
ClaimV1 = msgspec.defstruct("Claim", [("employee", str), ("amount", float)], module=__name__)
ClaimV2 = msgspec.defstruct(
    "Claim", [("employee", str), ("amount", float), ("currency", str)], module=__name__
)


def expense_pipeline(calls: Counter[str], *, pay_returns_int: bool = False) -> ws.Pipeline:
    @ws.stage
    async def check(expense: Expense) -> float:
        calls["check"] += 1
        return expense.amount

    approval = ws.gate("approval", schema=Decision, reason="approve?")

    @ws.stage
    async def pay(expense: Expense, check: float, approval: Decision) -> str:
        calls["pay"] += 1
        return f"paid {check} to {expense.employee}" if approval.approved else "rejected"

    @ws.stage(name="pay")
    async def pay_changed(expense: Expense, check: float, approval: Decision) -> int:
        calls["pay"] += 1
        return 1

    last = pay_changed if pay_returns_int else pay
    return ws.Pipeline("expenses", [check, approval, last], version="1")


def snapshot(db: Path, run_id: str) -> tuple[dict[str, Any], list[tuple[Any, ...]]]:
    """The run row (with its input) and its journal, exactly as stored."""
    with closing(sqlite3.connect(db)) as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        assert row is not None
        stored = conn.execute("SELECT input FROM run_inputs WHERE run_id = ?", (run_id,))
        rows = conn.execute(
            "SELECT * FROM transitions WHERE run_id = ? ORDER BY seq", (run_id,)
        ).fetchall()
        return {**dict(row), "input": stored.fetchall()}, [tuple(r) for r in rows]


def write_file(path: Path, text: str) -> None:
    path.write_text(text)


def read_file(path: Path) -> str:
    return path.read_text()


def table_counts(db: Path) -> tuple[int, int]:
    with closing(sqlite3.connect(db)) as conn:
        runs = conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        transitions = conn.execute("SELECT COUNT(*) FROM journal").fetchone()[0]
        return int(runs), int(transitions)


# -- resume -----------------------------------------------------------------------------------


async def test_resume_unknown_run(db: Path) -> None:
    p = expense_pipeline(Counter())
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        with pytest.raises(ws.RunNotFound) as err:
            await engine.resume("no-such-run", {"approved": True, "by": "ann"})
        assert "no-such-run" in str(err.value)
        assert isinstance(err.value, ws.WaystationError)
        with pytest.raises(ws.RunNotFound):
            await engine.get("no-such-run")
        with pytest.raises(ws.RunNotFound):
            await engine.history("no-such-run")
        with pytest.raises(ws.RunNotFound):
            await engine.wait("no-such-run", timeout=SAFETY)
    assert table_counts(db) == (0, 0)


async def test_resume_a_finished_run(db: Path) -> None:
    calls: Counter[str] = Counter()
    p = expense_pipeline(calls)
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p, {"expense": Expense("ann", 1.0)})
        run = await engine.resume(run.run_id, {"approved": True, "by": "bob"})
        assert run.status == "succeeded"
        before = snapshot(db, run.run_id)
        with pytest.raises(ws.NotPaused) as err:
            await engine.resume(run.run_id, {"approved": True, "by": "bob"})
        assert run.run_id in str(err.value)
        assert isinstance(err.value, ws.WaystationError)
    assert snapshot(db, run.run_id) == before
    assert calls == {"check": 1, "pay": 1}


async def test_resume_a_running_run(db: Path) -> None:
    entered = anyio.Event()
    release = anyio.Event()

    @ws.stage
    async def busy() -> int:
        entered.set()
        await release.wait()
        return 1

    p = ws.Pipeline("busy", [busy])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.submit(p)
        with anyio.fail_after(SAFETY):
            await entered.wait()
        before = snapshot(db, run.run_id)
        with pytest.raises(ws.NotPaused):
            await engine.resume(run.run_id, 1)
        assert snapshot(db, run.run_id) == before
        release.set()
        done = await engine.wait(run.run_id, timeout=SAFETY)
    assert done.status == "succeeded"


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"approved": "yes", "by": "bob"}, "approved"),
        ({"approved": True}, "by"),
        ({"approved": True, "by": 7}, "by"),
    ],
    ids=["wrong-type", "missing", "wrong-type-2"],
)
async def test_resume_input_failing_the_schema(db: Path, value: Any, field: str) -> None:
    calls: Counter[str] = Counter()
    p = expense_pipeline(calls)
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p, {"expense": Expense("ann", 5.0)})
        assert run.status == "paused"
        history = await engine.history(run.run_id)
        before = snapshot(db, run.run_id)

        with pytest.raises(ws.InvalidResumeInput) as err:
            await engine.resume(run.run_id, value)
        assert field in str(err.value)
        assert isinstance(err.value, ws.WaystationError)

        still = await engine.get(run.run_id)
        assert still.status == "paused"
        assert still.pause == run.pause
        assert len(await engine.history(run.run_id)) == len(history)
        assert snapshot(db, run.run_id) == before
        assert calls == {"check": 1}

        done = await engine.resume(run.run_id, {"approved": True, "by": "bob"})
    assert done.status == "succeeded"
    assert done.output == "paid 5.0 to ann"
    assert calls == {"check": 1, "pay": 1}


async def test_resume_input_that_cannot_be_serialized(db: Path) -> None:
    p = expense_pipeline(Counter())
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p, {"expense": Expense("ann", 5.0)})
        before = snapshot(db, run.run_id)
        with pytest.raises(ws.InvalidResumeInput):
            await engine.resume(run.run_id, {"approved": True, "by": object()})
        assert snapshot(db, run.run_id) == before
        done = await engine.resume(run.run_id, {"approved": False, "by": "bob"})
    assert done.output == "rejected"


async def test_resume_with_a_stale_pause_id(db: Path) -> None:
    @ws.stage
    async def twice(ctx: ws.StageContext) -> str:
        a = await ctx.pause("a", schema=str)
        b = await ctx.pause("b", schema=str)
        return a + b

    p = ws.Pipeline("twice", [twice])
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p)
        assert run.pause is not None
        first_id = run.pause.pause_id
        run = await engine.resume(run.run_id, "x", pause_id=first_id)
        assert run.pause is not None and run.pause.kind == "b"
        before = snapshot(db, run.run_id)
        with pytest.raises(ws.NotPaused):
            await engine.resume(run.run_id, "y", pause_id=first_id)
        assert snapshot(db, run.run_id) == before
        done = await engine.resume(run.run_id, "y", pause_id=run.pause.pause_id)
    assert done.output == "xy"


async def test_two_concurrent_resumes_of_one_pause(db: Path) -> None:
    calls: Counter[str] = Counter()
    p = expense_pipeline(calls)
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p, {"expense": Expense("ann", 5.0)})
        results = await asyncio.gather(
            engine.resume(run.run_id, {"approved": True, "by": "bob"}, timeout=SAFETY),
            engine.resume(run.run_id, {"approved": False, "by": "eve"}, timeout=SAFETY),
            return_exceptions=True,
        )
        final = await engine.get(run.run_id)
        history = await engine.history(run.run_id)
    wins = [r for r in results if isinstance(r, ws.Run)]
    losses = [r for r in results if isinstance(r, BaseException)]
    assert len(wins) == 1, results
    assert len(losses) == 1, results
    assert isinstance(losses[0], ws.NotPaused)
    assert wins[0].status == "succeeded"
    assert final.output == wins[0].output
    assert calls == {"check": 1, "pay": 1}
    assert [t.event for t in history].count("resumed") == 1
    gate_results = [t for t in history if t.event == "succeeded" and t.stage_index == 1]
    assert len(gate_results) == 1


async def test_many_concurrent_resumes_of_one_pause(db: Path) -> None:
    calls: Counter[str] = Counter()
    p = expense_pipeline(calls)
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p, {"expense": Expense("ann", 5.0)})
        results = await asyncio.gather(
            *(
                engine.resume(run.run_id, {"approved": True, "by": f"r{i}"}, timeout=SAFETY)
                for i in range(8)
            ),
            return_exceptions=True,
        )
        history = await engine.history(run.run_id)
    assert sum(isinstance(r, ws.Run) for r in results) == 1
    assert all(isinstance(r, ws.Run | ws.NotPaused) for r in results)
    assert calls == {"check": 1, "pay": 1}
    assert [t.event for t in history].count("resumed") == 1


# -- start ------------------------------------------------------------------------------------


async def test_start_of_a_pipeline_not_registered(db: Path) -> None:
    registered = expense_pipeline(Counter())

    @ws.stage
    async def hello(name: str) -> str:
        return f"hello {name}"

    stranger = ws.Pipeline("stranger", [hello])
    changed = expense_pipeline(Counter(), pay_returns_int=True)  # same name and version
    async with ws.Engine.open(db, pipelines=[registered]) as engine:
        with pytest.raises(ws.PipelineNotRegistered) as err:
            await engine.start(stranger, {"name": "ann"})
        assert "stranger" in str(err.value)
        assert isinstance(err.value, ws.WaystationError)
        with pytest.raises(ws.PipelineNotRegistered):
            await engine.start("stranger", {"name": "ann"})
        with pytest.raises(ws.PipelineNotRegistered):
            await engine.submit(stranger, {"name": "ann"})
        with pytest.raises(ws.PipelineNotRegistered):
            await engine.start(changed, {"expense": Expense("ann", 1.0)})
        assert await engine.list() == []
    assert table_counts(db) == (0, 0)


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"expense": {"employee": "ann", "amount": "lots"}}, "amount"),
        ({"expense": {"amount": 1.0}}, "employee"),
        ({}, "expense"),
        (None, "expense"),
        ({"expense": "ann"}, "expense"),
        (["ann", 1.0], "expense"),
        ({"expense": {"employee": object(), "amount": 1.0}}, ""),
    ],
    ids=["wrong-type", "missing-nested", "missing", "none", "not-a-struct", "list", "object"],
)
async def test_invalid_start_input(db: Path, value: Any, field: str) -> None:
    calls: Counter[str] = Counter()
    p = expense_pipeline(calls)
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        with pytest.raises(ws.InvalidInput) as err:
            await engine.start(p, value)
        assert field in str(err.value)
        assert isinstance(err.value, ws.WaystationError)
        with pytest.raises(ws.InvalidInput):
            await engine.submit(p, value)
        assert await engine.list() == []
    assert calls == {}
    assert table_counts(db) == (0, 0)


async def test_invalid_idempotency_key_writes_nothing(db: Path) -> None:
    p = expense_pipeline(Counter())
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        with pytest.raises(ws.InvalidInput):
            await engine.start(p, {"expense": Expense("a", 1.0)}, idempotency_key="")
        with pytest.raises(ws.InvalidInput):
            await engine.start(p, {"expense": Expense("a", 1.0)}, run_id="bad id with spaces")
        assert await engine.list() == []
    assert table_counts(db) == (0, 0)


async def test_engine_not_open(db: Path) -> None:
    p = expense_pipeline(Counter())
    engine = ws.Engine.open(db, pipelines=[p])
    with pytest.raises(ws.WaystationError, match="not open"):
        await engine.start(p, {"expense": Expense("a", 1.0)})


# -- database files ---------------------------------------------------------------------------


async def test_a_text_file_is_not_a_waystation_database(db: Path) -> None:
    text = "these are my notes\n" * 200
    write_file(db, text)
    with pytest.raises(ws.NotAWaystationDatabase) as err:
        async with ws.Engine.open(db, pipelines=[]):
            pass
    assert str(db) in str(err.value)
    assert isinstance(err.value, ws.StoreError)
    assert isinstance(err.value, ws.WaystationError)
    assert read_file(db) == text


async def test_a_sqlite_file_with_other_tables_is_not_a_waystation_database(db: Path) -> None:
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO customers (name) VALUES ('ann'), ('bob')")
        conn.commit()
    with pytest.raises(ws.NotAWaystationDatabase) as err:
        async with ws.Engine.open(db, pipelines=[]):
            pass
    assert "customers" in str(err.value)
    assert isinstance(err.value, ws.WaystationError)
    with closing(sqlite3.connect(db)) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        names = [r[0] for r in conn.execute("SELECT name FROM customers ORDER BY id")]
    assert tables == {"customers"}
    assert names == ["ann", "bob"]


async def test_refusing_a_foreign_sqlite_file_leaves_it_untouched(db: Path) -> None:
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        conn.commit()
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "delete"
    with pytest.raises(ws.NotAWaystationDatabase):
        async with ws.Engine.open(db, pipelines=[]):
            pass
    with closing(sqlite3.connect(db)) as conn:
        # a refused file is not converted to WAL (another application owns it)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


async def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ws.StoreError):
        async with ws.Engine.open(tmp_path, pipelines=[]):
            pass


async def test_a_database_with_a_newer_schema(db: Path) -> None:
    p = expense_pipeline(Counter())
    async with ws.Engine.open(db, pipelines=[p]) as engine:
        run = await engine.start(p, {"expense": Expense("ann", 1.0)})
    with closing(sqlite3.connect(db)) as conn:
        conn.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) "
            "VALUES (9999, 'from_the_future', datetime('now'))"
        )
        conn.commit()
    before = snapshot(db, run.run_id)
    with pytest.raises(ws.SchemaTooNew) as err:
        async with ws.Engine.open(db, pipelines=[p]):
            pass
    assert "9999" in str(err.value)
    assert "upgrade" in str(err.value)
    assert isinstance(err.value, ws.StoreError)
    assert isinstance(err.value, ws.WaystationError)
    assert snapshot(db, run.run_id) == before


# -- pipelines that changed -------------------------------------------------------------------


async def test_resume_under_a_changed_pipeline(db: Path) -> None:
    calls: Counter[str] = Counter()
    original = expense_pipeline(calls)
    async with ws.Engine.open(db, pipelines=[original]) as engine:
        run = await engine.start(original, {"expense": Expense("ann", 5.0)})
        assert run.status == "paused"
    before = snapshot(db, run.run_id)

    changed = expense_pipeline(calls, pay_returns_int=True)
    assert changed.fingerprint != original.fingerprint
    async with ws.Engine.open(db, pipelines=[changed]) as engine:
        with pytest.raises(ws.PipelineChanged) as err:
            await engine.resume(run.run_id, {"approved": True, "by": "bob"})
        assert "expenses" in str(err.value)
        assert isinstance(err.value, ws.WaystationError)
        still = await engine.get(run.run_id)
        assert still.status == "paused"
        assert still.pause == run.pause
    assert snapshot(db, run.run_id) == before
    assert calls == {"check": 1}

    # the unchanged definition can still resume it
    async with ws.Engine.open(db, pipelines=[expense_pipeline(calls)]) as engine:
        done = await engine.resume(run.run_id, {"approved": True, "by": "bob"})
    assert done.status == "succeeded"
    assert calls == {"check": 1, "pay": 1}


def claim_pipeline(claim_type: Any) -> ws.Pipeline:
    async def check(claim: Any) -> float:
        return float(claim.amount)

    check.__annotations__ = {"claim": claim_type, "return": float}

    @ws.stage
    async def pay(check: float, approval: Decision) -> str:
        return f"paid {check}"

    approval = ws.gate("approval", schema=Decision)
    return ws.Pipeline("claims", [ws.stage(check), approval, pay], version="1")


async def test_resume_after_the_input_type_changed_shape(db: Path) -> None:
    # The deploy added a required field to the input type without a new pipeline version.
    # The paused run's stored input no longer decodes: resuming must refuse (PipelineChanged)
    # before it writes anything, not commit the answer and then strand the run.
    v1 = claim_pipeline(ClaimV1)
    async with ws.Engine.open(db, pipelines=[v1]) as engine:
        run = await engine.start(v1, {"claim": {"employee": "ann", "amount": 5.0}})
        assert run.status == "paused"
    before = snapshot(db, run.run_id)

    v2 = claim_pipeline(ClaimV2)
    async with ws.Engine.open(db, pipelines=[v2]) as engine:
        with pytest.raises(ws.WaystationError) as err:
            await engine.resume(run.run_id, {"approved": True, "by": "bob"}, timeout=SAFETY)
        still = await engine.get(run.run_id)
    assert still.status == "paused", f"resume raised {err.value!r} and left the run {still.status}"
    assert snapshot(db, run.run_id) == before
    assert isinstance(err.value, ws.PipelineChanged), repr(err.value)


async def test_resume_when_only_another_version_is_registered(db: Path) -> None:
    calls: Counter[str] = Counter()
    v1 = expense_pipeline(calls)
    async with ws.Engine.open(db, pipelines=[v1]) as engine:
        run = await engine.start(v1, {"expense": Expense("ann", 5.0)})
    before = snapshot(db, run.run_id)
    v2 = ws.Pipeline("expenses", list(v1.stages), version="2")
    async with ws.Engine.open(db, pipelines=[v2]) as engine:
        with pytest.raises(ws.PipelineChanged) as err:
            await engine.resume(run.run_id, {"approved": True, "by": "bob"})
        assert "1" in str(err.value)
        assert (await engine.get(run.run_id)).status == "paused"
    assert snapshot(db, run.run_id) == before


async def test_two_pipelines_with_one_name_and_version_cannot_be_registered(db: Path) -> None:
    a = expense_pipeline(Counter())
    b = expense_pipeline(Counter(), pay_returns_int=True)
    with pytest.raises(ws.PipelineDefinitionError):
        async with ws.Engine.open(db, pipelines=[a, b]):
            pass


# -- the hierarchy ----------------------------------------------------------------------------


def test_every_error_is_a_waystation_error() -> None:
    errors = [
        obj
        for name in ws.__all__
        if inspect.isclass(obj := getattr(ws, name)) and issubclass(obj, BaseException)
    ]
    assert len(errors) >= 15
    for error in errors:
        assert issubclass(error, ws.WaystationError), error
    for name in (
        "RunNotFound",
        "NotPaused",
        "InvalidResumeInput",
        "PipelineNotRegistered",
        "InvalidInput",
        "NotAWaystationDatabase",
        "SchemaTooNew",
        "PipelineChanged",
        "PipelineDefinitionError",
        "StageOutputError",
        "StageTimeout",
    ):
        assert issubclass(getattr(ws, name), ws.WaystationError)
