"""The worker: claim order, NOTIFY wake-up, retries and backoff, permanent failures, kinds,
exactly-once across processes, crash recovery, shutdown, and losing the database."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import claude_runs, fake, job_row, pid_alive, status_of, wait_for
from handlers import EXECUTIONS_TABLE
from tcp_proxy import TcpProxy

import claude_jobs
from claude_jobs import PermanentError, Worker

ran: list[str] = []


@claude_jobs.handler("note")
def note(job: claude_jobs.Job) -> dict[str, Any]:
    ran.append(job.payload["name"])
    return {"noted": job.payload["name"]}


@claude_jobs.handler("flaky")
def flaky(job: claude_jobs.Job) -> None:
    raise RuntimeError(f"attempt {job.attempts} broke")


@claude_jobs.handler("doomed")
def doomed(job: claude_jobs.Job) -> None:
    raise PermanentError("this can never work")


@claude_jobs.handler("unhandled")
def unhandled(job: claude_jobs.Job) -> None:
    raise AssertionError("no worker in these tests runs this kind")


@pytest.fixture(autouse=True)
def clear_ran() -> None:
    ran.clear()


class Running:
    """A Worker running in a thread of this process."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.thread = threading.Thread(target=worker.run, name="test-worker")
        self.thread.start()
        wait_for(lambda: worker.id is not None, what="the worker to register")

    def stop(self, force: bool = False) -> None:
        self.worker.stop(force)
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture
def run_worker(db_url: str) -> Iterator[Any]:
    running: list[Running] = []

    def start(**options: Any) -> Running:
        options.setdefault("handlers", {"note": note})
        running.append(Running(Worker(db_url, **options)))
        return running[-1]

    yield start
    for each in running:
        each.stop(force=True)


def test_claims_earlier_queues_first_then_priority_then_run_at(
    conn: psycopg.Connection, db_url: str
) -> None:
    now = datetime.now(UTC)
    for name, queue, priority, age in [
        ("low-old", "low", 0, 30),
        ("high-p0-new", "high", 0, 1),
        ("high-p0-old", "high", 0, 20),
        ("high-p5", "high", 5, 0),
        ("low-p9", "low", 9, 0),
        ("other", "other", 100, 100),
    ]:
        claude_jobs.enqueue(
            conn,
            {"name": name},
            kind="note",
            queue=queue,
            priority=priority,
            run_at=now - timedelta(seconds=age),
        )
    with Worker(db_url, queues="high,low", concurrency=1, handlers={"note": note}) as worker:
        while worker.run_once():
            pass
    assert ran == ["high-p5", "high-p0-old", "high-p0-new", "low-p9", "low-old"]
    assert conn.execute("SELECT status FROM claude_jobs WHERE queue = 'other'").fetchone() == (
        "queued",
    )


def test_a_job_is_not_claimed_before_its_run_at(conn: psycopg.Connection, run_worker) -> None:
    job = claude_jobs.enqueue(conn, {"name": "later"}, kind="note", delay=1.5)
    run_worker(poll_interval=60)
    wait_for(lambda: status_of(conn, job.id) == "succeeded", what="the delayed job to run")
    row = job_row(conn, job.id)
    assert row["started_at"] >= row["run_at"]


def test_an_idle_worker_wakes_on_notify_not_polling(conn: psycopg.Connection, run_worker) -> None:
    run_worker(poll_interval=60)
    time.sleep(0.3)  # let it go idle: its next poll is a minute away
    job = claude_jobs.enqueue(conn, {"name": "now"}, kind="note")
    wait_for(lambda: status_of(conn, job.id) == "succeeded", timeout=10, what="NOTIFY wake-up")


def test_failed_attempts_retry_with_backoff_then_fail_keeping_every_error(
    conn: psycopg.Connection, run_worker
) -> None:
    job = claude_jobs.enqueue(conn, {}, kind="flaky", max_attempts=3)
    run_worker(handlers={"flaky": flaky}, backoff_base=0.4, backoff_max=10, poll_interval=60)
    wait_for(lambda: status_of(conn, job.id) == "failed", what="the job to fail")
    row = job_row(conn, job.id)
    assert row["attempts"] == 3
    assert [e["error"] for e in row["errors"]] == [
        f"RuntimeError: attempt {n} broke" for n in (1, 2, 3)
    ]
    assert row["last_error"] == "RuntimeError: attempt 3 broke"
    assert "Traceback" in row["errors"][0]["traceback"]
    times = [datetime.fromisoformat(e["at"]) for e in row["errors"]]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert gaps[0] >= 0.4 and gaps[1] >= 0.8  # base * 2^(attempt-1), plus jitter


