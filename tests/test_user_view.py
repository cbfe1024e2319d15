"""What a user sees: why a job waits, and what the commands say when something is off.

`show` and `list` say why a queued job waits (a paused queue, a hold, a busy key, a job it
waits for, a host, no worker fit to run it) and why a job was cancelled; `logs -f` and
`--wait` say it as it changes; a worker that cannot run claude says so when it starts.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import TESTS, claude_runs, fake, git, job_row, status_of, wait_for
from test_operations import make_job

import claude_jobs


def register_worker(
    conn: psycopg.Connection,
    *,
    host: str = "elsewhere",
    queues: tuple[str, ...] = ("*",),
    kinds: tuple[str, ...] = ("claude",),
    paused_until: datetime | None = None,
    reason: str | None = None,
) -> uuid.UUID:
    """A live worker row (its heartbeat now, its lock held by this test's session), as
    `claude-jobs workers` would list it."""
    worker_id = uuid.uuid4()
    (key,) = conn.execute(
        """INSERT INTO claude_jobs_workers (id, lock_key, host, pid, queues, kinds, concurrency,
               claude_paused_until, claude_paused_reason)
           VALUES (%s, nextval('claude_jobs_worker_keys'), %s, 4120, %s, %s, 5, %s, %s)
           RETURNING lock_key""",
        [worker_id, host, list(queues), list(kinds), paused_until, reason],
    ).fetchone()
    conn.execute("SELECT pg_advisory_lock(%s, %s)", [claude_jobs.LOCK_NAMESPACE, key])
    return worker_id


def why(invoke, job_id: Any) -> str:
    """The `why` line of `show`."""
    shown = invoke("show", str(job_id)).output
    lines = [line for line in shown.splitlines() if line.startswith("why ")]
    assert len(lines) == 1, shown
    return lines[0].removeprefix("why").strip()


def test_show_and_list_say_why_a_queued_job_waits(invoke, conn: psycopg.Connection) -> None:
    worker = register_worker(conn)
    holder = make_job(conn, status="running", concurrency_key="/repo", key_held=True,
                      worker_id=worker, started_at=datetime.now(UTC))  # fmt: skip
    keyed = make_job(conn, concurrency_key="/repo")
    later = make_job(conn, run_at=datetime.now(UTC) + timedelta(hours=2))
    overloaded = "claude failed: overloaded"
    failed_once = make_job(
        conn, run_at=datetime.now(UTC) + timedelta(minutes=3), attempts=1,
        last_error=overloaded, errors=[{"attempt": 1, "error": overloaded}],
    )  # fmt: skip
    after = make_job(conn, after=[holder])
    paused = make_job(conn, queue="nightly")
    invoke("pause", "nightly")
    ready = make_job(conn)
    assert why(invoke, keyed) == f"it waits for its concurrency key /repo, held by job {holder}"
    assert why(invoke, later).startswith("it is due at ")
    assert why(invoke, failed_once).startswith(
        "attempt 1 of 5 failed (claude failed: overloaded); it runs again at "
    )
    assert why(invoke, after) == f"it waits for job {holder} (running) to succeed"
    assert why(invoke, paused) == "queue nightly is paused: `claude-jobs resume nightly`"
    assert why(invoke, ready) == "ready: it waits for a free worker"
    listed = invoke("list").output
    row = {line.split()[0]: line for line in listed.splitlines()[1:]}
    assert "key busy" in row[str(keyed)[:8]]
    assert "due in 2h" in row[str(later)[:8]]
    assert f"after {str(holder)[:8]}" in row[str(after)[:8]]
    assert "paused" in row[str(paused)[:8]]


def test_show_says_when_no_worker_can_take_or_run_a_job(invoke, conn) -> None:
    job = make_job(conn)
    assert why(invoke, job) == (
        "no live worker takes claude jobs of queue default: start one (`claude-jobs worker`)"
    )
    register_worker(conn, queues=("other",))
    assert why(invoke, job).startswith("no live worker takes claude jobs of queue default")
    until = datetime.now(UTC) + timedelta(minutes=5)
    register_worker(conn, paused_until=until,
                    reason="claude is not logged in: log in as the worker's user")  # fmt: skip
    assert why(invoke, job).startswith(
        "no live worker can run claude jobs now: elsewhere:4120 starts none until "
    )
    assert "claude is not logged in" in why(invoke, job)
    assert "no fit worker" in invoke("list").output


def test_show_says_when_a_usage_limit_holds_claude_jobs(invoke, conn) -> None:
    register_worker(conn)
    job = make_job(conn)
    until = datetime.now(UTC) + timedelta(hours=1)
    conn.execute(
        "INSERT INTO claude_jobs_holds (kind, until, reason) VALUES ('claude', %s, %s)",
        [until, "claude's usage limit: You've hit your 5-hour limit"],
    )
    assert why(invoke, job).startswith("no worker starts claude jobs until ")
    assert why(invoke, job).endswith("claude's usage limit: You've hit your 5-hour limit")
    assert "held" in invoke("list").output


def test_show_says_where_a_continuation_must_run(invoke, conn) -> None:
    register_worker(conn, host="here")
    first = make_job(conn, status="succeeded", session_id="s-1", session_host="build7",
                     finished_at=datetime.now(UTC))  # fmt: skip
    then = make_job(conn, continue_from=first)
    assert why(invoke, then) == (
        f"it runs only on build7, where the claude session of job {first} is kept, and no "
        "live worker there takes it"
    )
    running = make_job(conn, status="running", started_at=datetime.now(UTC))
    waiting = make_job(conn, continue_from=running)
    assert why(invoke, waiting) == f"it waits for job {running} (running) to finish"


def test_show_says_why_a_job_was_cancelled_and_its_last_error(invoke, conn) -> None:
    failed = make_job(conn, status="failed", last_error="claude failed: boom",
                      finished_at=datetime.now(UTC))  # fmt: skip
    waiting = make_job(conn, after=[failed])
    claude_jobs._db_cancel_blocked(conn)  # as every worker's sweep does
    assert status_of(conn, waiting) == "cancelled"
    assert why(invoke, waiting) == f"cancelled: it waits for job {failed}, which failed"
    shown = invoke("show", str(failed)).output
    assert "error     claude failed: boom" in shown


def test_follow_says_the_real_reason_and_updates_it(conn: psycopg.Connection) -> None:
    worker = register_worker(conn)
    holder = make_job(conn, status="running", concurrency_key="/repo", key_held=True,
                      worker_id=worker, started_at=datetime.now(UTC))  # fmt: skip
    job = make_job(conn, concurrency_key="/repo")
    updates = claude_jobs.follow_job(conn, job, poll=0.1)
    first = next(updates)
    assert first.why == f"it waits for its concurrency key /repo, held by job {holder}"
    conn.execute("UPDATE claude_jobs SET status = 'succeeded', key_held = false WHERE id = %s",
                 [holder])  # fmt: skip
    second = next(updates)
    assert second.why == "ready: it waits for a free worker"
    assert claude_jobs._progress_note(first) == (
        f"waiting: it waits for its concurrency key /repo, held by job {holder}"
    )


def test_a_followed_running_job_says_that_its_queue_was_paused(conn: psycopg.Connection) -> None:
    worker = register_worker(conn)
    job = make_job(conn, status="running", worker_id=worker, started_at=datetime.now(UTC))
    assert claude_jobs.job_update(conn, job).paused is False
    claude_jobs.pause_queue(conn, "default")
    update = claude_jobs.job_update(conn, job)
    assert (update.paused, update.to_dict()["paused"], update.why) == (True, True, None)


def test_a_job_handed_back_for_its_busy_key_is_not_logged_as_claimed(
    conn: psycopg.Connection, start_worker, claude_log: Path, tmp_path: Path
) -> None:
    claude_jobs.enqueue_many(conn, [{"prompt": fake(sleep=0.05), "cwd": str(tmp_path)}] * 10)
    worker = start_worker("--concurrency", "4", "--burst")
    assert worker.wait(timeout=60) == 0
    assert worker.log().count(" claimed job=") == 10
    assert all(" branch=" not in line for line in worker.log().splitlines())


def test_a_worker_that_cannot_run_claude_says_so_at_start_and_a_burst_exits_1(
    conn: psycopg.Connection, start_worker, tmp_path: Path
) -> None:
    job = claude_jobs.enqueue(conn, {"prompt": "p", "cwd": str(tmp_path)})
    worker = start_worker("--burst", CLAUDE_JOBS_CLAUDE_BIN=str(tmp_path / "no-claude"))
    assert worker.wait() == 1
    assert "this worker cannot run claude jobs: claude executable not found" in worker.log()
    assert "ran nothing: this worker cannot run claude" in worker.log()
    assert (status_of(conn, job.id), job_row(conn, job.id)["attempts"]) == ("queued", 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="claude refuses to skip permissions only as root")
def test_a_worker_run_as_root_without_is_sandbox_says_so_at_start(
    conn: psycopg.Connection, start_worker, tmp_path: Path
) -> None:
    job = claude_jobs.enqueue(conn, {"prompt": "p", "cwd": str(tmp_path)})
    worker = start_worker("--burst", IS_SANDBOX="0")
    assert worker.wait() == 1
    assert "this worker cannot run claude jobs: claude refuses" in worker.log()
    assert (status_of(conn, job.id), job_row(conn, job.id)["attempts"]) == ("queued", 0)


def test_resume_hold_lifts_a_workers_own_unfit_back_off(
    conn: psycopg.Connection, invoke, start_worker, fake_claude: Path, claude_log: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    later = tmp_path / "bin" / "claude"
    job = claude_jobs.enqueue(conn, {"prompt": "p", "cwd": str(tmp_path)})
    start_worker(CLAUDE_JOBS_CLAUDE_BIN=str(later))
    wait_for(  # (logged as unfit first, recorded on its row just after)
        lambda: [w for w in claude_jobs.list_workers(conn) if w["claude_paused_until"]],
        what="the worker to record that it backs off claude jobs",
    )
    later.parent.mkdir()
    later.symlink_to(fake_claude)  # someone installs claude
    result = invoke("resume", "--hold", "claude")
    assert result.exit_code == 0, result.output
    assert "1 worker(s) that could not run claude try again" in result.output
    wait_for(lambda: status_of(conn, job.id) == "succeeded", what="the job to run, no restart")


def test_a_postpone_from_a_python_handler_runs_at_the_time_it_gave(
    conn: psycopg.Connection, db_url: str
) -> None:
    when = datetime.now(UTC) + timedelta(hours=3)
    job = claude_jobs.enqueue(conn, {"at": when.isoformat()}, kind="later")
    claude_jobs.Worker(db_url, burst=True, handlers={"later": later}).run()
    assert job_row(conn, job.id)["run_at"] == when


@claude_jobs.handler("later")
def later(job: claude_jobs.Job) -> None:
    raise claude_jobs.Postpone("not yet", run_at=datetime.fromisoformat(job.payload["at"]))


@claude_jobs.handler("chore")
def chore(job: claude_jobs.Job) -> None:
    """A Python job kind."""


def test_cancel_of_several_jobs_cancels_all_or_none(invoke, conn) -> None:
    queued = make_job(conn)
    done = make_job(conn, status="succeeded", finished_at=datetime.now(UTC))
    result = invoke("cancel", str(queued), str(done))
    assert result.exit_code == 1
    assert result.output == (
        f"Error: job {done} is succeeded: only queued or running jobs can be cancelled; "
        "nothing was cancelled\n"
    )
    assert status_of(conn, queued) == "queued"
    assert invoke("cancel", str(queued)).exit_code == 0


def test_pausing_a_queue_no_job_ever_used_warns(invoke, conn) -> None:
    make_job(conn, queue="nightly")
    result = invoke("pause", "nightyl")
    assert result.exit_code == 0
    assert result.stdout == "queue nightyl paused: 0 queued job(s) wait for `claude-jobs resume`\n"
    assert result.stderr == (
        "warning: no job has ever used queue nightyl (known queues: nightly); it is "
        "paused anyway, for the jobs to come\n"
    )
    data = json.loads(invoke("pause", "nightly", "--json").stdout)
    assert data == {"queue": "nightly", "paused": True, "newly": True, "known": True, "queued": 1}
    assert json.loads(invoke("pause", "other", "--json").stdout)["known"] is False


@pytest.mark.slow
def test_the_embedded_postgresql_stops_after_an_unclean_exit(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent), "CLAUDE_JOBS_HOME": str(home)}
    env.pop("DATABASE_URL", None)
    env.pop("CLAUDE_JOBS_DATABASE_URL", None)
    crash = "import os, signal, claude_jobs; claude_jobs.start_embedded(claude_jobs.default_home()); os.kill(os.getpid(), signal.SIGKILL)"  # noqa: E501
    assert subprocess.run([sys.executable, "-c", crash], env=env).returncode == -signal.SIGKILL
    pidfile = home / "pgdata" / "postmaster.pid"
    assert pidfile.exists(), "the server runs on after the crash"
    listed = subprocess.run(
        [sys.executable, "-m", "claude_jobs", "list"], env=env, capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr
    wait_for(lambda: not pidfile.exists(), timeout=20, what="the embedded server to stop")


# -- keep what jobs leave behind ------------------------------------------------------------------


def test_costs_and_tokens_outlive_the_jobs_in_a_ledger(
    conn: psycopg.Connection, invoke, db_url: str, fake_claude: Path, claude_log: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    cheap = claude_jobs.enqueue(conn, {"prompt": fake(emit="mock-success.json"), "cwd": "."})
    dear = claude_jobs.enqueue(
        conn, {"prompt": fake(cost=1.25), "cwd": str(tmp_path)}, queue="nightly"
    )
    handler = claude_jobs.ClaudeHandler(str(fake_claude))
    claude_jobs.Worker(db_url, burst=True, handlers={"claude": handler}).run()
    assert [status_of(conn, job.id) for job in (cheap, dear)] == ["succeeded", "succeeded"]
    assert "$0.0002350" in invoke("show", str(cheap.id)).output
    assert "· $0.0002350 ·" in invoke("logs", str(cheap.id)).output
    conn.execute("UPDATE claude_jobs SET finished_at = now() - interval '30 days'")
    assert invoke("cleanup", "--older-than", "14d").exit_code == 0
    assert conn.execute("SELECT count(*) FROM claude_jobs").fetchone() == (0,)
    costs = invoke("stats", "--cost").output
    lines = costs.splitlines()
    assert lines[0].split() == ["DAY", "(UTC)", "QUEUE", "MODEL", "RUNS", "INPUT", "OUTPUT",
                                "CACHE", "READ", "CACHE", "WRITE", "COST"]  # fmt: skip
    today = datetime.now(UTC).date().isoformat()
    assert f"{today}  default  claude-opus-4-8[1m]" in costs
    assert "$0.0002350" in costs and "$1.25" in costs
    assert lines[-1].split()[-1] == "$1.25"  # the total, rounded to the cent above one
    rows = [json.loads(line) for line in invoke("stats", "--cost", "--json").output.splitlines()]
    opus = next(row for row in rows if row["model"] == "claude-opus-4-8[1m]")
    assert (opus["input_tokens"], opus["output_tokens"], opus["cost_usd"]) == (12, 7, 0.000235)


def test_a_daily_budget_reads_the_ledger(conn: psycopg.Connection, db_url: str) -> None:
    conn.execute(
        "INSERT INTO claude_jobs_spend (day, queue, model, runs, cost_usd) "
        "VALUES ((now() AT TIME ZONE 'UTC')::date, 'default', 'opus', 3, 25)"
    )
    job = claude_jobs.enqueue(conn, {"prompt": "p"})
    claude_jobs.Worker(db_url, burst=True, daily_budget_usd=20).run()
    assert (status_of(conn, job.id), job_row(conn, job.id)["attempts"]) == ("queued", 0)


@pytest.mark.parametrize(
    ("amount", "shown"),
    [(0, "$0.00"), (0.000235, "$0.0002350"), (0.0099994, "$0.009999"), (0.01, "$0.01"),
     (1.234, "$1.23"), (1234.5, "$1,234.50"), (1e-7, "$0.0000001000")],
)  # fmt: skip
def test_money_below_a_cent_keeps_four_significant_digits(amount: float, shown: str) -> None:
    assert claude_jobs._money(amount) == shown


# -- worktrees ---------------------------------------------------------------------------------


def commit_file(name: str) -> list[str]:
    return ["sh", "-c", f"echo {name} > {name} && git add {name} && git -c user.name=t "
            f"-c user.email=t@example.com commit -qm {name}"]  # fmt: skip


def test_a_worktree_job_needs_a_repository_and_a_base_at_enqueue(
    invoke, conn, repo: Path, tmp_path: Path
) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    outside = invoke(
        "enqueue", "--worktree", "--payload", json.dumps({"prompt": "p", "cwd": str(plain)})
    )
    assert outside.exit_code == 2
    assert outside.output == f'Error: "worktree" needs a cwd inside a git repository: {plain}\n'
    payload = json.dumps({"prompt": "p", "cwd": str(repo)})
    bad = invoke("enqueue", "--worktree", "--base", "no-such-ref", "--payload", payload)
    assert bad.exit_code == 2
    assert bad.output == f"Error: the worktree's base is not a commit in {repo}: no-such-ref\n"
    assert conn.execute("SELECT count(*) FROM claude_jobs").fetchone() == (0,)


def test_diff_shows_a_worktree_jobs_changes_committed_and_not(
    conn: psycopg.Connection, invoke, start_worker, claude_log: Path, repo: Path, tmp_path: Path
) -> None:
    prompt = fake(
        run=[commit_file("done.txt"), ["sh", "-c", "echo draft > draft.txt; echo more >> app.py"]]
    )
    job = claude_jobs.enqueue(conn, {"prompt": prompt, "cwd": str(repo), "worktree": True})
    worker = start_worker("--burst", CLAUDE_JOBS_HOME=str(tmp_path / "home"))
    assert worker.wait() == 0
    branch = f"claude-jobs/{job.id.hex[:12]}"
    assert f"branch={branch}" in worker.log()
    assert branch[:20] in invoke("list").output or "claude-jobs/" in invoke("list").output
    diff = invoke("diff", str(job.id))
    assert diff.exit_code == 0, diff.output
    assert "+done.txt" in diff.output and "+more" in diff.output
    assert "draft.txt" in diff.output  # untracked, named
    stat = invoke("diff", "--stat", str(job.id))
    assert "done.txt" in stat.output and "app.py" in stat.output
    plain = claude_jobs.enqueue(conn, {"prompt": "p"})
    refused = invoke("diff", str(plain.id))
    assert (refused.exit_code, refused.output) == (
        1, f"Error: job {plain.id} is not a worktree job: it has no branch of its own\n"
    )  # fmt: skip


def test_worktrees_lists_them_and_prune_removes_only_what_is_safe(
    conn: psycopg.Connection, invoke, start_worker, claude_log: Path, repo: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    clean = claude_jobs.enqueue(
        conn, {"prompt": fake(run=[commit_file("a.txt")]), "cwd": str(repo), "worktree": True}
    )
    dirty = claude_jobs.enqueue(
        conn, {"prompt": fake(run=[["touch", "wip.txt"]]), "cwd": str(repo), "worktree": True}
    )
    assert start_worker("--burst", "--keep-worktrees", CLAUDE_JOBS_HOME=str(home)).wait() == 0
    listed = invoke("--home", str(home), "worktrees")
    assert listed.exit_code == 0, listed.output
    for job in (clean, dirty):
        assert f"claude-jobs/{job.id.hex[:12]}" in listed.output
        assert str(job.id)[:8] in listed.output
    assert "uncommitted" in listed.output
    rows = [
        json.loads(line)
        for line in invoke("--home", str(home), "worktrees", "--json").output.splitlines()
    ]
    assert {row["job"] for row in rows} == {str(clean.id), str(dirty.id)}
    assert all(row["size_bytes"] > 0 and row["exists"] for row in rows)
    conn.execute("DELETE FROM claude_jobs")  # cleaned up: the worktrees are still known
    assert "uncommitted" in invoke("--home", str(home), "worktrees").output
    pruned = invoke("--home", str(home), "worktrees", "prune")
    assert pruned.exit_code == 0, pruned.output
    clean_tree, dirty_tree = (
        next(r["path"] for r in rows if r["job"] == str(j.id)) for j in (clean, dirty)
    )
    assert not Path(clean_tree).exists() and Path(dirty_tree).exists()
    assert f"kept {dirty_tree}: it has uncommitted changes (--force removes them)" in pruned.output
    assert git(repo, "branch", "--list", f"claude-jobs/{clean.id.hex[:12]}") != "", (
        "not merged: kept"
    )
    forced = invoke("--home", str(home), "worktrees", "prune", "--force")
    assert forced.exit_code == 0 and not Path(dirty_tree).exists()


def test_worktrees_prune_merged_deletes_merged_branches(
    conn: psycopg.Connection, invoke, start_worker, claude_log: Path, repo: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    job = claude_jobs.enqueue(
        conn, {"prompt": fake(run=[commit_file("a.txt")]), "cwd": str(repo), "worktree": True}
    )
    assert start_worker("--burst", CLAUDE_JOBS_HOME=str(home)).wait() == 0
    branch = f"claude-jobs/{job.id.hex[:12]}"
    git(repo, "merge", "-q", "--ff-only", branch)
    young = invoke("--home", str(home), "worktrees", "prune", "--merged", "--older-than", "1d")
    assert young.exit_code == 0 and git(repo, "branch", "--list", branch) != ""
    merged = invoke("--home", str(home), "worktrees", "prune", "--merged")
    assert merged.exit_code == 0, merged.output
    assert git(repo, "branch", "--list", branch) == ""
    assert f"deleted branch {branch} (merged)" in merged.output


def test_a_worktree_with_commits_no_branch_holds_or_a_rebase_half_done_is_not_lost(
    conn: psycopg.Connection, invoke, start_worker, claude_log: Path, repo: Path, tmp_path: Path
) -> None:
    """A commit made on a detached HEAD (a clean worktree, as git status sees it) is saved on a
    branch before its worktree goes, by the worker and by prune; a worktree in the middle of a
    rebase is kept."""
    home = tmp_path / "home"
    detached = claude_jobs.enqueue(conn, {"prompt": fake(run=[
        ["git", "checkout", "-q", "--detach"], commit_file("lost.txt")]), "cwd": str(repo),
        "worktree": True})  # fmt: skip
    rebasing = claude_jobs.enqueue(
        conn, {"prompt": fake(run=[commit_file("b.txt")]), "cwd": str(repo), "worktree": True}
    )
    assert start_worker("--burst", CLAUDE_JOBS_HOME=str(home)).wait() == 0
    trees = {row["job_id"]: row["path"] for row in claude_jobs.list_worktrees(conn)}
    assert Path(trees[detached.id]).exists()  # (the worker did not remove it)
    assert not Path(trees[rebasing.id]).exists()  # (clean, its commit on its branch)
    listed = invoke("--home", str(home), "worktrees").output
    assert "1 on a detached HEAD only" in listed
    lost = git(Path(trees[detached.id]), "rev-parse", "HEAD").strip()
    branch = f"claude-jobs/{rebasing.id.hex[:12]}"
    again = Path(trees[rebasing.id])
    git(repo, "worktree", "add", "-q", str(again), branch)
    editor = {**os.environ, "GIT_SEQUENCE_EDITOR": "sed -i 1s/^pick/edit/"}
    subprocess.run(["git", "rebase", "-q", "-i", "HEAD~1"], cwd=again, env=editor, check=True,
                   capture_output=True)  # fmt: skip
    assert git(again, "status", "--porcelain") == ""  # (clean: only the rebase holds it)
    assert "in the middle of a rebase" in invoke("--home", str(home), "worktrees").output
    pruned = invoke("--home", str(home), "worktrees", "prune")
    assert pruned.exit_code == 0, pruned.output
    saved = f"claude-jobs/{detached.id.hex[:12]}-detached"
    assert f"saved 1 commit(s) of the detached HEAD of {trees[detached.id]} on branch {saved}" in (
        pruned.output
    )
    assert not Path(trees[detached.id]).exists()
    assert git(repo, "rev-parse", saved).strip() == lost
    assert f"kept {again}: it is in the middle of a rebase" in pruned.output and again.exists()
    goes_on = claude_jobs.enqueue(conn, {"prompt": fake()}, continue_from=rebasing.id)
    start_worker("--burst", CLAUDE_JOBS_HOME=str(home)).wait()
    assert status_of(conn, goes_on.id) == "failed"  # (for good: no retry can fix it)
    said = claude_jobs.get_job(conn, goes_on.id).last_error or ""
    assert f"the worktree {again} is not on the job's branch {branch}: an earlier attempt " in said
    assert "left it in the middle of a rebase; finish or undo that there" in said


@claude_jobs.handler("flaky-once")
def flaky_once(job: claude_jobs.Job) -> str:
    if job.attempts == 1:
        raise RuntimeError("first attempt broke")
    return "fine"


def show_rows(invoke, job_id: Any) -> dict[str, str]:
    """The rows of `show`, by name (the first word of each line)."""
    lines = invoke("show", str(job_id)).output.splitlines()
    return {line.split()[0]: line[10:] for line in lines if line[:1].isalpha() and len(line) > 9}


def test_finished_jobs_show_earlier_errors_as_their_attempts_and_no_stale_reasons(
    conn: psycopg.Connection, invoke, db_url: str
) -> None:
    job = claude_jobs.enqueue(conn, {}, kind="flaky-once", queue="flaky")
    with claude_jobs.Worker(db_url, handlers={"flaky-once": flaky_once}, backoff_base=0.01,
                            backoff_max=0.01) as worker:  # fmt: skip
        worker.run_once()
        wait_for(lambda: status_of(conn, job.id) == "queued", what="the retry")
        wait_for(lambda: claude_jobs.get_job(conn, job.id).run_at <= datetime.now(UTC))
        worker.run_once()
    assert status_of(conn, job.id) == "succeeded"
    rows = show_rows(invoke, job.id)
    assert "error" not in rows and "why" not in rows
    shown = invoke("show", str(job.id)).output
    assert "attempt 1 (" in shown and "RuntimeError: first attempt broke" in shown
    assert json.loads(invoke("show", str(job.id), "--json").output)["last_error"] is None
    # cancelled while running, then retried: running again, nothing says it was cancelled
    again = make_job(conn, status="cancelled", last_error="cancelled while running", attempts=1,
                     errors=[{"attempt": 1, "error": "cancelled while running"}])  # fmt: skip
    assert invoke("retry", str(again)).exit_code == 0
    conn.execute("UPDATE claude_jobs SET status = 'running', attempts = 1 WHERE id = %s", [again])
    assert "error" not in show_rows(invoke, again)
    assert claude_jobs.get_job(conn, again).last_error is None
    # a job that waited for another, both finished: nothing to wait for in `list`
    first = make_job(conn, status="succeeded", queue="chain")
    second = make_job(conn, status="succeeded", queue="chain", after=[first])
    listed = invoke("list", "--queue", "chain").output
    assert str(second)[:8] in listed and "after" not in listed and "WAITS FOR" not in listed


# -- small things ------------------------------------------------------------------------------


def test_the_transcript_marks_each_attempt(invoke, conn) -> None:
    said = json.dumps(
        {"type": "assistant", "message": {"content": [{"type": "text", "text": "hi"}]}}
    )
    transcript = (
        json.dumps({"type": "claude_jobs", "attempt": 1, "worker": "a:1"})
        + "\n"
        + said
        + "\n"
        + json.dumps({"type": "claude_jobs", "attempt": 2, "worker": "b:2"})
        + "\n"
        + said
        + "\n"
    )
    job = make_job(conn, transcript=transcript, transcript_size=len(transcript))
    lines = invoke("logs", str(job)).output.splitlines()
    assert lines == ["── attempt 1 (worker a:1) ──", "hi", "── attempt 2 (worker b:2) ──", "hi"]


def test_each_attempt_starts_with_its_mark_in_the_transcript(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path
) -> None:
    job = claude_jobs.enqueue(conn, {"prompt": fake(exit=3), "cwd": str(tmp_path)}, max_attempts=2)
    handler = claude_jobs.ClaudeHandler(str(fake_claude))
    for _ in range(2):
        claude_jobs.Worker(
            db_url, burst=True, handlers={"claude": handler}, backoff_base=0.01
        ).run()
        conn.execute("UPDATE claude_jobs SET run_at = now()")
    marks = [json.loads(line) for line in job_row(conn, job.id)["transcript"].splitlines()
             if '"claude_jobs"' in line]  # fmt: skip
    assert [mark["attempt"] for mark in marks] == [1, 2]


def test_a_result_that_is_an_error_reads_as_one(invoke, conn) -> None:
    result = json.dumps({"type": "result", "subtype": "success", "is_error": True,
                         "result": "Not logged in", "num_turns": 1})  # fmt: skip
    job = make_job(conn, transcript=result + "\n", transcript_size=len(result) + 1)
    assert "· error (success) · 1 turns" in invoke("logs", str(job)).output


def test_a_lost_worker_is_called_lost(conn: psycopg.Connection) -> None:
    worker_id = uuid.uuid4()
    job = make_job(conn, status="running", worker_id=worker_id, worker="gone:1", attempts=1)
    conn.execute(claude_jobs.RECOVER_JOBS_OF, {"worker_id": worker_id})
    assert job_row(conn, job)["last_error"] == (
        "interrupted: worker gone:1 was lost (killed, crashed or cut off) during the attempt"
    )


def test_a_worktree_job_that_failed_before_its_branch_says_so(invoke, conn) -> None:
    job = make_job(conn, payload=json.dumps({"prompt": "p", "worktree": True}), status="failed",
                   finished_at=datetime.now(UTC), last_error="boom")  # fmt: skip
    assert "branch    none: the job ended before it made one" in invoke("show", str(job)).output


def test_stats_at_80_columns_keeps_the_columns_that_are_not_all_zero(
    invoke, conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    for _ in range(3):
        make_job(conn, status="cancelled", finished_at=datetime.now(UTC))
    header = invoke("stats").output.splitlines()[0]
    assert "CANCELLED" in header


# -- easier prompts ------------------------------------------------------------------------------


def test_enqueue_takes_a_prompt_as_an_argument_a_file_or_stdin(
    invoke, conn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    first = invoke("enqueue", "explain this code")
    assert first.exit_code == 0, first.output
    job = claude_jobs.get_job(conn, first.stdout.strip())
    assert job.payload == {"prompt": "explain this code", "cwd": str(tmp_path)}
    prompt = tmp_path / "prompt.md"
    prompt.write_text("review it\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    second = invoke(
        "enqueue", "--prompt-file", str(prompt), "--cwd", "sub", "--payload", '{"model": "opus"}'
    )
    assert second.exit_code == 0, second.output
    assert claude_jobs.get_job(conn, second.stdout.strip()).payload == {
        "prompt": "review it\n", "cwd": str(sub), "model": "opus",
    }  # fmt: skip
    third = invoke("enqueue", "--prompt-file", "-", "--max-budget-usd", "2", input="from stdin")
    assert third.exit_code == 0, third.output
    assert claude_jobs.get_job(conn, third.stdout.strip()).payload == {
        "prompt": "from stdin", "cwd": str(tmp_path), "max_budget_usd": 2.0,
    }  # fmt: skip
    whole = tmp_path / "job.json"
    whole.write_text(json.dumps({"prompt": "whole", "cwd": "sub", "max_turns": 3}))
    fourth = invoke("enqueue", "--payload", f"@{whole}")
    assert fourth.exit_code == 0, fourth.output
    assert claude_jobs.get_job(conn, fourth.stdout.strip()).payload["max_turns"] == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["a prompt", "--payload", '{"prompt": "b"}'], "give the prompt once"),
        (["a prompt", "--prompt-file", "x"], "give the prompt once"),
        (["a prompt", "--file", "-"], "--file reads many jobs"),
        (["--prompt-file", "/no/such/file"], "No such file"),
        (["--payload", "@/no/such/file.json"], "cannot read /no/such/file.json"),
        (["--cwd", "/no/such/dir", "p"], "is not an existing directory"),
        (["--kind", "chore", "a prompt"], "a prompt is for claude jobs"),
    ],
)
def test_bad_prompt_options_exit_2_and_queue_nothing(invoke, conn, args, message) -> None:
    result = invoke("enqueue", "--import", "test_user_view", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1
    assert conn.execute("SELECT count(*) FROM claude_jobs").fetchone() == (0,)


def test_a_mebibyte_prompt_from_a_file_reaches_claude_byte_for_byte(
    db_url: str, start_worker, claude_log: Path, tmp_path: Path
) -> None:
    prompt = ('it\'s "quoted", $HOME, `ls`, -- --help, naïve 東京 🚀\n' * 20_000)[: 1024 * 1024]
    path = tmp_path / "prompt.md"
    path.write_bytes(prompt.encode())
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    enqueued = subprocess.run(
        [sys.executable, "-m", "claude_jobs", "--database-url", db_url, "enqueue",
         "--prompt-file", "-", "--cwd", str(tmp_path)],
        input=path.read_bytes(), capture_output=True, env=env,
    )  # fmt: skip
    assert enqueued.returncode == 0, enqueued.stderr
    assert start_worker("--burst").wait() == 0
    [run] = claude_runs(claude_log)
    assert base64.b64decode(run["stdin"]) == prompt.encode()


# -- from a review --------------------------------------------------------------------------------


def test_worktrees_and_prune_survive_a_repository_that_moved(
    conn: psycopg.Connection, invoke, start_worker, claude_log: Path, repo: Path, tmp_path: Path
) -> None:
    job = claude_jobs.enqueue(
        conn, {"prompt": fake(run=[commit_file("a.txt")]), "cwd": str(repo), "worktree": True}
    )
    assert start_worker("--burst", CLAUDE_JOBS_HOME=str(tmp_path / "home")).wait() == 0
    repo.rename(tmp_path / "moved")
    listed = invoke("worktrees")
    assert listed.exit_code == 0, listed.output
    assert f"claude-jobs/{job.id.hex[:12]}" in listed.output
    pruned = invoke("worktrees", "prune", "--merged")
    assert pruned.exit_code == 0, pruned.output


def test_diff_is_git_s_bytes_as_they_are(
    conn: psycopg.Connection, invoke, start_worker, claude_log: Path, repo: Path, tmp_path: Path
) -> None:
    latin = ["sh", "-c", "printf 'caf\\351\\r\\n' > latin.txt"]
    job = claude_jobs.enqueue(
        conn, {"prompt": fake(run=[latin]), "cwd": str(repo), "worktree": True}
    )
    assert start_worker("--burst", CLAUDE_JOBS_HOME=str(tmp_path / "home")).wait() == 0
    diff = invoke("diff", str(job.id))
    assert diff.exit_code == 0, diff.output
    assert b"+caf\xe9\r\n" in diff.stdout_bytes


def test_what_comes_from_the_database_reaches_git_only_as_claude_jobs_wrote_it() -> None:
    good = {"repo": "/r", "path": "/r-wt", "branch": "claude-jobs/0123456789ab", "base": "a" * 40}
    assert claude_jobs._checked_record(good)["branch"] == "claude-jobs/0123456789ab"
    for bad in ({"branch": "--output=/root/.bashrc"}, {"base": "--all"}, {"path": "-rf"},
                {"branch": "main"}, {"repo": "relative"}):  # fmt: skip
        with pytest.raises(claude_jobs._GitError):
            claude_jobs._checked_record({**good, **bad})


def test_a_run_counts_once_in_the_ledger_whatever_models_it_used() -> None:
    spent = claude_jobs.Spend.of_result(
        {"modelUsage": {"opus": {"costUSD": 1.0}, "haiku\x00": {"costUSD": 0.01}}}
    )
    assert [(each.model, each.runs) for each in spent] == [("opus", 1), ("haiku\ufffd", 0)]


def test_a_reason_s_gist_leaves_out_the_relative_times_that_change_by_the_second() -> None:
    waiting = claude_jobs.Waiting(
        "due in 3m", "it is due at 2026-12-02 06:00:00 UTC (in 3m); held since (12s ago)"
    )
    assert waiting.gist == "it is due at 2026-12-02 06:00:00 UTC; held since"


def test_a_postponed_job_is_not_said_to_have_failed() -> None:
    now = datetime.now(UTC)
    job = claude_jobs.Job.from_row(
        {"id": uuid.uuid4(), "queue": "q", "kind": "claude", "priority": 0, "payload": {},
         "status": "queued", "run_at": now + timedelta(minutes=5), "attempts": 1,
         "max_attempts": 5, "last_error": "the image service is busy",
         "errors": [{"attempt": 1, "error": "boom"}], "created_at": now, "updated_at": now}
    )  # fmt: skip
    reason = claude_jobs._waiting_for_time(job, now)
    assert reason.text.startswith("the image service is busy; it runs again at ")


@pytest.mark.skipif(os.geteuid() != 0, reason="claude refuses to skip permissions only as root")
def test_as_root_without_is_sandbox_a_job_with_a_permission_mode_still_runs(
    conn: psycopg.Connection, start_worker, claude_log: Path, tmp_path: Path
) -> None:
    job = claude_jobs.enqueue(
        conn, {"prompt": "p", "cwd": str(tmp_path), "permission_mode": "acceptEdits"}
    )
    worker = start_worker("--burst", IS_SANDBOX="0")
    assert worker.wait() == 0
    assert status_of(conn, job.id) == "succeeded"
    assert "running as root without IS_SANDBOX=1" in worker.log()
