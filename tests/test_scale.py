"""Claude at scale: concurrency keys, worktrees, usage limits, unfit workers, per-job options,
sessions and chains, costs.

Worker processes run the fake claude (conftest.FAKE_CLAUDE), which replays what the real CLI
printed (tests/fixtures/claude-cli); worktree tests use a real git repository made here, and
the session test the real Claude Code CLI against a local mock of the Messages API.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import handlers  # noqa: F401  (the "record" kind)
import psycopg
import pytest
from conftest import FIXTURES, TESTS, claude_runs, fake, job_row, status_of, wait_for
from mock_messages_api import MockMessagesAPI, Text

import claude_jobs
from claude_jobs import ClaudeHandler, Worker

RESETS_AT = datetime.fromtimestamp(1900000000, UTC)  # the resetsAt of the captured usage limit


@claude_jobs.handler("chore")
def chore(job: claude_jobs.Job) -> None:
    """A Python job kind."""


def run_burst(
    db_url: str,
    fake_claude: Path,
    *,
    worktree_dir: Path | None = None,
    keep_worktrees: bool = False,
    claude_args: Sequence[str] = (),
    model: str | None = None,
) -> None:
    """Run a real `claude-jobs worker --burst` process to the end (``worktree_dir``: where
    its worktrees go, as `<home>/worktrees`)."""
    command = [sys.executable, "-m", "claude_jobs", "--database-url", db_url]
    if worktree_dir is not None:
        command += ["--home", str(worktree_dir)]
    command += ["worker", "--burst", "--backoff-base", "60s", "--claude-bin", str(fake_claude)]
    command += ["--keep-worktrees"] * keep_worktrees
    command += [f"--claude-arg={arg}" for arg in claude_args]
    command += ["--model", model] if model else []
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent), "IS_SANDBOX": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=90, env=env)
    assert done.returncode == 0, done.stderr


def most_at_once(track: Path) -> int:
    """The most runs the fake claude saw at once in ``track`` (see its `track` directive)."""
    counts = Path(f"{track}.counts")
    return max(map(int, counts.read_text().split())) if counts.exists() else 0


def tracked(tmp_path: Path, name: str = "track") -> Path:
    track = tmp_path / name
    track.mkdir()
    return track


def all_finished(conn: psycopg.Connection, jobs: list[Any]) -> bool:
    return all(status_of(conn, job.id) in ("succeeded", "failed", "cancelled") for job in jobs)


# -- concurrency keys ---------------------------------------------------------------------------


def test_jobs_in_one_directory_run_one_at_a_time_across_workers_without_spending_attempts(
    conn: psycopg.Connection, start_worker, claude_log: Path, tmp_path: Path
) -> None:
    shared, elsewhere = tmp_path / "shared", tmp_path / "elsewhere"
    shared.mkdir()
    elsewhere.mkdir()
    track = tracked(tmp_path)
    same = [
        claude_jobs.enqueue(conn, {"prompt": fake(track=str(track), sleep=0.4), "cwd": str(shared)})
        for _ in range(4)
    ]
    other = claude_jobs.enqueue(conn, {"prompt": fake(sleep=0.2), "cwd": str(elsewhere)})
    assert {job.concurrency_key for job in same} == {str(shared)}, "the cwd is the default key"
    for _ in range(2):
        start_worker("--concurrency", "2")
    wait_for(lambda: all_finished(conn, [*same, other]), timeout=30, what="every job to finish")
    rows = [job_row(conn, job.id) for job in same]
    assert [(row["status"], row["attempts"]) for row in rows] == [("succeeded", 1)] * 4
    assert most_at_once(track) == 1
    assert len(claude_runs(claude_log)) == 5, "no run was started and given back"
    last_started = max(row["started_at"] for row in rows)
    assert job_row(conn, other.id)["finished_at"] < last_started, "other work did not wait"


def test_jobs_of_one_directory_run_in_the_order_they_were_enqueued(
    conn: psycopg.Connection, start_worker, claude_log: Path, tmp_path: Path
) -> None:
    """Jobs of equal priority and due time run in enqueue order, within a file and across
    calls, though the busy key hands most of them back again and again."""
    payload = {"prompt": fake(sleep=0.05), "cwd": str(tmp_path)}
    first = claude_jobs.enqueue_many(conn, [payload] * 8)
    second = claude_jobs.enqueue_many(conn, [payload] * 4)
    conn.execute("UPDATE claude_jobs SET run_at = (SELECT min(run_at) FROM claude_jobs)")
    worker = start_worker("--concurrency", "4", "--burst")
    assert worker.wait(timeout=60) == 0
    runs = sorted(claude_runs(claude_log), key=lambda run: run["started"])
    assert [run["env"]["CLAUDE_JOBS_JOB_ID"] for run in runs] == [str(i) for i in first + second]


def test_a_concurrency_limit_lets_that_many_run_at_once_and_zero_opts_out(
    conn: psycopg.Connection, invoke, start_worker, claude_log: Path, tmp_path: Path
) -> None:
    limited, free = tracked(tmp_path, "limited"), tracked(tmp_path, "free")
    ids = []
    for track, options in (
        (limited, ["--concurrency-limit", "2"]),
        (free, ["--no-concurrency-key"]),
    ):
        for _ in range(4):
            payload = {"prompt": fake(track=str(track), sleep=0.5), "cwd": str(tmp_path)}
            result = invoke("enqueue", "--payload", json.dumps(payload), "--queue", track.name,
                            *options)  # fmt: skip
            assert result.exit_code == 0, result.output
            ids.append(result.output.strip())
    start_worker("--concurrency", "4", "--queues", "limited")
    wait_for(lambda: all(status_of(conn, i) == "succeeded" for i in ids[:4]), timeout=30,
             what="the limited jobs")  # fmt: skip
    start_worker("--concurrency", "4", "--queues", "free")
    wait_for(lambda: all(status_of(conn, i) == "succeeded" for i in ids[4:]), timeout=30,
             what="the jobs without a key")  # fmt: skip
    assert most_at_once(limited) == 2
    assert most_at_once(free) == 4
    assert job_row(conn, ids[4])["concurrency_key"] is None


def test_the_concurrency_key_comes_from_the_payload_the_options_or_the_cwd(
    conn: psycopg.Connection, repo: Path, tmp_path: Path
) -> None:
    def key(payload: dict[str, Any], **options: Any) -> str | None:
        return claude_jobs.enqueue(conn, {"prompt": "p", **payload}, **options).concurrency_key

    assert key({"cwd": str(tmp_path)}) == str(tmp_path)
    assert key({"cwd": str(tmp_path), "concurrency_key": "repo-a"}) == "repo-a"
    assert key({"cwd": str(tmp_path)}, concurrency_key="deploys") == "deploys"
    assert key({"cwd": str(tmp_path)}, concurrency_limit=0) is None
    assert key({"cwd": str(repo), "worktree": True}) is None, "a worktree needs no key"
    assert key({}) is None, "no cwd: the worker's directory, no key"
    job = claude_jobs.enqueue(conn, {"prompt": "p", "timeout": "30m"})
    assert job.timeout == 1800 and "timeout" not in job.payload


# -- worktrees -----------------------------------------------------------------------------------


def git(cwd: Path | str, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def commit(name: str) -> list[str]:
    """A fake claude `run` command: write the file `name` and commit it."""
    author = "-c user.name=claude -c user.email=claude@example.com"
    return ["sh", "-c", f"echo {name} > {name} && git add {name} && git {author} commit -qm {name}"]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository with one commit on main, and a branch `other` one commit ahead."""
    path = tmp_path / "repo"
    (path / "src").mkdir(parents=True)
    (path / "src" / "app.py").write_text("print('hi')\n")
    git(path, "init", "-q", "-b", "main")
    author = ["-c", "user.name=t", "-c", "user.email=t@example.com"]
    git(path, "add", ".")
    git(path, *author, "commit", "-qm", "first")
    git(path, "checkout", "-qb", "other")
    (path / "other.txt").write_text("other\n")
    git(path, "add", ".")
    git(path, *author, "commit", "-qm", "other")
    git(path, "checkout", "-q", "main")
    return path


