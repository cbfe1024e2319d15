"""The last mile: checks with rounds of repair, then delivery (push and a GitHub pull
request), tracked afterwards.

claude is the fake one (conftest.FAKE_CLAUDE; its `repairs` directive answers the rounds of
repair); GitHub is a local mock of its REST API (mock_github), and the pushes go to a local
bare repository through git's `url.<base>.insteadOf`, while the remote keeps its GitHub URL.
"""

from __future__ import annotations

import base64
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import (
    LOCAL,
    claude_runs,
    fake,
    git,
    job_row,
    page_text,
    pid_alive,
    until,
    wait_for,
)
from mock_github import TOKEN, MockGitHub
from mock_messages_api import Bash, MockMessagesAPI, Text
from starlette.testclient import TestClient
from test_serve import Serve

import claude_jobs
from claude_jobs import ClaudeHandler, Worker


def commit_file(name: str) -> list[str]:
    return ["sh", "-c", f"echo {name} > {name} && git add {name} && git -c user.name=t "
            f"-c user.email=t@example.com commit -qm {name}"]  # fmt: skip


def run_jobs(db_url: str, fake_claude: Path, **worker_options) -> None:
    handler = ClaudeHandler(str(fake_claude), worktree_dir=worker_options.pop("trees", None))
    handlers = {"claude": handler}
    Worker(db_url, burst=True, handlers=handlers, backoff_base=60, **worker_options).run()


def run_worktree_job(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, repo: Path, tmp_path: Path, **keys
) -> claude_jobs.Job:
    """Queue a worktree job whose claude commits a.txt, with these payload keys, and run it."""
    payload = {"prompt": fake(run=[commit_file("a.txt")]), "cwd": str(repo), "worktree": True}
    job = claude_jobs.enqueue(conn, {**payload, **keys})
    run_jobs(db_url, fake_claude, trees=tmp_path / "trees")
    return job


def runs_in_order(log: Path) -> list[dict]:
    return sorted(claude_runs(log), key=lambda run: run["started"])


@pytest.fixture
def repo(repo: Path, tmp_path: Path) -> Path:
    """conftest's repository, whose remote `origin` is on GitHub (github.com/octo/shop), pushed
    to a local bare repository instead (insteadOf), as a user's clone would be set up."""
    bare = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(bare))
    git(repo, "remote", "add", "origin", "https://github.com/octo/shop.git")
    git(repo, "config", f"url.{bare.as_uri()}.insteadOf", "https://github.com/octo/shop.git")
    git(repo, "push", "-q", "origin", "main")
    return repo


@pytest.fixture
def client(db_url: str) -> Iterator[TestClient]:
    with TestClient(claude_jobs.web_app(db_url), base_url=LOCAL) as client:
        yield client


@pytest.fixture
def github(monkeypatch: pytest.MonkeyPatch) -> Iterator[MockGitHub]:
    mock = MockGitHub()
    monkeypatch.setenv("GITHUB_API_URL", mock.url)
    monkeypatch.setenv("GH_TOKEN", TOKEN)
    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    monkeypatch.setattr(claude_jobs, "GITHUB_RETRY_DELAYS", (0.05, 0.05, 0.05))
    yield mock
    mock.close()


# -- checks ------------------------------------------------------------------------------------


def test_checks_that_pass_at_once_let_the_job_succeed_and_show_in_show_and_logs(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path,
    invoke,
) -> None:  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    prompt = fake(run=[["sh", "-c", "echo ok > ok.txt"]])
    checks = ["test -f ok.txt", "echo 'all 3 tests passed' && echo warning >&2"]
    job = claude_jobs.enqueue(conn, {"prompt": prompt, "cwd": str(work), "checks": checks})
    run_jobs(db_url, fake_claude)
    row = job_row(conn, job.id)
    assert row["status"] == "succeeded", row["last_error"]
    assert len(claude_runs(claude_log)) == 1
    state = row["checks"]
    assert (state["phase"], state["round"]) == ("passed", 0)
    assert [(r["command"], r["status"], r["round"]) for r in state["runs"]] == [
        (checks[0], 0, 0), (checks[1], 0, 0)
    ]  # fmt: skip
    assert row["result"]["result"].startswith("echo: ")  # claude's result stays the job's
    logs = invoke("logs", str(job.id)).output
    assert f"── check, round 0: $ {checks[1]}" in logs
    assert "   │ all 3 tests passed" in logs and "   │ warning" in logs  # stderr too
    assert "   check passed" in logs
    shown = invoke("show", str(job.id)).output
    assert "checks    passed; at most 2 rounds of repair" in shown
    assert "round 0: test -f ok.txt passed" in shown
    listed = invoke("list").output
    assert "CHECKS" in listed and "passed" in listed


