"""`claude-jobs serve`: the JSON API, its security, /metrics and health checks through
Starlette's TestClient on real PostgreSQL; event streams and worker probes against real
processes (a `serve` subprocess, worker subprocesses running the fake claude)."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from conftest import LOCAL, TESTS, fake, page_text, status_of, until, wait_for
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient
from test_operations import hours_ago, make_job

import claude_jobs


@pytest.fixture
def web(db_url: str) -> Iterator[Callable[..., TestClient]]:
    """TestClients of web_app on this test's database, with the given options."""
    with contextlib.ExitStack() as stack:

        def make(**options: Any) -> TestClient:
            app = claude_jobs.web_app(db_url, **options)
            client = TestClient(app, base_url=LOCAL, raise_server_exceptions=True)
            return stack.enter_context(client)

        yield make


@pytest.fixture
def client(web: Callable[..., TestClient]) -> TestClient:
    return web()


# -- reading ------------------------------------------------------------------------------------


def test_api_pages_jobs_newest_first_by_cursor_with_the_filters_of_list(client, conn) -> None:
    ids = [make_job(conn, created_at=hours_ago(n), queue="a" if n % 2 else "b") for n in range(7)]
    make_job(conn, payload=json.dumps({"prompt": "Review the AUTH module", "cwd": "/srv/app"}))
    first = client.get("/api/jobs", params={"limit": 3, "queue": "a"}).json()
    second = client.get("/api/jobs", params={"limit": 3, "queue": "a", "before": first["next"]})
    seen = [job["id"] for job in first["jobs"] + second.json()["jobs"]]
    assert seen == [str(ids[n]) for n in (1, 3, 5)] and second.json()["next"] is None
    found = client.get("/api/jobs", params={"q": "auth mod", "cwd": "/srv/app"}).json()["jobs"]
    assert [job["excerpt"] for job in found] == ["Review the AUTH module"]
    assert "transcript" not in found[0] and found[0]["created_at"].endswith("+00:00")
    assert client.get("/api/jobs", params={"status": "running"}).json() == {
        "jobs": [],
        "next": None,
        "prev": None,
    }
    for bad in ({"status": "done"}, {"limit": "0"}, {"limit": "x"}, {"before": "nonsense"}):
        response = client.get("/api/jobs", params=bad)
        assert response.status_code == 400 and list(response.json()) == ["error"], bad


def test_api_shows_a_job_as_show_does_and_says_404_for_none(client, conn) -> None:
    error = {"attempt": 5, "error": "boom", "at": hours_ago(0).isoformat()}
    job_id = make_job(conn, status="failed", last_error="boom", attempts=5, errors=[error])
    job = client.get(f"/api/jobs/{str(job_id)[:8]}").json()
    rows = dict(job["rows"])
    assert rows["status"] == "failed, attempt 5 of 5" and rows["prompt"] == "a job"
    assert job["attempt_errors"][0].startswith("attempt 5 (") and job["id"] == str(job_id)
    missing = client.get(f"/api/jobs/{uuid.uuid4()}")
    assert missing.status_code == 404 and missing.json()["error"].startswith("no job ")
    assert client.get("/api/jobs/xyz").status_code == 422


def test_api_stats_and_queues_come_from_kept_counts(client, conn) -> None:
    claude_jobs.enqueue_many(conn, [{"prompt": "p"}] * 3, queue="nightly")
    make_job(conn, queue="nightly", status="succeeded", started_at=hours_ago(1),
             finished_at=hours_ago(0.5), cost_usd=1.25)  # fmt: skip
    conn.execute(
        "INSERT INTO claude_jobs_spend (day, queue, model, runs, cost_usd) "
        "VALUES (current_date, 'nightly', 'opus', 1, 1.25)"
    )
    claude_jobs.pause_queue(conn, "nightly")
    stats = client.get("/api/stats").json()
    (queue,) = stats["queues"]
    assert (queue["queue"], queue["paused"], queue["ready"], queue["succeeded"]) == (
        "nightly", True, 3, 1,
    )  # fmt: skip
    assert queue["cost_today_usd"] == 1.25 and queue["cost_7d_usd"] == 1.25
    assert stats["cost"][0]["model"] == "opus" and stats["workers"] == []
    assert client.get("/api/queues").json()["queues"][0]["ready"] == 3


# -- acting -------------------------------------------------------------------------------------


