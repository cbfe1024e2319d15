"""Blocked jobs: a queued job that cannot run yet (its key's slots are taken, it waits for
other jobs) is enqueued marked so, out of the claim's way; whatever ends the jobs it waits for
unmarks it, and a worker's janitor unmarks any that two transactions at once left behind.

Most tests drive the statements a worker uses (claim, record) on one connection, a step at a
time; the last one runs a worker process.
"""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime
from typing import Any

import handlers  # the "record" kind
import psycopg
import pytest
from conftest import job_row, status_of, wait_for

import claude_jobs
from claude_jobs import Job, Outcome, Progress, Verdict

KIND = "blocking-test"


@claude_jobs.handler(KIND)
def nothing(job: Job) -> None:
    """A Python job kind that does nothing."""


@pytest.fixture(autouse=True)
def worker_id(conn: psycopg.Connection) -> uuid.UUID:
    """A registered worker of every queue, for claims (and for the unblocking, which lets a
    job of a key through only if some worker could run it)."""
    return register_worker(conn)


def register_worker(conn: psycopg.Connection) -> uuid.UUID:
    worker_id = uuid.uuid4()
    identity = {"host": "here", "pid": 1, "queues": ["*"], "kinds": [KIND, "claude"],
                "concurrency": 1}  # fmt: skip
    claude_jobs._db_register_worker(conn, worker_id, identity)
    return worker_id


def claim(conn: psycopg.Connection, worker_id: uuid.UUID, limit: int = 10) -> list[dict[str, Any]]:
    """Claim jobs, and admit those of a key (each takes a slot), as a worker does."""
    with conn.transaction():
        cursor = claude_jobs._db_claim(conn, worker_id=worker_id, worker="here:1", host="here",
                                       kinds=[KIND], queue=None, limit=limit)  # fmt: skip
        rows = cursor.fetchall()
    for row in rows:
        if row["concurrency_key"]:
            assert claude_jobs._db_admit(conn, Job.from_row(row), None) is None  # admitted
    return rows


SUCCEEDED = Outcome(Verdict.SUCCEEDED)


def finish(conn: psycopg.Connection, row: dict[str, Any], outcome: Outcome = SUCCEEDED) -> None:
    """Record a claimed job's outcome, as a worker's round does."""
    job = Job.from_row(row)
    record = claude_jobs._Row(job.id, job.claim, outcome, Progress(), job.concurrency_key)
    with conn.transaction():
        claude_jobs._db_record(conn, [record], "here")


def blocked_ids(conn: psycopg.Connection) -> set[uuid.UUID]:
    rows = conn.execute(
        "SELECT id FROM claude_jobs WHERE status = 'queued' AND blocked IS NOT NULL"
    )
    return {row[0] for row in rows}


def enqueue_keyed(conn: psycopg.Connection, count: int, **settings: Any) -> list[uuid.UUID]:
    settings = {"concurrency_key": "repo", **settings}
    return claude_jobs.enqueue_many(conn, [{"n": n} for n in range(count)], kind=KIND, **settings)


def test_jobs_of_a_busy_key_are_blocked_and_let_through_one_by_one_in_order(
    conn: psycopg.Connection, worker_id: uuid.UUID
) -> None:
    ids = enqueue_keyed(conn, 10)
    free = claude_jobs.enqueue(conn, {}, kind=KIND)
    more = claude_jobs.enqueue(conn, {}, kind=KIND, concurrency_key="repo")
    assert blocked_ids(conn) == {*ids[1:], more.id}, "all but the first in claim order"
    order = []
    while rows := claim(conn, worker_id):
        assert {row["id"] for row in rows} <= {*ids, free.id, more.id}
        keyed = [row for row in rows if row["id"] != free.id]
        assert len(keyed) == 1, "the claim sees one job of the key at a time"
        order.append(keyed[0]["id"])
        for row in rows:
            finish(conn, row)
    assert order == [*ids, more.id]
    assert not blocked_ids(conn)