def test_backoff_doubles_up_to_the_maximum_with_jitter() -> None:
    for attempt, expected in [(1, 5), (2, 10), (3, 20), (7, 300), (50, 300), (10**6, 300)]:
        delay = claude_jobs.backoff_delay(attempt, 5, 300)
        assert expected <= delay <= expected * 1.1


def test_a_permanent_error_fails_at_once(conn: psycopg.Connection, run_worker) -> None:
    job = claude_jobs.enqueue(conn, {}, kind="doomed", max_attempts=5)
    run_worker(handlers={"doomed": doomed})
    wait_for(lambda: status_of(conn, job.id) == "failed", what="the job to fail")
    row = job_row(conn, job.id)
    assert row["attempts"] == 1
    assert row["errors"][0]["permanent"] is True
    assert row["last_error"] == "this can never work"


def test_a_worker_claims_only_kinds_it_has_a_handler_for(
    conn: psycopg.Connection, db_url: str
) -> None:
    mine = claude_jobs.enqueue(conn, {"name": "mine"}, kind="note")
    other = claude_jobs.enqueue(conn, {}, kind="unhandled", priority=10)
    Worker(db_url, burst=True, handlers={"note": note}).run()
    assert status_of(conn, mine.id) == "succeeded"
    assert job_row(conn, other.id)["status"] == "queued"
    assert job_row(conn, other.id)["attempts"] == 0


def test_the_result_of_a_handler_is_stored(conn: psycopg.Connection, db_url: str) -> None:
    job = claude_jobs.enqueue(conn, {"name": "x"}, kind="note")
    Worker(db_url, burst=True, handlers={"note": note}).run()
    assert job_row(conn, job.id)["result"] == {"noted": "x"}


def test_a_result_that_is_not_json_fails_the_job(conn: psycopg.Connection, db_url: str) -> None:
    job = claude_jobs.enqueue(conn, {"name": "x"}, kind="note")
    Worker(db_url, burst=True, handlers={"note": lambda job: {"when": object()}}).run()
    row = job_row(conn, job.id)
    assert row["status"] == "failed"
    assert "not JSON" in row["last_error"]


def test_payloads_jsonb_cannot_hold_are_refused_at_enqueue(conn: psycopg.Connection) -> None:
    cyclic: dict[str, Any] = {}
    cyclic["a"] = cyclic["b"] = cyclic
    for payload, message in [
        ({"n": float("nan")}, "NaN or Infinity"),
        ({"text": "a\x00b"}, "NUL character"),
        ({"text": "\ud800"}, "not valid Unicode"),
        ({"when": object()}, "not JSON"),
        (cyclic, "nests more than 64 levels deep"),
    ]:
        with pytest.raises(claude_jobs.InvalidJob, match=message):
            claude_jobs.enqueue(conn, payload, kind="note")
        with pytest.raises(claude_jobs.InvalidJob, match=f"job 2: .*{message}"):
            claude_jobs.enqueue_many(conn, [{"fine": 1}, payload], kind="note")
    assert conn.execute("SELECT count(*) FROM claude_jobs").fetchone() == (0,)


def test_enqueue_commits_and_rolls_back_with_the_callers_transaction(
    postgresql: psycopg.Connection,
) -> None:
    postgresql.autocommit = False
    rolled_back = claude_jobs.enqueue(postgresql, {"prompt": "never"})
    postgresql.rollback()
    kept = claude_jobs.enqueue(postgresql, {"prompt": "kept"})
    many = claude_jobs.enqueue_many(postgresql, [{"prompt": "a"}, {"prompt": "b"}])
    postgresql.commit()
    ids = {row[0] for row in postgresql.execute("SELECT id FROM claude_jobs")}
    assert ids == {kept.id, *many}
    assert rolled_back.id not in ids


def test_stop_is_thread_safe_and_run_returns(db_url: str) -> None:
    worker = Worker(db_url, handlers={"note": note}, poll_interval=60)
    thread = threading.Thread(target=worker.run)
    thread.start()
    wait_for(lambda: worker.id is not None, what="registration")
    worker.stop()
    thread.join(10)
    assert not thread.is_alive()


def test_workers_register_and_remove_themselves(conn: psycopg.Connection, run_worker) -> None:
    running = run_worker(queues="a,b", concurrency=3)
    rows = conn.execute("SELECT host, pid, queues, concurrency FROM claude_jobs_workers")
    host, pid, queues, concurrency = rows.fetchone()
    assert (queues, concurrency) == (["a", "b"], 3)
    assert f"{host}:{pid}" == running.worker.name
    running.stop()
    assert conn.execute("SELECT count(*) FROM claude_jobs_workers").fetchone() == (0,)


