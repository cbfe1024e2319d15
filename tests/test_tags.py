"""Tags: labels a job is enqueued with (enqueue --tag, a payload's "tags", the API, a
schedule's runs), shown with it, and what finds and counts it (list --tag, stats --tag,
GET /api/jobs?tag=)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import psycopg
import pytest
from conftest import LOCAL, job_row
from starlette.testclient import TestClient

import claude_jobs


def test_tags_label_jobs_that_list_and_stats_find_and_count(
    conn: psycopg.Connection, db_url: str, invoke, tmp_path: Path
) -> None:
    queued = invoke("enqueue", "--tag", "nightly", "--tag", "api", "--cwd", str(tmp_path),
                    "--queue", "reviews", "review the API")  # fmt: skip
    assert queued.exit_code == 0, queued.output
    tagged = queued.output.strip()
    lines = tmp_path / "jobs.jsonl"
    lines.write_text("".join(
        json.dumps({"prompt": f"fix {n}", "cwd": str(tmp_path), "tags": ["nightly"]}) + "\n"
        for n in range(3)
    ))  # fmt: skip
    assert invoke("enqueue", "--file", str(lines)).exit_code == 0
    claude_jobs.enqueue(conn, {"prompt": "untagged", "cwd": str(tmp_path)})
    assert job_row(conn, tagged)["tags"] == ["nightly", "api"]
    assert "nightly, api" in invoke("show", tagged).output
    listed = invoke("list", "--tag", "api").output
    assert "[nightly] [api] review the API" in listed and "fix 0" not in listed
    found = [json.loads(line) for line in invoke("list", "--tag", "nightly", "--json").output
             .splitlines()]  # fmt: skip
    assert len(found) == 4 and all("nightly" in job["tags"] for job in found)
    claude_jobs.cancel_jobs(conn, [tagged])
    counted = [json.loads(line) for line in invoke("stats", "--tag", "nightly", "--json")
               .output.splitlines()]  # fmt: skip
    assert {(c["queue"], c["status"], c["jobs"]) for c in counted} == {
        ("reviews", "cancelled", 1), ("default", "queued", 3),
    }  # fmt: skip
    table = invoke("stats", "--tag", "nightly").output
    assert table.splitlines()[0].split()[:3] == ["QUEUE", "QUEUED", "RUNNING"]
    with TestClient(claude_jobs.web_app(db_url), base_url=LOCAL) as client:
        page = client.get("/api/jobs", params={"tag": "api"}).json()
        assert [job["id"] for job in page["jobs"]] == [tagged]
        made = client.post("/api/jobs", json={"payload": {"prompt": "p", "cwd": str(tmp_path)},
                                              "tags": ["from-api"]})  # fmt: skip
        assert made.status_code == 201 and made.json()["tags"] == ["from-api"]


def test_a_schedule_s_runs_carry_its_tags_and_a_bad_tag_changes_nothing(
    conn: psycopg.Connection, invoke, tmp_path: Path
) -> None:
    added = invoke("schedule", "add", "weekly", "--every", "7d", "--cwd", str(tmp_path),
                   "--tag", "weekly", "bump the dependencies")  # fmt: skip
    assert added.exit_code == 0, added.output
    run = claude_jobs.run_schedule(conn, "weekly")
    assert job_row(conn, run.id)["tags"] == ["weekly"]
    for args in (["--tag", " "], ["--tag", "x" * 101]):
        refused = invoke("enqueue", "p", *args)
        assert refused.exit_code == 2 and len(refused.output.splitlines()) == 1, refused.output
        assert "invalid tag" in refused.output
    assert len(claude_jobs.list_jobs(conn)) == 1


def test_bulk_actions_take_what_the_filters_match_all_or_none(
    conn: psycopg.Connection, invoke, tmp_path: Path
) -> None:
    many = 100_000
    claude_jobs.enqueue_many(conn, [{"prompt": f"job {n}"} for n in range(many)], tags=["nightly"])
    other = claude_jobs.enqueue(conn, {"prompt": "not nightly"})
    cancelled = invoke("cancel", "--all", "--tag", "nightly", "--yes")
    assert (cancelled.exit_code, cancelled.output) == (0, f"cancelled {many} job(s)\n")
    counts = dict(conn.execute(
        "SELECT status, count(*) FROM claude_jobs GROUP BY status").fetchall())  # fmt: skip
    assert counts == {"cancelled": many, "queued": 1}
    assert claude_jobs.get_job(conn, other.id).status == "queued"
    later = [claude_jobs.enqueue(conn, {"prompt": f"later {n}"}, queue="later", delay=3600,
                                 tags=["urgent"]) for n in range(3)]  # fmt: skip
    assert invoke("set-priority", "--all", "--tag", "urgent", "7").output == (
        "3 job(s) have priority 7\n"
    )
    assert invoke("run-now", "--all", "--queue", "later").output == "3 job(s) are due now\n"
    rows = conn.execute("SELECT priority, run_at <= now() FROM claude_jobs WHERE queue = 'later'")
    assert set(rows.fetchall()) == {(7, True)}
    assert invoke("run-now", "--all", "--queue", "later").output == "0 job(s) are due now\n"
    claude_jobs.cancel_jobs(conn, [job.id for job in later])
    retried = invoke("retry", "--all", "--status", "cancelled", "--tag", "urgent")
    assert retried.output == "retried 3 cancelled job(s)\n"
    for args, message in [
        (["cancel", str(other.id), "--all"], "give job ids, or --all"),
        (["cancel", "--tag", "nightly"], "give job ids, or --all"),
        (["cancel", str(other.id), "--tag", "nightly"], "--tag goes with --all, not with job ids"),
        (["retry", "--all", "--status", "failed", "--older-than", "soon"], "soon"),
        (["set-priority", "--all", "high"], "the priority must be a whole number"),
    ]:  # fmt: skip
        refused = invoke(*args)
        assert refused.exit_code == 2 and len(refused.output.splitlines()) == 1, refused.output
        assert message in refused.output, refused.output


def test_the_api_counts_and_does_a_bulk_action_by_filter(
    conn: psycopg.Connection, db_url: str
) -> None:
    jobs = [claude_jobs.enqueue(conn, {"prompt": f"p{n}"}, tags=["web"], delay=3600)
            for n in range(4)]  # fmt: skip
    claude_jobs.enqueue(conn, {"prompt": "other"}, delay=3600)
    with TestClient(claude_jobs.web_app(db_url), base_url=LOCAL) as client:
        counted = client.get("/api/bulk", params={"action": "run-now", "tag": "web"}).json()
        assert counted == {"action": "run-now", "count": 4}
        done = client.post("/api/bulk", json={"action": "set-priority", "tag": "web",
                                              "priority": 5})  # fmt: skip
        assert done.json() == {"action": "set-priority", "changed": 4}
        wrong = client.post("/api/bulk", json={"action": "retry", "status": "queued"})
        assert wrong.status_code == 422 and "not queued" in wrong.json()["error"]
        assert client.post("/api/bulk", json={"action": "explode"}).status_code == 400
        unknown = client.post("/api/bulk", json={"action": "cancel", "colour": "red"})
        assert unknown.status_code == 422 and "colour" in unknown.json()["error"]
        listed = client.post("/api/bulk", json={"action": "cancel", "status": ["queued"]})
        assert listed.status_code == 400 and listed.json()["error"] == '"status" must be a string'
        everything = client.post("/api/bulk", json={"action": "cancel"})
        assert everything.status_code == 422 and "give a filter" in everything.json()["error"]
        with TestClient(claude_jobs.web_app(db_url, read_only=True), base_url=LOCAL) as watcher:
            assert (
                watcher.post("/api/bulk", json={"action": "cancel", "tag": "web"}).status_code
                == 403
            )
    assert {job_row(conn, job.id)["priority"] for job in jobs} == {5}


def test_a_bulk_retry_goes_over_what_one_chunk_could_not_take_and_keeps_the_newest_of_a_key(
    conn: psycopg.Connection, invoke, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(claude_jobs, "BULK_CHUNK", 1)  # (each job a chunk of its own)
    first = claude_jobs.enqueue(conn, {"prompt": "first"}, tags=["chain"], delay=3600)
    then = claude_jobs.enqueue(conn, {"prompt": "then"}, tags=["chain"], after=[first.id])
    older = claude_jobs.enqueue(conn, {"prompt": "older"}, tags=["key"], unique_key="k")
    claude_jobs.cancel_jobs(conn, [then.id, first.id, older.id])
    newer = claude_jobs.enqueue(conn, {"prompt": "newer"}, tags=["key"], unique_key="k")
    claude_jobs.cancel_jobs(conn, [newer.id])
    assert job_row(conn, then.id)["status"] == "cancelled"
    retried = invoke("retry", "--all", "--status", "cancelled", "--tag", "chain")
    assert retried.output == "retried 2 cancelled job(s)\n", "the job, then what waited for it"
    assert invoke("retry", "--all", "--status", "cancelled", "--tag", "key").output == (
        "retried 1 cancelled job(s)\n"
    )
    assert (job_row(conn, newer.id)["status"], job_row(conn, older.id)["status"]) == (
        "queued", "cancelled",
    )  # fmt: skip
    for args, message in [
        (["cancel", "--all", "--yes"], "give a filter (--status, --queue, --tag...)"),
        (["cancel", str(first.id), "--search", "x"], "--search goes with --all"),
    ]:
        refused = invoke(*args)
        assert refused.exit_code == 2 and message in refused.output, refused.output


def test_a_rate_limit_event_of_another_shape_breaks_nothing() -> None:
    odd = json.dumps({"type": "rate_limit_event", "rate_limit_info": "soon"})
    huge = json.dumps({"type": "rate_limit_event", "rate_limit_info": {"resetsAt": 1e300}})
    assert claude_jobs._render_event(odd)[0] == ["· rate limit ?, resets ?"]
    assert claude_jobs._render_event(huge)[0][0].startswith("· rate limit ?, resets 1e+300")
    context = claude_jobs.RunContext(uuid.uuid4(), 1, None)
    stream = claude_jobs._ClaudeStream(context)
    stream.feed(odd.encode())
    assert stream.warned is None and stream.rate_limit_reset is None
