"""The reliability suite: no job lost, none run twice at once, whatever happens to workers,
the network or PostgreSQL; bad input changes nothing; hostile prompts reach claude intact.

Run it alone with `pytest -m reliability`; `.ci/run` runs it with everything else.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pgserver
import psycopg
import pytest
from click.testing import CliRunner
from conftest import TESTS, claude_runs, fake, job_row, pid_alive, wait_for
from handlers import EXECUTIONS_TABLE
from tcp_proxy import TcpProxy

import claude_jobs

pytestmark = pytest.mark.reliability


def count(conn: psycopg.Connection, status: str) -> int:
    query = "SELECT count(*) FROM claude_jobs WHERE status = %s"
    return conn.execute(query, [status]).fetchone()[0]


def assert_each_ran_once_and_never_overlapped(conn: psycopg.Connection, jobs: int) -> None:
    """Every job succeeded, with exactly one execution recorded, and no job ever had two
    executions at the same time."""
    assert count(conn, "succeeded") == jobs
    runs = conn.execute("SELECT job_id, count(*) FROM executions GROUP BY job_id").fetchall()
    assert len(runs) == jobs, "some job never ran"
    assert {n for _, n in runs} == {1}, "some job ran more than once"


# -- exactly once ---------------------------------------------------------------------------


def test_exactly_once_with_four_workers_and_20000_jobs(
    conn: psycopg.Connection, db_url: str, start_worker
) -> None:
    conn.execute(EXECUTIONS_TABLE)
    jobs = 20_000
    claude_jobs.enqueue_many(conn, [{"n": n} for n in range(jobs)], kind="record")
    workers = [
        start_worker("--import", "handlers", "--concurrency", "10", RECORD_URL=db_url)
        for _ in range(4)
    ]
    wait_for(lambda: count(conn, "succeeded") == jobs, timeout=100, what="all jobs to succeed")
    assert_each_ran_once_and_never_overlapped(conn, jobs)
    pids = conn.execute("SELECT count(DISTINCT pid) FROM executions").fetchone()[0]
    assert pids == 4, "every worker took a share"
    for worker in workers:
        worker.signal(signal.SIGTERM)
    assert [worker.wait() for worker in workers] == [0, 0, 0, 0]


# -- crashes --------------------------------------------------------------------------------


def test_sigkill_in_the_middle_of_50_running_jobs(
    conn: psycopg.Connection, db_url: str, start_worker
) -> None:
    conn.execute(EXECUTIONS_TABLE)
    claude_jobs.enqueue_many(conn, [{"sleep_first": 600}] * 50, kind="record")
    doomed = start_worker("--import", "handlers", "--concurrency", "50", RECORD_URL=db_url)
    wait_for(lambda: count(conn, "running") == 50, what="50 running jobs")
    survivor = start_worker("--import", "handlers", "--concurrency", "50", RECORD_URL=db_url)
    survivor.wait_for_log("started")
    doomed.signal(signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: count(conn, "succeeded") == 50, what="the survivor to finish them")
    recovery = time.monotonic() - killed
    print(f"\n50 jobs of a killed worker recovered and finished in {recovery:.1f}s")
    assert recovery < 10
    rows = conn.execute("SELECT attempts, errors FROM claude_jobs").fetchall()
    assert {attempts for attempts, _ in rows} == {2}
    assert all(len(errors) == 1 and "interrupted" in errors[0]["error"] for _, errors in rows)
    assert_each_ran_once_and_never_overlapped(conn, 50)


@pytest.fixture
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    """A PostgreSQL of this test's own, and a function that restarts it (pg_ctl restart)."""
    pgdata = tmp_path_factory.mktemp("restarted") / "data"
    server = pgserver.get_server(pgdata, cleanup_mode="delete")
    pg_ctl = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pg_ctl"
    user = "pgserver" if os.geteuid() == 0 else None

    def restart() -> None:
        # The server's log goes to its file: a server holding our pipe would never let go.
        subprocess.run(
            [str(pg_ctl), "-D", str(pgdata), "-l", str(pgdata / "log"), "-w", "-m", "fast",
             "restart"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, user=user,
            timeout=60,
        )  # fmt: skip

    url = server.get_uri()
    with psycopg.connect(url, autocommit=True) as conn:
        claude_jobs.migrate(conn)
        conn.execute(EXECUTIONS_TABLE)
    yield url, restart
    server.cleanup()


def test_a_postgresql_restart_while_two_workers_drain_5000_jobs(own_server, start_worker) -> None:
    url, restart = own_server
    jobs = 5_000
    with psycopg.connect(url, autocommit=True) as conn:
        claude_jobs.enqueue_many(conn, [{"sleep": 0.002}] * jobs, kind="record")
    workers = [
        start_worker("--import", "handlers", "--backoff-base", "0.2s", url=url, RECORD_URL=url)
        for _ in range(2)
    ]

    def succeeded() -> int:
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                return count(conn, "succeeded")
        except psycopg.OperationalError:
            return 0

    wait_for(lambda: succeeded() > jobs // 5, what="the drain to be under way")
    restart()
    wait_for(lambda: succeeded() == jobs, timeout=90, what="every job to succeed")
    with psycopg.connect(url, autocommit=True) as conn:
        assert count(conn, "succeeded") == jobs
        # A job whose attempt broke on the restart ran again; none ran twice at once.
        overlapping = conn.execute(
            """SELECT count(*) FROM executions a JOIN executions b
               ON a.job_id = b.job_id AND a.ctid < b.ctid
               AND a.started < b.finished AND b.started < a.finished"""
        ).fetchone()[0]
        assert overlapping == 0
        extra = conn.execute("SELECT count(*) - count(DISTINCT job_id) FROM executions").fetchone()[
            0
        ]
        assert conn.execute("SELECT count(DISTINCT job_id) FROM executions").fetchone()[0] == jobs
        print(f"\n{extra} job(s) ran a second time after the restart broke their attempt")
    for worker in workers:
        assert worker.process.poll() is None, "the worker stayed up through the restart"
        assert "database session lost" in worker.log()
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0


# -- the network ------------------------------------------------------------------------------


def test_a_network_cut_hands_the_jobs_over_and_the_cut_worker_overwrites_nothing(
    pg_server, conn: psycopg.Connection, start_worker, claude_log, tmp_path
) -> None:
    proxy = TcpProxy(f"{pg_server.host}/.s.PGSQL.{pg_server.port}")
    proxy.listen()
    try:
        jobs = [
            claude_jobs.enqueue(
                conn,
                {"prompt": fake(sleep=600, result="cut", detach={}), "cwd": str(tmp_path)},
                concurrency_limit=0,  # all three at once in one directory
            )
            for _ in range(3)
        ]
        cut = start_worker("--heartbeat-timeout", "5s", url=proxy.url(conn.info.dbname))
        cut_runs = wait_for(
            lambda: len(claude_runs(claude_log)) == 3 and claude_runs(claude_log),
            what="3 claude processes",
        )
        conn.execute(
            "UPDATE claude_jobs SET payload = jsonb_set(payload, '{prompt}', %s)",
            [psycopg.types.json.Jsonb(fake(result="survivor"))],
        )
        proxy.pause()  # the connections stay open; nothing gets through
        # Before another worker could take the jobs over, nothing of them runs here any more
        # (with no other worker yet, no recovery on this host can be what killed them).
        cut.wait_for_log("no heartbeat reached the database")
        cut_pids = [run[name] for run in cut_runs for name in ("pid", "detached")]
        wait_for(lambda: not any(map(pid_alive, cut_pids)), timeout=2, what="the cut jobs to end")
        survivor = start_worker("--heartbeat-timeout", "5s")
        wait_for(lambda: count(conn, "succeeded") == 3, timeout=30, what="the takeover")
        taken = [job_row(conn, job.id) for job in jobs]
        assert {row["result"]["result"] for row in taken} == {"survivor"}
        assert {row["worker"] for row in taken} == {f"{os.uname().nodename}:{survivor.pid}"}
        proxy.resume()
        cut.wait_for_log("database session lost", timeout=20)
        time.sleep(1.5)  # give the cut worker every chance to write what it had
        assert [job_row(conn, job.id) for job in jobs] == taken
        assert "no heartbeat within the timeout" in survivor.log()
    finally:
        proxy.close()


def test_an_outage_of_5s_keeps_what_finished_during_it(
    pg_server, conn: psycopg.Connection, start_worker, claude_log, tmp_path
) -> None:
    """A job that finishes while the database is away is recorded under its claim when it is
    back, before the worker gives back what its lost lease left: it does not run again."""
    proxy = TcpProxy(f"{pg_server.host}/.s.PGSQL.{pg_server.port}")
    proxy.listen()
    try:
        job = claude_jobs.enqueue(conn, {"prompt": fake(sleep=1, cost=0.5), "cwd": str(tmp_path)})
        worker = start_worker(url=proxy.url(conn.info.dbname))
        wait_for(lambda: claude_runs(claude_log), what="claude to start")
        proxy.drop()  # the database is gone; the job finishes a second later
        worker.wait_for_log("no heartbeat reached the database")  # the lease is lost
        time.sleep(5 - 3)
        proxy.listen()
        wait_for(lambda: job_row(conn, job.id)["status"] == "succeeded", what="the outcome")
        row = job_row(conn, job.id)
        assert (row["attempts"], row["errors"], float(row["cost_usd"])) == (1, [], 0.5)
        assert len(claude_runs(claude_log)) == 1, "the job ran again"
        assert "abandoned" not in worker.log()
    finally:
        proxy.close()


def test_a_short_network_cut_counts_and_records_the_attempt_it_interrupted(
    pg_server, conn: psycopg.Connection, start_worker, claude_log, tmp_path
) -> None:
    """A query that hung through the cut and returns after the lease ended must not put the
    job back as if it never ran: the interrupted attempt is counted and recorded."""
    proxy = TcpProxy(f"{pg_server.host}/.s.PGSQL.{pg_server.port}")
    proxy.listen()
    try:
        job = claude_jobs.enqueue(conn, {"prompt": fake(sleep=600), "cwd": str(tmp_path)})
        worker = start_worker("--poll-interval", "0.3s", url=proxy.url(conn.info.dbname))
        wait_for(lambda: claude_runs(claude_log), what="claude to start")
        conn.execute(
            "UPDATE claude_jobs SET payload = jsonb_set(payload, '{prompt}', %s)",
            [psycopg.types.json.Jsonb(fake(sleep=0))],
        )
        proxy.pause()  # queries hang (among them the worker's poll of what it runs)
        worker.wait_for_log("no heartbeat reached the database")  # the lease ends meanwhile
        proxy.resume()
        wait_for(lambda: job_row(conn, job.id)["status"] == "succeeded", what="the rerun")
        row = job_row(conn, job.id)
        assert row["attempts"] == 2
        assert [e["error"].split(":")[0] for e in row["errors"]] == ["interrupted"]
    finally:
        proxy.close()


# -- shutdown ---------------------------------------------------------------------------------


def test_sigterm_during_a_drain_loses_nothing(
    conn: psycopg.Connection, db_url: str, start_worker
) -> None:
    conn.execute(EXECUTIONS_TABLE)
    jobs = 3_000
    claude_jobs.enqueue_many(conn, [{"sleep": 0.01}] * jobs, kind="record")
    worker = start_worker("--import", "handlers", "--concurrency", "20", RECORD_URL=db_url)
    wait_for(lambda: count(conn, "succeeded") > jobs // 4, what="the drain to be under way")
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    assert count(conn, "running") == 0
    done = count(conn, "succeeded")
    assert 0 < done < jobs and count(conn, "queued") == jobs - done
    executions = conn.execute("SELECT count(*) FROM executions").fetchone()[0]
    assert executions == done, "a job running at the signal did not finish, or ran twice"
    finisher = start_worker("--import", "handlers", "--burst", RECORD_URL=db_url)
    assert finisher.wait(timeout=120) == 0
    assert_each_ran_once_and_never_overlapped(conn, jobs)


# -- bad input --------------------------------------------------------------------------------


def snapshot(conn: psycopg.Connection) -> tuple[Any, ...]:
    return conn.execute(
        """SELECT (SELECT md5(coalesce(string_agg(j::text, '|' ORDER BY id), ''))
                   FROM claude_jobs j),
                  (SELECT count(*) FROM claude_jobs_workers),
                  (SELECT md5(coalesce(string_agg(q::text, '|' ORDER BY queue), ''))
                   FROM claude_jobs_queues q),
                  (SELECT max(version) FROM claude_jobs_schema)"""
    ).fetchone()


def bad_inputs(tmp: Path) -> list[tuple[list[str], str | None, int, str]]:
    """(arguments, stdin, exit status, part of the one line it prints)."""
    files = {
        "bad-json.jsonl": b'{"prompt": "a"}\n{"prompt": \n',
        "array.jsonl": b'{"prompt": "a"}\n[1]\n',
        "no-prompt.jsonl": b'{"prompt": "a"}\n{"prompt": "b"}\n{"cwd": "."}\n',
        "bad-cwd.jsonl": b'{"prompt": "a", "cwd": "/nowhere/at/all"}\n',
        "latin1.jsonl": b'{"prompt": "caf\xe9"}\n',
        "nul.jsonl": b'{"prompt": "a\\u0000b"}\n',
        "typo.jsonl": b'{"prompt": "a", "cdw": "."}\n',
        "nul-cwd.jsonl": b'{"prompt": "a", "cwd": "\\u0000"}\n',
        "deep.jsonl": b'{"prompt": "a"}\n{"prompt": "b", "env": '
        + b"[" * 5000
        + b"]" * 5000
        + b"}\n",
    }
    files["empty.txt"] = b"  \n"
    for name, content in files.items():
        (tmp / name).write_bytes(content)
    (tmp / "a-directory").mkdir(exist_ok=True)
    payload = ["--payload", '{"prompt": "x"}']
    deep_object = '{"a": ' * 65 + "1" + "}" * 65  # parses, but nests too deeply to store
    return [
        (["enqueue", "--payload", "{"], None, 2, "not valid JSON"),
        (["enqueue", "--payload", "null"], None, 2, "not null"),
        (["enqueue", "--payload", "42"], None, 2, "not a number"),
        (["enqueue", "--payload", '{"prompt": ["a"]}'], None, 2, '"prompt"'),
        (["enqueue", "--payload", '{"prompt": "  "}'], None, 2, '"prompt"'),
        (["enqueue", *payload, "--kind", "mystery"], None, 2, "unknown kind"),
        (["enqueue", *payload, "--priority", "-2147483649"], None, 2, "not in the range"),
        (["enqueue", *payload, "--max-attempts", "0"], None, 2, "not in the range"),
        (["enqueue", *payload, "--delay", "5 minutes"], None, 2, "invalid duration"),
        (["enqueue", *payload, "--delay", "-1s"], None, 2, "invalid duration"),
        (["enqueue", *payload, "--run-at", "next week"], None, 2, "invalid time"),
        (["enqueue", *payload, "--queue", "*"], None, 2, "invalid queue name"),
        (["enqueue", *payload, "--queue", ""], None, 2, "invalid queue name"),
        (["enqueue", *payload, "--timeout", "-3"], None, 2, "invalid duration"),
        (["enqueue", "--file", str(tmp / "bad-json.jsonl")], None, 2, "line 2"),
        (["enqueue", "--file", str(tmp / "array.jsonl")], None, 2, "line 2"),
        (["enqueue", "--file", str(tmp / "no-prompt.jsonl")], None, 2, "line 3"),
        (["enqueue", "--file", str(tmp / "bad-cwd.jsonl")], None, 2, "line 1"),
        (["enqueue", "--file", str(tmp / "latin1.jsonl")], None, 2, "not UTF-8"),
        (["enqueue", "--file", str(tmp / "nul.jsonl")], None, 2, "NUL"),
        (["enqueue", "--file", str(tmp / "typo.jsonl")], None, 2, "unknown payload key 'cdw'"),
        (["enqueue", "--file", str(tmp / "deep.jsonl")], None, 2, "line 2"),
        (["enqueue", "--payload", "[" * 5000 + "]" * 5000], None, 2, "levels deep"),
        (
            ["enqueue", "--import", "handlers", "--kind", "record", "--payload", deep_object],
            None,
            2,
            "levels deep",
        ),
        (["enqueue", "--file", str(tmp / "missing.jsonl")], None, 2, "No such file"),
        (["enqueue", "--file", str(tmp / "a-directory")], None, 2, "directory"),
        (["enqueue", "--file", "-"], '{"prompt": "a"}\n{oops}\n', 2, "line 2 of <stdin>"),
        (["cleanup", "--older-than", "7"], None, 2, "'7' needs a unit: 7d, 7h"),
        (["cleanup", "--older-than", "+7"], None, 2, "needs a unit"),
        (["worker", "--retention", "7"], None, 2, "'7' needs a unit"),
        (["retry", str(uuid.uuid4()), "--status", "cancelled"], None, 2, "goes with --all"),
        (["enqueue", *payload, "--wait", "--json"], None, 2, "give one of them"),
        (["pause", ""], None, 2, "invalid queue name"),
        (["pause", "*"], None, 2, "invalid queue name"),
        (["resume", "a,b"], None, 2, "invalid queue name"),
        (["resume"], None, 2, "give a QUEUE"),
        (["cancel", "--all", "--yes"], None, 2, "give a filter"),
        (["pause", "--kind", ""], None, 2, "invalid kind"),
        (["enqueue", *payload, "--tag", ""], None, 2, "invalid tag"),
        (["enqueue", *payload, "--notify", "ftp://example.com/x"], None, 2, "not an http(s) URL"),
        (["queue", "set", "reviews", "--rate", "0/h"], None, 2, "invalid rate '0/h'"),
        (["queue", "set", "reviews", "--rate", "5/fortnight"], None, 2, "the period's unit"),
        (["queue", "set", "reviews", "--max-running", "-1"], None, 2, "invalid --max-running"),
        (["queue", "set", "reviews", "--rate-by", "key"], None, 2, "goes with a rate"),
        (["queue", "set", "reviews"], None, 2, "give a setting"),
        (["queue", "reset", "no-such-queue", "--all"], None, 2, "no queue no-such-queue"),
        (["queue", "reset", "default"], None, 2, "give what to reset"),
        (["worker", "--max-starts", "30/fortnight"], None, 2, "the period's unit"),
        (["resume", "--hold", "claude"], None, 1, "no hold is on claude jobs"),
        (["purge", "*", "--yes"], None, 2, "invalid queue name"),
        (["show", "12345"], None, 2, "not a job id"),
        (["show", "6f1c2e9a-zzzz-4c1e-9f3a-2b8e5d7c4a10"], None, 2, "not a job id"),
        (["show", str(uuid.uuid4())], None, 1, "no job"),
        (["worker", "--concurrency", "0"], None, 2, "not in the range"),
        (["worker", "--queues", ","], None, 2, "no queue given"),
        (["worker", "--poll-interval", "0"], None, 2, "poll interval"),
        (["worker", "--import", "no.such.module"], None, 2, "cannot import"),
        (["no-such-command"], None, 2, "No such command"),
        (["enqueue", *payload, "--after", str(uuid.uuid4())], None, 1, "no job"),
        (["enqueue", *payload, "--unique-key", "k" * 10_000], None, 2, "longer than 1,024 bytes"),
        (["enqueue", *payload, "--concurrency-key", "é" * 600], None, 2, "longer than 1,024"),
        (
            ["enqueue", "--payload", json.dumps({"prompt": "a", "unique_key": "u" * 5000})],
            None,
            2,
            "unique key is longer",
        ),
        (
            ["--database-url", "postgresql://me@localhost:abc/db", "list"],
            None,
            2,
            "the port must be a number",
        ),
        (["enqueue", "--prompt-file", str(tmp / "empty.txt")], None, 2, "empty.txt is empty"),
        (["enqueue", "--payload", '{"prompt": "a", "cwd": "a\\u0000b"}'], None, 2, "NUL"),
        (["enqueue", "--payload", '{"prompt": "a", "add_dirs": ["\\u0000"]}'], None, 2, "NUL"),
        (["enqueue", "--payload", '{"prompt": "a", "mcp_config": "x\\u0000"}'], None, 2, "NUL"),
        (["enqueue", "--file", str(tmp / "nul-cwd.jsonl")], None, 2, "line 1"),
        (
            ["enqueue", "--payload", '{"prompt": "a", "concurrency_key": "a\\u0000b"}'],
            None,
            2,
            '"concurrency_key" contains a NUL',
        ),
        (["enqueue", "--payload", '{"prompt": "a", "timeout": Infinity}'], None, 2, "Infinity"),
        (["enqueue", "--payload", '{"prompt": "a", "timeout": 1e308}'], None, 2, '"timeout"'),
        (["enqueue", "--payload", '{"prompt": "a", "mcp_config": "{oops"}'], None, 2, "JSON"),
        (["enqueue", "--payload", '{"prompt": "a", "max_turns": NaN}'], None, 2, "NaN"),
    ]


def test_bad_input_exits_with_one_line_and_changes_nothing(
    conn: psycopg.Connection, db_url: str, tmp_path: Path
) -> None:
    claude_jobs.enqueue(conn, {"prompt": "already here"})
    before = snapshot(conn)
    failures = []
    for args, stdin, status, message in bad_inputs(tmp_path):
        result = CliRunner().invoke(claude_jobs.cli, ["--database-url", db_url, *args], input=stdin)
        lines = result.output.splitlines()
        if not (
            result.exit_code == status
            and len(lines) == 1
            and lines[0].startswith("Error: ")
            and message in lines[0]
            and snapshot(conn) == before
        ):
            failures.append(f"{args}: exit {result.exit_code}, output {result.output!r}")
    assert failures == []


# -- hostile prompts --------------------------------------------------------------------------


def hostile_prompts() -> dict[str, str]:
    junk = bytes(range(1, 256)).decode("latin-1") * 4
    return {
        "one mebibyte": ("A long prompt. " * 70_000)[: 1024 * 1024],
        "dash": "-p --output-format text --dangerously-skip-permissions",
        "double dash": "--help",
        "quotes": "it's \"quoted\" and 'single' and `backticked`",
        "shell": "$(touch /tmp/pwned) ; rm -rf / | cat /etc/passwd > x & echo $HOME \\ * ?",
        "binary junk": junk,
        "unicode": "naïve café 東京 🚀 \u200b\u2028\u2029 \r\n\t",
    }


def test_hostile_prompts_reach_claude_byte_for_byte_without_a_shell(
    db_url: str, start_worker, claude_log: Path, tmp_path: Path
) -> None:
    workdir = tmp_path / "a dir 'with' \"quotes\" $HOME and spaces"
    workdir.mkdir()
    prompts = hostile_prompts()
    lines = tmp_path / "prompts.jsonl"
    lines.write_text(
        "".join(json.dumps({"prompt": p, "cwd": "."}) + "\n" for p in prompts.values())
    )
    enqueued = subprocess.run(
        [sys.executable, "-m", "claude_jobs", "--database-url", db_url, "enqueue", "--file",
         str(lines)],
        cwd=workdir, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(TESTS.parent)},
    )  # fmt: skip
    assert enqueued.returncode == 0, enqueued.stderr
    ids = enqueued.stdout.split()
    worker = start_worker("--burst")
    assert worker.wait(timeout=60) == 0
    by_job = {run["env"]["CLAUDE_JOBS_JOB_ID"]: run for run in claude_runs(claude_log)}
    for job_id, (name, prompt) in zip(ids, prompts.items(), strict=True):
        run = by_job[job_id]
        assert base64.b64decode(run["stdin"]) == prompt.encode("utf-8"), name
        assert run["cwd"] == str(workdir), name
        assert run["argv"][1:] == [*claude_jobs.CLAUDE_ARGS, claude_jobs.SKIP_PERMISSIONS], name
    assert not Path("/tmp/pwned").exists()
    with psycopg.connect(db_url) as conn:
        assert count(conn, "succeeded") == len(prompts)


# -- a worker's parts outlive their failures --------------------------------------------------


def test_a_worker_whose_connections_are_terminated_three_times_goes_on_firing_a_schedule(
    conn: psycopg.Connection, db_url: str, start_worker
) -> None:
    """A database outage makes the tasks of a worker fail: the scheduler (and the janitor) must
    go on after it, however often it happens. Each time here, the scheduler is caught in the
    middle of firing (a lock holds it up) when PostgreSQL ends every session of the worker."""
    claude_jobs.add_schedule(conn, "tick", {"prompt": "tick"}, every=2)
    worker = start_worker("--concurrency", "2")

    def runs() -> int:
        query = "SELECT count(*) FROM claude_jobs_schedule_runs WHERE schedule = 'tick'"
        return conn.execute(query).fetchone()[0]

    def firing() -> bool:
        query = """SELECT EXISTS (SELECT FROM pg_stat_activity
                   WHERE application_name LIKE 'claude-jobs worker%%' AND wait_event_type = 'Lock'
                     AND query LIKE '%%record_schedule_run%%')"""
        return conn.execute(query).fetchone()[0]

    wait_for(lambda: runs() >= 1, 20, "the first run")
    for _ in range(3):
        with psycopg.connect(db_url) as blocker:
            blocker.execute("LOCK TABLE claude_jobs_schedule_runs IN EXCLUSIVE MODE")
            wait_for(firing, 20, "the scheduler to wait in the middle of firing")
            ended = conn.execute(
                """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                   WHERE datname = current_database()
                     AND application_name LIKE 'claude-jobs worker%'"""
            ).fetchone()[0]
            assert ended >= 2  # (its session and its pool's connections)
        before = runs()
        wait_for(lambda: runs() >= before + 2, 20, "the schedule to fire again")  # noqa: B023
    assert worker.process.poll() is None
    assert "cannot fire schedules" not in worker.log()  # (the database's going: not a bug)