def test_api_enqueues_with_the_checks_and_messages_of_enqueue(client, conn, tmp_path) -> None:
    body = {"payload": {"prompt": "hi", "cwd": str(tmp_path)}, "queue": "web", "priority": 3,
            "delay": "1h"}  # fmt: skip
    made = client.post("/api/jobs", json=body)
    assert made.status_code == 201, made.text
    job = claude_jobs.get_job(conn, made.json()["id"])
    assert (job.queue, job.priority, job.payload["cwd"]) == ("web", 3, str(tmp_path))
    assert job.run_at > datetime.now(UTC) + timedelta(minutes=59)
    refused = {
        "not json": (400, "the body is not JSON"),
        json.dumps({"prompt": "no payload"}): (400, 'a "payload" object'),
        json.dumps({"payload": {"prompt": "x"}, "kind": "nope"}): (422, "unknown kind 'nope'"),
        json.dumps({"payload": {"prompt": "x", "cwd": "src"}}): (422, "absolute path"),
        json.dumps({"payload": {"prompt": "x"}, "delay": "soon"}): (422, "soon"),
        json.dumps({"payload": {"prompt": "x"}, "colour": "red"}): (422, "not a job option"),
        json.dumps({"payload": {"cwd": str(tmp_path)}}): (422, "prompt"),
    }
    for body, (status, words) in refused.items():
        response = client.post("/api/jobs", content=body)
        assert response.status_code == status, (body, response.text)
        assert words in response.json()["error"], (body, response.text)
    assert conn.execute("SELECT count(*) FROM claude_jobs").fetchone()[0] == 1


def test_api_actions_use_the_rules_of_the_command_line(client, conn) -> None:
    later = claude_jobs.enqueue(conn, {"prompt": "later"}, delay=3600)
    assert client.post(f"/api/jobs/{later.id}/run-now").status_code == 200
    assert claude_jobs.get_job(conn, later.id).run_at <= datetime.now(UTC)
    again = client.post(f"/api/jobs/{later.id}/run-now")
    assert again.status_code == 409 and "due already" in again.json()["error"]
    assert client.post(f"/api/jobs/{later.id}/cancel").json()["status"] == "cancelled"
    refused = client.post(f"/api/jobs/{later.id}/cancel")
    assert refused.status_code == 409 and "only queued or running" in refused.json()["error"]
    assert client.post(f"/api/jobs/{later.id}/retry").json()["retried"] == 1
    assert status_of(conn, later.id) == "queued"
    assert client.post(f"/api/jobs/{later.id}/explode").status_code == 404
    assert client.post("/api/queues/default/pause").json()["changed"] is True
    assert claude_jobs.paused_queues(conn) == {"default"}
    assert client.post("/api/queues/default/resume").json()["changed"] is True
    assert client.post("/api/queues/a,b/pause").status_code == 422
    nothing = client.post("/api/holds/claude/lift")
    assert nothing.status_code == 409 and nothing.json() == {"error": "nothing holds claude jobs"}
    assert client.post(f"/api/workers/{uuid.uuid4()}/drain").status_code == 404


# -- security -----------------------------------------------------------------------------------


def test_a_token_guards_everything_but_the_health_checks(web, conn) -> None:
    client = web(token="s3cret")
    for path in ("/api/jobs", "/api/stats", "/metrics", "/api/events"):
        response = client.get(path)
        assert response.status_code == 401 and "token" in response.json()["error"], path
    assert client.get("/api/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/jobs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert (
        client.post("/api/jobs/x/cancel", headers={"Authorization": "Basic s3cret"}).status_code
        == 401
    )
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
    page = client.get("/")  # the page holds no data: it asks for the token itself
    assert page.status_code == 200 and "Bearer" in page.text
    assert web(token="s3cret", public_metrics=True).get("/metrics").status_code == 200


def test_the_app_mounts_below_a_prefix_in_another_app(db_url, conn) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    inner = claude_jobs.web_app(db_url, token="t0ken")
    outer = Starlette(routes=[Mount("/jobs", app=inner)], lifespan=inner.router.lifespan_context)
    claude_jobs.enqueue(conn, {"prompt": "mounted"})
    with TestClient(outer, base_url=LOCAL) as client:
        assert client.get("/jobs/healthz").status_code == 200
        assert client.get("/jobs/api/jobs").status_code == 401
        listed = client.get("/jobs/api/jobs", headers={"Authorization": "Bearer t0ken"})
        assert listed.json()["jobs"][0]["excerpt"] == "mounted"
        page = client.get("/jobs/")
        assert page.status_code == 200 and '"api/jobs' in page.text and '"/api/' not in page.text


