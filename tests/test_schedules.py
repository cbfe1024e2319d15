"""Schedules: the due-time arithmetic (days when the clocks change included), the catch-up
and overlap policies, --only-if-changed, the command line and `schedule sync`, and worker
processes firing each due time exactly once, a worker killed in the middle of firing too."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import handlers
import psycopg
import pytest
from click.testing import Result
from conftest import LOCAL, wait_for

import claude_jobs
from claude_jobs import _catching_up, _Timing

BERLIN = ZoneInfo("Europe/Berlin")


def berlin(*fields: int) -> datetime:
    return datetime(*fields, tzinfo=BERLIN)


def times(timing: _Timing, start: datetime, until: datetime) -> list[datetime]:
    """Every due time after ``start`` up to ``until`` (in UTC)."""
    found, moment = [], start
    while (moment := timing.next_after(moment)) <= until:
        found.append(moment)
    return found


# -- the arithmetic --------------------------------------------------------------------------


def test_a_nightly_0230_run_on_the_spring_forward_day_comes_at_0300_once() -> None:
    timing = _Timing.of("30 2 * * *", None, "Europe/Berlin")
    due = times(timing, berlin(2026, 3, 27, 12), berlin(2026, 3, 31, 12))
    wall = [d.astimezone(BERLIN) for d in due]
    assert [(d.day, d.hour, d.minute) for d in wall] == [
        (28, 2, 30),
        (29, 3, 0),  # 02:30 does not exist that night: the run comes when the clocks moved on
        (30, 2, 30),
        (31, 2, 30),
    ]


def test_a_nightly_0230_run_on_the_fall_back_day_runs_once() -> None:
    timing = _Timing.of("30 2 * * *", None, "Europe/Berlin")
    due = times(timing, berlin(2026, 10, 24, 12), berlin(2026, 10, 26, 12))
    assert len(due) == 2  # 02:30 happens twice on the 25th: one run
    assert due[1] - due[0] == timedelta(hours=25)


def test_an_hourly_schedule_follows_the_hours_that_pass() -> None:
    timing = _Timing.of("0 * * * *", None, "Europe/Berlin")
    spring = times(timing, berlin(2026, 3, 28, 23, 30), berlin(2026, 3, 29, 23, 30))
    autumn = times(timing, berlin(2026, 10, 24, 23, 30), berlin(2026, 10, 25, 23, 30))
    assert len(spring) == 23 and len(autumn) == 25  # the days are that long
    gaps = {b - a for a, b in itertools.pairwise(autumn)}
    assert gaps == {timedelta(hours=1)}


def test_every_keeps_its_rhythm_from_the_first_due_time() -> None:
    timing = _Timing.of(None, 1800, "UTC")
    first = datetime(2026, 1, 1, tzinfo=UTC)
    assert timing.next_after(first + timedelta(minutes=95), anchor=first) == first + timedelta(
        minutes=120
    )
    due, count = timing.due_until(first, first + timedelta(days=30))
    assert count == 30 * 48 + 1 and len(due) == claude_jobs.CATCH_UP_LIMIT
    assert due[-1] == first + timedelta(days=30)


def test_a_cron_catch_up_past_the_count_limit_ends_at_now_not_after() -> None:
    """Over MISSED_COUNT_LIMIT missed minutes the latest due times are counted back from now:
    half a second before a minute, that minute is not due yet."""
    timing = _Timing.of("* * * * *", None, "UTC")
    first = datetime(2026, 1, 1, tzinfo=UTC)
    now = first + timedelta(days=10, seconds=-0.5)
    due, count = timing.due_until(first, now)
    assert count == claude_jobs.MISSED_COUNT_LIMIT and len(due) == claude_jobs.CATCH_UP_LIMIT
    assert due[-1] == first + timedelta(days=10, minutes=-1) and due == sorted(set(due))


def test_catch_up_policies() -> None:
    now = datetime(2026, 1, 4, 12, tzinfo=UTC)
    due = [datetime(2026, 1, day, 2, tzinfo=UTC) for day in (2, 3, 4)]
    assert _catching_up("latest", due, 3, now) == (
        [due[-1]],
        "one run for 2 earlier due times missed",
        None,
    )
    assert _catching_up("all", due, 3, now) == (due, None, None)
    assert _catching_up("all", due, 250, now)[1] == (
        "247+ earlier due times dropped: at most 100 at once"
    )
    assert _catching_up("none", due, 3, now) == (
        [],
        "3 due times missed, not run (--catch-up none)",
        due[-1],
    )
    # a due time only just past is late, not missed: it runs under every policy
    just = [now - timedelta(seconds=3)]
    for policy in claude_jobs.CATCH_UPS:
        assert _catching_up(policy, just, 1, now) == (just, None, None)


@pytest.mark.parametrize(
    ("cron", "message"),
    [
        ("61 * * * *", "bad cron expression '61 * * * *': bad minute"),
        ("0 2 * *", "give five fields"),
        ("0 2 30 2 *", "bad cron expression '0 2 30 2 *'"),
        ("* * * * * *", "give five fields"),
    ],
)
def test_bad_cron_expressions_are_refused(cron: str, message: str) -> None:
    with pytest.raises(claude_jobs.InvalidJob, match=message.replace("*", r"\*")):
        _Timing.of(cron, None, "UTC")


# -- firing, against the database ------------------------------------------------------------


def add(conn: psycopg.Connection, name: str = "s", **options: Any) -> claude_jobs.Schedule:
    payload = options.pop("payload", {"n": 1})
    options.setdefault("kind", "record")
    return claude_jobs.add_schedule(conn, name, payload, **options)


def set_due(conn: psycopg.Connection, name: str, ago: timedelta) -> None:
    """As if no worker had fired the schedule since that long ago."""
    conn.execute(
        "UPDATE claude_jobs_schedules SET next_run_at = now() - %s WHERE name = %s", (ago, name)
    )


def runs(conn: psycopg.Connection, name: str = "s") -> list[dict[str, Any]]:
    return list(reversed(claude_jobs.schedule_runs(conn, name, 1000)))


def test_a_due_schedule_makes_one_job_that_records_its_schedule_and_due_time(
    conn: psycopg.Connection,
) -> None:
    add(conn, every=3600, queue="nightly", priority=7, unique_key=None)
    assert claude_jobs.fire_due_schedules(conn) == []  # (not due yet)
    set_due(conn, "s", timedelta(seconds=2))
    [job] = claude_jobs.fire_due_schedules(conn, by="test")
    assert (job.schedule, job.queue, job.priority, job.kind) == ("s", "nightly", 7, "record")
    [run] = runs(conn)
    assert (
        run["job_id"] == job.id
        and run["outcome"] == "enqueued"
        and run["due_at"] == (job.scheduled_for)
    )
    assert claude_jobs.fire_due_schedules(conn) == []  # that due time is done
    schedule = claude_jobs.get_schedule(conn, "s")
    assert schedule.next_run_at == job.scheduled_for + timedelta(hours=1)
    assert schedule.last_run is not None and schedule.last_run["job_id"] == job.id


def test_catch_up_latest_makes_one_run_for_the_nights_missed(conn: psycopg.Connection) -> None:
    add(conn, cron="0 2 * * *", timezone="Europe/Berlin")
    timing = _Timing.of("0 2 * * *", None, "Europe/Berlin")
    three_nights_ago = timing.next_after(datetime.now(UTC) - timedelta(days=3))
    conn.execute("UPDATE claude_jobs_schedules SET next_run_at = %s", (three_nights_ago,))
    [job] = claude_jobs.fire_due_schedules(conn)
    [run] = runs(conn)
    assert run["note"] == "one run for 2 earlier due times missed"
    assert job.scheduled_for.astimezone(BERLIN).hour == 2
    assert datetime.now(UTC) - job.scheduled_for < timedelta(days=1)


def test_catch_up_all_makes_a_run_for_each(conn: psycopg.Connection) -> None:
    add(conn, every=3600, catch_up="all", overlap="allow")
    set_due(conn, "s", timedelta(hours=5, minutes=30))
    made = claude_jobs.fire_due_schedules(conn)
    assert len(made) == 6
    gaps = {b.scheduled_for - a.scheduled_for for a, b in itertools.pairwise(made)}
    assert gaps == {timedelta(hours=1)}


def test_catch_up_none_records_the_miss_and_makes_nothing(conn: psycopg.Connection) -> None:
    add(conn, every=3600, catch_up="none")
    set_due(conn, "s", timedelta(hours=2, minutes=30))
    assert claude_jobs.fire_due_schedules(conn) == []
    [run] = runs(conn)
    assert run["outcome"] == "missed" and run["job_id"] is None
    assert run["note"] == "3 due times missed, not run (--catch-up none)"
    assert claude_jobs.get_schedule(conn, "s").next_run_at > datetime.now(UTC)


def fire_again(conn: psycopg.Connection, name: str = "s") -> list[claude_jobs.Job]:
    set_due(conn, name, timedelta(seconds=1))
    return claude_jobs.fire_due_schedules(conn)


def test_overlap_skip_makes_no_run_while_one_is_unfinished(conn: psycopg.Connection) -> None:
    add(conn, every=60)
    [first] = fire_again(conn)
    assert fire_again(conn) == []
    skipped = runs(conn)[-1]
    assert skipped["outcome"] == "skipped"
    assert skipped["note"] == f"job {first.id}, a run before it, is still queued"
    claude_jobs.cancel_job(conn, first.id)
    assert len(fire_again(conn)) == 1


def test_overlap_queue_and_allow(conn: psycopg.Connection) -> None:
    add(conn, "queued", every=60, overlap="queue")
    add(conn, "allowed", every=60, overlap="allow")
    queued = fire_again(conn, "queued") + fire_again(conn, "queued")
    allowed = fire_again(conn, "allowed") + fire_again(conn, "allowed")
    assert len(queued) == 2 and len(allowed) == 2
    # the queued runs take turns (a key of their own); the allowed ones do not wait
    assert {job.concurrency_key for job in queued} == {"schedule queued"}
    assert {job.concurrency_key for job in allowed} == {None}


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_only_if_changed_skips_an_unchanged_repository(
    conn: psycopg.Connection, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty",
        "-m", "one")  # fmt: skip
    payload = {"prompt": "review", "cwd": str(repo)}
    claude_jobs.add_schedule(conn, "s", payload, every=60, only_if_changed=True)
    [first] = fire_again(conn)
    conn.execute("UPDATE claude_jobs SET status = 'succeeded' WHERE id = %s", (first.id,))
    assert fire_again(conn) == []
    skipped = runs(conn)[-1]
    assert skipped["outcome"] == "skipped" and skipped["note"].startswith(
        f"unchanged: {repo} is at "
    )
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty",
        "-m", "two")  # fmt: skip
    [second] = fire_again(conn)
    assert runs(conn)[-1]["head"] != runs(conn)[0]["head"]
    # a run that failed does not count: the next one runs even on the same commit
    conn.execute("UPDATE claude_jobs SET status = 'failed' WHERE id = %s", (second.id,))
    assert len(fire_again(conn)) == 1


def test_only_if_changed_needs_a_repository(conn: psycopg.Connection, tmp_path: Path) -> None:
    with pytest.raises(claude_jobs.InvalidJob, match="only-if-changed is for claude jobs"):
        claude_jobs.add_schedule(
            conn, "s", {"prompt": "x", "cwd": str(tmp_path)}, every=60, only_if_changed=True
        )


def test_pause_resume_edit(conn: psycopg.Connection) -> None:
    add(conn, every=60)
    claude_jobs.pause_schedule(conn, "s")
    set_due(conn, "s", timedelta(hours=1))
    assert claude_jobs.fire_due_schedules(conn) == []
    resumed = claude_jobs.resume_schedule(conn, "s")
    assert resumed.paused_at is None and resumed.next_run_at > datetime.now(UTC)
    edited = claude_jobs.edit_schedule(conn, "s", cron="0 2 * * *", queue="other")
    assert edited.every is None and edited.cron == "0 2 * * *"
    assert edited.options["queue"] == "other" and edited.options["priority"] == 0
    job = claude_jobs.run_schedule(conn, "s", by="me")
    assert job.queue == "other" and runs(conn)[-1]["outcome"] == "manual"
    claude_jobs.remove_schedule(conn, "s")
    assert claude_jobs.list_schedules(conn) == []
    assert claude_jobs.get_job(conn, job.id).schedule == "s"  # (its jobs stay)


def test_a_schedules_runs_can_be_unique(conn: psycopg.Connection) -> None:
    add(conn, every=60, overlap="allow", unique_key="nightly")
    [first] = fire_again(conn)
    assert fire_again(conn) == []
    skipped = runs(conn)[-1]
    assert skipped["outcome"] == "skipped" and skipped["job_id"] is None
    assert skipped["note"] == f"job {first.id} has the unique key 'nightly'"
    assert conn.execute("SELECT count(*) FROM claude_jobs").fetchone() == (1,)


# -- the command line ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cron", "61 * * * *"], "bad cron expression '61 * * * *': bad minute"),
        (["--cron", "0 2 * * *", "--timezone", "Mars/Olympus"], "unknown time zone"),
        (["--cron", "0 2 * * *", "--every", "1h"], "give one"),
        ([], "give one"),
        (["--every", "1h", "--catch-up", "sometimes"], "Invalid value for '--catch-up'"),
        (["--every", "1h", "--delay", "1h"], "No such option '--delay'"),
    ],
)
def test_bad_schedules_exit_2_and_add_nothing(
    invoke: Callable[..., Result], conn: psycopg.Connection, args: list[str], message: str
) -> None:
    result = invoke("schedule", "add", "nightly", "review", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.splitlines()) == 1
    assert claude_jobs.list_schedules(conn) == []


def test_schedule_commands(invoke: Callable[..., Result], tmp_path: Path) -> None:
    added = invoke("schedule", "add", "nightly", "review the changes", "--cwd", str(tmp_path),
                   "--cron", "0 2 * * *", "--timezone", "Europe/Berlin", "--queue", "reviews",
                   "--max-budget-usd", "5")  # fmt: skip
    assert added.exit_code == 0, added.output
    assert added.stdout.startswith("added schedule nightly: cron 0 2 * * *, next run ")
    listed = invoke("schedule", "list")
    assert "nightly  cron 0 2 * * *  Europe/Berlin" in listed.stdout
    ran = invoke("schedule", "run", "nightly")
    job_id = ran.stdout.strip()
    shown = invoke("schedule", "show", "nightly", "--json")
    data = json.loads(shown.stdout)
    assert data["payload"] == {"prompt": "review the changes", "cwd": str(tmp_path),
                               "max_budget_usd": 5.0}  # fmt: skip
    assert data["runs"][0]["job_id"] == job_id and data["runs"][0]["outcome"] == "manual"
    edited = invoke("schedule", "edit", "nightly", "--every", "6h", "--prompt-file", "-",
                    input="review harder")  # fmt: skip
    assert edited.exit_code == 0, edited.output
    data = json.loads(invoke("schedule", "show", "nightly", "--json").stdout)
    assert (data["cron"], data["every"]) == (None, 6 * 3600.0)
    assert data["payload"]["prompt"] == "review harder"
    assert data["options"]["queue"] == "reviews"  # (what was not given stays)
    assert invoke("schedule", "pause", "nightly").stdout == "paused schedule nightly\n"
    assert " paused " in invoke("schedule", "list").stdout
    assert invoke("schedule", "remove", "nightly").exit_code == 0
    missing = invoke("schedule", "show", "nightly")
    assert missing.exit_code == 1 and "no schedule 'nightly'" in missing.stderr


SYNC_FILE = """
[nightly-review]
cron = "0 2 * * *"
timezone = "Europe/Berlin"
prompt = "review what changed today"
cwd = "."
queue = "reviews"
max_budget_usd = 5