def test_exactly_once_with_four_worker_processes(
    conn: psycopg.Connection, db_url: str, start_worker
) -> None:
    conn.execute(EXECUTIONS_TABLE)
    ids = claude_jobs.enqueue_many(conn, [{"n": n} for n in range(2000)], kind="record")
    workers = [
        start_worker("--import", "handlers", "--concurrency", "8", RECORD_URL=db_url)
        for _ in range(4)
    ]

    def finished() -> bool:
        counts = conn.execute("SELECT count(*) FROM claude_jobs WHERE status = 'succeeded'")
        return counts.fetchone()[0] == len(ids)

    wait_for(finished, timeout=90, what="all jobs to succeed")
    runs = conn.execute(
        "SELECT job_id, count(*), count(DISTINCT pid) FROM executions GROUP BY job_id"
    ).fetchall()
    assert len(runs) == len(ids)
    assert {count for _, count, _ in runs} == {1}
    pids = conn.execute("SELECT count(DISTINCT pid) FROM executions").fetchone()[0]
    assert pids >= 2, "the jobs were shared between processes"
    for worker in workers:
        worker.signal(signal.SIGTERM)
    assert [worker.wait() for worker in workers] == [0, 0, 0, 0]


def test_jobs_of_a_worker_killed_with_sigkill_are_recovered_within_10s(
    conn: psycopg.Connection, start_worker, claude_log, tmp_path
) -> None:
    jobs = [
        claude_jobs.enqueue(
            conn,
            {"prompt": fake(sleep=600, child=True), "cwd": str(tmp_path)},
            concurrency_limit=0,  # all five at once in one directory
        )
        for _ in range(5)
    ]
    doomed = start_worker("--concurrency", "5")
    runs = wait_for(lambda: len(claude_runs(claude_log)) == 5 and claude_runs(claude_log),
                    what="5 claude processes")  # fmt: skip
    conn.execute(  # when run again, the jobs finish at once
        "UPDATE claude_jobs SET payload = jsonb_set(payload, '{prompt}', %s)",
        [psycopg.types.json.Jsonb(fake(sleep=0))],
    )
    survivor = start_worker("--concurrency", "5")
    survivor.wait_for_log("started")
    doomed.signal(signal.SIGKILL)
    killed_at = time.monotonic()

    def all_succeeded() -> bool:
        done = conn.execute("SELECT count(*) FROM claude_jobs WHERE status = 'succeeded'")
        return done.fetchone()[0] == 5

    wait_for(all_succeeded, what="the survivor to finish every job")
    recovered_after = time.monotonic() - killed_at
    assert recovered_after < 10, f"recovery took {recovered_after:.1f}s"
    for job in jobs:
        row = job_row(conn, job.id)
        assert row["attempts"] == 2
        assert row["errors"][0]["error"].startswith("interrupted: worker")
    leftovers = [pid for run in runs for pid in (run["pid"], run["child"]) if pid_alive(pid)]
    assert leftovers == [], "processes of the killed worker's jobs outlived its recovery"
    assert "recovered" in survivor.log()


def test_a_killed_worker_is_listed_lost_at_once_and_for_a_while_after_its_recovery(
    conn: psycopg.Connection, start_worker, claude_log, invoke, tmp_path
) -> None:
    job = claude_jobs.enqueue(conn, {"prompt": fake(sleep=600), "cwd": str(tmp_path)})
    doomed = start_worker("--concurrency", "1")
    wait_for(lambda: status_of(conn, job.id) == "running", what="the job to start")
    (row,) = claude_jobs.list_workers(conn)
    survivor = start_worker("--concurrency", "1", "--queues", "elsewhere")
    survivor.wait_for_log("started")
    doomed.signal(signal.SIGKILL)
    killed_at = time.monotonic()

    def state() -> str | None:
        return next((w["state"] for w in claude_jobs.list_workers(conn) if w["id"] == row["id"]),
                    None)  # fmt: skip

    wait_for(lambda: state() == "lost", 5, "the killed worker to be listed lost")
    assert time.monotonic() - killed_at < 3  # (its session is gone: lost before its heartbeat ages)
    wait_for(lambda: status_of(conn, job.id) == "queued", 15, "its job to go back")
    time.sleep(1.0)  # (long after its recovery, it is still listed)
    lost = next(w for w in claude_jobs.list_workers(conn) if w["id"] == row["id"])
    assert (lost["state"], lost["recovered"], lost["running"]) == ("lost", 1, 0)
    assert lost["lost_because"].startswith("its session ended")
    table = invoke("workers").output
    assert "lost" in table and "1 running job(s) went back" in table
    assert json.loads(invoke("workers", "--json").output.splitlines()[0])["lost_at"] is not None
    families = {family.name: family for family in claude_jobs._prometheus_families(conn)}
    gauge = {s.labels["state"]: s.value for s in families["claude_jobs_workers"].samples}
    assert (gauge["lost"], gauge["alive"]) == (0, 1)  # recovered: no lost worker to alert on