def test_read_only_refuses_every_action_and_enqueue(web, conn) -> None:
    client = web(read_only=True)
    job = claude_jobs.enqueue(conn, {"prompt": "stay"})
    for path in (f"/api/jobs/{job.id}/cancel", "/api/queues/default/pause", "/api/jobs"):
        response = client.post(path, json={"payload": {"prompt": "x"}})
        assert response.status_code == 403 and "read-only" in response.json()["error"], path
    assert status_of(conn, job.id) == "queued" and claude_jobs.paused_queues(conn) == set()
    assert client.get("/api/jobs").status_code == 200
    assert '<body class="read-only">' in client.get("/").text  # (its buttons are hidden)


def test_cross_site_requests_change_nothing(client, conn) -> None:
    job = claude_jobs.enqueue(conn, {"prompt": "stay"})
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Origin": "null"}, {"Sec-Fetch-Site": "same-site"}):  # fmt: skip
        response = client.post(f"/api/jobs/{job.id}/cancel", headers=headers)
        assert response.status_code == 403, headers
    assert status_of(conn, job.id) == "queued"
    assert client.get(f"/api/jobs/{job.id}/cancel").status_code == 405  # POST only
    same = {"Origin": LOCAL, "Sec-Fetch-Site": "same-origin"}
    assert client.post(f"/api/jobs/{job.id}/cancel", headers=same).status_code == 200


def test_the_page_runs_only_its_own_script_and_shows_no_job_data(client, conn) -> None:
    claude_jobs.enqueue(conn, {"prompt": '<script>alert(1)</script>"><img src=x onerror=alert(2)>'})
    page = client.get("/")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    assert "alert(" not in page.text and "innerHTML" not in page.text
    listed = client.get("/api/jobs").text  # JSON keeps it a string, for textContent
    assert '<script>alert(1)</script>\\"><img src=x onerror=alert(2)>' in listed


def test_no_password_of_the_database_url_appears_in_an_error(pg_server, conn) -> None:
    url = "postgresql://postgres:hunter2@127.0.0.1:1/nowhere?connect_timeout=1"
    with TestClient(claude_jobs.web_app(url), base_url=LOCAL) as client:
        for path in ("/api/jobs", "/readyz", "/metrics"):
            response = client.get(path)
            assert response.status_code == 503, path
            assert "hunter2" not in response.text and "unreachable" in response.text, path
        assert client.get("/healthz").status_code == 200


def test_readyz_says_when_the_schema_is_not_current(client, conn) -> None:
    assert client.get("/readyz").json()["status"] == "ready"
    conn.execute("DELETE FROM claude_jobs_schema WHERE version = %s", [claude_jobs.SCHEMA_VERSION])
    response = client.get("/readyz")
    assert response.status_code == 503 and "claude-jobs migrate" in response.json()["error"]


# -- metrics ------------------------------------------------------------------------------------


def test_metrics_parse_and_agree_with_the_jobs(client, conn) -> None:
    claude_jobs.enqueue_many(conn, [{"prompt": "p"}] * 4, queue="a")
    for minutes in (0.5, 3, 90):
        ran = make_job(conn, queue="a", status="running", started_at=hours_ago(minutes / 60))
        conn.execute("UPDATE claude_jobs SET status = 'succeeded', finished_at = now() "
                     "WHERE id = %s", [ran])  # fmt: skip
    conn.execute("INSERT INTO claude_jobs_spend (day, queue, model, runs, cost_usd) "
                 "VALUES (current_date, 'a', '', 3, 0.75)")  # fmt: skip
    conn.execute("DELETE FROM claude_jobs WHERE status = 'succeeded' AND "
                 "finished_at - started_at > interval '1 hour'")  # fmt: skip
    claude_jobs.pause_queue(conn, "a")
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    value = {(f.name, s.name, tuple(sorted(s.labels.items()))): s.value
             for f in families.values() for s in f.samples}  # fmt: skip

    def sample(family: str, name: str, **labels: str) -> float:
        return value[(family, name, tuple(sorted(labels.items())))]

    assert sample("claude_jobs_jobs", "claude_jobs_jobs", queue="a", status="queued") == 4
    assert sample("claude_jobs_jobs", "claude_jobs_jobs", queue="a", status="succeeded") == 2
    # the run that was cleaned up stays counted among those that ended
    assert (
        sample("claude_jobs_ended", "claude_jobs_ended_total", queue="a", status="succeeded") == 3
    )
    run = "claude_jobs_run_seconds"
    assert sample(run, run + "_bucket", queue="a", status="succeeded", le="60") == 1
    assert sample(run, run + "_bucket", queue="a", status="succeeded", le="300") == 2
    assert sample(run, run + "_bucket", queue="a", status="succeeded", le="+Inf") == 3
    assert sample(run, run + "_count", queue="a", status="succeeded") == 3
    assert sample(run, run + "_sum", queue="a", status="succeeded") == pytest.approx(5610, abs=5)
    assert sample("claude_jobs_ready_age_seconds", "claude_jobs_ready_age_seconds", queue="a") >= 0
    assert sample("claude_jobs_cost_usd", "claude_jobs_cost_usd_total", queue="a") == 0.75
    assert sample("claude_jobs_queue_paused", "claude_jobs_queue_paused", queue="a") == 1
    assert sample("claude_jobs_workers", "claude_jobs_workers", state="alive") == 0