def test_worktree_jobs_work_side_by_side_on_branches_of_their_own(
    conn: psycopg.Connection, invoke, start_worker, claude_log: Path, repo: Path, tmp_path: Path
) -> None:
    track = tracked(tmp_path)
    head = git(repo, "rev-parse", "HEAD")
    jobs = []
    for name in ("a.txt", "b.txt"):
        prompt = fake(run=[commit(name)], track=str(track), sleep=0.5)
        result = invoke("enqueue", "--worktree", "--payload",
                        json.dumps({"prompt": prompt, "cwd": str(repo / "src")}))  # fmt: skip
        assert result.exit_code == 0, result.output
        jobs.append(claude_jobs.get_job(conn, result.output.strip()))
    start_worker("--concurrency", "2", CLAUDE_JOBS_HOME=str(tmp_path / "home"))
    wait_for(lambda: all_finished(conn, jobs), timeout=30, what="both jobs")
    assert [status_of(conn, job.id) for job in jobs] == ["succeeded", "succeeded"]
    assert most_at_once(track) == 2, "one repository, two agents at once"
    runs = claude_runs(claude_log)
    assert len({run["cwd"] for run in runs}) == 2
    for job, name in zip(jobs, ("a.txt", "b.txt"), strict=True):
        branch = f"claude-jobs/{job.id.hex[:12]}"
        assert git(repo, "log", "--format=%s", f"{head}..{branch}") == name
        worktree = job_row(conn, job.id)["worktree"]
        assert (worktree["branch"], worktree["base"], worktree["commits"]) == (branch, head, 1)
        assert not Path(worktree["path"]).exists(), "the worktree directory is removed"
        [run] = [r for r in runs if r["env"]["CLAUDE_JOBS_JOB_ID"] == str(job.id)]
        assert run["cwd"] == str(Path(worktree["path"]) / "src"), "the same place in the tree"
        shown = invoke("show", str(job.id))
        assert f"branch    {branch} (1 new commit)" in shown.output
    assert git(repo, "status", "--porcelain") == "", "the checkout is untouched"
    assert git(repo, "rev-parse", "HEAD") == head
    assert len(git(repo, "worktree", "list").splitlines()) == 1


def test_a_worktree_starts_from_base_and_is_kept_when_asked_or_left_dirty(
    conn: psycopg.Connection,
    invoke,
    fake_claude: Path,
    claude_log: Path,
    repo: Path,
    tmp_path: Path,
) -> None:
    on_other = claude_jobs.enqueue(
        conn,
        {"prompt": fake(run=[["test", "-f", "../other.txt"]]), "cwd": str(repo / "src"),
         "worktree": True, "base": "other"},
    )  # fmt: skip
    run_burst(db_url_of(conn), fake_claude, worktree_dir=tmp_path / "trees", keep_worktrees=True)
    row = job_row(conn, on_other.id)
    assert row["status"] == "succeeded", row["last_error"]
    assert row["worktree"]["base"] == git(repo, "rev-parse", "other")
    assert row["worktree"]["kept"] and Path(row["worktree"]["path"]).is_dir()
    assert "(no new commits); worktree " in invoke("show", str(on_other.id)).output

    dirty = claude_jobs.enqueue(
        conn,
        {"prompt": fake(run=[["touch", "notes.txt"]]), "cwd": str(repo), "worktree": True},
    )
    run_burst(db_url_of(conn), fake_claude, worktree_dir=tmp_path / "trees")
    tree = job_row(conn, dirty.id)["worktree"]
    assert (tree["uncommitted"], tree["kept"]) == (True, True)
    assert (Path(tree["path"]) / "notes.txt").exists(), "uncommitted work is never deleted"
    assert "uncommitted changes are left in" in invoke("show", str(dirty.id)).output


def test_worktree_jobs_whose_repository_or_base_went_away_fail_at_once(
    conn: psycopg.Connection, fake_claude: Path, claude_log: Path, repo: Path, tmp_path: Path
) -> None:
    """Checked at enqueue, and again when they run (the repository may change meanwhile)."""
    plain = tmp_path / "plain"
    plain.mkdir()
    git(plain, "init", "-q", "-b", "main")
    git(plain, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q",
        "--allow-empty", "-m", "first")  # fmt: skip
    outside = claude_jobs.enqueue(conn, {"prompt": "p", "cwd": str(plain), "worktree": True})
    bad_base = claude_jobs.enqueue(
        conn, {"prompt": "p", "cwd": str(repo), "worktree": True, "base": "other"}
    )
    shutil.rmtree(plain / ".git")
    git(repo, "branch", "-D", "other")
    run_burst(db_url_of(conn), fake_claude, worktree_dir=tmp_path / "trees")
    assert "needs a cwd inside a git repository" in job_row(conn, outside.id)["last_error"]
    assert "base is not a commit" in job_row(conn, bad_base.id)["last_error"]


def db_url_of(conn: psycopg.Connection) -> str:
    info = conn.info
    return f"postgresql://{info.user}@/{info.dbname}?host={info.host}&port={info.port}"


# -- usage limits and unfit workers -------------------------------------------------------------


