"""Operating the queue from the command line: list, show, logs (-f), cancel, retry, stats,
workers, pause/resume, cleanup, purge, enqueue --wait, id prefixes and exit statuses."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import FIXTURES, TESTS, claude_runs, fake, job_row, pid_alive, status_of, wait_for

import claude_jobs

cli = claude_jobs.cli


def make_job(conn: psycopg.Connection, **columns: Any) -> uuid.UUID:
    """A job row as the test needs it (status, queue, times, errors...), written directly."""
    values = {"payload": json.dumps({"prompt": "a job"}), **columns}
    for name in ("errors", "result"):
        if name in values and not isinstance(values[name], str):
            values[name] = json.dumps(values[name])
    names = ", ".join(values)
    marks = ", ".join(f"%({name})s" for name in values)
    query = f"INSERT INTO claude_jobs ({names}) VALUES ({marks}) RETURNING id"
    return conn.execute(query, values).fetchone()[0]


def hours_ago(hours: float) -> datetime:
    return datetime.now(UTC) - timedelta(hours=hours)


# -- ids ----------------------------------------------------------------------------------------


def test_every_command_taking_an_id_accepts_a_unique_prefix(invoke, conn) -> None:
    job_id = make_job(conn, id=uuid.UUID("abcdef12-0000-4000-8000-000000000001"))
    make_job(conn, id=uuid.UUID("abcdef34-0000-4000-8000-000000000002"))
    make_job(conn, id=uuid.UUID("abcdef34-0000-4000-8000-000000000003"))
    for args in (["show", "abcdef12"], ["show", "ABCDEF12-00"], ["logs", "abcdef1"]):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
    assert str(job_id) in invoke("show", "abcdef12").output
    ambiguous = invoke("show", "abcdef")
    assert ambiguous.exit_code == 2
    assert ambiguous.output == (
        "Error: abcdef is ambiguous: it begins abcdef12-0000-4000-8000-000000000001, "
        "abcdef34-0000-4000-8000-000000000002, abcdef34-0000-4000-8000-000000000003\n"
    )
    unknown = invoke("cancel", "fedcba9")
    assert (unknown.exit_code, unknown.output) == (1, "Error: no job fedcba9\n")
    short = invoke("retry", "abcde")
    assert short.exit_code == 2 and "first 6 or more digits" in short.output


# -- list -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("columns", [50, 60, 80])
def test_every_table_fits_the_terminal(
    invoke, conn, db_url: str, monkeypatch: pytest.MonkeyPatch, columns: int
) -> None:
    long_queue = "a-queue-with-a-rather-long-name-for-nightly-reviews"
    for status in ("queued", "failed", "succeeded", "cancelled"):
        make_job(conn, status=status, queue=long_queue, finished_at=hours_ago(0.5),
                 started_at=hours_ago(0.6), payload=json.dumps({"prompt": "x" * 300}))  # fmt: skip
    handlers = {"note": lambda job: None}
    with claude_jobs.Worker(db_url, queues=[long_queue], handlers=handlers) as worker:
        worker.run_once()  # registered, so that `workers` has a row
        monkeypatch.setenv("COLUMNS", str(columns))
        for command in ("list", "stats", "workers"):
            result = invoke(command)
            assert result.exit_code == 0, result.output
            lines = result.output.splitlines()
            assert len(lines) >= 2, f"{command}: {result.output}"
            assert max(map(len, lines)) <= columns, f"{command}:\n{result.output}"
            assert lines[0].startswith("ID" if command != "stats" else "QUEUE")


def test_list_shows_jobs_newest_first_in_a_table_that_fits(
    invoke, conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = make_job(conn, created_at=hours_ago(3), status="failed", queue="nightly")
    new = make_job(conn, payload=json.dumps({"prompt": "x" * 500}))
    monkeypatch.setenv("COLUMNS", "80")
    result = invoke("list")
    assert result.exit_code == 0
    header, first, second = result.output.splitlines()
    assert header.split() == [
        "ID",
        "QUEUE",
        "KIND",
        "STATUS",
        "PRI",
        "TRIES",
        "WHEN",
        "PROMPT",
        "/",
        "PAYLOAD",
    ]
    assert first.startswith(str(new)[:8]) and second.startswith(str(old)[:8])
    assert "3h ago" in second and "failed" in second
    assert all(len(line) <= 80 for line in result.output.splitlines())
    assert first.endswith("…")
    assert "\x1b[" not in result.output, "no colour when not on a terminal"


def test_list_filters_and_prints_json_lines(invoke, conn) -> None:
    make_job(conn, status="failed", queue="a", kind="note")
    wanted = make_job(conn, status="failed", queue="b")
    make_job(conn, status="succeeded", queue="b")
    make_job(conn, status="failed", queue="b", created_at=hours_ago(30))
    result = invoke("list", "--status", "failed", "--queue", "b", "--since", "1d", "--json")
    assert result.exit_code == 0
    [line] = result.output.splitlines()
    data = json.loads(line)
    assert data["id"] == str(wanted) and data["paused"] is False
    assert "transcript" not in data
    assert datetime.fromisoformat(data["created_at"])
    limited = invoke("list", "--limit", "2", "--json")
    assert len(limited.output.splitlines()) == 2
    assert invoke("list", "--kind", "note", "--json").output.count("\n") == 1
    bad = invoke("list", "--status", "done")
    assert bad.exit_code == 2 and bad.output.count("\n") == 1


def test_colour_only_on_a_terminal_and_never_with_no_color(
    invoke, conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_job(conn, status="failed")
    monkeypatch.setattr(claude_jobs, "_stdout_is_terminal", lambda: True)
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert "\x1b[31m" in invoke("list", color=True).output
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\x1b[" not in invoke("list", color=True).output


# -- show and logs -----------------------------------------------------------------------------


def test_show_tells_every_attempt_result_cost_session_and_transcript(invoke, conn) -> None:
    transcript = (FIXTURES / "mock-tool-use.stream.jsonl").read_text()
    job_id = make_job(
        conn,
        status="succeeded",
        attempts=2,
        worker="host-1:42",
        started_at=hours_ago(0.1),
        finished_at=hours_ago(0.05),
        errors=[
            {
                "attempt": 1,
                "at": hours_ago(0.2).isoformat(),
                "started": (hours_ago(0.2) - timedelta(seconds=95)).isoformat(),
                "worker": "host-2:7",
                "error": "claude failed: API Error: 500",
            }
        ],
        result={"type": "result", "result": "Hello from the mock API.", "num_turns": 2},
        cost_usd=0.0123,
        session_id="9453ba1d-7ef4-4b40-acc5-1727cb51286f",
        transcript=transcript,
        transcript_size=len(transcript),
    )
    output = invoke("show", str(job_id)[:8]).output
    for expected in [
        "succeeded, attempt 2 of 5",
        "worker    host-1:42",
        "attempt 1 (host-2:7, 12m ago, took 1m35s): claude failed: API Error: 500",
        "result    Hello from the mock API.",
        "cost      $0.01",
        "session   9453ba1d-7ef4-4b40-acc5-1727cb51286f",
        "→ Bash: touch made-by-claude.txt && pwd",
    ]:
        assert expected in output


def test_logs_render_the_transcript_as_a_person_reads_it(invoke, conn) -> None:
    transcript = (FIXTURES / "mock-tool-use.stream.jsonl").read_text()
    job_id = make_job(conn, transcript=transcript, transcript_size=len(transcript))
    lines = invoke("logs", str(job_id)).output.splitlines()
    assert lines[0].startswith("· session 9453ba1d-7ef4-4b40-acc5-1727cb51286f · model")
    assert "→ Bash: touch made-by-claude.txt && pwd" in lines
    assert "  ← /home/user/project" in lines
    assert "Hello from the mock API." in lines
    assert lines[-1].startswith("· success · 2 turns · $0.0005")
    cut = make_job(conn, transcript="line\n" + transcript, transcript_size=10 * len(transcript))
    assert "earlier characters not kept" in invoke("logs", str(cut)).output


def test_logs_follow_streams_a_running_job_and_exits_with_its_outcome(
    conn, db_url: str, start_worker, claude_log, tmp_path: Path
) -> None:
    steps = [
        {"type": "assistant", "message": {"content": [{"type": "text", "text": f"step {n}"}]}}
        for n in range(1, 4)
    ]
    job = claude_jobs.enqueue(
        conn,
        {"prompt": fake(stream=steps, interval=1.0, result="all steps done"), "cwd": str(tmp_path)},
    )
    start_worker()
    wait_for(lambda: status_of(conn, job.id) == "running", what="the job to start")
    follower = subprocess.Popen(
        [sys.executable, "-m", "claude_jobs", "--database-url", db_url, "logs", "-f",
         str(job.id)[:8]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(TESTS.parent)},
    )  # fmt: skip
    assert follower.stdout is not None
    seen: list[str] = []
    while "step 2" not in seen:
        line = follower.stdout.readline()
        assert line, f"the follower ended early: {seen}"
        seen.append(line.rstrip("\n"))
    assert status_of(conn, job.id) == "running", "lines arrive while the job runs"
    rest, errors = follower.communicate(timeout=30)
    assert follower.returncode == 0
    assert "all steps done" in rest and f"job {job.id} succeeded" in errors


# -- cancel and retry ---------------------------------------------------------------------------


def test_cancel_a_queued_job_at_once_and_refuse_a_finished_one(invoke, conn) -> None:
    queued = make_job(conn)
    done = make_job(conn, status="succeeded")
    before = job_row(conn, done)
    result = invoke("cancel", str(queued), str(done))
    assert result.exit_code == 1
    assert f"Error: job {done} is succeeded: only queued or running jobs can be cancelled" in (
        result.output
    )
    assert status_of(conn, queued) == "queued", "all or nothing"
    assert job_row(conn, done) == before
    assert invoke("cancel", str(queued)).output == f"{queued} cancelled\n"
    assert status_of(conn, queued) == "cancelled"


def test_cancel_a_running_job_stops_its_claude_and_it_is_not_retried(
    invoke, conn, start_worker, claude_log, tmp_path: Path
) -> None:
    job = claude_jobs.enqueue(
        conn, {"prompt": fake(sleep=600, child=True), "cwd": str(tmp_path)}, max_attempts=5
    )
    worker = start_worker()
    [run] = wait_for(lambda: claude_runs(claude_log), what="claude to start")
    result = invoke("cancel", str(job.id))
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == f"{job.id} cancelled"
    row = job_row(conn, job.id)
    assert (row["status"], row["attempts"], row["last_error"]) == (
        "cancelled", 1, "cancelled while running",
    )  # fmt: skip
    wait_for(lambda: not pid_alive(run["pid"]) and not pid_alive(run["child"]), timeout=10,
             what="claude's process group to be gone")  # fmt: skip
    worker.wait_for_log("cancelled")
    time.sleep(0.5)
    assert status_of(conn, job.id) == "cancelled", "not retried"


def test_a_missed_cancel_notice_is_caught_by_the_poll(
    conn, start_worker, claude_log, tmp_path: Path
) -> None:
    job = claude_jobs.enqueue(conn, {"prompt": fake(sleep=600), "cwd": str(tmp_path)})
    start_worker("--poll-interval", "0.5s")
    wait_for(lambda: claude_runs(claude_log), what="claude to start")
    conn.execute("UPDATE claude_jobs SET cancel_requested_at = now() WHERE id = %s", [job.id])
    wait_for(lambda: status_of(conn, job.id) == "cancelled", timeout=10, what="the cancel")


def test_a_cancel_asked_of_a_dead_workers_job_is_honoured_on_recovery(
    invoke, conn, start_worker, claude_log, tmp_path: Path
) -> None:
    job = claude_jobs.enqueue(conn, {"prompt": fake(sleep=600), "cwd": str(tmp_path)})
    doomed = start_worker()
    wait_for(lambda: claude_runs(claude_log), what="claude to start")
    doomed.signal(signal.SIGKILL)
    doomed.wait()
    asked = invoke("cancel", str(job.id))  # says so, rather than wait for a recovery
    assert asked.exit_code == 0, asked.output
    assert "is lost; the job is cancelled when a live worker recovers it" in asked.output
    assert status_of(conn, job.id) == "running"
    start_worker()
    wait_for(lambda: status_of(conn, job.id) == "cancelled", timeout=15, what="the recovery")
    assert job_row(conn, job.id)["attempts"] == 1


def test_retry_requeues_failed_and_cancelled_jobs_with_fresh_attempts(invoke, conn) -> None:
    failed = make_job(conn, status="failed", attempts=5, last_error="boom",
                      errors=[{"attempt": 5, "error": "boom"}])  # fmt: skip
    cancelled = make_job(conn, status="cancelled", attempts=1)
    result = invoke("retry", str(failed)[:8], str(cancelled))
    assert result.exit_code == 0, result.output
    for job_id in (failed, cancelled):
        row = job_row(conn, job_id)
        assert (row["status"], row["attempts"], row["finished_at"]) == ("queued", 0, None)
    assert job_row(conn, failed)["errors"] == [{"attempt": 5, "error": "boom"}], "history kept"


def test_retry_of_a_job_in_the_wrong_state_changes_nothing(invoke, conn) -> None:
    failed = make_job(conn, status="failed")
    running = make_job(conn, status="running", attempts=1)
    result = invoke("retry", str(failed), str(running))
    assert result.exit_code == 1
    assert result.output == (
        f"Error: {running} is running: only failed or cancelled jobs can be retried\n"
    )
    assert status_of(conn, failed) == "failed", "all or nothing"
    both = invoke("retry", str(failed), "--all")
    assert both.exit_code == 2


def test_retry_of_a_job_cancelled_for_a_failed_dependency_points_to_that_one(invoke, conn) -> None:
    failed = make_job(conn, status="failed")
    waiting = make_job(conn, status="cancelled", after=[failed])
    result = invoke("retry", str(waiting))
    assert (result.exit_code, result.output) == (
        1, f"Error: {waiting} waits for {failed} (failed): retry that first (or with it)\n",
    )  # fmt: skip
    none = invoke("retry", "--all", "--status", "cancelled")
    assert none.output == "retried 0 cancelled job(s)\n"
    assert invoke("retry", str(waiting), str(failed)).exit_code == 0, "both at once"
    assert [status_of(conn, j) for j in (failed, waiting)] == ["queued", "queued"]
    cancelled = make_job(conn, status="cancelled")
    chained = make_job(conn, status="cancelled", after=[cancelled])
    gone = make_job(conn, status="cancelled", continue_from=uuid.uuid4())
    both = invoke("retry", "--all", "--status", "cancelled")
    assert both.output == "retried 2 cancelled job(s)\n"
    assert [status_of(conn, j) for j in (cancelled, chained, gone)] == [
        "queued", "queued", "cancelled",
    ]  # fmt: skip
    refused = invoke("retry", str(gone))
    assert "which is gone: it cannot run again" in refused.output


def test_retry_all_of_a_status_in_a_queue(invoke, conn) -> None:
    for queue in ("a", "a", "b"):
        make_job(conn, status="failed", queue=queue)
    make_job(conn, status="cancelled", queue="a")
    result = invoke("retry", "--all", "--status", "failed", "--queue", "a")
    assert (result.exit_code, result.output) == (0, "retried 2 failed job(s)\n")
    counts = dict(conn.execute("SELECT status, count(*) FROM claude_jobs GROUP BY 1").fetchall())
    assert counts == {"queued": 2, "failed": 1, "cancelled": 1}


# -- stats and workers --------------------------------------------------------------------------


def test_stats_per_queue(invoke, conn) -> None:
    make_job(conn, queue="a", run_at=hours_ago(1))
    make_job(conn, queue="a", run_at=datetime.now(UTC) + timedelta(hours=1))
    make_job(conn, queue="a", status="running")
    for minutes in (10, 20, 30):
        make_job(conn, queue="a", status="succeeded", started_at=hours_ago(2),
                 finished_at=hours_ago(2) + timedelta(minutes=minutes), cost_usd=0.5)  # fmt: skip
    make_job(conn, queue="a", status="failed", finished_at=hours_ago(0.1))
    make_job(conn, queue="b", status="succeeded", finished_at=hours_ago(48))
    claude_jobs.pause_queue(conn, "idle")
    result = invoke("stats", "--json")
    assert result.exit_code == 0
    stats = {row["queue"]: row for row in map(json.loads, result.output.splitlines())}
    a = stats["a"]
    assert (a["ready"], a["scheduled"], a["running"], a["succeeded"], a["failed"]) == (
        1,
        1,
        1,
        3,
        1,
    )
    assert a["failed_last_hour"] == 1 and a["succeeded_last_hour"] == 0
    assert 3590 < a["oldest_ready_seconds"] < 3700
    assert a["median_run_seconds"] == pytest.approx(1200)
    assert a["cost_usd"] == pytest.approx(1.5)
    assert stats["idle"]["paused"] is True and stats["b"]["paused"] is False
    table = invoke("stats").output
    assert "QUEUE" in table.splitlines()[0] and "paused" in table and "$1.50" in table


def test_piped_list_output_is_not_cut_and_a_files_jobs_list_in_their_order(
    invoke, conn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)  # (and stdout is no terminal)
    make_job(conn, payload=json.dumps({"prompt": "word " * 100}))
    line = invoke("list").output.splitlines()[1]
    assert line.endswith(("word " * 100).strip()) and len(line) > 500
    lines = tmp_path / "jobs.jsonl"
    lines.write_text("".join(json.dumps({"prompt": f"job {n}"}) + "\n" for n in range(20)))
    ids = invoke("enqueue", "--file", str(lines)).output.split()
    listed = [json.loads(row)["id"] for row in invoke("list", "--json").output.splitlines()]
    assert listed[:20] == ids[::-1]  # newest first: the file's last line first


def test_list_pages_by_keyset_and_finds_text_and_directory(invoke, conn, tmp_path) -> None:
    same_moment = datetime.now(UTC)  # (ties on created_at are broken by enqueue order)
    ids = {make_job(conn, created_at=same_moment) for _ in range(5)}
    ids |= {make_job(conn, created_at=hours_ago(n)) for n in range(1, 6)}
    pages, before = [], None
    while page := claude_jobs.list_jobs(conn, before=before, limit=3):
        pages.append(page)
        before = page[-1]
    seen = [job for page in pages for job in page]
    assert [len(page) for page in pages] == [3, 3, 3, 1] and {job.id for job in seen} == ids
    assert seen == sorted(seen, key=lambda job: (job.created_at, job.seq), reverse=True)
    make_job(conn, payload=json.dumps({"prompt": "Run the SECURITY review", "cwd": str(tmp_path)}))
    found = invoke("list", "--search", "security rev", "--cwd", str(tmp_path), "--json").output
    assert [json.loads(line)["payload"]["prompt"] for line in found.splitlines()] == [
        "Run the SECURITY review"
    ]
    assert invoke("list", "--search", "100%").output == "no jobs\n"


def test_kept_counts_match_the_jobs_through_every_kind_of_change(invoke, conn) -> None:
    def kept() -> dict[tuple[str, str], int]:
        rows = claude_jobs.job_counts(conn)
        return {(r["queue"], r["status"]): r["jobs"] for r in rows if r["jobs"]}

    def counted() -> dict[tuple[str, str], int]:
        rows = conn.execute("SELECT queue, status, count(*) FROM claude_jobs GROUP BY 1, 2")
        return {(queue, status): n for queue, status, n in rows.fetchall()}

    claude_jobs.enqueue_many(conn, [{"prompt": f"p{n}"} for n in range(30)], queue="a")
    claude_jobs.enqueue(conn, {"prompt": "b"}, queue="b")
    ran = make_job(conn, queue="a", status="running", started_at=hours_ago(1))
    conn.execute(
        "UPDATE claude_jobs SET status = 'succeeded', finished_at = now(), cost_usd = 2"
        " WHERE id = %s", [ran],
    )  # fmt: skip
    make_job(conn, queue="b", status="failed", finished_at=hours_ago(0.1))
    assert kept() == counted()
    claude_jobs.cancel_jobs(conn, [claude_jobs.list_jobs(conn, statuses=["queued"], limit=1)[0].id])
    invoke("retry", "--all", "--status", "failed")
    claude_jobs.fold_counts(conn)
    assert kept() == counted()
    invoke("purge", "a", "--yes")
    conn.execute("DELETE FROM claude_jobs WHERE queue = 'b'")
    assert kept() == counted() == {("a", "succeeded"): 1}
    rows = {(r["queue"], r["status"]): r for r in claude_jobs.job_counts(conn)}
    assert rows["a", "succeeded"]["entered"] == 1 and rows["a", "queued"]["entered"] == 30
    assert rows["a", "succeeded"]["cost_usd"] == 2
    assert rows["a", "succeeded"]["run_seconds"] == pytest.approx(3600, abs=5)
    buckets = {r["le"]: r["runs"] for r in claude_jobs.run_times(conn) if r["queue"] == "a"}
    assert 1800 not in buckets and 3600 not in buckets and buckets[7200] == 1
    assert buckets[float("inf")] == 1
    conn.execute("TRUNCATE claude_jobs CASCADE")  # (and the transcripts' chunks)
    assert kept() == counted() == {}


def test_workers_shows_live_and_lost_workers(invoke, conn, db_url: str) -> None:
    conn.execute(
        """INSERT INTO claude_jobs_workers (id, lock_key, host, pid, queues, kinds, concurrency,
               last_heartbeat)
           VALUES (gen_random_uuid(), 999999, 'gone-host', 4242, '{*}', '{claude}', 3,
               now() - interval '10 minutes')"""
    )
    worker = claude_jobs.Worker(db_url, handlers={"noop": lambda job: None}, queues="x,y")
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_for(lambda: worker.id is not None, what="the worker")
        result = invoke("workers", "--json")
        rows = {row["host"]: row for row in map(json.loads, result.output.splitlines())}
        assert rows["gone-host"]["lost"] is True
        live = next(row for host, row in rows.items() if host != "gone-host")
        assert (live["lost"], live["queues"], live["running"]) == (False, ["x", "y"], 0)
        table = invoke("workers").output
        assert "lost" in table and "alive" in table and "gone-host" in table
    finally:
        worker.stop()
        thread.join()


# -- pause and resume ---------------------------------------------------------------------------


def test_a_paused_queue_keeps_its_jobs_queued_until_resumed(invoke, conn, db_url: str) -> None:
    result = invoke("pause", "slow")
    assert (result.exit_code, result.stdout) == (
        0, "queue slow paused: 0 queued job(s) wait for `claude-jobs resume`\n",
    )  # fmt: skip
    assert "was already paused" in invoke("pause", "slow").output
    ran: list[str] = []
    worker = claude_jobs.Worker(
        db_url, handlers={"note": lambda job: ran.append(job.queue)}, poll_interval=0.2
    )
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_for(lambda: worker.id is not None, what="the worker")
        paused = claude_jobs.enqueue(conn, {}, kind="note", queue="slow")
        other = claude_jobs.enqueue(conn, {}, kind="note", queue="fast")
        wait_for(lambda: status_of(conn, other.id) == "succeeded", what="the other queue")
        invoke("pause", "fast")  # (what `list --json` says of a finished job's queue)
        assert json.loads(invoke("list", "--queue", "fast", "--json").output)["paused"] is True
        time.sleep(1.0)  # five polls: nothing claims from the paused queue
        assert status_of(conn, paused.id) == "queued"
        listed = json.loads(invoke("list", "--queue", "slow", "--json").output)
        assert listed["paused"] is True and "paused" in invoke("list").output
        assert invoke("resume", "slow").output == "queue slow resumed\n"
        wait_for(lambda: status_of(conn, paused.id) == "succeeded", timeout=5, what="resume")
        assert invoke("resume", "slow").output == "queue slow was not paused\n"
    finally:
        worker.stop()
        thread.join()


@claude_jobs.handler("note")
def _note(job: claude_jobs.Job) -> None:
    """Registered so these tests may enqueue kind "note"."""


def test_pause_kind_stops_that_kind_on_every_worker_until_resume_kind(
    conn: psycopg.Connection, db_url: str, invoke, fake_claude: Path, claude_log: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    held = claude_jobs.enqueue(conn, {"prompt": "p", "cwd": str(tmp_path)})
    other = claude_jobs.enqueue(conn, {}, kind="note")
    paused = invoke("pause", "--kind", "claude")
    assert paused.exit_code == 0, paused.output
    assert (
        paused.output
        == "claude jobs paused on every worker until `claude-jobs resume --kind claude`\n"
    )
    assert "were already paused" in invoke("pause", "--kind", "claude").output
    handlers = {"claude": claude_jobs.ClaudeHandler(str(fake_claude)), "note": _note}
    claude_jobs.Worker(db_url, burst=True, handlers=handlers).run()
    assert (status_of(conn, held.id), status_of(conn, other.id)) == ("queued", "succeeded")
    shown = invoke("show", str(held.id)).output
    assert (
        "no worker starts claude jobs until it is resumed (`claude-jobs resume --kind claude`)"
        in shown
    )
    resumed = invoke("resume", "--kind", "claude")
    assert resumed.exit_code == 0 and "workers start claude jobs again" in resumed.output
    claude_jobs.Worker(db_url, burst=True, handlers=handlers).run()
    assert status_of(conn, held.id) == "succeeded"
    for args in (["pause"], ["pause", "nightly", "--kind", "claude"]):
        refused = invoke(*args)
        assert (refused.exit_code, refused.output) == (
            2, "Error: give a QUEUE to pause, or --kind KIND\n",
        )  # fmt: skip


# -- cleanup and purge --------------------------------------------------------------------------


def test_cleanup_deletes_old_finished_jobs_in_batches(invoke, conn) -> None:
    old = {status: make_job(conn, status=status, finished_at=hours_ago(24 * 10))
           for status in ("succeeded", "cancelled", "failed")}  # fmt: skip
    recent = make_job(conn, status="succeeded", finished_at=hours_ago(1))
    queued = make_job(conn, created_at=hours_ago(24 * 10))
    result = invoke("cleanup", "--older-than", "7d")
    assert (result.exit_code, result.output) == (
        0, "deleted 2 succeeded or cancelled job(s) older than 7d\n",
    )  # fmt: skip
    left = {row[0] for row in conn.execute("SELECT id FROM claude_jobs")}
    assert left == {old["failed"], recent, queued}
    assert "deleted 1" in invoke("cleanup", "--older-than", "7d", "--include-failed").output
    for _ in range(25):
        make_job(conn, status="succeeded", finished_at=hours_ago(24 * 10))
    assert claude_jobs.cleanup_jobs(conn, 86400, batch=10) == 25


def test_a_worker_deletes_jobs_past_its_retention(
    conn, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(claude_jobs, "JANITOR_FIRST_PASS", 0.1)
    old = make_job(conn, status="succeeded", finished_at=hours_ago(3))
    failed = make_job(conn, status="failed", finished_at=hours_ago(3))
    recent = make_job(conn, status="succeeded", finished_at=hours_ago(0.5))
    worker = claude_jobs.Worker(db_url, handlers={"note": _note}, retention=3600)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_for(lambda: conn.execute("SELECT count(*) FROM claude_jobs").fetchone()[0] == 2,
                 what="the janitor")  # fmt: skip
    finally:
        worker.stop()
        thread.join()
    left = {row[0] for row in conn.execute("SELECT id FROM claude_jobs")}
    assert left == {failed, recent} and old not in left


def test_purge_says_what_it_would_delete_and_deletes_only_with_yes(invoke, conn) -> None:
    for _ in range(3):
        make_job(conn, queue="junk")
    running = make_job(conn, queue="junk", status="running")
    other = make_job(conn, queue="keep")
    dry = invoke("purge", "junk")
    assert (dry.exit_code, dry.output) == (
        0, "would delete 3 queued job(s) of queue junk: add --yes to do it\n",
    )  # fmt: skip
    assert conn.execute("SELECT count(*) FROM claude_jobs").fetchone()[0] == 5
    assert invoke("purge", "junk", "--yes").output == "deleted 3 queued job(s) of queue junk\n"
    assert {row[0] for row in conn.execute("SELECT id FROM claude_jobs")} == {running, other}


# -- enqueue --wait -----------------------------------------------------------------------------


def test_enqueue_wait_follows_the_job_and_exits_with_its_outcome(
    db_url: str, start_worker, claude_log, tmp_path: Path
) -> None:
    start_worker()

    def enqueue_and_wait(prompt: str) -> subprocess.CompletedProcess[str]:
        payload = json.dumps({"prompt": prompt, "cwd": str(tmp_path)})
        return subprocess.run(
            [sys.executable, "-m", "claude_jobs", "--database-url", db_url, "enqueue",
             "--wait", "--payload", payload],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": str(TESTS.parent)},
        )  # fmt: skip

    ok = enqueue_and_wait(fake(result="the answer"))
    assert ok.returncode == 0, ok.stderr
    assert "the answer" in ok.stdout and "succeeded" in ok.stderr
    failing = enqueue_and_wait(fake(emit="max-turns.stream.jsonl", exit=1))
    assert failing.returncode == 1
    assert "error_max_turns" in failing.stderr


def test_operations_on_a_missing_job_exit_1_and_bad_usage_2(invoke) -> None:
    missing = str(uuid.uuid4())
    for command in (["show"], ["logs"], ["cancel"], ["retry"], ["logs", "-f"]):
        result = invoke(*command, missing)
        assert (result.exit_code, result.output) == (1, f"Error: no job {missing}\n"), command
    for args in (["cancel"], ["pause"], ["purge"], ["cleanup", "--older-than", "soon"]):
        result = invoke(*args)
        assert result.exit_code == 2 and result.output.count("\n") == 1, args


# -- what jobs contain, on a terminal -----------------------------------------------------------

HOSTILE = "see \x1b]0;pwned\x07, \x1b]52;c;ZXZpbA==\x07, \x9b31m, \x1b[2J, \u202egnp.exe\r done"


def neutralised(text: str) -> bool:
    """No character a terminal would act on, but newlines and tabs."""
    return not any(
        (ord(c) < 32 and c not in "\n\t") or 0x7F <= ord(c) <= 0x9F or c == "\u202e" for c in text
    )


def test_control_characters_from_jobs_never_reach_the_terminal(invoke, conn) -> None:
    said = json.dumps(
        {"type": "assistant", "message": {"content": [{"type": "text", "text": HOSTILE}]}}
    )
    transcript = f"{said}\n{HOSTILE}\n"
    job_id = make_job(
        conn, payload=json.dumps({"prompt": HOSTILE}), status="failed", last_error=HOSTILE,
        errors=[{"attempt": 1, "error": HOSTILE}], transcript=transcript,
        transcript_size=len(transcript), queue="q\x1b[31m",
    )  # fmt: skip
    for args in (["list"], ["show", str(job_id)], ["logs", str(job_id)], ["stats"]):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        assert neutralised(result.output), (args, result.output)
        assert "pwned" in result.output or args == ["stats"]
    for args in (["list", "--json"], ["show", str(job_id), "--json"]):
        output = invoke(*args).output
        assert neutralised(output), (args, output)
        assert json.loads(output)["payload"]["prompt"] == HOSTILE  # the data, escaped


def test_a_workers_text_log_neutralises_control_characters() -> None:
    record = logging.LogRecord(
        "claude_jobs", logging.ERROR, "", 0, "failed error=%s", (HOSTILE,), None
    )
    assert neutralised(claude_jobs._TextFormatter().format(record))
    assert neutralised(claude_jobs._JsonFormatter().format(record))
