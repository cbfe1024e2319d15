"""Batches: jobs grouped under a name, whose callbacks are queued exactly once when the last of
them ends (even when the last two end at the same moment in two transactions), with the file
of what each job came to for the callback; and the commands that show and steer them."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import handlers
import psycopg
import pytest
from click.testing import Result
from conftest import LOCAL, claude_runs, fake, wait_for

import claude_jobs


def callbacks(conn: psycopg.Connection, batch: Any) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute(
            "SELECT id, payload, status FROM claude_jobs WHERE callback_of = %s ORDER BY seq",
            (batch,),
        ).fetchall()


def batch_of(conn: psycopg.Connection, job_id: Any) -> Any:
    return conn.execute("SELECT batch_id FROM claude_jobs WHERE id = %s", (job_id,)).fetchone()[0]


def end(url: str, job_id: Any, status: str, ready: threading.Barrier) -> None:
    """End one job in a transaction of its own, at the same moment as the other thread."""
    with psycopg.connect(url, autocommit=True) as conn:
        ready.wait()
        conn.execute(
            "UPDATE claude_jobs SET status = %s, finished_at = now() WHERE id = %s",
            (status, job_id),
        )


@pytest.mark.parametrize("second", ["succeeded", "failed"])
def test_the_last_two_jobs_ending_at_once_queue_the_callbacks_once(
    db_url: str, conn: psycopg.Connection, second: str
) -> None:
    for round in range(150):
        ids = claude_jobs.enqueue_many(
            conn, [{"n": 1}, {"n": 2}], kind="record", batch=f"b{round}",
            on_finish={"then": "finish"}, on_success={"then": "success"},
        )  # fmt: skip
        ready = threading.Barrier(2)
        threads = [
            threading.Thread(target=end, args=(db_url, ids[0], "succeeded", ready)),
            threading.Thread(target=end, args=(db_url, ids[1], second, ready)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        made = [row["payload"] for row in callbacks(conn, batch_of(conn, ids[0]))]
        expected = [{"then": "finish"}] + ([{"then": "success"}] if second == "succeeded" else [])
        assert made == expected, f"round {round}"


def test_two_workers_ending_a_batchs_last_jobs_together_queue_its_callback_once(
    db_url: str, conn: psycopg.Connection, start_worker: Callable[..., Any]
) -> None:
    """Twenty batches of two jobs each, run by two workers of one runner each: each batch's
    two jobs run side by side and end together, recorded by two workers at once."""
    conn.execute(handlers.EXECUTIONS_TABLE)
    for round in range(20):
        claude_jobs.enqueue_many(
            conn, [{"sleep": 0.3}, {"sleep": 0.3}], kind="record", batch=f"b{round}",
            on_finish={"then": "finish"},
        )  # fmt: skip
    for _ in range(2):
        start_worker("--import", "handlers", "--concurrency", "1", RECORD_URL=db_url)
    wait_for(
        lambda: conn.execute("SELECT count(*) FROM executions").fetchone() == (60,),
        timeout=90,
        what="40 jobs and 20 callbacks to run",
    )
    per_batch = conn.execute(
        "SELECT (SELECT count(*) FROM claude_jobs c WHERE c.callback_of = b.id), "
        "(SELECT count(DISTINCT j.worker) FROM claude_jobs j WHERE j.batch_id = b.id) "
        "FROM claude_jobs_batches b"
    ).fetchall()
    assert len(per_batch) == 20
    assert all(callbacks == 1 for callbacks, _ in per_batch)
    assert any(workers == 2 for _, workers in per_batch)  # (ended on two workers)


def test_a_job_added_as_the_last_one_ends_keeps_the_batch_open(conn: psycopg.Connection) -> None:
    [first] = claude_jobs.enqueue_many(
        conn, [{"n": 1}], kind="record", batch="b", on_finish={"then": "finish"}
    )
    conn.autocommit = False
    late = claude_jobs.enqueue(conn, {"n": 2}, kind="record", batch="b")  # (not committed)
    ender = threading.Thread(
        target=lambda: claude_jobs.cancel_job(
            psycopg.connect(conn.info.dsn, autocommit=True), first
        )
    )
    ender.start()
    ender.join(0.5)
    assert ender.is_alive()  # it waits for the enqueue: the batch is locked by it
    conn.commit()
    ender.join(10)
    conn.autocommit = True
    batch = claude_jobs.get_batch(conn, "b")
    assert batch.finished_at is None and batch.counts == {"queued": 1, "cancelled": 1}
    claude_jobs.cancel_job(conn, late.id)
    batch = claude_jobs.get_batch(conn, "b")
    assert batch.finished_at is not None and len(batch.callbacks) == 1


def test_an_enqueue_joins_the_open_batch_and_a_finished_one_makes_a_new(
    conn: psycopg.Connection,
) -> None:
    one = claude_jobs.enqueue(conn, {"n": 1}, kind="record", batch="nightly")
    two = claude_jobs.enqueue_many(conn, [{"n": 2}, {"n": 3}], kind="record", batch="nightly")
    assert {batch_of(conn, one.id)} == {batch_of(conn, two[0]), batch_of(conn, two[1])}
    claude_jobs.cancel_batch(conn, "nightly")
    three = claude_jobs.enqueue(conn, {"n": 4}, kind="record", batch="nightly")
    assert batch_of(conn, three.id) != batch_of(conn, one.id)
    assert [b.jobs for b in claude_jobs.list_batches(conn)] == [1, 3]
    assert claude_jobs.get_batch(conn, "nightly").id == batch_of(conn, three.id)  # the open one


def test_batch_retry_reopens_it_and_its_callbacks_come_again(conn: psycopg.Connection) -> None:
    ids = claude_jobs.enqueue_many(
        conn, [{"n": 1}, {"n": 2}], kind="record", batch="b", on_finish={"then": "finish"}
    )
    conn.execute("UPDATE claude_jobs SET status = 'failed' WHERE id = %s", (ids[0],))
    conn.execute("UPDATE claude_jobs SET status = 'succeeded' WHERE id = %s", (ids[1],))
    batch = claude_jobs.get_batch(conn, "b")
    assert batch.finished_at is not None and batch.counts == {"failed": 1, "succeeded": 1}
    assert claude_jobs.retry_batch(conn, "b") == [ids[0]]
    assert claude_jobs.get_batch(conn, "b").finished_at is None
    with pytest.raises(claude_jobs.WrongState, match="has no failed job"):
        claude_jobs.retry_batch(conn, "b")
    conn.execute("UPDATE claude_jobs SET status = 'succeeded' WHERE id = %s", (ids[0],))
    assert len(claude_jobs.get_batch(conn, "b").callbacks) == 2


def test_retry_of_a_job_of_a_finished_batch_reopens_it_as_batch_retry_does(
    conn: psycopg.Connection, invoke: Callable[..., Any]
) -> None:
    ids = claude_jobs.enqueue_many(
        conn, [{"n": 1}, {"n": 2}], kind="record", batch="b", on_finish={"then": "finish"},
        on_success={"then": "success"},
    )  # fmt: skip
    conn.execute(
        "UPDATE claude_jobs SET status = 'failed', finished_at = now() WHERE id = %s", (ids[0],)
    )
    conn.execute(
        "UPDATE claude_jobs SET status = 'succeeded', finished_at = now() WHERE id = %s", (ids[1],)
    )
    assert [c["payload"] for c in callbacks(conn, batch_of(conn, ids[0]))] == [{"then": "finish"}]
    result = invoke("retry", str(ids[0]))
    assert result.exit_code == 0, result.output
    batch = claude_jobs.get_batch(conn, "b")
    assert batch.finished_at is None and batch.counts == {"queued": 1, "succeeded": 1}
    assert "1 of 2 ended" in invoke("batch", "show", "b").output
    conn.execute(
        "UPDATE claude_jobs SET status = 'succeeded', finished_at = now() WHERE id = %s", (ids[0],)
    )
    batch = claude_jobs.get_batch(conn, "b")
    made = [c["payload"] for c in callbacks(conn, batch.id)]
    assert made == [{"then": "finish"}, {"then": "finish"}, {"then": "success"}]
    assert batch.finished_at is not None and batch.finished_at >= batch.ended_at
    # (another batch of its name open: a retry would reopen a second one; nothing happens)
    conn.execute(
        "UPDATE claude_jobs SET status = 'failed', finished_at = now() WHERE id = %s", (ids[1],)
    )
    other = claude_jobs.enqueue(conn, {"n": 3}, kind="record", batch="b")
    refused = invoke("retry", str(ids[1]))
    assert refused.exit_code == 1 and "another batch of its name is open" in refused.output
    assert claude_jobs.get_job(conn, ids[1]).status == "failed"
    assert batch_of(conn, other.id) != batch.id


def test_a_retry_as_the_batchs_last_other_job_ends_leaves_the_batch_open(
    conn: psycopg.Connection, db_url: str
) -> None:
    """The job that ends the batch's last other job must see the retried one queued, not
    finish the batch under it (and queue its on-finish) while the retry is not committed."""
    ids = claude_jobs.enqueue_many(
        conn, [{"n": 1}, {"n": 2}], kind="record", batch="b", on_finish={"then": "finish"}
    )
    conn.execute("UPDATE claude_jobs SET status = 'failed', finished_at = now() WHERE id = %s",
                 (ids[0],))  # fmt: skip
    conn.execute("UPDATE claude_jobs SET status = 'running' WHERE id = %s", (ids[1],))
    ended = threading.Event()

    def end_the_other() -> None:
        with psycopg.connect(db_url, autocommit=True) as worker:
            worker.execute("UPDATE claude_jobs SET status = 'succeeded', finished_at = now() "
                           "WHERE id = %s", (ids[1],))  # fmt: skip
        ended.set()

    with psycopg.connect(db_url) as retrying, retrying.transaction():  # (committed at the end)
        assert claude_jobs.retry_jobs(retrying, [ids[0]]) == [ids[0]]
        thread = threading.Thread(target=end_the_other)
        thread.start()

        def waiting() -> bool:  # (for the retry's lock on the batch: what the fix makes it do)
            query = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            return ended.is_set() or conn.execute(query).fetchone()[0] > 0

        wait_for(waiting, what="the worker's end to be written or to wait")
    thread.join(10)
    assert ended.is_set() and claude_jobs.get_job(conn, ids[0]).status == "queued"
    assert claude_jobs.get_batch(conn, "b").finished_at is None
    assert callbacks(conn, batch_of(conn, ids[0])) == []


def test_batch_retry_puts_back_the_newest_of_failed_jobs_sharing_a_unique_key(
    conn: psycopg.Connection,
) -> None:
    ids = claude_jobs.enqueue_many(
        conn, [{"n": 1}, {"n": 2}], kind="record", batch="b", unique_keys=["k", None]
    )  # (the second keeps the batch open)
    conn.execute("UPDATE claude_jobs SET status = 'failed' WHERE id = %s", (ids[0],))
    newer = claude_jobs.enqueue_many(conn, [{"n": 3}], kind="record", batch="b", unique_keys=["k"])
    conn.execute("UPDATE claude_jobs SET status = 'failed' WHERE id = %s", (newer[0],))
    assert batch_of(conn, newer[0]) == batch_of(conn, ids[0])
    assert claude_jobs.retry_batch(conn, "b") == newer


def test_a_claude_callback_reads_what_each_job_came_to(
    db_url: str,
    conn: psycopg.Connection,
    start_worker: Callable[..., Any],
    claude_log: Path,
    tmp_path: Path,
) -> None:
    copy = tmp_path / "seen.jsonl"
    ids = claude_jobs.enqueue_many(
        conn,
        [{"prompt": fake(result="finding A", cost=0.5), "cwd": str(tmp_path)},
         {"prompt": fake(exit=3, stderr="boom"), "cwd": str(tmp_path)}],
        batch="review", max_attempts=1, concurrency_limit=0,
        on_finish={"prompt": fake(copy_results=str(copy)), "cwd": str(tmp_path)},
        on_success={"prompt": "never: one of them failed", "cwd": str(tmp_path)},
    )  # fmt: skip
    start_worker("--concurrency", "2")
    batch_id = batch_of(conn, ids[0])
    wait_for(
        lambda: [row["status"] for row in callbacks(conn, batch_id)] == ["succeeded"],
        timeout=60,
        what="the callback to succeed",
    )
    seen = [json.loads(line) for line in copy.read_text().splitlines()]
    assert [(row["id"], row["status"]) for row in seen] == [
        (str(ids[0]), "succeeded"), (str(ids[1]), "failed"),
    ]  # fmt: skip
    assert seen[0]["result"] == "finding A" and seen[0]["cost_usd"] == 0.5
    assert seen[1]["error"] and seen[0]["prompt"].startswith("FAKE:")
    [run] = [r for r in claude_runs(claude_log) if r["env"]["CLAUDE_JOBS_BATCH_RESULTS"]]
    path = Path(run["env"]["CLAUDE_JOBS_BATCH_RESULTS"])
    prompt = base64.b64decode(run["stdin"]).decode()
    assert f"what each job of the batch came to is in {path}" in prompt
    assert run["argv"][-2:] == ["--add-dir", str(path.parent)]
    assert not path.exists()  # (the worker removed it after the callback)


def test_batch_commands(invoke: Callable[..., Result], conn: psycopg.Connection, tmp_path: Path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"n": 1}\n{"n": 2}\n{"n": 3}\n')
    queued = invoke("enqueue", "--kind", "record", "--import", "handlers", "--file", str(jobs),
                    "--batch", "nightly", "--on-finish", '{"summary": true}')  # fmt: skip
    assert queued.exit_code == 0, queued.output
    ids = queued.stdout.split()
    conn.execute("UPDATE claude_jobs SET status = 'failed', cost_usd = 0.25 WHERE id = %s",
                 (ids[0],))  # fmt: skip
    listed = invoke("batch", "list")
    assert "nightly  1/3    2 queued, 1 failed  $0.25" in listed.stdout, listed.stdout
    shown = invoke("batch", "show", "nightly")
    assert "progress:   1 of 3 ended: 2 queued, 1 failed" in shown.stdout
    assert ids[1][:8] in shown.stdout and 'on finish:  {"summary": true}' in shown.stdout
    assert "open batches:" in invoke("stats").stdout
    only = invoke("list", "--batch", "nightly", "--status", "failed", "--json")
    assert [json.loads(line)["id"] for line in only.stdout.splitlines()] == [ids[0]]
    cancelled = invoke("batch", "cancel", "nightly")
    assert cancelled.stdout == "cancelled 2 queued job(s); stopping 0 running\n"
    batch = json.loads(invoke("batch", "show", "nightly", "--json").stdout)
    assert batch["finished_at"] and len(batch["callbacks"]) == 1
    retried = invoke("batch", "retry", batch["id"][:8])
    assert retried.stdout == "retrying 1 failed job(s)\n"
    missing = invoke("batch", "show", "nope")
    assert missing.exit_code == 1 and "no batch 'nope'" in missing.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--on-finish", "{}"], "--on-finish is a batch's callback: give --batch"),
        (["--batch", "b", "--on-finish", "[1]"], "must be a JSON object, not an array"),
        (["--batch", "b", "--on-finish", "{nope"], "it is not valid JSON"),
        (["--batch", "b", "--on-success", '{"prompt": 1}'], "on_success: a claude job needs"),
        (["--batch", " "], "invalid batch name"),
    ],
)
def test_bad_batch_options_exit_2_and_change_nothing(
    invoke: Callable[..., Result], conn: psycopg.Connection, args: list[str], message: str
) -> None:
    result = invoke("enqueue", "review this", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.splitlines()) == 1
    assert conn.execute("SELECT count(*) FROM claude_jobs").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM claude_jobs_batches").fetchone() == (0,)


def test_batches_over_http(db_url: str, conn: psycopg.Connection) -> None:
    from starlette.testclient import TestClient

    ids = claude_jobs.enqueue_many(conn, [{"n": 1}, {"n": 2}], kind="record", batch="b")
    with TestClient(claude_jobs.web_app(db_url), base_url=LOCAL) as client:
        [listed] = client.get("/api/batches").json()
        assert (listed["name"], listed["jobs"], listed["ended"]) == ("b", 2, 0)
        assert client.get("/api/batches/b").json()["counts"] == {"queued": 2}
        page = client.get("/api/jobs", params={"batch": "b"}).json()
        assert {job["id"] for job in page["jobs"]} == {str(i) for i in ids}
        cancelled = client.post("/api/batches/b/cancel").json()
        assert sorted(cancelled["cancelled"]) == sorted(map(str, ids))
        relative = {"payload": {"prompt": "x", "cwd": "/"}, "batch": "c",
                    "on_finish": {"prompt": "summarise", "cwd": "."}}  # fmt: skip
        refused = client.post("/api/jobs", json=relative)
        assert refused.status_code == 422
        assert 'the "cwd" of on_finish must be an absolute path' in refused.json()["error"]
        overview = client.get("/api/stats").json()
        assert overview["batches"][0]["finished_at"] is not None


# (a job whose payload has "slow" is inserted or cancelled that many seconds late)
SLOW_WRITES = """
CREATE FUNCTION slow_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.payload ? 'slow' AND NEW.status IN ('queued', 'cancelled') THEN
        PERFORM pg_sleep((NEW.payload->>'slow')::float);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER slow_write BEFORE INSERT OR UPDATE ON claude_jobs
    FOR EACH ROW EXECUTE FUNCTION slow_write();
