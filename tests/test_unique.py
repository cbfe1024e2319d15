"""Unique jobs: a unique key makes a second enqueue a no-op while the first job is queued or
running (or, with a window, was enqueued within it), enforced by the database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import handlers  # noqa: F401  (the "record" kind)
import psycopg
import pytest
from click.testing import Result
from conftest import LOCAL, TESTS, wait_for

import claude_jobs

#: One process of the race: enqueue the same key (with a window, if given) many times, each
#: its own transaction on its own connection, and print the ids it got back.
RACER = textwrap.dedent(
    """
    import sys, claude_jobs
    url, key, times, window = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    seen = set()
    with claude_jobs.connect(url, autocommit=True) as conn:
        sys.stdin.readline()  # (all start together)
        for n in range(times):
            job = claude_jobs.enqueue(
                conn, {"n": n}, kind="record", unique_key=key,
                unique_for=float(window) if window != "-" else None)
            seen.add(str(job.id))
    print(" ".join(sorted(seen)))
    """
)


def race(db_url: str, key: str, processes: int, times: int, window: str = "-") -> set[str]:
    """Run ``processes`` racers at once; the ids they all got back."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", "import handlers\n" + RACER, db_url, key, str(times), window],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(processes)
    ]
    for racer in racers:  # (each has connected by the time it reads the line)
        assert racer.stdin is not None
        racer.stdin.write("go\n")
        racer.stdin.flush()
    ids: set[str] = set()
    for racer in racers:
        out, err = racer.communicate(timeout=110)
        assert racer.returncode == 0, err
        ids.update(out.split())
    return ids


def jobs_of_key(conn: psycopg.Connection, key: str) -> list[tuple[Any, str]]:
    return conn.execute(
        "SELECT id, status FROM claude_jobs WHERE unique_key = %s", (key,)
    ).fetchall()


def test_eight_processes_enqueueing_one_key_a_thousand_times_make_one_job(
    db_url: str, conn: psycopg.Connection
) -> None:
    ids = race(db_url, "nightly-review", processes=8, times=1000)
    made = jobs_of_key(conn, "nightly-review")
    assert len(made) == 1
    assert ids == {str(made[0][0])}


def test_a_window_holds_under_the_same_race(db_url: str, conn: psycopg.Connection) -> None:
    ids = race(db_url, "weekly-bump", processes=8, times=200, window="3600")
    made = jobs_of_key(conn, "weekly-bump")
    assert len(made) == 1
    assert ids == {str(made[0][0])}
    windows = conn.execute("SELECT key, job_id FROM claude_jobs_unique_windows").fetchall()
    assert windows == [("weekly-bump", made[0][0])]


def test_a_key_is_free_again_once_its_job_ended(conn: psycopg.Connection) -> None:
    first = claude_jobs.enqueue(conn, {}, kind="record", unique_key="k")
    again = claude_jobs.enqueue(conn, {}, kind="record", unique_key="k")
    assert again.duplicate and again.id == first.id and not first.duplicate
    claude_jobs.cancel_job(conn, first.id)
    second = claude_jobs.enqueue(conn, {}, kind="record", unique_key="k")
    assert not second.duplicate and second.id != first.id
    other = claude_jobs.enqueue(conn, {}, kind="record", unique_key="another key")
    assert not other.duplicate


def test_a_window_outlives_its_job_and_then_expires(conn: psycopg.Connection) -> None:
    first = claude_jobs.enqueue(conn, {}, kind="record", unique_key="k", unique_for=1.5)
    claude_jobs.cancel_job(conn, first.id)  # (ended: only the window keeps the key now)
    again = claude_jobs.enqueue(conn, {}, kind="record", unique_key="k", unique_for=1.5)
    assert again.duplicate and again.id == first.id and again.status == "cancelled"

    def enqueued() -> claude_jobs.Job | None:
        job = claude_jobs.enqueue(conn, {}, kind="record", unique_key="k", unique_for=1.5)
        return None if job.duplicate else job

    later = wait_for(enqueued, timeout=10, what="the window to end")
    assert later.id != first.id
    # a job still queued when its window ended keeps its key (it is unfinished)
    conn.execute("UPDATE claude_jobs_unique_windows SET until = now() - interval '1s'")
    assert claude_jobs.enqueue(conn, {}, kind="record", unique_key="k", unique_for=5).id == later.id
    # and cleanup forgets the windows that ended
    conn.execute("UPDATE claude_jobs_unique_windows SET until = now() - interval '1s'")
    claude_jobs.cleanup_jobs(conn, 86400)
    assert conn.execute("SELECT count(*) FROM claude_jobs_unique_windows").fetchone() == (0,)


def test_an_open_window_keeps_out_an_enqueue_without_one(conn: psycopg.Connection) -> None:
    first = claude_jobs.enqueue(conn, {}, kind="record", unique_key="k", unique_for=3600)
    claude_jobs.cancel_job(conn, first.id)
    plain = claude_jobs.enqueue(conn, {}, kind="record", unique_key="k")
    assert plain.duplicate and plain.id == first.id
    [held] = claude_jobs.enqueue_many(conn, [{}], kind="record", unique_keys=["k"])
    assert held == first.id
    conn.execute("UPDATE claude_jobs_unique_windows SET until = now() - interval '1s'")
    assert not claude_jobs.enqueue(conn, {}, kind="record", unique_key="k").duplicate