def test_a_limit_of_two_keeps_two_in_the_claims_way_and_a_retry_gives_its_slot_up(
    conn: psycopg.Connection, worker_id: uuid.UUID
) -> None:
    ids = enqueue_keyed(conn, 6, concurrency_limit=2)
    assert blocked_ids(conn) == set(ids[2:])
    first, second = claim(conn, worker_id)
    assert [first["id"], second["id"]] == ids[:2]
    finish(conn, first, Outcome(Verdict.FAILED, delay=60))  # back in a while: its slot is free
    assert blocked_ids(conn) == set(ids[3:])
    assert job_row(conn, first["id"])["run_at"] > datetime.now(UTC)
    assert [row["id"] for row in claim(conn, worker_id)] == [ids[2]]


def test_a_due_job_is_not_kept_waiting_behind_a_higher_priority_one_due_later(
    conn: psycopg.Connection, worker_id: uuid.UUID
) -> None:
    later = enqueue_keyed(conn, 2, priority=5, delay=3600)
    now = enqueue_keyed(conn, 1)
    assert blocked_ids(conn) == {later[1]}, "the due one is let through"
    (row,) = claim(conn, worker_id)
    assert row["id"] == now[0]
    finish(conn, row)
    assert blocked_ids(conn) == {later[1]}, "the first of those due later goes first"


def test_jobs_waiting_for_others_are_blocked_until_these_succeed(
    conn: psycopg.Connection, worker_id: uuid.UUID
) -> None:
    first = claude_jobs.enqueue(conn, {}, kind=KIND)
    second = claude_jobs.enqueue(conn, {}, kind=KIND)
    waiting = claude_jobs.enqueue_many(conn, [{}] * 5, kind=KIND, after=[first.id, second.id])
    keyed = claude_jobs.enqueue_many(
        conn, [{}] * 3, kind=KIND, after=[first.id], concurrency_key="repo"
    )
    assert blocked_ids(conn) == {*waiting, *keyed}
    rows = {row["id"]: row for row in claim(conn, worker_id)}
    assert set(rows) == {first.id, second.id}
    finish(conn, rows[first.id])
    assert blocked_ids(conn) == {*waiting, *keyed[1:]}, "keyed: one at a time; the rest: both"
    finish(conn, rows[second.id])
    assert blocked_ids(conn) == set(keyed[1:])
    assert {row["id"] for row in claim(conn, worker_id)} == {*waiting, keyed[0]}
    done = claude_jobs.enqueue(conn, {}, kind=KIND, after=[first.id])
    assert done.id not in blocked_ids(conn), "what it waits for is over"


def test_a_continuation_is_blocked_until_the_job_it_continues_ends_even_cancelled(
    conn: psycopg.Connection, tmp_path
) -> None:
    host = claude_jobs.enqueue(conn, {"prompt": "first", "cwd": str(tmp_path)})
    conn.execute("UPDATE claude_jobs SET session_id = 's' WHERE id = %s", (host.id,))
    then = claude_jobs.enqueue(conn, {"prompt": "then"}, continue_from=host.id)
    assert then.id in blocked_ids(conn)
    claude_jobs.cancel_jobs(conn, [host.id])
    assert then.id not in blocked_ids(conn)


def test_cancelling_or_purging_the_job_holding_a_key_lets_the_next_through(
    conn: psycopg.Connection,
) -> None:
    head = claude_jobs.enqueue(conn, {}, kind=KIND, concurrency_key="repo", queue="a")
    ids = enqueue_keyed(conn, 3, queue="b")
    assert blocked_ids(conn) == set(ids)
    claude_jobs.cancel_jobs(conn, [head.id])
    assert blocked_ids(conn) == set(ids[1:])
    assert claude_jobs.purge_queue(conn, "b", batch=1) == 3
    assert not blocked_ids(conn)
    claude_jobs.enqueue(conn, {}, kind=KIND, concurrency_key="repo", queue="c")
    again = enqueue_keyed(conn, 2, queue="d")
    assert blocked_ids(conn) == set(again)
    claude_jobs.purge_queue(conn, "c")
    assert blocked_ids(conn) == {again[1]}


def test_a_job_nobody_can_run_keeps_no_job_of_its_key_waiting(conn: psycopg.Connection) -> None:
    stuck = claude_jobs.enqueue(conn, {}, kind=KIND, concurrency_key="repo", queue="paused")
    claude_jobs.pause_queue(conn, "paused")
    (behind,) = enqueue_keyed(conn, 1, queue="served")
    assert blocked_ids(conn) == {behind}  # (marked at enqueue: it has a job ahead)
    assert claude_jobs._db_unblock_all(conn) == 1  # the janitor's pass
    assert not blocked_ids(conn)
    assert status_of(conn, stuck.id) == "queued"


