"""The claude handler: how it runs the CLI, what it keeps, and how it reads each outcome.

Most tests use the fake `claude` (conftest.FAKE_CLAUDE) replaying outputs captured from the
real CLI (tests/fixtures/claude-cli); one runs the real Claude Code CLI against a local mock
of the Messages API.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from pathlib import Path

import psycopg
import pytest
from conftest import FIXTURES, claude_runs, fake, job_row, pid_alive, wait_for
from mock_messages_api import Bash, MockMessagesAPI, Text

import claude_jobs
from claude_jobs import ClaudeHandler, Worker


def run_jobs(db_url: str, fake_claude: Path, **handler_options) -> None:
    handler = ClaudeHandler(str(fake_claude), **handler_options)
    Worker(db_url, burst=True, handlers={"claude": handler}, backoff_base=60).run()


def test_claude_runs_without_a_shell_in_the_cwd_with_the_prompt_on_stdin(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path
) -> None:
    workdir = tmp_path / "a dir with spaces"
    workdir.mkdir()
    prompt = "-p --version; $(rm -rf /) `id` 'quoted' \"double\" | & > <\n" + "é" * 1000
    job = claude_jobs.enqueue(conn, {"prompt": prompt, "cwd": str(workdir)})
    run_jobs(db_url, fake_claude)
    [run] = claude_runs(claude_log)
    assert run["argv"][1:] == [*claude_jobs.CLAUDE_ARGS, claude_jobs.SKIP_PERMISSIONS]
    assert run["argv"][1:] == [
        "-p", "--output-format", "stream-json", "--verbose", "--dangerously-skip-permissions",
    ]  # fmt: skip
    assert run["cwd"] == str(workdir)
    assert base64.b64decode(run["stdin"]) == prompt.encode()
    assert run["stdin_closed"]
    assert run["env"]["CLAUDE_JOBS_JOB_ID"] == str(job.id)
    assert run["env"]["CLAUDE_JOBS_ATTEMPT"] == "1"
    assert run["pgid"] == run["pid"], "claude leads a process group of its own"


def test_a_successful_run_stores_the_result_session_cost_and_transcript(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path
) -> None:
    job = claude_jobs.enqueue(conn, {"prompt": fake(result="all done"), "cwd": str(tmp_path)})
    run_jobs(db_url, fake_claude)
    row = job_row(conn, job.id)
    assert row["status"] == "succeeded"
    result = row["result"]
    assert (result["result"], result["is_error"], result["num_turns"]) == ("all done", False, 2)
    assert result["usage"] == {"input_tokens": 10, "output_tokens": 5}
    assert row["session_id"] == result["session_id"]
    assert float(row["cost_usd"]) == pytest.approx(0.0125)
    lines = row["transcript"].splitlines()
    assert json.loads(lines[0]) == {"type": "claude_jobs", "attempt": 1, "worker": row["worker"]}
    assert '"subtype": "init"' in lines[1] and '"type": "result"' in lines[-1]


def test_the_result_of_the_captured_real_success_stream_is_kept(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path
) -> None:
    job = claude_jobs.enqueue(
        conn, {"prompt": fake(emit="mock-success.stream.jsonl"), "cwd": str(tmp_path)}
    )
    run_jobs(db_url, fake_claude)
    row = job_row(conn, job.id)
    assert row["status"] == "succeeded"
    assert row["result"]["result"] == "Hello from the mock API."
    assert row["session_id"] == row["result"]["session_id"]


PERMANENT = "failed", 1
RETRY = "queued", 1
UNFIT = "queued", 0  # the worker's fault: back in the queue, the attempt not spent


@pytest.mark.parametrize(
    ("directives", "outcome", "error"),
    [
        ({"emit": "not-logged-in.stream.jsonl", "exit": 1}, UNFIT, "not logged in"),
        ({"emit": "invalid-api-key.json", "exit": 1}, UNFIT, "API key is invalid"),
        ({"emit": "credit-too-low.json", "exit": 1}, UNFIT, "credit balance is too low"),
        ({"emit": "max-turns.stream.jsonl", "exit": 1}, PERMANENT, "error_max_turns"),
        ({"emit": "max-budget.json", "exit": 1}, PERMANENT, "error_max_budget_usd"),
        (
            {
                "stdout": "",
                "stderr": (FIXTURES / "root-skip.out").read_text(),
                "exit": 1,
            },
            UNFIT,
            "refuses --dangerously-skip-permissions as root",
        ),
        ({"emit": "server-error-500.json", "exit": 1}, RETRY, "API Error: 500"),
        ({"emit": "overloaded-529.json", "exit": 1}, RETRY, "API Error: 529"),
        ({"emit": "api-key-429.json", "exit": 1}, RETRY, "Request rejected (429)"),
        ({"emit": "mock-429-after-retries.json", "exit": 1}, RETRY, "429"),
        (
            {"stdout": "", "stderr": "Segmentation fault\n", "exit": 1},
            RETRY,
            "exited with status 1",
        ),
        ({"stdout": "", "exit": 0}, RETRY, "exited with status 0 without a result"),
    ],
    ids=lambda value: (
        value.get("emit", value.get("stderr", "no output"))[:30]
        if isinstance(value, dict)
        else None
    ),
)
def test_each_outcome_of_the_cli_is_classified(
    conn: psycopg.Connection,
    db_url: str,
    fake_claude: Path,
    claude_log: Path,
    tmp_path: Path,
    directives: dict,
    outcome: tuple[str, int],
    error: str,
) -> None:
    job = claude_jobs.enqueue(conn, {"prompt": fake(**directives), "cwd": str(tmp_path)})
    run_jobs(db_url, fake_claude)
    row = job_row(conn, job.id)
    assert (row["status"], row["attempts"]) == outcome
    assert error in row["last_error"]
    if outcome == UNFIT:
        assert row["errors"] == [], "no attempt was spent"
    else:
        assert row["errors"][0]["permanent"] is (outcome == PERMANENT)


def test_a_failed_run_keeps_what_claude_said_and_what_it_cost(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path
) -> None:
    job = claude_jobs.enqueue(
        conn, {"prompt": fake(emit="max-budget.json", exit=1), "cwd": str(tmp_path)}
    )
    run_jobs(db_url, fake_claude)
    row = job_row(conn, job.id)
    assert row["result"]["subtype"] == "error_max_budget_usd"
    assert float(row["cost_usd"]) == pytest.approx(0.001)


def test_a_missing_claude_executable_is_the_workers_fault_not_the_jobs(
    conn: psycopg.Connection, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IS_SANDBOX", "1")
    job = claude_jobs.enqueue(conn, {"prompt": "hi", "cwd": str(tmp_path)})
    handler = ClaudeHandler(str(tmp_path / "no-such-claude"))
    worker = Worker(db_url, burst=True, handlers={"claude": handler})
    worker.run()  # it finds out at start, not when a job comes
    row = job_row(conn, job.id)
    assert (row["status"], row["attempts"]) == ("queued", 0)
    assert "claude executable not found" in (worker.idle_because or "")
    with pytest.raises(claude_jobs.WorkerUnfit, match="claude executable not found"):
        handler(job)  # and a job that comes anyway goes back unspent


def test_a_cwd_missing_on_the_worker_fails_the_job_at_once(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path
) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    job = claude_jobs.enqueue(conn, {"prompt": "hi", "cwd": str(gone)})
    gone.rmdir()
    run_jobs(db_url, fake_claude)
    row = job_row(conn, job.id)
    assert (row["status"], row["attempts"]) == ("failed", 1)
    assert "cwd is not a directory" in row["last_error"]
    assert claude_runs(claude_log) == []


def test_allow_dirs_confines_jobs(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path
) -> None:
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    (inside / "deeper").mkdir(parents=True)
    outside.mkdir()
    ok = claude_jobs.enqueue(conn, {"prompt": "hi", "cwd": str(inside / "deeper")})
    refused = claude_jobs.enqueue(conn, {"prompt": "hi", "cwd": str(outside)})
    run_jobs(db_url, fake_claude, allow_dirs=[inside])
    assert job_row(conn, ok.id)["status"] == "succeeded"
    assert job_row(conn, refused.id)["status"] == "failed"
    assert "outside the allowed" in job_row(conn, refused.id)["last_error"]


def test_a_timeout_kills_the_whole_process_group(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path
) -> None:
    job = claude_jobs.enqueue(
        conn,
        {"prompt": fake(sleep=600, child=True, ignore_term=True), "cwd": str(tmp_path)},
        timeout=1,
        max_attempts=1,
    )
    run_jobs(db_url, fake_claude, kill_grace=1)
    row = job_row(conn, job.id)
    assert (row["status"], row["attempts"]) == ("failed", 1)
    assert row["last_error"].startswith("timed out after 1s, its time limit:")
    [run] = claude_runs(claude_log)
    wait_for(
        lambda: not pid_alive(run["pid"]) and not pid_alive(run["child"]),
        timeout=5,
        what="claude and its child to be killed",
    )


def test_leftover_processes_of_a_finished_run_are_killed(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path
) -> None:
    job = claude_jobs.enqueue(conn, {"prompt": fake(child=True), "cwd": str(tmp_path)})
    run_jobs(db_url, fake_claude)
    assert job_row(conn, job.id)["status"] == "succeeded"
    [run] = claude_runs(claude_log)
    wait_for(lambda: not pid_alive(run["child"]), timeout=5, what="the stray child to die")


def test_the_worker_warns_when_root_runs_claude_without_is_sandbox(
    db_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.delenv("IS_SANDBOX", raising=False)
    with caplog.at_level(logging.WARNING, logger="claude_jobs"):
        Worker(db_url, burst=True).run()
    assert "running as root without IS_SANDBOX=1" in caplog.text
    caplog.clear()
    monkeypatch.setenv("IS_SANDBOX", "1")
    with caplog.at_level(logging.WARNING, logger="claude_jobs"):
        Worker(db_url, burst=True).run()
    assert "IS_SANDBOX" not in caplog.text


# -- the real Claude Code CLI -----------------------------------------------------------------


@pytest.mark.real_claude
def test_the_real_claude_cli_runs_a_job_whose_bash_tool_creates_a_file(
    conn: psycopg.Connection,
    db_url: str,
    real_claude: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    workdir, home = tmp_path / "project", tmp_path / "home"
    workdir.mkdir()
    home.mkdir()
    job = claude_jobs.enqueue(conn, {"prompt": "make a file, please", "cwd": str(workdir)})
    with MockMessagesAPI([Bash("touch made-by-claude.txt && pwd"), Text("done")]) as api:
        for name, value in {**api.env(), "HOME": str(home), "CLAUDE_CODE_MAX_RETRIES": "0"}.items():
            monkeypatch.setenv(name, value)
        Worker(db_url, burst=True, claude_bin=str(real_claude)).run()
    row = job_row(conn, job.id)
    assert row["status"] == "succeeded", row["last_error"]
    assert (workdir / "made-by-claude.txt").exists()
    assert row["result"]["result"] == "done"
    assert row["result"]["is_error"] is False
    assert row["session_id"] and row["session_id"] == row["result"]["session_id"]
    assert float(row["cost_usd"]) > 0
    assert "tool_use" in row["transcript"] and str(workdir) in row["transcript"]
    assert len(api.turns) == 2


def test_the_transcript_keeps_the_last_mebibyte(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path
) -> None:
    chatter = "".join(
        f'{{"type": "assistant", "n": {n}, "pad": "{"x" * 100}"}}\n' for n in range(15000)
    )
    job = claude_jobs.enqueue(conn, {"prompt": fake(stdout=chatter), "cwd": str(tmp_path)})
    run_jobs(db_url, fake_claude)
    transcript = job_row(conn, job.id)["transcript"]
    assert len(chatter) > claude_jobs.TRANSCRIPT_LIMIT
    assert claude_jobs.TRANSCRIPT_LIMIT - 200 < len(transcript) <= claude_jobs.TRANSCRIPT_LIMIT
    assert chatter.endswith(transcript)


def test_output_is_cut_into_lines_in_linear_time_and_long_lines_are_capped() -> None:
    lines: list[bytes] = []
    splitter = claude_jobs._LineSplitter(lines.append, limit=10)
    for piece in (b"ab", b"c\nde", b"f\n\n", b"0123456789abc", b"def\ntail"):
        splitter.feed(piece)
    splitter.flush()
    assert lines[:3] == [b"abc", b"def", b""]
    assert lines[3].startswith(b"0123456789 ") and b"6 more bytes" in lines[3]
    assert lines[4] == b"tail"


def test_a_line_of_40_mib_is_capped_in_the_transcript_and_the_job_succeeds(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path
) -> None:
    job = claude_jobs.enqueue(
        conn, {"prompt": fake(big_line=40 * 1024 * 1024), "cwd": str(tmp_path)}
    )
    run_jobs(db_url, fake_claude)
    row = job_row(conn, job.id)
    assert row["status"] == "succeeded"
    assert "not kept)" in row["transcript"]
    assert len(row["transcript"]) < 2 * claude_jobs.TRANSCRIPT_LINE_LIMIT