"""


def waiting(conn: psycopg.Connection, *, on: str) -> int:
    """How many other sessions of this database wait: on="Lock" for a lock, "PgSleep" asleep."""
    return conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND (wait_event_type = %s OR wait_event = %s)",
        (on, on),
    ).fetchone()[0]


def in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``target`` in a thread; what it returned or raised lands in the dict."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = target()
        except BaseException as error:  # (for the test to see)
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_an_enqueue_with_the_unique_key_of_a_batch_job_being_ended_does_not_deadlock(
    db_url: str, conn: psycopg.Connection
) -> None:
    """What ends a batch's job holds the job's row, then waits for the batch; an enqueue into
    that batch with the job's unique key waits for that row (the index decides whether the key
    is free): it must not hold the batch meanwhile, or each waits for the other."""
    holder = claude_jobs.enqueue(
        conn, {"n": 1}, kind="record", unique_key="k", batch="b", on_finish={"then": "finish"}
    )
    first = batch_of(conn, holder.id)
    conn.execute(SLOW_WRITES)

    def enqueue() -> claude_jobs.Job:
        with psycopg.connect(db_url, autocommit=True) as other:
            return claude_jobs.enqueue(
                other, {"slow": 0.5}, kind="record", unique_key="k", batch="b"
            )

    thread, outcome = in_thread(enqueue)
    wait_for(lambda: waiting(conn, on="PgSleep") == 1, what="the enqueue to be inserting")
    with psycopg.connect(db_url) as ender:  # (the worker recording the holder's outcome)
        ender.execute("UPDATE claude_jobs SET status = 'succeeded' WHERE id = %s", (holder.id,))
        wait_for(lambda: waiting(conn, on="Lock") == 1, what="the enqueue to wait for the ender")
        ender.commit()
    thread.join(30)
    assert "error" not in outcome, outcome
    job = outcome["value"]
    assert not job.duplicate and batch_of(conn, job.id) not in (None, first)
    assert claude_jobs.get_batch(conn, first).finished_at is not None
    assert [row["payload"] for row in callbacks(conn, first)] == [{"then": "finish"}]
    assert claude_jobs.get_batch(conn, "b").id == batch_of(conn, job.id)  # (a new one, open)


def cancel(url: str, ids: list[Any]) -> Any:
    with psycopg.connect(url, autocommit=True) as conn:
        return claude_jobs.cancel_jobs(conn, ids)


def succeed(url: str, ids: list[Any]) -> int:
    """End these jobs in one statement, as a worker records outcomes."""
    with psycopg.connect(url, autocommit=True) as conn:
        query = "UPDATE claude_jobs SET status = 'succeeded' WHERE id = ANY(%s)"
        return conn.execute(query, (ids,)).rowcount


def test_cancelling_jobs_of_two_batches_while_a_worker_ends_others_does_not_deadlock(
    db_url: str, conn: psycopg.Connection
) -> None:
    """A cancel of jobs in two batches and a worker recording jobs of both lock the two
    batches in one order: here the cancel's second job is slow to cancel, and the worker
    comes meanwhile."""
    one, two = sorted(
        [claude_jobs.enqueue_many(conn, [{"n": 1}, {"n": 2}], kind="record", batch=name)
         for name in ("x", "y")],
        key=lambda ids: batch_of(conn, ids[0]),
    )  # fmt: skip
    conn.execute("""UPDATE claude_jobs SET payload = '{"slow": 0.5}' WHERE id = %s""", (one[0],))
    conn.execute(SLOW_WRITES)
    canceller = in_thread(partial(cancel, db_url, [two[0], one[0]]))
    wait_for(lambda: waiting(conn, on="PgSleep") == 1, what="the cancel to be at its 2nd job")
    worker = in_thread(partial(succeed, db_url, [one[1], two[1]]))
    for thread, _ in (canceller, worker):
        thread.join(30)
    assert [outcome.get("error") for _, outcome in (canceller, worker)] == [None, None]
    for ids in (one, two):
        assert claude_jobs.get_batch(conn, batch_of(conn, ids[0])).finished_at is not None


def test_enqueuers_to_one_batch_with_the_same_callbacks_do_not_wait_for_each_other(
    db_url: str, conn: psycopg.Connection
) -> None:
    claude_jobs.enqueue(conn, {"n": 0}, kind="record", batch="b", on_finish={"then": "finish"})
    with psycopg.connect(db_url) as open_transaction:  # (a caller's, left open)
        claude_jobs.enqueue(
            open_transaction, {"n": 1}, kind="record", batch="b", on_finish={"then": "finish"}
        )
        thread, outcome = in_thread(
            partial(enqueue_in, db_url, {"n": 2}, batch="b", on_finish={"then": "finish"})
        )
        thread.join(10)
        assert not thread.is_alive() and not outcome["value"].duplicate
        open_transaction.rollback()
    assert claude_jobs.get_batch(conn, "b").counts == {"queued": 2}


def enqueue_in(url: str, payload: dict[str, Any], **settings: Any) -> claude_jobs.Job:
    with psycopg.connect(url, autocommit=True) as conn:
        return claude_jobs.enqueue(conn, payload, kind="record", **settings)


def test_a_duplicate_enqueue_opens_no_batch_and_changes_none(conn: psycopg.Connection) -> None:
    first = claude_jobs.enqueue(conn, {"n": 1}, kind="record", unique_key="k")
    again = claude_jobs.enqueue(
        conn, {"n": 2}, kind="record", unique_key="k", batch="b", on_finish={"then": "finish"}
    )
    assert again.duplicate and again.id == first.id
    many = claude_jobs.enqueue_many(conn, [{"n": 3}], kind="record", unique_keys=["k"], batch="b")
    assert many == [first.id] and many.duplicates == [0]
    assert conn.execute("SELECT count(*) FROM claude_jobs_batches").fetchone() == (0,)
    claude_jobs.enqueue(conn, {"n": 4}, kind="record", batch="b", on_finish={"then": "one"})
    claude_jobs.enqueue(
        conn, {"n": 5}, kind="record", unique_key="k", batch="b", on_finish={"then": "two"}
    )
    assert claude_jobs.get_batch(conn, "b").on_finish == {"then": "one"}  # (a duplicate's: not)


def test_a_batch_whose_last_jobs_are_purged_finishes_without_its_success_callback(
    invoke: Callable[..., Result], conn: psycopg.Connection
) -> None:
    ids = claude_jobs.enqueue_many(
        conn, [{"n": 1}, {"n": 2}, {"n": 3}], kind="record", batch="b", queue="work",
        on_finish={"then": "finish"}, on_success={"then": "success"},
    )  # fmt: skip
    conn.execute("UPDATE claude_jobs SET status = 'succeeded' WHERE id = %s", (ids[0],))
    conn.execute("UPDATE claude_jobs SET status = 'running' WHERE id = %s", (ids[1],))
    assert claude_jobs.purge_queue(conn, "work") == 1  # (the queued one)
    batch = claude_jobs.get_batch(conn, "b")
    assert batch.finished_at is None and batch.purged == 1
    conn.execute("UPDATE claude_jobs SET status = 'succeeded' WHERE id = %s", (ids[1],))
    batch = claude_jobs.get_batch(conn, batch.id)  # (every job left succeeded: not all did)
    assert batch.finished_at is not None
    assert [row["payload"] for row in callbacks(conn, batch.id)] == [{"then": "finish"}]
    assert "purged:     1 job(s), deleted before they ran" in invoke("batch", "show", "b").stdout
    claude_jobs.cancel_job(conn, batch.callbacks[0])
    # purged whole, in the callback's queue: the callback it queues is not purged with it
    whole = claude_jobs.enqueue_many(
        conn, [{"n": 4}, {"n": 5}], kind="record", batch="d", queue="work",
        on_finish={"then": "finish d"},
    )  # fmt: skip
    assert claude_jobs.purge_queue(conn, "work") == 2
    [callback] = callbacks(conn, batch_of_name(conn, "d"))
    assert callback["status"] == "queued" and not set(whole) & {callback["id"]}
    claude_jobs.cancel_job(conn, callback["id"])
    more = claude_jobs.enqueue_many(conn, [{"n": 4}], kind="record", batch="c", queue="work",
                                    on_finish={"then": "finish c"})  # fmt: skip
    conn.execute("DELETE FROM claude_jobs WHERE id = %s", (more[0],))  # (by hand, as purge)
    assert [row["payload"] for row in callbacks(conn, batch_of_name(conn, "c"))] == [
        {"then": "finish c"}
    ]


def batch_of_name(conn: psycopg.Connection, name: str) -> Any:
    return conn.execute("SELECT id FROM claude_jobs_batches WHERE name = %s", (name,)).fetchone()[0]


def test_cleanup_forgets_finished_batches_with_no_job_left(conn: psycopg.Connection) -> None:
    ids = claude_jobs.enqueue_many(conn, [{"n": 1}], kind="record", batch="old")
    claude_jobs.enqueue_many(conn, [{"n": 2}], kind="record", batch="open")
    conn.execute(
        "UPDATE claude_jobs SET status = 'succeeded', finished_at = now() - interval '2 days' "
        "WHERE id = %s",
        (ids[0],),
    )
    conn.execute("UPDATE claude_jobs_batches SET finished_at = now() - interval '2 days'"
                 " WHERE name = 'old'")  # fmt: skip
    assert claude_jobs.cleanup_jobs(conn, 86400) == 1
    assert [b.name for b in claude_jobs.list_batches(conn)] == ["open"]
