"""The crash soak, short: 20 SIGKILLs of a worker running the mixed workload of
`soak_workload.py` while two other processes answer its pauses; zero anomalies.

`benchmarks/soak.py` runs the long version (300 kills). `SOAK_SEED=n` changes the schedule of
kills. The last tests check that the harness itself can fail: a worker that runs a stage twice
or applies an answer nobody gave, and a journal with a result committed twice, are reported.
"""

from __future__ import annotations

import json
import os
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from .soak_workload import Soak, expected_totals, soak

SEED = int(os.environ.get("SOAK_SEED", "7"))
KILLS = 20
RUNS = 30


async def test_soak_twenty_kills(tmp_path: Path) -> None:
    report = await soak(tmp_path, kills=KILLS, seed=SEED, runs=RUNS, final_timeout=40)
    print(json.dumps(report.figures()))
    assert report.anomalies == [], "\n\n".join(report.anomalies)
    assert report.kills == KILLS
    figures = report.figures()
    assert {k: figures[k] for k in expected_totals(RUNS)} == expected_totals(RUNS)
    # The kills landed in the middle of the work, not only between runs.
    assert report.kills_mid_stage >= 3, figures
    assert report.reexecutions >= 1, figures


@pytest.mark.parametrize(
    ("sabotage", "expected"),
    [
        ("double", "summary attempt 1 executed 2 times"),
        ("forge", "apply ran with answer forged"),
    ],
)
async def test_soak_reports_a_sabotaged_worker(
    tmp_path: Path, sabotage: str, expected: str
) -> None:
    harness = Soak(tmp_path, kills=3, seed=SEED, runs=10, sabotage=sabotage)
    report = await harness.run(final_timeout=30)
    assert any(expected in a for a in report.anomalies), report.anomalies


async def test_soak_reports_a_result_committed_twice(tmp_path: Path) -> None:
    harness = Soak(tmp_path, kills=3, seed=SEED, runs=10)
    report = await harness.run(final_timeout=30)
    assert report.anomalies == [], "\n\n".join(report.anomalies)
    with closing(sqlite3.connect(harness.db)) as conn, conn:
        conn.execute(
            "INSERT INTO transitions (run_id, seq, stage_index, stage_path, event, attempt, "
            "payload, at) SELECT run_id, seq + 1000, stage_index, stage_path, event, attempt, "
            "payload, at FROM transitions WHERE run_id = 'soak-00000' AND stage_path = 'load' "
            "AND event = 'succeeded'"
        )
    harness.check_end()
    assert "soak-00000 load: 2 `succeeded` rows" in report.anomalies, report.anomalies
    assert any("runs.seq" in a for a in report.anomalies), report.anomalies
