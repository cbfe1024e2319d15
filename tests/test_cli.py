"""The command line: enqueue (one job, a file of jobs, every kind of bad input), show,
password masking, help, and the embedded database used with no DATABASE_URL."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from conftest import TESTS, job_row, wait_for

import claude_jobs

cli = claude_jobs.cli


def count(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM claude_jobs").fetchone()[0]


def test_enqueue_prints_the_new_jobs_id_alone(invoke, conn: psycopg.Connection) -> None:
    result = invoke("enqueue", "--payload", '{"prompt": "explain this code"}')
    assert result.exit_code == 0, result.output
    job_id = uuid.UUID(result.output.strip())
    assert result.output == f"{job_id}\n"
    row = job_row(conn, job_id)
    assert (row["kind"], row["queue"], row["status"], row["max_attempts"]) == (
        "claude", "default", "queued", 5,
    )  # fmt: skip


def test_enqueue_options_land_on_the_job(invoke, conn: psycopg.Connection) -> None:
    result = invoke(
        "enqueue", "--payload", '{"prompt": "x"}', "--queue", "nightly", "--priority", "-7",
        "--max-attempts", "2", "--timeout", "1h30m", "--delay", "5m",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    row = job_row(conn, result.output.strip())
    assert (row["queue"], row["priority"], row["max_attempts"], row["timeout"]) == (
        "nightly", -7, 2, 5400.0,
    )  # fmt: skip
    wait = (row["run_at"] - row["created_at"]).total_seconds()
    assert 295 < wait < 305
    at = invoke("enqueue", "--payload", '{"prompt": "x"}', "--run-at", "2031-01-02T03:04:05Z")
    assert job_row(conn, at.output.strip())["run_at"] == datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)


class _SlowInput(io.BytesIO):
    """Standard input whose writer takes a while to write its first line."""

    def __iter__(self) -> _SlowInput:
        time.sleep(1.5)
        return self


def test_a_delay_counts_from_when_the_jobs_are_queued_not_from_the_command_start(
    invoke, conn: psycopg.Connection, db_url: str
) -> None:
    lines = _SlowInput(b'{"prompt": "x"}\n')
    command = ["--database-url", db_url, "enqueue", "--file", "-", "--delay", "5m"]
    result = CliRunner().invoke(claude_jobs.cli, command, input=lines)
    assert result.exit_code == 0, result.output
    row = job_row(conn, result.output.strip())
    assert 299.0 < (row["run_at"] - row["created_at"]).total_seconds() <= 300.5


def test_a_continuation_of_no_job_is_refused_before_the_database(conn: psycopg.Connection) -> None:
    with pytest.raises(claude_jobs.InvalidJob, match="continue_from is empty"):
        claude_jobs.enqueue(conn, {"prompt": "x"}, continue_from="")


def test_a_backslash_u0000_that_is_text_is_not_a_nul(invoke, conn: psycopg.Connection) -> None:
    result = invoke("enqueue", "--payload", '{"prompt": "the escape \\\\u0000 in C"}')
    assert result.exit_code == 0, result.output
    prompt = job_row(conn, result.output.strip())["payload"]["prompt"]
    assert prompt == "the escape \\u0000 in C"


def test_enqueue_json_prints_the_row(invoke) -> None:
    result = invoke("enqueue", "--payload", '{"prompt": "x"}', "--json")
    assert result.exit_code == 0
    row = json.loads(result.output)
    assert row["status"] == "queued" and row["payload"] == {"prompt": "x"}
    assert datetime.fromisoformat(row["created_at"])


def test_a_relative_cwd_is_resolved_where_enqueue_runs(
    invoke, conn: psycopg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    here = invoke("enqueue", "--payload", '{"prompt": "x", "cwd": "."}')
    sub = invoke("enqueue", "--payload", '{"prompt": "x", "cwd": "sub"}')
    assert job_row(conn, here.output.strip())["payload"]["cwd"] == str(tmp_path)
    assert job_row(conn, sub.output.strip())["payload"]["cwd"] == str(tmp_path / "sub")


BAD_INPUT = [
    (["--payload", "{not json"], "--payload is not valid JSON"),
    (["--payload", "[1, 2]"], "must be a JSON object, not an array"),
    (["--payload", '"text"'], "must be a JSON object, not a string"),
    (["--payload", "{}"], 'needs "prompt"'),
    (["--payload", '{"prompt": ""}'], 'needs "prompt"'),
    (["--payload", '{"prompt": 42}'], 'needs "prompt"'),
    (["--payload", '{"prompt": "x", "cwd": "/no/such/dir"}'], "not an existing directory"),
    (["--payload", '{"prompt": "x", "cwd": 3}'], '"cwd" must be a non-empty string'),
    (["--payload", '{"prompt": "x", "modle": "opus"}'], "unknown payload key 'modle'"),
    (["--payload", '{"prompt": "a\\u0000b"}'], "NUL character"),
    (["--payload", '{"prompt": "x"}', "--priority", "2147483648"], "not in the range"),
    (["--payload", '{"prompt": "x"}', "--priority", "high"], "not a valid integer"),
    (["--payload", '{"prompt": "x"}', "--delay", "soon"], "invalid duration 'soon'"),
    (["--payload", '{"prompt": "x"}', "--delay", "-5"], "invalid duration"),
    (["--payload", '{"prompt": "x"}', "--run-at", "tomorrow"], "invalid time 'tomorrow'"),
    (["--payload", '{"prompt": "x"}', "--delay", "5m", "--run-at", "2031-01-01"], "not both"),
    (["--payload", '{"prompt": "x"}', "--max-attempts", "0"], "not in the range"),
    (["--payload", '{"prompt": "x"}', "--max-attempts", "-1"], "not in the range"),
    (["--payload", '{"prompt": "x"}', "--kind", "nosuch"], "unknown kind 'nosuch'"),
    (["--payload", '{"prompt": "x"}', "--queue", "a,b"], "invalid queue name"),
    (["--payload", '{"prompt": "x"}', "--timeout", "0"], "timeout must be positive"),
    (["--payload", '{"prompt": "x"}', "--import", "no_such_module"], "cannot import"),
    ([], "give a prompt (or --prompt-file), --payload JSON, or --file PATH"),
    (["--payload", "{}", "--file", "-"], "give a prompt (or --prompt-file), --payload JSON"),
    (["--file", "/no/such/file.jsonl"], "No such file"),
    (["--payload", '{"prompt": "x"}', "--bogus"], "No such option"),
    (["--payload", '{"prompt": "x"}', "--delay", "1e12"], "up to ten years"),
    (["--payload", '{"prompt": "x"}', "--delay", "99999999d"], "up to ten years"),
    (["--payload", '{"prompt": "x"}', "--run-at", "0001-01-01T00:00:00"], "invalid time"),
    (["--payload", '{"prompt": "x"}', "--run-at", "0001-01-01T00:00:00+14:00"], "out of range"),
    (["--payload", '{"prompt": "x"}', "--run-at", "9999-12-31T23:59:59-14:00"], "out of range"),
    (["--payload", '{"prompt": "x"}', "--timeout", "nan"], "invalid duration"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    invoke, conn: psycopg.Connection, args: list[str], message: str
) -> None:
    result = invoke("enqueue", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert count(conn) == 0


def test_enqueue_file_queues_every_line_in_one_go(
    invoke, conn: psycopg.Connection, tmp_path: Path
) -> None:
    lines = [json.dumps({"prompt": f"review {n}", "cwd": str(tmp_path)}) for n in range(50)]
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(lines[:25]) + "\n\n" + "\n".join(lines[25:]) + "\n")
    result = invoke("enqueue", "--file", str(path), "--queue", "bulk", "--priority", "3")
    assert result.exit_code == 0, result.output
    ids = [uuid.UUID(line) for line in result.output.splitlines()]
    assert len(ids) == 50
    rows = conn.execute(
        "SELECT id, payload->>'prompt', queue, priority FROM claude_jobs"
    ).fetchall()
    by_id = {row[0]: row[1:] for row in rows}
    assert [by_id[i] for i in ids] == [(f"review {n}", "bulk", 3) for n in range(50)]


def test_enqueue_file_reads_stdin(invoke, conn: psycopg.Connection) -> None:
    result = invoke("enqueue", "--file", "-", input='{"prompt": "a"}\n{"prompt": "b"}\n')
    assert result.exit_code == 0, result.output
    assert len(result.output.splitlines()) == 2 and count(conn) == 2


@pytest.mark.parametrize(
    ("third_line", "message"),
    [
        ("{oops", "line 3 of <stdin>: it is not valid JSON"),
        ('["a list"]', "line 3 of <stdin>: the payload must be a JSON object"),
        ('{"cwd": "/tmp"}', 'line 3 of <stdin>: a claude job needs "prompt"'),
    ],
)
def test_a_bad_line_names_its_number_and_nothing_is_written(
    invoke, conn: psycopg.Connection, third_line: str, message: str
) -> None:
    text = '{"prompt": "a"}\n{"prompt": "b"}\n' + third_line + '\n{"prompt": "d"}\n'
    result = invoke("enqueue", "--file", "-", input=text)
    assert result.exit_code == 2
    assert result.output == f"Error: {message}" + result.output.split(message, 1)[1]
    assert result.output.count("\n") == 1
    assert count(conn) == 0


def test_a_file_that_is_not_utf8_is_refused_by_line(invoke, conn, tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    result = invoke("enqueue", "--file", str(path))
    assert result.exit_code == 2
    assert result.output == f"Error: line 2 of {path} is not UTF-8 text\n"
    assert count(conn) == 0


def test_a_failing_bulk_insert_writes_nothing(conn: psycopg.Connection) -> None:
    conn.execute(
        "ALTER TABLE claude_jobs ADD CONSTRAINT short CHECK (length(payload->>'prompt') < 5)"
    )
    with pytest.raises(psycopg.errors.CheckViolation):
        claude_jobs.enqueue_many(conn, [{"prompt": "ok"}, {"prompt": "far too long"}])
    assert count(conn) == 0


def test_show_prints_a_summary_and_json(invoke, conn: psycopg.Connection) -> None:
    job = claude_jobs.enqueue(conn, {"prompt": "explain this code"})
    text = invoke("show", str(job.id))
    assert text.exit_code == 0
    assert str(job.id) in text.output and "queued, attempt 0 of 5" in text.output
    assert "explain this code" in text.output
    as_json = invoke("show", str(job.id), "--json")
    data = json.loads(as_json.output)
    assert data["id"] == str(job.id) and data["payload"] == {"prompt": "explain this code"}
    assert {
        "status",
        "attempts",
        "errors",
        "result",
        "session_id",
        "cost_usd",
        "transcript",
    } <= set(data)


def test_show_of_an_unknown_job_exits_1_and_of_a_malformed_id_2(invoke) -> None:
    result = invoke("show", str(uuid.uuid4()))
    assert result.exit_code == 1 and result.output.startswith("Error: no job ")
    result = invoke("show", "not-an-id")
    assert result.exit_code == 2
    assert result.output == (
        "Error: 'not-an-id' is not a job id: give an id, or its first 6 or more digits\n"
    )


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://me:s3cret@db:5432/app", "postgresql://me:***@db:5432/app"),
        ("postgres://me:s3cret@db/app?sslmode=require", "postgres://me:***@db/app?sslmode=require"),
        ("postgresql://me@db/app?password=s3cret&x=1", "postgresql://me@db/app?password=***&x=1"),
        ("host=db user=me password=s3cret dbname=app", "host=db user=me password=*** dbname=app"),
        ("host=db password='s3 cret' dbname=app", "host=db password=*** dbname=app"),
        ("postgresql://me@db:5432/app", "postgresql://me@db:5432/app"),
        ("postgresql://me:se?cret@db/app", "postgresql://me:***@db/app"),
        ("postgresql://me:se#cret@db/app", "postgresql://me:***@db/app"),
        ("postgresql://me:p@ss@db/app?x=1", "postgresql://me:***@db/app?x=1"),
        ("postgresql://me:pa/ss@db/app?x=1", "postgresql://me:***@db/app?x=1"),
    ],
)
def test_mask_url_hides_the_password(url: str, masked: str) -> None:
    assert claude_jobs.mask_url(url) == masked


def test_an_unreachable_database_is_one_line_without_the_password() -> None:
    result = CliRunner().invoke(
        cli,
        ["--database-url", "postgresql://me:s3cret@127.0.0.1:1/app", "show", str(uuid.uuid4())],
    )
    assert result.exit_code == 1
    assert result.output.startswith("Error: cannot connect to postgresql://me:***@127.0.0.1:1/app")
    assert "s3cret" not in result.output and result.output.count("\n") == 1


@pytest.mark.parametrize("password", ["s3%cret", "p@ss%", "pa/ss%"])
def test_an_unparsable_database_url_does_not_leak_its_password(password: str) -> None:
    url = f"postgresql://me:{password}@h/d"
    result = CliRunner().invoke(cli, ["--database-url", url, "list"])
    assert result.exit_code == 2
    assert "invalid database URL postgresql://me:***@h/d" in result.output
    assert password not in result.output and result.output.count("\n") == 1


def test_an_invalid_database_url_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["--database-url", "postgresql://x:pw@h/d?bad=1", "migrate"])
    assert result.exit_code == 2
    assert "invalid database URL" in result.output and "pw" not in result.output


def test_without_pgserver_or_a_url_it_says_how_to_get_a_database(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "pgserver", None)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("CLAUDE_JOBS_DATABASE_URL", raising=False)
    result = CliRunner().invoke(cli, ["--home", str(tmp_path), "show", str(uuid.uuid4())])
    assert result.exit_code == 1
    assert result.output == (
        "Error: no database configured: set DATABASE_URL (or --database-url), or install the "
        "embedded PostgreSQL with: pip install 'claude-jobs[embedded]'\n"
    )


def test_worker_options_are_checked(invoke) -> None:
    result = invoke("worker", "--queues", "a,*")
    assert result.exit_code == 2
    assert result.output == "Error: * means every queue and cannot be combined with queue names\n"
    result = invoke("worker", "--concurrency", "0")
    assert result.exit_code == 2 and result.output.count("\n") == 1


def commands() -> list[list[str]]:
    return [[], *([name] for name in cli.commands)]


@pytest.mark.parametrize("command", commands(), ids=lambda c: " ".join(c) or "claude-jobs")
def test_every_command_has_help_with_an_example(command: list[str]) -> None:
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output


def test_the_embedded_database_runs_the_quick_start(
    tmp_path: Path, fake_claude: Path, claude_log: Path
) -> None:
    """With no DATABASE_URL: enqueue in one process, a worker in another, then show."""
    env = {
        **os.environ,
        "CLAUDE_JOBS_HOME": str(tmp_path / "home"),
        "CLAUDE_JOBS_CLAUDE_BIN": str(fake_claude),
        "PYTHONPATH": str(TESTS.parent),
    }
    for name in ("DATABASE_URL", "CLAUDE_JOBS_DATABASE_URL"):
        env.pop(name, None)
    project = tmp_path / "project"
    project.mkdir()

    def claude_jobs_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "claude_jobs", *args], cwd=project, env=env,
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    enqueued = claude_jobs_cli("enqueue", "--payload", '{"prompt":"explain this code","cwd":"."}')
    assert enqueued.returncode == 0, enqueued.stderr
    job_id = enqueued.stdout.strip()
    worker = claude_jobs_cli("worker", "--burst")
    assert worker.returncode == 0, worker.stderr
    assert "succeeded" in worker.stderr
    shown = claude_jobs_cli("show", job_id)
    assert shown.returncode == 0, shown.stderr
    assert "succeeded" in shown.stdout and "echo: explain this code" in shown.stdout
    assert f"cwd       {project}" in shown.stdout


@pytest.mark.slow
def test_a_command_stopped_by_sigterm_or_ctrl_c_lets_the_embedded_postgresql_go(
    tmp_path: Path,
) -> None:
    """serve stops on SIGTERM and exits 0; a command that waits (logs -f) stops on Ctrl-C and
    exits 130, saying so but no error; either way the embedded server stops after them."""
    home = tmp_path / "home"
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent), "CLAUDE_JOBS_HOME": str(home)}
    for name in ("DATABASE_URL", "CLAUDE_JOBS_DATABASE_URL"):
        env.pop(name, None)
    pidfile = home / "pgdata" / "postmaster.pid"
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = tmp_path / f"{args[0]}.log"
        process = subprocess.Popen([sys.executable, "-m", "claude_jobs", *args], env=env,
                                   stdout=log.open("wb"), stderr=subprocess.STDOUT)  # fmt: skip
        started.append(process)
        return process, log

    try:
        _stop_and_see_the_embedded_server_go(start, env, tmp_path, pidfile)
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()


def _stop_and_see_the_embedded_server_go(
    start: Any, env: dict[str, str], tmp_path: Path, pidfile: Path
) -> None:
    serve, log = start("serve", "--port", "0")
    wait_for(lambda: "claude-jobs serve: http" in log.read_text(), 60, "serve to start")
    assert pidfile.exists()
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(10) == 0, log.read_text()
    wait_for(lambda: not pidfile.exists(), 20, "the embedded server to stop after serve")
    enqueued = subprocess.run([sys.executable, "-m", "claude_jobs", "enqueue", "wait for me"],
                              env=env, cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert enqueued.returncode == 0, enqueued.stderr
    follow, log = start("logs", "-f", enqueued.stdout.strip())
    wait_for(lambda: "waiting:" in log.read_text(), 60, "logs -f to wait for the job")
    follow.send_signal(signal.SIGINT)
    assert follow.wait(10) == 130
    said = log.read_text()
    assert "stopped following job" in said and "Error" not in said and "Traceback" not in said
    wait_for(lambda: not pidfile.exists(), 20, "the embedded server to stop after logs -f")
