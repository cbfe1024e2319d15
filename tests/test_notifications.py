"""Notifications (--notify): written with the change they report, sent by workers as Standard
Webhooks (checked here by an implementation of the spec's signature of the test's own), tried
again while the receiver is down, in order per job, never for a receiver that said 410."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import signal
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import LOCAL, claude_runs, fake, job_row, status_of, wait_for
from starlette.testclient import TestClient

import claude_jobs
from claude_jobs import ClaudeHandler, Worker

SECRET = "whsec_" + base64.b64encode(b"a secret of the tests, 32 bytes!").decode()


@dataclass
class Receiver:
    """An HTTP server that records what is POSTed to it and answers ``status`` (a list: the
    next answers, then 200)."""

    answers: list[int] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver.lock:
                    status = receiver.answers.pop(0) if receiver.answers else 200
                    receiver.received.append(
                        {"path": self.path, "body": body, "status": status,
                         "headers": {k.lower(): v for k, v in self.headers.items()}}
                    )  # fmt: skip
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def delivered(self) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(r["body"]) for r in self.received if r["status"] == 200]


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    monkeypatch.setenv("CLAUDE_JOBS_WEBHOOK_SECRET", SECRET)
    found = Receiver()
    yield found
    found.server.shutdown()


def verified(request: dict[str, Any]) -> bool:
    """The Standard Webhooks signature check, as a receiver would write it from the spec."""
    headers = request["headers"]
    key = base64.b64decode(SECRET.split("_", 1)[1])
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + request["body"]
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(
        hmac.compare_digest(each.split(",", 1)[1], expected)
        for each in headers["webhook-signature"].split()
        if each.startswith("v1,")
    )


def run_jobs(db_url: str, fake_claude: Path) -> None:
    handler = ClaudeHandler(str(fake_claude))
    Worker(db_url, burst=True, handlers={"claude": handler}, backoff_base=60).run()


def test_a_success_a_failure_and_a_cancel_are_each_told_once_signed(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path,
    receiver: Receiver,
) -> None:  # fmt: skip
    hook = [receiver.url()]
    succeeded = claude_jobs.enqueue(conn, {"prompt": "fine\nmore", "cwd": str(tmp_path)},
                                    notify=hook)  # fmt: skip
    failed = claude_jobs.enqueue(conn, {"prompt": fake(exit=3, stdout=""), "cwd": str(tmp_path)},
                                 notify=hook, max_attempts=1)  # fmt: skip
    cancelled = claude_jobs.enqueue(conn, {"prompt": "never", "cwd": str(tmp_path)}, notify=hook,
                                    delay=3600)  # fmt: skip
    quiet = claude_jobs.enqueue(conn, {"prompt": "nobody asked", "cwd": str(tmp_path)})
    claude_jobs.cancel_jobs(conn, [cancelled.id])
    run_jobs(db_url, fake_claude)
    while claude_jobs.send_due_notifications(conn):
        pass
    assert job_row(conn, quiet.id)["status"] == "succeeded"
    got = {(each["type"], each["data"]["id"]) for each in receiver.delivered()}
    assert got == {("job.succeeded", str(succeeded.id)), ("job.failed", str(failed.id)),
                   ("job.cancelled", str(cancelled.id))}  # fmt: skip
    assert all(verified(request) for request in receiver.received)
    told = next(e for e in receiver.delivered() if e["type"] == "job.succeeded")
    assert told["data"]["prompt"] == "fine" and told["data"]["result"].startswith("echo: fine")
    assert told["data"]["status"] == "succeeded" and told["data"]["cost_usd"] > 0
    assert claude_jobs.list_notifications(conn) == []


def test_a_receiver_down_for_a_while_gets_every_notification_in_order_and_410_is_final(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path,
    receiver: Receiver, start_worker, invoke,
) -> None:  # fmt: skip
    receiver.answers = [503, 503, 500]  # down, then up
    job = claude_jobs.enqueue(conn, {"prompt": "p", "cwd": str(tmp_path)}, delay=3600,
                              notify=[receiver.url()])  # fmt: skip
    claude_jobs.cancel_jobs(conn, [job.id])
    claude_jobs.retry_jobs(conn, [job.id])  # (queued again: it will end a second time)
    start_worker(CLAUDE_JOBS_WEBHOOK_SECRET=SECRET)
    wait_for(lambda: len(receiver.delivered()) == 2, 60, "both notifications, in the end")
    assert [each["type"] for each in receiver.delivered()] == ["job.cancelled", "job.succeeded"]
    tries = [r for r in receiver.received if json.loads(r["body"])["type"] == "job.cancelled"]
    assert len(tries) == 4 and len({r["headers"]["webhook-id"] for r in tries}) == 1
    gone = claude_jobs.enqueue(conn, {"prompt": "p"}, delay=3600,
                               notify=[receiver.url("/gone")])  # fmt: skip
    receiver.answers = [410]
    claude_jobs.cancel_jobs(conn, [gone.id])
    wait_for(
        lambda: [n for n in claude_jobs.list_notifications(conn) if n["state"] == "failed"],
        30,
        "the refused notification",
    )
    [refused] = claude_jobs.list_notifications(conn)
    assert (refused["state"], refused["last_error"]) == (
        "failed",
        "it answered 410 (not tried again)",
    )
    listed = invoke("notifications")
    assert "failed" in listed.output and "/gone" in listed.output
    assert invoke("notifications", "retry", str(refused["id"])).exit_code == 0
    wait_for(lambda: not claude_jobs.list_notifications(conn), 30, "the retried notification")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--notify", "not-a-url"], "--notify 'not-a-url': not an http(s) URL"),
        (["--notify", "ftp://example.com/x"], "not an http(s) URL"),
        (["--notify", "https://example.com/h", "--notify-on", "nonsense"],
         "--notify-on 'nonsense': not an event"),
        (["--notify-on", "job.failed"], "--notify-on narrows --notify: give --notify URL too"),
    ],
)  # fmt: skip
def test_bad_notify_options_exit_2_with_one_line(
    invoke, conn: psycopg.Connection, args: list[str], message: str
) -> None:
    result = invoke("enqueue", "p", *args)
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1, result.output
    assert message in result.output
    assert conn.execute("SELECT count(*) FROM claude_jobs").fetchone() == (0,)


def test_a_url_s_credentials_are_masked_and_notify_on_narrows(
    conn: psycopg.Connection, invoke, receiver: Receiver
) -> None:
    url = receiver.url().replace("http://", "http://user:s3cret@")
    queued = invoke("enqueue", "p", "--notify", url, "--notify-on", "job.failed,job.cancelled",
                    "--delay", "1h")  # fmt: skip
    assert queued.exit_code == 0, queued.output
    shown = invoke("show", queued.output.strip()).output
    assert "s3cret" not in shown and "http://***@127.0.0.1" in shown
    assert "job.failed, job.cancelled" in shown
    job_id = queued.output.strip()
    claude_jobs.cancel_jobs(conn, [job_id])
    row = conn.execute("SELECT event, url FROM claude_jobs_notifications").fetchall()
    assert row == [("job.cancelled", url)]


def test_a_hanging_receiver_does_not_hold_up_the_jobs(
    conn: psycopg.Connection, start_worker, claude_log: Path, tmp_path: Path, receiver: Receiver
) -> None:
    release = threading.Event()
    hanging = ThreadingHTTPServer(("127.0.0.1", 0), _hanging_handler(release))
    threading.Thread(target=hanging.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{hanging.server_address[1]}/slow"
    jobs = [claude_jobs.enqueue(conn, {"prompt": f"job {n}", "cwd": str(tmp_path)}, notify=[url])
            for n in range(6)]  # fmt: skip
    try:
        start_worker("--concurrency", "2")
        wait_for(lambda: all(job_row(conn, j.id)["status"] == "succeeded" for j in jobs), 60,
                 "every job to succeed while the receiver hangs")  # fmt: skip
        assert all(n["state"] == "pending" for n in claude_jobs.list_notifications(conn))
    finally:
        release.set()
        hanging.shutdown()


def _hanging_handler(release: threading.Event) -> type[BaseHTTPRequestHandler]:
    class Hanging(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            release.wait(120)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Hanging


def test_a_webhook_secret_that_is_none_stops_the_worker_before_it_starts(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLAUDE_JOBS_WEBHOOK_SECRET", "whsec_not base64!")
    with pytest.raises(claude_jobs.ConfigError, match="must be whsec_ and base64"):
        Worker(db_url, burst=True)


def send_all(conn: psycopg.Connection) -> None:
    while claude_jobs.send_due_notifications(conn):
        pass


def test_a_batch_s_end_is_told_once_with_a_link_and_its_jobs_only_what_needs_you(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path,
    receiver: Receiver,
) -> None:  # fmt: skip
    claude_jobs.set_public_url(conn, "https://jobs.example.com/")
    hook = [receiver.url()]
    fine = claude_jobs.enqueue(conn, {"prompt": "fine", "cwd": str(tmp_path)}, batch="nightly",
                               notify=hook)  # fmt: skip
    claude_jobs.enqueue(conn, {"prompt": fake(exit=3, stdout=""), "cwd": str(tmp_path)},
                        batch="nightly", notify=hook, max_attempts=1)  # fmt: skip
    run_jobs(db_url, fake_claude)
    send_all(conn)
    [told] = receiver.delivered()
    assert told["type"] == "batch.finished" and told["data"]["name"] == "nightly"
    assert told["data"]["jobs"] == {"succeeded": 1, "failed": 1}
    assert told["data"]["url"] == f"https://jobs.example.com/#/batch/{fine.batch_id}"
    assert all(verified(request) for request in receiver.received)
    assert claude_jobs.notification_counts(conn)["sent"] == 1
    with TestClient(claude_jobs.web_app(db_url), base_url=LOCAL) as client:
        metrics = client.get("/metrics").text
    assert 'claude_jobs_notifications_total{outcome="sent"} 1.0' in metrics


def test_a_usage_limit_hold_is_told_when_it_starts_and_when_it_is_lifted(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path,
    receiver: Receiver, invoke,
) -> None:  # fmt: skip
    job = claude_jobs.enqueue(
        conn, {"prompt": fake(emit="usage-limit.stream.jsonl", exit=1), "cwd": str(tmp_path)}
    )
    worker = Worker(db_url, burst=True, handlers={"claude": ClaudeHandler(str(fake_claude))},
                    notify=[receiver.url()])  # fmt: skip
    worker.run()
    conn.execute(  # when run again, it succeeds
        "UPDATE claude_jobs SET payload = jsonb_set(payload, '{prompt}', %s) WHERE id = %s",
        [psycopg.types.json.Jsonb(fake(result="after the reset")), job.id],
    )
    assert invoke("resume", "--hold", "claude").exit_code == 0
    Worker(db_url, burst=True, handlers={"claude": ClaudeHandler(str(fake_claude))}).run()
    send_all(conn)
    told = [each["type"] for each in receiver.delivered()]
    assert sorted(told) == ["hold.ended", "hold.started", "job.succeeded"]
    assert told.index("hold.started") < told.index("hold.ended"), "in order, per subject"
    [started, ended] = [each for each in receiver.delivered() if each["type"].startswith("hold")]
    assert started["data"]["kind"] == "claude" and "usage limit" in started["data"]["reason"]
    assert ended["data"]["ended"] == "lifted"


def test_a_worker_that_cannot_run_claude_tells_it_once_and_its_jobs_tell_its_default(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path,
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(claude_jobs, "UNFIT_BACKOFF", (0.3, 0.6))
    logged_in = tmp_path / "logged-in"
    prompt = fake(emit="not-logged-in.stream.jsonl", exit=1, unless=str(logged_in))
    job = claude_jobs.enqueue(conn, {"prompt": prompt, "cwd": str(tmp_path)})
    own = claude_jobs.enqueue(conn, {"prompt": "mine", "cwd": str(tmp_path)},
                              notify=[receiver.url("/own")], delay=3600)  # fmt: skip
    worker = Worker(db_url, handlers={"claude": ClaudeHandler(str(fake_claude))},
                    notify=[receiver.url("/worker")])  # fmt: skip
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_for(lambda: len(claude_runs(claude_log)) >= 3, 20, "three tries, backing off")
        logged_in.touch()
        wait_for(lambda: status_of(conn, job.id) == "succeeded", what="the job, once logged in")
        claude_jobs.run_now(conn, own.id)
        wait_for(lambda: len(receiver.delivered()) == 3, 30, "the three notifications")
    finally:
        worker.stop()
        thread.join(10)
    paths = [(r["path"], json.loads(r["body"])["type"]) for r in receiver.received]
    assert paths == [("/worker", "worker.unfit"), ("/worker", "job.succeeded"),
                     ("/own", "job.succeeded")]  # fmt: skip
    unfit = receiver.delivered()[0]["data"]
    assert "not logged in" in unfit["reason"] and unfit["scope"] == "this worker"


def test_a_continuation_that_widens_what_the_job_may_do_needs_attention(
    conn: psycopg.Connection, db_url: str, fake_claude: Path, claude_log: Path, tmp_path: Path,
    receiver: Receiver,
) -> None:  # fmt: skip
    first = claude_jobs.enqueue(
        conn, {"prompt": "look", "cwd": str(tmp_path), "allowed_tools": ["Read"]},
        notify=[receiver.url()], notify_on="job.needs_attention",
    )  # fmt: skip
    run_jobs(db_url, fake_claude)
    same = claude_jobs.enqueue(conn, {"prompt": "go on"}, continue_from=first.id)
    wider = claude_jobs.enqueue(conn, {"prompt": "now fix it", "allowed_tools": ["Read", "Bash"]},
                                continue_from=first.id)  # fmt: skip
    send_all(conn)
    [told] = receiver.delivered()
    assert told["type"] == "job.needs_attention" and told["data"]["id"] == str(wider.id)
    assert "allowed_tools: adds Bash" in told["data"]["attention"]
    assert job_row(conn, same.id)["notify"] == job_row(conn, first.id)["notify"], "inherited"


def test_a_worker_killed_while_sending_leaves_the_notification_to_another(
    conn: psycopg.Connection, start_worker, claude_log: Path, tmp_path: Path, receiver: Receiver
) -> None:
    release = threading.Event()
    hanging = ThreadingHTTPServer(("127.0.0.1", 0), _hanging_handler(release))
    threading.Thread(target=hanging.serve_forever, daemon=True).start()
    try:
        port = hanging.server_address[1]
        job = claude_jobs.enqueue(conn, {"prompt": "p", "cwd": str(tmp_path)},
                                  notify=[f"http://127.0.0.1:{port}/hook"])  # fmt: skip
        first = start_worker("--heartbeat-timeout", "5s")
        wait_for(lambda: _sending(conn), 30, "the notification to be taken, its POST hanging")
        first.signal(signal.SIGKILL)
        first.wait()
        hanging.shutdown()
        hanging.server_close()
        # the receiver comes back on the same port, answering at once
        back = ThreadingHTTPServer(("127.0.0.1", port), receiver.server.RequestHandlerClass)
        threading.Thread(target=back.serve_forever, daemon=True).start()
        start_worker("--heartbeat-timeout", "5s")
        wait_for(lambda: receiver.delivered(), 40, "the notification, sent by the other worker")
        back.shutdown()
    finally:
        release.set()
    [told] = receiver.delivered()
    assert told["type"] == "job.succeeded" and told["data"]["id"] == str(job.id)
    assert claude_jobs.list_notifications(conn) == []


def _sending(conn: psycopg.Connection) -> bool:
    row = conn.execute(
        "SELECT worker_id IS NOT NULL AND next_at > now() FROM claude_jobs_notifications"
    ).fetchone()
    return bool(row and row[0])


def test_schedules_and_workers_take_notify_and_refuse_bad_ones(
    conn: psycopg.Connection, invoke, tmp_path: Path
) -> None:
    added = invoke("schedule", "add", "nightly", "--every", "1d", "--cwd", str(tmp_path),
                   "review", "--notify", "https://hooks.slack.com/services/T/B/x")  # fmt: skip
    assert added.exit_code == 0, added.output
    job = claude_jobs.run_schedule(conn, "nightly")
    assert job_row(conn, job.id)["notify"]["urls"] == ["https://hooks.slack.com/services/T/B/x"]
    edited = invoke("schedule", "edit", "nightly", "--notify", "https://example.com/h",
                    "--notify-on", "failed")  # fmt: skip
    assert edited.exit_code == 2 and "--notify-on 'failed': not an event" in edited.output
    for args, message in [
        (["schedule", "edit", "nightly", "--notify", "ftp://x/y"], "not an http(s) URL"),
        (["worker", "--burst", "--notify", "not-a-url"], "--notify 'not-a-url': not an http"),
        (["worker", "--burst", "--notify", "https://e.com/h", "--notify-on", "batch.finished"],
         "--notify-on batch.finished: not told to a worker"),
        (["enqueue", "p", "--notify", "https://e.com/h", "--notify-on", "hold.started"],
         "--notify-on hold.started: not told to a job"),
        (["enqueue", "p", "--notify", "https://e.com/h", "--notify-on", "batch.finished"],
         "--notify-on batch.finished: the end of a --batch"),
    ]:  # fmt: skip
        result = invoke(*args)
        assert result.exit_code == 2 and len(result.output.splitlines()) == 1, result.output
        assert message in result.output, result.output
    assert len(claude_jobs.list_jobs(conn)) == 1
    assert claude_jobs.get_schedule(conn, "nightly").options["notify"] == [
        "https://hooks.slack.com/services/T/B/x"
    ]


def test_the_dashboard_shows_what_was_given_up_and_sends_it_again(
    conn: psycopg.Connection, db_url: str, receiver: Receiver
) -> None:
    job = claude_jobs.enqueue(conn, {"prompt": "p"}, delay=3600, notify=[receiver.url("/gone")])
    receiver.answers = [410]
    claude_jobs.cancel_jobs(conn, [job.id])
    send_all(conn)
    [shown] = claude_jobs._overview(conn)["notifications"]
    assert (shown["event"], shown["job_id"], shown["state"]) == (
        "job.cancelled", str(job.id), "failed",
    )  # fmt: skip
    with TestClient(claude_jobs.web_app(db_url), base_url=LOCAL) as client:
        answer = client.post(f"/api/notifications/{shown['id']}/retry")
        assert answer.status_code == 200, answer.text
        again = client.post(f"/api/notifications/{shown['id']}/retry")
        assert again.status_code == 404 and "no failed or abandoned" in again.json()["error"]
    send_all(conn)
    assert claude_jobs._overview(conn)["notifications"] == []
    assert [each["type"] for each in receiver.delivered()] == ["job.cancelled"]


def test_the_schema_knows_a_spent_budget_by_the_reason_the_worker_writes() -> None:
    """(claude_jobs_notify_paused tells a budget's hold from an unfit worker by its reason)"""
    assert f"'{claude_jobs.BUDGET_NOTE}'" in claude_jobs.MIGRATIONS[13][1]


def test_slack_and_discord_get_a_short_message_of_each_kind_of_event() -> None:
    slack, discord = (
        "https://hooks.slack.com/services/T/B/x",
        "https://discord.com/api/webhooks/1/x",
    )
    failed = {"type": "job.failed", "data": {"id": "0123456789", "prompt": "fix it",
              "error": "exit 3", "url": "https://jobs.example.com/#/jobs/0123456789"}}  # fmt: skip
    assert claude_jobs._chat_message(slack, failed) == {"text": (
        "claude-jobs: job 01234567 failed\nprompt: fix it\nerror: exit 3\n"
        "url: https://jobs.example.com/#/jobs/0123456789")}  # fmt: skip
    batch = {"type": "batch.finished", "data": {"name": "nightly", "jobs": {"succeeded": 3}}}
    assert claude_jobs._chat_message(discord, batch) == {
        "content": "claude-jobs: batch nightly finished (3 succeeded)"
    }
    held = {"type": "hold.started", "data": {"kind": "claude", "reason": "usage limit",
            "until": "2030-03-17T17:46:00+00:00"}}  # fmt: skip
    assert claude_jobs._chat_message(slack, held)["text"].startswith(
        "claude-jobs: hold.started for claude jobs\nreason: usage limit\nuntil: 2030"
    )
    assert claude_jobs._chat_message("https://example.com/hook", failed) is None


def test_what_a_sender_cannot_send_in_time_or_leaves_behind_goes_to_the_others_at_once(
    conn: psycopg.Connection, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(3):
        job = claude_jobs.enqueue(conn, {"prompt": f"p{n}"}, delay=3600, notify=[receiver.url()])
        claude_jobs.cancel_jobs(conn, [job.id])
    pending = (
        "SELECT count(*) FROM claude_jobs_notifications WHERE state = 'pending' "
        "AND next_at <= now() AND attempts = 0 AND worker_id IS NULL"
    )
    # stopping after the first: the other two are given back, their try not counted
    sent = claude_jobs.send_due_notifications(conn, stopping=lambda: bool(receiver.received))
    assert sent == 1 and conn.execute(pending).fetchone() == (2,)
    # a lease too short to wait for an answer: nothing is sent, all given back
    monkeypatch.setattr(claude_jobs, "NOTIFY_LEASE", claude_jobs.NOTIFY_TIMEOUT + 1)
    assert claude_jobs.send_due_notifications(conn) == 0
    assert conn.execute(pending).fetchone() == (2,) and len(receiver.received) == 1
    # a worker that leaves (or is found dead) gives back what it took
    worker = uuid.uuid4()
    identity = {"host": "h", "pid": 1, "queues": ["*"], "kinds": ["claude"], "concurrency": 1}
    claude_jobs._db_register_worker(conn, worker, identity)
    conn.execute("UPDATE claude_jobs_notifications SET worker_id = %s, next_at = now() + "
                 "interval '1 hour' WHERE state = 'pending'", [worker])  # fmt: skip
    conn.execute("DELETE FROM claude_jobs_workers WHERE id = %s", [worker])
    assert conn.execute(pending).fetchone() == (2,)
