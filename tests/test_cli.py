"""The command line, driven as a person would: `python -m waystation ...` in a new process,
against a real SQLite file. Runs are set up (and checked) in-process with the engine."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import pytest

import waystation as ws
from tests.processes import wait_until
from waystation import migrations
from waystation.cli import _age, timeline

ROOT = Path(__file__).resolve().parent.parent
APP_MODULE = "ws_cli_test_app"
APP = """
import asyncio
import os

import msgspec

import waystation as ws


class Decision(msgspec.Struct):
    approved: bool
    by: str


@ws.stage
async def check(amount: float) -> float:
    if amount < 0:
        raise ValueError("a negative amount")
    return round(amount * 1.2, 2)


approval = ws.gate("approval", schema=Decision, reason="approve this expense?")


@ws.stage
def pay(check: float, approval: Decision) -> str:
    if approval.by == "nobody":
        raise ValueError("nobody may approve")
    return f"paid {check} (approved by {approval.by})" if approval.approved else "rejected"


expenses = ws.Pipeline("expenses", [check, approval, pay])


@ws.stage
async def forever(n: int) -> int:
    await asyncio.sleep(3600)
    return n


slow = ws.Pipeline("slow", [forever])


def _count(name: str) -> None:
    path = os.environ.get("WS_CLI_COUNTS")
    if path:
        with open(path, "a") as f:
            f.write(name + "\\n")


@ws.stage
async def fetch(n: int) -> int:
    _count("fetch")
    return n * 10


@ws.stage
def publish(fetch: int) -> str:
    _count("publish")
    if os.environ.get("WS_CLI_BROKEN"):
        raise RuntimeError("publish is broken")
    return f"published {fetch}"


report = ws.Pipeline("report", [fetch, publish])


@ws.stage
async def hold(n: int) -> int:
    path = os.environ.get("WS_CLI_HOLD")
    while path and not os.path.exists(path):
        await asyncio.sleep(0.02)
    return n


@ws.stage
async def after(hold: int) -> int:
    _count("after")
    return hold + 1


held = ws.Pipeline("held", [hold, after])


@ws.stage
async def archive(expenses: str) -> str:
    return f"archived: {expenses}"


audit = ws.Pipeline("audit", [expenses, archive])  # expenses runs as a child run

pipelines = [expenses, slow, report, held, audit]


@ws.stage
async def misread(fetch: Decision) -> str:  # fetch returns an int: a plan catches it
    return "never"


broken = ws.Pipeline("broken", [fetch, misread])


@ws.stage
async def score(amount: float) -> float:
    return amount * 2


review = ws.parallel(score, ws.gate("legal", schema=Decision, reason="legal ok?"), name="review")


@ws.stage
def settle(score: float, legal: Decision) -> str:
    return f"{score} (legal: {legal.by})"


