"""Containment: no process of an attempt outlives its claim.

The real Claude Code CLI runs each Bash tool command in a session of its own, so killing
claude's process group misses them. These tests give the fake claude the same shapes (a
grandchild in a session of its own, one that ignores SIGTERM) and check that nothing of an
attempt runs on after it finished, was cancelled, timed out, or its worker died, froze or was
cut off: no process of an attempt runs once its claim could pass to another worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from conftest import claude_runs, fake, job_row, pid_alive, status_of, wait_for

import claude_jobs
from claude_jobs import ClaudeHandler, Worker


def processes(run: dict) -> list[int]:
    """Every process of a fake claude run that was recorded: claude, its child, and the
    grandchild in a session of its own."""
    return [run[name] for name in ("pid", "child", "detached") if name in run]


def all_gone(pids: list[int]) -> bool:
    return not any(pid_alive(pid) for pid in pids)


def test_a_finished_run_leaves_no_process_behind_even_in_a_session_of_its_own(
    conn: psycopg.Connection, start_worker, claude_log: Path, tmp_path: Path
) -> None:
    job = claude_jobs.enqueue(
        conn, {"prompt": fake(detach={"ignore_term": True}), "cwd": str(tmp_path)}
    )
    worker = start_worker("--burst")
    assert worker.wait() == 0
    assert status_of(conn, job.id) == "succeeded"
    [run] = claude_runs(claude_log)
    wait_for(lambda: all_gone(processes(run)), timeout=5, what="the detached command to die")


def test_cancel_stops_commands_in_sessions_of_their_own_even_when_they_ignore_sigterm(
    conn: psycopg.Connection, db_url: str, start_worker, claude_log: Path, tmp_path: Path
) -> None:
    job = claude_jobs.enqueue(
        conn,
        {"prompt": fake(sleep=600, child=True, detach={"ignore_term": True}), "cwd": str(tmp_path)},
    )
    start_worker()
    [run] = wait_for(lambda: claude_runs(claude_log), what="claude to start")
    claude_jobs.cancel_job(conn, job.id)
    wait_for(lambda: status_of(conn, job.id) == "cancelled", what="the cancel")
    wait_for(lambda: all_gone(processes(run)), timeout=6, what="every process of the job to die")


def test_a_timeout_kills_commands_in_sessions_of_their_own(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path
) -> None:
    job = claude_jobs.enqueue(
        conn,
        {"prompt": fake(sleep=600, detach={"ignore_term": True}), "cwd": str(tmp_path)},
        timeout=1,
        max_attempts=1,
    )
    handler = ClaudeHandler(str(fake_claude), kill_grace=1)
    Worker(db_url, burst=True, handlers={"claude": handler}).run()
    assert job_row(conn, job.id)["last_error"].startswith("timed out")
    [run] = claude_runs(claude_log)
    wait_for(lambda: all_gone(processes(run)), timeout=5, what="every process of the job to die")


def test_a_worker_killed_with_sigkill_leaves_no_process_within_2s(
    conn: psycopg.Connection, start_worker, claude_log: Path, tmp_path: Path
) -> None:
    prompt = fake(sleep=600, child=True, detach={"ignore_term": True})
    claude_jobs.enqueue(conn, {"prompt": prompt, "cwd": str(tmp_path)})
    worker = start_worker()
    [run] = wait_for(lambda: claude_runs(claude_log), what="claude to start")
    worker.signal(signal.SIGKILL)
    worker.wait()
    # No other worker runs: nothing but the dead worker's own arrangements can clean up.
    wait_for(lambda: all_gone(processes(run)), timeout=2, what="every process of the job to die")


def test_a_worker_stopped_past_its_heartbeat_timeout_leaves_nothing_running_at_the_takeover(
    conn: psycopg.Connection, start_worker, claude_log: Path, tmp_path: Path
) -> None:
    prompt = fake(sleep=600, child=True, detach={"ignore_term": True})
    job = claude_jobs.enqueue(conn, {"prompt": prompt, "cwd": str(tmp_path)})
    frozen = start_worker("--heartbeat-timeout", "6s")
    [first] = wait_for(lambda: claude_runs(claude_log), what="claude to start")
    frozen.signal(signal.SIGSTOP)  # as Ctrl-Z does: its lock stays held, its threads stand still
    try:
        # No other worker runs, so no recovery on this host can help: within the heartbeat
        # timeout, when another worker (on any host) could take the job, nothing of it runs.
        wait_for(lambda: all_gone(processes(first)), timeout=6, what="the frozen attempt to end")
        conn.execute(
            "UPDATE claude_jobs SET payload = jsonb_set(payload, '{prompt}', %s)",
            [psycopg.types.json.Jsonb(fake(sleep=0, result="from the survivor"))],
        )
        start_worker("--heartbeat-timeout", "6s")
        wait_for(lambda: status_of(conn, job.id) == "succeeded", timeout=30, what="the takeover")
        assert job_row(conn, job.id)["result"]["result"] == "from the survivor"
    finally:
        frozen.signal(signal.SIGCONT)


def test_sighup_stops_the_worker_as_sigterm_does(
    conn: psycopg.Connection, start_worker, claude_log: Path, tmp_path: Path
) -> None:
    job = claude_jobs.enqueue(conn, {"prompt": fake(sleep=2), "cwd": str(tmp_path)})
    worker = start_worker()
    wait_for(lambda: status_of(conn, job.id) == "running", what="the job to start")
    worker.signal(signal.SIGHUP)  # its terminal was closed
    worker.wait_for_log("stopping: waiting for 1 running job(s)")
    assert worker.wait() == 0
    assert status_of(conn, job.id) == "succeeded"
    assert conn.execute("SELECT count(*) FROM claude_jobs_workers").fetchone() == (0,)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_to_the_supervisor_stops_the_whole_attempt(signum: int, tmp_path: Path) -> None:
    """The supervisor, signalled by someone else, takes its whole subtree down with it."""
    script = tmp_path / "tree.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'], "
        "start_new_session=True)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    read, write = claude_jobs._control_pipe()  # kept open: closing it is the worker dying
    supervisor = subprocess.Popen(
        claude_jobs._supervised([sys.executable, str(script)], read, None, grace=0.5),
        stdout=subprocess.PIPE, pass_fds=(read,), start_new_session=True,
    )  # fmt: skip
    try:
        detached = int(supervisor.stdout.readline())
        supervisor.send_signal(signum)
        assert supervisor.wait(timeout=5) != 0
        wait_for(lambda: not pid_alive(detached), timeout=2, what="the detached process to die")
    finally:
        supervisor.kill()
        supervisor.wait()
        os.close(read)
        os.close(write)