def test_metrics_answer_when_a_queue_has_only_jobs_due_later(client, conn) -> None:
    claude_jobs.enqueue(conn, {"prompt": "tomorrow"}, queue="later", delay=86400)
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert not families["claude_jobs_ready_age_seconds"].samples


def test_the_histogram_bounds_match_the_schema(conn) -> None:
    bounds = conn.execute("SELECT claude_jobs_run_time_buckets()").fetchone()[0]
    assert [f"{b:g}" if b != float("inf") else "+Inf" for b in bounds] == list(
        claude_jobs.RUN_TIME_BUCKETS
    )


# -- streams, against real processes ------------------------------------------------------------


class Serve:
    """`claude-jobs serve` as a real process on a free port."""

    def __init__(self, db_url: str, log: Path, *args: str, **env: str) -> None:
        self._log = log.open("wb")
        self.log_path = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "claude_jobs", "--database-url", db_url, "serve", "--port",
             "0", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env={"PYTHONPATH": str(TESTS.parent),
            "PATH": "/usr/bin:/bin", **env},
        )  # fmt: skip
        found = wait_for(
            lambda: re.search(r"http://127\.0\.0\.1:\d+/", log.read_text()), 20, "serve to start"
        )
        self.url = found.group()
        wait_for(lambda: _answers(f"{self.url}healthz"), 20, "serve to answer")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


