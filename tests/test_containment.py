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
import uuid
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
    # (started as from a terminal, even when the tests run under nohup: SIGHUP not ignored)
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        worker = start_worker()
    finally:
        signal.signal(signal.SIGHUP, previous)
    wait_for(lambda: status_of(conn, job.id) == "running", what="the job to start")
    worker.signal(signal.SIGHUP)  # its terminal was closed
    worker.wait_for_log("stopping: waiting for 1 running job(s)")
    assert worker.wait() == 0
    assert status_of(conn, job.id) == "succeeded"
    assert conn.execute("SELECT count(*) FROM claude_jobs_workers").fetchone() == (0,)


def supervise(command: list[str], lease: float | None = None, grace: float = 0.5, **popen):
    """The supervisor of ``command`` as a process of its own, with its two pipes."""
    control, steer = claude_jobs._pipe(1)
    told, report = claude_jobs._pipe(0)
    process = subprocess.Popen(
        claude_jobs._supervised(command, control, report, lease, grace),
        pass_fds=(control, report), start_new_session=True, **popen,
    )  # fmt: skip
    os.close(control)
    os.close(report)
    return process, steer, told


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
    supervisor, steer, told = supervise([sys.executable, str(script)], stdout=subprocess.PIPE)
    try:
        detached = int(supervisor.stdout.readline())
        supervisor.send_signal(signum)
        assert supervisor.wait(timeout=5) != 0
        wait_for(lambda: not pid_alive(detached), timeout=2, what="the detached process to die")
    finally:
        supervisor.kill()
        supervisor.wait()
        os.close(steer)
        os.close(told)


def test_the_supervisor_exits_as_the_command_did_even_killed_by_sigkill() -> None:
    for command, status in ((["sh", "-c", "exit 3"], 3), (["sh", "-c", "kill -9 $$"], -9)):
        supervisor, steer, told = supervise(command)
        assert supervisor.wait(timeout=10) == status
        os.close(steer)
        os.close(told)


def test_the_command_gets_sigpipe_as_a_program_expects() -> None:
    """Python ignores SIGPIPE and SIGXFSZ; the command must not inherit that."""
    supervisor, steer, told = supervise(
        ["sh", "-c", "grep SigIgn /proc/$$/status"], stdout=subprocess.PIPE
    )
    ignored = int(supervisor.stdout.read().split()[1], 16)
    assert supervisor.wait(timeout=10) == 0
    assert not ignored & (1 << (signal.SIGPIPE - 1)) and not ignored & (1 << (signal.SIGXFSZ - 1))
    os.close(steer)
    os.close(told)


@pytest.mark.slow
def test_a_lease_that_runs_out_while_leftovers_linger_ends_them_then(tmp_path: Path) -> None:
    """After claude exits on a stop, a leftover that ignores SIGTERM dies when the lease
    runs out, not at the end of a long grace, and the attempt says why."""
    script = ("import subprocess, sys, signal; signal.signal(signal.SIGTERM, signal.SIG_DFL); "
              "p = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
              "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'], "
              "start_new_session=True); print(p.pid, flush=True); signal.pause()")  # fmt: skip
    clock = claude_jobs._lease_clock
    lease_end = clock() + 2.0
    context = claude_jobs.RunContext(uuid.uuid4(), 1, None, 0.5, lease=lambda: lease_end)
    lines: list[bytes] = []
    ended = claude_jobs._run_process(
        [sys.executable, "-c", script], cwd=str(tmp_path), env=os.environ, stdin=b"",
        context=context, on_line=lines.append, kill_grace=120,
    )  # fmt: skip
    assert ended.timed_out and ended.lease_ran_out
    assert not pid_alive(int(lines[0]))
    assert clock() < lease_end + 30, "it did not wait for the grace of two minutes"


def test_an_attempt_whose_lease_ran_out_is_a_counted_failure_unless_fenced(
    fake_claude: Path, claude_log: Path, tmp_path: Path
) -> None:
    job = claude_jobs.Job.from_row(
        {"id": uuid.uuid4(), "queue": "q", "kind": "claude", "priority": 0, "status": "running",
         "payload": {"prompt": fake(sleep=600), "cwd": str(tmp_path)}, "attempts": 1,
         "max_attempts": 5, "errors": [], "run_at": None, "created_at": None, "updated_at": None},
        claude_jobs.RunContext(uuid.uuid4(), 1, None, 60, lease=lambda: 0.0),
    )  # fmt: skip
    with pytest.raises(claude_jobs.JobFailed, match="its lease ran out"):
        claude_jobs.ClaudeHandler(str(fake_claude))(job)


def test_recovery_finds_the_commands_processes_but_spares_their_supervisor(tmp_path: Path) -> None:
    context = claude_jobs.RunContext(uuid.uuid4(), 1, None, 60)
    lines: list[bytes] = []
    marks = {"CLAUDE_JOBS_JOB_ID": str(context.job_id), "CLAUDE_JOBS_ATTEMPT": "1"}
    ended = claude_jobs._run_process(
        ["sh", "-c", "tr '\\0' '\\n' < /proc/$$/environ; tr '\\0' '\\n' < /proc/$PPID/environ"],
        cwd=str(tmp_path), env=os.environ, stdin=b"", context=context, on_line=lines.append,
        kill_grace=1, marks=marks,
    )  # fmt: skip
    assert ended.returncode == 0
    text = b"\n".join(lines).decode()
    assert text.count(f"CLAUDE_JOBS_JOB_ID={context.job_id}") == 1, (
        "the command's, not its parent's"
    )


def test_a_worker_started_with_nohup_ignores_sighup(
    conn: psycopg.Connection, start_worker, claude_log: Path, tmp_path: Path
) -> None:
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup leaves it
    try:
        worker = start_worker()
    finally:
        signal.signal(signal.SIGHUP, previous)
    worker.wait_for_log("started")
    worker.signal(signal.SIGHUP)
    job = claude_jobs.enqueue(conn, {"prompt": "after the hangup", "cwd": str(tmp_path)})
    wait_for(lambda: status_of(conn, job.id) == "succeeded", what="the worker to work on")
    assert "stopping" not in worker.log()