def test_a_failing_check_goes_back_to_claude_whose_repair_passes_in_round_1(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, repo: Path,
    tmp_path: Path, invoke,
) -> None:  # fmt: skip
    check = "test -f fixed.txt || { echo 'fixed.txt is missing'; exit 3; }"
    prompt = fake(session="5e55", repairs=[{"run": [commit_file("fixed.txt")], "cost": 0.5}])
    payload = {"prompt": prompt, "cwd": str(repo), "worktree": True, "checks": [check]}
    job = claude_jobs.enqueue(conn, payload)
    run_jobs(db_url, fake_claude, trees=tmp_path / "trees")
    row = job_row(conn, job.id)
    assert row["status"] == "succeeded", row["last_error"]
    first, repair = runs_in_order(claude_log)
    assert "--resume" not in first["argv"]
    assert repair["argv"][-2:] == ["--resume", "5e55"]
    told = base64.b64decode(repair["stdin"]).decode()
    assert f"`{check}` exited with status 3" in told and "fixed.txt is missing" in told
    assert repair["cwd"] == first["cwd"] != str(repo)  # the same worktree
    state = row["checks"]
    assert (state["phase"], state["round"]) == ("passed", 1)
    assert [(r["round"], r["status"], r["failure"]) for r in state["runs"]] == [
        (0, 3, "fixed.txt is missing"), (1, 0, None)
    ]  # fmt: skip
    assert float(row["cost_usd"]) == pytest.approx(0.0125 + 0.5)  # each round's cost counts
    branch = row["worktree"]["branch"]
    assert "fixed.txt" in git(repo, "show", "--stat", branch)  # the repair is on the branch
    shown = invoke("show", str(job.id)).output
    assert "passed (round 1)" in shown
    assert f"round 0: {check} exited 3 (" in shown and "fixed.txt is missing" in shown
    logs = invoke("logs", str(job.id)).output
    assert "── attempt 1, repair round 1" in logs and "check failed: exited 3" in logs


def test_checks_failing_after_every_round_fail_the_job_for_good(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path,
    invoke,
) -> None:  # fmt: skip
    job = claude_jobs.enqueue(
        conn,
        {"prompt": fake(repairs=[{}]), "cwd": str(tmp_path), "checks": ["true", "exit 4"],
         "check_rounds": 1},
    )  # fmt: skip
    run_jobs(db_url, fake_claude)
    row = job_row(conn, job.id)
    assert row["status"] == "failed"
    assert row["attempts"] == 1  # not retried as an ordinary failure
    assert row["last_error"] == "checks failed after 1 round: exit 4 exited 4"
    assert len(claude_runs(claude_log)) == 2
    assert row["checks"]["phase"] == "failed"
    listed = invoke("list").output
    assert "failed (round 1)" in listed
    no_repair = claude_jobs.enqueue(
        conn, {"prompt": "p", "cwd": str(tmp_path), "checks": ["false"], "check_rounds": 0}
    )
    run_jobs(db_url, fake_claude)
    said = job_row(conn, no_repair.id)["last_error"]
    assert said == "checks failed after 0 rounds: false exited 1"
    assert len(claude_runs(claude_log)) == 3
    again = invoke("retry", str(job.id))  # by hand: starts over, claude first
    assert again.exit_code == 0, again.output
    assert job_row(conn, job.id)["checks"] is None


def test_a_usage_limit_met_in_a_round_of_repair_holds_the_job_which_goes_on_from_that_round(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path,
    invoke,
) -> None:  # fmt: skip
    check = "test -f fixed.txt"
    repairs = [{"emit": "usage-limit.stream.jsonl", "exit": 1},
               {"run": [["sh", "-c", "echo ok > fixed.txt"]]}]  # fmt: skip
    job = claude_jobs.enqueue(
        conn, {"prompt": fake(session="5e55", repairs=repairs), "cwd": str(tmp_path),
               "checks": [check]},
    )  # fmt: skip
    run_jobs(db_url, fake_claude)
    row = job_row(conn, job.id)
    assert (row["status"], row["attempts"]) == ("queued", 0)  # put back unspent, held
    assert "usage limit" in row["last_error"]
    assert (row["checks"]["phase"], row["checks"]["round"]) == ("repair", 1)
    assert invoke("resume", "--hold", "claude").exit_code == 0
    run_jobs(db_url, fake_claude)
    row = job_row(conn, job.id)
    assert row["status"] == "succeeded", row["last_error"]
    runs = runs_in_order(claude_log)
    assert len(runs) == 3 and all("--resume" in run["argv"] for run in runs[1:])
    assert (row["checks"]["phase"], row["checks"]["round"]) == ("passed", 1)