def test_sigterm_stops_claiming_and_lets_running_jobs_finish(
    conn: psycopg.Connection, start_worker, claude_log, tmp_path
) -> None:
    running = claude_jobs.enqueue(conn, {"prompt": fake(sleep=2), "cwd": str(tmp_path)})
    worker = start_worker()
    wait_for(lambda: status_of(conn, running.id) == "running", what="the job to start")
    worker.signal(signal.SIGTERM)
    worker.wait_for_log("stopping: waiting for 1 running job(s)")
    assert "a second Ctrl-C (or SIGTERM) stops them now" in worker.log()
    later = claude_jobs.enqueue(conn, {"prompt": "not now", "cwd": str(tmp_path)})
    assert worker.wait() == 0
    assert status_of(conn, running.id) == "succeeded"
    assert job_row(conn, later.id)["attempts"] == 0
    assert conn.execute("SELECT count(*) FROM claude_jobs_workers").fetchone() == (0,)


def test_a_second_signal_kills_claude_process_groups_and_puts_jobs_back_unspent(
    conn: psycopg.Connection, start_worker, claude_log, tmp_path
) -> None:
    job = claude_jobs.enqueue(conn, {"prompt": fake(sleep=600, child=True), "cwd": str(tmp_path)})
    worker = start_worker()
    run = wait_for(lambda: claude_runs(claude_log), what="claude to start")[0]
    worker.signal(signal.SIGTERM)
    worker.wait_for_log("stopping: waiting")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0
    row = job_row(conn, job.id)
    assert (row["status"], row["attempts"], row["worker_id"]) == ("queued", 0, None)
    wait_for(
        lambda: not pid_alive(run["pid"]) and not pid_alive(run["child"]),
        timeout=5,
        what="claude and its child to be gone",
    )
    assert "released" in worker.log()


def test_the_shutdown_timeout_stops_jobs_that_run_too_long(
    conn: psycopg.Connection, start_worker, claude_log, tmp_path
) -> None:
    job = claude_jobs.enqueue(conn, {"prompt": fake(sleep=600), "cwd": str(tmp_path)})
    worker = start_worker("--shutdown-timeout", "1s")
    wait_for(lambda: status_of(conn, job.id) == "running", what="the job to start")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0
    assert (status_of(conn, job.id), job_row(conn, job.id)["attempts"]) == ("queued", 0)


def test_the_listen_connection_comes_back_after_it_drops(
    conn: psycopg.Connection, run_worker
) -> None:
    running = run_worker(poll_interval=60)
    backend = conn.execute("SELECT backend_pid FROM claude_jobs_workers").fetchone()[0]
    conn.execute("SELECT pg_terminate_backend(%s)", [backend])

    def reconnected() -> bool:
        row = conn.execute("SELECT backend_pid FROM claude_jobs_workers").fetchone()
        return row is not None and row[0] != backend

    wait_for(reconnected, what="the session to reconnect")
    assert running.worker.id == conn.execute("SELECT id FROM claude_jobs_workers").fetchone()[0]
    job = claude_jobs.enqueue(conn, {"name": "after"}, kind="note")
    wait_for(lambda: status_of(conn, job.id) == "succeeded", timeout=10, what="NOTIFY wake-up")


@pytest.fixture
def proxy(pg_server) -> Iterator[TcpProxy]:
    proxy = TcpProxy(f"{pg_server.host}/.s.PGSQL.{pg_server.port}")
    yield proxy
    proxy.close()


def test_a_worker_waits_for_an_unreachable_database_and_carries_on(
    conn: psycopg.Connection, proxy: TcpProxy, start_worker, claude_log, tmp_path
) -> None:
    job = claude_jobs.enqueue(conn, {"prompt": "hello", "cwd": str(tmp_path)})
    worker = start_worker(url=proxy.url(conn.info.dbname))
    worker.wait_for_log("database session lost")
    assert "Connection refused" in worker.log()
    proxy.listen()
    wait_for(lambda: status_of(conn, job.id) == "succeeded", what="the job to run")
    assert worker.process.poll() is None


def test_a_worker_that_loses_the_database_while_running_records_when_it_returns(
    conn: psycopg.Connection, proxy: TcpProxy, start_worker, claude_log, tmp_path
) -> None:
    proxy.listen()
    job = claude_jobs.enqueue(conn, {"prompt": fake(sleep=2), "cwd": str(tmp_path)})
    worker = start_worker(url=proxy.url(conn.info.dbname))
    wait_for(lambda: status_of(conn, job.id) == "running", what="the job to start")
    proxy.drop()  # every connection drops and nothing listens, for about a second
    worker.wait_for_log("database session lost")
    time.sleep(0.5)
    proxy.listen()
    wait_for(lambda: status_of(conn, job.id) == "succeeded", what="the outcome to be recorded")
    assert job_row(conn, job.id)["attempts"] == 1