def test_a_window_whose_job_was_cleaned_up_is_handed_over(conn: psycopg.Connection) -> None:
    first = claude_jobs.enqueue(conn, {}, kind="record", unique_key="k", unique_for=3600)
    claude_jobs.cancel_job(conn, first.id)
    conn.execute("DELETE FROM claude_jobs WHERE id = %s", (first.id,))
    second = claude_jobs.enqueue(conn, {}, kind="record", unique_key="k", unique_for=3600)
    assert not second.duplicate
    assert conn.execute("SELECT job_id FROM claude_jobs_unique_windows").fetchone() == (second.id,)


def test_a_duplicate_inside_a_rolled_back_transaction_leaves_nothing(
    conn: psycopg.Connection,
) -> None:
    with pytest.raises(RuntimeError), conn.transaction():
        claude_jobs.enqueue(conn, {}, kind="record", unique_key="k", unique_for=60)
        raise RuntimeError
    assert jobs_of_key(conn, "k") == []
    assert not claude_jobs.enqueue(conn, {}, kind="record", unique_key="k", unique_for=60).duplicate


def test_enqueue_many_keys_each_payload(conn: psycopg.Connection) -> None:
    held = claude_jobs.enqueue(conn, {}, kind="record", unique_key="b")
    ids = claude_jobs.enqueue_many(
        conn,
        [{"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}, {"n": 5}],
        kind="record",
        unique_keys=["a", "b", None, "a", "c"],
    )
    assert ids.duplicates == [1, 3]
    assert ids[1] == held.id and ids[3] == ids[0]
    rows = conn.execute("SELECT payload->>'n', unique_key FROM claude_jobs ORDER BY seq").fetchall()
    assert rows == [(None, "b"), ("1", "a"), ("3", None), ("5", "c")]  # in order


def test_enqueue_file_notes_each_duplicate_line(
    invoke: Callable[..., Result], conn: psycopg.Connection, tmp_path: Path
) -> None:
    first = invoke("enqueue", "review shop", "--unique-key", "review:shop")
    assert first.exit_code == 0, first.output
    holder = first.stdout.strip()
    lines = [
        {"prompt": "review shop", "unique_key": "review:shop"},
        {"prompt": "review blog", "unique_key": "review:blog", "unique_for": "1h"},
        {"prompt": "review blog again", "unique_key": "review:blog"},
        {"prompt": "no key"},
    ]
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = invoke("enqueue", "--file", str(path), "--json")
    assert result.exit_code == 0, result.output
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    assert [job["duplicate"] for job in printed] == [True, False, True, False]
    assert printed[0]["id"] == holder and printed[2]["id"] == printed[1]["id"]
    notes = result.stderr.splitlines()
    assert len(notes) == 2
    assert notes[0].startswith(f"note: line 1 of {path}: job {holder} (queued) has the unique")
    assert notes[1].startswith(f"note: line 3 of {path}: job {printed[1]['id']}")
    assert len(jobs_of_key(conn, "review:blog")) == 1


def test_enqueue_says_duplicate_on_stderr_and_json(invoke: Callable[..., Result]) -> None:
    args = ("enqueue", "--payload", "{}", "--kind", "record", "--unique-key", "k")
    first, again, as_json = invoke(*args), invoke(*args), invoke(*args, "--json")
    assert again.exit_code == 0 and again.stdout == first.stdout
    assert "has the unique key 'k': nothing was enqueued" in again.stderr
    assert json.loads(as_json.stdout)["duplicate"] is True
    assert json.loads(as_json.stdout)["id"] == first.stdout.strip()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--unique-for", "1h"], "--unique-for is how long a --unique-key holds"),
        (["--unique-key", " "], "a unique key must be non-empty text"),
        (["--unique-key", "k", "--unique-for", "0"], "unique_for must be a positive duration"),
    ],
)
def test_bad_unique_options_exit_2_and_enqueue_nothing(
    invoke: Callable[..., Result], conn: psycopg.Connection, args: list[str], message: str
) -> None:
    result = invoke("enqueue", "--payload", "{}", "--kind", "record", *args)
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output
    assert conn.execute("SELECT count(*) FROM claude_jobs").fetchone() == (0,)


def test_retry_leaves_a_job_whose_key_another_holds(conn: psycopg.Connection) -> None:
    old = claude_jobs.enqueue(conn, {}, kind="record", unique_key="k")
    claude_jobs.cancel_job(conn, old.id)
    new = claude_jobs.enqueue(conn, {}, kind="record", unique_key="k")
    with pytest.raises(claude_jobs.WrongState, match=f"job {new.id} holds"):
        claude_jobs.retry_jobs(conn, [old.id])
    assert claude_jobs.retry_jobs(conn, status="cancelled") == []
    claude_jobs.cancel_job(conn, new.id)
    # of two of one key, only the newer goes back
    assert claude_jobs.retry_jobs(conn, status="cancelled") == [new.id]


def test_the_api_answers_a_duplicate_with_200_and_the_holder(db_url: str) -> None:
    from starlette.testclient import TestClient

    body = {"payload": {"n": 1}, "kind": "record", "unique_key": "k", "unique_for": "10m"}
    with TestClient(claude_jobs.web_app(db_url), base_url=LOCAL) as client:
        first = client.post("/api/jobs", json=body)
        again = client.post("/api/jobs", json=body)
    assert first.status_code == 201 and first.json()["duplicate"] is False
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert again.json()["id"] == first.json()["id"]
