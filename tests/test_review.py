"""Review from the dashboard: a finished worktree job's diff, file by file; a reply that
continues it; discarding what it made; and "Needs you", what is left to look at."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import LOCAL, fake, git, job_row, page_text, status_of, until, wait_for
from starlette.testclient import TestClient
from test_delivery import commit_file, run_jobs, run_worktree_job
from test_serve import Serve

import claude_jobs


@pytest.fixture
def client(db_url: str) -> Iterator[TestClient]:
    with TestClient(claude_jobs.web_app(db_url), base_url=LOCAL) as client:
        yield client


def needing(client: TestClient) -> list[tuple[str, str]]:
    return [(job["id"], job["why"]) for job in client.get("/api/needs-you").json()["jobs"]]


def test_a_worktree_job_is_reviewed_replied_to_and_discarded_from_the_dashboard(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, repo: Path,
    tmp_path: Path, client: TestClient, invoke,
) -> None:  # fmt: skip
    binary = ["sh", "-c", "printf 'a\\000b' > b.bin && git add b.bin && git -c user.name=t "
              "-c user.email=t@example.com commit -qm b"]  # fmt: skip
    prompt = fake(run=[commit_file("a.txt"), binary])
    job = claude_jobs.enqueue(conn, {"prompt": prompt, "cwd": str(repo), "worktree": True})
    run_jobs(db_url, fake_claude, trees=tmp_path / "trees")
    failed = claude_jobs.enqueue(conn, {"prompt": fake(exit=3, stdout=""), "cwd": str(tmp_path)},
                                 max_attempts=1)  # fmt: skip
    run_jobs(db_url, fake_claude)
    assert needing(client) == [(str(failed.id), "failed"), (str(job.id), "to review")]
    files = client.get(f"/api/jobs/{job.id}/diff").json()["files"]
    assert [(f["path"], f["added"], f["removed"], f["binary"]) for f in files] == [
        ("a.txt", 1, 0, False), ("b.bin", 0, 0, True),
    ]  # fmt: skip
    assert "+a.txt" in files[0]["lines"]
    assert "\n".join(files[0]["lines"]) in invoke("diff", str(job.id)).output, "as `diff` shows"

    leaves_work = fake(run=[["sh", "-c", "echo wip > wip.txt"]])  # (not committed: kept)
    answer = client.post(f"/api/jobs/{job.id}/reply", json={"prompt": leaves_work})
    assert answer.status_code == 200, answer.text
    continuation = answer.json()["id"]
    assert job_row(conn, continuation)["continue_from"] == job.id
    assert str(job.id) not in dict(needing(client)), "replied to: reviewed"
    refused = client.post(f"/api/jobs/{job.id}/discard")
    assert refused.status_code == 409 and "needs its worktree" in refused.json()["error"]
    run_jobs(db_url, fake_claude)
    assert status_of(conn, continuation) == "succeeded"
    assert (continuation, "to review") in needing(client)

    tree = job_row(conn, continuation)["worktree"]
    assert (Path(tree["path"]) / "wip.txt").exists()
    conn.execute("UPDATE claude_jobs SET session_host = 'elsewhere' WHERE id = %s", [continuation])
    away = client.post(f"/api/jobs/{continuation}/discard")
    assert away.status_code == 409 and "is on elsewhere machine" in away.json()["error"]
    conn.execute("UPDATE claude_jobs SET session_host = NULL WHERE id = %s", [continuation])
    asked = invoke("discard", continuation)
    assert asked.exit_code == 0 and "add --yes to do it" in asked.output
    assert Path(tree["path"]).exists()
    done = client.post(f"/api/jobs/{continuation}/discard")
    assert done.status_code == 200, done.text
    assert done.json()["done"] == [f"removed worktree {tree['path']}",
                                   f"deleted branch {tree['branch']}"]  # fmt: skip
    assert not Path(tree["path"]).exists()
    assert tree["branch"] not in git(repo, "branch", "--list")
    assert needing(client) == [(str(failed.id), "failed")]

    assert client.post(f"/api/jobs/{failed.id}/reviewed").status_code == 200
    assert needing(client) == [] and client.get("/api/needs-you").json()["count"] == 0
    claude_jobs.retry_jobs(conn, [failed.id])
    run_jobs(db_url, fake_claude)
    assert needing(client) == [(str(failed.id), "failed")], "a retry's end is looked at again"
    bad = client.post(f"/api/jobs/{failed.id}/reply", json={"prompt": "  "})
    assert bad.status_code == 422 and "a reply needs a prompt" in bad.json()["error"]
    with TestClient(claude_jobs.web_app(db_url, read_only=True), base_url=LOCAL) as watcher:
        assert watcher.post(f"/api/jobs/{failed.id}/reviewed").status_code == 403


def test_a_diff_is_split_into_files_a_large_one_folded_and_cut() -> None:
    diff = "\n".join([
        "diff --git a/x.py b/x.py", "--- a/x.py", "+++ b/x.py", "@@ -1 +1 @@", "-old", "+new",
        "diff --git a/big.txt b/big.txt", "--- /dev/null", "+++ b/big.txt", "@@ -0,0 +1,6000 @@",
        *[f"+line {n}" for n in range(6000)],
        "diff --git a/logo.png b/logo.png", "Binary files a/logo.png and b/logo.png differ",
    ])  # fmt: skip
    small, big, binary = claude_jobs.diff_files(diff)
    assert (small["path"], small["added"], small["removed"], small["folded"]) == (
        "x.py", 1, 1, False,
    )  # fmt: skip
    assert (big["added"], big["folded"], len(big["lines"])) == (6000, True, 5000)
    assert big["cut"] == 6004 - 5000
    assert (binary["path"], binary["binary"]) == ("logo.png", True)
    tricky = "\n".join([
        "diff --git a/db/a b/c.sql b/db/a b/c.sql", "--- a/db/a b/c.sql", "+++ b/db/a b/c.sql",
        "@@ -1,2 +1 @@", "--- a comment removed", "-select 1;", "+++ a comment added",
        "diff --git a/old.txt b/new.txt", "similarity index 90%",
    ])  # fmt: skip
    sql, renamed = claude_jobs.diff_files(tricky)
    assert (sql["path"], sql["added"], sql["removed"]) == ("db/a b/c.sql", 1, 2)
    assert renamed["path"] == "new.txt"


def test_in_a_browser_a_reply_becomes_a_running_continuation_that_streams_on_the_page(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, repo: Path,
    tmp_path: Path, browser, start_worker,
) -> None:  # fmt: skip
    job = run_worktree_job(conn, db_url, fake_claude, repo, tmp_path)
    server = Serve(db_url, tmp_path / "serve.log")
    try:
        browser.get(server.url)
        until(browser, lambda d: "Needs you (1)" in page_text(d), "the job in Needs you")
        assert browser.title == "(1) claude-jobs"
        browser.get(f"{server.url}#/jobs/{job.id}")
        until(browser, lambda d: "+a.txt" in d.find_element("id", "changes").text, "its diff")
        box = browser.find_element("id", "reply")
        box.send_keys('FAKE:{"sleep": 4, "result": "tests added"}')
        browser.execute_script(
            "[...document.querySelectorAll('button')].find(b => b.textContent === 'reply').click()"
        )
        until(browser, lambda d: d.current_url.split("#/jobs/")[1] != str(job.id), "the reply")
        continuation = browser.current_url.split("#/jobs/")[1]
        assert job_row(conn, continuation)["continue_from"] == job.id
        start_worker()
        wait_for(lambda: status_of(conn, continuation) == "running", 30, "the reply to run")
        until(browser, lambda d: "working on it" in d.find_element("id", "transcript").text,
              "its transcript, streaming while it runs")  # fmt: skip
        assert status_of(conn, continuation) == "running"
        until(browser, lambda d: "job succeeded" in d.find_element("id", "outcome").text,
              "its end", timeout=30)  # fmt: skip
    finally:
        server.stop()