@pytest.fixture
def serve(db_url: str, tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    started: list[Serve] = []

    def start(*args: str) -> Serve:
        started.append(Serve(db_url, tmp_path / f"serve-{len(started)}.log", *args))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def read_events(response: httpx.Response) -> Iterator[tuple[str, str | None, Any]]:
    """(event, id, data) of each Server-Sent Event of a streaming response."""
    event, event_id, data = None, None, ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            data += line[6:]
        elif line == "" and event:
            yield event, event_id, json.loads(data)
            event, event_id, data = None, None, ""


def test_a_running_jobs_transcript_streams_live_and_resumes(
    serve, start_worker, conn, claude_log
) -> None:
    steps = [{"type": "assistant", "message": {"content": [{"type": "text", "text": f"step {n}"}]}}
             for n in range(6)]  # fmt: skip
    job = claude_jobs.enqueue(conn, {"prompt": fake(stream=steps, interval=0.4)})
    server = serve()
    start_worker("--concurrency", "1")
    lines, statuses, ids, arrived = [], [], [], {}
    with httpx.stream("GET", f"{server.url}api/jobs/{job.id}/events", timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for event, event_id, data in read_events(response):
            if event == "transcript":
                lines += data["lines"]
                ids.append(int(event_id))
                for line in data["lines"]:
                    arrived[line] = time.monotonic()
            elif event == "status":
                statuses.append(data["status"])
            elif event == "end":
                assert data["status"] == "succeeded"
                break
    assert [line for line in lines if line.startswith("step")] == [f"step {n}" for n in range(6)]
    assert "running" in statuses and statuses[-1] == "succeeded"
    # live: the steps came as claude printed them, not all at the end
    assert arrived["step 5"] - arrived["step 0"] > 1.0
    assert ids == sorted(ids) and lines[-1].startswith("· success")
    assert len(ids) >= 2
    resume_at = ids[0]
    resumed = []
    headers = {"Last-Event-ID": str(resume_at)}
    with httpx.stream("GET", f"{server.url}api/jobs/{job.id}/events", headers=headers) as again:
        for event, _, data in read_events(again):
            if event == "transcript":
                resumed += data["lines"]
            if event == "end":
                break
    assert resumed and resumed == lines[len(lines) - len(resumed) :] and len(resumed) < len(lines)


def test_many_streams_share_one_listening_connection(serve, conn, db_url) -> None:
    job = claude_jobs.enqueue(conn, {"prompt": "wait"})
    server = serve()
    streams = contextlib.ExitStack()
    with streams:
        client = streams.enter_context(httpx.Client(timeout=30))
        responses = [
            streams.enter_context(client.stream("GET", f"{server.url}api/jobs/{job.id}/events"))
            for _ in range(30)
        ]
        events = [read_events(response) for response in responses]
        firsts = [next(each) for each in events]
        assert {event for event, _, _ in firsts} == {"status"}
        used = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        ).fetchone()[0]
        assert used <= 3
        claude_jobs.cancel_jobs(conn, [job.id])
        ends = [next(event for event in each if event[0] == "end") for each in events]
        assert {data["status"] for _, _, data in ends} == {"cancelled"}


def test_serve_refuses_to_listen_beyond_this_machine_without_a_token(invoke) -> None:
    result = invoke("serve", "--host", "0.0.0.0")
    assert result.exit_code == 2
    assert result.output == (
        "Error: listening on 0.0.0.0 needs --token (or CLAUDE_JOBS_TOKEN): whoever reaches the "
        "server could start agents\n"
    )


def test_serve_without_the_web_extra_says_which_to_install(invoke, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # (import uvicorn: ImportError)
    result = invoke("serve")
    assert (result.exit_code, result.output) == (
        2, "Error: claude-jobs serve needs the web extra: pip install 'claude-jobs[web]'\n",
    )  # fmt: skip


# -- draining and probing workers ---------------------------------------------------------------


def probe(port: int, path: str) -> tuple[int, dict[str, Any]]:
    response = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)
    return response.status_code, response.json()


def test_a_drained_worker_finishes_its_job_and_exits_and_its_probe_says_so(
    start_worker, conn, invoke, claude_log
) -> None:
    port = _free_port()
    worker = start_worker("--concurrency", "2", "--health-port", str(port))
    wait_for(lambda: _probe_or_none(port, "/readyz") == 200, 20, "the worker to be ready")
    code, state = probe(port, "/healthz")
    assert code == 200 and state["ready"] and not state["draining"] and state["running"] == 0
    busy = claude_jobs.enqueue(conn, {"prompt": fake(sleep=2)})
    wait_for(lambda: status_of(conn, busy.id) == "running", 15, "the job to start")
    (row,) = claude_jobs.list_workers(conn)
    result = invoke("drain", str(row["id"])[:8])
    assert result.exit_code == 0 and "drains" in result.output
    wait_for(lambda: _probe_or_none(port, "/readyz") == 503, 10, "the probe to say draining")
    assert probe(port, "/healthz")[1]["draining"] is True
    waiting = claude_jobs.enqueue(conn, {"prompt": "not for a draining worker"})
    assert worker.wait(30) == 0
    assert status_of(conn, busy.id) == "succeeded" and status_of(conn, waiting.id) == "queued"
    assert "asked to drain" in worker.log()
    assert invoke("drain", "nobody").exit_code == 1


def _probe_or_none(port: int, path: str) -> int | None:
    try:
        return probe(port, path)[0]
    except httpx.HTTPError:
        return None


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_reschedule_and_set_priority_change_a_queued_job_only(invoke, conn, client) -> None:
    job = claude_jobs.enqueue(conn, {"prompt": "later"}, delay=600)
    moved = invoke("reschedule", str(job.id)[:8], "--delay", "2h")
    assert moved.exit_code == 0 and moved.output.startswith(f"job {job.id} runs in ")
    due = claude_jobs.get_job(conn, job.id).run_at
    assert timedelta(minutes=119) < due - datetime.now(UTC) < timedelta(minutes=121)
    at = "2030-01-02T03:04:05+00:00"
    assert invoke("reschedule", str(job.id), "--at", at).exit_code == 0
    assert claude_jobs.get_job(conn, job.id).run_at == datetime.fromisoformat(at)
    assert invoke("reschedule", str(job.id)).exit_code == 2  # --at or --delay
    assert invoke("set-priority", str(job.id), "7").output == f"job {job.id} has priority 7\n"
    assert claude_jobs.get_job(conn, job.id).priority == 7
    api = client.post(f"/api/jobs/{job.id}/reschedule", json={"delay": "30m"})
    assert api.status_code == 200, api.text
    assert claude_jobs.get_job(conn, job.id).run_at < datetime.now(UTC) + timedelta(minutes=31)
    assert (
        client.post(f"/api/jobs/{job.id}/priority", json={"priority": -3}).json()["priority"] == -3
    )
    bad = [("reschedule", {}), ("reschedule", {"at": 5}), ("reschedule", {"delay": -1}),
           ("priority", {"priority": "x"})]  # fmt: skip
    for path, body in bad:
        assert client.post(f"/api/jobs/{job.id}/{path}", json=body).status_code in (400, 422), body
    claude_jobs.cancel_jobs(conn, [job.id])
    refused = invoke("set-priority", str(job.id), "1")
    assert refused.exit_code == 1 and "only a queued job can be changed" in refused.output
    assert client.post(f"/api/jobs/{job.id}/priority", json={"priority": 1}).status_code == 409


def test_run_now_makes_a_delayed_job_due(invoke, conn) -> None:
    job = claude_jobs.enqueue(conn, {"prompt": "later"}, delay=600)
    assert invoke("run-now", str(job.id)[:8]).output == f"job {job.id} is due now\n"
    assert claude_jobs.get_job(conn, job.id).run_at <= datetime.now(UTC)
    refused = invoke("run-now", str(job.id))
    assert refused.exit_code == 1 and "it is due already" in refused.output


# -- a real browser -----------------------------------------------------------------------------


def screenshot(driver: Any, name: str, tmp_path: Path) -> None:
    """Kept with the test's files; with CLAUDE_JOBS_SCREENSHOTS=DIR, also in DIR (docs/)."""
    import os

    driver.save_screenshot(str(tmp_path / name))
    if folder := os.environ.get("CLAUDE_JOBS_SCREENSHOTS"):
        driver.save_screenshot(str(Path(folder) / name))


XSS = ["<script>window.__pwned = 1</script>", '"><img src=x onerror="window.__pwned=2">']


def test_in_a_browser_the_dashboard_lives_streams_and_cancels(
    browser, serve, start_worker, invoke, conn, claude_log, tmp_path
) -> None:
    for prompt in XSS:
        assert invoke("enqueue", "--queue", "reviews", "--", prompt).exit_code == 0
    server = serve()
    browser.get(server.url)
    until(browser, lambda d: "reviews" in page_text(d) and "no workers" in page_text(d),
          "the overview")  # fmt: skip
    # the prompts are text on the page, and ran nothing
    until(browser, lambda d: all(p in page_text(d) for p in XSS), "the jobs table")
    assert browser.execute_script("return window.__pwned === undefined")
    assert not browser.find_elements("css selector", "#jobs img, #jobs script")
    # a job enqueued from the command line appears without a reload
    browser.execute_script("window.__same_page = true")
    assert invoke("enqueue", "--queue", "nightly", "appears by itself").exit_code == 0
    until(browser, lambda d: "appears by itself" in page_text(d), "the new job on the page")
    assert browser.execute_script("return window.__same_page === true")
    # its transcript streams while it runs
    steps = [{"type": "assistant", "message": {"content": [{"type": "text", "text": f"step {n}"}]}}
             for n in range(40)]  # fmt: skip
    claude_jobs.purge_queue(conn, "reviews")
    claude_jobs.purge_queue(conn, "nightly")
    job = claude_jobs.enqueue(conn, {"prompt": fake(stream=steps, interval=0.25)})
    start_worker("--concurrency", "1")
    browser.get(f"{server.url}#/jobs/{job.id}")
    until(browser, lambda d: "step 2" in d.find_element("id", "transcript").text, "streaming")
    assert status_of(conn, job.id) == "running"  # (seen while it runs, not after)
    screenshot(browser, "job.png", tmp_path)
    # cancel from the page stops it
    button = until(browser, lambda d: next(
        (b for b in d.find_elements("tag name", "button") if b.text == "cancel"), None),
        "the cancel button")  # fmt: skip
    button.click()
    from selenium.webdriver.support.expected_conditions import alert_is_present

    asked = until(browser, alert_is_present(), "a confirmation: it is running")
    assert "running" in asked.text
    asked.accept()
    wait_for(lambda: status_of(conn, job.id) == "cancelled", 20, "the job to be cancelled")
    until(browser, lambda d: "job cancelled" in d.find_element("id", "outcome").text, "the end")
    assert "step 39" not in browser.find_element("id", "transcript").text
    summary = {"prompt": "Summarise tonight's reviews into REVIEWS.md", "cwd": str(tmp_path)}
    for repo in ("api", "billing", "web"):  # (a night's work, for the screenshot)
        prompt = f"Review the {repo} service for injection flaws and open a branch with fixes"
        claude_jobs.enqueue(conn, {"prompt": prompt}, queue="nightly", delay=3600,
                            batch="nightly-review", on_finish=summary)  # fmt: skip
    claude_jobs.add_schedule(conn, "weekly-bump", {"prompt": "bump the dependencies"},
                             cron="0 3 * * 1", timezone="Europe/Berlin")  # fmt: skip
    claude_jobs.pause_queue(conn, "nightly")
    browser.get(server.url)
    until(browser, lambda d: "alive" in page_text(d) and "paused" in page_text(d), "overview")
    until(browser, lambda d: "0 of 3" in d.find_element("id", "batches").text
          and "0 3 * * 1 (Europe/Berlin)" in d.find_element("id", "schedules").text,
          "the batch and the schedule")  # fmt: skip
    screenshot(browser, "overview.png", tmp_path)
    # a batch's page: its progress and its jobs
    browser.find_element("link text", "nightly-review").click()
    until(browser, lambda d: "Review the billing service" in page_text(d)
          and "not yet" in page_text(d), "the batch's page")  # fmt: skip


# -- what a second attack found ---------------------------------------------------------------


def _raw_request(url: str, data: bytes, wait: float = 0.0) -> bytes:
    """Send ``data`` to the server of ``url`` on a socket of its own; what comes back until the
    server closes it (or ``wait`` seconds pass)."""
    import socket

    host, port = url.split("//")[1].rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=max(wait, 5.0)) as connection:
        connection.sendall(data)
        received = b""
        with contextlib.suppress(TimeoutError):
            while chunk := connection.recv(65536):
                received += chunk
    return received