@pytest.mark.parametrize(
    ("directives", "resets"),
    [
        ({"emit": "usage-limit.stream.jsonl", "exit": 1}, RESETS_AT),
        (  # what the CLI prints in text mode: the reset time in words, to the minute
            {"stdout": (FIXTURES / "usage-limit.txt").read_text(), "exit": 1},
            RESETS_AT.replace(second=0),
        ),
        ({"stdout": "Claude AI usage limit reached|1900000000\n", "exit": 1}, RESETS_AT),
    ],
    ids=["rate_limit_event", "text", "older-cli"],
)
def test_a_usage_limit_puts_the_job_back_unspent_until_the_reset(
    conn: psycopg.Connection,
    db_url: str,
    fake_claude: Path,
    claude_log: Path,
    tmp_path: Path,
    directives: dict[str, Any],
    resets: datetime,
) -> None:
    job = claude_jobs.enqueue(conn, {"prompt": fake(**directives), "cwd": str(tmp_path)})
    run_burst(db_url, fake_claude)
    row = job_row(conn, job.id)
    assert (row["status"], row["attempts"], row["errors"]) == ("queued", 0, [])
    assert resets <= row["run_at"] <= resets + timedelta(seconds=60), "the reset, plus jitter"
    assert "usage limit" in row["last_error"]
    [hold] = claude_jobs.list_holds(conn)
    assert (hold["kind"], hold["until"]) == ("claude", resets)


def test_resume_hold_lifts_a_usage_limit_early_and_the_job_runs_now(
    conn: psycopg.Connection, db_url: str, invoke, fake_claude: Path, tmp_path: Path
) -> None:
    job = claude_jobs.enqueue(
        conn, {"prompt": fake(emit="usage-limit.stream.jsonl", exit=1), "cwd": str(tmp_path)}
    )
    later = claude_jobs.enqueue(conn, {"prompt": "p", "cwd": str(tmp_path)}, delay=86400)
    run_burst(db_url, fake_claude)
    assert job_row(conn, job.id)["run_at"] >= RESETS_AT
    conn.execute(  # when run again, it succeeds
        "UPDATE claude_jobs SET payload = jsonb_set(payload, '{prompt}', %s) WHERE id = %s",
        [psycopg.types.json.Jsonb(fake(result="after the reset")), job.id],
    )
    lifted = invoke("resume", "--hold", "claude")
    assert lifted.exit_code == 0, lifted.output
    assert "1 job(s) put off by it run now" in lifted.output
    assert claude_jobs.list_holds(conn) == []
    run_burst(db_url, fake_claude)
    assert status_of(conn, job.id) == "succeeded"
    assert status_of(conn, later.id) == "queued", "a job delayed for its own reasons still waits"
    again = invoke("resume", "--hold", "claude")
    assert (again.exit_code, again.output) == (1, "Error: no hold is on claude jobs\n")


NOW = datetime(2030, 3, 17, 17, 46, 20, tzinfo=UTC)  # 20 s past a reset given to the minute


@pytest.mark.parametrize(
    ("text", "zone", "expected"),
    [
        ("Mar 17, 2030, 5:46pm", "UTC", datetime(2030, 3, 17, 17, 46, tzinfo=UTC)),
        ("Mar 17, 5:46pm", "UTC", datetime(2030, 3, 17, 17, 46, tzinfo=UTC)),  # not next year
        ("5:46pm", "UTC", datetime(2030, 3, 17, 17, 46, tzinfo=UTC)),  # not tomorrow
        ("5:40pm", "UTC", datetime(2030, 3, 18, 17, 40, tzinfo=UTC)),  # gone by: tomorrow's
        ("Mar 18, 9am", "Europe/Paris", datetime(2030, 3, 18, 8, tzinfo=UTC)),
        ("6pm", "Nowhere/Else", None),
    ],
)
def test_a_reset_time_in_words_is_the_next_such_moment(
    text: str, zone: str, expected: datetime | None
) -> None:
    assert claude_jobs._reset_time(text, zone, now=NOW) == expected


def outcome_of(result: dict[str, Any], reset: float | None = None) -> BaseException:
    ended = claude_jobs._ProcessExit(returncode=1, stderr="")
    with pytest.raises((claude_jobs.JobFailed, claude_jobs.Postpone)) as caught:
        claude_jobs.claude_outcome(ended, {"type": "result", "is_error": True, **result}, [], reset)
    return caught.value


def test_usage_limits_are_told_apart_from_other_errors() -> None:
    at_5pm = outcome_of({"result": "You\u2019ve hit your weekly limit · resets at 5pm (UTC)"})
    assert isinstance(at_5pm, claude_jobs.UsageLimitReached) and at_5pm.run_at.hour == 17
    in_ms = outcome_of({"api_error": "usage_limit_reached"}, reset=1_900_000_000_000)
    assert isinstance(in_ms, claude_jobs.UsageLimitReached) and in_ms.run_at == RESETS_AT
    unknown = outcome_of({"api_error": "usage_limit_reached"})
    assert isinstance(unknown, claude_jobs.UsageLimitReached) and "no reset time" in str(unknown)
    other = outcome_of({"result": "the tool hit your configured recursion limit"})
    assert type(other) is claude_jobs.JobFailed, "not a usage limit: retried as usual"
    turns = outcome_of({"subtype": "error_max_turns"}, reset=1_900_000_000)
    assert type(turns) is claude_jobs.PermanentError, "a limit met on the way does not hide it"


def test_a_usage_limit_stops_claude_jobs_on_every_worker_but_python_jobs_run(
    conn: psycopg.Connection, db_url: str, invoke, start_worker, claude_log: Path, tmp_path: Path
) -> None:
    conn.execute(
        "CREATE TABLE executions (job_id uuid, attempt int, pid int, started timestamptz, "
        "finished timestamptz DEFAULT clock_timestamp())"
    )
    python = {"RECORD_URL": db_url}
    limited = claude_jobs.enqueue(
        conn, {"prompt": fake(emit="usage-limit.stream.jsonl", exit=1), "cwd": str(tmp_path)}
    )
    first = start_worker("--import", "handlers", **python)
    first.wait_for_log("no worker starts claude jobs until")
    wait_for(lambda: status_of(conn, limited.id) == "queued", what="the job to go back")

    def blocked_while_python_runs() -> None:
        waiting = claude_jobs.enqueue(conn, {"prompt": "p"}, priority=10, concurrency_limit=0)
        barrier = claude_jobs.enqueue(conn, {}, kind="record")  # lower priority: claimed after
        wait_for(lambda: status_of(conn, barrier.id) == "succeeded", what="the python job")
        assert status_of(conn, waiting.id) == "queued"

    blocked_while_python_runs()
    start_worker("--import", "handlers", **python).wait_for_log(
        "no worker starts claude jobs until"
    )
    first.signal(15)
    first.wait()
    blocked_while_python_runs()  # the second worker learned the hold from the database
    assert len(claude_runs(claude_log)) == 1
    for command in ("stats", "workers"):
        output = invoke(command).output
        assert "held: no worker starts claude jobs until 2030-03-17" in output, command
        assert "resets Mar 17, 2030" in output


