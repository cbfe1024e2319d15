"""The dashboard a Good Job user expects: filters in the URL and paging both ways, a chart of
what finished, a page per schedule and batch, workers that cannot run claude and queues no
worker takes, tool output that unfolds, confirmations and edits on a job's page, and rows as
cards on a phone."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from conftest import LOCAL, fake, job_row, page_text, status_of, until, wait_for
from starlette.testclient import TestClient
from test_serve import Serve

import claude_jobs

TOOL_OUTPUT = {"type": "user", "message": {"content": [
    {"type": "tool_use", "name": "Bash", "input": {"command": "ls"}},
    {"type": "tool_result", "content": "first.py\nsecond.py\nthird.py"}]}}  # fmt: skip


@pytest.fixture
def client(db_url: str) -> Iterator[TestClient]:
    with TestClient(claude_jobs.web_app(db_url), base_url=LOCAL) as client:
        yield client


def test_jobs_page_both_ways_and_say_what_they_wait_for(
    conn: psycopg.Connection, client: TestClient
) -> None:
    first = claude_jobs.enqueue(conn, {"prompt": "first"}, queue="paged", delay=3600)
    jobs = [first, *(claude_jobs.enqueue(conn, {"prompt": f"job {n}"}, queue="paged",
                                         after=[first.id]) for n in range(6))]  # fmt: skip
    newest_first = [str(job.id) for job in reversed(jobs)]
    page = client.get("/api/jobs?queue=paged&limit=3").json()
    assert [j["id"] for j in page["jobs"]] == newest_first[:3] and page["prev"] is None
    assert page["jobs"][0]["waits_for"] == f"after {str(first.id)[:8]}"
    older = client.get(f"/api/jobs?queue=paged&limit=3&before={page['next']}").json()
    assert [j["id"] for j in older["jobs"]] == newest_first[3:6]
    newer = client.get(f"/api/jobs?queue=paged&limit=3&after={older['prev']}").json()
    assert [j["id"] for j in newer["jobs"]] == newest_first[:3], "back to the first page"
    assert newer["prev"] is None and newer["next"] is not None


def test_the_timeline_counts_what_finished_per_minute_and_per_hour(
    conn: psycopg.Connection, client: TestClient
) -> None:
    now = datetime.now(UTC)
    for status, ago, count in [("succeeded", 5, 3), ("failed", 5, 1), ("succeeded", 90, 2),
                               ("failed", 60 * 30, 4)]:  # fmt: skip
        conn.execute(
            "INSERT INTO claude_jobs (kind, payload, status, finished_at) "
            "SELECT 'claude', '{}', %s, %s FROM generate_series(1, %s)",
            [status, now - timedelta(minutes=ago), count],
        )
    recent = client.get("/api/timeline?hours=6").json()
    assert recent["step"] == "minute"
    assert sum(p["succeeded"] for p in recent["points"]) == 5
    assert sum(p["failed"] for p in recent["points"]) == 1
    week = client.get("/api/timeline?hours=168").json()
    assert week["step"] == "hour" and sum(p["failed"] for p in week["points"]) == 5


def test_logs_full_prints_a_tool_s_whole_output(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path,
    invoke,
) -> None:  # fmt: skip
    job = claude_jobs.enqueue(conn, {"prompt": fake(stream=[TOOL_OUTPUT]), "cwd": str(tmp_path)})
    handler = claude_jobs.ClaudeHandler(str(fake_claude))
    claude_jobs.Worker(db_url, burst=True, handlers={"claude": handler}).run()
    short = invoke("logs", str(job.id)).output
    assert "← first.py (+2 lines)" in short and "second.py" not in short
    full = invoke("logs", "--full", str(job.id)).output
    assert "← first.py (+2 lines)\n    │ second.py\n    │ third.py\n" in full


def test_in_a_browser_the_dashboard_is_one_a_good_job_user_knows(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path,
    browser, start_worker,
) -> None:  # fmt: skip
    for n in range(55):  # (more than a page of 50)
        claude_jobs.enqueue(conn, {"prompt": f"paged job {n}"}, queue="paged", delay=3600)
    claude_jobs.enqueue(conn, {"prompt": "nobody takes me"}, queue="orphans")
    claude_jobs.add_schedule(conn, "weekly", {"prompt": "bump"}, every=7 * 86400)
    claude_jobs.run_schedule(conn, "weekly")
    claude_jobs.enqueue(conn, {"prompt": "in the batch"}, batch="nightly", delay=3600)
    told = claude_jobs.enqueue(conn, {"prompt": fake(stream=[TOOL_OUTPUT]), "cwd": str(tmp_path)},
                               queue="tools")  # fmt: skip
    handler = claude_jobs.ClaudeHandler(str(fake_claude))
    claude_jobs.Worker(db_url, burst=True, queues=["tools"], handlers={"claude": handler}).run()
    start_worker("--queues", "default", CLAUDE_JOBS_CLAUDE_BIN=str(tmp_path / "no-claude"))
    server = Serve(db_url, tmp_path / "serve.log")
    try:
        # filters in the URL, paged older and newer
        browser.get(f"{server.url}#/?queue=paged")
        until(browser, lambda d: "paged job 54" in d.find_element("id", "jobs").text, "page 1")
        assert "paged job 0" not in browser.find_element("id", "jobs").text
        browser.find_element("id", "older").click()
        until(browser, lambda d: "paged job 0" in d.find_element("id", "jobs").text, "page 2")
        assert "before=" in browser.current_url and "queue=paged" in browser.current_url
        browser.find_element("id", "newer").click()
        until(browser, lambda d: "paged job 54" in d.find_element("id", "jobs").text, "page 1")
        # a queue no live worker takes, a worker that cannot run claude, the chart
        browser.get(f"{server.url}#/")
        # (the overview is redrawn as it changes: read it by script, at once)
        flagged = until(browser, lambda d: d.execute_script(
            "const f = document.querySelector('.no-worker'); return f && f.closest('tr')"
            ".textContent"), "the flagged queue")  # fmt: skip
        assert flagged.startswith("orphans") and "no live worker takes it" in flagged
        unfit = until(
            browser,
            lambda d: d.execute_script(
                "const u = document.querySelector('.unfit'); return u && u.textContent"
            ),
            "unfit",
        )
        assert "no claude jobs until" in unfit and "try again" in unfit
        chart = until(
            browser,
            lambda d: d.execute_script(
                "const c = document.querySelector('#chart svg'); return c && c.ariaLabel"
            ),
            "chart",
        )
        assert chart == "1 succeeded, 0 failed"
        # a queue's limits, edited in two prompts, shown in its row
        from selenium.webdriver.support.expected_conditions import alert_is_present

        answer_prompt(browser, "limits", "3")
        until(browser, alert_is_present(), "the rate's prompt").send_keys("10/h per key")
        browser.switch_to.alert.accept()
        wait_for(lambda: claude_jobs.queue_settings(conn, "default")["rate_by"] == "key", 10,
                 "the limits stored")  # fmt: skip
        assert claude_jobs.queue_settings(conn, "default")["max_running"] == 3
        until(browser, lambda d: d.execute_script(
            "const c = document.querySelector('td.limits'); return c && c.textContent"
            ) == "≤ 3 running, 10/h per key", "the limits shown")  # fmt: skip
        # a schedule's page with its runs; a batch's page by its name
        assert "every 7d" in browser.find_element("id", "schedules").text
        link = browser.execute_script("return document.querySelector('#schedules a').hash")
        assert link == "#/schedule/weekly"
        browser.get(server.url + link)
        until(browser, lambda d: "manual" in d.find_element("id", "runs").text, "its runs")
        browser.get(f"{server.url}#/batch/nightly")
        until(browser, lambda d: "in the batch" in page_text(d), "the batch by its name")
        # a tool's output unfolds; a queued job is rescheduled and reprioritised from its page
        browser.get(f"{server.url}#/jobs/{told.id}")
        summary = until(browser, lambda d: d.find_elements("css selector", "details.tool summary"),
                        "the folded tool output")[0]  # fmt: skip
        assert "second.py" not in browser.find_element("id", "transcript").text
        summary.click()
        assert "second.py\nthird.py" in browser.find_element("id", "transcript").text
        orphan = claude_jobs.list_jobs(conn, queue="orphans")[0]
        browser.get(f"{server.url}#/jobs/{orphan.id}")
        answer_prompt(browser, "priority", "7")
        wait_for(lambda: job_row(conn, orphan.id)["priority"] == 7, 10, "the new priority")
        answer_prompt(browser, "reschedule", "2h")
        wait_for(lambda: job_row(conn, orphan.id)["run_at"] > datetime.now(UTC)
                 + timedelta(minutes=110), 10, "the new due time")  # fmt: skip
        # every job matching the filters, not only this page, cancelled after a confirmation
        browser.get(f"{server.url}#/?queue=paged")
        until(browser, lambda d: "paged job 54" in d.find_element("id", "jobs").text, "jobs")
        answer_prompt(browser, "cancel", None, within="#bulk")
        wait_for(lambda: not claude_jobs.list_jobs(conn, queue="paged", statuses=["queued"]),
                 10, "the 55 paged jobs cancelled")  # fmt: skip
        # on a phone, rows are cards
        browser.set_window_size(420, 900)
        browser.get(f"{server.url}#/?queue=paged")
        until(browser, lambda d: "paged job 54" in d.find_element("id", "jobs").text, "jobs")
        assert (
            browser.execute_script(
                "return getComputedStyle(document.querySelector('#jobs tbody tr')).display"
            )
            == "block"
        )
        assert browser.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth"
        ), "nothing scrolls sideways"
        assert status_of(conn, orphan.id) == "queued"
    finally:
        server.stop()


def answer_prompt(browser, button: str, text: str | None, within: str = "") -> None:
    """Click a button of the page that asks for a value, and give it."""
    from selenium.webdriver.support.expected_conditions import alert_is_present

    click = (
        "const b = [...document.querySelectorAll(arguments[1] + ' button')].find(b => "
        "b.textContent === arguments[0]); if (b) setTimeout(() => b.click()); return !!b"
    )  # (the page redraws its buttons; the click returns at once: then the prompt is open)
    until(browser, lambda d: d.execute_script(click, button, within), f"the {button} button")
    asked = until(browser, alert_is_present(), f"the {button} prompt")
    if text is not None:  # (a prompt; else a confirmation)
        asked.send_keys(text)
    asked.accept()