def test_a_page_whose_name_was_made_to_resolve_here_gets_421(serve, conn) -> None:
    """DNS rebinding: a page on evil.example, its name then resolving to 127.0.0.1, is
    same-origin with the server as the browser sees it. Only its Host tells it apart."""
    server = serve("--allowed-host", "jobs.internal")
    port = server.url.rstrip("/").rsplit(":", 1)[1]
    rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}",
               "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}  # fmt: skip
    for method, path in (("GET", "/api/jobs"), ("GET", "/"), ("POST", "/api/jobs"),
                         ("GET", "/api/events"), ("GET", "/metrics")):  # fmt: skip
        response = httpx.request(method, f"{server.url}{path.lstrip('/')}", headers=rebound,
                                 json={"payload": {"prompt": "x"}}, timeout=5)  # fmt: skip
        assert response.status_code == 421, (method, path, response.text)
        assert "evil.example" in response.json()["error"]
    assert conn.execute("SELECT count(*) FROM claude_jobs").fetchone()[0] == 0
    for name in (f"127.0.0.1:{port}", f"localhost:{port}", f"jobs.internal:{port}"):
        response = httpx.get(f"{server.url}api/jobs", headers={"Host": name}, timeout=5)
        assert response.status_code == 200, name


def test_api_input_gets_a_json_4xx_never_a_500(client, conn, tmp_path) -> None:
    job = claude_jobs.enqueue(conn, {"prompt": "here"})
    deep = b'{"payload": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    requests = {
        ("GET", "/api/jobs?q=%00"): 400,
        ("GET", "/api/jobs?cwd=%00"): 400,
        ("GET", "/api/jobs?kind=a%00b"): 400,
        ("GET", "/api/jobs/%00"): 400,
        ("GET", "/api/batches/%00"): 400,
        ("POST", "/api/holds/%00/lift"): 400,
        ("GET", "/api/batches?limit=-3"): 400,
        ("GET", "/api/batches?limit=100000"): 400,
        ("GET", "/api/schedules/x?runs=0"): 400,
        ("GET", "/api/no/such/thing"): 404,
        ("DELETE", f"/api/jobs/{job.id}"): 405,
        ("GET", f"/api/jobs/{job.id}/cancel"): 405,
    }
    for (method, path), status in requests.items():
        response = client.request(method, path)
        assert response.status_code == status, (method, path, response.text)
        assert list(response.json()) == ["error"], (method, path)
    response = client.post("/api/jobs", content=deep)
    assert response.status_code == 400 and "deep" in response.json()["error"]
    for extra in ({"base_dir": str(tmp_path)}, {"base_dir": 7}, {"unique_keys": ["a"]}):
        body = {"payload": {"prompt": "x", "cwd": str(tmp_path)}, **extra}
        response = client.post("/api/jobs", json=body)
        assert response.status_code == 422, (extra, response.text)
        assert "not a job option" in response.json()["error"]
    assert (
        client.post(
            "/api/schedules",
            json={"name": "n", "payload": {"prompt": "x"}, "every": 60, "base_dir": "/"},
        ).status_code
        == 422
    )
    assert conn.execute("SELECT count(*) FROM claude_jobs").fetchone()[0] == 1