@pytest.mark.parametrize(
    "fault",
    [
        {"emit": "not-logged-in.stream.jsonl", "exit": 1},
        {"emit": "credit-too-low.json", "exit": 1},
    ],
    ids=["not-logged-in", "credit-too-low"],
)
def test_a_worker_that_cannot_run_claude_gives_the_jobs_back_and_stops_taking_them(
    conn: psycopg.Connection, invoke, start_worker, claude_log: Path, tmp_path: Path, fault: dict
) -> None:
    jobs = [
        claude_jobs.enqueue(
            conn, {"prompt": fake(**fault), "cwd": str(tmp_path)}, concurrency_limit=0
        )
        for _ in range(6)
    ]
    worker = start_worker("--concurrency", "2")
    worker.wait_for_log("this worker starts no claude job until")
    wait_for(lambda: all(status_of(conn, j.id) == "queued" for j in jobs), what="all queued")
    wait_for(lambda: "NOTE" in invoke("workers").output, what="the worker to be listed")
    assert len(claude_runs(claude_log)) <= 2, "a try per thread at most, not one per job"
    assert [job_row(conn, j.id)["attempts"] for j in jobs] == [0] * 6
    assert worker.log().count("this worker starts no claude job") == 1
    assert "no claude jobs until" in invoke("workers").output
    [listed] = [json.loads(line) for line in invoke("workers", "--json").output.splitlines()]
    reason = "not logged in" if "logged" in fault["emit"] else "credit balance is too low"
    assert reason in listed["claude_paused_reason"]


def test_an_unfit_worker_backs_off_longer_each_time_and_recovers_at_once(
    conn: psycopg.Connection,
    db_url: str,
    fake_claude: Path,
    claude_log: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(claude_jobs, "UNFIT_BACKOFF", (0.4, 1.6))
    logged_in = tmp_path / "logged-in"
    prompt = fake(emit="not-logged-in.stream.jsonl", exit=1, unless=str(logged_in))
    job = claude_jobs.enqueue(conn, {"prompt": prompt, "cwd": str(tmp_path)})
    worker = Worker(db_url, handlers={"claude": ClaudeHandler(str(fake_claude))})
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_for(lambda: len(claude_runs(claude_log)) >= 5, timeout=20, what="five tries")
        starts = [run["started"] for run in claude_runs(claude_log)]
        gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
        for gap, back_off in zip(gaps, (0.4, 0.8, 1.6, 1.6), strict=False):
            assert gap >= back_off, (gaps, "5 minutes doubling to an hour, here scaled down")
        logged_in.touch()
        wait_for(lambda: status_of(conn, job.id) == "succeeded", what="the job, once logged in")
        assert worker._holds._unfit_for == 0.4, "claude works again: the next back-off is short"
        assert job_row(conn, job.id)["attempts"] == 1
    finally:
        worker.stop()
        thread.join(10)


def test_a_success_beside_an_unfit_run_lifts_the_back_off_and_what_workers_says(
    conn: psycopg.Connection, invoke, start_worker, claude_log: Path, tmp_path: Path
) -> None:
    """A worker backs off after a 401 while another of its jobs runs on; that job then
    succeeds: claude works here, so the back-off ends, on the worker and in `workers` and
    `show` alike (one state), and the jobs waiting start at once."""
    slow = claude_jobs.enqueue(conn, {"prompt": fake(sleep=3), "cwd": str(tmp_path)},
                               concurrency_limit=0)  # fmt: skip
    worker = start_worker("--concurrency", "3")
    wait_for(lambda: status_of(conn, slow.id) == "running", what="the slow job to start")
    key_fixed = tmp_path / "key-fixed"
    bad = claude_jobs.enqueue(conn, {"prompt": fake(emit="invalid-api-key.json", exit=1,
                                                    unless=str(key_fixed)),
                                     "cwd": str(tmp_path)}, concurrency_limit=0)  # fmt: skip
    worker.wait_for_log("this worker starts no claude job until")
    wait_for(lambda: "invalid" in invoke("workers", "--json").output, what="workers to say why")
    waiting = claude_jobs.enqueue(conn, {"prompt": "next", "cwd": str(tmp_path)},
                                  concurrency_limit=0)  # fmt: skip
    wait_for(lambda: "no fit worker" in invoke("list").output, what="list to say why")
    key_fixed.touch()
    wait_for(lambda: status_of(conn, slow.id) == "succeeded", what="the slow job to succeed")
    for job in (waiting, bad):
        wait_for(lambda j=job: status_of(conn, j.id) == "succeeded", 10, "the jobs, at once")
    worker.wait_for_log("this worker runs claude jobs again")
    assert json.loads(invoke("workers", "--json").output)["claude_paused_until"] is None
    lifted = invoke("resume", "--hold", "claude")
    assert lifted.exit_code == 1 and "no hold is on claude jobs" in lifted.output


def test_resume_hold_makes_a_backed_off_worker_start_claude_jobs_at_once(
    conn: psycopg.Connection, invoke, start_worker, claude_log: Path, tmp_path: Path
) -> None:
    bad = claude_jobs.enqueue(conn, {"prompt": fake(emit="invalid-api-key.json", exit=1),
                                     "cwd": str(tmp_path)}, concurrency_limit=0)  # fmt: skip
    worker = start_worker("--concurrency", "3")
    worker.wait_for_log("this worker starts no claude job until")
    conn.execute("UPDATE claude_jobs SET payload = jsonb_set(payload, '{prompt}', '\"fixed\"')")
    lifted = invoke("resume", "--hold", "claude")
    assert lifted.exit_code == 0 and "1 worker(s) that could not run claude try again" in (
        lifted.output
    )
    wait_for(lambda: status_of(conn, bad.id) == "succeeded", 10, "the job, at once")
    assert json.loads(invoke("workers", "--json").output)["claude_paused_until"] is None


def test_overloaded_and_server_errors_retry_with_the_normal_backoff(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path
) -> None:
    job = claude_jobs.enqueue(
        conn, {"prompt": fake(emit="overloaded-529.json", exit=1), "cwd": str(tmp_path)}
    )
    run_burst(db_url, fake_claude)
    row = job_row(conn, job.id)
    assert (row["status"], row["attempts"], len(row["errors"])) == ("queued", 1, 1)
    assert claude_jobs.list_holds(conn) == []


# -- options per job -----------------------------------------------------------------------------


def test_payload_options_become_claude_flags_over_the_workers_defaults(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path
) -> None:
    extra = tmp_path / "extra"
    extra.mkdir()
    mcp = {"mcpServers": {}}
    options = {
        "model": "job-model", "fallback_model": "fallback", "max_turns": 7,
        "max_budget_usd": 1.5, "allowed_tools": ["Read", "Bash(git log:*)"],
        "disallowed_tools": "WebFetch", "append_system_prompt": "be brief",
        "system_prompt": "you are a test", "permission_mode": "acceptEdits",
        "add_dirs": [str(extra)], "mcp_config": mcp, "effort": "high",
        "env": {"FAKE_MARKER": "from the job"},
    }  # fmt: skip
    job = claude_jobs.enqueue(conn, {"prompt": "p", "cwd": str(tmp_path), **options})
    plain = claude_jobs.enqueue(conn, {"prompt": "p", "cwd": str(tmp_path)})
    defaults = ["--max-turns", "50", "--append-system-prompt=from the worker", "--verbose-x"]
    run_burst(db_url, fake_claude, claude_args=defaults, model="worker-model")
    runs = {run["env"]["CLAUDE_JOBS_JOB_ID"]: run for run in claude_runs(claude_log)}
    assert runs[str(job.id)]["argv"][1:] == [
        *claude_jobs.CLAUDE_ARGS, "--verbose-x",
        "--model", "job-model", "--fallback-model", "fallback", "--max-turns", "7",
        "--max-budget-usd", "1.5", "--allowedTools", "Read", "Bash(git log:*)",
        "--disallowedTools", "WebFetch", "--append-system-prompt", "be brief",
        "--system-prompt", "you are a test", "--permission-mode", "acceptEdits",
        "--add-dir", str(extra), "--mcp-config", json.dumps(mcp), "--effort", "high",
    ]  # fmt: skip
    assert runs[str(job.id)]["env"]["FAKE_MARKER"] == "from the job"
    assert runs[str(plain.id)]["argv"][1:] == [
        *claude_jobs.CLAUDE_ARGS, claude_jobs.SKIP_PERMISSIONS, "--max-turns", "50",
        "--append-system-prompt=from the worker", "--verbose-x", "--model", "worker-model",
    ]  # fmt: skip
    assert runs[str(plain.id)]["env"]["FAKE_MARKER"] is None


def test_the_worker_command_passes_claude_args_and_model(
    conn: psycopg.Connection, start_worker, claude_log: Path, tmp_path: Path
) -> None:
    job = claude_jobs.enqueue(conn, {"prompt": "p", "cwd": str(tmp_path)})
    worker = start_worker("--burst", "--claude-arg=--max-turns=5", "--claude-arg", "--debug",
                          "--model", "sonnet")  # fmt: skip
    assert worker.wait() == 0
    assert status_of(conn, job.id) == "succeeded"
    [run] = claude_runs(claude_log)
    assert run["argv"][-4:] == ["--max-turns=5", "--debug", "--model", "sonnet"]


def test_enqueue_max_budget_usd_sets_each_jobs_budget_unless_the_payload_has_one(
    conn: psycopg.Connection, invoke, tmp_path: Path
) -> None:
    lines = tmp_path / "jobs.jsonl"
    lines.write_text('{"prompt": "a"}\n{"prompt": "b", "max_budget_usd": 9}\n')
    result = invoke("enqueue", "--max-budget-usd", "2.5", "--file", str(lines))
    assert result.exit_code == 0, result.output
    budgets = [
        claude_jobs.get_job(conn, i).payload["max_budget_usd"] for i in result.output.split()
    ]
    assert budgets == [2.5, 9]
    refused = invoke("enqueue", "--kind", "chore", "--max-budget-usd", "1", "--payload", "{}")
    assert (refused.exit_code, refused.output) == (
        2, "Error: --max-budget-usd is for claude jobs\n",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ({"modle": "opus"}, "unknown payload key 'modle' for a claude job (allowed: prompt, cwd,"),
        ({"max_turns": 0}, '"max_turns" must be a whole number from 1 to 2147483647'),
        ({"max_turns": 10**20}, '"max_turns" must be a whole number from 1 to 2147483647'),
        ({"effort": "ultra"}, '"effort" must be one of low, medium, high, xhigh, max'),
        ({"max_budget_usd": "lots"}, '"max_budget_usd" must be a positive number'),
        ({"permission_mode": "yolo"}, '"permission_mode" must be one of acceptEdits, auto,'),
        ({"allowed_tools": [1]}, '"allowed_tools" must be a tool or a list of tools'),
        ({"allowed_tools": ["Read", "--model", "x"]}, '"allowed_tools" entries must not begin'),
        ({"allowed_tools": ["--output-format", "text"]}, '"allowed_tools" entries must not'),
        ({"disallowed_tools": " -p"}, '"disallowed_tools" entries must not begin with "-"'),
        ({"env": {"A": 1}}, '"env" must map variable names to strings'),
        ({"add_dirs": ["/no/such/dir"]}, '"add_dirs" is not an existing directory: /no/such/dir'),
        ({"mcp_config": "missing.json"}, '"mcp_config" is neither JSON nor an existing file'),
        ({"timeout": "soon"}, '"timeout" must be a duration'),
        ({"worktree": "yes"}, '"worktree" must be true or false'),
        ({"base": "main"}, '"base" is the starting point of a worktree: it needs "worktree"'),
    ],
)
def test_bad_options_are_refused_at_enqueue_in_one_line(
    conn: psycopg.Connection, invoke, payload: dict[str, Any], error: str
) -> None:
    result = invoke("enqueue", "--payload", json.dumps({"prompt": "p", **payload}))
    assert result.exit_code == 2
    assert result.output.startswith(f"Error: {error}") and result.output.count("\n") == 1
    assert conn.execute("SELECT count(*) FROM claude_jobs").fetchone()[0] == 0


