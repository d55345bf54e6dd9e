"""The same work on DBOS and LangGraph: 10 trivial stages per run, each durable before the next.

    python3 -m venv /tmp/benchvenv && /tmp/benchvenv/bin/pip install -e '.[bench]'
    /tmp/benchvenv/bin/python benchmarks/peers.py            # ~1 minute
    /tmp/benchvenv/bin/python benchmarks/peers.py --quick

Peers, run in a separate venv (the `bench` extra) so the project's .venv stays as it is:

- DBOS (SQLite system database, async API): a workflow of 10 `@DBOS.step()`s; each step's
  output is committed before the workflow continues. DBOS does not choose a journal mode for
  SQLite, so the file is put in WAL mode before DBOS opens it (WAL is stored in the file);
  synchronous is SQLite's default here, FULL (checked and reported).
- LangGraph + AsyncSqliteSaver: a StateGraph of 10 nodes in a line, `durability="sync"` (each
  step's checkpoint is persisted before the next step starts); the saver sets WAL, and we set
  synchronous=FULL on its connection.

200 runs sequentially (one after the other) and 200 runs concurrently (all started, then
all awaited), in stage transitions per second (runs x 10 / elapsed), median of 3. Every
trial runs in a fresh process on a fresh file. A peer that cannot be imported or run is
reported as NOT MEASURED with the error, never with a number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

N_STAGES = 10
TRIALS = 3
PEERS = ("dbos", "langgraph")
MODES = ("sequential", "concurrent")


# -- children: one trial of one peer in one mode, in a fresh process -----------------------


async def child_dbos(db: str, mode: str, runs: int) -> dict[str, Any]:
    import dbos
    from dbos import DBOS

    with sqlite3.connect(db) as conn:  # WAL is persistent: DBOS will open it in WAL mode
        conn.execute("PRAGMA journal_mode=WAL")

    DBOS(
        config={
            "name": "waystation-bench",
            "system_database_url": f"sqlite:///{db}",
            "log_level": "WARNING",
        }
    )

    @DBOS.step()
    async def stage(n: int, k: int) -> int:
        return n + k

    @DBOS.workflow()
    async def workflow(n: int) -> int:
        v = n
        for k in range(N_STAGES):
            v = await stage(n, k)
        return v

    DBOS.launch()
    try:
        for _ in range(3):  # warm-up, not timed
            await workflow(1)
        t0 = time.perf_counter()
        if mode == "sequential":
            for _ in range(runs):
                await workflow(1)
        else:
            handles = await asyncio.gather(
                *(DBOS.start_workflow_async(workflow, 1) for _ in range(runs))
            )
            await asyncio.gather(*(h.get_result() for h in handles))
        elapsed = time.perf_counter() - t0
        with sqlite3.connect(db) as conn:
            journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
            outputs = conn.execute("SELECT count(*) FROM operation_outputs").fetchone()[0]
    finally:
        DBOS.destroy()
    return {
        "version": getattr(dbos, "__version__", None) or _dist_version("dbos"),
        "elapsed_s": elapsed,
        "journal_mode": journal,
        "synchronous": _default_synchronous(),
        "step_rows": outputs,
    }


async def child_langgraph(db: str, mode: str, runs: int) -> dict[str, Any]:
    from typing import TypedDict

    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
    from langgraph.graph import END, START, StateGraph

    class State(TypedDict):
        n: int
        v: int

    def node(k: int) -> Any:
        async def fn(state: State) -> dict[str, int]:
            return {"v": state["n"] + k}

        return fn

    builder = StateGraph(State)
    prev = START
    for k in range(N_STAGES):
        builder.add_node(f"s{k}", node(k))
        builder.add_edge(prev, f"s{k}")
        prev = f"s{k}"
    builder.add_edge(prev, END)

    async with AsyncSqliteSaver.from_conn_string(db) as saver:
        await saver.setup()
        await saver.conn.execute("PRAGMA synchronous=FULL")
        async with saver.conn.execute("PRAGMA synchronous") as cur:
            sync_row = await cur.fetchone()
        async with saver.conn.execute("PRAGMA journal_mode") as cur:
            journal_row = await cur.fetchone()
        graph = builder.compile(checkpointer=saver)

        async def one(tid: str) -> None:
            out = await graph.ainvoke(
                {"n": 1, "v": 0}, {"configurable": {"thread_id": tid}}, durability="sync"
            )
            assert out["v"] == 1 + N_STAGES - 1, out

        for i in range(3):  # warm-up, not timed
            await one(f"warm-{i}")
        t0 = time.perf_counter()
        if mode == "sequential":
            for i in range(runs):
                await one(f"run-{i}")
        else:
            await asyncio.gather(*(one(f"run-{i}") for i in range(runs)))
        elapsed = time.perf_counter() - t0
        async with saver.conn.execute("SELECT count(*) FROM checkpoints") as cur:
            row = await cur.fetchone()
    return {
        "version": _dist_version("langgraph"),
        "checkpoint_sqlite_version": _dist_version("langgraph-checkpoint-sqlite"),
        "elapsed_s": elapsed,
        "journal_mode": journal_row[0] if journal_row else None,
        "synchronous": {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(
            sync_row[0] if sync_row else -1
        ),
        "checkpoint_rows": row[0] if row else None,
    }


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _default_synchronous() -> str:
    with sqlite3.connect(":memory:") as conn:
        opts = [r[0] for r in conn.execute("PRAGMA compile_options")]
    wal = [o for o in opts if o.startswith("DEFAULT_WAL_SYNCHRONOUS=")]
    value = wal[0].split("=")[1] if wal else "2"
    return {"0": "OFF", "1": "NORMAL", "2": "FULL", "3": "EXTRA"}.get(value, value)


def run_child(args: argparse.Namespace) -> None:
    fn = {"dbos": child_dbos, "langgraph": child_langgraph}[args.child]
    result = asyncio.run(fn(args.db, args.mode, args.runs))
    result["transitions_per_s"] = args.runs * N_STAGES / result["elapsed_s"]
    print("RESULT " + json.dumps(result), flush=True)


# -- parent --------------------------------------------------------------------------------


def one_trial(peer: str, mode: str, runs: int, tmp: str, t: int) -> dict[str, Any]:
    db = os.path.join(tmp, f"{peer}-{mode}-{t}.sqlite")
    cmd = [sys.executable, __file__, "--child", peer, "--mode", mode, "--runs", str(runs)]
    proc = subprocess.run(
        [*cmd, "--db", db], capture_output=True, text=True, timeout=600, check=False
    )
    for suffix in ("", "-wal", "-shm", "-journal"):
        if os.path.exists(db + suffix):
            os.remove(db + suffix)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT ") :])
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()
    return {"error": f"exit {proc.returncode}: {tail[-1] if tail else 'no output'}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 runs instead of 200")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--peer", choices=PEERS, action="append", help="only these peers")
    parser.add_argument("--child", choices=PEERS, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return
    runs = args.runs or (20 if args.quick else 200)
    peers = args.peer or list(PEERS)
    tmp = tempfile.mkdtemp(prefix="waystation-peers-")
    results: dict[tuple[str, str], list[dict[str, Any]]] = {
        (p, m): [] for p in peers for m in MODES
    }
    try:
        for t in range(TRIALS):  # interleaved, so each peer sees the same machine load
            for p in peers:
                for m in MODES:
                    results[(p, m)].append(one_trial(p, m, runs, tmp, t))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for (p, m), trials in results.items():
        ok = [r for r in trials if "error" not in r]
        record: dict[str, Any] = {
            "bench": "peers",
            "name": f"{p}_{m}",
            "peer": p,
            "mode": m,
            "metric": "transitions_per_s",
            "unit": "tr/s",
            "runs": runs,
            "stages_per_run": N_STAGES,
        }
        if len(ok) < len(trials):
            record["error"] = next(r["error"] for r in trials if "error" in r)
        if ok:
            values = [r["transitions_per_s"] for r in ok]
            record.update(
                median=statistics.median(values),
                trials=values,
                ms_per_stage=1e3 / statistics.median(values),
                details=ok,
            )
        else:
            record["median"] = None
        print(json.dumps(record), flush=True)
        rows.append(record)
    print()
    for r in rows:
        if r["median"] is None:
            print(f"{r['name']:<24} NOT MEASURED: {r['error']}")
        else:
            v = r["details"][0].get("version")
            print(
                f"{r['name']:<24} {r['median']:>10,.0f} tr/s  "
                f"({r['ms_per_stage']:.3f} ms per stage, {r['runs']} runs, version {v})"
            )


if __name__ == "__main__":
    main()
