"""`claude-jobs mcp`: the queue as tools, tested by speaking the protocol to the real server
process over stdio with the official SDK's client."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from conftest import TESTS, job_row

import claude_jobs

mcp = pytest.importorskip("mcp")


def call_tools(db_url: str, calls: list[tuple[str, dict[str, Any]]], *args: str) -> Any:
    """Start `claude-jobs mcp ARGS` on this database, initialize, list its tools and make
    these calls; (the tool names, [(is_error, what each call answered: its data, or the
    error's text)])."""
    params = mcp.StdioServerParameters(
        command=sys.executable,
        args=["-m", "claude_jobs", "--database-url", db_url, "mcp", *args],
        env={**os.environ, "PYTHONPATH": str(TESTS.parent)},
    )

    async def talk() -> Any:
        with open(os.devnull, "w") as quiet:
            async with (
                mcp.stdio_client(params, errlog=quiet) as (read, write),
                mcp.ClientSession(read, write) as session,
            ):
                await session.initialize()
                names = {tool.name for tool in (await session.list_tools()).tools}
                answers = []
                for name, arguments in calls:
                    result = await session.call_tool(name, arguments)
                    data = result.structured_content
                    if data is not None and set(data) == {"result"}:  # (a list, a text)
                        data = data["result"]
                    answers.append((result.is_error, result.content[0].text if result.is_error
                                    else data))  # fmt: skip
                return names, answers

    return anyio.run(talk)


def test_the_tools_enqueue_list_show_wait_cancel_and_retry_jobs(
    conn: psycopg.Connection, db_url: str, tmp_path: Path
) -> None:
    job = claude_jobs.enqueue(conn, {"prompt": "already here", "cwd": str(tmp_path)})
    calls = [
        ("enqueue", {"prompt": "review the parser", "cwd": str(tmp_path), "queue": "agents",
                     "checks": ["make test"], "priority": 3}),
        ("list_jobs", {"status": "queued"}),
        ("get_job", {"id": str(job.id)[:8]}),
        ("wait_for_jobs", {"ids": [str(job.id)], "timeout": 0.5}),
        ("cancel_job", {"id": str(job.id)}),
        ("wait_for_jobs", {"ids": [str(job.id)], "timeout": 5}),
        ("retry_job", {"id": str(job.id)}),
        ("job_logs", {"id": str(job.id)}),
        ("stats", {}),
    ]  # fmt: skip
    names, answers = call_tools(db_url, calls)
    assert names == {"enqueue", "list_jobs", "get_job", "wait_for_jobs", "cancel_job",
                     "retry_job", "job_logs", "stats"}  # fmt: skip
    assert not any(is_error for is_error, _ in answers), answers
    made = answers[0][1]
    row = job_row(conn, made["id"])
    assert (row["queue"], row["priority"], row["payload"]["checks"]) == ("agents", 3, ["make test"])
    assert made["status"] == "queued" and made["why"]
    assert {each["id"] for each in answers[1][1]} == {made["id"], str(job.id)}
    assert answers[2][1]["prompt"] == "already here"
    assert answers[3][1] == {"finished": False, "jobs": {str(job.id): "queued"}}
    assert answers[4][1]["status"] == "cancelled"
    assert answers[5][1] == {"finished": True, "jobs": {str(job.id): "cancelled"}}
    assert answers[6][1]["retried"] is True
    assert job_row(conn, job.id)["status"] == "queued"
    assert answers[7][1] == "(no transcript yet)"
    assert {each["queue"] for each in answers[8][1]} >= {"default", "agents"}


def test_limits_and_bad_input_are_tool_errors_with_a_clear_message(
    conn: psycopg.Connection, db_url: str, tmp_path: Path
) -> None:
    inside = tmp_path / "inside"
    inside.mkdir()
    calls = [
        ("enqueue", {"prompt": "p", "cwd": str(inside), "queue": "elsewhere"}),
        ("enqueue", {"prompt": "p", "cwd": str(tmp_path), "queue": "agents"}),
        ("enqueue", {"prompt": "p", "cwd": "relative/dir", "queue": "agents"}),
        ("enqueue", {"prompt": "", "cwd": str(inside), "queue": "agents"}),
        ("get_job", {"id": "0123456789abcdef"}),
        ("list_jobs", {"status": "sleeping"}),
        ("enqueue", {"prompt": "p", "cwd": str(inside), "queue": "agents"}),
    ]
    _, answers = call_tools(db_url, calls, "--queue", "agents", "--cwd-under", str(inside))
    said = [text for _, text in answers]
    assert [is_error for is_error, _ in answers] == [True] * 6 + [False]
    assert "this server enqueues only to agents, not elsewhere" in said[0]
    assert f"is outside what this server allows: {inside}" in said[1]
    assert "cwd must be an absolute path" in said[2]
    assert 'a claude job needs "prompt": a non-empty string' in said[3]
    assert "no job" in said[4]
    assert "status must be one of" in said[5]
    assert conn.execute("SELECT count(*) FROM claude_jobs").fetchone() == (1,)
    names, answers = call_tools(db_url, [("enqueue", {"prompt": "p", "cwd": str(inside)})],
                                "--read-only")  # fmt: skip
    assert names == {"list_jobs", "get_job", "wait_for_jobs", "job_logs", "stats"}
    assert answers[0][0] is True and "enqueue" in answers[0][1]