def test_a_vanished_worker_is_recovered_by_heartbeat_and_cannot_overwrite_when_back(
    conn: psycopg.Connection, start_worker, claude_log, tmp_path
) -> None:
    job = claude_jobs.enqueue(
        conn, {"prompt": fake(sleep=3, result="from the frozen worker"), "cwd": str(tmp_path)}
    )
    frozen = start_worker("--heartbeat-timeout", "6s")
    wait_for(lambda: status_of(conn, job.id) == "running", what="the job to start")
    conn.execute(  # (before the freeze: a worker frozen mid-round may hold the row a while)
        "UPDATE claude_jobs SET payload = jsonb_set(payload, '{prompt}', %s)",
        [psycopg.types.json.Jsonb(fake(sleep=0, result="from the survivor"))],
    )
    frozen.signal(signal.SIGSTOP)  # its connections stay open and its lock stays held
    survivor = start_worker("--heartbeat-timeout", "6s")
    wait_for(lambda: status_of(conn, job.id) == "succeeded", timeout=30, what="the takeover")
    taken = job_row(conn, job.id)
    assert taken["result"]["result"] == "from the survivor"
    assert taken["errors"][0]["error"].startswith("interrupted")
    frozen.signal(signal.SIGCONT)
    frozen.wait_for_log("abandoned")
    time.sleep(1)  # it has had its chance to write; nothing it wrote may stick
    assert job_row(conn, job.id) == taken
    assert "no heartbeat within the timeout" in survivor.log()
    wait_for(
        lambda: conn.execute("SELECT count(*) FROM claude_jobs_workers").fetchone()[0] == 2,
        what="the frozen worker to come back as a new worker",
    )


def test_a_worker_frozen_inside_a_transaction_does_not_hold_up_the_recovery_of_its_jobs(
    conn: psycopg.Connection, db_url: str, start_worker, tmp_path
) -> None:
    # A worker frozen between two statements of a round holds its jobs' rows on a pooled
    # connection; the reaper must end that session too, not only the one with the lock.
    job = claude_jobs.enqueue(conn, {"prompt": "fine", "cwd": str(tmp_path)})
    name = "claude-jobs worker 0badc0de gone.example:4242"
    with psycopg.connect(db_url, autocommit=True, application_name=name) as session, \
            psycopg.connect(db_url, application_name=name) as pooled:  # fmt: skip
        session.execute("SELECT pg_advisory_lock(%s, 777)", [claude_jobs.LOCK_NAMESPACE])
        worker_id = uuid.uuid4()
        session.execute(
            """INSERT INTO claude_jobs_workers (id, lock_key, host, pid, queues, kinds,
                   concurrency, backend_pid, session_name, last_heartbeat)
               VALUES (%s, 777, 'gone.example', 4242, '{*}', '{claude}', 1, pg_backend_pid(),
                       current_setting('application_name'), now() - interval '1 minute')""",
            [worker_id],
        )
        session.execute(
            """UPDATE claude_jobs SET status = 'running', worker_id = %s, attempts = 1,
                   claim = gen_random_uuid(), started_at = now() WHERE id = %s""",
            [worker_id, job.id],
        )
        pooled.execute("SELECT FROM claude_jobs WHERE id = %s FOR UPDATE", [job.id])
        start_worker("--heartbeat-timeout", "6s")
        wait_for(lambda: status_of(conn, job.id) == "succeeded", timeout=30, what="the takeover")
        with pytest.raises(psycopg.OperationalError):  # its session was ended
            pooled.execute("SELECT 1")
    assert job_row(conn, job.id)["errors"][0]["error"].startswith("interrupted")


def test_polling_finds_jobs_queued_without_a_notification(
    conn: psycopg.Connection, run_worker
) -> None:
    run_worker(poll_interval=0.5)
    time.sleep(0.3)
    job_id = conn.execute(  # a bare INSERT: no NOTIFY, as from a tool that knows only the table
        """INSERT INTO claude_jobs (kind, payload) VALUES ('note', '{"name": "quiet"}')
           RETURNING id"""
    ).fetchone()[0]
    wait_for(lambda: status_of(conn, job_id) == "succeeded", timeout=10, what="the poll")