def test_a_job_retried_with_the_job_it_waits_for_stays_blocked_until_that_one_succeeds(
    conn: psycopg.Connection, worker_id: uuid.UUID
) -> None:
    first = claude_jobs.enqueue(conn, {}, kind=KIND, max_attempts=1)
    then = claude_jobs.enqueue(conn, {}, kind=KIND, after=[first.id])
    (row,) = claim(conn, worker_id)
    finish(conn, row, Outcome(Verdict.FAILED, error="boom", permanent=True))
    claude_jobs._db_cancel_blocked(conn)
    assert status_of(conn, then.id) == "cancelled"
    claude_jobs.retry_jobs(conn, [first.id, then.id])
    assert blocked_ids(conn) == {then.id}
    (row,) = claim(conn, worker_id)
    finish(conn, row)
    assert not blocked_ids(conn)
    assert [row["id"] for row in claim(conn, worker_id)] == [then.id]


def test_a_job_recovered_as_failed_lets_the_next_of_its_key_through(
    conn: psycopg.Connection, worker_id: uuid.UUID
) -> None:
    ids = enqueue_keyed(conn, 3, max_attempts=1)
    claim(conn, worker_id)
    conn.execute("DELETE FROM claude_jobs_workers")  # its worker is gone
    register_worker(conn)  # (the one that recovers its jobs)
    assert [job["status"] for job in claude_jobs._db_recover_orphans(conn)] == ["failed"]
    assert blocked_ids(conn) == {ids[2]}


def test_the_janitors_check_unblocks_what_two_transactions_at_once_left_behind(
    conn: psycopg.Connection, db_url: str, worker_id: uuid.UUID
) -> None:
    """A job enqueued while the last running job of its key ends, each transaction seeing
    the other not done yet, is left blocked with nothing running; the janitor's check finds
    it. So does a job waiting for one ended by hand."""
    enqueue_keyed(conn, 1)
    (row,) = claim(conn, worker_id)
    with psycopg.connect(db_url) as other:  # a transaction, open until the block's end
        (late,) = enqueue_keyed(other, 1)
        finish(conn, row)
    assert blocked_ids(conn) == {late}, "nothing unblocked it"
    ids = enqueue_keyed(conn, 2, concurrency_key="other")
    claude_jobs.enqueue(conn, {}, kind=KIND, after=[ids[0]])
    conn.execute("UPDATE claude_jobs SET status = 'succeeded' WHERE id = %s", (ids[0],))
    assert claude_jobs._db_unblock_all(conn) == 3
    assert blocked_ids(conn) == set()
    assert claude_jobs._db_unblock_all(conn) == 0


def test_a_worker_runs_a_keyed_batch_and_a_blocked_chain_to_the_end(
    conn: psycopg.Connection, db_url: str, start_worker
) -> None:
    conn.execute(handlers.EXECUTIONS_TABLE)
    ids = claude_jobs.enqueue_many(
        conn, [{"sleep": 0.05}] * 30, kind="record", concurrency_key="repo"
    )
    chained = claude_jobs.enqueue_many(conn, [{}] * 10, kind="record", after=[ids[-1]])
    assert len(blocked_ids(conn)) == 39
    start_worker("--import", "handlers", "--concurrency", "4", RECORD_URL=db_url)
    wait_for(
        lambda: all(status_of(conn, i) == "succeeded" for i in ids + chained),
        timeout=60,
        what="every job to succeed",
    )
    spans = conn.execute(
        "SELECT started, finished FROM executions WHERE job_id = ANY(%s) ORDER BY started",
        (ids,),
    ).fetchall()
    assert len(spans) == 30
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), "one at a time"


# -- plans that hold whatever the table's history ------------------------------------------------