def test_the_worker_refuses_claude_args_it_sets_itself(invoke) -> None:
    result = invoke("worker", "--claude-arg=--output-format=json")
    assert (result.exit_code, result.output) == (
        2, "Error: --claude-arg --output-format=json: the worker sets --output-format itself\n",
    )  # fmt: skip
    twice = invoke("worker", "--model", "opus", "--claude-arg=--model=sonnet")
    assert (twice.exit_code, twice.output) == (
        2, "Error: the worker gives claude --model twice (--model, --claude-arg)\n",
    )  # fmt: skip


# -- sessions and chains -------------------------------------------------------------------------


def test_continue_from_resumes_the_session_in_the_same_directory_once_the_job_finished(
    conn: psycopg.Connection, invoke, start_worker, claude_log: Path, tmp_path: Path
) -> None:
    session = "3648791a-f45c-402c-aafc-7f36a35c1f00"
    first = claude_jobs.enqueue(
        conn, {"prompt": fake(session=session, sleep=1), "cwd": str(tmp_path)},
        concurrency_limit=0,
    )  # fmt: skip
    result = invoke("enqueue", "--no-concurrency-key", "--continue-from", str(first.id)[:8],
                    "--payload", '{"prompt": "now write the tests"}')  # fmt: skip
    assert result.exit_code == 0, result.output
    then = claude_jobs.get_job(conn, result.output.strip())
    assert then.payload["cwd"] == str(tmp_path), "it runs where the session is"
    start_worker("--concurrency", "2")
    wait_for(lambda: status_of(conn, then.id) == "succeeded", what="the continuation")
    assert job_row(conn, then.id)["started_at"] >= job_row(conn, first.id)["finished_at"]
    run = next(r for r in claude_runs(claude_log) if r["env"]["CLAUDE_JOBS_JOB_ID"] == str(then.id))
    assert run["argv"][-2:] == ["--resume", session]
    assert run["cwd"] == str(tmp_path)
    shown = invoke("show", str(then.id)).output
    assert f"continues {first.id} (succeeded), resuming its session" in shown
    assert "continues" not in invoke("list").output  # (finished: it waits for nothing now)