def test_json_logs_have_one_object_per_job_event(
    conn: psycopg.Connection, start_worker, claude_log, tmp_path
) -> None:
    ok = claude_jobs.enqueue(conn, {"prompt": "fine", "cwd": str(tmp_path)})
    bad = claude_jobs.enqueue(
        conn,
        {"prompt": fake(emit="server-error-500.json", exit=1), "cwd": str(tmp_path)},
        max_attempts=2,
    )
    worker = start_worker("--log-format", "json", "--backoff-base", "0.2s")
    wait_for(lambda: status_of(conn, bad.id) == "failed", what="the failing job to fail")
    wait_for(lambda: status_of(conn, ok.id) == "succeeded", what="the good job")
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    import json

    events = [json.loads(line) for line in worker.log().splitlines()]
    by_event = {(e["event"], e.get("job")) for e in events}
    for event, job in [
        ("claimed", ok.id),
        ("succeeded", ok.id),
        ("retry scheduled", bad.id),
        ("failed", bad.id),
    ]:
        assert (event, str(job)) in by_event
    succeeded = next(e for e in events if e["event"] == "succeeded")
    assert {"time", "level", "job", "queue", "kind", "attempt", "duration"} <= set(succeeded)
    assert succeeded["queue"] == "default" and succeeded["kind"] == "claude"


def test_a_worker_refuses_a_database_without_the_schema(
    pg_server, unmigrated: psycopg.Connection, start_worker
) -> None:
    worker = start_worker(url=pg_server.url(unmigrated.info.dbname))
    assert worker.wait() == 1
    assert worker.log() == (  # said at once: nothing started, nothing logged before
        "Error: this database has no claude-jobs schema: run `claude-jobs migrate`\n"
    )


def test_recovery_kills_the_interrupted_attempt_s_processes_only(tmp_path: Path) -> None:
    job_id = uuid.uuid4()

    def process_of_attempt(attempt: int) -> subprocess.Popen[bytes]:
        env = {**os.environ, "CLAUDE_JOBS_JOB_ID": str(job_id), "CLAUDE_JOBS_ATTEMPT": str(attempt)}
        return subprocess.Popen(["sleep", "600"], env=env)

    interrupted, newer = process_of_attempt(2), process_of_attempt(3)
    try:
        assert claude_jobs._kill_leftovers([{"id": job_id, "attempts": 2}]) == 1
        assert interrupted.wait(timeout=5) == -signal.SIGKILL
        assert newer.poll() is None, "a newer attempt of the same job was killed"
    finally:
        for process in (interrupted, newer):
            process.kill()
            process.wait()


def test_hostile_notices_do_not_stop_the_worker(conn: psycopg.Connection, run_worker) -> None:
    running = run_worker(poll_interval=60)
    for payload in ['{"queue": "default", "at": "soon"}', "not json", '{"queue": 5}', "[]", ""]:
        conn.execute("SELECT pg_notify('claude_jobs', %s)", [payload])
    job = claude_jobs.enqueue(conn, {"name": "still here"}, kind="note")
    wait_for(lambda: status_of(conn, job.id) == "succeeded", timeout=10, what="the job")
    assert running.worker.id == conn.execute("SELECT id FROM claude_jobs_workers").fetchone()[0]


@pytest.mark.parametrize(
    ("returned", "stored", "status"),
    [
        ({"text": "a\x00b"}, {"text": "a\ufffdb"}, "succeeded"),
        ({"\x00key": ["\ud800"]}, {"\ufffdkey": ["?"]}, "succeeded"),
        (float("nan"), None, "failed"),
        ({"n": float("inf")}, None, "failed"),
    ],
)
def test_results_postgresql_cannot_store_are_cleaned_or_fail_the_job(
    conn: psycopg.Connection, db_url: str, returned: Any, stored: Any, status: str
) -> None:
    job = claude_jobs.enqueue(conn, {"name": "x"}, kind="note")
    Worker(db_url, burst=True, handlers={"note": lambda job: returned}).run()
    row = job_row(conn, job.id)
    assert (row["status"], row["result"]) == (status, stored)
    if status == "failed":
        assert "not JSON" in row["last_error"]


def test_an_error_message_with_a_nul_is_stored(conn: psycopg.Connection, db_url: str) -> None:
    def broken(job: claude_jobs.Job) -> None:
        raise ValueError("bad\x00byte")

    job = claude_jobs.enqueue(conn, {"name": "x"}, kind="note", max_attempts=1)
    Worker(db_url, burst=True, handlers={"note": broken}).run()
    row = job_row(conn, job.id)
    assert (row["status"], row["last_error"]) == ("failed", "ValueError: bad\ufffdbyte")