def _plan_faults(node: dict[str, Any], repeated: bool = False) -> list[str]:
    """What is wrong in a plan for a worker: a sequential scan of the jobs, or a scan of them
    without an index condition where it runs again and again (in a subplan, or on the inner
    side of a nested loop): a walk of the whole backlog per row, which the plan of a statement
    prepared while the queue was nearly empty made of a burst of thousands."""
    faults = []
    scan, relation = node.get("Node Type", ""), node.get("Relation Name")
    if relation == "claude_jobs" and scan == "Seq Scan":
        faults.append(f"a sequential scan of the jobs ({node.get('Filter', '')})")
    elif relation == "claude_jobs" and repeated and "Index Cond" not in node:
        faults.append(f"{scan} of {node.get('Index Name')} without a condition, again and again")
    for number, child in enumerate(node.get("Plans", [])):
        again = (
            repeated
            or child.get("Parent Relationship") == "SubPlan"
            or (node.get("Node Type") == "Nested Loop" and number == 1)
        )
        faults += _plan_faults(child, again)
    return faults


def _prepared_plans(conn: psycopg.Connection) -> dict[str, dict[str, Any]]:
    """The plans this connection's prepared statements run now (the cached generic ones), by
    the name their text's first comment gives them."""
    plans = {}
    for name, text, types in conn.execute(
        "SELECT name, statement, parameter_types FROM pg_prepared_statements"
    ).fetchall():
        purpose = text.strip().removeprefix("-- ").split(":")[0]
        arguments = f"({', '.join(['NULL'] * len(types))})" if types else ""
        plan = conn.execute(f"EXPLAIN (FORMAT JSON) EXECUTE {name}{arguments}").fetchone()[0]
        plans[purpose] = plan[0]["Plan"]
    return plans


def test_the_plans_a_warm_worker_prepared_on_an_empty_queue_serve_a_burst(
    conn: psycopg.Connection, worker_id: uuid.UUID, db_url: str
) -> None:
    """A worker's statements run as generic plans, made from the statistics of the moment they
    were prepared: a worker that ran a few jobs while the queue was nearly empty must still
    claim, record, unblock and sweep a burst of 20,000 by index, row by row."""
    conn.execute("ALTER TABLE claude_jobs SET (autovacuum_enabled = false)")  # (no analysis)
    with psycopg.connect(db_url, autocommit=True) as warm:
        claude_jobs._configure_worker_connection(warm)
        for _ in range(7):  # (psycopg prepares a statement on its fifth run)
            claude_jobs.enqueue_many(conn, [{"n": 1}, {"n": 2}], kind=KIND)
            for row in claim(warm, worker_id):
                finish(warm, row)
            claude_jobs._db_cancel_blocked(warm)
        first = claude_jobs.enqueue(conn, {"n": 0}, kind=KIND)
        claude_jobs.enqueue_many(conn, [{"n": n} for n in range(20_000)], kind=KIND)
        claude_jobs.enqueue_many(conn, [{"n": n} for n in range(2_000)], kind=KIND,
                                 after=[first.id])  # fmt: skip
        plans = _prepared_plans(warm)
        assert {"claim", "record", "unblock", "cancel_blocked"} <= set(plans)
        faults = {name: found for name, plan in plans.items() if (found := _plan_faults(plan))}
        assert faults == {}
        assert len(claim(warm, worker_id)) == 10


def test_the_statistics_are_refreshed_for_each_burst_not_only_the_first(
    conn: psycopg.Connection,
) -> None:
    """The janitor analyzes the table when the backlog outgrows what the statistics believe
    tenfold; once a burst has drained, what it analyzed then must not hold off the next."""
    conn.execute("ALTER TABLE claude_jobs SET (autovacuum_enabled = false)")  # (no analysis)
    refresh = claude_jobs._db_refresh_statistics
    assert refresh(conn, None) == (None, False)  # (nothing queued)
    claude_jobs.enqueue_many(conn, [{"n": n} for n in range(2_000)], kind=KIND)
    remembered, analyzed = refresh(conn, None)
    assert (remembered, analyzed) == (2_000, True)
    assert refresh(conn, remembered) == (2_000, False)  # (done: the same backlog)
    conn.execute("UPDATE claude_jobs SET status = 'cancelled', finished_at = now()")
    conn.execute("ANALYZE claude_jobs")  # (as autovacuum would, once the burst was over)
    remembered, analyzed = refresh(conn, remembered)  # (the janitor's pass meanwhile)
    assert (remembered, analyzed) == (None, False)
    claude_jobs.enqueue_many(conn, [{"n": n} for n in range(2_000)], kind=KIND)
    assert refresh(conn, remembered) == (2_000, True)