reviewed = ws.Pipeline("reviewed", [check, review, settle])
"""


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("app")
    (path / f"{APP_MODULE}.py").write_text(APP)
    return path


@pytest.fixture(scope="module")
def app(app_dir: Path) -> Iterator[ModuleType]:
    """The app module, imported here under the name the CLI imports it by (`--app`)."""
    sys.path.insert(0, str(app_dir))
    try:
        yield importlib.import_module(APP_MODULE)
    finally:
        sys.path.remove(str(app_dir))
        sys.modules.pop(APP_MODULE, None)


class Cli:
    def __init__(self, db: Path, app_dir: Path) -> None:
        self.db = db
        self.app_dir = app_dir

    def _command(
        self, args: tuple[str, ...], db: Path | None, env: dict[str, str] | None
    ) -> tuple[list[str], dict[str, str]]:
        environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(self.app_dir), str(ROOT)])}
        environ.pop("WAYSTATION_DB", None)
        environ.update(env or {})
        command = [sys.executable, "-m", "waystation"]
        if "WAYSTATION_DB" not in environ:
            command += ["--db", str(db or self.db)]
        return [*command, *args], environ

    def __call__(
        self, *args: str, db: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        command, environ = self._command(args, db, env)
        return subprocess.run(
            command,
            cwd=self.db.parent,
            env=environ,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def spawn(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """The command in the background (read its output with `communicate`)."""
        command, environ = self._command(args, None, env)
        return subprocess.Popen(
            command,
            cwd=self.db.parent,
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


@pytest.fixture
def cli(db: Path, app_dir: Path) -> Cli:
    return Cli(db, app_dir)


def start(db: Path, app: ModuleType, amount: float = 10.0) -> ws.Run:
    async def go() -> ws.Run:
        async with ws.Engine.open(db, pipelines=app.pipelines) as engine:
            return await engine.start(app.expenses, {"amount": amount})

    return asyncio.run(go())


def look(db: Path, run_id: str) -> tuple[ws.Run, list[ws.Transition]]:
    async def go() -> tuple[ws.Run, list[ws.Transition]]:
        async with ws.Engine.open(db, recover=False) as engine:
            return await engine.get(run_id), await engine.history(run_id)

    return asyncio.run(go())


def run_id_of(out: subprocess.CompletedProcess[str]) -> str:
    """The run id from the first line a command printed: `run ID ...`."""
    first = out.stdout.split("\n", 1)[0].split()
    assert first[:1] == ["run"], (out.stdout, out.stderr)
    return first[1]


def table_rows(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(db)
    try:
        return {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("runs", "transitions")
        }
    finally:
        conn.close()


def test_runs_show_and_history_of_a_paused_run(cli: Cli, db: Path, app: ModuleType) -> None:
    first = start(db, app, 1.0)
    run = start(db, app, 10.0)
    assert run.status == "paused"

    out = cli("runs")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = ["RUN", "ID", "PIPELINE", "VERSION", "STATUS", "STAGE", "PAUSE", "UPDATED"]
    assert lines[0].split() == header
    assert [line.split()[0] for line in lines[1:]] == [first.run_id, run.run_id]
    assert lines[2].split()[1:6] == ["expenses", "1", "paused", "approval", "approval"]
    newest = cli("runs", "--status", "paused", "--pipeline", "expenses", "--limit", "1")
    assert [line.split()[0] for line in newest.stdout.splitlines()[1:]] == [run.run_id]
    assert cli("runs", "--status", "failed").stdout.strip() == "no runs match"
    listed = json.loads(cli("runs", "--json").stdout)
    assert [r["run_id"] for r in listed] == [first.run_id, run.run_id]
    assert listed[1]["pause"]["kind"] == "approval"

    out = cli("show", run.run_id)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "status     paused" in text
    assert 'input      {"amount":10.0}' in text
    assert "approval at stage 'approval' (#1)" in text
    assert "approve this expense?" in text
    assert '"approved"' in text and '"boolean"' in text  # the JSON schema of the answer
    timeline_rows = text.split("timeline\n", 1)[1].splitlines()
    assert timeline_rows[1].split()[:2] == ["0", "check"]
    assert timeline_rows[1].split()[-1] == "succeeded"
    assert timeline_rows[2].split()[:2] == ["1", "approval"]
    assert "paused: waiting for approval" in timeline_rows[2]
    shown = json.loads(cli("show", run.run_id, "--json").stdout)
    assert shown["run"]["status"] == "paused"
    assert shown["run"]["pause"]["schema_ref"] == f"{APP_MODULE}:Decision"
    assert [(s["stage"], s["outcome"]) for s in shown["timeline"]] == [
        ("check", "succeeded"),
        ("approval", "paused"),
    ]

    out = cli("history", run.run_id)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[2:]]
    assert [(r[0], r[2]) for r in rows] == [
        ("1", "created"),
        ("2", "started"),
        ("3", "succeeded"),
        ("4", "started"),
        ("5", "paused"),
    ]
    assert out.stdout.splitlines()[-1].endswith("approval: approve this expense?")
    journal = json.loads(cli("history", run.run_id, "--json").stdout)
    assert [t["event"] for t in journal] == ["created", "started", "succeeded", "started", "paused"]
    assert journal[2]["payload"] == 12.0


def test_resume_with_app_continues_the_run_in_that_process(
    cli: Cli, db: Path, app: ModuleType
) -> None:
    run = start(db, app)
    answer = json.dumps({"approved": True, "by": "bob"})
    out = cli("resume", run.run_id, "--input", answer, "--app", f"{APP_MODULE}:pipelines")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"run {run.run_id} succeeded",
        'output: "paid 12.0 (approved by bob)"',
    ]
    after, history = look(db, run.run_id)
    assert after.status == "succeeded" and after.output == "paid 12.0 (approved by bob)"
    assert "recovered" not in [t.event for t in history]
    assert cli("runs", "--status", "succeeded").stdout.count(run.run_id) == 1

    shown = cli("show", run.run_id).stdout
    assert "waited" in shown and "for approval" in shown
    assert shown.rstrip().splitlines()[-1].strip().startswith("succeeded in ")
    again = cli("resume", run.run_id, "--input", answer, "--app", f"{APP_MODULE}:expenses")
    assert again.returncode == 1
    assert again.stderr.startswith(f"error: run {run.run_id} is succeeded, not paused")


def test_resume_with_app_exits_with_the_status_the_run_settled_in(
    cli: Cli, db: Path, app: ModuleType
) -> None:
    """As `start --wait`: 1 when the run failed after the answer (a script must not carry
    on). Before, resume exited 0 whatever became of the run."""
    answer = json.dumps({"approved": True, "by": "nobody"})
    app_spec = f"{APP_MODULE}:pipelines"
    run = start(db, app)
    out = cli("resume", run.run_id, "--input", answer, "--app", app_spec)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "failed at stage 'pay'" in out.stdout
    run = start(db, app)
    out = cli("resume", run.run_id, "--input", answer, "--app", app_spec, "--json")
    assert out.returncode == 1, out.stdout + out.stderr
    assert json.loads(out.stdout)["status"] == "failed"


def test_resume_reads_the_answer_from_stdin_and_prints_json(
    cli: Cli, db: Path, app: ModuleType, tmp_path: Path
) -> None:
    run = start(db, app)
    answer = tmp_path / "answer.json"
    answer.write_text('{"approved": false, "by": "eve"}')
    out = cli("resume", run.run_id, "--input", f"@{answer}", "--app", f"{APP_MODULE}:pipelines")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f'run {run.run_id} succeeded\noutput: "rejected"'
    second = start(db, app)
    out = cli(
        "resume", second.run_id, "--input", "@missing.json", "--app", f"{APP_MODULE}:pipelines"
    )
    assert out.returncode == 2 and "cannot read the file" in out.stderr


def test_resume_without_app_leaves_the_run_to_a_worker(cli: Cli, db: Path, app: ModuleType) -> None:
    run = start(db, app)
    out = cli("resume", run.run_id, "--input", '{"approved": true, "by": "bob"}', "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["status"] == "pending"

    async def work() -> ws.Run:
        async with ws.Engine.open(db, pipelines=app.pipelines) as engine:
            return await engine.wait(run.run_id, timeout=10)

    assert asyncio.run(work()).output == "paid 12.0 (approved by bob)"


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ('{"approved": tru', "--input is not valid JSON"),
        ("", "--input is not valid JSON"),
        ('{"approved": "yes", "by": "bob"}', "does not match its schema"),
        ('{"approved": true}', "missing required field `by`"),
    ],
)
def test_resume_with_a_bad_answer_exits_2_and_changes_nothing(
    cli: Cli, db: Path, app: ModuleType, answer: str, message: str
) -> None:
    run = start(db, app)
    _, before = look(db, run.run_id)
    out = cli("resume", run.run_id, "--input", answer, "--app", f"{APP_MODULE}:pipelines")
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and message in out.stderr
    assert out.stdout == ""
    after, history = look(db, run.run_id)
    assert after.status == "paused" and after.pause == run.pause
    assert history == before


@pytest.mark.parametrize(
    ("app_spec", "message"),
    [
        ("no_such_module:pipelines", "no module named 'no_such_module'"),
        (f"{APP_MODULE}:nothing", "has no attribute 'nothing'"),
        (f"{APP_MODULE}:check", "not a Pipeline or a list of Pipelines"),
        (APP_MODULE, "expected MODULE:ATTR"),
        (f"{APP_MODULE}:slow", "has no pipeline 'expenses' version '1'"),
    ],
)
def test_resume_with_a_bad_app_exits_2_and_changes_nothing(
    cli: Cli, db: Path, app: ModuleType, app_spec: str, message: str
) -> None:
    run = start(db, app)
    out = cli("resume", run.run_id, "--input", '{"approved": true, "by": "x"}', "--app", app_spec)
    assert out.returncode == 2
    assert message in out.stderr
    assert look(db, run.run_id)[0].status == "paused"


def test_resume_drives_only_its_own_run(cli: Cli, db: Path, app: ModuleType) -> None:
    """Runs left by a stopped engine are a worker's to take over, not the CLI's."""

    async def strand() -> str:
        async with ws.Engine.open(db, pipelines=app.pipelines) as engine:
            run = await engine.submit(app.slow, {"n": 1})
            await asyncio.sleep(0.05)
            return run.run_id  # closing the engine interrupts `forever`: the run is unowned

    run = start(db, app)  # (an engine that is a worker: start it before stranding a run)
    stranded = asyncio.run(strand())
    for command in (["runs"], ["show", stranded], ["history", stranded]):
        assert cli(*command).returncode == 0
    out = cli(
        "resume",
        run.run_id,
        "--input",
        '{"approved": true, "by": "bob"}',
        "--app",
        f"{APP_MODULE}:pipelines",
    )
    assert out.returncode == 0, out.stderr
    left, history = look(db, stranded)
    assert left.status == "running"
    assert [t.event for t in history] == ["created", "started"]


def test_show_a_paused_branch_of_a_parallel_group(cli: Cli, db: Path) -> None:
    """The journal records a branch's pause on its group's `paused` row: before, `show`
    listed the paused branch as running."""
    cli("migrate")
    app_spec = f"{APP_MODULE}:reviewed"
    out = cli("start", "--app", app_spec, "reviewed", "--input", '{"amount": 5}', "--wait")
    assert out.returncode == 3, out.stdout + out.stderr
    run_id = run_id_of(out)

    out = cli("show", run_id)
    assert out.returncode == 0, out.stderr
    rows = {row.split()[1]: row for row in out.stdout.split("timeline\n", 1)[1].splitlines()[1:]}
    assert rows["review"].endswith("paused: waiting for legal")
    assert rows["review.legal"].endswith("paused: waiting for legal")
    assert rows["review.score"].endswith("succeeded")
    shown = json.loads(cli("show", run_id, "--json").stdout)
    assert [(s["stage"], s["outcome"], s["pause_kind"]) for s in shown["timeline"]] == [
        ("check", "succeeded", None),
        ("review", "paused", "legal"),
        ("review.legal", "paused", "legal"),
        ("review.score", "succeeded", None),
    ]

    answer = '{"approved": true, "by": "lee"}'
    out = cli("resume", run_id, "--input", answer, "--app", app_spec)
    assert out.returncode == 0, out.stdout + out.stderr
    out = cli("show", run_id)
    rows = {row.split()[1]: row for row in out.stdout.split("timeline\n", 1)[1].splitlines()[1:]}
    assert "succeeded (waited " in rows["review.legal"] and rows["review.legal"].endswith(
        " for legal)"
    )


def test_show_a_failed_run(cli: Cli, db: Path, app: ModuleType) -> None:
    run = start(db, app, -1.0)
    assert run.status == "failed"
    out = cli("show", run.run_id)
    assert out.returncode == 0, out.stderr
    assert "error      ValueError: a negative amount (stage 'check')" in out.stdout
    traceback = out.stdout.split("traceback\n", 1)[1].split("\n\n", 1)[0]
    assert f"{APP_MODULE}.py" in traceback and "in check" in traceback
    assert "runner.py" not in traceback and "not shown" in traceback  # the engine's frames
    assert "failed: ValueError: a negative amount" in out.stdout.split("timeline", 1)[1]
    assert cli("runs").stdout.splitlines()[1].split()[3:5] == ["failed", "check"]


def test_unknown_run_id_exits_1(cli: Cli, db: Path, app: ModuleType) -> None:
    start(db, app)
    for command in (
        ["show", "no-such-run"],
        ["history", "no-such-run"],
        ["resume", "no-such-run", "--input", "{}", "--app", f"{APP_MODULE}:pipelines"],
        ["retry", "no-such-run", "--app", f"{APP_MODULE}:pipelines"],
        ["replay", "no-such-run", "--app", f"{APP_MODULE}:pipelines"],
        ["cancel", "no-such-run"],
    ):
        out = cli(*command)
        assert out.returncode == 1, command
        assert out.stderr == "error: no run with id 'no-such-run' in this database\n"
        assert out.stdout == ""


def test_missing_database_is_an_error_and_is_not_created(cli: Cli, tmp_path: Path) -> None:
    missing = tmp_path / "nope.db"
    start = ["start", "--app", f"{APP_MODULE}:pipelines", "expenses", "--input", '{"amount": 1}']
    for command in (
        ["runs"],
        ["show", "x"],
        ["history", "x"],
        ["resume", "x", "--input", "1"],
        start,
        ["retry", "x", "--app", f"{APP_MODULE}:pipelines"],
        ["cancel", "x"],
        ["prune", "--older-than", "1d"],
    ):
        out = cli(*command, db=missing)
        assert out.returncode == 1, command
        assert out.stderr.startswith(f"error: {missing}: no such database")
    assert not missing.exists()


def test_an_empty_file_is_refused_and_left_empty(cli: Cli, tmp_path: Path) -> None:
    """Before, a reading command on a 0-byte file failed but left a 4 KB WAL database."""
    empty = tmp_path / "empty.db"
    empty.touch()
    for command in (["runs"], ["show", "x"], ["cancel", "x"]):
        out = cli(*command, db=empty)
        assert out.returncode == 1, command
        assert out.stderr.startswith(f"error: {empty}: an empty file, not a waystation")
    assert empty.stat().st_size == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db"]


def test_a_file_that_is_not_a_database(cli: Cli, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("these are not the runs you are looking for\n" * 20)
    foreign = tmp_path / "other.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY)")
    conn.commit()
    conn.close()
    for path in (text, foreign):
        for command in (["runs"], ["show", "x"], ["history", "x"], ["migrate"]):
            out = cli(*command, db=path)
            assert out.returncode == 1, (path, command, out.stderr)
            assert out.stderr.startswith("error: ")
            assert "not a waystation database" in out.stderr
            assert "Traceback" not in out.stderr
    assert text.read_text().startswith("these are not")
    conn = sqlite3.connect(foreign)
    assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [("customers",)]
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)  # left as it was


def test_migrate_creates_and_reports_the_schema_version(cli: Cli, db: Path) -> None:
    latest = migrations.migrations("sqlite")[-1].version
    out = cli("migrate")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{db}: schema version {latest} (migrated from 0)"
    out = cli("migrate", "--json")
    assert json.loads(out.stdout) == {"database": str(db), "schema_version": latest, "applied": 0}
    assert cli("runs").stdout.strip() == "no runs"


def test_read_commands_do_not_migrate(cli: Cli, db: Path) -> None:
    db.touch()  # an empty file: SQLite takes it for an empty database
    out = cli("runs")
    assert out.returncode == 1
    assert "run `waystation migrate`" in out.stderr
    assert sqlite3.connect(db).execute("SELECT name FROM sqlite_master").fetchall() == []


def test_db_defaults_to_the_environment(cli: Cli, db: Path, app: ModuleType) -> None:
    run = start(db, app)
    out = cli("runs", env={"WAYSTATION_DB": str(db)})
    assert out.returncode == 0, out.stderr
    assert run.run_id in out.stdout
    out = cli("show", run.run_id, "--db", str(db), db=db.parent / "elsewhere.db")
    assert out.returncode == 0, out.stderr  # --db after the command wins


def test_console_script_and_version(cli: Cli) -> None:
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"waystation {ws.__version__}"
    script = Path(sys.executable).with_name("waystation")
    if not script.exists():
        pytest.skip("waystation is not installed as a script next to this python")
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for command in ("resume", "start", "retry", "replay", "cancel", "prune"):
        assert command in done.stdout


# -- start, retry, replay, cancel, prune --------------------------------------------------------


def test_start_with_wait_exits_by_outcome(cli: Cli, db: Path, app: ModuleType) -> None:
    cli("migrate")
    expenses = f"{APP_MODULE}:pipelines"

    out = cli("start", "--app", expenses, "expenses", "--input", '{"amount": 10}', "--wait")
    assert out.returncode == 3, out.stderr
    paused = run_id_of(out)
    assert out.stdout.splitlines() == [
        f"run {paused} started (expenses version 1)",
        f"run {paused} paused at stage 'approval' waiting for approval: approve this expense?",
    ]

    out = cli("start", "--app", expenses, "expenses", "--input", '{"amount": -1}', "--wait")
    assert out.returncode == 1, out.stderr
    failed = run_id_of(out)
    assert out.stdout.splitlines()[-1] == (
        f"run {failed} failed at stage 'check': ValueError: a negative amount"
    )
    assert out.stderr == ""

    out = cli("start", "--app", f"{APP_MODULE}:report", "report", "--input", '{"n": 2}', "--wait")
    assert out.returncode == 0, out.stderr
    succeeded = run_id_of(out)
    assert out.stdout.splitlines()[1:] == [
        f"run {succeeded} succeeded",
        'output: "published 20"',
    ]

    out = cli("start", "--app", expenses, "report", "--input", '{"n": 4}', "--wait", "--json")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["status"] == "succeeded" and shown["output"] == "published 40"

    for run_id, status in [(paused, "paused"), (failed, "failed"), (succeeded, "succeeded")]:
        run, history = look(db, run_id)
        assert run.status == status
        assert "recovered" not in [t.event for t in history]


def test_start_without_wait_exits_0_and_drives_the_run_until_it_settles(
    cli: Cli, db: Path, app: ModuleType
) -> None:
    cli("migrate")
    app_spec = f"{APP_MODULE}:pipelines"
    out = cli("start", "--app", app_spec, "expenses", "--input", '{"amount": -1}')
    assert out.returncode == 0, out.stderr  # started; --wait would say how it ended
    run_id = run_id_of(out)
    assert out.stdout.splitlines()[0] == f"run {run_id} started (expenses version 1)"
    run, history = look(db, run_id)
    assert run.status == "failed"  # driven here to the end, not left half-run for a worker
    assert [t.event for t in history] == ["created", "started", "failed"]

    out = cli("start", "--app", app_spec, "expenses", "--input", '{"amount": 5}', "--json")
    assert out.returncode == 0, out.stderr
    created = json.loads(out.stdout)  # the run as created
    assert created["status"] == "running" and created["input"] == {"amount": 5.0}
    assert look(db, created["run_id"])[0].status == "paused"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["expenses", "--input", '{"amount": 1'], "--input is not valid JSON"),
        (["expenses", "--input", '{"amount": "ten"}'], "Expected `float`, got `str`"),
        (["expenses", "--input", "{}"], "missing required field `amount`"),
        (["expenses"], "missing required field `amount`"),
        (["expenses", "--input", "[1]"], "the input must be a mapping"),
        (["nope", "--input", "{}"], "has no pipeline 'nope' (it has: expenses, slow"),
        (["expenses", "--input", '{"amount": 1}', "--run-id", "no spaces"], "run id"),
        (["expenses", "--input", '{"amount": 1}', "--idempotency-key", ""], "idempotency_key"),
    ],
)
def test_start_with_bad_input_exits_2_and_writes_nothing(
    cli: Cli, db: Path, app: ModuleType, args: list[str], message: str
) -> None:
    cli("migrate")
    out = cli("start", "--app", f"{APP_MODULE}:pipelines", *args, "--wait")
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stderr.startswith("error: ") and message in out.stderr
    assert out.stdout == ""
    assert table_rows(db) == {"runs": 0, "transitions": 0}


def test_start_is_idempotent_by_key_and_cancel_exits_4(cli: Cli, db: Path, app: ModuleType) -> None:
    cli("migrate")
    start_args = ["start", "--app", f"{APP_MODULE}:pipelines", "expenses"]
    start_args += ["--input", '{"amount": 3}', "--idempotency-key", "order-7", "--wait"]
    out = cli(*start_args)
    assert out.returncode == 3, out.stderr
    run_id = run_id_of(out)

    again = cli(*start_args)
    assert again.returncode == 3, again.stderr
    assert again.stdout.splitlines()[0] == (
        f"run {run_id} exists already with this idempotency key 'order-7': nothing was started"
    )

    out = cli("cancel", run_id)  # no --app needed
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"run {run_id} cancelled\n"
    out = cli(*start_args)
    assert out.returncode == 4, out.stderr
    assert run_id_of(out) == run_id
    assert out.stdout.splitlines()[-1] == f"run {run_id} cancelled at stage 'approval'"
    assert table_rows(db)["runs"] == 1

    out = cli("cancel", run_id)
    assert out.returncode == 1
    assert out.stderr == f"error: run {run_id} already cancelled; it cannot be cancelled\n"

    out = cli(*start_args[:4], "--input", '{"amount": 3}', "--run-id", "expense-1", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["run_id"] == "expense-1"
    out = cli("cancel", "expense-1", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["status"] == "cancelled"


def test_cancel_a_run_that_another_process_drives(
    cli: Cli, db: Path, app: ModuleType, tmp_path: Path
) -> None:
    cli("migrate")
    counts = tmp_path / "counts.txt"
    release = tmp_path / "release"
    env = {"WS_CLI_HOLD": str(release), "WS_CLI_COUNTS": str(counts)}
    starting = cli.spawn(
        "start", "--app", f"{APP_MODULE}:held", "held", "--input", '{"n": 1}', "--wait", env=env
    )
    try:
        assert starting.stdout is not None
        run_id = starting.stdout.readline().split()[1]  # printed as soon as it started
        assert look(db, run_id)[0].status == "running"  # in `hold`, until `release` exists
        out = cli("cancel", run_id)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"run {run_id} running, cancel requested: ")
        release.touch()
        rest, err = starting.communicate(timeout=30)
    finally:
        starting.kill()
        starting.wait()
    assert starting.returncode == 4, err
    assert rest == f"run {run_id} cancelled at stage 'hold'\n"
    assert look(db, run_id)[0].status == "cancelled"
    assert not counts.exists()  # `after` never ran


def test_start_timeout_leaves_the_run_to_a_worker(
    cli: Cli, db: Path, app: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli("migrate")
    release = tmp_path / "release"
    monkeypatch.setenv("WS_CLI_HOLD", str(release))
    out = cli(
        "start",
        "--app",
        f"{APP_MODULE}:held",
        "held",
        "--input",
        '{"n": 7}',
        "--wait",
        "--timeout",
        "0.3",
    )
    assert out.returncode == 1
    run_id = run_id_of(out)
    assert out.stderr == (
        f"error: run {run_id} was started but did not settle within 0.3s; it is still "
        "running, and a worker engine (Engine.open with recover=True) continues it\n"
    )
    assert look(db, run_id)[0].status == "running"
    release.touch()

    async def work() -> ws.Run:
        async with ws.Engine.open(db, pipelines=app.pipelines) as engine:
            return await engine.wait(run_id, timeout=10)

    run = asyncio.run(work())
    assert run.status == "succeeded" and run.output == 8


def test_retry_and_replay_after_fixing_a_stage(
    cli: Cli, db: Path, app: ModuleType, tmp_path: Path
) -> None:
    cli("migrate")
    counts = tmp_path / "counts.txt"
    report = f"{APP_MODULE}:report"
    fixed = {"WS_CLI_COUNTS": str(counts)}
    broken = {**fixed, "WS_CLI_BROKEN": "1"}

    def executed() -> list[str]:
        return counts.read_text().split()

    out = cli("start", "--app", report, "report", "--input", '{"n": 2}', "--wait", env=broken)
    assert out.returncode == 1, out.stderr
    run_id = run_id_of(out)
    assert "failed at stage 'publish': RuntimeError: publish is broken" in out.stdout
    assert executed() == ["fetch", "publish"]

    out = cli("retry", run_id, "--app", report, env=broken)  # not fixed yet
    assert out.returncode == 1, out.stderr
    assert out.stdout.splitlines() == [
        f"run {run_id} retried at stage 'publish'",
        f"run {run_id} failed at stage 'publish': RuntimeError: publish is broken",
    ]
    assert executed() == ["fetch", "publish", "publish"]

    # The bug is fixed: replay forks a new run that reuses fetch's output.
    out = cli("replay", run_id, "--app", f"{APP_MODULE}:pipelines", env=fixed)
    assert out.returncode == 0, out.stderr
    replay_id = run_id_of(out)
    assert replay_id != run_id
    assert out.stdout.splitlines() == [
        f"run {replay_id} started: a replay of run {run_id} from stage 'publish', reusing "
        "the output of fetch",
        f"run {replay_id} succeeded",
        'output: "published 20"',
    ]
    assert executed() == ["fetch", "publish", "publish", "publish"]  # fetch ran once
    replay, history = look(db, replay_id)
    assert replay.run_kind == "replay" and replay.replay_of == run_id
    assert [(t.event, t.stage_path) for t in history][:2] == [
        ("created", None),
        ("reused", "fetch"),
    ]
    assert f"replay of  {run_id}\n" in cli("show", replay_id).stdout

    # ... and retry continues the original run itself, at its failed stage.
    out = cli("retry", run_id, "--app", report, "--json", env=fixed)
    assert out.returncode == 0, out.stderr
    retried = json.loads(out.stdout)
    assert retried["run_id"] == run_id and retried["output"] == "published 20"
    assert executed().count("fetch") == 1
    assert "run retried 2x here" in cli("show", run_id).stdout

    # From an earlier stage, with a new input: a new run again; nothing is reused.
    out = cli(
        "replay", run_id, "--app", report, "--from", "fetch", "--input", '{"n": 3}', env=fixed
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].endswith("from stage 'fetch'")
    assert out.stdout.splitlines()[-1] == 'output: "published 30"'
    assert executed().count("fetch") == 2

    runs_before = table_rows(db)
    for args, code, message in [
        (["retry", run_id, "--app", report], 1, "only failed or cancelled runs can be retried"),
        (["replay", run_id, "--app", report], 1, "say which stage to replay from"),
        (["replay", run_id, "--app", report, "--from", "nope"], 2, "has no stage 'nope'"),
        (["replay", run_id, "--app", report, "--from", "7"], 2, "not a stage index"),
        (["replay", run_id, "--app", report, "--input", '{"n": "x"}'], 2, "invalid input"),
        (["retry", run_id, "--app", f"{APP_MODULE}:held"], 2, "has no pipeline 'report'"),
        (["replay", run_id, "--app", f"{APP_MODULE}:held"], 2, "has no pipeline 'report'"),
    ]:
        out = cli(*args, env=fixed)
        assert out.returncode == code, (args, out.stderr)
        assert out.stderr.startswith("error: ") and message in out.stderr, out.stderr
    assert table_rows(db) == runs_before
    assert executed().count("fetch") == 2


def test_show_lists_the_tree_and_resume_by_the_child_finishes_the_parent(
    cli: Cli, db: Path, app: ModuleType
) -> None:
    cli("migrate")
    out = cli(
        "start", "--app", f"{APP_MODULE}:audit", "audit", "--input", '{"amount": 5}', "--wait"
    )
    assert out.returncode == 3, out.stderr
    parent_id = run_id_of(out)
    (child,) = asyncio.run(_children(db, parent_id))
    assert out.stdout.splitlines()[-1] == (
        f"run {parent_id} paused at stage 'expenses' waiting for approval: approve this "
        f"expense? (in child run {child.run_id}; resuming either answers it)"
    )

    out = cli("show", parent_id)
    assert out.returncode == 0, out.stderr
    tree = out.stdout.split("\ntree (2 runs)\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert tree[0].split() == ["RUN", "ID", "PIPELINE", "KIND", "STATUS", "STAGE", "PAUSE"]
    assert tree[1].startswith(f"  {parent_id}  ")
    assert tree[1].split()[1:] == ["audit", "root", "paused", "expenses", "approval"]
    assert tree[2].startswith(f"    {child.run_id}  ")  # indented under its parent
    assert tree[2].split()[1:] == ["expenses", "child", "paused", "approval", "approval"]
    assert "timeline" in out.stdout  # still there, after the tree
    shown = json.loads(cli("show", parent_id, "--json").stdout)
    assert shown["tree"]["run"]["run_id"] == parent_id
    assert [c["run"]["run_id"] for c in shown["tree"]["children"]] == [child.run_id]
    assert "\ntree" not in cli("show", child.run_id).stdout  # no children: no tree
    assert json.loads(cli("show", child.run_id, "--json").stdout)["tree"] is None

    # Answer the child, with an --app that names only the parent's pipeline: the CLI
    # continues the child and then the parent it wakes, before it closes its engine.
    answer = '{"approved": true, "by": "kim"}'
    out = cli("resume", child.run_id, "--input", answer, "--app", f"{APP_MODULE}:audit")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == f"run {child.run_id} succeeded"
    parent, history = look(db, parent_id)
    assert parent.status == "succeeded"
    assert parent.output == "archived: paid 6.0 (approved by kim)"
    assert "recovered" not in [t.event for t in history]


async def _children(db: Path, run_id: str) -> list[ws.Run]:
    async with ws.Engine.open(db, recover=False) as engine:
        return await engine.list(parent_run_id=run_id)


def test_prune_deletes_finished_trees_older_than_a_duration(
    cli: Cli, db: Path, app: ModuleType
) -> None:
    async def setup() -> tuple[str, str, str]:
        async with ws.Engine.open(db, pipelines=app.pipelines) as engine:
            tree = await engine.start(app.audit, {"amount": 2.0})
            await engine.resume(tree.run_id, {"approved": True, "by": "ann"})
            await engine.wait(tree.run_id, timeout=10)
            failed = await engine.start(app.expenses, {"amount": -2.0})
            paused = await engine.start(app.expenses, {"amount": 2.0})
            return tree.run_id, failed.run_id, paused.run_id

    tree_id, failed_id, paused_id = asyncio.run(setup())
    assert look(db, tree_id)[0].status == "succeeded"
    assert table_rows(db)["runs"] == 4  # the tree is a parent and its child
    conn = sqlite3.connect(db)
    with conn:  # 40 days ago
        conn.execute("UPDATE runs SET updated_at = updated_at - 40 * 86400")
    conn.close()

    out = cli("prune", "--older-than", "60d")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("deleted 0 runs (succeeded or cancelled, ")
    out = cli("prune", "--older-than", "30d")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(
        "deleted 2 runs (succeeded or cancelled, last changed more than 30d ago"
    )
    remaining = json.loads(cli("runs", "--json").stdout)
    assert [r["run_id"] for r in remaining] == [failed_id, paused_id]
    conn = sqlite3.connect(db)
    journals = {r[0] for r in conn.execute("SELECT DISTINCT run_id FROM journal")}
    conn.close()
    assert journals == {failed_id, paused_id}

    out = cli("prune", "--older-than", "720h", "--status", "failed", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "deleted": 1,
        "older_than": 30 * 86400.0,
        "status": ["failed"],
    }
    assert [r["run_id"] for r in json.loads(cli("runs", "--json").stdout)] == [paused_id]

    for args in (["--older-than", "soon"], ["--older-than", "1d", "--status", "paused"]):
        out = cli("prune", *args)
        assert out.returncode == 2 and "usage: waystation prune" in out.stderr
    assert table_rows(db)["runs"] == 1


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30d", 2592000), ("12h", 43200), ("90m", 5400), ("3600s", 3600), ("45", 45), ("1.5h", 5400)],
)
def test_prune_durations(text: str, seconds: float) -> None:
    assert _age(text) == seconds


@pytest.mark.parametrize("text", ["", "3x", "-1d", "d", "1 d 2h"])
def test_prune_rejects_a_bad_duration(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        _age(text)


def _t(seq: int, event: str, stage: int | None, attempt: int = 1, at: float = 0.0) -> ws.Transition:
    return ws.Transition(
        run_id="r",
        seq=seq,
        stage_index=stage,
        stage_path=None if stage is None else f"s{stage}",
        event=event,
        attempt=attempt,
        payload={"kind": "approval"} if event == "paused" else None,
        error=ws.StageError(type="OSError", message="boom") if event == "retrying" else None,
        at=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=at),
    )


def test_timeline_folds_the_journal_into_stages() -> None:
    rows = [
        _t(1, "created", None),
        _t(2, "started", 0),
        _t(3, "retrying", 0, 1, at=1),
        _t(4, "succeeded", 0, 2, at=2),
        _t(5, "started", 1, at=2),
        _t(6, "paused", 1, at=2),
        _t(7, "resumed", 1, 0, at=62),
        _t(8, "succeeded", 1, at=62),
        _t(9, "started", 2, at=62),
        _t(10, "recovered", 2, 0, at=70),
        _t(11, "failed", 2, at=71),
        _t(12, "retried", 2, 0, at=80),
        _t(13, "started", 2, at=80),
    ]
    spans = timeline(rows)
    assert [(s.stage, s.outcome, s.attempts) for s in spans] == [
        ("s0", "succeeded", 2),
        ("s1", "succeeded", 1),
        ("s2", "running", 2),
    ]
    assert spans[0].duration == 2 and spans[0].error is not None
    assert spans[1].paused == 60 and spans[1].pause_kind == "approval"
    assert spans[2].recovered == 1 and spans[2].retried == 1 and spans[2].ended_at is None


def test_demo_runs_and_its_run_succeeds(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "expense_demo.py"), "--db", str(db)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok: succeeded" in done.stdout
    assert "does not match its schema" in done.stdout  # the malformed answer, refused

    async def runs() -> list[ws.Run]:
        async with ws.Engine.open(db, recover=False) as engine:
            return await engine.list()

    (run,) = asyncio.run(runs())
    assert run.status == "succeeded"
    assert run.output["status"] == "paid" and run.output["reference"].startswith("TX-")


# -- plan ---------------------------------------------------------------------------------------


def test_plan_prints_the_steps_and_exits_0_when_clean(cli: Cli, db: Path) -> None:
    out = cli("plan", "--app", f"{APP_MODULE}:pipelines", "audit", "--input", '{"amount": 10}')
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("plan of audit v1 (") and lines[0].endswith("): ok")
    assert lines[1] == "input: amount: float (the given input checked)"
    assert "  1. expenses: child run of expenses v1 (amount=input.amount) -> str" in lines
    assert "     1. check(amount=input.amount) -> float" in lines
    assert (
        "     2. approval: gate, pauses for an answer of type Decision "
        "('approve this expense?')" in lines
    )
    assert "     3. pay(check=check, approval=approval) -> str  [thread]" in lines
    assert "  2. archive(expenses=expenses) -> str" in lines
    assert lines[-1] == "no problems found"
    assert not db.exists()  # a plan opens no database


def test_plan_exits_2_and_names_each_problem(cli: Cli, db: Path) -> None:
    out = cli("plan", "--app", f"{APP_MODULE}:pipelines", "audit", "--input", '{"amount": "x"}')
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr == ""
    assert out.stdout.splitlines()[-2:] == [
        "problems (1):",
        "  - audit: invalid input: Expected `float`, got `str` - at `$.amount`",
    ]

    out = cli("plan", "--app", f"{APP_MODULE}:broken", "broken")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "input: n: int (no input given)" in out.stdout
    assert out.stdout.splitlines()[-2:] == [
        "problems (1):",
        "  - broken.misread: parameter 'fetch' is Decision, but the output of stage 'fetch' "
        "is int: at `$`, integer is not Decision",
    ]


def test_plan_with_a_null_input_checks_it_as_start_would(cli: Cli) -> None:
    """`--input null` is an input (the engine reads it as one with no fields), not the
    absence of one: before, the plan said "no input given" and exit 0, where `start` with
    the same input is refused."""
    out = cli("plan", "--app", f"{APP_MODULE}:pipelines", "audit", "--input", "null")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "missing required field `amount`" in out.stdout
    started = cli("start", "--app", f"{APP_MODULE}:pipelines", "audit", "--input", "null")
    assert started.returncode == 2 and "missing required field `amount`" in started.stderr


def test_plan_json(cli: Cli) -> None:
    out = cli("plan", "--app", f"{APP_MODULE}:broken", "broken", "--input", '{"n": 1}', "--json")
    assert out.returncode == 2, out.stdout + out.stderr
    plan = json.loads(out.stdout)
    assert plan["ok"] is False and plan["input_checked"] is True
    assert [(s["kind"], s["name"], s["path"]) for s in plan["steps"]] == [
        ("stage", "fetch", "broken.fetch"),
        ("stage", "misread", "broken.misread"),
    ]
    assert plan["steps"][1]["params"] == [
        {"name": "fetch", "type": "Decision", "source": "stage", "ref": "fetch", "decoded": True}
    ]
    assert len(plan["problems"]) == 1

    out = cli("plan", "--app", f"{APP_MODULE}:pipelines", "expenses", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["ok"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope"], "has no pipeline 'nope' (it has: expenses, slow"),
        (["expenses", "--input", "{"], "--input is not valid JSON"),
    ],
)
def test_plan_bad_usage_exits_2(cli: Cli, args: list[str], message: str) -> None:
    out = cli("plan", "--app", f"{APP_MODULE}:pipelines", *args)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith("error: ") and message in out.stderr
    assert out.stdout == ""


@ws.stage
async def before_nap(n: int) -> int:
    return n


napping = ws.Pipeline("napping", [before_nap, ws.sleep_stage("nap", 3600.0)])


def test_show_says_a_sleeping_run_sleeps_and_until_when(cli: Cli, db: Path) -> None:
    """Before, a run parked by a sleep was shown as 'pending: answered'."""

    async def go() -> ws.Run:
        async with ws.Engine.open(db, pipelines=[napping]) as engine:
            run = await engine.submit(napping, {"n": 1})

            async def asleep() -> bool:
                return (await engine.get(run.run_id)).status == "pending"

            await wait_until("the run sleeps", asleep, timeout=10)
            return run

    run = asyncio.run(go())
    shown = cli("show", run.run_id)
    assert shown.returncode == 0, shown.stderr
    assert "sleeping until " in shown.stdout
    assert "answered" not in shown.stdout
