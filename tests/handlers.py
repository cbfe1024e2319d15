"""Python job kinds for the tests' worker processes (`claude-jobs worker --import handlers`)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import psycopg

import claude_jobs

_local = threading.local()


def _connection() -> psycopg.Connection:
    if getattr(_local, "conn", None) is None or _local.conn.closed:
        _local.conn = psycopg.connect(os.environ["RECORD_URL"], autocommit=True)
    return _local.conn


@claude_jobs.handler("record")
def record(job: claude_jobs.Job) -> dict[str, Any]:
    """Record this execution in the `executions` table, then sleep as the payload says."""
    _connection().execute(
        "INSERT INTO executions (job_id, pid) VALUES (%s, %s)", (job.id, os.getpid())
    )
    deadline = time.monotonic() + job.payload.get("sleep", 0)
    while time.monotonic() < deadline and not (job.context and job.context.stop.is_set()):
        time.sleep(0.01)
    return {"pid": os.getpid()}


EXECUTIONS_TABLE = """
CREATE TABLE IF NOT EXISTS executions (
    job_id uuid NOT NULL, pid integer NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""