def test_a_check_that_cannot_start_fails_the_job_without_a_repair(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    prompt = fake(run=[["rm", "-rf", str(work)]])  # claude removes its own directory
    job = claude_jobs.enqueue(conn, {"prompt": prompt, "cwd": str(work), "checks": ["true"]})
    run_jobs(db_url, fake_claude)
    row = job_row(conn, job.id)
    assert row["status"] == "failed"
    assert row["last_error"] == f"the check `true` cannot start: {work} is gone"
    assert len(claude_runs(claude_log)) == 1


def test_a_check_outliving_its_time_limit_is_killed_with_what_it_started(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path
) -> None:
    check = f"sleep 300 & echo $! > {tmp_path}/bg.pid; sleep 300"
    job = claude_jobs.enqueue(
        conn, {"prompt": "p", "cwd": str(tmp_path), "checks": [check]}, timeout=3, max_attempts=1
    )
    handler = ClaudeHandler(str(fake_claude), kill_grace=1)
    Worker(db_url, burst=True, handlers={"claude": handler}).run()
    row = job_row(conn, job.id)
    assert row["status"] == "failed"
    said = f"timed out after 3s, its time limit, in the check `{check}`"
    assert row["last_error"].startswith(said)
    background = int((tmp_path / "bg.pid").read_text())
    wait_for(lambda: not pid_alive(background), 10, "the check's background process killed")


def test_a_worker_killed_during_a_check_goes_on_from_its_round(
    conn: psycopg.Connection, start_worker, claude_log: Path, tmp_path: Path
) -> None:
    check = (f"if [ -f {tmp_path}/second ]; then exit 0; fi; touch {tmp_path}/second; "
             f"echo $$ > {tmp_path}/check.pid; sleep 600")  # fmt: skip
    job = claude_jobs.enqueue(conn, {"prompt": "p", "cwd": str(tmp_path), "checks": [check]})
    first = start_worker("--heartbeat-timeout", "5")
    wait_for(lambda: (tmp_path / "check.pid").exists(), 30, "the check to start")
    wait_for(lambda: job_row(conn, job.id)["checks"], 10, "the round to be written")
    check_pid = int((tmp_path / "check.pid").read_text())
    first.signal(signal.SIGKILL)
    first.wait()
    wait_for(lambda: not pid_alive(check_pid), 15, "the check of the killed worker to end")
    start_worker()
    wait_for(lambda: job_row(conn, job.id)["status"] == "succeeded", 60, "the job to succeed")
    row = job_row(conn, job.id)
    assert row["status"] == "succeeded", row["last_error"]
    assert len(claude_runs(claude_log)) == 1  # claude's part was done: the round went on
    assert [(r["round"], r["status"]) for r in row["checks"]["runs"]] == [(0, 0)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pr"], '"pr" delivers the branch of a worktree job: it needs "worktree": true '
                   "(--worktree)"),
        (["--worktree", "--push=upstream"], "has no remote 'upstream' to push to"),
        (["--worktree", "--pr", "--push=gitlab"], "is not on GitHub"),
        (["--check", ""], '"checks": a check is a shell command, and one is empty'),
        (["--check", "true", "--check-rounds", "-1"], '"check_rounds" must be a whole number '
                                                      "from 0 to 100"),
    ],
)  # fmt: skip
def test_bad_delivery_and_check_options_exit_2_with_one_line_and_queue_nothing(
    invoke, conn: psycopg.Connection, repo: Path, args: list[str], message: str
) -> None:
    git(repo, "remote", "add", "gitlab", "git@gitlab.com:octo/shop.git")
    result = invoke("enqueue", "do it", "--cwd", str(repo), *args)
    assert result.exit_code == 2, result.output
    assert len(result.output.splitlines()) == 1 and message in result.output, result.output
    assert conn.execute("SELECT count(*) FROM claude_jobs").fetchone() == (0,)


# -- delivery ----------------------------------------------------------------------------------


def no_token_anywhere(conn: psycopg.Connection, *texts: str) -> None:
    dumped = conn.execute("SELECT string_agg(to_jsonb(j)::text, '') FROM claude_jobs j").fetchone()
    for text in (*texts, dumped[0] or ""):
        assert TOKEN not in text


