"""Python job kinds for the tests' worker processes (`claude-jobs worker --import handlers`)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import psycopg

import claude_jobs

_local = threading.local()

EXECUTIONS_TABLE = """
CREATE TABLE IF NOT EXISTS executions (
    job_id    uuid NOT NULL,
    attempt   integer NOT NULL,
    pid       integer NOT NULL,
    started   timestamptz NOT NULL,
    finished  timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


def _connection() -> psycopg.Connection:
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed or conn.broken:
        _local.conn = conn = psycopg.connect(os.environ["RECORD_URL"], autocommit=True)
    return conn


@claude_jobs.handler("record")
def record(job: claude_jobs.Job) -> dict[str, Any]:
    """Sleep as the payload says (`sleep`, or `sleep_first` on the first attempt only), then
    record this execution in the `executions` table, with when it started."""
    started = time.time()
    pause = job.payload.get("sleep", 0) + (
        job.payload.get("sleep_first", 0) if job.attempts == 1 else 0
    )
    deadline = time.monotonic() + pause
    while time.monotonic() < deadline and not (job.context and job.context.stop.is_set()):
        time.sleep(0.01)
    if job.context and job.context.stop.is_set():
        raise claude_jobs.JobFailed("stopped")
    _connection().execute(
        "INSERT INTO executions (job_id, attempt, pid, started) "
        "VALUES (%s, %s, %s, to_timestamp(%s))",
        (job.id, job.attempts, os.getpid(), started),
    )
    return {"pid": os.getpid()}