def test_a_forced_stop_puts_back_a_job_whose_handler_gives_up_by_raising(
    conn: psycopg.Connection, db_url: str
) -> None:
    started = threading.Event()

    def obedient(job: claude_jobs.Job) -> None:
        started.set()
        assert job.context is not None
        job.context.stop.wait(30)
        raise RuntimeError("stopped as asked")

    job = claude_jobs.enqueue(conn, {"name": "x"}, kind="note", max_attempts=1)
    worker = Worker(db_url, handlers={"note": obedient})
    thread = threading.Thread(target=worker.run)
    thread.start()
    assert started.wait(10)
    worker.stop(force=True)
    thread.join(15)
    row = job_row(conn, job.id)
    assert (row["status"], row["attempts"], row["errors"]) == ("queued", 0, [])


@pytest.mark.parametrize("wait", [60.0, 0.5])
def test_jobs_claimed_ahead_of_busy_runners_go_back_unspent(
    conn: psycopg.Connection, db_url: str, monkeypatch: pytest.MonkeyPatch, wait: float
) -> None:
    """Quick jobs make a worker claim ahead of its runners; once the runners are busy with a
    long job, the jobs claimed ahead go back to the queue unspent, never having run: at a stop
    (wait 60), or after waiting CLAIM_AHEAD_WAIT for a runner (wait 0.5), and are not claimed
    again while the runners are slow."""
    monkeypatch.setattr(claude_jobs, "CLAIM_AHEAD_WAIT", wait)
    gate = threading.Event()

    def handle(job: claude_jobs.Job) -> None:
        if job.payload["name"].startswith("long"):
            gate.wait(30)
        else:
            ran.append(job.payload["name"])

    for name, priority in [*((f"quick {n}", 10) for n in range(6)), ("long 1", 5),
                           ("long 2", 5), *((f"late {n}", 0) for n in range(4))]:  # fmt: skip
        claude_jobs.enqueue(conn, {"name": name}, kind="note", priority=priority)
    worker = Worker(db_url, concurrency=2, handlers={"note": handle})
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        late = "SELECT status, attempts FROM claude_jobs WHERE payload->>'name' LIKE 'late %%'"
        wait_for(lambda: ("running", 1) in conn.execute(late).fetchall(),
                 what="a job claimed ahead of the busy runners")  # fmt: skip
        if wait > 1:
            worker.stop()
        wait_for(lambda: set(conn.execute(late).fetchall()) == {("queued", 0)},
                 what="the jobs claimed ahead to go back unspent")  # fmt: skip
        time.sleep(1.0)  # (not claimed again: the runners are slow now)
        assert set(conn.execute(late).fetchall()) == {("queued", 0)}
        long = "SELECT status FROM claude_jobs WHERE payload->>'name' LIKE 'long %%'"
        assert conn.execute(long).fetchall() == [("running",), ("running",)]
        assert sorted(ran) == [f"quick {n}" for n in range(6)]  # (none of the late ones ran)
    finally:
        gate.set()
        worker.stop()
        thread.join(30)


@pytest.mark.parametrize(
    "when",
    [
        datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14))),
        datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-14))),
    ],
)
def test_a_run_at_that_cannot_be_read_back_is_refused(conn: psycopg.Connection, when) -> None:
    with pytest.raises(claude_jobs.InvalidJob, match="out of range"):
        claude_jobs.enqueue(conn, {"name": "x"}, kind="note", run_at=when)
    assert conn.execute("SELECT count(*) FROM claude_jobs").fetchone() == (0,)


class Interrupt(BaseException):
    """Not an Exception: raised past `except Exception`."""


RUDE = {"KeyboardInterrupt": KeyboardInterrupt, "SystemExit": SystemExit, "Interrupt": Interrupt}


@claude_jobs.handler("rude")
def rude(job: claude_jobs.Job) -> None:
    raise RUDE[job.payload["raise"]]("the handler stopped")


@pytest.mark.parametrize("raised", RUDE.values())
def test_a_handler_raising_a_base_exception_fails_the_attempt_and_keeps_its_thread(
    conn: psycopg.Connection, run_worker, raised: type[BaseException]
) -> None:
    payload = {"raise": raised.__name__}
    bad = claude_jobs.enqueue(conn, payload, kind="rude", max_attempts=1)
    running = run_worker(handlers={"rude": rude, "note": note}, concurrency=1)
    wait_for(lambda: status_of(conn, bad.id) == "failed", what="the attempt to fail")
    assert job_row(conn, bad.id)["last_error"] == f"{raised.__name__}: the handler stopped"
    later = claude_jobs.enqueue(conn, {"name": "later"}, kind="note")
    wait_for(lambda: status_of(conn, later.id) == "succeeded", what="the one thread to run on")
    running.stop()