def test_a_continuation_of_a_worktree_job_goes_on_with_its_branch(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, repo: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    first = claude_jobs.enqueue(
        conn, {"prompt": fake(run=[commit("a.txt")]), "cwd": str(repo), "worktree": True}
    )
    then = claude_jobs.enqueue(
        conn, {"prompt": fake(run=[commit("b.txt")])}, continue_from=first.id
    )
    run_burst(db_url, fake_claude, worktree_dir=tmp_path / "trees")
    assert [status_of(conn, j.id) for j in (first, then)] == ["succeeded", "succeeded"]
    runs = claude_runs(claude_log)
    assert runs[0]["cwd"] == runs[1]["cwd"], "the session's directory, made again"
    branch = f"claude-jobs/{first.id.hex[:12]}"
    assert git(repo, "log", "--format=%s", f"main..{branch}").split() == ["b.txt", "a.txt"]
    assert job_row(conn, then.id)["worktree"]["commits"] == 2


def test_continuations_of_one_worktree_share_its_key_and_need_its_branch(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, repo: Path, tmp_path: Path
) -> None:
    first = claude_jobs.enqueue(conn, {"prompt": fake(), "cwd": str(repo), "worktree": True})
    assert first.concurrency_key is None, "a worktree of its own"
    second = claude_jobs.enqueue(conn, {"prompt": "p"}, continue_from=first.id)
    third = claude_jobs.enqueue(conn, {"prompt": "p"}, continue_from=second.id)
    also = claude_jobs.enqueue(conn, {"prompt": "p"}, continue_from=first.id)
    key = f"worktree claude-jobs/{first.id.hex[:12]}"
    assert [j.concurrency_key for j in (second, third, also)] == [key] * 3, "one tree, one agent"
    claude_jobs.cancel_job(conn, second.id)
    claude_jobs.cancel_job(conn, also.id)
    run_burst(db_url, fake_claude, worktree_dir=tmp_path / "trees")
    assert status_of(conn, first.id) == "succeeded"
    git(repo, "branch", "-D", f"claude-jobs/{first.id.hex[:12]}")  # reviewed and thrown away
    lost = claude_jobs.enqueue(conn, {"prompt": "p"}, continue_from=first.id)
    run_burst(db_url, fake_claude, worktree_dir=tmp_path / "trees")
    row = job_row(conn, lost.id)
    assert (row["status"], row["attempts"]) == ("failed", 1), "not made again from the base"
    assert (
        f"the branch claude-jobs/{first.id.hex[:12]} of the job this one continues is gone"
        in (row["last_error"])
    )


def test_a_continuation_runs_where_the_session_is_kept_whatever_became_of_the_job(
    conn: psycopg.Connection, invoke, db_url: str, fake_claude: Path, claude_log: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    session = "3648791a-f45c-402c-aafc-7f36a35c1f00"  # that of the captured usage limit
    first = claude_jobs.enqueue(
        conn, {"prompt": fake(emit="usage-limit.stream.jsonl", exit=1), "cwd": str(tmp_path)}
    )
    run_burst(db_url, fake_claude)  # back in the queue, no worker any more, then cancelled
    assert invoke("cancel", str(first.id)).exit_code == 0
    assert invoke("resume", "--hold", "claude").exit_code == 0
    assert job_row(conn, first.id)["session_host"] == socket.gethostname()
    then = claude_jobs.enqueue(conn, {"prompt": "go on"}, continue_from=first.id)
    conn.execute("UPDATE claude_jobs SET session_host = 'elsewhere' WHERE id = %s", [first.id])
    shown = invoke("show", str(then.id)).output
    assert "resuming its session, kept on elsewhere: only a worker there can run it" in shown
    run_burst(db_url, fake_claude)
    assert status_of(conn, then.id) == "queued", "the session is not on this host"
    conn.execute(
        "UPDATE claude_jobs SET session_host = %s WHERE id = %s", [socket.gethostname(), first.id]
    )
    run_burst(db_url, fake_claude)
    assert status_of(conn, then.id) == "succeeded"
    [run] = [r for r in claude_runs(claude_log) if r["env"]["CLAUDE_JOBS_JOB_ID"] == str(then.id)]
    assert run["argv"][-2:] == ["--resume", session]


def test_cleanup_keeps_the_jobs_that_unfinished_jobs_wait_for(
    conn: psycopg.Connection, invoke
) -> None:
    needed, continued, _unneeded = (
        claude_jobs.enqueue(conn, {"prompt": "p"}, concurrency_limit=0) for _ in range(3)
    )
    conn.execute(
        "UPDATE claude_jobs SET status = 'succeeded', finished_at = now() - interval '30 days'"
    )
    later = claude_jobs.enqueue(conn, {}, kind="chore", delay=3600)
    waiting = claude_jobs.enqueue(conn, {}, kind="chore", after=[needed.id, later.id])
    running = claude_jobs.enqueue(conn, {"prompt": "p"}, continue_from=continued.id)
    conn.execute("UPDATE claude_jobs SET status = 'running' WHERE id = %s", [running.id])
    result = invoke("cleanup", "--older-than", "7d")
    assert result.output == "deleted 1 succeeded or cancelled job(s) older than 7d\n"
    remaining = {row[0] for row in conn.execute("SELECT id FROM claude_jobs")}
    assert remaining == {needed.id, continued.id, later.id, waiting.id, running.id}


def test_continuing_needs_a_session_and_a_claude_job(
    conn: psycopg.Connection, invoke, db_url: str, fake_claude: Path, claude_log: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    never_ran = claude_jobs.enqueue(
        conn, {"prompt": fake(stdout="no session\n", exit=1), "cwd": str(tmp_path)},
        max_attempts=1,
    )  # fmt: skip
    then = claude_jobs.enqueue(conn, {"prompt": "p", "cwd": str(tmp_path)},
                               continue_from=never_ran.id)  # fmt: skip
    run_burst(db_url, fake_claude)
    assert status_of(conn, then.id) == "failed"
    assert (
        f"job {never_ran.id} left no claude session to continue"
        in (job_row(conn, then.id)["last_error"])
    )
    chore = claude_jobs.enqueue(conn, {}, kind="chore")
    result = invoke("enqueue", "--continue-from", str(chore.id), "--payload", '{"prompt": "p"}')
    assert (result.exit_code, result.output) == (
        2, f"Error: job {chore.id} is not a claude job: there is no session to continue\n",
    )  # fmt: skip


RESTRICTED = {
    "allowed_tools": ["Read"], "permission_mode": "acceptEdits", "max_budget_usd": 1.5,
    "model": "opus", "max_turns": 3, "disallowed_tools": ["WebFetch"],
}  # fmt: skip


def test_a_continuation_keeps_every_option_of_the_job_it_continues(
    conn: psycopg.Connection, invoke, db_url: str, fake_claude: Path, claude_log: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    first = claude_jobs.enqueue(conn, {"prompt": "p", "cwd": str(tmp_path), **RESTRICTED})
    result = invoke("enqueue", "--continue-from", str(first.id), "--payload", '{"prompt": "on"}')
    assert (result.exit_code, result.stderr) == (0, ""), result.output
    then = claude_jobs.get_job(conn, result.stdout.strip())
    run_burst(db_url, fake_claude, model="worker-model")
    run = next(r for r in claude_runs(claude_log) if r["env"]["CLAUDE_JOBS_JOB_ID"] == str(then.id))
    argv = run["argv"]
    assert claude_jobs.SKIP_PERMISSIONS not in argv
    for flag, value in [("--allowedTools", "Read"), ("--permission-mode", "acceptEdits"),
                        ("--max-budget-usd", "1.5"), ("--model", "opus"), ("--max-turns", "3"),
                        ("--disallowedTools", "WebFetch")]:  # fmt: skip
        assert argv[argv.index(flag) + 1] == value, flag
    assert "worker-model" not in argv
    assert "widens" not in invoke("show", str(then.id)).output


def test_a_continuation_widens_what_its_job_could_do_only_by_naming_it_and_show_says_so(
    conn: psycopg.Connection, invoke, tmp_path: Path
) -> None:
    first = claude_jobs.enqueue(conn, {"prompt": "p", "cwd": str(tmp_path), **RESTRICTED})
    wider = {
        "prompt": "on", "allowed_tools": ["Read", "Bash"], "max_budget_usd": 5, "max_turns": 2,
        "permission_mode": "bypassPermissions", "disallowed_tools": None,
        "add_dirs": [str(tmp_path)],
    }  # fmt: skip
    result = invoke("enqueue", "--continue-from", str(first.id), "--payload", json.dumps(wider))
    assert result.exit_code == 0, result.output
    widens = [
        f"add_dirs: adds {tmp_path}",
        "allowed_tools: adds Bash",
        "disallowed_tools: no longer given (was WebFetch)",
        "max_budget_usd: 1.5 → 5",
        "permission_mode: acceptEdits → bypassPermissions",
    ]
    assert result.stderr == f"note: this continuation widens what job {first.id} could do: " + (
        "; ".join(widens) + "\n"
    )
    then = claude_jobs.get_job(conn, result.stdout.strip())
    assert then.widens == widens
    assert "disallowed_tools" not in then.payload and then.payload["max_turns"] == 2
    shown = invoke("show", str(then.id)).output
    assert "widens    " + "; ".join(widens) in shown


def test_a_continuation_keeps_its_jobs_key_and_time_limit_unless_it_drops_them(
    conn: psycopg.Connection, tmp_path: Path
) -> None:
    first = claude_jobs.enqueue(
        conn, {"prompt": "p", "cwd": str(tmp_path), "timeout": "2h"},
        concurrency_key="prod-db", concurrency_limit=2,
    )  # fmt: skip
    then = claude_jobs.enqueue(conn, {"prompt": "on"}, continue_from=first.id)
    assert (then.concurrency_key, then.concurrency_limit, then.timeout) == ("prod-db", 2, 7200)
    loose = claude_jobs.enqueue(
        conn, {"prompt": "on", "concurrency_key": None, "timeout": None}, continue_from=first.id
    )
    assert (loose.concurrency_key, loose.timeout) == (None, None)


def test_a_continuation_in_another_directory_is_refused(
    conn: psycopg.Connection, invoke, tmp_path: Path
) -> None:
    first = claude_jobs.enqueue(conn, {"prompt": "p", "cwd": str(tmp_path)})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    payload = json.dumps({"prompt": "p", "cwd": str(elsewhere)})
    result = invoke("enqueue", "--continue-from", str(first.id), "--payload", payload)
    assert result.exit_code == 2
    assert result.output == (
        f"Error: a continuation runs where the job it continues ran ({tmp_path}), "
        f"not in {elsewhere}: claude keeps its sessions per directory\n"
    )
    assert conn.execute("SELECT count(*) FROM claude_jobs").fetchone()[0] == 1


def test_a_session_claude_cannot_find_fails_at_once() -> None:
    said = "No conversation found with session ID: 3648791a-f45c-402c-aafc-7f36a35c1f00"
    ended = claude_jobs._ProcessExit(returncode=1, stderr=said + "\n")
    with pytest.raises(claude_jobs.PermanentError, match="No conversation found"):
        claude_jobs.claude_outcome(ended, None, [])


@pytest.mark.real_claude
def test_the_real_cli_resumes_the_session_of_the_job_it_continues(
    conn: psycopg.Connection, db_url: str, real_claude: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    workdir, home = tmp_path / "project", tmp_path / "home"
    workdir.mkdir()
    home.mkdir()
    first = claude_jobs.enqueue(conn, {"prompt": "remember the word kumquat", "cwd": str(workdir)})
    then = claude_jobs.enqueue(conn, {"prompt": "which word?"}, continue_from=first.id)
    with MockMessagesAPI([Text("noted"), Text("kumquat")]) as api:
        for name, value in {**api.env(), "HOME": str(home), "CLAUDE_CODE_MAX_RETRIES": "0"}.items():
            monkeypatch.setenv(name, value)
        Worker(db_url, burst=True, claude_bin=str(real_claude)).run()
    row = job_row(conn, then.id)
    assert row["status"] == "succeeded", row["last_error"]
    assert row["result"]["result"] == "kumquat"
    said = json.dumps(api.turns[-1]["messages"])
    assert "remember the word kumquat" in said and "noted" in said, "the earlier turns came back"


def test_after_waits_for_every_job_and_show_and_list_say_so(
    conn: psycopg.Connection, invoke, start_worker, claude_log: Path, tmp_path: Path
) -> None:
    firsts = [
        claude_jobs.enqueue(
            conn, {"prompt": fake(sleep=s), "cwd": str(tmp_path)}, concurrency_limit=0
        )
        for s in (0.3, 1.0)
    ]
    result = invoke("enqueue", "--no-concurrency-key", "--after",
                    ",".join(str(j.id)[:8] for j in firsts),
                    "--payload", json.dumps({"prompt": "p", "cwd": str(tmp_path)}))  # fmt: skip
    assert result.exit_code == 0, result.output
    then = claude_jobs.get_job(conn, result.output.strip())
    assert then.after == [j.id for j in firsts]
    listed = invoke("list").output
    assert (
        "WAITS FOR" in listed and f"after {str(firsts[0].id)[:8]},{str(firsts[1].id)[:8]}" in listed
    )
    start_worker("--concurrency", "3")
    wait_for(lambda: status_of(conn, then.id) == "succeeded", what="the job after")
    finished = max(job_row(conn, j.id)["finished_at"] for j in firsts)
    assert job_row(conn, then.id)["started_at"] >= finished
    shown = invoke("show", str(then.id)).output
    assert f"after     {firsts[1].id} (succeeded)" in shown


def test_a_failed_or_cancelled_dependency_cancels_the_jobs_waiting_for_it(
    conn: psycopg.Connection, invoke, start_worker, claude_log: Path, tmp_path: Path
) -> None:
    failing = claude_jobs.enqueue(
        conn, {"prompt": fake(stdout="", exit=3), "cwd": str(tmp_path)}, max_attempts=1
    )
    later = claude_jobs.enqueue(conn, {"prompt": "p"}, delay=3600)
    waits = claude_jobs.enqueue(conn, {"prompt": "p"}, after=[failing.id])
    chained = claude_jobs.enqueue(conn, {"prompt": "p"}, after=[waits.id])
    on_later = claude_jobs.enqueue(conn, {"prompt": "p"}, after=[later.id, failing.id])
    start_worker()
    wait_for(lambda: status_of(conn, chained.id) == "cancelled", what="the cascade")
    assert job_row(conn, waits.id)["last_error"] == (
        f"cancelled: it waits for job {failing.id}, which failed"
    )
    assert job_row(conn, chained.id)["last_error"] == (
        f"cancelled: it waits for job {waits.id}, which was cancelled"
    )
    assert status_of(conn, on_later.id) == "cancelled"
    third = claude_jobs.enqueue(conn, {"prompt": "p"}, after=[later.id])
    assert invoke("cancel", str(later.id)).exit_code == 0
    wait_for(lambda: status_of(conn, third.id) == "cancelled", what="a cancel to cascade")
    refused = invoke("enqueue", "--after", str(failing.id), "--payload", '{"prompt": "p"}')
    assert (refused.exit_code, refused.output) == (
        2, f"Error: cannot wait for job {failing.id}: it is failed\n",
    )  # fmt: skip
    assert len(claude_runs(claude_log)) == 1


# -- costs ---------------------------------------------------------------------------------------


def test_a_daily_budget_stops_claude_jobs_once_the_days_costs_reach_it(
    conn: psycopg.Connection, invoke, start_worker, claude_log: Path, tmp_path: Path
) -> None:
    jobs = [
        claude_jobs.enqueue(conn, {"prompt": fake(cost=0.0125), "cwd": str(tmp_path)})
        for _ in range(3)
    ]
    worker = start_worker("--daily-budget-usd", "0.02")
    worker.wait_for_log("the daily budget of $0.02 is spent ($0.03)")

    def statuses() -> list[str]:
        return sorted(status_of(conn, j.id) for j in jobs)

    # (the third may be claimed and not yet given back: it waited for the key, then the budget)
    wait_for(lambda: statuses() == ["queued", "succeeded", "succeeded"], what=f"{statuses()}")
    assert len(claude_runs(claude_log)) == 2
    assert "no claude jobs until" in invoke("workers").output
    refused = invoke("worker", "--daily-budget-usd", "0")
    assert refused.exit_code == 2 and "--daily-budget-usd" in refused.output


def test_stats_cost_adds_up_the_stored_costs_per_day_and_queue(
    conn: psycopg.Connection, invoke, db_url: str, fake_claude: Path, claude_log: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    for queue, cost in (("nightly", 0.25), ("nightly", 0.5), ("urgent", 1.0), ("urgent", 0.0)):
        claude_jobs.enqueue(conn, {"prompt": fake(cost=cost), "cwd": str(tmp_path)}, queue=queue,
                            concurrency_limit=0)  # fmt: skip
    run_burst(db_url, fake_claude)
    yesterday = claude_jobs.enqueue(conn, {"prompt": fake(cost=2.0), "cwd": str(tmp_path)})
    run_burst(db_url, fake_claude)
    conn.execute(  # as if the default queue's job had run yesterday
        "UPDATE claude_jobs_spend SET day = day - 1 WHERE queue = 'default'"
    )
    assert status_of(conn, yesterday.id) == "succeeded"
    today = datetime.now(UTC).date()
    rows = [json.loads(line) for line in invoke("stats", "--cost", "--json").output.splitlines()]
    assert [(r["day"], r["queue"], r["model"], r["runs"], r["cost_usd"]) for r in rows] == [
        (str(today), "nightly", "claude-fake", 2, 0.75),
        (str(today), "urgent", "claude-fake", 2, 1.0),
        (str(today - timedelta(days=1)), "default", "claude-fake", 1, 2.0),
    ]
    assert (rows[0]["input_tokens"], rows[0]["output_tokens"]) == (20, 10)
    table = invoke("stats", "--cost").output.splitlines()
    assert table[0].split()[:6] == ["DAY", "(UTC)", "QUEUE", "MODEL", "RUNS", "INPUT"]
    assert table[-1].split() == ["total", "5", "50", "25", "10", "5", "$3.75"]
    assert len(invoke("stats", "--cost", "--days", "1", "--json").output.splitlines()) == 2


def test_leave_headroom_holds_claude_jobs_everywhere_after_a_warning_until_its_reset(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path,
    invoke,
) -> None:  # fmt: skip
    resets = int(datetime.now(UTC).timestamp()) + 7200
    warning = {"type": "rate_limit_event", "rate_limit_info": {
        "status": "allowed_warning", "resetsAt": resets, "rateLimitType": "five_hour"}}  # fmt: skip
    warned = claude_jobs.enqueue(conn, {"prompt": fake(stream=[warning]), "cwd": str(tmp_path)})
    run_burst(db_url, fake_claude)  # (a worker without --leave-headroom: no hold)
    assert status_of(conn, warned.id) == "succeeded" and claude_jobs.list_holds(conn) == []
    again = claude_jobs.enqueue(conn, {"prompt": fake(stream=[warning]), "cwd": str(tmp_path)})
    handler = ClaudeHandler(str(fake_claude), leave_headroom=True)
    Worker(db_url, burst=True, handlers={"claude": handler}).run()
    assert status_of(conn, again.id) == "succeeded", "the warned run finishes"
    [hold] = claude_jobs.list_holds(conn)
    assert hold["kind"] == "claude" and int(hold["until"].timestamp()) == resets
    assert hold["reason"].startswith("headroom for people: claude's five-hour window")
    later = claude_jobs.enqueue(conn, {"prompt": "later", "cwd": str(tmp_path)})
    Worker(db_url, burst=True, handlers={"claude": handler}).run()
    assert status_of(conn, later.id) == "queued"
    assert "headroom for people" in invoke("show", str(later.id)).output
    assert invoke("resume", "--hold", "claude").exit_code == 0
    Worker(db_url, burst=True, handlers={"claude": handler}).run()
    assert status_of(conn, later.id) == "succeeded"