def test_pr_pushes_the_branch_and_opens_a_draft_pull_request_after_the_checks(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, repo: Path,
    tmp_path: Path, invoke, github: MockGitHub, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    prompt = fake(run=[commit_file("done.txt"), ["sh", "-c", "echo draft > notes.txt"]],
                  result="Add done.txt\n\nIt was missing.")  # fmt: skip
    queued = invoke("enqueue", prompt, "--cwd", str(repo), "--worktree", "--check",
                    "test -f done.txt", "--pr")  # fmt: skip
    assert queued.exit_code == 0, queued.output
    job_id = queued.output.strip()
    run_jobs(db_url, fake_claude, trees=tmp_path / "trees")
    row = job_row(conn, job_id)
    assert row["status"] == "succeeded", row["last_error"]
    delivery = row["delivery"]
    assert "error" not in delivery, delivery
    branch = row["worktree"]["branch"]
    pushed = git(tmp_path / "remote.git", "rev-parse", f"refs/heads/{branch}")
    assert pushed == delivery["sha"] == git(repo, "rev-parse", branch)
    assert "notes.txt" in git(tmp_path / "remote.git", "show", "--stat", branch)  # left: committed
    [created] = github.asked("POST", "/pulls$")
    assert created.body["title"] == "Add done.txt"
    assert (created.body["head"], created.body["base"], created.body["draft"]) == (
        branch, "main", True
    )  # fmt: skip
    assert "It was missing." in created.body["body"]
    assert "`test -f done.txt`" in created.body["body"] and job_id in created.body["body"]
    assert created.headers["Authorization"] == f"Bearer {TOKEN}"
    pr = delivery["pr"]
    assert (pr["number"], pr["state"], pr["draft"]) == (1, "open", True)
    assert pr["url"] == "https://github.com/octo/shop/pull/1"
    shown = invoke("show", job_id).output
    assert "pull request #1 (draft): https://github.com/octo/shop/pull/1" in shown
    assert "#1 open" in invoke("list").output
    as_json = invoke("list", "--json").output
    assert json.loads(as_json.splitlines()[0])["delivery"]["pr"]["number"] == 1
    no_token_anywhere(conn, shown, as_json, caplog.text, invoke("logs", job_id).output)


def test_a_continuation_pushes_to_the_same_branch_and_updates_the_same_pull_request(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, repo: Path,
    tmp_path: Path, invoke, github: MockGitHub,
) -> None:  # fmt: skip
    first = claude_jobs.enqueue(
        conn, {"prompt": fake(run=[commit_file("a.txt")], result="Add a"), "cwd": str(repo),
               "worktree": True, "pr": True},
    )  # fmt: skip
    run_jobs(db_url, fake_claude, trees=tmp_path / "trees")
    queued = invoke("enqueue", "--continue-from", str(first.id),
                    fake(run=[commit_file("b.txt")], result="Add b too"))  # fmt: skip
    assert queued.exit_code == 0, queued.output
    run_jobs(db_url, fake_claude, trees=tmp_path / "trees")
    second = job_row(conn, queued.output.strip())
    assert second["status"] == "succeeded", second["last_error"]
    assert len(github.asked("POST", "/pulls$")) == 1  # never a second pull request
    [patched] = github.asked("PATCH", "/pulls/1$")
    assert "Add a" in patched.body["body"] and "Add b too" in patched.body["body"]
    assert second["delivery"]["pr"]["number"] == 1
    branch = job_row(conn, first.id)["worktree"]["branch"]
    assert "b.txt" in git(tmp_path / "remote.git", "show", "--stat", branch)


def test_a_rejected_push_leaves_the_job_succeeded_and_deliver_by_hand_does_it_later(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, repo: Path,
    tmp_path: Path, invoke, github: MockGitHub,
) -> None:  # fmt: skip
    hook = tmp_path / "remote.git" / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'pushes are closed today' >&2\nexit 1\n")
    hook.chmod(0o755)
    job = run_worktree_job(conn, db_url, fake_claude, repo, tmp_path, pr=True)
    row = job_row(conn, job.id)
    assert row["status"] == "succeeded"
    assert "push of claude-jobs/" in row["delivery"]["error"]
    assert "pushes are closed today" in row["delivery"]["error"]
    assert not github.asked("POST")
    shown = invoke("show", str(job.id)).output
    assert "failed: push of" in shown and f"claude-jobs deliver {job.id}" in shown
    assert "delivery failed" in invoke("list").output
    hook.unlink()
    delivered = invoke("deliver", str(job.id))
    assert delivered.exit_code == 0, delivered.output
    assert "opened pull request #1 (draft): https://github.com/octo/shop/pull/1" in delivered.output
    assert job_row(conn, job.id)["delivery"]["pr"]["number"] == 1
    assert TOKEN not in delivered.output


@pytest.mark.parametrize(
    ("status", "tries", "headers"), [(500, 4, {}), (403, 1, {}), (403, 4, {"Retry-After": "0"})]
)
def test_a_github_error_leaves_the_job_succeeded_with_the_delivery_failed(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, repo: Path,
    tmp_path: Path, github: MockGitHub, status: int, tries: int, headers: dict,
) -> None:  # fmt: skip
    github.fail("POST", "/pulls$", status, times=10, **headers)
    job = run_worktree_job(conn, db_url, fake_claude, repo, tmp_path, pr=True)
    row = job_row(conn, job.id)
    assert row["status"] == "succeeded"
    assert str(status) in row["delivery"]["error"]
    assert row["delivery"]["pushed"] is True  # the branch is there all the same
    assert len(github.asked("POST", "/pulls$")) == tries  # transient ones tried again


def test_a_500_that_passes_is_retried_into_a_pull_request(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, repo: Path,
    tmp_path: Path, github: MockGitHub,
) -> None:  # fmt: skip
    github.fail("POST", "/pulls$", 502, times=2)
    job = claude_jobs.enqueue(
        conn, {"prompt": "p", "cwd": str(repo), "worktree": True, "pr": True, "pr_ready": True,
               "pr_title": "A title of my own"},
    )  # fmt: skip
    run_jobs(db_url, fake_claude, trees=tmp_path / "trees")
    row = job_row(conn, job.id)
    assert row["delivery"]["pr"]["number"] == 1, row["delivery"]
    created = github.asked("POST", "/pulls$")[-1].body
    assert (created["title"], created["draft"]) == ("A title of my own", False)


def test_without_a_token_the_delivery_fails_and_says_how_to_give_one(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, repo: Path,
    tmp_path: Path, github: MockGitHub, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.delenv("GH_TOKEN")
    monkeypatch.setenv("PATH", os.defpath)  # (no gh)
    job = claude_jobs.enqueue(conn, {"prompt": "p", "cwd": str(repo), "worktree": True, "pr": True})
    run_jobs(db_url, fake_claude, trees=tmp_path / "trees")
    delivery = job_row(conn, job.id)["delivery"]
    assert delivery["pushed"] is True
    assert delivery["error"].startswith("no GitHub token: set GH_TOKEN or GITHUB_TOKEN")


def test_tracking_sees_a_merge_and_a_ci_failure_with_conditional_requests(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, repo: Path,
    tmp_path: Path, invoke, github: MockGitHub,
) -> None:  # fmt: skip
    job = claude_jobs.enqueue(conn, {"prompt": "p", "cwd": str(repo), "worktree": True, "pr": True})
    run_jobs(db_url, fake_claude, trees=tmp_path / "trees")
    head = github.pulls[1]["head"]["sha"]
    github.runs[head] = [{"status": "completed", "conclusion": "failure"}]
    github.statuses[head] = "success"
    assert claude_jobs.track_pull_requests(conn, interval=0) == 1
    pr = job_row(conn, job.id)["delivery"]["pr"]
    assert (pr["state"], pr["ci"]) == ("open", "failure")
    assert "#1 open, CI failure" in invoke("list").output
    before = len(github.requests)
    assert claude_jobs.track_pull_requests(conn, interval=0) == 1  # nothing changed: 304s
    asked = github.requests[before:]
    assert len(asked) == 3 and all(r.headers.get("If-None-Match") for r in asked)
    assert claude_jobs.track_pull_requests(conn, interval=3600) == 0  # looked at just now
    github.merge(1)
    claude_jobs.track_pull_requests(conn, interval=0)
    assert job_row(conn, job.id)["delivery"]["pr"]["state"] == "merged"
    assert str(job.id)[:8] in invoke("list", "--pr", "merged").output
    assert "no jobs" in invoke("list", "--pr", "open").output
    assert claude_jobs.track_pull_requests(conn, interval=0) == 0  # merged: no longer looked at
    branch = job_row(conn, job.id)["worktree"]["branch"]
    pruned = invoke("worktrees", "prune", "--merged")  # (squashed on GitHub: not in git's eyes)
    assert f"deleted branch {branch} (its pull request was merged)" in pruned.output
    assert git(repo, "branch", "--list", branch) == ""


def test_the_dashboard_shows_checks_and_delivery_and_delivers_a_job(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, repo: Path,
    tmp_path: Path, github: MockGitHub, client,
) -> None:  # fmt: skip
    job = run_worktree_job(conn, db_url, fake_claude, repo, tmp_path, checks=["test -f a.txt"])
    page = client.get(f"/api/jobs/{job.id}").json()
    rows = dict(page["rows"])
    assert rows["checks"].startswith("passed; at most 2 rounds of repair")
    assert "round 0: test -f a.txt passed" in rows["checks"]
    assert "delivery" not in rows  # (queued without --push)
    delivered = client.post(f"/api/jobs/{job.id}/deliver", json={"pr": True})
    assert delivered.status_code == 200, delivered.text
    assert delivered.json()["delivery"]["pr"]["number"] == 1
    page = client.get(f"/api/jobs/{job.id}").json()
    assert (
        "pull request #1 (draft): https://github.com/octo/shop/pull/1"
        in dict(page["rows"])["delivery"]
    )
    listed = client.get("/api/jobs").json()["jobs"][0]
    assert listed["delivery"]["pr"]["state"] == "open"  # (the list's PR badge reads it)
    github.fail("GET", "/pulls/1$", 403)  # delivered again: its pull request is read again
    refused = client.post(f"/api/jobs/{job.id}/deliver")
    assert refused.status_code == 502 and "403" in refused.json()["error"]
    assert TOKEN not in refused.text


def test_the_real_claude_cli_repairs_a_failing_check_in_its_resumed_session_and_opens_a_pr(
    conn: psycopg.Connection, db_url: str, real_claude: Path, repo: Path, tmp_path: Path,
    github: MockGitHub, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    home = tmp_path / "home"
    home.mkdir()
    check = "test -f fixed.txt || { echo 'fixed.txt is missing'; exit 1; }"
    job = claude_jobs.enqueue(
        conn, {"prompt": "make the check pass", "cwd": str(repo), "worktree": True,
               "checks": [check], "pr": True},
    )  # fmt: skip
    script = [Text("Done, I think."), Bash("touch fixed.txt"), Text("Fixed: fixed.txt is there.")]
    with MockMessagesAPI(script) as api:
        for name, value in {**api.env(), "HOME": str(home), "CLAUDE_CODE_MAX_RETRIES": "0"}.items():
            monkeypatch.setenv(name, value)
        handler = ClaudeHandler(str(real_claude), worktree_dir=tmp_path / "trees")
        Worker(db_url, burst=True, handlers={"claude": handler}).run()
    row = job_row(conn, job.id)
    assert row["status"] == "succeeded", row["last_error"]
    assert [(r["round"], r["status"]) for r in row["checks"]["runs"]] == [(0, 1), (1, 0)]
    assert len(api.turns) == 3
    repair = json.dumps(api.turns[1]["messages"])  # the session resumed: what came before
    assert "Done, I think." in repair and "fixed.txt is missing" in repair
    assert row["result"]["result"] == "Done, I think."  # claude's answer to the job's prompt
    assert row["delivery"]["pr"]["number"] == 1, row["delivery"]
    assert "fixed.txt" in git(tmp_path / "remote.git", "show", "--stat", row["worktree"]["branch"])


def test_checks_and_delivery_come_as_payload_keys_in_a_file_a_schedule_and_the_api(
    conn: psycopg.Connection, invoke, repo: Path, tmp_path: Path, client
) -> None:
    lines = tmp_path / "jobs.jsonl"
    lines.write_text(
        json.dumps({"prompt": "a", "cwd": str(repo), "worktree": True, "checks": ["make test"],
                    "pr": True}) + "\n"
        + json.dumps({"prompt": "b", "cwd": str(repo), "checks": [""]}) + "\n"
    )  # fmt: skip
    refused = invoke("enqueue", "--file", str(lines))
    assert refused.exit_code == 2 and "line 2" in refused.output, refused.output
    lines.write_text(lines.read_text().splitlines()[0] + "\n")
    queued = invoke("enqueue", "--file", str(lines))
    assert queued.exit_code == 0, queued.output
    payload = job_row(conn, queued.output.strip())["payload"]
    assert (payload["checks"], payload["push"], payload["pr_base"]) == (["make test"], "origin",
                                                                         "main")  # fmt: skip
    added = invoke("schedule", "add", "nightly", "fix what fails", "--cwd", str(repo),
                   "--worktree", "--check", "make test", "--check-rounds", "1", "--pr",
                   "--every", "1d")  # fmt: skip
    assert added.exit_code == 0, added.output
    schedule = claude_jobs.get_schedule(conn, "nightly")
    assert schedule.payload["checks"] == ["make test"] and schedule.payload["check_rounds"] == 1
    assert schedule.payload["pr"] is True
    edited = invoke("schedule", "edit", "nightly", "--check-rounds", "3")
    assert edited.exit_code == 0, edited.output
    assert claude_jobs.get_schedule(conn, "nightly").payload["checks"] == ["make test"]
    assert claude_jobs.get_schedule(conn, "nightly").payload["check_rounds"] == 3
    made = client.post(
        "/api/jobs",
        json={"payload": {"prompt": "c", "cwd": str(repo), "checks": ["true"], "check_rounds": 0}},
    )
    assert made.status_code == 201, made.text
    bad = client.post("/api/jobs", json={"payload": {"prompt": "c", "cwd": str(repo),
                                                      "pr": True}})  # fmt: skip
    assert bad.status_code == 422 and 'needs "worktree": true' in bad.json()["error"]


# -- what review found -------------------------------------------------------------------------


def test_a_round_left_on_another_host_starts_over_with_claude(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path
) -> None:
    job = claude_jobs.enqueue(conn, {"prompt": "p", "cwd": str(tmp_path), "checks": ["true"]})
    elsewhere = {"phase": "checks", "round": 0, "rounds": 2, "result": {"result": "old"},
                 "session": "5e55", "runs": [], "host": "another-host"}  # fmt: skip
    conn.execute("UPDATE claude_jobs SET checks = %s WHERE id = %s",
                 [psycopg.types.json.Jsonb(elsewhere), job.id])  # fmt: skip
    run_jobs(db_url, fake_claude)
    row = job_row(conn, job.id)
    assert row["status"] == "succeeded", row["last_error"]
    assert len(claude_runs(claude_log)) == 1  # claude's work is not on this host: done again
    assert row["result"]["result"] != "old"


def test_check_rounds_0_from_the_command_line_is_kept_and_pr_options_need_pr(
    invoke, conn: psycopg.Connection, repo: Path
) -> None:
    queued = invoke("enqueue", "p", "--cwd", str(repo), "--check", "false", "--check-rounds", "0")
    assert queued.exit_code == 0, queued.output
    assert job_row(conn, queued.output.strip())["payload"]["check_rounds"] == 0
    for args, said in (
        (["--worktree", "--pr-title", "T"], '"pr_title" is for a pull request: it needs "pr"'),
        (["--worktree", "--push", "--pr-ready"], '"pr_ready" is for a pull request'),
        (["--check-rounds", "1"], '"check_rounds" counts the rounds of repair of checks'),
    ):
        refused = invoke("enqueue", "p", "--cwd", str(repo), *args)
        assert refused.exit_code == 2 and said in refused.output, refused.output
    swallowed = invoke("enqueue", "--cwd", str(repo), "--worktree", "--push", "fix the bug")
    assert swallowed.exit_code == 2
    assert "--push took 'fix the bug' for its remote: put --push after the prompt" in (
        swallowed.output
    )


def test_a_token_a_check_or_claude_prints_is_masked_in_the_transcript_and_the_repair_prompt(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, invoke,
) -> None:  # fmt: skip
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    check = 'echo "token=$GITHUB_TOKEN"; test -f fixed.txt'
    prompt = fake(print_env=["GITHUB_TOKEN"], repairs=[{"run": [["touch", "fixed.txt"]]}])
    job = claude_jobs.enqueue(conn, {"prompt": prompt, "cwd": str(tmp_path), "checks": [check]})
    run_jobs(db_url, fake_claude)
    row = job_row(conn, job.id)
    repair = runs_in_order(claude_log)[-1]
    told = base64.b64decode(repair["stdin"]).decode()
    assert "token=***GITHUB_TOKEN***" in told and TOKEN not in told
    no_token_anywhere(conn, invoke("logs", str(job.id)).output, invoke("show", str(job.id)).output)
    assert row["checks"]["runs"][0]["failure"] == "token=***GITHUB_TOKEN***"
    assert "GITHUB_TOKEN=***GITHUB_TOKEN***" in row["transcript"]  # what claude printed


def test_a_bad_api_url_or_any_other_error_leaves_the_job_succeeded_and_deliver_says_it_in_a_line(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, repo: Path,
    tmp_path: Path, github: MockGitHub, monkeypatch: pytest.MonkeyPatch, invoke,
) -> None:  # fmt: skip
    monkeypatch.setenv("GITHUB_API_URL", "ghe.example.com/api/v3")
    job = run_worktree_job(conn, db_url, fake_claude, repo, tmp_path, pr=True)
    row = job_row(conn, job.id)
    assert row["status"] == "succeeded"
    assert row["delivery"]["error"].startswith("GitHub's API must be an http(s) URL")
    again = invoke("deliver", str(job.id))
    assert again.exit_code == 1 and len(again.output.splitlines()) == 1, again.output
    assert "GitHub's API must be an http(s) URL" in again.output


def test_the_pr_tells_this_attempt_s_cost_and_a_rerun_after_delivery_opens_or_adds_nothing(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, repo: Path,
    tmp_path: Path, github: MockGitHub,
) -> None:  # fmt: skip
    job = claude_jobs.enqueue(
        conn,
        {"prompt": fake(cost=0.5), "cwd": str(repo), "worktree": True, "pr": True},
    )
    run_jobs(db_url, fake_claude, trees=tmp_path / "trees")
    [created] = github.asked("POST", "/pulls$")
    assert "cost $0.50" in created.body["body"]
    # as a worker killed after delivering, before writing it, would leave the job:
    conn.execute("UPDATE claude_jobs SET status = 'queued', claim = NULL WHERE id = %s", [job.id])
    run_jobs(db_url, fake_claude, trees=tmp_path / "trees")
    assert job_row(conn, job.id)["delivery"]["pr"]["number"] == 1
    assert len(github.asked("POST", "/pulls$")) == 1 and not github.asked("PATCH")


def test_tracking_marks_a_pull_request_gone_and_goes_on_with_the_others(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, repo: Path,
    tmp_path: Path, github: MockGitHub,
) -> None:  # fmt: skip
    first = run_worktree_job(conn, db_url, fake_claude, repo, tmp_path, pr=True)
    second = run_worktree_job(conn, db_url, fake_claude, repo, tmp_path, pr=True)
    del github.pulls[1]
    github.merge(2)
    assert claude_jobs.track_pull_requests(conn, interval=0) == 2
    gone = job_row(conn, first.id)["delivery"]["pr"]
    assert gone["state"] == "gone" and "404" in gone["error"]
    assert job_row(conn, second.id)["delivery"]["pr"]["state"] == "merged"


def test_a_cancel_during_a_check_stops_it_and_what_it_started(
    conn: psycopg.Connection, start_worker, claude_log: Path, tmp_path: Path
) -> None:
    check = f"sleep 600 & echo $! > {tmp_path}/bg.pid; sleep 600"
    job = claude_jobs.enqueue(conn, {"prompt": "p", "cwd": str(tmp_path), "checks": [check]})
    start_worker()
    wait_for(lambda: (tmp_path / "bg.pid").exists(), 30, "the check to start")
    background = int((tmp_path / "bg.pid").read_text())
    claude_jobs.cancel_jobs(conn, [job.id])
    wait_for(lambda: job_row(conn, job.id)["status"] == "cancelled", 30, "the job cancelled")
    wait_for(lambda: not pid_alive(background), 15, "the check's background process killed")


def test_in_a_browser_a_job_page_shows_its_checks_and_pull_request_and_opens_one(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, repo: Path,
    tmp_path: Path, github: MockGitHub, browser,
) -> None:  # fmt: skip
    delivered = run_worktree_job(conn, db_url, fake_claude, repo, tmp_path, pr=True,
                                 checks=["test -f a.txt"])  # fmt: skip
    kept = run_worktree_job(conn, db_url, fake_claude, repo, tmp_path)
    server = Serve(db_url, tmp_path / "serve.log", GITHUB_API_URL=github.url, GH_TOKEN=TOKEN)
    try:
        browser.get(f"{server.url}#/jobs/{delivered.id}")
        link = until(browser, lambda d: d.execute_script(  # (the page is redrawn as it moves)
            "const a = document.querySelector('a.pr'); return a && [a.href, a.textContent]"),
            "the pull request's link")  # fmt: skip
        assert link == ["https://github.com/octo/shop/pull/1", "PR #1 open"]
        until(browser, lambda d: "round 0: test -f a.txt passed" in page_text(d), "the checks")
        browser.get(server.url)
        until(browser, lambda d: "PR #1 open" in d.find_element("id", "jobs").text, "the badge")
        browser.get(f"{server.url}#/jobs/{kept.id}")
        until(browser, lambda d: d.execute_script(
            "const b = [...document.querySelectorAll('button')]"
            ".find(b => b.textContent === 'open a PR'); if (b) b.click(); return !!b"),
            "the open-a-PR button")  # fmt: skip
        wait_for(lambda: (job_row(conn, kept.id)["delivery"] or {}).get("pr"), 20, "its PR")
        until(browser, lambda d: "PR #2 open" in page_text(d), "the new PR on the page")
        assert TOKEN not in page_text(browser)
    finally:
        server.stop()