def test_the_workers_sessions_run_without_jit(conn: psycopg.Connection, db_url: str) -> None:
    """Debian's PostgreSQL compiles the claim with JIT once a large backlog makes it look
    expensive: 84 ms of compiling for 0.2 ms of work, on every claim."""
    with Worker(db_url, handlers={"note": note}) as worker:
        assert worker.run_once() == 0
        with worker._pool.connection() as pooled:  # where the claim and the outcomes run
            assert pooled.execute("SHOW jit").fetchone() == ("off",)


def test_bad_options_from_python_are_refused_in_one_line(conn: psycopg.Connection) -> None:
    with pytest.raises(claude_jobs.JobNotFound, match="no job"):  # (an unknown id: exit 1)
        claude_jobs.enqueue(conn, {"name": "x"}, kind="note", after=[uuid.uuid4()])
    with pytest.raises(claude_jobs.InvalidJob, match="concurrency key contains a NUL"):
        claude_jobs.enqueue(conn, {"name": "x"}, kind="note", concurrency_key="a\x00b")
    with pytest.raises(claude_jobs.InvalidJob, match='"cwd" contains a NUL'):
        claude_jobs.enqueue(conn, {"prompt": "x", "cwd": "a\x00b"})
    with pytest.raises(claude_jobs.InvalidJob, match="queue name"):
        claude_jobs.enqueue(conn, {"name": "x"}, kind="note", queue="q\x00")
    assert conn.execute("SELECT count(*) FROM claude_jobs").fetchone() == (0,)


def test_a_payload_that_holds_itself_is_refused_in_one_line(conn: psycopg.Connection) -> None:
    loop: list[Any] = []
    loop.append(loop)
    for kind, payload in (("note", {"name": loop}), ("claude", {"prompt": "p", "env": loop})):
        with pytest.raises(claude_jobs.InvalidJob, match="levels deep"):
            claude_jobs.enqueue(conn, payload, kind=kind)


# -- parts that fail ------------------------------------------------------------------------------


def _readyz(port: int) -> tuple[int, dict[str, Any]]:
    import httpx2 as httpx

    response = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    return response.status_code, response.json()


def test_a_pass_that_raises_does_not_end_its_thread_and_the_worker_says_it_is_failing(
    conn: psycopg.Connection, run_worker, invoke, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any exception of one pass (here one the scheduler could never have expected, as an
    except clause naming a class its library lacks raises) is logged and counted: the thread
    goes on, and after FAILING_PASSES in a row `workers`, the worker's health and its /readyz
    say so, until a pass goes through again."""
    broken = threading.Event()
    broken.set()
    calls: list[float] = []

    def fire(conn: psycopg.Connection, **options: Any) -> list[Any]:
        calls.append(time.monotonic())
        if broken.is_set():
            raise AttributeError("module 'psycopg.errors' has no attribute 'Imaginary'")
        return []

    monkeypatch.setattr(claude_jobs, "fire_due_schedules", fire)
    running = run_worker(health_port=0)
    worker = running.worker
    port = worker._health.port
    failing = claude_jobs.FAILING_PASSES
    wait_for(lambda: len(calls) > failing, 30, "the scheduler to fail again and again")
    health = worker.health()
    assert health["trouble"].startswith("its scheduler failed ")
    assert "passes in a row (AttributeError: module 'psycopg.errors'" in health["trouble"]
    assert health["ready"] is False and _readyz(port)[0] == 503
    wait_for(lambda: claude_jobs.list_workers(conn)[0]["state"] == "failing", 10, "the row")
    (row,) = claude_jobs.list_workers(conn)
    assert "scheduler failed" in row["trouble"] and "AttributeError" in row["trouble"]
    table = invoke("workers").output
    assert "failing" in table and "trouble: its scheduler failed" in table
    broken.clear()
    wait_for(lambda: worker.health()["trouble"] is None, 10, "a pass to go through")
    assert _readyz(port)[0] == 200
    scheduler = [t for t in worker._threads if t.name == "claude-jobs-scheduler"]
    assert scheduler and scheduler[0].is_alive()
    wait_for(lambda: claude_jobs.list_workers(conn)[0]["state"] == "alive", 10, "the row again")
    running.stop()


def test_a_part_whose_thread_dies_makes_the_worker_unready(
    conn: psycopg.Connection, run_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(self: Any) -> None:
        raise RuntimeError("the janitor's own loop broke")

    monkeypatch.setattr(claude_jobs._Janitor, "work", crash)
    running = run_worker(health_port=0)
    wait_for(lambda: running.worker.health()["trouble"], 10, "the pulse to say it died")
    assert running.worker.health()["trouble"] == (
        "its janitor died (RuntimeError: the janitor's own loop broke)"
    )
    assert _readyz(running.worker._health.port)[0] == 503
    wait_for(lambda: claude_jobs.list_workers(conn)[0]["state"] == "failing", 10, "the row")
    running.stop()