[weekly-bump]
every = "7d"
catch_up = "none"
prompt = "bump the dependencies"
payload = {model = "opus"}
"""


def test_a_schedule_every_30s_shows_its_due_times_to_the_second(
    invoke: Callable[..., Result],
) -> None:
    added = invoke("schedule", "add", "often", "look", "--every", "30s")
    assert added.exit_code == 0, added.output
    assert re.search(r"next run \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", added.output)
    listed = invoke("schedule", "list").output
    assert re.search(r"\d\d:\d\d:\d\d UTC", listed)
    hourly = invoke("schedule", "add", "hourly", "look", "--every", "1h").output
    assert re.search(r"next run \d{4}-\d\d-\d\d \d\d:\d\d UTC", hourly)


def test_schedule_sync(invoke: Callable[..., Result], tmp_path: Path) -> None:
    path = tmp_path / "schedules.toml"
    path.write_text(SYNC_FILE)
    first = invoke("schedule", "sync", str(path))
    assert first.stdout == "added nightly-review\nadded weekly-bump\n", first.output
    again = invoke("schedule", "sync", str(path))
    assert again.stdout == "" and "the schedules match the file" in again.stderr
    nightly = json.loads(invoke("schedule", "show", "nightly-review", "--json").stdout)
    assert nightly["payload"]["cwd"] == str(tmp_path)  # (relative to the file)
    path.write_text(SYNC_FILE.replace('cron = "0 2', 'cron = "0 3').split("[weekly-bump]")[0])
    dry = invoke("schedule", "sync", str(path), "--prune", "--dry-run")
    assert dry.stdout == "would change nightly-review (cron)\nwould remove weekly-bump\n"
    assert names(invoke) == ["nightly-review", "weekly-bump"]  # (a dry run changes nothing)
    done = invoke("schedule", "sync", str(path), "--prune")
    assert done.stdout == "changed nightly-review (cron)\nremoved weekly-bump\n"
    path.write_text('[broken]\nevery = "1h"\nprompt = "x"\ncolour = "red"\n')
    bad = invoke("schedule", "sync", str(path), "--prune")
    assert bad.exit_code == 2 and "schedule 'broken': unknown key colour" in bad.stderr
    assert names(invoke) == ["nightly-review"]  # (all or nothing)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("cron = 5", "cron must be a string, not a number"),
        ("timezone = 5", "timezone must be a string, not a number"),
        ("every = true", "every must be a number, not a boolean"),
        ('only_if_changed = "yes"', "only_if_changed must be true or false, not a string"),
        ('priority = "high"', "priority must be an integer, not a string"),
        ("max_attempts = 2.5", "max_attempts must be an integer, not a number"),
        ("queue = [1]", "queue must be a string, not an array"),
        ("timeout = [1]", "timeout must be a number, not an array"),
    ],
)
def test_a_sync_file_value_of_the_wrong_type_exits_2_saying_which(
    invoke: Callable[..., Result], tmp_path: Path, line: str, message: str
) -> None:
    timing = "" if line.startswith(("cron", "every")) else 'cron = "0 2 * * *"\n'
    path = tmp_path / "schedules.toml"
    path.write_text(f'[nightly]\nprompt = "review"\ncwd = "."\n{timing}{line}\n')
    result = invoke("schedule", "sync", str(path))
    assert result.exit_code == 2, result.output
    assert f"schedule 'nightly': {message}" in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1 and names(invoke) == []


def names(invoke: Callable[..., Result]) -> list[str]:
    listed = invoke("schedule", "list", "--json").stdout.splitlines()
    return [json.loads(line)["name"] for line in listed]


# -- workers firing ----------------------------------------------------------------------------


def test_workers_fire_each_due_time_once_and_a_worker_killed_mid_fire_leaves_no_gap(
    db_url: str, conn: psycopg.Connection, start_worker: Callable[..., Any]
) -> None:
    """Three worker processes fire a schedule due every second. One of them is killed while it
    fires (a trigger holds its transaction open at the moment it records the run): the due
    time it was firing is fired by another, once, and every second has its one run."""
    conn.execute(handlers.EXECUTIONS_TABLE)
    conn.execute(
        """CREATE FUNCTION hold_the_fire() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
               IF EXISTS (SELECT FROM pg_class WHERE relname = 'hold_fire') THEN
                   PERFORM pg_sleep(3);
               END IF;
               RETURN NEW;
           END $$;
           CREATE TRIGGER hold_the_fire BEFORE INSERT ON claude_jobs_schedule_runs
               FOR EACH ROW EXECUTE FUNCTION hold_the_fire();"""
    )
    add(conn, "tick", every=1, overlap="allow", catch_up="all")  # (a held second runs late)
    workers = [
        start_worker("--import", "handlers", "--concurrency", "2", RECORD_URL=db_url)
        for _ in range(3)
    ]
    wait_for(lambda: len(runs(conn, "tick")) >= 4, timeout=30, what="runs every second")
    conn.execute("CREATE TABLE hold_fire ()")
    held = wait_for(  # (the backend, and the worker process whose session it is)
        lambda: conn.execute(
            "SELECT a.pid, w.pid FROM pg_stat_activity a "
            "JOIN claude_jobs_workers w ON w.session_name = a.application_name "
            "WHERE a.query LIKE '%record_schedule_run%' AND a.wait_event = 'PgSleep'"
        ).fetchone(),
        timeout=15,
        what="a worker firing, held",
    )
    [victim] = [worker for worker in workers if worker.pid == held[1]]
    victim.signal(signal.SIGKILL)
    victim.wait()
    conn.execute("DROP TABLE hold_fire")
    wait_for(  # (the killed worker's session ends when it finds the client gone)
        lambda: (
            conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (held[0],)
            ).fetchone()
            == (0,)
        ),
        timeout=20,
        what="the killed worker's firing transaction to end",
    )
    count = len(runs(conn, "tick"))
    wait_for(lambda: len(runs(conn, "tick")) >= count + 3, timeout=30, what="more runs")
    for worker in workers:
        if worker is not victim:
            worker.signal(signal.SIGTERM)
    for worker in workers:
        worker.wait()
    made = runs(conn, "tick")
    due = [run["due_at"] for run in made]
    assert len(due) == len(set(due))  # each due time once
    steps = {b - a for a, b in itertools.pairwise(due)}
    assert steps == {timedelta(seconds=1)}  # and none left out
    assert all(run["outcome"] == "enqueued" and run["job_id"] for run in made)
    jobs = conn.execute(
        "SELECT count(*), count(DISTINCT scheduled_for) FROM claude_jobs WHERE schedule = 'tick'"
    ).fetchone()
    assert jobs == (len(made), len(made))
    host = socket.gethostname()
    survivors = {f"{host}:{worker.pid}" for worker in workers if worker is not victim}
    fired_after = {run["fired_by"] for run in made[count:]}
    assert fired_after and fired_after <= survivors  # (the others fired on after the kill)


def test_schedules_over_http(db_url: str, tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    body = {"name": "nightly", "payload": {"prompt": "review", "cwd": str(tmp_path)},
            "cron": "0 2 * * *", "timezone": "Europe/Berlin", "queue": "reviews"}  # fmt: skip
    with TestClient(claude_jobs.web_app(db_url), base_url=LOCAL) as client:
        added = client.post("/api/schedules", json=body)
        assert added.status_code == 201, added.text
        assert added.json()["options"]["queue"] == "reviews"
        assert client.post("/api/schedules", json=body).status_code == 409
        bad = client.post("/api/schedules", json={**body, "name": "x", "cron": "61 * * * *"})
        assert bad.status_code == 422 and "bad minute" in bad.json()["error"]
        relative = {**body, "name": "y", "payload": {"prompt": "x", "cwd": "."}}
        assert client.post("/api/schedules", json=relative).status_code == 422
        edited = client.post("/api/schedules/nightly/edit", json={"every": "6h"})
        assert edited.json()["every"] == 6 * 3600.0 and edited.json()["cron"] is None
        ran = client.post("/api/schedules/nightly/run").json()
        assert ran["schedule"] == "nightly" and ran["queue"] == "reviews"
        paused = client.post("/api/schedules/nightly/pause").json()
        assert paused["paused_at"] is not None
        [listed] = client.get("/api/schedules").json()
        assert listed["last_run"]["job_id"] == ran["id"]
        shown = client.get("/api/schedules/nightly").json()
        assert shown["runs"][0]["outcome"] == "manual"
        assert client.post("/api/schedules/nightly/remove").json() == {
            "name": "nightly", "removed": True
        }  # fmt: skip
        assert client.get("/api/schedules/nightly").status_code == 404


NIGHTLY = """
[review-shop]
cron = "0 2 * * *"
timezone = "Europe/Berlin"
prompt = "review shop"
cwd = "shop"
only_if_changed = true
batch = "nightly-review"
on_finish = {prompt = "summarise the reviews", cwd = "."}

