"""Limits that every worker obeys, stored once in the database: a queue's --max-running and
--rate (`claude-jobs queue set`), a worker's --max-starts of claude jobs. Worker processes on
real PostgreSQL, the fake claude's own start and end times as the evidence."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import psycopg
from conftest import LOCAL, claude_runs, claude_spans, fake, most_at_once, wait_for
from starlette.testclient import TestClient

import claude_jobs


def enqueue_many(conn: psycopg.Connection, queue: str, cwd: Path, count: int, **extra) -> list:
    """Claude jobs in one cwd, without the key that a cwd gives them by default (one at a
    time in a directory) unless they name one."""
    prompt = fake(sleep=extra.pop("sleep", 0))
    jobs = [{"prompt": prompt, "cwd": str(cwd), **extra} for _ in range(count)]
    limit = 1 if "concurrency_key" in extra else 0
    return list(claude_jobs.enqueue_many(conn, jobs, queue=queue, concurrency_limit=limit))


def statuses(conn: psycopg.Connection, queue: str) -> dict[str, int]:
    rows = conn.execute(
        "SELECT status, count(*) FROM claude_jobs WHERE queue = %s GROUP BY 1", (queue,)
    ).fetchall()
    return dict(rows)


def test_max_running_holds_across_four_workers_of_concurrency_8(
    conn: psycopg.Connection, invoke, start_worker, claude_log: Path, tmp_path: Path
) -> None:
    assert invoke("queue", "set", "reviews", "--max-running", "3").exit_code == 0
    enqueue_many(conn, "reviews", tmp_path, 24, sleep=0.3)
    for _ in range(4):
        start_worker("--queues", "reviews", "--concurrency", "8", "--poll-interval", "0.5")
    wait_for(lambda: statuses(conn, "reviews") == {"succeeded": 24}, 120, "24 jobs to succeed")
    spans = claude_spans(claude_log)
    assert len(spans) == 24
    assert most_at_once(spans) == 3  # never 4 at once; and the 3 slots were used
    attempts = conn.execute("SELECT DISTINCT attempts FROM claude_jobs").fetchall()
    assert attempts == [(1,)]  # a job that had to wait spent no attempt
    shown = json.loads(invoke("queue", "show", "reviews", "--json").output)
    assert (shown["max_running"], shown["running"], shown["succeeded"]) == (3, 0, 24)


def test_a_rate_of_3_per_10s_holds_across_two_workers_and_list_says_until_when(
    conn: psycopg.Connection, invoke, start_worker, claude_log: Path, tmp_path: Path
) -> None:
    assert invoke("queue", "set", "nightly", "--rate", "3/10s").exit_code == 0
    enqueue_many(conn, "nightly", tmp_path, 6)
    for _ in range(2):
        start_worker("--queues", "nightly", "--concurrency", "4", "--poll-interval", "0.5")
    wait_for(lambda: statuses(conn, "nightly").get("succeeded") == 3, 30, "3 jobs to succeed")
    listed = invoke("list", "--queue", "nightly", "--status", "queued").output
    assert listed.count("rate limited until ") == 3, listed
    waiting = conn.execute("SELECT id FROM claude_jobs WHERE status = 'queued' LIMIT 1").fetchone()
    assert "rate limited until " in invoke("show", str(waiting[0])).output
    wait_for(lambda: statuses(conn, "nightly") == {"succeeded": 6}, 40, "6 jobs to succeed")
    # The claims, as the database counted them (in buckets of a sixtieth of the period, a
    # start counted as long as its bucket reaches into the window): never a 4th within 10 s.
    buckets = conn.execute("SELECT extract(epoch FROM at)::float8, starts FROM claude_jobs_starts "
                           "WHERE limiter = 'queue nightly' ORDER BY at").fetchall()  # fmt: skip
    starts = [at for at, count in buckets for _ in range(count)]
    assert len(starts) == 6
    assert all(b - a >= 10 - 10 / 60 for a, b in zip(starts, starts[3:], strict=False)), starts
    # And claude's own start times, which come a moment after each admission (the time to
    # start a process, under 0.5 s here): no 4 of them within 10 s less that moment.
    begun = sorted(start for start, _ in claude_spans(claude_log))
    assert all(b - a >= 9.5 for a, b in zip(begun, begun[3:], strict=False)), begun
    assert conn.execute("SELECT DISTINCT attempts FROM claude_jobs").fetchall() == [(1,)]


def test_a_rate_by_key_counts_each_concurrency_key_apart(
    conn: psycopg.Connection, invoke, start_worker, claude_log: Path, tmp_path: Path
) -> None:
    assert invoke("queue", "set", "fixes", "--rate", "1/8s", "--rate-by", "key").exit_code == 0
    for key in ("repo-a", "repo-a", "repo-b", "repo-b"):
        enqueue_many(conn, "fixes", tmp_path, 1, concurrency_key=key)
    start_worker("--queues", "fixes", "--concurrency", "4", "--poll-interval", "0.5")
    wait_for(lambda: statuses(conn, "fixes").get("succeeded") == 2, 30, "one job of each key")
    done = conn.execute("SELECT concurrency_key FROM claude_jobs WHERE status = 'succeeded' "
                        "ORDER BY 1").fetchall()  # fmt: skip
    assert done == [("repo-a",), ("repo-b",)]
    assert invoke("list", "--queue", "fixes").output.count("rate limited until") == 2
    wait_for(lambda: statuses(conn, "fixes") == {"succeeded": 4}, 30, "the other two")
    by_key: dict[str, list[float]] = {}
    for run in claude_runs(claude_log):
        job = claude_jobs.get_job(conn, run["env"]["CLAUDE_JOBS_JOB_ID"], transcript=False)
        by_key.setdefault(job.concurrency_key or "", []).append(run["started"])
    assert all(abs(a - b) >= 7.5 for a, b in by_key.values()), by_key


def test_a_worker_killed_while_holding_a_slot_gives_it_back(
    conn: psycopg.Connection, invoke, start_worker, claude_log: Path, tmp_path: Path
) -> None:
    assert invoke("queue", "set", "solo", "--max-running", "1").exit_code == 0
    enqueue_many(conn, "solo", tmp_path, 1, sleep=600)
    doomed = start_worker("--queues", "solo", "--heartbeat-timeout", "5s")
    wait_for(lambda: claude_runs(claude_log), 20, "the first job to start")
    [second] = enqueue_many(conn, "solo", tmp_path, 1)
    start_worker("--queues", "solo", "--heartbeat-timeout", "5s", "--poll-interval", "0.5")
    wait_for(lambda: "queue full" in invoke("list", "--queue", "solo").output, 10, "queue full")
    assert claude_jobs.get_job(conn, second).status == claude_jobs.JobStatus.QUEUED
    doomed.signal(signal.SIGKILL)
    # Recovered within the heartbeat timeout, the slot is free: the second job (or the first,
    # put back) starts on the live worker.
    wait_for(lambda: len(claude_runs(claude_log)) >= 2, 30, "a job to start after the kill")
    held = conn.execute("SELECT count(*) FROM claude_jobs WHERE queue = 'solo' AND "
                        "status = 'running'").fetchone()  # fmt: skip
    assert held == (1,)


def test_max_starts_caps_claude_starts_across_workers(
    conn: psycopg.Connection, invoke, start_worker, claude_log: Path, tmp_path: Path
) -> None:
    enqueue_many(conn, "default", tmp_path, 5)
    for _ in range(2):
        start_worker("--concurrency", "3", "--max-starts", "2/1m", "--poll-interval", "0.5")
    wait_for(lambda: statuses(conn, "default").get("succeeded") == 2, 30, "two jobs to succeed")

    def held_worker() -> bool:
        return any((w["claude_paused_reason"] or "").startswith(claude_jobs.MAX_STARTS_NOTE)
                   for w in claude_jobs.list_workers(conn))  # fmt: skip

    wait_for(held_worker, 15, "a worker to say it holds claude jobs for its cap")
    assert claude_jobs.MAX_STARTS_NOTE in invoke("workers").output
    assert len(claude_runs(claude_log)) == 2
    assert statuses(conn, "default") == {"succeeded": 2, "queued": 3}
    assert conn.execute("SELECT DISTINCT attempts FROM claude_jobs WHERE status = 'queued'"
                        ).fetchall() == [(0,)]  # fmt: skip


def test_queue_settings_from_the_command_line_and_the_dashboard(
    conn: psycopg.Connection, db_url: str, invoke, tmp_path: Path
) -> None:
    enqueue_many(conn, "reviews", tmp_path, 2)
    assert invoke("queue", "set", "reviews", "--max-running", "4", "--rate", "30/h").exit_code == 0
    assert invoke("pause", "reviews").exit_code == 0
    assert invoke("queue", "set", "later", "--rate", "5/m", "--rate-by", "cwd").exit_code == 0
    rows = {row["queue"]: row for row in map(json.loads, invoke("queues", "--json").output
                                             .splitlines())}  # fmt: skip
    assert (rows["reviews"]["paused"], rows["reviews"]["max_running"], rows["reviews"]["rate"]
            ) == (True, 4, "30/h")  # fmt: skip
    assert (rows["later"]["ready"], rows["later"]["rate"], rows["later"]["rate_by"]) == (
        0, "5/m", "cwd")  # fmt: skip
    table = invoke("queues").output
    assert "paused" in table and "30/h" in table and "5/m per cwd" in table
    reset = invoke("queue", "reset", "reviews", "--max-running", "--paused")
    assert reset.exit_code == 0 and "max running: -" in reset.output
    assert "state:       active" in reset.output and "30/h" in reset.output
    shown = json.loads(invoke("queue", "show", "reviews", "--json").output)
    assert (shown["paused"], shown["max_running"], shown["rate"]) == (False, None, "30/h")
    with TestClient(claude_jobs.web_app(db_url, token="s3cret"), base_url=LOCAL) as client:
        path, auth = "/api/queues/reviews/settings", {"Authorization": "Bearer s3cret"}
        assert client.post(path, json={"max_running": 2}).status_code == 401
        answer = client.post(path, json={"max_running": 2, "rate": None}, headers=auth)
        assert answer.status_code == 200, answer.text
        assert (answer.json()["max_running"], answer.json()["rate"]) == (2, None)
        assert client.post(path, json={"max_running": 0}, headers=auth).status_code == 422
        assert client.post(path, json={"rate": "5/fortnight"}, headers=auth).status_code == 422
        assert client.post(path, json={"speed": 1}, headers=auth).status_code == 400
        listed = client.get("/api/queues", headers=auth).json()["queues"]
        assert [q["max_running"] for q in listed if q["queue"] == "reviews"] == [2]
    with TestClient(claude_jobs.web_app(db_url, read_only=True), base_url=LOCAL) as client:
        assert client.post("/api/queues/reviews/settings", json={"rate": "1/h"}).status_code == 403