def test_bodies_past_the_limit_get_413_and_a_big_prompt_is_not_sent_back(web, conn) -> None:
    client = web(max_body=64 * 1024)
    big = {"payload": {"prompt": "x" * 100_000}}
    response = client.post("/api/jobs", json=big)
    assert response.status_code == 413
    assert "larger than 65,536 bytes" in response.json()["error"]

    def chunks() -> Iterator[bytes]:  # (no Content-Length: counted as it comes)
        yield b'{"payload": {"prompt": "'
        for _ in range(100):
            yield b"y" * 1024
        yield b'"}}'

    assert client.post("/api/jobs", content=chunks()).status_code == 413
    made = client.post("/api/jobs", json={"payload": {"prompt": "z" * 60_000}})
    assert made.status_code == 201 and len(made.content) < 3_000
    assert "payload" not in made.json() and made.json()["excerpt"].startswith("zzz")
    assert claude_jobs.get_job(conn, made.json()["id"]).payload["prompt"] == "z" * 60_000


def test_a_slow_or_vanishing_client_is_dropped_and_leaves_no_traceback(serve) -> None:
    server = serve("--client-timeout", "1s")
    started = time.monotonic()
    answer = _raw_request(server.url, b"GET /api/jobs HTTP/1.1\r\nHost: local", wait=10)
    assert answer == b"" and time.monotonic() - started < 5  # dropped, headers half sent
    started = time.monotonic()
    head = (b"POST /api/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n")  # fmt: skip
    answer = _raw_request(server.url, head + b'{"payload":', wait=10)
    assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 5
    import socket

    port = int(server.url.rsplit(":", 1)[1][:-1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as trickle:
        trickle.sendall(head)  # then a byte at a time, each well within the timeout
        started, answer = time.monotonic(), b""
        while not answer and time.monotonic() - started < 8:
            with contextlib.suppress(OSError):
                trickle.sendall(b" ")
            trickle.settimeout(0.3)
            with contextlib.suppress(TimeoutError):
                answer = trickle.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 5
    with socket.create_connection(("127.0.0.1", port)) as gone:
        gone.sendall(head + b'{"payload": {"pro')  # and goes away mid-body
    assert httpx.get(f"{server.url}healthz", timeout=5).status_code == 200
    time.sleep(0.5)
    assert "Traceback" not in server.log_path.read_text()


def test_serve_stops_on_sigterm_within_seconds_ending_its_streams(serve) -> None:
    import signal

    server = serve()
    with httpx.stream("GET", f"{server.url}api/events", timeout=10) as events:
        next(read_events(events))  # the overview: the stream is open
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(10) == 0
    assert time.monotonic() - started < 3
    log = server.log_path.read_text()
    assert "timeout graceful shutdown exceeded" not in log and "Traceback" not in log


def test_the_page_s_script_parses(tmp_path: Path) -> None:
    """(a syntax error leaves the whole dashboard blank: node says where, when it is here)"""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    page = claude_jobs._PAGE
    script = tmp_path / "page.js"
    script.write_text(page[page.index("<script>") + len("<script>") : page.rindex("</script>")])
    checked = subprocess.run([node, "--check", str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