[review-blog]
cron = "0 2 * * *"
timezone = "Europe/Berlin"
prompt = "review blog"
cwd = "blog"
only_if_changed = true
batch = "nightly-review"
on_finish = {prompt = "summarise the reviews", cwd = "."}
"""


def test_every_night_review_the_changed_repositories_then_summarise(
    invoke: Callable[..., Result],
    conn: psycopg.Connection,
    tmp_path: Path,
    start_worker: Callable[..., Any],
    claude_log: Path,
) -> None:
    """The issue's whole story: schedules from a file, one agent per repository, unchanged
    ones skipped, one batch a night whose callback summarises; nothing runs twice."""
    for name in ("shop", "blog"):
        (tmp_path / name).mkdir()
        git(tmp_path / name, "init", "-q")
        commit(tmp_path / name, "start")
    (tmp_path / "schedules.toml").write_text(NIGHTLY)
    assert invoke("schedule", "sync", str(tmp_path / "schedules.toml")).exit_code == 0
    start_worker("--concurrency", "3", "--no-schedules")

    def night() -> list[str]:  # (as if 02:00 had come: each schedule is due)
        conn.execute("UPDATE claude_jobs_schedules SET next_run_at = now() - interval '1s'")
        made = claude_jobs.fire_due_schedules(conn)
        wait_for(
            lambda: all(
                s == "succeeded"
                for (s,) in conn.execute("SELECT status FROM claude_jobs").fetchall()
            ),
            timeout=60,
            what="the night's jobs",
        )
        return sorted(job.payload["prompt"] for job in made)

    assert night() == ["review blog", "review shop"]
    [batch] = claude_jobs.list_batches(conn)
    assert batch.counts == {"succeeded": 2} and len(batch.callbacks) == 1
    summary = claude_jobs.get_job(conn, batch.callbacks[0])
    assert summary.payload["prompt"] == "summarise the reviews"
    assert night() == []  # nothing changed: both skipped, no batch, no summary
    assert len(claude_jobs.list_batches(conn)) == 1
    commit(tmp_path / "blog", "a new post")
    assert night() == ["review blog"]
    newest = claude_jobs.list_batches(conn)[0]
    assert newest.counts == {"succeeded": 1} and len(newest.callbacks) == 1
    listed = invoke("schedule", "list").stdout
    assert "review-shop" in listed and "skipped: unchanged" in listed
    runs = conn.execute("SELECT count(*), count(DISTINCT (schedule, due_at)) "
                        "FROM claude_jobs_schedule_runs").fetchone()  # fmt: skip
    assert runs == (6, 6)


def commit(repo: Path, message: str) -> None:
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty",
        "-m", message)  # fmt: skip


WITHOUT_CRONSIM = """
import logging, sys
sys.modules["cronsim"] = None  # (as on a worker installed without the schedules extra)
import claude_jobs
logging.basicConfig(level=logging.WARNING, format="%(message)s")
unfit = {}
with claude_jobs.connect(sys.argv[1], autocommit=True) as conn:
    print(len(claude_jobs.fire_due_schedules(conn, unfit=unfit)))
    print(len(claude_jobs.fire_due_schedules(conn, unfit=unfit)))
"""


def test_a_worker_without_cronsim_leaves_cron_schedules_to_others(
    db_url: str, conn: psycopg.Connection
) -> None:
    add(conn, "by-cron", cron="*/5 * * * *")
    add(conn, "every", every=60)
    set_due(conn, "by-cron", timedelta(seconds=1))
    set_due(conn, "every", timedelta(seconds=1))
    ran = subprocess.run(
        [sys.executable, "-c", WITHOUT_CRONSIM, db_url], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}, timeout=60,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["1", "0"]  # (the --every one fired; the cron one left)
    warnings = [line for line in ran.stderr.splitlines() if "cannot fire" in line]
    assert warnings == [
        "cannot fire schedule by-cron here (other workers may): cron schedules need cronsim: "
        "pip install 'claude-jobs[schedules]'"
    ]  # (said once)
    assert [job.schedule for job in claude_jobs.fire_due_schedules(conn)] == ["by-cron"]
