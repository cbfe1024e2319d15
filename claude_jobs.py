"""claude-jobs: a durable job queue on PostgreSQL for unattended Claude Code runs.

Queue prompts for the Claude Code CLI (``claude -p``) and let workers, on one machine or many,
run them from one PostgreSQL database. Workers claim jobs with ``FOR UPDATE SKIP LOCKED``, wake
on LISTEN/NOTIFY, hold a session advisory lock for as long as they live so that a dead worker's
jobs go back to the queue within seconds, retry failed attempts with exponential backoff, and
fence every update on the claim they hold. Python code can register its own job kinds.

Quick start (with no DATABASE_URL, an embedded PostgreSQL is kept in CLAUDE_JOBS_HOME)::

    claude-jobs enqueue --payload '{"prompt": "explain this code", "cwd": "."}'
    claude-jobs worker --burst
    claude-jobs show <job id>

From Python::

    import psycopg, claude_jobs

    with psycopg.connect(url) as conn:      # the job commits with the caller's transaction
        claude_jobs.enqueue(conn, {"prompt": "fix the failing test", "cwd": "/src/app"})

    @claude_jobs.handler("resize")
    def resize(job: claude_jobs.Job) -> dict:
        return {"done": job.payload["path"]}

    claude_jobs.Worker(url, queues=["high", "default"]).run()

Environment: DATABASE_URL (or CLAUDE_JOBS_DATABASE_URL), CLAUDE_JOBS_HOME, and a CLAUDE_JOBS_*
variable for every command-line option (``claude-jobs COMMAND --help`` names each one).

Map of the module: its sections, top to bottom. Data flows down the page: a section uses what
stands above it, never what stands below (but the assets, last of all).

    Constants and defaults     the numbers that tune it, each saying why
    Exceptions                 JobsError and the few below it; what a handler may raise
    Data model                 Job, JobStatus, Schedule, Batch; Verdict, Outcome, Spend and
                               Progress (what the worker's parts hand each other); how values
                               are stored and how they read to people
    Schema                     MIGRATIONS: every schema change, in order (``migrate``)
    Queries                    every SQL statement, named in capitals, each with its purpose
    Database helpers           connect, mask a URL, migrate, the embedded PostgreSQL,
                               transactions, how a worker's connections are set up
    Statements                 ``_db_*``: one small typed function per statement the worker
                               runs, the only place its parameters are built; RECORD's rows
    Handler registry           @handler: the Python job kinds
    Git                        what worktree jobs need of git; remotes on GitHub
    Queue API: options and payloads    JobOptions, a claude payload's keys and their checks
    Queue API: reading and explaining  get, list, stats, workers; why a job waits; follow one
    Queue API: enqueue, batches...     enqueue, enqueue_many, batches, unique keys
    Queue API: operations              cancel, retry, holds, run now, pause, cleanup, purge
    Queue API: worktrees               diff, list and prune the worktrees jobs left
    Queue API: delivery                push a branch, open its pull request (GitHub's REST
                                       API), look at it now and then
    Queue API: review                  what needs people ("Needs you"): a worktree job's
                                       diff by file; reply, discard, mark seen
    Queue API: notifications           what --notify sends (Standard Webhooks, Slack,
                                       Discord), tried again until delivered
    Queue API: schedules               add, edit, fire (the due-time arithmetic is _Timing)
    Execution: what an attempt came to   decide (a pure function), and what a claude exit
                                         means (claude_outcome); the run context
    Execution: the claude handler      its supervisor, claude's flags, worktrees, checks
                                       and their rounds of repair (_Checks); ClaudeHandler,
                                       ClaudePolicy, ClaudeSettings
    Worker: what its parts share       _Shared (all a part may touch): the book, the holds,
                                       the pulse, stop and force; the writer; _Session
    Worker: the dispatcher, ...        _Dispatcher, _Runners, _Watchdog, _Janitor,
                                       _Scheduler, the health server; WorkerSettings, Worker
    Logging                    configure_logging (the command line's: the library never does)
    Presentation               how jobs and transcripts read to people (the command line,
                               the dashboard)
    HTTP                       web_app: the dashboard, the JSON API, /metrics, health checks
    MCP                        mcp_server: the queue's tools for MCP clients (claude-jobs mcp)
    Command line (4 sections)  the click commands, each a few lines over the public API:
                               the group and enqueue; schedules and batches; worker and serve;
                               seeing and steering jobs
    Assets                     long texts kept out of the way: the supervisor's script, the
                               dashboard's page

Read these first, about a thousand lines that carry a job from ``enqueue`` to its outcome, in
this order: Job (data model); ENQUEUE, CLAIM and RECORD (queries); ``enqueue`` (enqueue,
batches...); ``decide`` and ``claude_outcome`` (execution); ClaudeHandler; _Dispatcher.round
and _Runners._run (worker); Worker.

The worker's parts, each with one job, and the thread it runs on:

    _Dispatcher   the thread that calls Worker.run(): rounds that record what finished and
                  claim for the free runners, in one pipeline (see _Writer); reconciles
    _Runners      "claude-jobs-job-N": run one handler at a time each, decide its Outcome
    _Session      "claude-jobs-session": advisory lock (the lease), LISTEN, heartbeat,
                  recovery of dead workers' jobs
    _Watchdog     "claude-jobs-watchdog": fences the lease when heartbeats stop getting through
    _Janitor      "claude-jobs-janitor": unblocks jobs races left blocked; deletes old jobs;
                  keeps the planner's statistics true to the backlog; looks at open pull
                  requests
    _Notifier     "claude-jobs-notifier": sends the due notifications (--notify)
    _Scheduler    "claude-jobs-scheduler": fires due schedules, each due time once
    _Shared       what those parts share, handed to each (its constructor shows what it may
                  touch): settings, the book, the holds and the pulse (each behind its own
                  lock), the stop and force events, hold a kind here, fence the lease

The path of a job: ``enqueue`` inserts it (``blocked`` when it waits for another job or a busy
concurrency key) and NOTIFYs; a dispatcher's round claims it (CLAIM: ``FOR UPDATE SKIP
LOCKED``, a fresh claim token) and hands it to a runner; the handler runs (claude under its
supervisor); ``decide`` turns what it returned or raised into an Outcome; the next round
writes it (RECORD, fenced on the claim token) and, in the same transaction, unblocks the jobs
that waited for it (UNBLOCK). A worker that dies leaves its lock free: another worker's
session puts its jobs back (REAP_WORKER, RECOVER_JOBS_OF).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import dataclasses
import enum
import functools
import gc
import hashlib
import heapq
import hmac
import http.client
import importlib
import ipaddress
import itertools
import json
import logging
import math
import os
import queue as queue_module
import random
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
import typing
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
import zoneinfo
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar, Unpack

import click
import psycopg
import psycopg.conninfo
import psycopg.errors
import psycopg.sql
from psycopg.rows import dict_row

if TYPE_CHECKING:  # (imported where a worker starts: the other commands start sooner)
    from psycopg_pool import ConnectionPool

__all__ = [
    "CLAUDE_PAYLOAD",
    "FINISHED_STATUSES",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Batch",
    "ClaudeHandler",
    "ClaudeSettings",
    "ConfigError",
    "DatabaseUnavailable",
    "DeliveryError",
    "Enqueued",
    "InvalidJob",
    "Job",
    "JobFailed",
    "JobFilter",
    "JobNotFound",
    "JobOptions",
    "JobSettings",
    "JobStatus",
    "JobsError",
    "Lifted",
    "McpLimits",
    "NotFound",
    "PermanentError",
    "Postpone",
    "RunContext",
    "Schedule",
    "SchemaError",
    "Spend",
    "UsageLimitReached",
    "Waiting",
    "Worker",
    "WorkerNotFound",
    "WorkerSettings",
    "WorkerUnfit",
    "add_schedule",
    "backoff_delay",
    "batch_results",
    "bulk_action",
    "cancel_batch",
    "cancel_job",
    "cancel_jobs",
    "check_conninfo",
    "check_queue",
    "check_schema",
    "claude_outcome",
    "cleanup_jobs",
    "cli",
    "configure_logging",
    "connect",
    "cost_stats",
    "count_matching",
    "default_handlers",
    "default_home",
    "deliver",
    "diff_files",
    "discard",
    "drain_worker",
    "edit_schedule",
    "enqueue",
    "enqueue_many",
    "explain_jobs",
    "fire_due_schedules",
    "fold_counts",
    "follow_job",
    "get_batch",
    "get_job",
    "get_schedule",
    "github_api_url",
    "github_token",
    "handler",
    "job_branch",
    "job_counts",
    "job_statuses",
    "job_update",
    "lift_hold",
    "list_batches",
    "list_holds",
    "list_jobs",
    "list_notifications",
    "list_schedules",
    "list_workers",
    "list_worktrees",
    "main",
    "mark_reviewed",
    "mask_url",
    "mcp_server",
    "migrate",
    "needs_you",
    "notification_counts",
    "parse_duration",
    "parse_time",
    "pause_kind",
    "pause_queue",
    "pause_schedule",
    "prepare_payload",
    "prune_worktrees",
    "purge_queue",
    "queue_known",
    "queue_stats",
    "registered_kinds",
    "remove_schedule",
    "reply",
    "reschedule",
    "resolve_batch",
    "resolve_job_id",
    "resume_queue",
    "resume_schedule",
    "retry_batch",
    "retry_jobs",
    "retry_notification",
    "run_now",
    "run_schedule",
    "run_times",
    "schedule_runs",
    "schema_sql",
    "schema_version",
    "send_due_notifications",
    "set_priority",
    "set_public_url",
    "start_embedded",
    "sync_schedules",
    "tag_counts",
    "timeline",
    "track_pull_requests",
    "worktree_diff",
]

logger = logging.getLogger(__name__)


###############################################################################
# Constants and defaults
###############################################################################

NOTIFY_CHANNEL = "claude_jobs"  # new jobs (payload: queue and when ready), and cancels
OUTPUT_CHANNEL = "claude_jobs_output"  # a job's transcript grew, or it moved on (payload: id)
#: First key of every advisory lock we take ("cjob"); the second key is 0 for
#: migrations and a worker's lock_key otherwise.
LOCK_NAMESPACE = 0x636A6F62
#: First key of the lock of a concurrency key ("ckey"); the second, its hash.
KEY_LOCK_NAMESPACE = 0x636B6579
#: First key of the lock enqueue_many takes on a unique key ("cunq"); the second, its hash.
UNIQUE_LOCK_NAMESPACE = 0x63756E71
#: First key of the lock on a worktree, taken by what continues a job in it and by discard
#: ("cwtr"); the second, its path's hash.
WORKTREE_LOCK_NAMESPACE = 0x63777472
#: First key of the lock of a limiter: a limited queue or the claude starts ("clim"); the
#: second, the hash of its name in claude_jobs_starts ('queue NAME', 'kind claude').
LIMITER_LOCK_NAMESPACE = 0x636C696D
MIGRATION_LOCK_KEY = 0
#: Second keys of the locks that let one worker at a time do a task.
CLEANUP_TASK, UNBLOCK_TASK, FOLD_TASK, ANALYZE_TASK, TRACK_TASK = -1, -2, -3, -4, -5

DEFAULT_QUEUE = "default"
DEFAULT_KIND = "claude"
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_CONCURRENCY = 5
DEFAULT_POLL_INTERVAL = 5.0
DEFAULT_HEARTBEAT_TIMEOUT = 60.0
DEFAULT_BACKOFF_BASE = 5.0
DEFAULT_BACKOFF_MAX = 300.0
DEFAULT_CLAUDE_TIMEOUT = 3600.0
DEFAULT_CLAUDE_BIN = "claude"
DEFAULT_RETENTION = 14 * 86400.0  # workers delete succeeded and cancelled jobs older than this
#: What a batch's claude callback is told after its prompt: where the batch's outcome is.
BATCH_RESULTS_NOTE = (
    "\n\n(claude-jobs: what each job of the batch came to is in {path}, one JSON object a "
    "line with its id, status, prompt, result, cost_usd and error.)"
)
#: A worker unfit for claude jobs (not logged in, no credit...) starts none for this long,
#: doubling while it stays unfit, up to the second figure.
UNFIT_BACKOFF = (300.0, 3600.0)
#: A back-off older than this that the worker's row no longer shows was lifted (`resume
#: --hold`): the worker tries again, even if it missed the notice.
LIFT_SEEN_AFTER = 5.0
#: How often a worker looks for jobs past the retention (one worker at a time deletes), and
#: how soon after it starts.
JANITOR_INTERVAL = 300.0
JANITOR_FIRST_PASS = 10.0
#: How often a worker compares the backlog with what the planner's statistics say of it; it
#: analyzes the jobs table (one worker at a time) when there are ANALYZE_GROWTH times as many
#: unfinished jobs as the statistics say, and at least ANALYZE_MIN_JOBS.
STATISTICS_INTERVAL = 2.0
ANALYZE_GROWTH = 10.0
ANALYZE_MIN_JOBS = 1000
#: A part of a worker (its scheduler, janitor...) that fails this many passes in a row is
#: reported as failing: `workers` says so, and its /readyz answers 503.
FAILING_PASSES = 5

#: Workers look for due schedules this often.
SCHEDULE_INTERVAL = 1.0
#: A due time is missed (a catch-up policy applies) once it is older than this; under it, it
#: is only late (the database was away a while, the workers were restarting).
SCHEDULE_GRACE = 300.0
#: The most runs `--catch-up all` makes at once, for the latest missed due times.
CATCH_UP_LIMIT = 100
#: How far a catch-up counts missed due times of a cron schedule (it says "at least" beyond).
MISSED_COUNT_LIMIT = 10_000
CATCH_UPS = ("latest", "all", "none")
OVERLAPS = ("skip", "queue", "allow")

#: A worker writes its heartbeat this often, on the connection that holds its lock.
HEARTBEAT_INTERVAL = 1.0
#: A worker whose lock is free and whose heartbeat is older than this is dead:
#: its running jobs go back to the queue. Crash recovery takes at most about
#: LOCK_GRACE + SWEEP_INTERVAL.
LOCK_GRACE = 5.0
#: How often each worker looks for dead workers.
SWEEP_INTERVAL = 1.0
#: `workers` lists a worker found dead (and when, and the jobs of it that went back) this long.
LOST_WORKERS_KEPT = 3600.0

#: How often a worker looks for blocked jobs that may run (what ends jobs unblocks those that
#: waited for them; this finds those that two transactions at once each left to the other).
UNBLOCK_CHECK_INTERVAL = 10.0
#: A worker stops its own jobs this long before others may take them over.
FENCE_MARGIN = 2.0
#: A worker that lost its lease waits at most this long for the outcomes that finished under
#: it to be recorded (the database has just come back), before it puts back the rest.
LEAVE_FLUSH_TIMEOUT = 15.0
#: After SIGTERM to the processes of a claude attempt, SIGKILL follows after this long.
KILL_GRACE = 10.0
#: The same on a forced shutdown (the second signal), where waiting is unwelcome.
FORCED_KILL_GRACE = 3.0
#: Keep this much of a claude transcript (the tail) on the job.
TRANSCRIPT_LIMIT = 1024 * 1024
#: Keep this much of one line of claude's output in the transcript (the rest is cut).
TRANSCRIPT_LINE_LIMIT = 64 * 1024
#: Read at most this much of one line of claude's output (to parse it); the rest is dropped.
MAX_OUTPUT_LINE = 16 * 1024 * 1024
#: Flush a running job's transcript to the database at most this often.
TRANSCRIPT_FLUSH_INTERVAL = 0.5
#: Write at most this many outcomes in one statement.
RECORD_BATCH = 500
#: A worker claims jobs ahead of its runners (at most as many again as its concurrency) while
#: the attempts it ran lately took less than this on average, so that quick jobs never wait
#: for a round trip; other jobs are claimed only for a free runner (a job waiting for a runner
#: is kept from the other workers, and a long one would keep it long).
CLAIM_AHEAD_BELOW = 0.05
#: A job claimed ahead that no runner started within this long goes back to the queue unspent
#: (the runners turned to longer jobs).
CLAIM_AHEAD_WAIT = 1.0
#: Keep this much of the output of one check in one round (the tail: it is what claude is
#: shown to repair a failure, and what `show` quotes).
CHECK_OUTPUT_LIMIT = 64 * 1024
#: Rounds of repair after a check fails, unless the job says (0: none).
DEFAULT_CHECK_ROUNDS = 2
#: A pull request's title is claude's first line of result cut here (GitHub shows ~72).
PR_TITLE_LIMIT = 72
#: GitHub's REST API, unless GITHUB_API_URL names another (GitHub Enterprise, a test's mock).
GITHUB_API_URL = "https://api.github.com"
#: Waits between tries of a GitHub request that failed for a while (5xx, a rate limit).
GITHUB_RETRY_DELAYS = (1.0, 3.0, 9.0)
#: The longest a Retry-After from GitHub is waited for within a delivery.
GITHUB_RETRY_AFTER_LIMIT = 60.0
#: Each GitHub request gives up after this long.
GITHUB_TIMEOUT = 20.0
#: Open pull requests are looked at this often (workers, one at a time; conditional
#: requests, so an unchanged answer costs no rate limit).
DEFAULT_PR_POLL_INTERVAL = 180.0
#: At most this many pull requests are looked at in one pass, for at most this long.
PR_POLL_BATCH = 50
PR_POLL_BUDGET = 60.0
#: What --notify can be told of (all of it, unless --notify-on says): the ends of jobs and
#: batches (`finished` names them all in --notify-on), and what needs people (`attention`).
NOTIFY_GROUPS = {
    "finished": ("job.succeeded", "job.failed", "job.cancelled", "batch.finished"),
    "attention": ("job.needs_attention", "worker.unfit", "hold.started", "hold.ended"),
}
NOTIFY_EVENTS = NOTIFY_GROUPS["finished"] + NOTIFY_GROUPS["attention"]
#: A notification not delivered after this long is abandoned (retried until then).
NOTIFY_GIVE_UP = 24 * 3600.0
#: Its first retry comes after this long, each next one after twice as long, up to the max.
NOTIFY_RETRY_FIRST, NOTIFY_RETRY_MAX = 5.0, 3600.0
#: A receiver gets this long to answer; a send is leased this long (a worker that dies while
#: sending leaves it to be sent again after that).
NOTIFY_TIMEOUT, NOTIFY_LEASE = 10.0, 60.0
#: Workers look for notifications to send this often.
NOTIFY_INTERVAL = 1.0
#: What a job's pull request may be, as last looked at.
PR_STATES = ("open", "merged", "closed", "gone")

PG_INT_MIN, PG_INT_MAX = -(2**31), 2**31 - 1
#: The longest concurrency or unique key (indexed: PostgreSQL's B-trees take about 2.7 kB a row).
MAX_KEY_BYTES = 1024
#: A tag (enqueue --tag) is at most this many characters.
MAX_TAG = 100
#: The longest duration anything accepts (ten years).
MAX_DURATION = 10 * 365 * 86400.0

#: How the error of a job that met a usage limit begins.
USAGE_LIMIT_NOTE = "claude's usage limit: "
#: How the reason a worker starts no claude job begins when its daily budget is spent.
BUDGET_NOTE = "the daily budget of "
#: How the reason of a hold of --leave-headroom begins (claude warned of a window's end).
HEADROOM_NOTE = "headroom for people: "
#: How the reason a worker starts no claude job begins when its --max-starts are used up.
MAX_STARTS_NOTE = "its cap on claude starts: "
#: The limiter of claude starts in claude_jobs_starts (a worker's --max-starts counts them).
CLAUDE_LIMITER = f"kind {DEFAULT_KIND}"
#: The seconds of a bucket of claude starts (claude_jobs_starts): a worker's --max-starts
#: counts a start as long as any of its bucket is in the window (at most this much longer).
CLAUDE_START_BUCKET = 1.0
#: The longest window of a rate (queue set --rate, worker --max-starts): the janitor keeps
#: the starts of that long.
MAX_RATE_SECONDS = 7 * 86400.0
#: claude's arguments on every run; the options of the job and the worker follow (and
#: SKIP_PERMISSIONS, unless they give a permission mode).
CLAUDE_ARGS = (
    "-p",
    "--output-format",
    "stream-json",
    "--verbose",
)
SKIP_PERMISSIONS = "--dangerously-skip-permissions"


###############################################################################
# Exceptions
###############################################################################


class JobsError(Exception):
    """claude-jobs failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(JobsError):
    """The configuration is not usable."""


class InvalidJob(JobsError):
    """The job's options or payload are not valid; nothing was enqueued. From enqueue_many:
    ``position`` is the payload's (1-based) and ``detail`` what is wrong with it."""

    def __init__(self, message: str, *, position: int | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.position = position
        self.detail = detail or message


class SchemaError(JobsError):
    """The database has no claude-jobs schema, or an older one: run `claude-jobs migrate`."""


class DatabaseUnavailable(JobsError):
    """The database cannot be reached."""


class NotFound(JobsError):
    """No such thing."""


class JobNotFound(NotFound):
    """No such job."""


class WorkerNotFound(NotFound):
    """No such worker."""


class WrongState(JobsError):
    """The job is not in a state that allows this; nothing was changed."""


class JobFailed(JobsError):
    """The attempt failed; the job is retried while it has attempts left.

    ``result``, when given, is stored on the job (the claude handler stores the CLI's
    result object, so a failed run still shows what claude said and what it cost).
    """

    def __init__(self, message: str | None = None, *, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


class PermanentError(JobFailed):
    """The job cannot succeed: it fails at once, without further attempts."""


class Postpone(JobsError):
    """The job cannot run now, through no fault of its own: it goes back to the queue without
    spending the attempt, to run at ``run_at`` (default: at once)."""

    def __init__(
        self, message: str | None = None, *, run_at: datetime | None = None, result: Any = None
    ) -> None:
        super().__init__(message)
        self.run_at = run_at
        self.result = result


class UsageLimitReached(Postpone):
    """claude's subscription usage limit was reached: no worker starts a claude job before it
    resets (``run_at``), and this one runs again then."""


class WorkerUnfit(Postpone):
    """This worker cannot run claude jobs (claude is not logged in, or has no credit, or is
    missing...): the job goes back to the queue and the worker stops taking claude jobs for a
    while."""


class _Interrupted(Exception):
    """The attempt was stopped from outside (shutdown, or the claim was lost)."""


###############################################################################
# Data model
###############################################################################


class JobStatus(enum.StrEnum):
    QUEUED = "queued"  # ready, or waiting for run_at
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # attempts exhausted, or a permanent error
    CANCELLED = "cancelled"


FINISHED_STATUSES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass(frozen=True)
class Job:
    """One row of ``claude_jobs``. Handlers receive it, with ``context`` set."""

    id: uuid.UUID
    queue: str
    kind: str
    priority: int
    payload: dict[str, Any]
    status: JobStatus
    run_at: datetime
    attempts: int
    max_attempts: int
    timeout: float | None
    last_error: str | None
    errors: list[dict[str, Any]]
    worker_id: uuid.UUID | None
    worker: str | None
    result: Any
    session_id: str | None
    cost_usd: float
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    cancel_requested_at: datetime | None = None
    concurrency_key: str | None = None
    concurrency_limit: int = 1
    after: list[uuid.UUID] | None = None
    continue_from: uuid.UUID | None = None
    session_host: str | None = None  # the host whose claude keeps the session (to resume it)
    worktree: dict[str, Any] | None = None
    widens: list[str] | None = None  # what a continuation may do that its job could not
    resumes: dict[str, Any] | None = None  # claimed continuations: what they continue
    checks: dict[str, Any] | None = None  # its checks: the round, and each one's results
    delivery: dict[str, Any] | None = None  # its branch pushed, its pull request (see deliver)
    notify: dict[str, Any] | None = None  # whom it tells when it ends, of what (see --notify)
    reviewed_at: datetime | None = None  # replied to, delivered, discarded or marked seen
    tags: list[str] | None = None  # its labels (enqueue --tag)
    transcript: str | None = None
    transcript_size: int = 0  # characters ever written to the transcript (it keeps the tail)
    unique_key: str | None = None  # no second job of the key while this one is unfinished
    schedule: str | None = None  # the schedule that made it, and for which due time
    scheduled_for: datetime | None = None
    batch_id: uuid.UUID | None = None  # the batch it belongs to
    callback_of: uuid.UUID | None = None  # the batch it is a callback of
    duplicate: bool = False  # enqueue made no job: this one, queued before, holds its unique key
    seq: int = 0  # enqueue order (of jobs enqueued at one time: created_at is the same)
    claim: uuid.UUID | None = field(default=None, repr=False)
    context: RunContext | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_row(cls, row: Mapping[str, Any], context: RunContext | None = None) -> Job:
        values: dict[str, Any] = dict.fromkeys(_JOB_FIELDS)
        values.update((name, row[name]) for name in row.keys() & values.keys())
        values["status"] = JobStatus(values["status"])
        values["cost_usd"] = float(values["cost_usd"] or 0)
        values["transcript_size"] = values["transcript_size"] or 0
        values["duplicate"] = bool(values["duplicate"])
        values["seq"] = values["seq"] or 0
        if values["concurrency_limit"] is None:
            values["concurrency_limit"] = 1
        return cls(**values, context=context)

    @property
    def awaits(self) -> list[uuid.UUID]:
        """The jobs it waits for (``after``), then the one it continues."""
        return [*(self.after or ()), *([self.continue_from] if self.continue_from else ())]

    def to_dict(self) -> dict[str, Any]:
        """The job as JSON-able values (ISO 8601 times, string ids)."""
        return _fields_of(self, skip={"claim", "context"})


_JOB_FIELDS = tuple(f.name for f in dataclasses.fields(Job) if f.name != "context")


def _fields_of(value: Any, skip: Collection[str] = ()) -> dict[str, Any]:
    """The fields of a dataclass instance as JSON-able values, but those in ``skip``."""
    return {
        f.name: _jsonable(getattr(value, f.name))
        for f in dataclasses.fields(value)
        if f.name not in skip
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _storable(value: Any) -> Any:
    """``value`` with what PostgreSQL cannot store in text or jsonb (NUL characters, unpaired
    surrogates) replaced."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {_storable(k): _storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_storable(v) for v in value]
    return value


def _to_json(value: Any) -> str:
    """A handler's result as JSON text PostgreSQL accepts; ValueError when there is none."""
    try:
        return json.dumps(_storable(value), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as error:
        raise ValueError(f"the handler's result is not JSON: {error}") from None


def _no_constant(name: str) -> Any:
    """json.loads takes NaN and Infinity by default; JSON has no such numbers."""
    raise InvalidJob(f"{name} is not a JSON number")


# -- how values read to people --------------------------------------------------------------


def _json_type(value: Any) -> str:
    """What kind of JSON value ``value`` is, as a message says it: an object, null..."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


def _duration_text(seconds: float) -> str:
    """``seconds`` as people say it: 45s, 12m, 1h30m, 3h, 14d (the next unit down too, while
    the first is a single digit)."""
    whole = round(seconds)
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    for (unit, size), (smaller, small_size) in itertools.pairwise(units):
        if whole >= size:
            count, rest = divmod(whole, size)
            if count >= 10 or rest < small_size:
                return f"{round(whole / size)}{unit}"
            return f"{count}{unit}{rest // small_size}{smaller}"
    return f"{whole}s"


def _ago(moment: datetime | None, now: datetime | None = None) -> str:
    """``moment`` relative to now: 45s ago, 3m ago, in 2h."""
    if moment is None:
        return "-"
    seconds = ((now or datetime.now(UTC)) - moment).total_seconds()
    text = _duration_text(abs(seconds))
    return f"in {text}" if seconds < -0.5 else f"{text} ago"


def _cut(text: str, limit: int) -> str:
    """``text``, or its first ``limit`` characters and how many more there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]} … ({len(text) - limit:,} more characters not kept)"


def _money(amount: float) -> str:
    """An amount of US dollars as people read it: to the cent, and below one cent to four
    significant digits (``$0.0002350``, not ``$0.00``)."""
    if amount == 0 or abs(amount) >= 0.01:
        return f"${amount:,.2f}"
    decimals = 3 - math.floor(math.log10(abs(amount)))
    return f"${amount:.{decimals}f}"


@dataclass(frozen=True)
class Schedule:
    """One row of ``claude_jobs_schedules``: a job made again and again, at the times of a
    cron expression (in ``timezone``) or ``every`` so many seconds. ``payload`` and
    ``options`` (queue, priority... : JobSettings) make each run, an ordinary job that
    records the schedule's name and its due time. ``last_run``: the latest run (due_at,
    job_id, outcome, note, status of its job), where read with it."""

    name: str
    cron: str | None
    every: float | None
    timezone: str
    kind: str
    payload: dict[str, Any]
    options: dict[str, Any]
    catch_up: str
    overlap: str
    only_if_changed: bool
    good_head: str | None  # --only-if-changed: the commit at its latest successful run
    next_run_at: datetime
    paused_at: datetime | None
    created_at: datetime
    updated_at: datetime
    last_run: dict[str, Any] | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Schedule:
        values: dict[str, Any] = {f.name: row.get(f.name) for f in dataclasses.fields(cls)}
        if last := values["last_run"]:  # (as JSON: text for the time and the id)
            values["last_run"] = {
                **last,
                "due_at": datetime.fromisoformat(last["due_at"]),
                "job_id": last["job_id"] and uuid.UUID(last["job_id"]),
            }
        return cls(**values)

    @property
    def when(self) -> str:
        """When it runs, as people write it: ``cron 0 2 * * *`` or ``every 30m``."""
        return f"cron {self.cron}" if self.cron else f"every {_duration_text(self.every or 0)}"

    def to_dict(self) -> dict[str, Any]:
        return _fields_of(self)


@dataclass(frozen=True)
class Batch:
    """A batch of jobs (``claude_jobs_batches``) and its progress: how many of its jobs are in
    each status (``counts``), what they cost, when the first started and the last ended, and
    the callbacks it queued when it finished."""

    id: uuid.UUID
    name: str
    created_at: datetime
    finished_at: datetime | None
    on_finish: dict[str, Any] | None
    on_success: dict[str, Any] | None
    counts: dict[str, int]
    cost_usd: float
    started_at: datetime | None
    ended_at: datetime | None
    callbacks: list[uuid.UUID]
    purged: int  # its jobs deleted before they ended (purge)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Batch:
        values: dict[str, Any] = {f.name: row.get(f.name) for f in dataclasses.fields(cls)}
        values["counts"] = {k: int(v) for k, v in (values["counts"] or {}).items()}
        values["cost_usd"] = float(values["cost_usd"] or 0)
        values["callbacks"] = list(values["callbacks"] or ())
        return cls(**values)

    @property
    def jobs(self) -> int:
        return sum(self.counts.values())

    @property
    def ended(self) -> int:
        """Its jobs that have ended (succeeded, failed or were cancelled)."""
        return sum(self.counts.get(status, 0) for status in FINISHED_STATUSES)

    def to_dict(self) -> dict[str, Any]:
        return {**_fields_of(self), "jobs": self.jobs, "ended": self.ended}


class Verdict(enum.StrEnum):
    """What an attempt came to (see decide)."""

    SUCCEEDED = "succeeded"  # the handler returned: its result is stored
    FAILED = "failed"  # retried after `delay` while attempts remain and it is not permanent
    RELEASED = "released"  # back to the queue unspent, to run at `run_at` (None: now)
    CANCELLED = "cancelled"  # `cancel` stopped it
    ABANDONED = "abandoned"  # the claim is gone: nothing is written, another worker may run it


class Effect(enum.StrEnum):
    """What an attempt's outcome does to the worker, besides to the job (see decide)."""

    FIT = "fit"  # the kind ran here: the worker can run it (a back-off from it ends)
    BACK_OFF = "back off"  # the worker cannot run the kind: it starts none for a while
    HOLD_EVERYWHERE = "hold everywhere"  # a usage limit: no worker starts the kind until `until`


@dataclass(frozen=True)
class Outcome:
    """What an attempt came to, as the record statement writes it, and what it does to the
    worker that ran it (``effect``)."""

    verdict: Verdict
    result: str | None = None  # JSON: what the handler returned, or what claude said of a failure
    error: str | None = None  # failed: the error; released: why it went back
    traceback: str | None = None
    permanent: bool = False  # failed: no retry can help
    delay: float = 0.0  # failed: seconds before the next attempt
    run_at: datetime | None = None  # released: when it runs again (None: now)
    quiet: bool = False  # already logged when it was decided (a postponement, a busy key)
    # (what it does to the worker: no part of what is written, nor of what equal outcomes are)
    effect: Effect | None = field(default=None, compare=False)
    until: datetime | None = field(default=None, compare=False)  # HOLD_EVERYWHERE: till then


@dataclass(frozen=True)
class Spend:
    """What one claude run spent on one model (for the ledger that outlives the jobs)."""

    model: str = ""  # "" where claude did not say
    runs: int = 0  # 1 on the first Spend of a claude run, 0 on the others of that run
    cost_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    @classmethod
    def of_result(cls, result: Mapping[str, Any]) -> list[Spend]:
        """What claude's result object says it spent: a Spend per model of its modelUsage,
        or one for the whole run from its total cost and usage."""
        models = result.get("modelUsage")
        if isinstance(models, dict) and models:
            names = ("costUSD", "inputTokens", "outputTokens", "cacheReadInputTokens",
                     "cacheCreationInputTokens")  # fmt: skip
            per_model = [
                cls._of(_storable(str(model))[:200], used, *names)
                for model, used in models.items()
                if isinstance(used, dict)
            ]
            return [dataclasses.replace(per_model[0], runs=1), *per_model[1:]] if per_model else []
        given = result.get("usage")
        usage: Mapping[str, Any] = given if isinstance(given, dict) else {}
        names = ("total_cost_usd", "input_tokens", "output_tokens", "cache_read_input_tokens",
                 "cache_creation_input_tokens")  # fmt: skip
        spent = cls._of("", {**usage, "total_cost_usd": result.get("total_cost_usd")}, *names)
        return [dataclasses.replace(spent, runs=1)] if spent != cls() else []

    @classmethod
    def _of(cls, model: str, numbers: Mapping[str, Any], cost: str, *tokens: str) -> Spend:
        """A Spend from a mapping, by the names it gives the cost and the four token counts
        (what is missing, or not a sane number, counts 0)."""

        def number(name: str) -> float:
            value = numbers.get(name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                return 0.0
            return float(value) if 0 <= value < 1e15 else 0.0

        return cls(model, 0, number(cost), *(int(number(name)) for name in tokens))


@dataclass(frozen=True)
class Progress:
    """What a running attempt produced that is not written yet."""

    transcript: str | None = None
    session_id: str | None = None
    cost_usd: float = 0.0
    worktree: str | None = None  # JSON: the git worktree and branch the job runs in
    spend: tuple[Spend, ...] = ()  # for the ledger
    checks: str | None = None  # JSON: the state of its checks (see _Checks)
    delivery: str | None = None  # JSON: what was delivered (see _deliver)

    def __add__(self, later: Progress) -> Progress:
        text = (self.transcript or "") + (later.transcript or "")
        return Progress(
            text[-TRANSCRIPT_LIMIT:] or None,
            later.session_id or self.session_id,
            self.cost_usd + later.cost_usd,
            later.worktree or self.worktree,
            self.spend + later.spend,
            later.checks or self.checks,
            later.delivery or self.delivery,
        )

    def __bool__(self) -> bool:
        return bool(
            self.transcript or self.session_id or self.cost_usd or self.worktree or self.spend
            or self.checks or self.delivery
        )  # fmt: skip


###############################################################################
# Schema
###############################################################################

#: Every schema change, in order. A released migration never changes; a new one is appended.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """\
CREATE TABLE claude_jobs (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    queue         text NOT NULL DEFAULT 'default',
    kind          text NOT NULL DEFAULT 'claude',
    priority      integer NOT NULL DEFAULT 0,         -- higher runs first
    payload       jsonb NOT NULL,
    status        text NOT NULL DEFAULT 'queued' CHECK (status IN
                      ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    run_at        timestamptz NOT NULL DEFAULT now(), -- not claimed before then
    attempts      integer NOT NULL DEFAULT 0,         -- attempts started
    max_attempts  integer NOT NULL DEFAULT 5 CHECK (max_attempts >= 1),
    timeout       double precision CHECK (timeout > 0), -- seconds; NULL: handler's default
    last_error    text,
    errors        jsonb NOT NULL DEFAULT '[]',        -- one object per failed attempt
    worker_id     uuid,                               -- the worker running (or last ran) it
    worker        text,                               -- that worker as host:pid
    claim         uuid,                               -- fencing token of the current claim
    result        jsonb,                              -- the handler's result
    session_id    text,                               -- claude: the session, to resume it
    cost_usd      numeric NOT NULL DEFAULT 0,         -- claude: cost of all attempts
    transcript    text,                               -- claude: stream-json tail
    created_at    timestamptz NOT NULL DEFAULT now(),
    started_at    timestamptz,
    finished_at   timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
-- The claim query walks these: ready jobs only, in claim order.
CREATE INDEX claude_jobs_ready_in_queue ON claude_jobs (queue, priority DESC, run_at)
    WHERE status = 'queued';
CREATE INDEX claude_jobs_ready ON claude_jobs (priority DESC, run_at)
    WHERE status = 'queued';
-- Idle workers learn when the next delayed or retried job is due through this one. Only
-- jobs waiting for a later run_at match its predicate, so the claim never uses it.
CREATE INDEX claude_jobs_scheduled ON claude_jobs (run_at)
    WHERE status = 'queued' AND run_at > created_at;
-- Recovery finds a dead worker's jobs through this one.
CREATE INDEX claude_jobs_running ON claude_jobs (worker_id) WHERE status = 'running';

CREATE TABLE claude_jobs_workers (
    id              uuid PRIMARY KEY,
    lock_key        integer NOT NULL UNIQUE, -- holds advisory lock (namespace, lock_key)
    host            text NOT NULL,
    pid             integer NOT NULL,
    queues          text[] NOT NULL,
    kinds           text[] NOT NULL,
    concurrency     integer NOT NULL,
    backend_pid     integer,                 -- the PostgreSQL session holding the lock
    started_at      timestamptz NOT NULL DEFAULT now(),
    last_heartbeat  timestamptz NOT NULL DEFAULT now()
);
CREATE SEQUENCE claude_jobs_worker_keys AS integer MINVALUE 1 CYCLE;

-- A queue table churns: vacuum and analyze it far more often than the defaults, and give
-- the planner statistics from the start, so that the claim walks its index from the first
-- bulk insert on.
ALTER TABLE claude_jobs SET (autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02);
ANALYZE claude_jobs;
""",
    ),
    (
        2,
        """\
-- Operating the queue: follow transcripts, cancel running jobs, pause queues, clean up.
ALTER TABLE claude_jobs
    ADD COLUMN transcript_size bigint NOT NULL DEFAULT 0, -- characters ever appended
    ADD COLUMN cancel_requested_at timestamptz;          -- `cancel` of a running job
-- cleanup deletes finished jobs by age through this one
CREATE INDEX claude_jobs_finished ON claude_jobs (finished_at)
    WHERE status IN ('succeeded', 'failed', 'cancelled');
CREATE TABLE claude_jobs_queues (
    queue      text PRIMARY KEY,
    paused_at  timestamptz,                              -- NULL: not paused
    paused_by  text
);
""",
    ),
    (
        3,
        """\
-- Claude at scale: concurrency keys, worktrees, chains, usage limits.
ALTER TABLE claude_jobs
    ADD COLUMN concurrency_key text,           -- at most concurrency_limit such jobs run at once
    ADD COLUMN concurrency_limit integer NOT NULL DEFAULT 1 CHECK (concurrency_limit >= 0),
    ADD COLUMN key_held boolean NOT NULL DEFAULT false, -- this running job holds a slot of its key
    ADD COLUMN after uuid[],                   -- runs once all of these succeeded
    ADD COLUMN continue_from uuid,             -- resumes that job's claude session
    ADD COLUMN session_host text,              -- the host whose claude keeps session_id
    ADD COLUMN worktree jsonb;                 -- the git worktree and branch it ran in
-- admission counts the slots held per key through this one
CREATE INDEX claude_jobs_keys_held ON claude_jobs (concurrency_key)
    WHERE status = 'running' AND key_held;
-- the (few) unfinished jobs that wait for others
CREATE INDEX claude_jobs_waiting ON claude_jobs (id)
    WHERE status IN ('queued', 'running') AND (after IS NOT NULL OR continue_from IS NOT NULL);
-- A hold stops every worker starting jobs of a kind until a time (a usage limit of claude).
CREATE TABLE claude_jobs_holds (
    kind    text PRIMARY KEY,
    until   timestamptz NOT NULL,
    reason  text NOT NULL,
    set_at  timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE claude_jobs_workers
    ADD COLUMN claude_paused_until timestamptz,  -- this worker starts no claude job until then
    ADD COLUMN claude_paused_reason text;
""",
    ),
    (
        4,
        """\
-- Order and containment: jobs of equal priority and due time run in the order they were
-- enqueued (by a sequence, not the clock); a continuation records what it may do that the
-- job it continues could not; a due time is one that every client can read back.
CREATE SEQUENCE claude_jobs_seq AS bigint;
-- (a run_at no client could read back, queued before this version, is brought within range)
UPDATE claude_jobs SET run_at = least(greatest(run_at, '0001-01-02 00:00+00'),
                                      '9999-12-30 00:00+00')
WHERE run_at < '0001-01-02 00:00+00' OR run_at > '9999-12-30 00:00+00';
ALTER TABLE claude_jobs
    ADD COLUMN seq bigint,       -- enqueue order (NULL: enqueued before this version)
    ADD COLUMN widens text[],    -- what a continuation may do that the job it continues could not
    ADD CONSTRAINT claude_jobs_run_at_readable
        CHECK (run_at BETWEEN '0001-01-02 00:00+00' AND '9999-12-30 00:00+00');
-- (a default given apart from the column, so that existing rows are not rewritten)
ALTER TABLE claude_jobs ALTER COLUMN seq SET DEFAULT nextval('claude_jobs_seq');
ALTER SEQUENCE claude_jobs_seq OWNED BY claude_jobs.seq;
-- The claim walks these in claim order: seq breaks the ties of priority and run_at.
DROP INDEX claude_jobs_ready_in_queue;
DROP INDEX claude_jobs_ready;
CREATE INDEX claude_jobs_ready_in_queue ON claude_jobs (queue, priority DESC, run_at, seq)
    WHERE status = 'queued';
CREATE INDEX claude_jobs_ready ON claude_jobs (priority DESC, run_at, seq)
    WHERE status = 'queued';
""",
    ),
    (
        5,
        """\
-- What jobs leave behind, kept apart from the jobs: cleanup deletes jobs, not these.
-- What claude spent, per UTC day (when it was recorded), queue and model.
CREATE TABLE claude_jobs_spend (
    day                 date NOT NULL,
    queue               text NOT NULL,
    model               text NOT NULL,             -- '' where claude did not say
    runs                integer NOT NULL DEFAULT 0,  -- claude runs that reported it
    cost_usd            numeric NOT NULL DEFAULT 0,
    input_tokens        bigint NOT NULL DEFAULT 0,
    output_tokens       bigint NOT NULL DEFAULT 0,
    cache_read_tokens   bigint NOT NULL DEFAULT 0,
    cache_write_tokens  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (day, queue, model)
);
-- what was spent before there was a ledger: per day and queue, the model not known
INSERT INTO claude_jobs_spend (day, queue, model, runs, cost_usd)
SELECT (coalesce(finished_at, updated_at) AT TIME ZONE 'UTC')::date, queue, '', count(*),
       sum(cost_usd)
FROM claude_jobs WHERE cost_usd > 0 GROUP BY 1, 2;
-- The git worktrees jobs ran in, on the host that has them.
CREATE TABLE claude_jobs_worktrees (
    host        text NOT NULL,
    path        text NOT NULL,
    repo        text NOT NULL,
    branch      text NOT NULL,
    base        text NOT NULL,                    -- the commit the branch started from
    job_id      uuid NOT NULL,                    -- the job that made it
    created_at  timestamptz NOT NULL DEFAULT now(),
    used_at     timestamptz NOT NULL DEFAULT now(), -- the last time a job ran in it
    PRIMARY KEY (host, path)
);
""",
    ),
    (
        6,
        """\
-- Blocked jobs stay out of the claim's way, however many there are: a queued job that cannot
-- run yet is marked with what it waits for, and the claim's indexes leave it out. 'jobs': it
-- waits for jobs that have not succeeded, or continues one that has not finished; 'key': the
-- jobs of its concurrency key ahead of it take every slot. Enqueueing marks a job; whatever
-- ends jobs unmarks those that may run now (see UNBLOCK).
ALTER TABLE claude_jobs ADD COLUMN blocked text CHECK (blocked IN ('jobs', 'key'));
-- (the jobs queued before this version are marked so too)
UPDATE claude_jobs w SET blocked = 'jobs'
WHERE w.status = 'queued' AND (
    (w.after IS NOT NULL AND EXISTS (
        SELECT FROM unnest(w.after) AS a(id) LEFT JOIN claude_jobs d ON d.id = a.id
        WHERE d.status IS DISTINCT FROM 'succeeded'))
    OR (w.continue_from IS NOT NULL AND coalesce((
        SELECT p.status IN ('queued', 'running') FROM claude_jobs p
        WHERE p.id = w.continue_from), false)));
UPDATE claude_jobs w SET blocked = 'key'
FROM (SELECT q.id, q.concurrency_limit - (
             SELECT count(*) FROM claude_jobs r
             WHERE r.status = 'running' AND r.concurrency_key = q.concurrency_key) AS free,
         row_number() OVER (PARTITION BY q.concurrency_key
                            ORDER BY q.run_at > now(), q.priority DESC, q.run_at, q.seq) AS n
      FROM claude_jobs q
      WHERE q.status = 'queued' AND q.blocked IS NULL AND q.concurrency_key IS NOT NULL
        AND q.concurrency_limit > 0) x
WHERE w.id = x.id AND x.n > x.free;
DROP INDEX claude_jobs_ready_in_queue;
DROP INDEX claude_jobs_ready;
CREATE INDEX claude_jobs_ready_in_queue ON claude_jobs (queue, priority DESC, run_at, seq)
    WHERE status = 'queued' AND blocked IS NULL;
CREATE INDEX claude_jobs_ready ON claude_jobs (priority DESC, run_at, seq)
    WHERE status = 'queued' AND blocked IS NULL;
-- the queued jobs of a key in claim order (how many are ahead of a job; which go first)
CREATE INDEX claude_jobs_queued_keys ON claude_jobs (concurrency_key, priority DESC, run_at, seq)
    WHERE status = 'queued' AND concurrency_key IS NOT NULL;
-- the blocked jobs that wait for a job
CREATE INDEX claude_jobs_blocked_after ON claude_jobs USING gin (after)
    WHERE status = 'queued' AND blocked IS NOT NULL;
CREATE INDEX claude_jobs_blocked_continuations ON claude_jobs (continue_from)
    WHERE status = 'queued' AND blocked IS NOT NULL;
-- every running job of a key, admitted or not (admission and unblocking count them)
DROP INDEX claude_jobs_keys_held;
CREATE INDEX claude_jobs_running_keys ON claude_jobs (concurrency_key)
    WHERE status = 'running' AND concurrency_key IS NOT NULL;
-- the queued jobs of a queue, blocked or not (pause and purge count and delete them)
CREATE INDEX claude_jobs_queued_in_queue ON claude_jobs (queue) WHERE status = 'queued';
-- the name its sessions carry (application_name: a reaper ends them all)
ALTER TABLE claude_jobs_workers ADD COLUMN session_name text;
""",
    ),
    (
        7,
        """\
-- Counts kept, not counted: `stats`, the dashboard and /metrics read how many jobs each queue
-- has in each status from here, whatever the number of jobs. Every statement that inserts,
-- updates or deletes jobs appends what it changed (a trigger per statement: appending takes
-- no lock another writer waits for); readers sum the rows, and workers fold them now and then
-- (FOLD_COUNTS). `entered` never goes down: how many jobs ever entered the status (cleanup
-- does not lower it; a counter for Prometheus). run_seconds: the run times of the jobs that
-- ended (succeeded or failed) after running.
CREATE TABLE claude_jobs_counts (
    queue        text NOT NULL,
    status       text NOT NULL,
    jobs         bigint NOT NULL DEFAULT 0,
    cost_usd     numeric NOT NULL DEFAULT 0,
    entered      bigint NOT NULL DEFAULT 0,
    run_seconds  double precision NOT NULL DEFAULT 0
);
-- The same ended runs by run time: `runs` of them took at most `le` seconds (Prometheus'
-- cumulative buckets).
CREATE TABLE claude_jobs_run_times (
    queue   text NOT NULL,
    status  text NOT NULL,
    le      double precision NOT NULL,
    runs    bigint NOT NULL
);
CREATE FUNCTION claude_jobs_run_time_buckets() RETURNS double precision[]
    IMMUTABLE LANGUAGE sql AS $$ SELECT '{1,5,15,30,60,120,300,600,1800,3600,7200,Infinity}'
    ::double precision[] $$;
-- Each statement appends one row per queue and status it changed (and per run-time bound);
-- a statement that changed none appends nothing. One function per operation, one statement
-- each: a trigger costs every write to the jobs, so it does as little as it can.
CREATE FUNCTION claude_jobs_count_inserts() RETURNS trigger LANGUAGE plpgsql AS $count$
BEGIN
    WITH counted AS (
        INSERT INTO claude_jobs_counts (queue, status, jobs, cost_usd, entered, run_seconds)
        SELECT queue, status, count(*), sum(cost_usd), count(*),
            coalesce(sum(extract(epoch FROM finished_at - started_at))
                     FILTER (WHERE status IN ('succeeded', 'failed')), 0)
        FROM new_jobs GROUP BY 1, 2
    )
    INSERT INTO claude_jobs_run_times (queue, status, le, runs)
    SELECT n.queue, n.status, b.le, count(*)
    FROM new_jobs n JOIN unnest(claude_jobs_run_time_buckets()) b(le)
        ON extract(epoch FROM n.finished_at - n.started_at) <= b.le
    WHERE n.status IN ('succeeded', 'failed')
    GROUP BY 1, 2, 3;
    RETURN NULL;
END
$count$;
CREATE FUNCTION claude_jobs_count_updates() RETURNS trigger LANGUAGE plpgsql AS $count$
BEGIN
    WITH changed AS (  -- (many updates change none of these: a transcript, a block lifted)
        SELECT o.queue AS old_queue, o.status AS old_status, o.cost_usd AS old_cost,
            n.queue, n.status, n.cost_usd,
            CASE WHEN o.status = 'running' AND n.status IN ('succeeded', 'failed')
                 THEN extract(epoch FROM n.finished_at - n.started_at) END AS ran
        FROM new_jobs n JOIN old_jobs o ON o.id = n.id
        WHERE n.status <> o.status OR n.queue <> o.queue OR n.cost_usd <> o.cost_usd
    ), counted AS (
        INSERT INTO claude_jobs_counts (queue, status, jobs, cost_usd, entered, run_seconds)
        SELECT queue, status, sum(jobs), sum(cost_usd), sum(entered), sum(run_seconds)
        FROM (SELECT old_queue AS queue, old_status AS status, -1 AS jobs,
                  -old_cost AS cost_usd, 0 AS entered, 0 AS run_seconds
              FROM changed
              UNION ALL
              SELECT queue, status, 1, cost_usd, (status <> old_status)::int, coalesce(ran, 0)
              FROM changed) moves
        GROUP BY 1, 2 HAVING sum(jobs) <> 0 OR sum(cost_usd) <> 0 OR sum(entered) <> 0
    )
    INSERT INTO claude_jobs_run_times (queue, status, le, runs)
    SELECT queue, status, b.le, count(*)
    FROM changed JOIN unnest(claude_jobs_run_time_buckets()) b(le) ON ran <= b.le
    GROUP BY 1, 2, 3;
    RETURN NULL;
END
$count$;
CREATE FUNCTION claude_jobs_count_deletes() RETURNS trigger LANGUAGE plpgsql AS $count$
BEGIN
    INSERT INTO claude_jobs_counts (queue, status, jobs, cost_usd)
    SELECT queue, status, -count(*), -sum(cost_usd) FROM old_jobs GROUP BY 1, 2;
    RETURN NULL;
END
$count$;
CREATE FUNCTION claude_jobs_count_truncates() RETURNS trigger LANGUAGE plpgsql AS $count$
BEGIN  -- (what there is goes; what entered stays counted)
    INSERT INTO claude_jobs_counts (queue, status, jobs, cost_usd)
    SELECT queue, status, -sum(jobs), -sum(cost_usd) FROM claude_jobs_counts
    GROUP BY 1, 2 HAVING sum(jobs) <> 0 OR sum(cost_usd) <> 0;
    RETURN NULL;
END
$count$;
-- (the triggers come first: they lock the table until the end of the migration, so the
-- counts below are of jobs no one changes meanwhile)
CREATE TRIGGER claude_jobs_count_inserts AFTER INSERT ON claude_jobs
    REFERENCING NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION claude_jobs_count_inserts();
CREATE TRIGGER claude_jobs_count_updates AFTER UPDATE ON claude_jobs
    REFERENCING OLD TABLE AS old_jobs NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION claude_jobs_count_updates();
CREATE TRIGGER claude_jobs_count_deletes AFTER DELETE ON claude_jobs
    REFERENCING OLD TABLE AS old_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION claude_jobs_count_deletes();
CREATE TRIGGER claude_jobs_count_truncates AFTER TRUNCATE ON claude_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION claude_jobs_count_truncates();
INSERT INTO claude_jobs_counts (queue, status, jobs, cost_usd, entered, run_seconds)
SELECT queue, status, count(*), sum(cost_usd), count(*),
    coalesce(sum(extract(epoch FROM finished_at - started_at))
             FILTER (WHERE status IN ('succeeded', 'failed')), 0)
FROM claude_jobs GROUP BY 1, 2;
INSERT INTO claude_jobs_run_times (queue, status, le, runs)
SELECT j.queue, j.status, b.le, count(*)
FROM claude_jobs j JOIN unnest(claude_jobs_run_time_buckets()) b(le)
    ON extract(epoch FROM j.finished_at - j.started_at) <= b.le
WHERE j.status IN ('succeeded', 'failed')
GROUP BY 1, 2, 3;
-- the oldest queued job of a queue (its ready age), and its queued jobs (pause, purge)
DROP INDEX claude_jobs_queued_in_queue;
CREATE INDEX claude_jobs_queued_in_queue ON claude_jobs (queue, run_at) WHERE status = 'queued';
-- list, the dashboard and the API page jobs newest first by this one (keyset, not OFFSET),
-- and the failed and cancelled ones (few among many: walking the first for them is slow) by
-- the second; the running ones come through claude_jobs_running
CREATE INDEX claude_jobs_newest ON claude_jobs (created_at DESC, id DESC);
CREATE INDEX claude_jobs_newest_ended_badly ON claude_jobs (created_at DESC, id DESC)
    WHERE status IN ('failed', 'cancelled');
-- A worker may be asked to drain: claim no more, and exit when its running jobs end.
ALTER TABLE claude_jobs_workers ADD COLUMN draining_since timestamptz;
""",
    ),
    (
        8,
        """\
-- Unique jobs, schedules and batches.
-- Unique jobs: while a job of a unique key is queued or running, no other job of that key is
-- (the index says so, not a read before a write: an enqueue that finds the key taken inserts
-- nothing). A key enqueued with a window (--unique-for) also keeps others out until the
-- window ends, whatever became of its job: the window is a row of its own.
ALTER TABLE claude_jobs ADD COLUMN unique_key text;
CREATE UNIQUE INDEX claude_jobs_unique_unfinished ON claude_jobs (unique_key)
    WHERE status IN ('queued', 'running');
CREATE TABLE claude_jobs_unique_windows (
    key     text PRIMARY KEY,
    job_id  uuid NOT NULL,                 -- the job enqueued with it
    until   timestamptz NOT NULL            -- the key is free for another job from then on
);
-- Schedules: a job made again and again, at the times of a cron expression or every so
-- often; workers fire them. A due time is fired once: the worker that fires it locks the
-- schedule, moves next_run_at past it and records the run in one transaction, and a run's
-- key is (schedule, due time).
CREATE TABLE claude_jobs_schedules (
    name             text PRIMARY KEY,
    cron             text,                          -- a cron expression, in timezone; or
    every            double precision CHECK (every > 0), -- seconds from one run to the next
    timezone         text NOT NULL DEFAULT 'UTC',
    kind             text NOT NULL,
    payload          jsonb NOT NULL,                -- of each run, checked when added
    options          jsonb NOT NULL,                -- each run's job options (queue, ...)
    catch_up         text NOT NULL DEFAULT 'latest' CHECK (catch_up IN ('latest', 'all', 'none')),
    overlap          text NOT NULL DEFAULT 'skip' CHECK (overlap IN ('skip', 'queue', 'allow')),
    only_if_changed  boolean NOT NULL DEFAULT false, -- skip a run while the repository is as it
                                                    -- was at the last successful run:
    good_head        text,                          -- then (as its runs recorded it)
    next_run_at      timestamptz NOT NULL,          -- the first due time not fired yet
    paused_at        timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CHECK ((cron IS NULL) <> (every IS NULL))
);
CREATE INDEX claude_jobs_schedules_due ON claude_jobs_schedules (next_run_at)
    WHERE paused_at IS NULL;
-- Each due time of a schedule that was fired: the job it made, or why none.
CREATE TABLE claude_jobs_schedule_runs (
    schedule  text NOT NULL REFERENCES claude_jobs_schedules ON DELETE CASCADE,
    due_at    timestamptz NOT NULL,
    job_id    uuid,                                 -- NULL: no job (see outcome)
    outcome   text NOT NULL CHECK (outcome IN ('enqueued', 'skipped', 'missed', 'manual')),
    note      text,                                 -- why none; what a catch-up left out
    head      text,                                 -- --only-if-changed: the commit it saw
    fired_at  timestamptz NOT NULL DEFAULT now(),
    fired_by  text NOT NULL,                        -- the worker (host:pid), or who ran it
    PRIMARY KEY (schedule, due_at)
);
CREATE INDEX claude_jobs_schedule_runs_job ON claude_jobs_schedule_runs (job_id);
ALTER TABLE claude_jobs
    ADD COLUMN schedule text,                       -- the schedule that made it
    ADD COLUMN scheduled_for timestamptz;           -- the due time it was made for
-- (--overlap: is a run of the schedule still queued or running)
CREATE INDEX claude_jobs_unfinished_of_schedule ON claude_jobs (schedule)
    WHERE schedule IS NOT NULL AND status IN ('queued', 'running');
-- Batches: jobs grouped under a name; when the last of them has ended, the batch is finished
-- and its callbacks are queued, once. Enqueueing to a batch locks its row (enqueuers to one
-- batch take turns); whatever ends its jobs takes the lock too before it looks at the rest
-- (the trigger below), so that of two transactions that end its last two jobs at once, the
-- second to take the lock sees the first's job ended, and a job added as its last one ends
-- keeps it open.
CREATE TABLE claude_jobs_batches (
    id           uuid PRIMARY KEY,
    name         text NOT NULL,
    on_finish    jsonb,                -- the job queued once all its jobs have ended
    on_success   jsonb,                -- the job queued once all its jobs have succeeded
    created_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz           -- when its last job ended (its callbacks were queued)
);
-- one open batch of a name: enqueue --batch NAME adds to it (or opens a new one)
CREATE UNIQUE INDEX claude_jobs_open_batches ON claude_jobs_batches (name)
    WHERE finished_at IS NULL;
CREATE INDEX claude_jobs_batches_newest ON claude_jobs_batches (created_at DESC);
ALTER TABLE claude_jobs
    ADD COLUMN batch_id uuid,                       -- the batch it belongs to
    ADD COLUMN callback_of uuid;                    -- the batch it is a callback of
-- a batch's progress, counted from the index alone
CREATE INDEX claude_jobs_of_batch ON claude_jobs (batch_id, status)
    INCLUDE (cost_usd, started_at, finished_at) WHERE batch_id IS NOT NULL;
CREATE INDEX claude_jobs_callbacks ON claude_jobs (callback_of) WHERE callback_of IS NOT NULL;
CREATE FUNCTION claude_jobs_finish_batches() RETURNS trigger LANGUAGE plpgsql AS $finish$
DECLARE
    ending uuid[];
    queues text[];
BEGIN
    SELECT array_agg(DISTINCT n.batch_id) INTO ending
    FROM new_jobs n JOIN old_jobs o ON o.id = n.id
    WHERE n.batch_id IS NOT NULL AND n.status IN ('succeeded', 'failed', 'cancelled')
      AND o.status IN ('queued', 'running');
    IF ending IS NULL THEN  -- (most statements: no job of a batch ended)
        RETURN NULL;
    END IF;
    -- the batches' locks, in one order (no deadlock); the statements below see what the
    -- transactions that held them committed
    PERFORM FROM claude_jobs_batches WHERE id = ANY(ending) ORDER BY id FOR UPDATE;
    WITH done AS (
        UPDATE claude_jobs_batches b SET finished_at = now()
        WHERE b.id = ANY(ending) AND b.finished_at IS NULL AND NOT EXISTS (
            SELECT FROM claude_jobs j
            WHERE j.batch_id = b.id AND j.status IN ('queued', 'running'))
        RETURNING b.id, b.on_finish, CASE WHEN NOT EXISTS (
            SELECT FROM claude_jobs j WHERE j.batch_id = b.id AND j.status <> 'succeeded')
            THEN b.on_success END AS on_success
    ), made AS (
        INSERT INTO claude_jobs (id, queue, kind, priority, payload, max_attempts, timeout,
            concurrency_key, concurrency_limit, callback_of)
        SELECT gen_random_uuid(), c->>'queue', c->>'kind', (c->>'priority')::integer,
            c->'payload', (c->>'max_attempts')::integer, (c->>'timeout')::double precision,
            c->>'concurrency_key', (c->>'concurrency_limit')::integer, done.id
        FROM done, LATERAL (VALUES (done.on_finish), (done.on_success)) AS callbacks(c)
        WHERE c IS NOT NULL
        RETURNING queue
    )
    SELECT array_agg(DISTINCT queue) INTO queues FROM made;
    PERFORM pg_notify('claude_jobs', json_build_object('queue', q)::text)
    FROM unnest(queues) AS q;
    RETURN NULL;
END
$finish$;
CREATE TRIGGER claude_jobs_finish_batches AFTER UPDATE ON claude_jobs
    REFERENCING OLD TABLE AS old_jobs NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION claude_jobs_finish_batches();
""",
    ),
    (
        9,
        """\
-- A batch whose last unfinished jobs are deleted (purge) finishes too, and queues its
-- on-finish callback; never its on-success one, since jobs of it never ran: the batch counts
-- the jobs it lost so. (Enqueuers to a batch no longer take turns, as version 8 says: they
-- insert their jobs first, then share the batch's lock; see _into_batch.)
ALTER TABLE claude_jobs_batches ADD COLUMN purged integer NOT NULL DEFAULT 0;
-- Finish those of these batches that have no queued or running job left, and queue their
-- callbacks (once: the batches are locked, in one order, before they are looked at).
CREATE FUNCTION claude_jobs_end_batches(ending uuid[]) RETURNS void LANGUAGE plpgsql AS $end$
DECLARE
    queues text[];
BEGIN
    -- the batches' locks, in one order (no deadlock); the statements below see what the
    -- transactions that held them committed
    PERFORM FROM claude_jobs_batches WHERE id = ANY(ending) ORDER BY id FOR UPDATE;
    WITH done AS (
        UPDATE claude_jobs_batches b SET finished_at = now()
        WHERE b.id = ANY(ending) AND b.finished_at IS NULL AND NOT EXISTS (
            SELECT FROM claude_jobs j
            WHERE j.batch_id = b.id AND j.status IN ('queued', 'running'))
        RETURNING b.id, b.on_finish, CASE WHEN b.purged = 0 AND NOT EXISTS (
            SELECT FROM claude_jobs j WHERE j.batch_id = b.id AND j.status <> 'succeeded')
            THEN b.on_success END AS on_success
    ), made AS (
        INSERT INTO claude_jobs (id, queue, kind, priority, payload, max_attempts, timeout,
            concurrency_key, concurrency_limit, callback_of)
        SELECT gen_random_uuid(), c->>'queue', c->>'kind', (c->>'priority')::integer,
            c->'payload', (c->>'max_attempts')::integer, (c->>'timeout')::double precision,
            c->>'concurrency_key', (c->>'concurrency_limit')::integer, done.id
        FROM done, LATERAL (VALUES (done.on_finish), (done.on_success)) AS callbacks(c)
        WHERE c IS NOT NULL
        RETURNING queue
    )
    SELECT array_agg(DISTINCT queue) INTO queues FROM made;
    PERFORM pg_notify('claude_jobs', json_build_object('queue', q)::text)
    FROM unnest(queues) AS q;
END
$end$;
CREATE OR REPLACE FUNCTION claude_jobs_finish_batches() RETURNS trigger LANGUAGE plpgsql AS
$finish$
DECLARE
    ending uuid[];
BEGIN
    SELECT array_agg(DISTINCT n.batch_id) INTO ending
    FROM new_jobs n JOIN old_jobs o ON o.id = n.id
    WHERE n.batch_id IS NOT NULL AND n.status IN ('succeeded', 'failed', 'cancelled')
      AND o.status IN ('queued', 'running');
    IF ending IS NOT NULL THEN  -- (most statements: no job of a batch ended)
        PERFORM claude_jobs_end_batches(ending);
    END IF;
    RETURN NULL;
END
$finish$;
CREATE FUNCTION claude_jobs_finish_purged_batches() RETURNS trigger LANGUAGE plpgsql AS
$purged$
DECLARE
    ending uuid[];
    lost integer[];
BEGIN
    SELECT array_agg(batch_id), array_agg(jobs) INTO ending, lost
    FROM (SELECT batch_id, count(*)::integer AS jobs FROM old_jobs
          WHERE batch_id IS NOT NULL AND status IN ('queued', 'running')
          GROUP BY batch_id) gone;
    IF ending IS NULL THEN  -- (cleanup: finished jobs)
        RETURN NULL;
    END IF;
    PERFORM FROM claude_jobs_batches WHERE id = ANY(ending) ORDER BY id FOR UPDATE;
    UPDATE claude_jobs_batches b SET purged = b.purged + gone.jobs
    FROM unnest(ending, lost) AS gone(id, jobs)
    WHERE b.id = gone.id AND b.finished_at IS NULL;
    PERFORM claude_jobs_end_batches(ending);
    RETURN NULL;
END
$purged$;
CREATE TRIGGER claude_jobs_finish_purged_batches AFTER DELETE ON claude_jobs
    REFERENCING OLD TABLE AS old_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION claude_jobs_finish_purged_batches();
""",
    ),
    (
        10,
        """\
-- What goes wrong in a worker, and the workers found dead. A worker's heartbeat writes what is
-- wrong with its parts (a thread that died, or failed many passes in a row; NULL: nothing).
ALTER TABLE claude_jobs_workers ADD COLUMN trouble text;
-- A worker found dead is forgotten from claude_jobs_workers, and kept here a while for
-- `workers` to show: when, why, and how many of its running jobs went back to the queue.
CREATE TABLE claude_jobs_lost_workers (
    id              uuid PRIMARY KEY,
    host            text NOT NULL,
    pid             integer NOT NULL,
    queues          text[] NOT NULL,
    kinds           text[] NOT NULL,
    concurrency     integer NOT NULL,
    started_at      timestamptz NOT NULL,
    last_heartbeat  timestamptz NOT NULL,
    lost_at         timestamptz NOT NULL DEFAULT now(),
    reason          text NOT NULL,
    recovered       integer NOT NULL                  -- its running jobs put back
);
-- Jobs are listed newest first in the order they were enqueued: those of one transaction (one
-- created_at) by their sequence too. (The jobs enqueued before version 4 have none: 0.)
UPDATE claude_jobs SET seq = 0 WHERE seq IS NULL;
ALTER TABLE claude_jobs ALTER COLUMN seq SET NOT NULL;
DROP INDEX claude_jobs_newest;
DROP INDEX claude_jobs_newest_ended_badly;
CREATE INDEX claude_jobs_newest ON claude_jobs (created_at DESC, seq DESC, id DESC);
CREATE INDEX claude_jobs_newest_ended_badly ON claude_jobs (created_at DESC, seq DESC, id DESC)
    WHERE status IN ('failed', 'cancelled');
""",
    ),
    (
        11,
        """\
-- A concurrency limit of 0 means no key: enqueue stores none then, and the table says so, once
-- for every statement (which look at the key alone from now on).
UPDATE claude_jobs SET concurrency_key = NULL
WHERE concurrency_limit = 0 AND concurrency_key IS NOT NULL;
ALTER TABLE claude_jobs ADD CONSTRAINT claude_jobs_no_key_without_a_limit
    CHECK (concurrency_limit > 0 OR concurrency_key IS NULL);
""",
    ),
    (
        12,
        """\
-- The last mile: a job's checks (the round it is in, each check's result per round), and its
-- delivery (the branch pushed, its pull request and what became of it).
ALTER TABLE claude_jobs ADD COLUMN checks jsonb, ADD COLUMN delivery jsonb;
-- Workers look at the open pull requests now and then through this one (few rows).
CREATE INDEX claude_jobs_open_pull_requests ON claude_jobs ((delivery->'pr'->>'polled_at'))
    WHERE delivery->'pr'->>'state' = 'open';
""",
    ),
    (
        13,
        """\
-- Notifications: whom a job tells when it ends ({"urls": [...], "on": [events]}; NULL: none),
-- and an outbox of what to tell them, written by a trigger in the transaction that ends the
-- job (so a notification exists if and only if its job's end committed), sent by workers.
ALTER TABLE claude_jobs ADD COLUMN notify jsonb;
CREATE TABLE claude_jobs_notifications (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),  -- the webhook-id of every try
    seq         bigint GENERATED ALWAYS AS IDENTITY,          -- the order of a job's
    event       text NOT NULL,
    job_id      uuid,                                         -- (the job may be deleted since)
    url         text NOT NULL,
    body        jsonb NOT NULL,
    state       text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'sent', 'failed', 'abandoned')),
    attempts    integer NOT NULL DEFAULT 0,
    next_at     timestamptz NOT NULL DEFAULT now(),           -- pending: not sent before
    last_error  text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz
);
CREATE INDEX claude_jobs_notifications_due ON claude_jobs_notifications (next_at)
    WHERE state = 'pending';
CREATE INDEX claude_jobs_notifications_order ON claude_jobs_notifications (job_id, url, seq)
    WHERE state = 'pending';
CREATE INDEX claude_jobs_notifications_sent ON claude_jobs_notifications (sent_at)
    WHERE state = 'sent';
CREATE FUNCTION claude_jobs_notify_ended() RETURNS trigger LANGUAGE plpgsql AS $notify$
DECLARE
    events text[] := ARRAY['job.' || NEW.status];
BEGIN
    IF (NEW.status = 'failed' AND NEW.checks->>'phase' = 'failed')
       OR (NEW.status = 'succeeded' AND NEW.delivery ? 'error') THEN
        events := events || 'job.needs_attention'::text;  -- checks or delivery failed
    END IF;
    INSERT INTO claude_jobs_notifications (event, job_id, url, body)
    SELECT e.event, NEW.id, u.url, jsonb_build_object(
        'type', e.event,
        'timestamp', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'data', jsonb_build_object(
            'id', NEW.id, 'status', NEW.status, 'queue', NEW.queue, 'kind', NEW.kind,
            'prompt', left(split_part(NEW.payload->>'prompt', E'\n', 1), 300),
            'result', left(split_part(CASE jsonb_typeof(NEW.result) WHEN 'object'
                                      THEN NEW.result->>'result' END, E'\n', 1), 300),
            'error', left(NEW.last_error, 1000), 'cost_usd', NEW.cost_usd,
            'attempts', NEW.attempts, 'branch', NEW.worktree->>'branch',
            'pull_request', NEW.delivery->'pr'->>'url', 'finished_at', NEW.finished_at))
    FROM unnest(events) WITH ORDINALITY AS e(event, n),
         jsonb_array_elements_text(NEW.notify->'urls') WITH ORDINALITY AS u(url, m)
    WHERE coalesce(jsonb_array_length(NEW.notify->'on'), 0) = 0 OR NEW.notify->'on' ? e.event
    ORDER BY e.n, u.m;
    RETURN NULL;
END
$notify$;
CREATE TRIGGER claude_jobs_notify_ended AFTER UPDATE OF status ON claude_jobs
    FOR EACH ROW WHEN (NEW.notify IS NOT NULL AND OLD.status IS DISTINCT FROM NEW.status
                       AND NEW.status IN ('succeeded', 'failed', 'cancelled'))
    EXECUTE FUNCTION claude_jobs_notify_ended();
""",
    ),
    (
        14,
        """\
-- Notifications of more than a job's end: a batch's end (enqueue --batch --notify), the holds
-- of a usage limit or a daily budget and a worker that cannot run claude (told to its own
-- `worker --notify`, also the default of the jobs it runs), a continuation that widens what
-- its job may do. `subject` is what a notification is about (a job's id, batch:ID, hold:KIND,
-- worker:ID): each subject's are sent in order. `worker_id`: the worker sending it now (a
-- worker found dead leaves it to the others at once). A link to the dashboard goes in each
-- body once `serve --public-url` has said where it is (in claude_jobs_settings).
ALTER TABLE claude_jobs_workers ADD COLUMN notify jsonb;
ALTER TABLE claude_jobs_batches ADD COLUMN notify jsonb;
-- (a hold's: whom its end is told, the workers' --notify when it started)
ALTER TABLE claude_jobs_holds ADD COLUMN notify jsonb;
-- Review: when someone replied to a finished job, delivered it, discarded its worktree or
-- marked it seen (a retry clears it). The dashboard's "Needs you" lists, through this index,
-- the jobs not reviewed that failed, or succeeded with a worktree not delivered (a delivered
-- one is reviewed where it went), or whose delivery failed.
ALTER TABLE claude_jobs ADD COLUMN reviewed_at timestamptz;
-- (what ended before this version is not news: "Needs you" begins empty)
UPDATE claude_jobs SET reviewed_at = coalesce(finished_at, now())
WHERE status = 'failed' OR (status = 'succeeded' AND (worktree IS NOT NULL OR delivery ? 'error'));
CREATE INDEX claude_jobs_needs_you ON claude_jobs (finished_at DESC, id DESC)
    WHERE reviewed_at IS NULL AND (status = 'failed' OR (status = 'succeeded'
        AND ((worktree IS NOT NULL AND delivery IS NULL) OR delivery ? 'error')));
ALTER TABLE claude_jobs_notifications ADD COLUMN subject text, ADD COLUMN worker_id uuid;
UPDATE claude_jobs_notifications SET subject = job_id::text;
ALTER TABLE claude_jobs_notifications ALTER COLUMN subject SET NOT NULL;
DROP INDEX claude_jobs_notifications_order;
CREATE INDEX claude_jobs_notifications_order ON claude_jobs_notifications (subject, url, seq)
    WHERE state = 'pending';
CREATE INDEX claude_jobs_notifications_given_up ON claude_jobs_notifications (created_at)
    WHERE state IN ('failed', 'abandoned');
CREATE TABLE claude_jobs_settings (
    name   text PRIMARY KEY,
    value  text NOT NULL
);
-- Notifications ever sent, tried again and abandoned (counters for /metrics: cleanup deletes
-- the sent ones, not these).
CREATE TABLE claude_jobs_notification_counts (
    outcome  text PRIMARY KEY,
    count    bigint NOT NULL DEFAULT 0
);
-- Write one notification of `event` about `subject` to each URL of `notify` that wants it
-- ({"urls": [...], "on": [events]}: no "on", every event); `data` is its body's data, with a
-- link to the dashboard's `path` when its public URL is known.
CREATE FUNCTION claude_jobs_tell(event text, subject text, job uuid, notify jsonb, data jsonb,
                                 path text) RETURNS void LANGUAGE sql AS $tell$
    INSERT INTO claude_jobs_notifications (event, subject, job_id, url, body)
    SELECT $1, $2, $3, u.url, jsonb_build_object(
        'type', $1,
        'timestamp', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'data', $5 || coalesce((SELECT jsonb_build_object('url', rtrim(s.value, '/') || $6)
                                FROM claude_jobs_settings s WHERE s.name = 'public_url'), '{}'))
    FROM jsonb_array_elements_text($4->'urls') WITH ORDINALITY AS u(url, n)
    WHERE coalesce(jsonb_array_length($4->'on'), 0) = 0 OR $4->'on' ? $1
    ORDER BY u.n
$tell$;
-- The URLs of every live worker's `worker --notify` (as one notify value).
CREATE FUNCTION claude_jobs_workers_notify(event text) RETURNS jsonb LANGUAGE sql AS $all$
    SELECT jsonb_build_object('urls', coalesce(jsonb_agg(DISTINCT u.url), '[]'))
    FROM claude_jobs_workers w, jsonb_array_elements_text(w.notify->'urls') AS u(url)
    WHERE coalesce(jsonb_array_length(w.notify->'on'), 0) = 0 OR w.notify->'on' ? event
$all$;
CREATE OR REPLACE FUNCTION claude_jobs_notify_ended() RETURNS trigger LANGUAGE plpgsql
AS $notify$
DECLARE
    event text;
    data jsonb := jsonb_build_object(
        'id', NEW.id, 'status', NEW.status, 'queue', NEW.queue, 'kind', NEW.kind,
        'prompt', left(split_part(NEW.payload->>'prompt', E'\n', 1), 300),
        'result', left(split_part(CASE jsonb_typeof(NEW.result) WHEN 'object'
                                  THEN NEW.result->>'result' END, E'\n', 1), 300),
        'error', left(NEW.last_error, 1000), 'cost_usd', NEW.cost_usd,
        'attempts', NEW.attempts, 'branch', NEW.worktree->>'branch',
        'pull_request', NEW.delivery->'pr'->>'url', 'finished_at', NEW.finished_at);
BEGIN
    IF TG_OP = 'INSERT' THEN  -- a continuation that may do more than the job it continues
        PERFORM claude_jobs_tell('job.needs_attention', NEW.id::text, NEW.id, NEW.notify,
            data || jsonb_build_object('attention', 'it may do more than the job it continues: '
                                       || array_to_string(NEW.widens, '; ')),
            '/#/jobs/' || NEW.id);
        RETURN NULL;
    END IF;
    PERFORM claude_jobs_tell('job.' || NEW.status, NEW.id::text, NEW.id, NEW.notify, data,
                             '/#/jobs/' || NEW.id);
    event := CASE WHEN NEW.status = 'failed' AND NEW.checks->>'phase' = 'failed'
                  THEN 'its checks failed'
                  WHEN NEW.status = 'succeeded' AND NEW.delivery ? 'error'
                  THEN 'its delivery failed: ' || left(NEW.delivery->>'error', 500) END;
    IF event IS NOT NULL THEN
        PERFORM claude_jobs_tell('job.needs_attention', NEW.id::text, NEW.id, NEW.notify,
                                 data || jsonb_build_object('attention', event),
                                 '/#/jobs/' || NEW.id);
    END IF;
    RETURN NULL;
END
$notify$;
CREATE TRIGGER claude_jobs_notify_widened AFTER INSERT ON claude_jobs
    FOR EACH ROW WHEN (NEW.notify IS NOT NULL AND NEW.widens IS NOT NULL)
    EXECUTE FUNCTION claude_jobs_notify_ended();
-- A batch's end.
CREATE FUNCTION claude_jobs_notify_batch() RETURNS trigger LANGUAGE plpgsql AS $batch$
BEGIN
    PERFORM claude_jobs_tell('batch.finished', 'batch:' || NEW.id, NULL, NEW.notify,
        jsonb_build_object('id', NEW.id, 'name', NEW.name, 'created_at', NEW.created_at,
                           'finished_at', NEW.finished_at, 'purged', NEW.purged)
        || (SELECT jsonb_build_object(
                'jobs', jsonb_object_agg(status, jobs), 'cost_usd', sum(cost))
            FROM (SELECT status, count(*) AS jobs, sum(cost_usd) AS cost FROM claude_jobs
                  WHERE batch_id = NEW.id GROUP BY status) counted),
        '/#/batch/' || NEW.id);
    RETURN NULL;
END
$batch$;
CREATE TRIGGER claude_jobs_notify_batch AFTER UPDATE OF finished_at ON claude_jobs_batches
    FOR EACH ROW WHEN (NEW.notify IS NOT NULL AND OLD.finished_at IS NULL
                       AND NEW.finished_at IS NOT NULL)
    EXECUTE FUNCTION claude_jobs_notify_batch();
-- A hold on every worker (a usage limit) that starts (or starts again after it ran out), and
-- one that ends (lifted by `resume --hold`, or run out: workers delete those), told to those
-- its `notify` names (SET_HOLD: the workers' when it started).
CREATE FUNCTION claude_jobs_notify_hold() RETURNS trigger LANGUAGE plpgsql AS $hold$
BEGIN
    IF TG_OP <> 'INSERT' AND (TG_OP = 'DELETE' OR OLD.until <= now()) THEN
        PERFORM claude_jobs_tell('hold.ended', 'hold:' || OLD.kind, NULL, OLD.notify,
            jsonb_build_object('kind', OLD.kind, 'scope', 'every worker', 'until', OLD.until,
                               'reason', OLD.reason,
                               'ended', CASE WHEN OLD.until <= now() THEN 'ran out'
                                             ELSE 'lifted' END), '/');
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND OLD.until <= now()) THEN
        PERFORM claude_jobs_tell('hold.started', 'hold:' || NEW.kind, NULL,
            claude_jobs_workers_notify('hold.started'),
            jsonb_build_object('kind', NEW.kind, 'scope', 'every worker', 'until', NEW.until,
                               'reason', NEW.reason), '/');
    END IF;
    RETURN NULL;
END
$hold$;
CREATE TRIGGER claude_jobs_notify_hold AFTER INSERT OR UPDATE OR DELETE ON claude_jobs_holds
    FOR EACH ROW EXECUTE FUNCTION claude_jobs_notify_hold();
-- A worker that stops starting claude jobs: it cannot run them (worker.unfit, once until it
-- can again), or its daily budget is spent (hold.started; hold.ended when that is over).
CREATE FUNCTION claude_jobs_notify_paused() RETURNS trigger LANGUAGE plpgsql AS $paused$
DECLARE
    budget boolean := starts_with(coalesce(NEW.claude_paused_reason, OLD.claude_paused_reason),
                                  'the daily budget of ');
    data jsonb := jsonb_build_object('worker', NEW.id, 'host', NEW.host, 'pid', NEW.pid,
                                     'kind', 'claude');
BEGIN
    IF NEW.claude_paused_until IS NOT NULL AND OLD.claude_paused_until IS NULL THEN
        PERFORM claude_jobs_tell(CASE WHEN budget THEN 'hold.started' ELSE 'worker.unfit' END,
            'worker:' || NEW.id, NULL, NEW.notify,
            data || jsonb_build_object('scope', 'this worker', 'until', NEW.claude_paused_until,
                                       'reason', NEW.claude_paused_reason), '/');
    ELSIF NEW.claude_paused_until IS NULL AND OLD.claude_paused_until IS NOT NULL AND budget THEN
        PERFORM claude_jobs_tell('hold.ended', 'worker:' || NEW.id, NULL, NEW.notify,
            data || jsonb_build_object('scope', 'this worker', 'reason',
                                       OLD.claude_paused_reason), '/');
    END IF;
    RETURN NULL;
END
$paused$;
-- A worker that leaves, or is found dead, gives back the notifications it was sending: any
-- other worker sends them at once (at least once: the same webhook-id).
CREATE FUNCTION claude_jobs_release_sends() RETURNS trigger LANGUAGE plpgsql AS $release$
BEGIN
    UPDATE claude_jobs_notifications SET next_at = now(), worker_id = NULL
    WHERE worker_id = OLD.id AND state = 'pending';
    RETURN NULL;
END
$release$;
CREATE TRIGGER claude_jobs_release_sends AFTER DELETE ON claude_jobs_workers
    FOR EACH ROW EXECUTE FUNCTION claude_jobs_release_sends();
CREATE TRIGGER claude_jobs_notify_paused AFTER UPDATE OF claude_paused_until
    ON claude_jobs_workers
    FOR EACH ROW WHEN (NEW.notify IS NOT NULL
                       AND (OLD.claude_paused_until IS NULL) <> (NEW.claude_paused_until IS NULL))
    EXECUTE FUNCTION claude_jobs_notify_paused();
""",
    ),
    (
        15,
        """\
-- Tags: labels a job is enqueued with (enqueue --tag), to find and count its kind of work
-- (list --tag, stats --tag). Only tagged jobs are in the index.
ALTER TABLE claude_jobs ADD COLUMN tags text[];
CREATE INDEX claude_jobs_tags ON claude_jobs USING gin (tags) WHERE tags IS NOT NULL;
""",
    ),
    (
        16,
        """\
-- Queue limits that every worker obeys (`claude-jobs queue set`): at most max_running jobs of
-- the queue running at once, at most `rate` starts in any window of rate_seconds (per value
-- of rate_by, when set: a job's concurrency key, kind or cwd).
ALTER TABLE claude_jobs_queues
    ADD COLUMN max_running integer CHECK (max_running > 0),
    ADD COLUMN rate integer CHECK (rate > 0),
    ADD COLUMN rate_seconds double precision CHECK (rate_seconds > 0),
    ADD COLUMN rate_by text CHECK (rate_by IN ('key', 'kind', 'cwd')),
    ADD COLUMN changed_at timestamptz,
    ADD CHECK ((rate IS NULL) = (rate_seconds IS NULL) AND (rate_by IS NULL OR rate IS NOT NULL));
-- the running jobs of a queue (its limit counts them)
CREATE INDEX claude_jobs_running_in_queue ON claude_jobs (queue) WHERE status = 'running';
-- How many jobs started, for rates, in buckets of a sixtieth of the rate's period (so that a
-- window is at most 61 rows however many it allows): of a rate-limited queue ('queue NAME',
-- per part of rate_by) and of every claude job ('kind claude': a worker's --max-starts). A
-- window counts every bucket that reaches into it (never fewer starts than there were). The
-- janitor deletes the buckets no window can reach.
CREATE TABLE claude_jobs_starts (
    limiter  text NOT NULL,
    part     text NOT NULL DEFAULT '',
    at       timestamptz NOT NULL,                 -- the bucket's start
    ends     timestamptz NOT NULL,
    starts   integer NOT NULL,
    PRIMARY KEY (limiter, part, at)
);
""",
    ),
    (
        17,
        """\
-- Transcripts written once: each flush appends what is new as a chunk of its own, instead of
-- rewriting the job row's kept tail (which grew the writes with the square of the output);
-- the chunks wholly before the kept tail are deleted. `upto`: where the chunk ends, counted
-- in the characters ever written to the job's transcript (transcript_size). A transcript
-- written before stays in the job's row until its next flush moves it here (no rewrite of
-- the table at the upgrade).
CREATE TABLE claude_jobs_output (
    job_id  uuid NOT NULL REFERENCES claude_jobs (id) ON DELETE CASCADE,
    upto    bigint NOT NULL,
    chunk   text NOT NULL,
    PRIMARY KEY (job_id, upto)
);
""",
    ),
)

SCHEMA_VERSION = MIGRATIONS[-1][0]

_SCHEMA_HEADER = """\
-- The claude-jobs schema, version {version}.
-- Generated from claude_jobs.MIGRATIONS by `claude-jobs migrate --print-sql`; do not edit.
-- Safe to run again and to run on an older claude-jobs schema: each version is applied once.
-- One migration at a time (the lock lasts until the end of the transaction):
SELECT pg_advisory_xact_lock({namespace}, {key});
CREATE TABLE IF NOT EXISTS claude_jobs_schema (
    version     integer PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
"""

_MIGRATION_BLOCK = """
-- version {version}
DO $migration_{version}$ BEGIN
IF NOT EXISTS (SELECT 1 FROM claude_jobs_schema WHERE version = {version}) THEN
{body}
INSERT INTO claude_jobs_schema (version) VALUES ({version});
END IF;
END $migration_{version}$;
"""


def schema_sql(migrations: Sequence[tuple[int, str]] = MIGRATIONS) -> str:
    """The schema as one idempotent SQL script; ``migrations.sql`` holds the same text."""
    header = _SCHEMA_HEADER.format(
        version=migrations[-1][0], namespace=LOCK_NAMESPACE, key=MIGRATION_LOCK_KEY
    )
    blocks = [header]
    for version, body in migrations:
        blocks.append(_MIGRATION_BLOCK.format(version=version, body=body.rstrip("\n")))
    return "BEGIN;\n" + "".join(blocks) + "COMMIT;\n"


###############################################################################
# Queries
###############################################################################

_JOB_COLUMNS = """id, queue, kind, priority, payload, status, run_at, attempts, max_attempts,
    timeout, last_error, errors, worker_id, worker, result, session_id, cost_usd, created_at,
    started_at, finished_at, updated_at, cancel_requested_at, transcript_size, concurrency_key,
    concurrency_limit, after, continue_from, session_host, worktree, widens, unique_key,
    schedule, scheduled_for, batch_id, callback_of, seq, claim, checks, delivery, notify,
    reviewed_at, tags"""

# The part of a rate's window that a job {j} of a queue with settings {q} starts in: the
# whole queue's, or its concurrency key's, kind's or cwd's (rate_by).
_RATE_PART = """CASE {q}.rate_by WHEN 'key' THEN coalesce({j}.concurrency_key, '')
                WHEN 'kind' THEN {j}.kind WHEN 'cwd' THEN coalesce({j}.payload->>'cwd', '')
                ELSE '' END"""

# How many jobs of queue {queue} run (through claude_jobs_running_in_queue).
_RUNNING_IN_QUEUE = """(SELECT count(*) FROM claude_jobs r
                WHERE r.status = 'running' AND r.queue = {queue})"""

# How many jobs started in the window of the rate of queue settings {q}, in its {part}: the
# buckets that reach into it.
_RATE_USED = """(SELECT coalesce(sum(s.starts), 0) FROM claude_jobs_starts s
                WHERE s.limiter = 'queue ' || {q}.queue AND s.part = {part}
                  AND s.ends > clock_timestamp() - make_interval(secs => {q}.rate_seconds))"""

# When the window of {limiter} ({part}), of at most {rate} starts per {seconds}, has room for
# one more: when the newest bucket that leaves fewer than {rate} starts newer than itself
# leaves it. NULL: it has room now.
_RATE_OPENS = """(SELECT b.ends + make_interval(secs => {seconds}) FROM (
                    SELECT s.ends, sum(s.starts) OVER (ORDER BY s.at DESC) AS newer
                    FROM claude_jobs_starts s
                    WHERE s.limiter = {limiter} AND s.part = {part}
                      AND s.ends > clock_timestamp() - make_interval(secs => {seconds})) b
                WHERE b.newer >= {rate} ORDER BY b.ends DESC LIMIT 1)"""
# (of the whole queue; of a job j's part)
_QUEUE_RATE_OPENS = _RATE_OPENS.format(limiter="'queue ' || q.queue", part="''",
                                       seconds="q.rate_seconds", rate="q.rate")  # fmt: skip
_JOB_RATE_OPENS = _RATE_OPENS.format(limiter="'queue ' || q.queue",
                                     part=_RATE_PART.format(q="q", j="j"),
                                     seconds="q.rate_seconds", rate="q.rate")  # fmt: skip
_QUEUE_RATE_USED = _RATE_USED.format(q="q", part="''")
_CLAIM_RATE_USED = _RATE_USED.format(q="q", part=_RATE_PART.format(q="q", j="c"))

# Add {starts} (a query of limiter, part, width in seconds, count) to their buckets.
_ADD_STARTS = """INSERT INTO claude_jobs_starts AS s (limiter, part, at, ends, starts)
    SELECT n.limiter, n.part, b.at, b.at + make_interval(secs => n.width), n.count
    FROM (
        {starts}
    ) n(limiter, part, width, count),
    LATERAL (SELECT to_timestamp(floor(extract(epoch FROM clock_timestamp()) / n.width)
                                 * n.width) AS at) b
    ON CONFLICT (limiter, part, at) DO UPDATE SET starts = s.starts + excluded.starts"""
# (the claim's: of the jobs it takes from rate-limited queues, per queue and part)
_CLAIMED_STARTS = _ADD_STARTS.format(
    starts="""SELECT 'queue ' || queue, part, rate_seconds / 60, count(*) FROM taken
        WHERE rated GROUP BY queue, part, rate_seconds"""
)

JOB_STATUSES = """
-- job_statuses: the status of each of these jobs, and the host that keeps its claude session
SELECT id, status, session_host FROM claude_jobs WHERE id = ANY(%(ids)s::uuid[])
"""

MIGRATION_LOCK = """
-- migration_lock: one migration at a time, until the end of the transaction
SELECT pg_advisory_xact_lock(%(namespace)s, %(key)s)
"""

SCHEMA_VERSION_QUERY = """
-- schema_version: the newest schema version applied to this database
SELECT max(version) AS version FROM claude_jobs_schema
"""

ENQUEUE = f"""
-- enqueue: insert one job and wake the workers of its queue, in one statement; nothing (no
-- row) if a queued or running job holds its unique key
WITH job AS (
    INSERT INTO claude_jobs (id, queue, kind, priority, payload, run_at, max_attempts, timeout,
        concurrency_key, concurrency_limit, after, continue_from, widens, blocked, unique_key,
        schedule, scheduled_for, batch_id, notify, tags)
    VALUES (%(id)s, %(queue)s, %(kind)s, %(priority)s, %(payload)s::jsonb,
            coalesce(%(run_at)s, now()), %(max_attempts)s, %(timeout)s, %(concurrency_key)s,
            %(concurrency_limit)s, %(after)s::uuid[], %(continue_from)s, %(widens)s::text[],
            %(blocked)s, %(unique_key)s, %(schedule)s, %(scheduled_for)s, %(batch_id)s,
            %(notify)s::jsonb, %(tags)s::text[])
    ON CONFLICT (unique_key) WHERE status IN ('queued', 'running') DO NOTHING
    RETURNING {_JOB_COLUMNS}
)
SELECT job.*, pg_notify(%(channel)s, json_build_object(
    'queue', job.queue,
    'at', CASE WHEN job.run_at > now() THEN extract(epoch FROM job.run_at) END)::text)
FROM job
"""

UNIQUE_HOLDER = f"""
-- unique_holder: the queued or running job that holds a unique key
SELECT {_JOB_COLUMNS} FROM claude_jobs
WHERE unique_key = %(key)s AND status IN ('queued', 'running')
"""

TAKE_UNIQUE_WINDOW = """
-- take_unique_window: open a key's window for a new job, unless one is open (its row is
-- locked either way, until the end of the transaction); no row: the window is someone's
INSERT INTO claude_jobs_unique_windows AS w (key, job_id, until)
VALUES (%(key)s, %(id)s, now() + make_interval(secs => %(seconds)s))
ON CONFLICT (key) DO UPDATE SET job_id = excluded.job_id, until = excluded.until
WHERE w.until <= now()
RETURNING job_id
"""

UNIQUE_WINDOW_HOLDER = f"""
-- unique_window_holder: the job of a key's open window (the row is ours, locked), if it is
-- still there (cleanup deletes old jobs)
SELECT w.job_id AS holder, j.* FROM claude_jobs_unique_windows w
LEFT JOIN LATERAL (SELECT {_JOB_COLUMNS} FROM claude_jobs WHERE id = w.job_id) j ON true
WHERE w.key = %(key)s
"""

OPEN_UNIQUE_WINDOW_JOB = f"""
-- open_unique_window_job: the job of a key's window, if the window is open and its job still
-- there (what keeps an enqueue of the key without a window of its own out)
SELECT {_JOB_COLUMNS} FROM claude_jobs
WHERE id = (SELECT job_id FROM claude_jobs_unique_windows
            WHERE key = %(key)s AND until > now())
"""

HAND_OVER_UNIQUE_WINDOW = """
-- hand_over_unique_window: the window of a key whose job is gone is the new job's
UPDATE claude_jobs_unique_windows
SET job_id = %(id)s, until = now() + make_interval(secs => %(seconds)s)
WHERE key = %(key)s
"""

LOCK_UNIQUE_KEYS = """
-- lock_unique_keys: one enqueue_many at a time per unique key, taken in order (two batches
-- that share keys then never wait for each other's index entries in a circle)
SELECT pg_advisory_xact_lock(%(namespace)s, hashtext(key))
FROM unnest(%(keys)s::text[]) AS k(key) ORDER BY key
"""

CLOSED_UNIQUE_WINDOWS = """
-- closed_unique_windows: forget the windows that have ended
DELETE FROM claude_jobs_unique_windows WHERE until < now()
"""

COPY_JOBS = """
-- copy_jobs: bulk insert (enqueue_many) of jobs ready now, by the database's clock
COPY claude_jobs (id, queue, kind, priority, max_attempts, payload, timeout, concurrency_key,
    concurrency_limit, after, blocked, batch_id, notify, tags) FROM STDIN
"""

COPY_SCHEDULED_JOBS = """
-- copy_scheduled_jobs: bulk insert (enqueue_many) of jobs that wait for their run_at
COPY claude_jobs (id, queue, kind, priority, max_attempts, payload, timeout, concurrency_key,
    concurrency_limit, after, blocked, batch_id, notify, tags, run_at) FROM STDIN
"""

FIND_BATCH = """
-- find_batch: the open batch of a name, if there is one
SELECT id FROM claude_jobs_batches WHERE name = %(name)s AND finished_at IS NULL
"""

OPEN_BATCH = """
-- open_batch: a new batch of a name, unless one of that name is open (no row then)
INSERT INTO claude_jobs_batches (id, name, on_finish, on_success, notify)
VALUES (%(id)s, %(name)s, %(on_finish)s::jsonb, %(on_success)s::jsonb, %(notify)s::jsonb)
ON CONFLICT (name) WHERE finished_at IS NULL DO NOTHING
RETURNING id
"""

HOLD_BATCH = """
-- hold_batch: keep a batch open until the end of the transaction, that jobs were just added
-- to (whatever ends its jobs waits for the lock, then sees them); no row if it has finished
SELECT id FROM claude_jobs_batches WHERE id = %(id)s AND finished_at IS NULL FOR SHARE
"""

CHANGE_BATCH_CALLBACKS = """
-- change_batch_callbacks: replace an open batch's callbacks (and whom its end is told) by
-- those given, if they differ (its row then locked until the end of the transaction); no row
-- if they do not
UPDATE claude_jobs_batches
SET on_finish = coalesce(%(on_finish)s::jsonb, on_finish),
    on_success = coalesce(%(on_success)s::jsonb, on_success),
    notify = coalesce(%(notify)s::jsonb, notify)
WHERE id = %(id)s AND finished_at IS NULL
  AND (on_finish, on_success, notify) IS DISTINCT FROM
      (coalesce(%(on_finish)s::jsonb, on_finish), coalesce(%(on_success)s::jsonb, on_success),
       coalesce(%(notify)s::jsonb, notify))
RETURNING id
"""

NOTIFY_QUEUE = """
-- notify_queue: wake the workers of a queue; `at` is when its first job becomes ready
SELECT pg_notify(%(channel)s, json_build_object(
    'queue', %(queue)s::text,
    'at', CASE WHEN %(run_at)s::timestamptz > now()
               THEN extract(epoch FROM %(run_at)s::timestamptz) END)::text)
"""

GET_JOB = f"""
-- get_job: one job with its transcript's kept tail: its chunks, or the tail in its row (a
-- transcript written before the chunks were)
SELECT {_JOB_COLUMNS}, right(coalesce(
        (SELECT string_agg(o.chunk, '' ORDER BY o.upto) FROM claude_jobs_output o
         WHERE o.job_id = j.id), j.transcript), {TRANSCRIPT_LIMIT}) AS transcript
FROM claude_jobs j WHERE id = %(id)s
"""

GET_JOB_STATE = f"""
-- get_job_state: one job without its transcript
SELECT {_JOB_COLUMNS} FROM claude_jobs WHERE id = %(id)s
"""

KEY_HOLDERS = """
-- key_holders: the running jobs that hold a slot of each of these concurrency keys
SELECT concurrency_key, array_agg(id ORDER BY started_at) AS holders FROM claude_jobs
WHERE status = 'running' AND key_held AND concurrency_key = ANY(%(keys)s::text[])
GROUP BY concurrency_key
"""

JOBS_IN_RANGE = """
-- jobs_in_range: ids between two ids (an id prefix, padded with 0s and with fs)
SELECT id FROM claude_jobs WHERE id BETWEEN %(low)s AND %(high)s ORDER BY id LIMIT 6
"""

# The filters `list` and the bulk actions share (each NULL: not given).
_JOB_FILTERS = """(%(queue)s::text IS NULL OR queue = %(queue)s::text)
  AND (%(kind)s::text IS NULL OR kind = %(kind)s::text)
  AND (%(text)s::text IS NULL OR strpos(lower(payload->>'prompt'), lower(%(text)s::text)) > 0)
  AND (%(cwd)s::text IS NULL OR payload->>'cwd' = %(cwd)s::text)
  AND (%(batch)s::uuid IS NULL OR batch_id = %(batch)s::uuid)
  AND (%(tag)s::text IS NULL OR tags @> ARRAY[%(tag)s::text])"""

_LIST_JOBS = f"""
-- list_jobs: jobs {{what}} (in enqueue order), filtered, from where the last page ended
-- (keyset paging through claude_jobs_newest: a page costs the same at the millionth job as at
-- the first)
SELECT {_JOB_COLUMNS} FROM claude_jobs
WHERE (%(statuses)s::text[] IS NULL OR status = ANY(%(statuses)s::text[])) AND {_JOB_FILTERS}
  AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s::timestamptz)
  AND (%(pr)s::text IS NULL OR delivery->'pr'->>'state' = %(pr)s::text)
  AND (%(before_at)s::timestamptz IS NULL OR (created_at, seq, id)
       {{beyond}} (%(before_at)s::timestamptz, %(before_seq)s::bigint, %(before_id)s::uuid))
ORDER BY created_at {{order}}, seq {{order}}, id {{order}}
LIMIT %(limit)s
"""
LIST_JOBS = _LIST_JOBS.format(what="newest first", beyond="<", order="DESC")
LIST_NEWER_JOBS = _LIST_JOBS.format(  # (the page before: the oldest of the newer ones first)
    what="oldest first, newer than a page's first", beyond=">", order="ASC"
)

LOCK_JOBS = """
-- lock_jobs: the status of each of these jobs, locked until the end of the transaction
SELECT id, status FROM claude_jobs WHERE id = ANY(%(ids)s::uuid[]) ORDER BY id FOR UPDATE
"""

CANCEL_QUEUED = """
-- cancel_queued: queued jobs are cancelled at once, in one statement (the batches of them
-- all are then locked together, in one order: see claude_jobs_finish_batches)
UPDATE claude_jobs
SET status = 'cancelled', finished_at = now(), updated_at = now(),
    last_error = 'cancelled before it ran'
WHERE id = ANY(%(ids)s::uuid[]) AND status = 'queued'
RETURNING id, concurrency_key
"""

REQUEST_CANCEL = """
-- request_cancel: ask the worker running a job to stop it; NOTIFY tells it at once
WITH asked AS (
    UPDATE claude_jobs
    SET cancel_requested_at = coalesce(cancel_requested_at, now()), updated_at = now()
    WHERE id = %(id)s AND status = 'running'
    RETURNING id, worker
)
SELECT id, worker, pg_notify(%(channel)s, json_build_object('cancel', id)::text) FROM asked
"""

# Whether queued job {w} waits for other jobs: for one it runs after that has not succeeded
# (or is gone), or for the job it continues to finish. Such a job is blocked by the sweep.
# (A scalar subquery, not EXISTS, looks up the continued job: PostgreSQL may turn an EXISTS
# under an OR into a hashed scan of every job.)
_WAITS_FOR_JOBS = """(
    ({w}.after IS NOT NULL AND EXISTS (
        SELECT FROM unnest({w}.after) AS a(id) LEFT JOIN claude_jobs d ON d.id = a.id
        WHERE d.status IS DISTINCT FROM 'succeeded'))
    OR ({w}.continue_from IS NOT NULL AND coalesce((
        SELECT p.status IN ('queued', 'running') FROM claude_jobs p
        WHERE p.id = {w}.continue_from), false)))"""

RETRY = f"""
-- retry: failed or cancelled jobs (these ids, or all of a status and queue) back to the
-- queue now, with fresh attempts; their errors stay on record. Not a job that waits for one
-- that failed or was cancelled (unless this retries that one too), or that waits for or
-- continues one that is gone: it would only be cancelled again. Not a job whose unique key
-- a queued or running job holds, and of several of one key, only the newest.
WITH chosen AS (
    SELECT DISTINCT ON (coalesce(c.unique_key, c.id::text)) c.id FROM claude_jobs c
    WHERE c.status IN ('failed', 'cancelled') AND c.status = ANY(%(statuses)s::text[])
      AND (%(ids)s::uuid[] IS NULL OR c.id = ANY(%(ids)s::uuid[]))
      AND (%(queue)s::text IS NULL OR c.queue = %(queue)s::text)
      AND (c.unique_key IS NULL OR NOT EXISTS (
          SELECT FROM claude_jobs h
          WHERE h.unique_key = c.unique_key AND h.status IN ('queued', 'running')))
    ORDER BY coalesce(c.unique_key, c.id::text), c.created_at DESC
), again AS (
    UPDATE claude_jobs j
    SET status = 'queued', attempts = 0, run_at = now(), started_at = NULL, finished_at = NULL,
        cancel_requested_at = NULL, claim = NULL, worker_id = NULL, worker = NULL,
        last_error = NULL, updated_at = now(), checks = NULL,  -- (its checks start over)
        reviewed_at = NULL,  -- (its next end is to be looked at)
        -- (still waiting for a job not over, or continuing one retried here with it)
        blocked = CASE WHEN {_WAITS_FOR_JOBS.format(w="j")}
                            OR j.continue_from IN (SELECT id FROM chosen) THEN 'jobs' END
    FROM chosen
    WHERE j.id = chosen.id
      AND NOT EXISTS (SELECT FROM unnest(j.after) AS a(id) LEFT JOIN claude_jobs d ON d.id = a.id
                      WHERE d.id IS NULL OR (d.status IN ('failed', 'cancelled')
                                             AND d.id NOT IN (SELECT id FROM chosen)))
      AND (j.continue_from IS NULL
           OR EXISTS (SELECT FROM claude_jobs p WHERE p.id = j.continue_from))
    RETURNING j.id, j.queue
)
SELECT id, pg_notify(%(channel)s, json_build_object('queue', queue)::text) FROM again
"""

# How long the oldest ready job of queue {q} has waited (NULL: none is ready): an index probe
# through claude_jobs_queued_in_queue (queue, run_at).
_OLDEST_READY = """(
    SELECT extract(epoch FROM now() - min(j.run_at)) FROM claude_jobs j
    WHERE j.status = 'queued' AND j.queue = {q} AND j.run_at <= now())"""

QUEUE_STATS = f"""
-- queue_stats: per queue: jobs by status (kept counts: see migration 7), the oldest ready
-- job, the last hour, run times of the last day, what claude cost; its settings (paused,
-- limits), and the queues that have settings even when empty. Cost at 1M jobs: the counts;
-- an index range over the jobs due later; an index probe per queue; an index range over the
-- jobs that ended in the last day.
WITH counts AS (
    SELECT queue, status, sum(jobs)::bigint AS jobs, sum(entered) AS entered,
        sum(cost_usd) AS cost_usd
    FROM claude_jobs_counts GROUP BY 1, 2
), queues AS (
    SELECT queue, sum(jobs) FILTER (WHERE status = 'queued')::bigint AS queued,
        sum(jobs) FILTER (WHERE status = 'running')::bigint AS running,
        sum(jobs) FILTER (WHERE status = 'succeeded')::bigint AS succeeded,
        sum(jobs) FILTER (WHERE status = 'failed')::bigint AS failed,
        sum(jobs) FILTER (WHERE status = 'cancelled')::bigint AS cancelled,
        sum(cost_usd) AS cost_usd
    FROM counts GROUP BY queue HAVING sum(jobs) <> 0 OR sum(entered) <> 0  -- (ever used)
), later AS (
    -- (through claude_jobs_scheduled: only the jobs due later)
    SELECT queue, count(*) AS scheduled FROM claude_jobs
    WHERE status = 'queued' AND run_at > created_at AND run_at > now() GROUP BY queue
), recent AS (
    -- (through claude_jobs_finished: only the jobs that ended in the last day)
    SELECT queue,
        count(*) FILTER (WHERE status = 'succeeded' AND finished_at > now() - interval '1 hour')
            AS succeeded_last_hour,
        count(*) FILTER (WHERE status = 'failed' AND finished_at > now() - interval '1 hour')
            AS failed_last_hour,
        percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at))
            FILTER (WHERE status = 'succeeded') AS median_run_seconds,
        percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at))
            FILTER (WHERE status = 'succeeded') AS p95_run_seconds
    FROM claude_jobs
    WHERE status IN ('succeeded', 'failed', 'cancelled') AND finished_at > now() - interval '1 day'
    GROUP BY queue
), settings AS (
    SELECT queue, paused_at IS NOT NULL AS paused, max_running, rate, rate_seconds, rate_by
    FROM claude_jobs_queues
)
SELECT coalesce(queues.queue, settings.queue) AS queue, coalesce(paused, false) AS paused,
    max_running, rate, rate_seconds, rate_by,
    coalesce(queued, 0) - coalesce(scheduled, 0) AS ready, coalesce(scheduled, 0) AS scheduled,
    coalesce(running, 0) AS running, coalesce(succeeded, 0) AS succeeded,
    coalesce(failed, 0) AS failed, coalesce(cancelled, 0) AS cancelled,
    coalesce(succeeded_last_hour, 0) AS succeeded_last_hour,
    coalesce(failed_last_hour, 0) AS failed_last_hour,
    {_OLDEST_READY.format(q="queues.queue")} AS oldest_ready_seconds,
    median_run_seconds, p95_run_seconds, coalesce(cost_usd, 0) AS cost_usd
FROM queues FULL JOIN settings ON settings.queue = queues.queue
    LEFT JOIN later ON later.queue = queues.queue
    LEFT JOIN recent ON recent.queue = queues.queue
ORDER BY 1
"""

JOB_COUNTS = """
-- job_counts: per queue and status, the jobs there are and how many ever entered it (kept
-- counts), and the run times of those that ended after running
SELECT queue, status, sum(jobs)::bigint AS jobs, sum(entered)::bigint AS entered,
    sum(cost_usd) AS cost_usd, sum(run_seconds) AS run_seconds
FROM claude_jobs_counts GROUP BY 1, 2 ORDER BY 1, 2
"""

TAG_COUNTS = """
-- tag_counts: the jobs of a tag by queue and status, and what they cost (through its index)
SELECT queue, status, count(*) AS jobs, coalesce(sum(cost_usd), 0) AS cost_usd
FROM claude_jobs WHERE tags @> ARRAY[%(tag)s::text] AND tags IS NOT NULL
GROUP BY queue, status ORDER BY queue, status
"""

TIMELINE = """
-- timeline: the jobs that ended (succeeded, failed) per minute or hour since a time, through
-- the index of finished jobs
SELECT date_trunc(%(step)s, finished_at, 'UTC') AS at,
    count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
    count(*) FILTER (WHERE status = 'failed') AS failed
FROM claude_jobs
WHERE status IN ('succeeded', 'failed') AND finished_at >= %(since)s
GROUP BY 1 ORDER BY 1
"""

RUN_TIMES = """
-- run_times: per queue and status, how many ended runs took at most `le` seconds
SELECT queue, status, le, sum(runs)::bigint AS runs FROM claude_jobs_run_times
GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
"""

#: The bounds of the kept run-time histogram (claude_jobs_run_time_buckets()), as Prometheus
#: writes them.
RUN_TIME_BUCKETS = ("1", "5", "15", "30", "60", "120", "300", "600", "1800", "3600", "7200", "+Inf")

READY_AGES = f"""
-- ready_ages: per queue with queued jobs, how long its oldest ready one has waited (an index
-- probe per queue)
SELECT c.queue, {_OLDEST_READY.format(q="c.queue")} AS age
FROM (SELECT queue FROM claude_jobs_counts WHERE status = 'queued' GROUP BY queue
      HAVING sum(jobs) > 0) c
"""

COST_TOTALS = """
-- cost_totals: what claude cost per queue, ever (the spend ledger: a row per day, queue and
-- model)
SELECT queue, sum(cost_usd) FROM claude_jobs_spend GROUP BY queue ORDER BY queue
"""

FOLD_COUNTS = """
-- fold_counts: replace the rows appended to the kept counts by their sums (a row deleted
-- here by two at once is summed by one of them only: the other finds it gone)
WITH gone AS (DELETE FROM claude_jobs_counts RETURNING *)
INSERT INTO claude_jobs_counts (queue, status, jobs, cost_usd, entered, run_seconds)
SELECT queue, status, sum(jobs), sum(cost_usd), sum(entered), sum(run_seconds) FROM gone
GROUP BY 1, 2
HAVING sum(jobs) <> 0 OR sum(cost_usd) <> 0 OR sum(entered) <> 0 OR sum(run_seconds) <> 0
"""

BACKLOG_BELIEF = """
-- backlog_belief: how many unfinished (queued or running) jobs there are, by the kept counts,
-- and how many the planner believes there are, by the table's statistics (its estimate of
-- rows times the share of unfinished ones in ANALYZE's sample; 0 for a table never analyzed)
SELECT (SELECT coalesce(sum(jobs), 0) FROM claude_jobs_counts
        WHERE status IN ('queued', 'running'))::float8 AS actual,
    (SELECT greatest(c.reltuples, 0) * coalesce((
         SELECT sum(m.freq) FROM pg_stats s,
             unnest(s.most_common_vals::text::text[], s.most_common_freqs) AS m(value, freq)
         WHERE s.schemaname = n.nspname AND s.tablename = c.relname AND s.attname = 'status'
           AND m.value IN ('queued', 'running')), 0)
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = 'claude_jobs'::regclass)::float8 AS believed
"""

ANALYZE_JOBS = """
-- analyze_jobs: fresh statistics of the jobs table (every session's plans of it are made
-- again with them)
ANALYZE claude_jobs
"""

FOLD_RUN_TIMES = """
-- fold_run_times: the same for the run times
WITH gone AS (DELETE FROM claude_jobs_run_times RETURNING *)
INSERT INTO claude_jobs_run_times (queue, status, le, runs)
SELECT queue, status, le, sum(runs) FROM gone GROUP BY 1, 2, 3 HAVING sum(runs) <> 0
"""

LIST_WORKERS = f"""
-- list_workers: every registered worker, the jobs it runs now, how long it has been silent,
-- whether its session still holds its lock (none does once it was killed: it is lost before
-- its heartbeat is old), and what is wrong with its parts; then the workers found dead in the
-- last LOST_WORKERS_KEPT seconds, with when and how many of their jobs went back
SELECT w.id, w.host, w.pid, w.queues, w.kinds, w.concurrency, w.started_at, w.last_heartbeat,
    w.draining_since, extract(epoch FROM now() - w.last_heartbeat) AS silent_seconds,
    w.lock_key NOT IN (
        SELECT l.objid::bigint FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.granted AND l.classid = {LOCK_NAMESPACE}
          AND l.objsubid = 2 AND l.database = (SELECT oid FROM pg_database
                                               WHERE datname = current_database())
    ) AS unlocked,
    (SELECT count(*) FROM claude_jobs j WHERE j.status = 'running' AND j.worker_id = w.id)
        AS running,
    -- it starts no claude job until then, and why (unfit for them, or its budget is spent)
    CASE WHEN w.claude_paused_until > now() THEN w.claude_paused_until END AS claude_paused_until,
    CASE WHEN w.claude_paused_until > now() THEN w.claude_paused_reason END
        AS claude_paused_reason,
    w.trouble, NULL::timestamptz AS lost_at, NULL AS lost_because, NULL::integer AS recovered
FROM claude_jobs_workers w
UNION ALL
SELECT d.id, d.host, d.pid, d.queues, d.kinds, d.concurrency, d.started_at, d.last_heartbeat,
    NULL, extract(epoch FROM now() - d.last_heartbeat), true, 0, NULL, NULL, NULL, d.lost_at,
    d.reason, d.recovered
FROM claude_jobs_lost_workers d
WHERE d.lost_at > now() - make_interval(secs => {LOST_WORKERS_KEPT})
ORDER BY started_at
"""

FIND_WORKERS = """
-- find_workers: the workers whose id begins so, or that run as this host:pid
SELECT id, host, pid, draining_since FROM claude_jobs_workers
WHERE id::text LIKE %(prefix)s || '%%' OR host || ':' || pid = %(name)s
ORDER BY started_at LIMIT 6
"""

DRAIN_WORKER = """
-- drain_worker: ask a worker to claim nothing more and exit once its running jobs end;
-- NOTIFY tells it at once (its heartbeat reads it too, should the notice be missed)
WITH asked AS (
    UPDATE claude_jobs_workers SET draining_since = coalesce(draining_since, now())
    WHERE id = %(id)s RETURNING id
)
SELECT id, pg_notify(%(channel)s, json_build_object('drain', id)::text) FROM asked
"""

_MATCHING_WHERE = f"""status = ANY(%(statuses)s::text[]) AND {_JOB_FILTERS}
  AND (%(before)s::timestamptz IS NULL OR created_at < %(before)s::timestamptz)"""

COUNT_MATCHING = f"""
-- count_matching: how many jobs a filter matches (what a bulk action would do, said first)
SELECT count(*) FROM claude_jobs WHERE {_MATCHING_WHERE}
"""

MATCHING_CHUNK = f"""
-- matching_chunk: the next jobs a filter matches, newest first (of several of one unique key,
-- the newest is retried) after the last one taken, locked until the end of the transaction (a
-- bulk action goes through them a chunk at a time: all or none)
SELECT id, created_at, seq FROM claude_jobs WHERE {_MATCHING_WHERE}
  AND (%(last_at)s::timestamptz IS NULL
       OR (created_at, seq, id) < (%(last_at)s::timestamptz, %(last_seq)s::bigint, %(last)s::uuid))
ORDER BY created_at DESC, seq DESC, id DESC LIMIT %(chunk)s
FOR UPDATE
"""

CHANGE_QUEUED_MANY = """
-- change_queued_many: these queued jobs' priority, or (`now`) those that wait for their time
-- due now; how many; the workers of their queues wake
WITH changed AS (
    UPDATE claude_jobs
    SET run_at = CASE WHEN %(now)s THEN now() ELSE run_at END,
        priority = coalesce(%(priority)s, priority), updated_at = now()
    WHERE id = ANY(%(ids)s::uuid[]) AND status = 'queued' AND (NOT %(now)s OR run_at > now())
    RETURNING queue
)
SELECT (SELECT count(*) FROM changed),
    (SELECT count(pg_notify(%(channel)s, json_build_object('queue', queue)::text))
     FROM (SELECT DISTINCT queue FROM changed) queues)
"""

CHANGE_QUEUED = """
-- change_queued: a queued job's due time or priority (what is NULL here stays), or (`now`)
-- a job that waits for its time (delayed, or retrying after a failure) due now; the workers
-- of its queue wake (when it is due)
WITH changed AS (
    UPDATE claude_jobs
    SET run_at = CASE WHEN %(now)s THEN now() ELSE coalesce(%(run_at)s, run_at) END,
        priority = coalesce(%(priority)s, priority), updated_at = now()
    WHERE id = %(id)s AND status = 'queued' AND (NOT %(now)s OR run_at > now())
    RETURNING id, queue, run_at, priority
)
SELECT id, run_at, priority, pg_notify(%(channel)s, json_build_object(
    'queue', queue,
    'at', CASE WHEN run_at > now() THEN extract(epoch FROM run_at) END)::text)
FROM changed
"""

PAUSE_QUEUE = """
-- pause_queue: workers claim nothing more from this queue (true: it was not paused yet)
INSERT INTO claude_jobs_queues AS q (queue, paused_at, paused_by)
VALUES (%(queue)s, now(), %(by)s)
ON CONFLICT (queue) DO UPDATE
SET paused_at = coalesce(q.paused_at, now()), paused_by = coalesce(q.paused_by, %(by)s)
RETURNING (SELECT paused_at IS NULL FROM claude_jobs_queues WHERE queue = %(queue)s)
    IS NOT false AS newly
"""

RESUME_QUEUE = """
-- resume_queue: workers claim from this queue again, woken at once (a row: it was paused)
WITH resumed AS (
    UPDATE claude_jobs_queues SET paused_at = NULL, paused_by = NULL
    WHERE queue = %(queue)s AND paused_at IS NOT NULL
    RETURNING queue
)
SELECT queue, pg_notify(%(channel)s, json_build_object('queue', queue)::text) FROM resumed
"""

QUEUE_SETTINGS = """
-- queue_settings: a queue's settings row, if it has one
SELECT * FROM claude_jobs_queues WHERE queue = %(queue)s
"""

SET_QUEUE_LIMITS = """
-- set_queue_limits: a queue's limits, and the workers woken to claim under them
WITH set AS (
    INSERT INTO claude_jobs_queues AS q (queue, max_running, rate, rate_seconds, rate_by,
        changed_at)
    VALUES (%(queue)s, %(max_running)s, %(rate)s, %(rate_seconds)s, %(rate_by)s, now())
    ON CONFLICT (queue) DO UPDATE
    SET max_running = excluded.max_running, rate = excluded.rate,
        rate_seconds = excluded.rate_seconds, rate_by = excluded.rate_by, changed_at = now()
    RETURNING queue
)
SELECT pg_notify(%(channel)s, json_build_object('queue', queue)::text) FROM set
"""

QUEUE_NOW = f"""
-- queue_now: how a limited queue stands: the starts in the window of its rate (every part),
-- and, for a rate of the whole queue, when it has room for one more
SELECT (SELECT coalesce(sum(s.starts), 0) FROM claude_jobs_starts s
        WHERE s.limiter = 'queue ' || q.queue
          AND s.ends > clock_timestamp() - make_interval(secs => q.rate_seconds))
        AS started_in_window,
    CASE WHEN q.rate IS NOT NULL AND q.rate_by IS NULL THEN {_QUEUE_RATE_OPENS} END
        AS rate_opens
FROM claude_jobs_queues q WHERE q.queue = %(queue)s
"""

JOB_LIMITS = f"""
-- job_limits: for each of these jobs in a limited queue, its queue's limits, how many of the
-- queue's jobs run, and when the part of its rate's window that it starts in has room for
-- one more (NULL: now)
SELECT j.id, q.queue, q.max_running, q.rate, q.rate_seconds, q.rate_by,
    {_RUNNING_IN_QUEUE.format(queue="q.queue")} AS running,
    CASE WHEN q.rate IS NOT NULL THEN {_JOB_RATE_OPENS} END AS opens
FROM claude_jobs j JOIN claude_jobs_queues q ON q.queue = j.queue
WHERE j.id = ANY(%(ids)s::uuid[]) AND (q.max_running IS NOT NULL OR q.rate IS NOT NULL)
"""

FORGET_STARTS = """
-- forget_starts: delete the starts no window can reach any more
DELETE FROM claude_jobs_starts WHERE ends < now() - make_interval(secs => %(seconds)s)
"""

# The ids that unfinished jobs wait for (--after) or continue, through claude_jobs_waiting;
# uncorrelated, so that PostgreSQL builds the set once per statement and probes it by hash.
_AWAITED_IDS = """(
    SELECT unnest(after) FROM claude_jobs
    WHERE status IN ('queued', 'running') AND after IS NOT NULL
    UNION ALL
    SELECT continue_from FROM claude_jobs
    WHERE status IN ('queued', 'running') AND continue_from IS NOT NULL)"""

CLEANUP_BATCH = f"""
-- cleanup_batch: delete up to `batch` jobs of these statuses finished before `before`,
-- but not one that an unfinished job waits for or continues (it would be cancelled as gone)
DELETE FROM claude_jobs WHERE id IN (
    SELECT d.id FROM claude_jobs d
    WHERE d.status IN ('succeeded', 'failed', 'cancelled') AND d.status = ANY(%(statuses)s::text[])
      AND d.finished_at < %(before)s AND d.id NOT IN {_AWAITED_IDS}
    LIMIT %(batch)s FOR UPDATE OF d SKIP LOCKED)
"""

TRY_TASK_LOCK = """
-- try_task_lock: one worker at a time does this task (cleanup, blocking), for the rest of
-- the transaction
SELECT pg_try_advisory_xact_lock(%(namespace)s, %(task)s)
"""

PAUSED_QUEUES = """
-- paused_queues: the queues workers do not claim from
SELECT queue FROM claude_jobs_queues WHERE paused_at IS NOT NULL
"""

QUEUE_KNOWN = """
-- queue_known: whether a job, or the ledger of what claude spent, ever named this queue
SELECT EXISTS (SELECT FROM claude_jobs WHERE queue = %(queue)s)
    OR EXISTS (SELECT FROM claude_jobs_spend WHERE queue = %(queue)s)
"""

KNOWN_QUEUES = """
-- known_queues: the queues jobs and the ledger name (a scan of every job: for rare use)
SELECT queue FROM claude_jobs UNION SELECT queue FROM claude_jobs_spend ORDER BY 1
"""

# Whether an unfinished job needs the worktree at {path}, made by job {job}: that job itself,
# a running job in it, or a queued or running continuation of a job that ran in it.
_WORKTREE_BUSY = """(
    EXISTS (SELECT FROM claude_jobs j WHERE j.id = {job} AND j.status IN ('queued', 'running'))
    OR EXISTS (SELECT FROM claude_jobs u
               WHERE u.status = 'running' AND u.worktree->>'path' = {path})
    OR EXISTS (SELECT FROM claude_jobs u JOIN claude_jobs p ON p.id = u.continue_from
               WHERE u.status IN ('queued', 'running') AND p.worktree->>'path' = {path}))"""

LIST_WORKTREES = f"""
-- list_worktrees: the worktrees jobs ran in, newest first, with the status of the job that
-- made them (NULL: deleted since), the state of that job's pull request (as last looked at),
-- and whether an unfinished job needs them (busy)
SELECT w.host, w.path, w.repo, w.branch, w.base, w.job_id, w.created_at, w.used_at, j.status,
    j.delivery->'pr'->>'state' AS pr_state,
    {_WORKTREE_BUSY.format(job="w.job_id", path="w.path")} AS busy
FROM claude_jobs_worktrees w LEFT JOIN claude_jobs j ON j.id = w.job_id
ORDER BY w.created_at DESC
"""

WORKTREE_BUSY = f"""
-- worktree_busy: whether an unfinished job needs this worktree (as in list_worktrees)
SELECT {_WORKTREE_BUSY.format(job="%(job)s", path="%(path)s")}
"""

FORGET_WORKTREE = """
-- forget_worktree: a worktree whose directory and branch are both gone
DELETE FROM claude_jobs_worktrees WHERE host = %(host)s AND path = %(path)s
"""

COUNT_QUEUED = """
-- count_queued: how many jobs wait in a queue
SELECT count(*) FROM claude_jobs WHERE queue = %(queue)s AND status = 'queued'
"""

PURGE_BOUND = """
-- purge_bound: a number above the seq of every job enqueued so far (purge deletes those:
-- not the callbacks its deletions queue, nor jobs enqueued while it runs)
SELECT nextval('claude_jobs_seq')
"""

PURGE_BATCH = """
-- purge_batch: delete up to `batch` queued jobs of a queue enqueued before `bound`
DELETE FROM claude_jobs WHERE id IN (
    SELECT id FROM claude_jobs
    WHERE queue = %(queue)s AND status = 'queued' AND seq < %(bound)s
    LIMIT %(batch)s FOR UPDATE SKIP LOCKED)
RETURNING id, concurrency_key
"""

FOLLOW_JOB = f"""
-- follow_job: a job (without its transcript) and what its transcript gained since `seen`
-- characters
SELECT {_JOB_COLUMNS}, coalesce(
        -- (the chunks that end after it, each from where it begins or `seen`)
        (SELECT string_agg(right(o.chunk, least(o.upto - %(seen)s, length(o.chunk))::integer),
                           '' ORDER BY o.upto)
         FROM claude_jobs_output o WHERE o.job_id = j.id AND o.upto > %(seen)s),
        right(j.transcript, least(j.transcript_size - %(seen)s, length(j.transcript))::integer))
        AS new
FROM claude_jobs j WHERE j.id = %(id)s
"""

_CLAIM = f"""
-- claim: take up to `limit` ready jobs of the kinds this worker may start, highest priority
-- first, then oldest run_at, then first enqueued; skip rows other workers are claiming now.
WITH me AS (
    -- a worker declared dead must not claim; the share lock makes its reaper wait for us
    SELECT id, notify FROM claude_jobs_workers WHERE id = %(worker_id)s FOR KEY SHARE
), closed AS MATERIALIZED (
    -- the queues no job is claimed from now, found once: paused, every slot taken, or no
    -- start left in the window of a rate of the whole queue (a rate per key, kind or cwd is
    -- looked at per job, below)
    SELECT q.queue FROM claude_jobs_queues q
    WHERE q.paused_at IS NOT NULL
       OR q.max_running <= {_RUNNING_IN_QUEUE.format(queue="q.queue")}
       OR (q.rate_by IS NULL AND q.rate <= {_QUEUE_RATE_USED})
), ready AS (
    SELECT c.id, c.queue, c.priority, c.run_at, c.seq, q.room, q.part, q.rate_room,
        q.rate_seconds
    FROM claude_jobs c LEFT JOIN LATERAL (
        -- its limited queue's room: how many more may run, how many more may start in the
        -- window of its rate (in its part: rate_room); NULL: no limit
        SELECT {_RATE_PART.format(q="q", j="c")} AS part, q.rate_seconds,
            CASE WHEN q.max_running IS NOT NULL
                THEN q.max_running - {_RUNNING_IN_QUEUE.format(queue="c.queue")} END AS room,
            CASE WHEN q.rate IS NOT NULL THEN q.rate - {_CLAIM_RATE_USED} END AS rate_room
        FROM claude_jobs_queues q
        WHERE q.queue = c.queue AND (q.max_running IS NOT NULL OR q.rate IS NOT NULL)) q ON true
    WHERE c.status = 'queued' AND c.blocked IS NULL AND c.run_at <= now() {{queue_filter}}
      AND c.kind = ANY(%(kinds)s) AND EXISTS (SELECT FROM me)
      AND NOT coalesce(q.room <= 0 OR q.rate_room <= 0, false)
      -- (checked here too for a job not marked blocked yet: the marks only save work)
      -- the jobs it waits for all succeeded, and the job it continues finished
      AND NOT {_WAITS_FOR_JOBS.format(w="c")}
      -- whose session is kept on this host (or is not known to be kept anywhere)
      AND (c.continue_from IS NULL OR (
          SELECT coalesce(p.session_host, %(host)s) = %(host)s FROM claude_jobs p
          WHERE p.id = c.continue_from))
      -- its concurrency key has a free slot (taking it, admission makes sure), and no job of
      -- the key ahead of it was claimed and waits to be admitted (it would be refused: ADMIT)
      AND (c.concurrency_key IS NULL OR (c.concurrency_limit > (
          SELECT count(*) FROM claude_jobs r
          WHERE r.status = 'running' AND r.key_held AND r.concurrency_key = c.concurrency_key)
        AND NOT EXISTS (
          SELECT FROM claude_jobs e
          WHERE e.status = 'running' AND NOT e.key_held AND e.concurrency_key = c.concurrency_key
            AND (e.priority > c.priority OR (e.priority = c.priority
                 AND (e.run_at, e.seq) < (c.run_at, c.seq))))))
    ORDER BY c.priority DESC, c.run_at, c.seq
    LIMIT %(limit)s
    FOR UPDATE OF c SKIP LOCKED
), taken AS (
    -- no more of a limited queue than it has room for (under its lock: LOCK_LIMITED_QUEUES)
    SELECT id, queue, part, rate_room IS NOT NULL AS rated, rate_seconds FROM (
        SELECT *, row_number() OVER (PARTITION BY queue ORDER BY priority DESC, run_at, seq)
                AS n,
            row_number() OVER (PARTITION BY queue, part ORDER BY priority DESC, run_at, seq)
                AS n_in_part
        FROM ready) r
    WHERE (room IS NULL OR n <= room) AND (rate_room IS NULL OR n_in_part <= rate_room)
), started AS (
    -- the starts that a rate counts
    {_CLAIMED_STARTS}
)
UPDATE claude_jobs j
SET status = 'running', attempts = j.attempts + 1, claim = gen_random_uuid(),
    worker_id = %(worker_id)s, worker = %(worker)s, started_at = now(), finished_at = NULL,
    key_held = false, updated_at = now(),
    notify = coalesce(j.notify, (SELECT notify FROM me))  -- (the worker's --notify: a default)
FROM taken WHERE j.id = taken.id
RETURNING {", ".join("j." + c.strip() for c in _JOB_COLUMNS.split(","))},
    -- a continuation gets the session and worktree of the job it continues
    (SELECT jsonb_build_object('id', p.id, 'session_id', p.session_id, 'worktree', p.worktree,
                               'delivery', p.delivery)
     FROM claude_jobs p WHERE p.id = j.continue_from) AS resumes
"""
# (a closed queue: no walk over its jobs at all; of any queue: each job's queue looked up in
# the closed ones found once)
CLAIM_FROM_QUEUE = _CLAIM.format(
    queue_filter="AND c.queue = %(queue)s AND NOT EXISTS (SELECT FROM closed "
    "WHERE queue = %(queue)s)"
)
CLAIM_FROM_ANY_QUEUE = _CLAIM.format(queue_filter="AND c.queue NOT IN (SELECT queue FROM closed)")

READY_OF_KINDS = """
-- ready_of_kinds: one kind of these of which a job is ready in these queues (NULL: any), not
-- in a paused queue and waiting for no other job
SELECT min(kind) FROM (
    SELECT kind FROM claude_jobs c
    WHERE status = 'queued' AND run_at <= now() AND kind = ANY(%(kinds)s)
      AND (%(queues)s::text[] IS NULL OR queue = ANY(%(queues)s::text[]))
      AND blocked IS NULL AND after IS NULL AND continue_from IS NULL
      AND NOT EXISTS (SELECT FROM claude_jobs_queues q
                      WHERE q.queue = c.queue AND q.paused_at IS NOT NULL)
    LIMIT 1) ready
"""

NEXT_DUE = """
-- next_due: when the next job of these kinds (and queues; NULL: any) becomes ready
SELECT min(run_at) - now() AS due_in FROM claude_jobs
WHERE status = 'queued' AND run_at > created_at AND run_at > now() AND kind = ANY(%(kinds)s)
  AND (%(queues)s::text[] IS NULL OR queue = ANY(%(queues)s::text[]))
"""

# What the record statement returns per row: the job's id, new status and run_at; on the way
# it tells `logs -f` that a job with a transcript moved on. (Waking the workers for the jobs
# that may run now that this one is over is UNBLOCK's.)
_OUTCOME_RETURNING = """RETURNING j.id, j.status, j.run_at,
    CASE WHEN j.transcript_size > 0 THEN pg_notify(%(output)s, j.id::text) END"""

RECORD = f"""
-- record: what attempts of this worker came to, and what running ones produced so far, one
-- row per job, each fenced on its claim (a worker that lost a claim changes nothing). Its
-- `verdict`: 'progress' (it runs on), 'succeeded' (its result is stored), 'failed' (back to
-- the queue at now() + delay while attempts remain and the error is not permanent; failed for
-- good otherwise), 'released' (back unspent, at run_at or now, the error saying why: a
-- shutdown, a busy key, a limit) or 'cancelled'. A job whose cancel was asked for ends
-- cancelled when it fails or is released. Every row brings its progress: transcript tail,
-- claude session, cost, worktree; and, for the rows written, what outlives the jobs goes in
-- too: what claude spent into the ledger (per UTC day, queue and model, in one order on
-- every worker: no deadlock), and the worktrees into their register.
WITH o AS (
    SELECT o.id, o.claim, o.verdict, o.result::jsonb AS result, o.error, o.traceback,
        o.permanent, o.delay, o.run_at, o.transcript, o.session_id, o.cost_usd,
        o.worktree::jsonb AS worktree, o.checks::jsonb AS checks, o.delivery::jsonb AS delivery
    FROM jsonb_to_recordset(%(rows)s::jsonb) AS o(id uuid, claim uuid, verdict text,
        result text, error text, traceback text, permanent boolean, delay float8,
        run_at timestamptz, transcript text, session_id text, cost_usd numeric, worktree text,
        checks text, delivery text)
), m AS (
    -- the rows still claimed so, locked, with the status each comes to (`live`: it runs). Found
    -- by a walk of the primary key, whatever the table's size or statistics: no condition here
    -- that another index could serve (a partial index of unfinished jobs, walked whole, was the
    -- plan of a worker prepared while the queue was nearly empty)
    SELECT o.*, j.status = 'running' AS live, j.transcript_size AS size_before,
        j.transcript AS kept_before, CASE
            WHEN o.verdict = 'progress' THEN 'running'
            WHEN o.verdict = 'succeeded' THEN 'succeeded'
            WHEN o.verdict = 'cancelled' OR j.cancel_requested_at IS NOT NULL THEN 'cancelled'
            WHEN o.verdict = 'released' THEN 'queued'
            WHEN o.permanent OR j.attempts >= j.max_attempts THEN 'failed'
            ELSE 'queued' END AS status
    FROM o JOIN claude_jobs j ON j.id = o.id AND j.claim = o.claim
    WHERE j.id = ANY(ARRAY(SELECT id FROM o))
    FOR UPDATE OF j
), done AS (
UPDATE claude_jobs j
SET status = m.status,
    attempts = j.attempts - (m.verdict = 'released')::integer,  -- a release spends nothing
    run_at = CASE WHEN m.status <> 'queued' THEN j.run_at
                  WHEN m.verdict = 'failed' THEN now() + make_interval(secs => m.delay)
                  ELSE coalesce(m.run_at, now()) END,
    finished_at = CASE WHEN m.status IN ('succeeded', 'failed', 'cancelled') THEN now() END,
    claim = CASE WHEN m.verdict = 'released' THEN NULL ELSE j.claim END,
    worker_id = CASE WHEN m.verdict = 'released' THEN NULL ELSE j.worker_id END,
    worker = CASE WHEN m.verdict = 'released' THEN NULL ELSE j.worker END,
    started_at = CASE WHEN m.verdict = 'released' THEN NULL ELSE j.started_at END,
    last_error = CASE m.verdict WHEN 'failed' THEN m.error
                                WHEN 'released' THEN coalesce(m.error, j.last_error)
                                WHEN 'cancelled' THEN 'cancelled while running'
                                WHEN 'succeeded' THEN NULL  -- (the attempts' errors stay)
                                ELSE j.last_error END,
    errors = CASE m.verdict  -- every attempt that ended so is kept
        WHEN 'failed' THEN j.errors || jsonb_build_array(jsonb_build_object(
            'attempt', j.attempts, 'at', now(), 'started', j.started_at, 'worker', j.worker,
            'error', m.error, 'permanent', m.permanent, 'traceback', m.traceback))
        WHEN 'cancelled' THEN j.errors || jsonb_build_array(jsonb_build_object(
            'attempt', j.attempts, 'at', now(), 'started', j.started_at, 'worker', j.worker,
            'error', 'cancelled while running'))
        ELSE j.errors END,
    result = CASE m.verdict WHEN 'succeeded' THEN m.result
                            WHEN 'failed' THEN coalesce(m.result, j.result)
                            ELSE j.result END,
    transcript = CASE WHEN m.transcript IS NULL THEN j.transcript END,  -- (moved: appended)
    transcript_size = j.transcript_size + coalesce(length(m.transcript), 0),
    session_id = coalesce(m.session_id, j.session_id),
    session_host = CASE WHEN m.session_id IS NULL THEN j.session_host
                        ELSE split_part(j.worker, ':', 1) END,
    cost_usd = j.cost_usd + coalesce(m.cost_usd, 0),
    worktree = coalesce(m.worktree, j.worktree),
    checks = coalesce(m.checks, j.checks),
    delivery = coalesce(m.delivery, j.delivery),
    updated_at = now()
FROM m WHERE j.id = m.id AND m.live
{_OUTCOME_RETURNING}, j.queue
), appended AS (
    -- the new output as a chunk (its tail, if longer than the kept tail), after the kept tail
    -- that was in the job's row, if it was (written before these chunks were)
    INSERT INTO claude_jobs_output (job_id, upto, chunk)
    SELECT m.id, m.size_before + length(m.transcript), right(m.transcript, %(limit)s)
    FROM m JOIN done ON done.id = m.id WHERE m.transcript IS NOT NULL
    UNION ALL
    SELECT m.id, m.size_before, m.kept_before
    FROM m JOIN done ON done.id = m.id
    WHERE m.transcript IS NOT NULL AND m.kept_before IS NOT NULL
), trimmed AS (
    -- the chunks now wholly before the kept tail
    DELETE FROM claude_jobs_output c USING m
    WHERE c.job_id = m.id AND m.live AND m.transcript IS NOT NULL
      AND c.upto <= m.size_before + length(m.transcript) - %(limit)s
), spent AS (
    INSERT INTO claude_jobs_spend AS s (day, queue, model, runs, cost_usd, input_tokens,
        output_tokens, cache_read_tokens, cache_write_tokens)
    SELECT (now() AT TIME ZONE 'UTC')::date, done.queue, x.model, sum(x.runs), sum(x.cost),
        sum(x.input), sum(x.output), sum(x.cache_read), sum(x.cache_write)
    FROM jsonb_to_recordset(%(spend)s::jsonb) AS x(job_id uuid, model text, runs integer,
        cost numeric, input bigint, output bigint, cache_read bigint, cache_write bigint)
    JOIN done ON done.id = x.job_id
    GROUP BY done.queue, x.model ORDER BY done.queue, x.model
    ON CONFLICT (day, queue, model) DO UPDATE
    SET runs = s.runs + excluded.runs, cost_usd = s.cost_usd + excluded.cost_usd,
        input_tokens = s.input_tokens + excluded.input_tokens,
        output_tokens = s.output_tokens + excluded.output_tokens,
        cache_read_tokens = s.cache_read_tokens + excluded.cache_read_tokens,
        cache_write_tokens = s.cache_write_tokens + excluded.cache_write_tokens
), registered AS (
    INSERT INTO claude_jobs_worktrees AS w (host, path, repo, branch, base, job_id)
    SELECT %(host)s, o.worktree->>'path', o.worktree->>'repo', o.worktree->>'branch',
        o.worktree->>'base', o.id
    FROM o JOIN done ON done.id = o.id
    WHERE o.worktree IS NOT NULL
    ORDER BY o.worktree->>'path'
    ON CONFLICT (host, path) DO UPDATE SET used_at = now()
)
SELECT id, status, run_at FROM done
"""

KEY_TAKEN = """
-- key_taken: per concurrency key, how many of its slots a new job of this priority and due
-- time finds taken: by its running jobs, and by its queued jobs ahead of it in claim order,
-- due by then and not waiting for other jobs (counted up to `cap`)
SELECT k.key,
    (SELECT count(*) FROM claude_jobs r WHERE r.status = 'running' AND r.concurrency_key = k.key)
    + (SELECT count(*) FROM (
        SELECT FROM claude_jobs q
        WHERE q.status = 'queued' AND q.concurrency_key = k.key
          AND q.blocked IS DISTINCT FROM 'jobs' AND q.priority >= %(priority)s
          AND q.run_at <= greatest(now(), %(run_at)s) LIMIT %(cap)s) ahead) AS taken
FROM unnest(%(keys)s::text[]) AS k(key)
"""

# The queued jobs of concurrency key {k} that may take its free slots, in the order they
# take them: the due ones first, each in claim order ({eligible}: which of them count).
_KEY_QUEUE = """
    (SELECT w.id, w.blocked, w.concurrency_limit, false AS later, w.priority, w.run_at, w.seq
     FROM claude_jobs w
     WHERE w.status = 'queued' AND w.concurrency_key = {k} AND w.run_at <= now() AND {eligible}
     ORDER BY w.priority DESC, w.run_at, w.seq LIMIT {n})
    UNION ALL
    (SELECT w.id, w.blocked, w.concurrency_limit, true, w.priority, w.run_at, w.seq
     FROM claude_jobs w
     WHERE w.status = 'queued' AND w.concurrency_key = {k} AND w.run_at > now() AND {eligible}
     ORDER BY w.priority DESC, w.run_at, w.seq LIMIT {n})"""

# Whether queued job {w} is one a worker could claim: its queue is not paused, and a live
# worker takes its queue and its kind. Only such a job keeps its place at the head of its
# key's line: one that nobody can run must not keep the jobs behind it blocked.
_RUNNABLE = """(
    NOT EXISTS (SELECT FROM claude_jobs_queues p
                WHERE p.queue = {w}.queue AND p.paused_at IS NOT NULL)
    AND EXISTS (SELECT FROM claude_jobs_workers k
                WHERE {w}.kind = ANY(k.kinds)
                  AND ('*' = ANY(k.queues) OR {w}.queue = ANY(k.queues))))"""

_UNBLOCK = f"""
-- unblock: these jobs (`ended`) ended, or gave up their slot of these keys: the blocked jobs
-- that may run now go back in the claim's way. A job that waited for them (UNBLOCK_ALL: any
-- job marked so) and waits for no other is unblocked, or marked as waiting for its key; and
-- of each of these keys and theirs (UNBLOCK_ALL: every key with jobs marked so), the jobs that
-- go first, as many as the key's free slots (its limit less its running jobs), are unblocked
-- (of those a worker could claim now: one nobody can run keeps no one waiting).
-- Rows are locked in id order. Every worker is woken when there may be more to claim (a job
-- that was never marked, a race the janitor would fix, is found at the next poll).
WITH cleared AS (
    SELECT w.id, w.concurrency_key, w.concurrency_limit,
        CASE WHEN w.concurrency_key IS NOT NULL THEN 'key' END
            AS blocked
    FROM claude_jobs w
    WHERE w.status = 'queued' AND w.blocked = 'jobs'
      AND {{waited}}
      AND NOT {_WAITS_FOR_JOBS.format(w="w")}
), keys AS (
    SELECT k FROM unnest(%(keys)s::text[]) AS k
    UNION SELECT concurrency_key FROM cleared WHERE blocked = 'key'{{every_key}}
), free AS (
    SELECT keys.k, greatest(0, coalesce((
        SELECT w.concurrency_limit FROM claude_jobs w
        WHERE w.status = 'queued' AND w.concurrency_key = keys.k AND w.blocked = 'key'
        ORDER BY w.priority DESC, w.run_at, w.seq LIMIT 1), (
        SELECT max(concurrency_limit) FROM cleared WHERE concurrency_key = keys.k)) - (
        SELECT count(*) FROM claude_jobs r
        WHERE r.status = 'running' AND r.concurrency_key = keys.k)) AS slots
    FROM keys
), first AS (
    SELECT q.id, q.blocked FROM free CROSS JOIN LATERAL (
        SELECT * FROM ({
    _KEY_QUEUE.format(
        k="free.k",
        n="free.slots",
        eligible="(w.blocked IS DISTINCT FROM 'jobs' OR w.id IN (SELECT id FROM cleared)) AND "
        + _RUNNABLE.format(w="w"),
    )
}) s
        ORDER BY later, priority DESC, run_at, seq LIMIT free.slots) q
), changes AS (
    SELECT id, NULL AS blocked FROM first WHERE blocked IS NOT NULL
    UNION ALL
    SELECT id, blocked FROM cleared WHERE id NOT IN (SELECT id FROM first)
), locked AS MATERIALIZED (  -- (an index scan of these ids walks them in order: no sort)
    -- a row another transaction holds (a cancel, a purge, another unblock) is left to it, or
    -- to the janitor's next pass: no deadlock, and no wait
    SELECT id FROM claude_jobs WHERE id = ANY(ARRAY(SELECT id FROM changes))
    ORDER BY id FOR UPDATE SKIP LOCKED
), unblocked AS (
    UPDATE claude_jobs j SET blocked = changes.blocked
    FROM locked JOIN changes USING (id)
    WHERE j.id = locked.id AND j.status = 'queued' AND j.blocked IS NOT NULL
    RETURNING j.blocked
)
SELECT count(*) FILTER (WHERE blocked IS NULL) AS unblocked,
    CASE WHEN count(*) FILTER (WHERE blocked IS NULL) > 0 OR cardinality(%(keys)s::text[]) > 0
         THEN pg_notify(%(channel)s, '{{{{"queue": null}}}}') END
FROM unblocked
"""
# (two texts, not a flag: each keeps a plan of its own that uses the indexes)
UNBLOCK = _UNBLOCK.format(
    waited="(w.after && %(ended)s::uuid[] OR w.continue_from = ANY(%(ended)s::uuid[]))",
    every_key="",
)
UNBLOCK_ALL = _UNBLOCK.format(
    waited="true",
    every_key="""
    UNION SELECT concurrency_key FROM claude_jobs WHERE status = 'queued' AND blocked = 'key'""",
)

ADMIT = """
-- admit: a claimed job takes a slot of its concurrency key, if fewer than its limit are
-- taken and no job of the key ahead of it in claim order was claimed and waits to be
-- admitted (so the jobs of a key start in claim order, whichever thread or worker is
-- quicker); run after taking the key's lock, so that it sees every slot taken before
UPDATE claude_jobs j SET key_held = true
WHERE j.id = %(id)s AND j.claim = %(claim)s AND j.status = 'running'
  AND j.concurrency_limit > (SELECT count(*) FROM claude_jobs r
                             WHERE r.status = 'running' AND r.key_held
                               AND r.concurrency_key = j.concurrency_key)
  AND NOT EXISTS (SELECT FROM claude_jobs e
                  WHERE e.status = 'running' AND NOT e.key_held AND e.id <> j.id
                    AND e.concurrency_key = j.concurrency_key
                    AND (e.priority > j.priority OR (e.priority = j.priority
                         AND (e.run_at, e.seq) < (j.run_at, j.seq))))
RETURNING j.id
"""

LOCK_WORKTREE = """
-- lock_worktree: one at a time continue a job in this worktree or discard it, until the end
-- of the transaction
SELECT pg_advisory_xact_lock(%(namespace)s, hashtext(%(path)s))
"""


LOCK_LIMITED_QUEUES = """
-- lock_limited_queues: one claim at a time of a limited queue (of `queue`; NULL: of every
-- queue), until the end of the claim's transaction, so that it counts every job the others
-- claimed and every start they made; in one order (by name), so that no two claims wait for
-- each other
SELECT pg_advisory_xact_lock(%(namespace)s, hashtext('queue ' || queue)) FROM (
    SELECT queue FROM claude_jobs_queues
    WHERE (max_running IS NOT NULL OR rate IS NOT NULL)
      AND (queue = %(queue)s OR %(queue)s::text IS NULL)
    ORDER BY queue) limited
"""

LOCK_LIMITER = """
-- lock_limiter: one at a time per concurrency key (admission), limited queue ('queue NAME':
-- its claims, a change of its settings) or capped kind ('kind claude': admission), until
-- the end of the transaction
SELECT pg_advisory_xact_lock(%(namespace)s, hashtext(%(limiter)s))
"""

STARTS_OPEN = f"""
-- starts_open: when the window of at most `rate` starts per `seconds` of a limiter has room
-- for one more (NULL: now)
SELECT {
    _RATE_OPENS.format(limiter="%(limiter)s", part="''", seconds="%(seconds)s", rate="%(rate)s")
} AS opens
"""

RECORD_START = f"""
-- record_start: one more start of a limiter, now
{_ADD_STARTS.format(starts="SELECT %(limiter)s::text, ''::text, %(width)s::float8, 1")}
"""

CANCEL_BLOCKED = """
-- cancel_blocked: queued jobs that wait for a job that failed, was cancelled or is gone, or
-- that continue a job that is gone, are cancelled, saying which. The queued jobs that wait for
-- others are walked once, what each waits for looked up by id, and the doomed ones updated
-- through the primary key: no step joins two sets of jobs, so no plan of it (one made while
-- the queue was nearly empty, say) costs more than a few lookups per waiting job.
WITH doomed AS MATERIALIZED (
    SELECT w.id, coalesce((
        SELECT min('cancelled: it waits for job ' || a.id || ', which '
                   || CASE WHEN d.status IS NULL THEN 'is gone'
                           WHEN d.status = 'failed' THEN 'failed' ELSE 'was cancelled' END)
        FROM unnest(w.after) AS a(id)
            CROSS JOIN LATERAL (SELECT (SELECT s.status FROM claude_jobs s WHERE s.id = a.id)
                                AS status) d
        WHERE d.status IS NULL OR d.status IN ('failed', 'cancelled')),
        CASE WHEN w.continue_from IS NOT NULL
              AND NOT EXISTS (SELECT FROM claude_jobs p WHERE p.id = w.continue_from)
             THEN 'cancelled: it continues job ' || w.continue_from || ', which is gone' END
    ) AS reason
    FROM claude_jobs w
    WHERE w.status = 'queued' AND (w.after IS NOT NULL OR w.continue_from IS NOT NULL)
)
UPDATE claude_jobs j
SET status = 'cancelled', finished_at = now(), updated_at = now(), last_error = doomed.reason
FROM doomed
WHERE j.id = ANY(ARRAY(SELECT id FROM doomed WHERE reason IS NOT NULL)) AND j.id = doomed.id
  AND j.status = 'queued'
RETURNING j.id, j.queue, j.kind, j.last_error, pg_notify(%(output)s, j.id::text),
    j.concurrency_key
"""

SET_HOLD = """
-- set_hold: no worker starts jobs of this kind before `until` (a hold only ever lengthens),
-- and every worker hears of it; its end is told to the workers' --notify of when it started
WITH held AS (
    INSERT INTO claude_jobs_holds AS h (kind, until, reason, notify)
    VALUES (%(kind)s, %(until)s, %(reason)s, claude_jobs_workers_notify('hold.ended'))
    ON CONFLICT (kind) DO UPDATE
    SET until = greatest(h.until, excluded.until), set_at = now(),
        reason = CASE WHEN excluded.until >= h.until OR h.until <= now() THEN excluded.reason
                      ELSE h.reason END,  -- (the reason of the hold that ends last)
        notify = CASE WHEN h.until <= now() THEN excluded.notify ELSE h.notify END
    RETURNING kind
)
SELECT pg_notify(%(channel)s, json_build_object('hold', kind)::text) FROM held
"""

LIFT_HOLD = """
-- lift_hold: workers may start jobs of this kind again: the hold on every worker ends (the jobs
-- that met its limit run now instead of at its end, plus a minute of jitter), and so do the
-- back-offs of workers that could not run them (`refit`; not a spent daily budget, whose
-- reason begins with `budget`); every worker hears of it
WITH lifted AS (
    DELETE FROM claude_jobs_holds WHERE kind = %(kind)s RETURNING kind, until
), sooner AS (
    UPDATE claude_jobs j SET run_at = now(), updated_at = now()
    FROM lifted
    WHERE j.status = 'queued' AND j.kind = lifted.kind AND j.run_at > now()
      AND j.run_at <= lifted.until + interval '1 minute' AND starts_with(j.last_error, %(met)s)
    RETURNING j.id
), refit AS (
    UPDATE claude_jobs_workers SET claude_paused_until = NULL, claude_paused_reason = NULL
    WHERE %(refit)s AND claude_paused_until > now()
      AND NOT starts_with(claude_paused_reason, %(budget)s)
    RETURNING id
)
SELECT (SELECT count(*) FROM lifted) AS held, (SELECT count(*) FROM sooner) AS sooner,
    (SELECT count(*) FROM refit) AS refit,
    pg_notify(%(channel)s, json_build_object('hold', %(kind)s::text, 'lift', true)::text)
"""

HOLDS = """
-- holds: the kinds no worker starts now, until when (and for how many seconds more) and why
SELECT kind, until, extract(epoch FROM until - now())::float8 AS remaining, reason
FROM claude_jobs_holds WHERE until > now() ORDER BY kind
"""

PAUSE_WORKER_KIND = """
-- pause_worker_kind: show in `workers` that this worker starts no claude job until then
UPDATE claude_jobs_workers SET claude_paused_until = %(until)s, claude_paused_reason = %(reason)s
WHERE id = %(id)s
"""

UNPAUSE_WORKER_KIND = """
-- unpause_worker_kind: this worker starts claude jobs again (its back-off for this reason is
-- over: a job ran)
UPDATE claude_jobs_workers SET claude_paused_until = NULL, claude_paused_reason = NULL
WHERE id = %(id)s AND claude_paused_reason = %(reason)s
"""

HOLDS_OVER = """
-- holds_over: the holds on every worker that ran out are over (deleted, which tells their
-- end: claude_jobs_notify_hold), and so is this worker's daily budget spent on a day gone by
WITH gone AS (
    DELETE FROM claude_jobs_holds WHERE until <= now() RETURNING kind
)
UPDATE claude_jobs_workers SET claude_paused_until = NULL, claude_paused_reason = NULL
WHERE id = %(id)s AND claude_paused_until <= now() AND starts_with(claude_paused_reason, %(budget)s)
"""

WORKER_PAUSED = """
-- worker_paused: whether this worker's row says it starts no claude job now
SELECT coalesce(claude_paused_until > now(), false) FROM claude_jobs_workers WHERE id = %(id)s
"""

SPENT_TODAY = """
-- spent_today: what claude cost since midnight UTC, by the ledger
SELECT coalesce(sum(cost_usd), 0) FROM claude_jobs_spend
WHERE day = (now() AT TIME ZONE 'UTC')::date
"""

COST_STATS = """
-- cost_stats: what claude cost in the last `days` UTC days, per day, queue and model
SELECT day, queue, model, runs, cost_usd, input_tokens, output_tokens, cache_read_tokens,
    cache_write_tokens
FROM claude_jobs_spend
WHERE day > (now() AT TIME ZONE 'UTC')::date - %(days)s
ORDER BY day DESC, queue, model
"""

ALREADY_RECORDED = """
-- already_recorded: which of these claims were finished by an earlier write whose reply was
-- lost (so a retry that matches nothing is not a lost claim)
SELECT j.id FROM claude_jobs j
JOIN unnest(%(ids)s::uuid[], %(claims)s::uuid[]) AS o(id, claim)
    ON j.id = o.id AND j.claim = o.claim
WHERE j.status <> 'running'
"""

MY_RUNNING_JOBS = """
-- my_running_jobs: what the database thinks this worker runs (to find claims whose reply was
-- lost, and cancels whose notice was missed)
SELECT id, claim, cancel_requested_at IS NOT NULL AS cancel
FROM claude_jobs WHERE status = 'running' AND worker_id = %(worker_id)s
"""

NEXT_WORKER_KEY = """
-- next_worker_key: a fresh advisory lock key for a new worker
SELECT nextval('claude_jobs_worker_keys')::integer AS key
"""

TRY_LOCK = """
-- try_lock: take a worker's session advisory lock (held until the connection ends)
SELECT pg_try_advisory_lock(%(namespace)s, %(key)s) AS locked
"""

REGISTER_WORKER = """
-- register_worker: announce a worker (it already holds its lock)
INSERT INTO claude_jobs_workers
    (id, lock_key, host, pid, queues, kinds, concurrency, backend_pid, session_name, notify)
VALUES (%(id)s, %(key)s, %(host)s, %(pid)s, %(queues)s, %(kinds)s, %(concurrency)s,
        pg_backend_pid(), current_setting('application_name'), %(notify)s::jsonb)
"""

HEARTBEAT = """
-- heartbeat: I am alive (no row: another worker declared me dead), and what is wrong with my
-- parts, if anything; am I asked to drain?
UPDATE claude_jobs_workers
SET last_heartbeat = now(), backend_pid = pg_backend_pid(), trouble = %(trouble)s
WHERE id = %(id)s
RETURNING draining_since IS NOT NULL AS draining
"""

DEREGISTER_WORKER = """
-- deregister_worker: a worker leaves (its jobs are finished or were put back first)
DELETE FROM claude_jobs_workers WHERE id = %(id)s
"""

UNLOCK_ALL = """
-- unlock_all: give up every session advisory lock of this connection
SELECT pg_advisory_unlock_all()
"""

STALE_WORKERS = """
-- stale_workers: workers silent for longer than the grace period (a server restart counts as
-- a heartbeat, so workers get time to reconnect); `vanished` ones are silent past the timeout
SELECT id, lock_key, backend_pid, host, pid, session_name,
       greatest(last_heartbeat, pg_postmaster_start_time())
           < now() - make_interval(secs => %(timeout)s) AS vanished
FROM claude_jobs_workers
WHERE greatest(last_heartbeat, pg_postmaster_start_time())
      < now() - make_interval(secs => %(grace)s)
"""

TRY_LOCK_FOR_REAPING = """
-- try_lock_for_reaping: free only if the worker's session is gone; held until commit, so the
-- worker cannot come back in the middle of its own recovery
SELECT pg_try_advisory_xact_lock(%(namespace)s, %(key)s) AS locked
"""

TERMINATE_VANISHED = """
-- terminate_vanished: end a vanished worker's lingering sessions: the one it registered, only
-- while it holds the worker's lock (not a reaper's), and the others of its process (they carry
-- the name it registered, unique to the process), one of which may hold its jobs' rows in a
-- transaction it cannot finish
SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a
WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
  AND (a.application_name = %(session_name)s
       OR a.pid = (SELECT l.pid FROM pg_locks l
                   WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %(namespace)s
                     AND l.objid = %(key)s AND l.objsubid = 2 AND l.pid = %(backend_pid)s
                     AND l.database = (SELECT oid FROM pg_database
                                       WHERE datname = current_database())))
"""

REAP_WORKER = """
-- reap_worker: forget a dead worker, if it is still silent (it waits for its running claims)
DELETE FROM claude_jobs_workers
WHERE id = %(id)s
  AND greatest(last_heartbeat, pg_postmaster_start_time())
      < now() - make_interval(secs => %(grace)s)
RETURNING id, host, pid, queues, kinds, concurrency, started_at, last_heartbeat
"""

RECORD_LOST_WORKER = """
-- record_lost_worker: a worker found dead, why, and how many of its running jobs went back
-- (what `workers` shows for a while; cleanup forgets it)
INSERT INTO claude_jobs_lost_workers (id, host, pid, queues, kinds, concurrency, started_at,
    last_heartbeat, reason, recovered)
VALUES (%(id)s, %(host)s, %(pid)s, %(queues)s, %(kinds)s, %(concurrency)s, %(started_at)s,
        %(last_heartbeat)s, %(reason)s, %(recovered)s)
ON CONFLICT (id) DO NOTHING
"""

OLD_LOST_WORKERS = f"""
-- old_lost_workers: forget the workers found dead longer ago than LOST_WORKERS_KEPT
DELETE FROM claude_jobs_lost_workers
WHERE lost_at < now() - make_interval(secs => {LOST_WORKERS_KEPT})
"""

_REQUEUE_INTERRUPTED = """
-- {purpose}
UPDATE claude_jobs
SET status = CASE WHEN cancel_requested_at IS NOT NULL THEN 'cancelled'
                  WHEN attempts >= max_attempts THEN 'failed' ELSE 'queued' END,
    finished_at = CASE WHEN cancel_requested_at IS NOT NULL OR attempts >= max_attempts
                       THEN now() END,
    run_at = now(), claim = NULL, updated_at = now(),
    last_error = 'interrupted: worker ' || coalesce(worker, '?') || ' {why}',
    errors = errors || jsonb_build_array(jsonb_build_object(
        'attempt', attempts, 'at', now(), 'started', started_at, 'worker', worker,
        'error', 'interrupted: worker ' || coalesce(worker, '?') || ' {why}'))
WHERE status = 'running' AND {condition}
RETURNING id, queue, kind, attempts, max_attempts, status, worker,
    concurrency_key
"""
RECOVER_JOBS_OF = _REQUEUE_INTERRUPTED.format(
    purpose="recover_jobs_of: a dead worker's running jobs go back, the attempt counted",
    why="was lost (killed, crashed or cut off) during the attempt",
    condition="worker_id = %(worker_id)s",
)
RECOVER_ORPHANS = _REQUEUE_INTERRUPTED.format(
    purpose="recover_orphans: running jobs whose worker is not registered at all",
    why="is no longer registered",
    condition="NOT EXISTS (SELECT FROM claude_jobs_workers w WHERE w.id = worker_id)",
)

# -- batches -----------------------------------------------------------------------------------

# A batch {b}'s progress: its jobs by status, their cost, when the first started and the last
# ended (from claude_jobs_of_batch alone), and the callbacks it queued.
_BATCH_PROGRESS = """
SELECT {b}.id, {b}.name, {b}.created_at, {b}.finished_at, {b}.on_finish->'payload' AS on_finish,
    {b}.on_success->'payload' AS on_success, {b}.purged, p.counts, p.cost_usd, p.started_at,
    p.ended_at,
    ARRAY(SELECT c.id FROM claude_jobs c WHERE c.callback_of = {b}.id ORDER BY c.seq)
        AS callbacks
FROM claude_jobs_batches {b}, LATERAL (
    SELECT jsonb_object_agg(s.status, s.jobs) AS counts, sum(s.cost) AS cost_usd,
        min(s.started) AS started_at,
        max(s.ended) FILTER (WHERE s.status IN ('succeeded', 'failed', 'cancelled')) AS ended_at
    FROM (SELECT j.status, count(*) AS jobs, sum(j.cost_usd) AS cost,
              min(j.started_at) AS started, max(j.finished_at) AS ended
          FROM claude_jobs j WHERE j.batch_id = {b}.id GROUP BY j.status) s
) p"""

GET_BATCH = f"""
-- get_batch: one batch and its progress
{_BATCH_PROGRESS.format(b="b")}
WHERE b.id = %(id)s
"""

LIST_BATCHES = f"""
-- list_batches: the newest batches (the open ones, or all), each with its progress
{_BATCH_PROGRESS.format(b="b")}
WHERE b.id IN (SELECT id FROM claude_jobs_batches
               WHERE NOT %(open)s OR finished_at IS NULL
               ORDER BY created_at DESC LIMIT %(limit)s)
ORDER BY b.created_at DESC
"""

BATCH_BY_NAME = """
-- batch_by_name: the batch of a name: the open one, else the newest
SELECT id FROM claude_jobs_batches WHERE name = %(name)s
ORDER BY finished_at IS NULL DESC, created_at DESC LIMIT 1
"""

OLD_BATCHES = """
-- old_batches: forget the batches that finished before `before` and have no job left (of
-- theirs, or a callback)
DELETE FROM claude_jobs_batches b
WHERE b.finished_at < %(before)s
  AND NOT EXISTS (SELECT FROM claude_jobs j WHERE j.batch_id = b.id)
  AND NOT EXISTS (SELECT FROM claude_jobs c WHERE c.callback_of = b.id)
"""

BATCHES_IN_RANGE = """
-- batches_in_range: batch ids between two ids (an id prefix, padded)
SELECT id FROM claude_jobs_batches WHERE id BETWEEN %(low)s AND %(high)s ORDER BY id LIMIT 6
"""

BATCH_JOBS_IN = """
-- batch_jobs_in: a batch's jobs of these statuses, locked (batch cancel)
SELECT id FROM claude_jobs WHERE batch_id = %(id)s AND status = ANY(%(statuses)s::text[])
ORDER BY id FOR UPDATE
"""

BATCH_FAILED_JOBS = """
-- batch_failed_jobs: a batch's failed jobs to retry: of several with one unique key, the
-- newest (only one of them can be queued)
SELECT DISTINCT ON (coalesce(unique_key, id::text)) id FROM claude_jobs
WHERE batch_id = %(id)s AND status = 'failed'
ORDER BY coalesce(unique_key, id::text), created_at DESC
"""

LOCK_RETRIED_BATCHES = """
-- lock_retried_batches: the batches of the jobs a retry is to take (as RETRY chooses them, or
-- more), locked in one order before it takes them: a transaction that ends the last other
-- job of one meanwhile waits for the retry, then sees its jobs queued (and does not finish
-- the batch under them, with its callbacks)
SELECT b.id FROM claude_jobs_batches b
WHERE b.id IN (
    SELECT c.batch_id FROM claude_jobs c
    WHERE c.status IN ('failed', 'cancelled') AND c.status = ANY(%(statuses)s::text[])
      AND (%(ids)s::uuid[] IS NULL OR c.id = ANY(%(ids)s::uuid[]))
      AND (%(queue)s::text IS NULL OR c.queue = %(queue)s::text))
ORDER BY b.id
FOR UPDATE OF b
"""

REOPEN_BATCHES = """
-- reopen_batches: the finished batches of these jobs (retried) take jobs again: their
-- callbacks are queued again when they finish again (not on-success, if jobs of them were
-- purged: those never ran)
UPDATE claude_jobs_batches SET finished_at = NULL
WHERE finished_at IS NOT NULL
  AND id IN (SELECT batch_id FROM claude_jobs WHERE id = ANY(%(ids)s::uuid[]))
RETURNING id
"""

BATCH_RESULTS = """
-- batch_results: what each job of a batch came to, in the order they were queued (the file a
-- callback reads)
SELECT id, status, payload->>'prompt' AS prompt,
    CASE WHEN jsonb_typeof(result) = 'object' AND result ? 'result' THEN result->'result'
         ELSE result END AS result,
    cost_usd, last_error AS error
FROM claude_jobs WHERE batch_id = %(id)s ORDER BY seq, created_at
"""

# -- schedules ---------------------------------------------------------------------------------

_SCHEDULE_COLUMNS = """s.name, s.cron, s.every, s.timezone, s.kind, s.payload, s.options,
    s.catch_up, s.overlap, s.only_if_changed, s.good_head, s.next_run_at, s.paused_at,
    s.created_at, s.updated_at"""

# The latest run of schedule {s} (and the status of its job), as a JSON object.
_LAST_RUN = """(
    SELECT json_build_object('due_at', r.due_at, 'job_id', r.job_id, 'outcome', r.outcome,
                             'note', r.note, 'status', j.status)
    FROM claude_jobs_schedule_runs r LEFT JOIN claude_jobs j ON j.id = r.job_id
    WHERE r.schedule = {s}.name ORDER BY r.due_at DESC LIMIT 1)"""

INSERT_SCHEDULE = f"""
-- insert_schedule: a new schedule; no row if one of that name exists
INSERT INTO claude_jobs_schedules AS s (name, cron, every, timezone, kind, payload, options,
    catch_up, overlap, only_if_changed, next_run_at)
VALUES (%(name)s, %(cron)s, %(every)s, %(timezone)s, %(kind)s, %(payload)s::jsonb,
        %(options)s::jsonb, %(catch_up)s, %(overlap)s, %(only_if_changed)s, %(next_run_at)s)
ON CONFLICT (name) DO NOTHING
RETURNING {_SCHEDULE_COLUMNS}
"""

UPDATE_SCHEDULE = f"""
-- update_schedule: a schedule's new settings, and its next due time from now
UPDATE claude_jobs_schedules s
SET cron = %(cron)s, every = %(every)s, timezone = %(timezone)s, kind = %(kind)s,
    payload = %(payload)s::jsonb, options = %(options)s::jsonb, catch_up = %(catch_up)s,
    overlap = %(overlap)s, only_if_changed = %(only_if_changed)s,
    next_run_at = %(next_run_at)s, updated_at = now()
WHERE name = %(name)s
RETURNING {_SCHEDULE_COLUMNS}
"""

GET_SCHEDULE = f"""
-- get_schedule: one schedule, with its latest run; locked with `lock` (edit, run)
SELECT {_SCHEDULE_COLUMNS}, {_LAST_RUN.format(s="s")} AS last_run
FROM claude_jobs_schedules s WHERE s.name = %(name)s
"""

LOCK_SCHEDULE = f"""
-- lock_schedule: one schedule, locked until the end of the transaction (edit, run, pause)
SELECT {_SCHEDULE_COLUMNS}, now() AS now FROM claude_jobs_schedules s
WHERE s.name = %(name)s FOR UPDATE
"""

LIST_SCHEDULES = f"""
-- list_schedules: every schedule by name, with its latest run
SELECT {_SCHEDULE_COLUMNS}, {_LAST_RUN.format(s="s")} AS last_run
FROM claude_jobs_schedules s ORDER BY s.name
"""

SCHEDULE_RUNS = """
-- schedule_runs: a schedule's latest runs, newest first, with their jobs' state
SELECT r.due_at, r.job_id, r.outcome, r.note, r.head, r.fired_at, r.fired_by, j.status,
    j.cost_usd, j.finished_at
FROM claude_jobs_schedule_runs r LEFT JOIN claude_jobs j ON j.id = r.job_id
WHERE r.schedule = %(name)s ORDER BY r.due_at DESC LIMIT %(limit)s
"""

PAUSE_SCHEDULE = """
-- pause_schedule: no run is fired until resumed (already paused: unchanged)
UPDATE claude_jobs_schedules SET paused_at = coalesce(paused_at, now()), updated_at = now()
WHERE name = %(name)s RETURNING name
"""

RESUME_SCHEDULE = """
-- resume_schedule: fire again from the next due time after now (what fell due while it was
-- paused is not caught up)
UPDATE claude_jobs_schedules SET paused_at = NULL, next_run_at = %(next_run_at)s,
    updated_at = now()
WHERE name = %(name)s RETURNING name
"""

REMOVE_SCHEDULE = """
-- remove_schedule: a schedule and its record of runs go (the jobs it made stay)
DELETE FROM claude_jobs_schedules WHERE name = %(name)s RETURNING name
"""

DATABASE_NOW = """
-- database_now: the time by the database's clock (the one clock every worker shares)
SELECT now()
"""

DUE_SCHEDULES = """
-- due_schedules: the schedules with a due time not fired yet, by the database's clock
SELECT name FROM claude_jobs_schedules
WHERE paused_at IS NULL AND next_run_at <= now() ORDER BY next_run_at LIMIT 100
"""

LOCK_DUE_SCHEDULE = f"""
-- lock_due_schedule: a due schedule to fire, locked, and the database's time; no row if it
-- is no longer due or another worker fires it now
SELECT {_SCHEDULE_COLUMNS}, now() AS now FROM claude_jobs_schedules s
WHERE s.name = %(name)s AND s.paused_at IS NULL AND s.next_run_at <= now()
FOR UPDATE SKIP LOCKED
"""

MOVE_SCHEDULE_ON = """
-- move_schedule_on: the next due time of a schedule just fired (and the commit of its latest
-- successful run, kept here for when cleanup has deleted that job)
UPDATE claude_jobs_schedules SET next_run_at = %(next_run_at)s, good_head = %(good_head)s
WHERE name = %(name)s
"""

RECORD_SCHEDULE_RUN = """
-- record_schedule_run: a due time fired, once (no row: it was fired before)
INSERT INTO claude_jobs_schedule_runs (schedule, due_at, outcome, note, head, fired_by)
VALUES (%(schedule)s, %(due_at)s, %(outcome)s, %(note)s, %(head)s, %(fired_by)s)
ON CONFLICT DO NOTHING RETURNING due_at
"""

SET_RUN_JOB = """
-- set_run_job: the job a run made (or, if its unique key was taken, why it made none)
UPDATE claude_jobs_schedule_runs
SET job_id = %(job_id)s, outcome = %(outcome)s, note = %(note)s
WHERE schedule = %(schedule)s AND due_at = %(due_at)s
"""

UNFINISHED_RUN = """
-- unfinished_run: a queued or running job of a schedule (--overlap)
SELECT id, status FROM claude_jobs
WHERE schedule = %(name)s AND status IN ('queued', 'running') LIMIT 1
"""

LAST_SUCCESSFUL_HEAD = """
-- last_successful_head: the commit a schedule's repository was at when the latest of its
-- runs that succeeded was fired (--only-if-changed)
SELECT r.head FROM claude_jobs_schedule_runs r JOIN claude_jobs j ON j.id = r.job_id
WHERE r.schedule = %(name)s AND j.status = 'succeeded' AND r.head IS NOT NULL
ORDER BY r.due_at DESC LIMIT 1
"""

OLD_NOTIFICATIONS = """
-- old_notifications: forget the notifications delivered before `before` (with old jobs), and
-- those given up on that were written before it
DELETE FROM claude_jobs_notifications
WHERE (state = 'sent' AND sent_at < %(before)s)
   OR (state IN ('failed', 'abandoned') AND created_at < %(before)s)
"""

OLD_SCHEDULE_RUNS = """
-- old_schedule_runs: forget runs older than the retention, but each schedule's latest
DELETE FROM claude_jobs_schedule_runs r
WHERE r.fired_at < %(before)s AND r.due_at < (
    SELECT max(l.due_at) FROM claude_jobs_schedule_runs l WHERE l.schedule = r.schedule)
"""


###############################################################################
# Database helpers
###############################################################################

#: Errors after which an operation is worth trying again: the database went away.
_TRANSIENT = (psycopg.OperationalError, psycopg.InterfaceError)  # (and the pool's PoolTimeout)
#: Errors of a statement the database refuses whatever the retries (bad data in it).
_REFUSED = (psycopg.DataError, psycopg.IntegrityError, psycopg.ProgrammingError)

#: Detect a dead peer on TCP connections (libpq ignores these on Unix sockets).
_CONNECT_OPTIONS: dict[str, Any] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}


def mask_url(url: str) -> str:
    """``url`` (a URI or a key=value conninfo string) with any password replaced by ***."""
    if re.match(r"[a-z][a-z0-9+.-]*://", url, flags=re.I):
        masked = re.sub(r"^([^:]+://[^:@/]*:).*@", r"\1***@", url)  # up to the last @
        masked = re.sub(r"([?&]password=)[^&#]*", r"\1***", masked, flags=re.I)
    else:
        masked = re.sub(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", url, flags=re.I)
    return _scrub(masked, url)  # whatever the patterns missed


def _scrub(message: str, url: str) -> str:
    """A message that cannot leak the password of ``url``, on one line."""
    try:
        passwords = [psycopg.conninfo.conninfo_to_dict(url).get("password")]
    except psycopg.Error:  # unparsable: take what looks like a password from the text itself
        passwords = re.findall(r"^[^:]+://[^:@/]*:(.*)@", url)
        passwords += re.findall(r"[?&]password=([^&#]*)", url, flags=re.I)
        passwords += re.findall(r"\bpassword\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", url, flags=re.I)
    for password in passwords:
        if password:
            message = message.replace(str(password), "***")
    return " ".join(message.split())


def check_conninfo(url: str) -> None:
    """Raise ConfigError when ``url`` is not a valid PostgreSQL URL or conninfo string (its
    port too: libpq would only say so when connecting)."""
    try:
        ports = str(psycopg.conninfo.conninfo_to_dict(url).get("port") or "")
    except psycopg.ProgrammingError as error:
        reason = _scrub(str(error), url)
        raise ConfigError(f"invalid database URL {mask_url(url)}: {reason}") from None
    for port in ports.split(","):  # (one per host; an empty one: the default)
        if port.strip() and not (port.strip().isdigit() and 0 < int(port) < 65536):
            raise ConfigError(
                f"invalid database URL {mask_url(url)}: the port must be a number from 1 to "
                f"65535, not {_scrub(port, url)!r}"
            )


def connect(url: str, *, autocommit: bool = False, **options: Any) -> psycopg.Connection:
    """A connection to ``url``; a failure raises DatabaseUnavailable with the password masked."""
    check_conninfo(url)
    try:
        return psycopg.connect(url, autocommit=autocommit, **{**_CONNECT_OPTIONS, **options})
    except psycopg.OperationalError as error:
        raise DatabaseUnavailable(
            f"cannot connect to {mask_url(url)}: {_scrub(str(error), url)}"
        ) from None


def schema_version(conn: psycopg.Connection) -> int | None:
    """The schema version of the database, or None when claude-jobs was never migrated."""
    try:
        with conn.transaction():
            row = conn.execute(SCHEMA_VERSION_QUERY).fetchone()
    except psycopg.errors.UndefinedTable:
        return None
    return row[0] if row else None


def check_schema(conn: psycopg.Connection) -> None:
    """Raise SchemaError unless the database has exactly the schema this code needs."""
    version = schema_version(conn)
    if version is None:
        raise SchemaError("this database has no claude-jobs schema: run `claude-jobs migrate`")
    if version < SCHEMA_VERSION:
        raise SchemaError(
            f"the database schema is version {version}, this claude-jobs needs "
            f"{SCHEMA_VERSION}: run `claude-jobs migrate`"
        )
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"the database schema is version {version}, newer than this claude-jobs "
            f"({SCHEMA_VERSION}): upgrade claude-jobs"
        )


def migrate(
    conn: psycopg.Connection, migrations: Sequence[tuple[int, str]] = MIGRATIONS
) -> tuple[int | None, int]:
    """Bring the schema up to date; returns (version before, version after).

    Idempotent, and safe when several processes migrate at once: they take turns on an
    advisory lock, and each version is applied once, in one transaction.
    """
    target = migrations[-1][0]
    script = schema_sql(migrations).removeprefix("BEGIN;\n").removesuffix("COMMIT;\n")
    with conn.transaction():
        # the script's own lock, taken first so that `before` is what this migration found
        conn.execute(MIGRATION_LOCK, {"namespace": LOCK_NAMESPACE, "key": MIGRATION_LOCK_KEY})
        before = schema_version(conn)
        if before is not None and before > target:
            raise SchemaError(
                f"the database schema is version {before}, newer than this claude-jobs "
                f"({target}): upgrade claude-jobs"
            )
        conn.execute(script)  # (a script, not a parametrized query)
    return before, target


def default_home() -> Path:
    """Where the embedded database lives: CLAUDE_JOBS_HOME, else the user data directory."""
    if home := os.environ.get("CLAUDE_JOBS_HOME"):
        return Path(home).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "claude-jobs"
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "claude-jobs"


def _forget_dead_users(pgdata: Path) -> None:
    """pgserver counts the processes using the embedded server in a file of process ids, and
    stops the server when the last one leaves; one that died without leaving (killed,
    crashed) would stay counted for ever, and the server never stop. Forget those, under
    pgserver's own lock (its internals: where they are not as expected, do nothing)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns without XDG_RUNTIME_DIR
            from pgserver.postgres_server import PostgresServer
        lock = PostgresServer._lock
    except (ImportError, AttributeError):
        return
    handles = pgdata / ".handle_pids.json"
    with lock:
        try:
            pids = json.loads(handles.read_text())
        except (OSError, ValueError):
            return
        alive = [pid for pid in pids if isinstance(pid, int) and _process_exists(pid)]
        if alive != pids:
            handles.write_text(json.dumps(alive))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: it exists
        return True
    return True


def start_embedded(home: Path) -> str:
    """Start (or join) the embedded PostgreSQL kept in ``home``; returns its URL.

    The server runs while any claude-jobs process uses it and stops after the last one exits;
    its data stays in ``home/pgdata``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pgserver's platformdirs warns without XDG_RUNTIME_DIR
        try:
            import pgserver
        except ImportError:
            raise DatabaseUnavailable(
                "no database configured: set DATABASE_URL (or --database-url), or install the "
                "embedded PostgreSQL with: pip install 'claude-jobs[embedded]'"
            ) from None
    try:
        home.mkdir(parents=True, exist_ok=True)
        _forget_dead_users(home / "pgdata")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = pgserver.get_server(home / "pgdata", cleanup_mode="stop")
        # (atexit runs the last registered first: this, then pgserver's own leaving)
        atexit.register(_forget_dead_users, home / "pgdata")
    except Exception as error:  # pgserver raises whatever initdb or pg_ctl raised
        raise DatabaseUnavailable(
            f"cannot start the embedded PostgreSQL in {home}: {error} "
            f"(its log: {home / 'pgdata' / 'log'})"
        ) from None
    return server.get_uri()


def _savepoint(conn: psycopg.Connection) -> contextlib.AbstractContextManager[Any]:
    """A savepoint in the caller's transaction, or a transaction of our own on an autocommit
    connection. (psycopg would commit a block begun where no transaction is open yet: one
    statement first opens the caller's, which stays the caller's to end.)"""
    if not conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        conn.execute(DATABASE_NOW)
    return conn.transaction()


def _atomic(conn: psycopg.Connection) -> contextlib.AbstractContextManager[Any]:
    """A transaction of our own on an autocommit connection; else the caller's transaction."""
    return conn.transaction() if conn.autocommit else contextlib.nullcontext()


def _configure_worker_connection(conn: psycopg.Connection) -> None:
    """The claim must walk its index in claim order, whatever the statistics say: right
    after a bulk insert they can be so stale (a table analyzed while empty) that the planner
    prefers sorting every ready job, on every claim. No other query of the worker sorts.
    And no JIT: with a large backlog the claim's estimated cost passes jit_above_cost, and a
    server built with LLVM (Debian's, for one) then compiles it on every call: 84 ms of JIT
    for 0.2 ms of work. The worker's statements are all short; none gains from JIT. And
    generic plans for the statements psycopg prepares (those run more than a few times): left
    to choose, PostgreSQL plans the round's statements again on every call (a custom plan),
    which costs it three to five times the work (1.5 ms against 0.3 for UNBLOCK). Their
    texts are written for it: no flag parameter that changes which index serves them."""
    conn.execute("SET enable_sort = off")
    conn.execute("SET enable_seqscan = off")
    conn.execute("SET jit = off")
    conn.execute("SET plan_cache_mode = force_generic_plan")


###############################################################################
# Statements: one typed function per statement
###############################################################################


# One small typed function per statement of the worker (and of what the queue API shares with
# it): the only place where that statement's parameters are built. Callers pass Python values.


def _the_row(cursor: psycopg.Cursor[Any]) -> Any:
    """The one row of a statement that always returns one: an aggregate, a lock function's
    answer, an upsert's RETURNING."""
    row = cursor.fetchone()
    if row is None:  # (a statement given here cannot return none; a change that made it must)
        raise RuntimeError("a statement that always returns a row returned none")
    return row


def _db_claim(
    conn: psycopg.Connection,
    *,
    worker_id: uuid.UUID,
    worker: str,
    host: str,
    kinds: Sequence[str],
    queue: str | None,
    limit: int,
) -> psycopg.Cursor[dict[str, Any]]:
    """Send the claim of up to ``limit`` ready jobs of ``kinds`` from ``queue`` (None: any),
    for its rows to be fetched (in a pipeline, after it is synced), after the locks of the
    limited queues it may take from: in one transaction with it (a pipeline's, or one begun)."""
    conn.execute(LOCK_LIMITED_QUEUES, {"namespace": LIMITER_LOCK_NAMESPACE, "queue": queue})
    query = CLAIM_FROM_QUEUE if queue else CLAIM_FROM_ANY_QUEUE
    params = {"worker_id": worker_id, "worker": worker, "host": host, "kinds": list(kinds),
              "queue": queue, "limit": limit}  # fmt: skip
    return conn.cursor(row_factory=dict_row).execute(query, params)


def _db_already_recorded(
    conn: psycopg.Connection, pairs: Sequence[tuple[uuid.UUID, uuid.UUID | None]]
) -> set[uuid.UUID]:
    """Which of these (job, claim) pairs were finished by an earlier write whose reply was
    lost."""
    params = {"ids": [job_id for job_id, _ in pairs], "claims": [claim for _, claim in pairs]}
    return {row[0] for row in conn.execute(ALREADY_RECORDED, params)}


def _db_my_running_jobs(
    conn: psycopg.Connection, worker_id: uuid.UUID
) -> list[tuple[uuid.UUID, uuid.UUID, bool]]:
    """What the database thinks this worker runs: (job, claim, cancel asked for)."""
    return conn.execute(MY_RUNNING_JOBS, {"worker_id": worker_id}).fetchall()


@dataclass(frozen=True)
class _Refused:
    """Why a claimed job may not start now (it goes back to the queue unspent), and when it
    may, when that is known. ``capped``: by the worker's --max-starts."""

    reason: str
    until: datetime | None = None
    capped: bool = False


def _db_admit(conn: psycopg.Connection, job: Job, cap: Rate | None) -> _Refused | None:
    """Let a claimed job start, or say why not: under the locks of what limits it, in one
    transaction (a refusal takes nothing). The claude starts in a window, when the worker caps
    them (``cap``: --max-starts; every claude start is counted, for the workers that do), and
    a slot of its concurrency key (see ADMIT). (A queue's limits are the claim's.)"""
    claude = job.kind == DEFAULT_KIND
    cap = cap if claude else None
    refused = None
    with conn.transaction():
        if cap is not None:
            conn.execute(LOCK_LIMITER, {"namespace": LIMITER_LOCK_NAMESPACE,
                                        "limiter": CLAUDE_LIMITER})  # fmt: skip
            params = {"limiter": CLAUDE_LIMITER, "rate": cap.count, "seconds": cap.seconds}
            opens = _the_row(conn.execute(STARTS_OPEN, params))[0]
            if opens is not None:
                refused = _Refused(f"{MAX_STARTS_NOTE}{cap} (on this worker)", opens, True)
        if refused is None and job.concurrency_key is not None:
            conn.execute(LOCK_LIMITER, {"namespace": KEY_LOCK_NAMESPACE,
                                        "limiter": job.concurrency_key})  # fmt: skip
            if conn.execute(ADMIT, {"id": job.id, "claim": job.claim}).fetchone() is None:
                refused = _Refused(f"concurrency key busy: {job.concurrency_key}")
        if refused is None and claude:
            conn.execute(RECORD_START, {"limiter": CLAUDE_LIMITER, "width": CLAUDE_START_BUCKET})
        if refused is not None:
            raise psycopg.Rollback()
    return refused


def _db_next_due(
    conn: psycopg.Connection, kinds: Sequence[str], queues: Sequence[str] | None
) -> float | None:
    """Seconds until the next job of ``kinds`` in ``queues`` (None: any) becomes ready."""
    params = {"kinds": list(kinds), "queues": None if queues is None else list(queues)}
    row = conn.execute(NEXT_DUE, params).fetchone()
    return None if row is None or row[0] is None else row[0].total_seconds()


def _db_ready_of_kinds(
    conn: psycopg.Connection, kinds: Sequence[str], queues: Sequence[str] | None
) -> str | None:
    """A kind of ``kinds`` of which a job is ready in ``queues`` (None: any)."""
    params = {"kinds": list(kinds), "queues": None if queues is None else list(queues)}
    return _the_row(conn.execute(READY_OF_KINDS, params))[0]


def _db_holds(conn: psycopg.Connection) -> list[tuple[str, datetime, float, str]]:
    """The kinds no worker starts now: (kind, until, seconds more, reason)."""
    return conn.execute(HOLDS).fetchall()


def _db_set_hold(conn: psycopg.Connection, kind: str, until: datetime, reason: str) -> None:
    """No worker starts ``kind`` jobs before ``until`` (every worker hears of it)."""
    params = {"kind": kind, "until": until, "reason": reason, "channel": NOTIFY_CHANNEL}
    conn.execute(SET_HOLD, params)


def _db_pause_worker_kind(
    conn: psycopg.Connection, worker_id: uuid.UUID, until: datetime, reason: str
) -> None:
    """Show in `workers` that this worker starts no claude job until ``until``, and why."""
    conn.execute(PAUSE_WORKER_KIND, {"id": worker_id, "until": until, "reason": reason})


def _db_unpause_worker_kind(conn: psycopg.Connection, worker_id: uuid.UUID, reason: str) -> None:
    """Show in `workers` that this worker starts claude jobs again (if ``reason`` held it)."""
    conn.execute(UNPAUSE_WORKER_KIND, {"id": worker_id, "reason": reason})


def _db_holds_over(conn: psycopg.Connection, worker_id: uuid.UUID) -> None:
    conn.execute(HOLDS_OVER, {"id": worker_id, "budget": BUDGET_NOTE})


def _db_worker_paused(conn: psycopg.Connection, worker_id: uuid.UUID) -> bool:
    """Whether this worker's row says it starts no claude job now."""
    row = conn.execute(WORKER_PAUSED, {"id": worker_id}).fetchone()
    return bool(row and row[0])


def _db_spent_today(conn: psycopg.Connection) -> float:
    """What claude spent since midnight UTC, by the ledger."""
    return float(_the_row(conn.execute(SPENT_TODAY))[0])


def _db_listen(conn: psycopg.Connection, channel: str) -> None:
    """LISTEN on ``channel`` (a name, not a parameter: quoted as an identifier)."""
    conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))


def _db_notify_queues(conn: psycopg.Connection, jobs: Iterable[Mapping[str, Any]]) -> None:
    """Wake the workers of the queues of these jobs."""
    for queue in sorted({job["queue"] for job in jobs}):
        conn.execute(NOTIFY_QUEUE, {"channel": NOTIFY_CHANNEL, "queue": queue, "run_at": None})


def _db_try_lock(conn: psycopg.Connection, key: int) -> bool:
    """Take a worker's session advisory lock, if free."""
    params = {"namespace": LOCK_NAMESPACE, "key": key}
    return bool(_the_row(conn.execute(TRY_LOCK, params))[0])


def _db_register_worker(
    conn: psycopg.Connection, worker_id: uuid.UUID, identity: Mapping[str, Any]
) -> int:
    """Take a fresh advisory lock key, then register the worker under it; the key."""
    while True:
        key = _the_row(conn.execute(NEXT_WORKER_KEY))[0]
        if _db_try_lock(conn, key):
            break
    conn.execute(REGISTER_WORKER, {"id": worker_id, "key": key, "notify": None, **identity})
    return key


def _db_heartbeat(
    conn: psycopg.Connection, worker_id: uuid.UUID, trouble: str | None = None
) -> bool | None:
    """Write the heartbeat, with what is wrong with the worker's parts (None: nothing);
    whether the worker is asked to drain; None when the registration is gone (declared
    dead)."""
    row = conn.execute(HEARTBEAT, {"id": worker_id, "trouble": trouble}).fetchone()
    return None if row is None else bool(row[0])


def _db_unlock_all(conn: psycopg.Connection) -> None:
    conn.execute(UNLOCK_ALL)


def _db_leave(conn: psycopg.Connection, worker_id: uuid.UUID) -> list[dict[str, Any]]:
    """Deregister a worker and put back the jobs still marked running under it (the attempt
    counted); those jobs."""
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(DEREGISTER_WORKER, {"id": worker_id})
        jobs = cur.execute(RECOVER_JOBS_OF, {"worker_id": worker_id}).fetchall()
        _db_recovered(conn, jobs)
    return jobs


def _db_recovered(conn: psycopg.Connection, jobs: Sequence[Mapping[str, Any]]) -> None:
    """Wake the workers of the queues of these interrupted jobs, and unblock what waited for
    those of them that ended (out of attempts, or cancelled)."""
    _db_notify_queues(conn, jobs)
    ended = [job for job in jobs if job["status"] != JobStatus.QUEUED]
    if ended:
        _db_unblock(conn, [job["id"] for job in ended], [job["concurrency_key"] for job in ended])


def _db_stale_workers(
    conn: psycopg.Connection, grace: float, timeout: float
) -> list[dict[str, Any]]:
    """Workers silent for longer than ``grace`` (``vanished``: longer than ``timeout``)."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(STALE_WORKERS, {"grace": grace, "timeout": timeout}).fetchall()


def _db_reap(
    conn: psycopg.Connection, worker: Mapping[str, Any], grace: float
) -> list[dict[str, Any]] | None:
    """Declare a silent worker dead, if it is (its lock is free, or it vanished: then end its
    lingering session where the role may), and put back its running jobs; those jobs, or
    None when it is alive after all."""
    key = {"namespace": LOCK_NAMESPACE, "key": worker["lock_key"]}
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        if not _the_row(cur.execute(TRY_LOCK_FOR_REAPING, key))["locked"]:
            if not worker["vanished"]:
                return None  # its session holds the lock: alive, only slow (or being reaped)
            params = {**key, "backend_pid": worker["backend_pid"],
                      "session_name": worker["session_name"]}  # fmt: skip
            with contextlib.suppress(psycopg.errors.InsufficientPrivilege), conn.transaction():
                cur.execute(TERMINATE_VANISHED, params)
        gone = cur.execute(REAP_WORKER, {"id": worker["id"], "grace": grace}).fetchone()
        if gone is None:
            return None  # it came back
        jobs = cur.execute(RECOVER_JOBS_OF, {"worker_id": worker["id"]}).fetchall()
        _db_recovered(conn, jobs)
        reason = _NO_HEARTBEAT if worker["vanished"] else _SESSION_ENDED
        cur.execute(RECORD_LOST_WORKER, {**gone, "reason": reason, "recovered": len(jobs)})
    return jobs


#: Why a worker was found dead.
_SESSION_ENDED = "its session ended (killed, crashed or cut off)"
_NO_HEARTBEAT = "no heartbeat within the timeout (its host vanished, or it froze)"


def _db_recover_orphans(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Put back the running jobs of workers that are not registered at all."""
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        jobs = cur.execute(RECOVER_ORPHANS).fetchall()
        _db_recovered(conn, jobs)
    return jobs


def _db_cancel_blocked(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Cancel the queued jobs that wait for a job that will never succeed; those jobs."""
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        jobs = cur.execute(CANCEL_BLOCKED, {"output": OUTPUT_CHANNEL}).fetchall()
        if jobs:  # their continuations may run now, and what was behind them in their keys
            _db_unblock(conn, [job["id"] for job in jobs], [job["concurrency_key"] for job in jobs])
    return jobs


def _db_lock_worktree(conn: psycopg.Connection, path: str) -> None:
    conn.execute(LOCK_WORKTREE, {"namespace": WORKTREE_LOCK_NAMESPACE, "path": path})


def _db_try_task_lock(conn: psycopg.Connection, task: int) -> bool:
    """Whether this transaction may do ``task`` (no other one does it now)."""
    params = {"namespace": LOCK_NAMESPACE, "task": task}
    return bool(_the_row(conn.execute(TRY_TASK_LOCK, params))[0])


def _db_unblock(
    conn: psycopg.Connection, ended: Collection[uuid.UUID], keys: Iterable[str | None]
) -> psycopg.Cursor[Any]:
    """Send UNBLOCK, in the transaction that ended these jobs (or gave up these keys' slots):
    the blocked jobs that may run now go back in the claim's way. How many, the cursor's row
    says."""
    params = {"ended": list(ended), "keys": sorted({key for key in keys if key is not None}),
              "channel": NOTIFY_CHANNEL}  # fmt: skip
    return conn.execute(UNBLOCK, params)


def _db_unblock_all(conn: psycopg.Connection) -> int:
    """Unblock every blocked job that may run (UNBLOCK_ALL), if no other worker is at it; how
    many."""
    with conn.transaction():
        if not _db_try_task_lock(conn, UNBLOCK_TASK):
            return 0
        params = {"ended": [], "keys": [], "channel": NOTIFY_CHANNEL}
        return _the_row(conn.execute(UNBLOCK_ALL, params))[0]


def _db_forget_starts(conn: psycopg.Connection) -> None:
    """Delete the starts older than the longest window of a rate."""
    conn.execute(FORGET_STARTS, {"seconds": MAX_RATE_SECONDS})


def fold_counts(conn: psycopg.Connection) -> None:
    """Fold the rows that statements appended to the kept counts into one per queue and
    status (workers do it every few seconds; readers are right either way, and faster after
    it), if no one else is at it."""
    with conn.transaction():
        if _db_try_task_lock(conn, FOLD_TASK):
            conn.execute(FOLD_COUNTS)
            conn.execute(FOLD_RUN_TIMES)


def _db_refresh_statistics(
    conn: psycopg.Connection, analyzed: float | None
) -> tuple[float | None, bool]:
    """Analyze the jobs table if the backlog has outgrown what its statistics say of it (and
    the backlog at this worker's last analysis, ``analyzed``) ANALYZE_GROWTH times over, and
    no other worker is at it. Returns what to remember for the next call (the backlog now if
    it analyzed; None once the backlog has drained below a tenth of what it was: the next
    burst is measured afresh), and whether it analyzed.

    The worker's statements run as generic plans, made once from the statistics of their
    time: those of a queue that was nearly empty when the worker started would walk a whole
    backlog of thousands where they should look up a few rows. The statements are written to
    stay fast with any plan (see _configure_worker_connection), and this brings the plans
    themselves back to what the backlog is, within seconds of a burst: autovacuum would wait
    for a share of the whole table to change, which a burst beside a long history is not."""
    actual, believed = _the_row(conn.execute(BACKLOG_BELIEF))
    if analyzed and actual * ANALYZE_GROWTH < analyzed:
        analyzed = None  # (that backlog is gone)
    floor = max(believed, analyzed or 0.0, ANALYZE_MIN_JOBS / ANALYZE_GROWTH)
    if actual < ANALYZE_GROWTH * floor:
        return analyzed, False
    with conn.transaction():
        if not _db_try_task_lock(conn, ANALYZE_TASK):
            return analyzed, False
        conn.execute(ANALYZE_JOBS)
    return actual, True


def _db_key_taken(
    conn: psycopg.Connection,
    keys: Collection[str],
    priority: int,
    run_at: datetime | None,
    cap: int,
) -> dict[str, int]:
    """How many slots of each of these keys a new job of this priority and due time (None:
    now) finds taken, counted up to about ``cap`` (see KEY_TAKEN)."""
    params = {"keys": list(keys), "priority": priority, "run_at": run_at, "cap": cap}
    return dict(conn.execute(KEY_TAKEN, params).fetchall())


@dataclass(frozen=True)
class _Row:
    """One row for the record statement: a claimed job, what its attempt came to (None: it
    runs on, and only its progress is written), and its progress."""

    job_id: uuid.UUID
    claim: uuid.UUID | None
    outcome: Outcome | None
    progress: Progress
    key: str | None = None  # the concurrency key whose slot it gives up when it ends


#: The outcome columns of a row that brings progress only.
_NO_OUTCOME = Outcome(Verdict.SUCCEEDED)


def _record_params(rows: Sequence[_Row], host: str) -> dict[str, Any]:
    """The one place where outcomes and progress become the record statement's parameters:
    the rows as one JSON array (a progress row's outcome fields empty), then what claude
    spent and the worktrees, by job; ``host``: where the worktrees are. (JSON: one
    parameter, where an array per column cost the worker more than the statement.)"""
    records, spent = [], []
    for row in rows:
        outcome, progress, job_id = row.outcome or _NO_OUTCOME, row.progress, str(row.job_id)
        records.append({
            "id": job_id, "claim": str(row.claim) if row.claim else None,
            "verdict": row.outcome.verdict if row.outcome else "progress",
            "result": outcome.result, "error": outcome.error, "traceback": outcome.traceback,
            "permanent": outcome.permanent, "delay": outcome.delay,
            "run_at": outcome.run_at.isoformat() if outcome.run_at else None,
            "transcript": progress.transcript, "session_id": progress.session_id,
            "cost_usd": progress.cost_usd, "worktree": progress.worktree,
            "checks": progress.checks, "delivery": progress.delivery,
        })  # fmt: skip
        spent += [{"job_id": job_id, "model": each.model, "runs": each.runs,
                   "cost": each.cost_usd, "input": each.input_tokens,
                   "output": each.output_tokens, "cache_read": each.cache_read_tokens,
                   "cache_write": each.cache_write_tokens}
                  for each in progress.spend]  # fmt: skip
    return {
        "rows": json.dumps(records, ensure_ascii=False),
        "spend": json.dumps(spent, ensure_ascii=False),
        "host": host,
        "limit": TRANSCRIPT_LIMIT,
        "output": OUTPUT_CHANNEL,
    }


@functools.cache
def _positional(query: str) -> tuple[str, tuple[str, ...]]:
    """``query`` with $1, $2... for its %(name)s placeholders, and the names in that order,
    for a raw cursor: psycopg parses again on every call a statement longer than 4 kB."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    return re.sub(r"%\((\w+)\)s", number, query), tuple(names)


def _db_record(
    conn: psycopg.Connection, rows: Sequence[_Row], host: str
) -> psycopg.Cursor[Any] | None:
    """Send the record statement (see RECORD) for these rows, then what unblocks the jobs
    waiting for those that ended (in the caller's transaction or pipeline), for their new
    statuses to be fetched (a row fenced out is missing): (job, status, run_at). None with
    no rows."""
    if not rows:
        return None
    text, names = _positional(RECORD)
    params = _record_params(rows, host)
    recorded = psycopg.RawCursor(conn).execute(text, [params[name] for name in names])
    ended = [row for row in rows if row.outcome is not None]
    if ended:
        _db_unblock(conn, [row.job_id for row in ended], [row.key for row in ended])
    return recorded


def _db_recorded(cursor: psycopg.Cursor[Any] | None) -> dict[uuid.UUID, str]:
    """The new status of each row a record statement wrote."""
    return {} if cursor is None else {job_id: status for job_id, status, _ in cursor.fetchall()}


###############################################################################
# Handler registry
###############################################################################

Handler = Callable[[Job], Any]
_HandlerT = TypeVar("_HandlerT", bound=Handler)

#: Python job kinds registered with @handler, by kind. Workers run these and "claude".
_registry: dict[str, Handler] = {}


def handler(kind: str) -> Callable[[_HandlerT], _HandlerT]:
    """Register a function as the handler of jobs of ``kind``.

    The function receives the Job (``job.context`` gives the stop event and deadline) and may
    return a JSON-able value, stored as the job's result. Raising retries the job with backoff;
    raising PermanentError fails it at once.
    """
    if not kind or kind == DEFAULT_KIND:
        raise ConfigError(f"cannot register a handler for kind {kind!r}")

    def register(fn: _HandlerT) -> _HandlerT:
        _registry[kind] = fn
        return fn

    return register


def registered_kinds() -> list[str]:
    """Every kind this process can run: claude and the registered Python kinds."""
    return sorted({DEFAULT_KIND, *_registry})


###############################################################################
# Git: what worktree jobs need of it
###############################################################################

#: `git worktree` changes of one repository, one at a time in this process (git's own locks
#: make a concurrent one fail rather than wait).
_git_locks: dict[str, threading.Lock] = {}
_git_locks_guard = threading.Lock()


class _GitError(Exception):
    pass


def _git(cwd: str | Path, *args: str, env: Mapping[str, str] | None = None) -> str:
    """Run git in ``cwd``; its output, stripped. Raises _GitError with what git said."""
    return _git_bytes(cwd, *args, env=env).decode("utf-8", "replace").strip()


def _git_bytes(cwd: str | Path, *args: str, env: Mapping[str, str] | None = None) -> bytes:
    """Run git in ``cwd``; its output as it is. Raises _GitError with what git said (also
    when ``cwd`` is not a directory), WorkerUnfit when git is not installed."""
    if not Path(cwd).is_dir():
        raise _GitError(f"{cwd} is not a directory (moved or deleted?)")
    command = next((arg for arg in args if not arg.startswith("-") and "=" not in arg), "")
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, timeout=300, check=False,
            env=None if env is None else dict(env),
        )  # fmt: skip
    except FileNotFoundError:
        raise WorkerUnfit("git is not installed on this worker (a worktree job needs it)") from None
    except subprocess.TimeoutExpired:
        raise _GitError(f"git {command} took more than 5 minutes") from None
    if done.returncode != 0:
        output = done.stderr.strip() or done.stdout.strip()
        said = output.decode("utf-8", "replace").splitlines()
        raise _GitError(f"git {command}: {said[-1] if said else f'status {done.returncode}'}")
    return done.stdout


@contextlib.contextmanager
def _repository_lock(common_dir: str) -> Iterator[None]:
    with _git_locks_guard:
        lock = _git_locks.setdefault(common_dir, threading.Lock())
    with lock:
        yield


def _git_retrying(common_dir: str, cwd: str | Path, *args: str) -> str:
    """A git command that changes the repository's worktrees or refs, under the repository's
    lock; tried again a few times when another process holds one of git's locks."""
    for delay in (0.2, 0.5, 1.0, 2.0, None):
        try:
            with _repository_lock(common_dir):
                return _git(cwd, *args)
        except _GitError as error:
            if delay is None or ".lock" not in str(error):
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")


#: What a worktree record's branch and base look like (they reach git as arguments: nothing
#: from the database is passed to it unchecked).
_WORKTREE_BRANCH = re.compile(r"claude-jobs/[0-9a-f]{12}")
_COMMIT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def _checked_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A worktree record (repo, path, branch, base) from the database, if it looks as this
    code writes them: absolute paths, a claude-jobs/ branch, a commit id; else _GitError."""
    repo, path, branch, base = (str(record.get(key)) for key in ("repo", "path", "branch", "base"))
    if not (
        Path(repo).is_absolute() and Path(path).is_absolute()
        and _WORKTREE_BRANCH.fullmatch(branch) and _COMMIT.fullmatch(base)
    ):  # fmt: skip
        raise _GitError(f"the worktree record {record!r} is not one claude-jobs wrote")
    return {**record, "repo": repo, "path": path, "branch": branch, "base": base}


def _repository_of(cwd: str | Path) -> tuple[str, str]:
    """The top level and the git directory of the repository ``cwd`` is in (_GitError when
    it is in none)."""
    top = _git(cwd, "rev-parse", "--show-toplevel")
    return top, str(Path(cwd, _git(cwd, "rev-parse", "--git-common-dir")).resolve())


def _commit_of(top: str | Path, ref: str) -> str:
    """The commit ``ref`` names in the repository at ``top`` (_GitError when none)."""
    return _git(top, "rev-parse", "--verify", "--end-of-options", f"{ref}^{{commit}}")


def _worktree_problem(cwd: str, base: str | None) -> str | None:
    """What keeps a worktree job in ``cwd`` from ``base`` (None: HEAD) from starting, if
    anything: no repository there, or a base that is no commit in it."""
    try:
        top, _ = _repository_of(cwd)
    except _GitError:
        return f'"worktree" needs a cwd inside a git repository: {cwd}'
    except WorkerUnfit:
        return "git is not installed here, and a worktree job needs it"
    try:
        _commit_of(top, base or "HEAD")
    except _GitError:
        return f"the worktree's base is not a commit in {top}: {base or 'HEAD'}"
    return None


def _git_ok(cwd: str | Path, *args: str) -> bool:
    try:
        _git(cwd, *args)
    except _GitError:
        return False
    return True


#: What git leaves in a worktree's own git directory while an operation is half done.
_UNFINISHED_OPERATIONS = (("rebase-merge", "a rebase"), ("rebase-apply", "a rebase or git am"),
                          ("MERGE_HEAD", "a merge"), ("CHERRY_PICK_HEAD", "a cherry-pick"),
                          ("REVERT_HEAD", "a revert"), ("BISECT_LOG", "a bisect"))  # fmt: skip


def _unfinished_operation(path: str | Path) -> str | None:
    """The git operation half done in the worktree at ``path`` (a rebase, a merge...), if
    any: removing the worktree would lose what it holds."""
    for name, what in _UNFINISHED_OPERATIONS:
        if Path(path, _git(path, "rev-parse", "--git-path", name)).exists():
            return what
    return None


def _detached_commits(path: str | Path) -> int:
    """How many commits the detached HEAD of the worktree at ``path`` has that no branch, tag
    or remote branch holds (0 when HEAD is on a branch): removing the worktree would leave
    them to git's garbage collection."""
    if _git_ok(path, "symbolic-ref", "-q", "HEAD"):
        return 0
    return int(_git(path, "rev-list", "--count", "HEAD", "--not", "--branches", "--tags",
                    "--remotes"))  # fmt: skip


# -- remotes on GitHub (delivery: see deliver) ---------------------------------------------------

#: What a remote's name and a branch's name may look like (they reach git as arguments).
_REMOTE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_BRANCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")
#: A GitHub repository's URL as a remote has it: https://HOST/OWNER/NAME(.git),
#: ssh://git@HOST(:port)/OWNER/NAME(.git) or git@HOST:OWNER/NAME(.git).
_GITHUB_URL = re.compile(
    r"(?:(?:https?|ssh|git)://(?:[^/@]*@)?(?P<host>[^/:]+)(?::\d+)?/|[^/@:]+@(?P<scp>[^/:]+):)"
    r"(?P<owner>[A-Za-z0-9_.-]+)/(?P<name>[A-Za-z0-9_.-]+?)(?:\.git)?/?"
)


def _without_credentials(text: str) -> str:
    """``text`` with what a URL in it carries before its host (a user, a token) masked."""
    return re.sub(r"://[^/\s@]+@", "://***@", text)


def _remote_url(repo: str | Path, remote: str) -> str | None:
    """The URL of ``remote`` as it is configured (before git's insteadOf rewriting)."""
    try:
        return _git(repo, "config", "--get", f"remote.{remote}.url") or None
    except _GitError:
        return None


def github_api_url() -> str:
    """GitHub's REST API: $GITHUB_API_URL (as GitHub Actions sets it), or api.github.com."""
    return (os.environ.get("GITHUB_API_URL") or GITHUB_API_URL).rstrip("/")


#: The variables that may hold a GitHub token (gh's and GitHub Actions' names).
_TOKEN_VARIABLES = ("GH_TOKEN", "GITHUB_TOKEN", "GH_ENTERPRISE_TOKEN", "GITHUB_ENTERPRISE_TOKEN")


def _without_secrets(text: str) -> str:
    """``text`` with the GitHub tokens of this process's environment masked: what claude and
    the checks print goes into the transcript, the database and claude's next prompt, and
    they run with that environment."""
    for name in _TOKEN_VARIABLES:
        token = os.environ.get(name, "")
        if len(token) >= 8 and token in text:
            text = text.replace(token, f"***{name}***")
    return text


def _github_hosts() -> set[str]:
    """The hosts whose repositories are on GitHub here: github.com, and a GitHub Enterprise
    server's (the host of $GITHUB_API_URL or $GITHUB_SERVER_URL)."""
    hosts = {"github.com"}
    for name in ("GITHUB_API_URL", "GITHUB_SERVER_URL"):
        if host := urllib.parse.urlsplit(os.environ.get(name) or "").hostname:
            hosts.add("github.com" if host == "api.github.com" else host)
    return hosts


def _github_repository(url: str) -> tuple[str, str] | None:
    """(owner, name) of a remote's URL on GitHub; None when it is not on GitHub."""
    found = _GITHUB_URL.fullmatch(url.strip())
    if found is None or (found["host"] or found["scp"]).lower() not in _github_hosts():
        return None
    return found["owner"], found["name"]


def _delivery_checked(payload: Mapping[str, Any]) -> dict[str, Any]:
    """What delivering a worktree job of ``payload`` needs, checked where it is queued: its
    remote is there; with "pr", on GitHub, and the pull request's base ("pr_base": by
    default the branch the worktree starts from). The payload's keys to store (InvalidJob
    for what is wrong)."""
    remote, cwd = payload["push"], payload["cwd"]
    try:
        top, _ = _repository_of(cwd)
    except _GitError:
        return {}  # (the worktree's own check says why)
    url = _remote_url(top, remote)
    if url is None:
        raise InvalidJob(f"the repository {top} has no remote {remote!r} to push to")
    if not payload.get("pr"):
        return {}
    if _github_repository(url) is None:
        raise InvalidJob(
            f"the remote {remote} ({_without_credentials(url)}) is not on GitHub (github.com, or "
            "the host of GITHUB_API_URL): claude-jobs opens pull requests on GitHub only"
        )
    if payload.get("pr_base"):
        return {}
    base = payload.get("base")
    if base is None:
        try:
            return {"pr_base": _git(cwd, "symbolic-ref", "--quiet", "--short", "HEAD")}
        except _GitError:
            raise InvalidJob(
                f"{top} is on a detached HEAD: give the pull request --pr-base BRANCH"
            ) from None
    if _git_ok(top, "rev-parse", "--verify", "--quiet", f"refs/heads/{base}"):
        return {"pr_base": base}
    if _git_ok(top, "rev-parse", "--verify", "--quiet", f"refs/remotes/{base}"):
        return {"pr_base": base.split("/", 1)[1]}
    raise InvalidJob(f"the worktree's base {base} is not a branch: give the pull request --pr-base")


###############################################################################
# Queue API: options and payloads
###############################################################################

_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+)ms)?")


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``90``, ``1.5``, ``30s``, ``5m``, ``1h30m``, ``2d``, ``250ms``."""
    text = text.strip().lower()
    try:
        seconds: float | None = float(text)
    except ValueError:
        seconds = None
    if seconds is None:
        match = _DURATION.fullmatch(text)
        if not text or not match or not any(match.groups()):
            raise InvalidJob(f"invalid duration {text!r} (examples: 30s, 5m, 1h30m, 2d)")
        days, hours, minutes, secs, millis = match.groups()
        seconds = (
            int(days or 0) * 86400
            + int(hours or 0) * 3600
            + int(minutes or 0) * 60
            + float(secs or 0)
            + int(millis or 0) / 1000
        )
    if not 0 <= seconds <= MAX_DURATION:  # NaN fails too
        raise InvalidJob(f"invalid duration {text!r}: from 0 up to ten years")
    return seconds


_RATE = re.compile(r"\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*")
_PERIOD_UNITS = {
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60),
    **dict.fromkeys(("h", "hr", "hour", "hours"), 3600),
    **dict.fromkeys(("d", "day", "days"), 86400),
}


@dataclass(frozen=True)
class Rate:
    """At most ``count`` starts in any window of ``seconds``, written N/PERIOD (``30/h``,
    ``5/m``, ``1/10s``): a queue's rate (`queue set --rate`), a worker's --max-starts."""

    count: int
    seconds: float

    @classmethod
    def parse(cls, text: str) -> Rate:
        match = _RATE.fullmatch(text.lower())
        if match is None or int(match[1]) < 1 or int(match[2] or 1) < 1:
            raise InvalidJob(
                f"invalid rate {text!r}: N/PERIOD, at least 1 start per period, like 30/h, "
                "5/m or 1/10s"
            )
        unit = _PERIOD_UNITS.get(match[3])
        if unit is None:
            raise InvalidJob(f"invalid rate {text!r}: the period's unit is s, m, h or d (1/10s)")
        seconds = int(match[2] or 1) * unit
        if seconds > MAX_RATE_SECONDS:
            raise InvalidJob(f"invalid rate {text!r}: the longest period is 7d")
        return cls(int(match[1]), float(seconds))

    def __str__(self) -> str:
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
            if self.seconds % size == 0:
                times = int(self.seconds // size)
                return f"{self.count}/{times if times > 1 else ''}{unit}"
        return f"{self.count}/{self.seconds:g}s"


def parse_time(text: str) -> datetime:
    """An ISO 8601 time; without a zone it is local time."""
    try:
        when = datetime.fromisoformat(text.strip())
        when = when if when.tzinfo else when.astimezone()
    except (ValueError, OverflowError):
        raise InvalidJob(
            f"invalid time {text!r}: use ISO 8601, e.g. 2026-11-24T09:00:00+01:00"
        ) from None
    return _checked_time(when, f"invalid time {text!r}")


#: The times a job may be due: what both PostgreSQL and Python represent in every time zone
#: (PostgreSQL would store 0001-01-01T00:00+14:00, but no one could read it back).
EARLIEST_TIME = datetime(1, 1, 2, tzinfo=UTC)
LATEST_TIME = datetime(9999, 12, 30, tzinfo=UTC)


def _checked_time(when: datetime, what: str = "invalid time") -> datetime:
    """``when`` (with a time zone), if within EARLIEST_TIME and LATEST_TIME; else InvalidJob."""
    if not EARLIEST_TIME <= when <= LATEST_TIME:
        raise InvalidJob(
            f"{what}: out of range ({EARLIEST_TIME.date()} to {LATEST_TIME.date()} UTC)"
        )
    return when


#: The events a job is told of itself.
_JOB_EVENTS = tuple(event for event in NOTIFY_EVENTS if event.startswith("job."))


def _is_http_url(url: Any) -> bool:
    """Whether ``url`` is an http(s) URL with a host (--notify, --public-url)."""
    parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
    return parts is not None and parts.scheme in ("http", "https") and bool(parts.hostname)


def _notify_events(on: Iterable[str], told: Collection[str]) -> list[str]:
    """The events of --notify-on's words (a group stands for those of its events that are
    ``told``), in NOTIFY_EVENTS' order; [] for all."""
    given = {event for word in on for event in NOTIFY_GROUPS.get(word, (word,)) if event in told}
    return [event for event in NOTIFY_EVENTS if event in given]


def _comma_separated(given: str | Sequence[str]) -> list[str]:
    """The words of a repeatable option whose values may each hold several, comma-separated."""
    values = [given] if isinstance(given, str) else list(given)
    return [word.strip() for value in values for word in str(value).split(",") if word.strip()]


def _check_notify(urls: Sequence[str], on: Sequence[str], told: Collection[str],
                  who: str) -> None:  # fmt: skip
    """Refuse a --notify that is not an http(s) URL (said with its credentials masked), and a
    --notify-on word that is no event or group, or an event not ``told`` to ``who``."""
    for url in urls:
        if not _is_http_url(url):
            raise InvalidJob(f"--notify {_without_credentials(str(url))!r}: not an http(s) URL")
    for word in on:
        if word not in NOTIFY_EVENTS and word not in NOTIFY_GROUPS:
            raise InvalidJob(
                f"--notify-on {word!r}: not an event (they are {', '.join(NOTIFY_EVENTS)}; "
                "finished and attention name groups of them)"
            )
        if word in NOTIFY_EVENTS and word not in told:
            batch = word == "batch.finished" and who.startswith("a job")
            where = "the end of a --batch: give --batch" if batch else f"not told to {who}"
            raise InvalidJob(f"--notify-on {word}: {where}")
    if on and not urls:
        raise InvalidJob("--notify-on narrows --notify: give --notify URL too")


def check_queue(name: str) -> str:
    """``name``, if it can name a queue: not empty, not `*` (every queue, to a worker), no
    comma (the separator of --queues); InvalidJob otherwise."""
    if not name or "," in name or name == "*" or len(name) > 200 or "\x00" in name:
        raise InvalidJob(f"invalid queue name {name!r}: not empty, not *, no comma, no NUL")
    return name


def _option(
    default: Any, help: str, *, env: str | None = None, value: str | None = None, **click: Any
) -> Any:
    """A settings field (JobOptions, WorkerSettings, ClaudeSettings) that is also an option,
    --FIELD-NAME (or ``flag``), with this ``help`` and the CLAUDE_JOBS_``env`` variable: the
    command line is built from the fields (see _flags). ``value``: "duration" (30s, 5m) or
    "time" (ISO 8601); the rest goes to click.option as it is."""
    return field(
        default=default, metadata={"flag": {"help": help, "env": env, "value": value, **click}}
    )


class JobSettings(TypedDict, total=False):
    """The keywords of enqueue() and enqueue_many(), for type checkers: the fields of JobOptions
    (where their defaults are) and ``delay`` (tests/test_units.py keeps the two in step)."""

    kind: str
    queue: str
    priority: int
    run_at: datetime | None
    delay: float | timedelta | None
    max_attempts: int
    timeout: float | timedelta | None
    concurrency_key: str | None
    concurrency_limit: int
    after: Sequence[uuid.UUID | str]
    continue_from: uuid.UUID | str | None
    unique_key: str | None
    unique_for: float | timedelta | None
    batch: str | None
    on_finish: Mapping[str, Any] | None
    on_success: Mapping[str, Any] | None
    notify: Sequence[str] | str
    notify_on: Sequence[str] | str
    tags: Sequence[str] | str


@dataclass(frozen=True)
class JobOptions:
    """What applies to a job besides its payload; validated when built.

    ``concurrency_key``: at most ``concurrency_limit`` jobs with the same key run at once,
    across all workers (a claude job's key is its absolute cwd unless it says otherwise; a
    limit of 0 means no key). ``after``: jobs that must all succeed first.
    ``continue_from``: a claude job whose session this one resumes, once it finished.
    ``unique_key``: no new job while a job of that key is queued or running (or, with
    ``unique_for``, was enqueued within that many seconds, whatever became of it).
    ``batch``: the name of the open batch the job joins (a new batch if none is open);
    ``on_finish`` and ``on_success``: the payloads of the jobs (of the same kind and options)
    queued once every job of the batch has ended, or succeeded.
    """

    kind: str = _option(DEFAULT_KIND, "Job kind.", env="KIND")
    queue: str = _option(DEFAULT_QUEUE, "Queue name.", env="QUEUE")
    priority: int = _option(
        0, "Higher runs first.", env="PRIORITY", type=click.IntRange(PG_INT_MIN, PG_INT_MAX)
    )
    run_at: datetime | None = _option(
        None, "Run no sooner than this ISO 8601 time.", env="RUN_AT", value="time"
    )
    max_attempts: int = _option(
        DEFAULT_MAX_ATTEMPTS,
        "Attempts before the job fails.",
        env="MAX_ATTEMPTS",
        type=click.IntRange(1, PG_INT_MAX),
    )
    timeout: float | None = _option(
        None, "Time limit of each attempt (claude jobs: 1h).", env="TIMEOUT", value="duration"
    )
    concurrency_key: str | None = _option(
        None,
        "At most --concurrency-limit jobs with this key run at once, on all workers "
        "[default for claude jobs: their cwd].",
        metavar="KEY",
    )
    concurrency_limit: int = _option(
        1, "Jobs of the key that may run at once (0: no key).", type=click.IntRange(0, PG_INT_MAX)
    )
    after: tuple[uuid.UUID | str, ...] = _option(
        (),
        "Run once these jobs succeeded; cancelled if one of them fails or is cancelled.",
        metavar="ID[,ID...]",
        multiple=True,
    )
    continue_from: uuid.UUID | str | None = _option(
        None,
        "Resume that claude job's session (same cwd or worktree) once it finished.",
        metavar="ID",
    )
    unique_key: str | None = _option(
        None,
        "Enqueue nothing (print the job that has it) while a job with this key is queued "
        "or running.",
        metavar="KEY",
    )
    unique_for: float | None = _option(
        None,
        "With --unique-key: also while the job with the key was enqueued less than this "
        "ago, whatever became of it (24h).",
        value="duration",
    )
    tags: tuple[str, ...] = _option(
        (),
        "Label the job (repeatable): list --tag and stats --tag find and count it.",
        flag="--tag",
        metavar="TAG",
        multiple=True,
    )
    batch: str | None = _option(
        None,
        "Add the job(s) to the open batch of this name (a new batch if none is open).",
        metavar="NAME",
    )
    on_finish: Mapping[str, Any] | None = _option(
        None,
        "With --batch: queue this payload (a job of the same kind and options) once every "
        "job of the batch has ended (@PATH: from a file).",
        value="payload",
    )
    on_success: Mapping[str, Any] | None = _option(
        None, "With --batch: the same, only if every job of the batch succeeded.", value="payload"
    )
    notify: tuple[str, ...] = _option(
        (),
        "Tell this URL when the job ends (repeatable): a webhook (Standard Webhooks, signed "
        "with CLAUDE_JOBS_WEBHOOK_SECRET), or a Slack or Discord incoming webhook. With "
        "--batch: when the batch ends (its jobs tell only job.needs_attention).",
        metavar="URL",
        multiple=True,
    )
    notify_on: tuple[str, ...] = _option(
        (),
        "Tell --notify only of these events (comma-separated): "
        + ", ".join(_JOB_EVENTS)
        + ", batch.finished; or finished, attention [default: all].",
        metavar="EVENTS",
        multiple=True,
    )

    def __post_init__(self) -> None:
        check_queue(self.queue)
        if not PG_INT_MIN <= self.priority <= PG_INT_MAX:
            raise InvalidJob(
                f"priority {self.priority} is out of range [{PG_INT_MIN}, {PG_INT_MAX}]"
            )
        if not 1 <= self.max_attempts <= PG_INT_MAX:
            raise InvalidJob(f"max attempts must be at least 1, not {self.max_attempts}")
        if self.timeout is not None and not self.timeout > 0:
            raise InvalidJob(f"timeout must be positive, not {self.timeout}")
        if self.run_at is not None and self.run_at.tzinfo is None:
            raise InvalidJob("run_at needs a time zone")
        if self.run_at is not None:
            _checked_time(self.run_at, f"invalid run_at {self.run_at.isoformat()}")
        if not 0 <= self.concurrency_limit <= PG_INT_MAX:
            raise InvalidJob(f"concurrency limit must be 0 or more, not {self.concurrency_limit}")
        if self.concurrency_key is not None and not self.concurrency_key.strip():
            raise InvalidJob("a concurrency key must not be empty")
        if self.concurrency_key is not None and "\x00" in self.concurrency_key:
            raise InvalidJob("a concurrency key contains a NUL character, which cannot be stored")
        if isinstance(self.continue_from, str) and not self.continue_from.strip():
            raise InvalidJob("continue_from is empty: give the id of the job to continue")
        if self.continue_from is not None and self.kind != DEFAULT_KIND:
            raise InvalidJob("only claude jobs can continue another job's session")
        _check_unique(self.unique_key, self.unique_for)
        if self.batch is not None and (
            not self.batch.strip() or len(self.batch) > 200 or "\x00" in self.batch
        ):
            raise InvalidJob(
                f"invalid batch name {self.batch!r}: not empty, 200 characters or less"
            )
        for name in ("on_finish", "on_success"):
            callback = getattr(self, name)
            if callback is not None and self.batch is None:
                raise InvalidJob(f"--{name.replace('_', '-')} is a batch's callback: give --batch")
            if callback is not None and not isinstance(callback, Mapping):
                raise InvalidJob(f"{name} must be a payload: a JSON object")
        _check_tags("--tag", list(self.tags), Path())
        told = _JOB_EVENTS + (("batch.finished",) if self.batch is not None else ())
        _check_notify(self.notify, self.notify_on, told, "a job (a worker's --notify is)")

    @classmethod
    def build(cls, **settings: Unpack[JobSettings]) -> JobOptions:
        """The options of enqueue's keywords (JobSettings): a ``delay`` becomes a ``run_at``,
        a timedelta seconds; what is not given takes the field's default. The kind must be
        known here (a schedule's runs are built with the constructor: the worker that fires
        one need not run its kind)."""
        kind = settings.get("kind", DEFAULT_KIND)
        if kind not in registered_kinds():
            raise InvalidJob(
                f"unknown kind {kind!r}: known kinds are {', '.join(registered_kinds())} "
                "(a Python kind is known once the module that registers it is imported)"
            )
        values: dict[str, Any] = dict(settings)
        values["run_at"] = _due_at(values.get("run_at"), values.pop("delay", None))
        durations = ("timeout", "unique_for")
        for name in durations:
            if isinstance(seconds := values.get(name), timedelta):
                values[name] = seconds.total_seconds()
        if isinstance(values.get("after"), str):
            raise InvalidJob("after must be a list of job ids, not a string")
        values["after"] = tuple(values.get("after") or ())
        for name in ("notify", "notify_on", "tags"):  # (a string is one; --notify-on: commas)
            given = values.get(name) or ()
            if not isinstance(given, str | list | tuple):
                raise InvalidJob(f"{name} must be a list of strings, not {_json_type(given)}")
            given = (given,) if isinstance(given, str) else tuple(given)
            values[name] = tuple(_comma_separated(given)) if name == "notify_on" else given
        unknown = sorted(set(values) - {each.name for each in dataclasses.fields(cls)})
        if unknown:
            raise InvalidJob(f"not a job option: {', '.join(unknown)}")
        hints = _option_types()
        for name, value in values.items():
            if hints[name] is int and isinstance(value, float) and value.is_integer():
                values[name] = value = int(value)  # (JSON and TOML may say 3.0)
            _check_type(name, value, hints[name])
        for name in durations:
            if (seconds := values.get(name)) is not None and seconds > MAX_DURATION:
                raise InvalidJob(f"{name} must be at most ten years, not {seconds}")
        return cls(**values)


@functools.cache
def _option_types() -> dict[str, Any]:
    """The types of JobOptions' fields (for _check_type)."""
    return typing.get_type_hints(JobOptions)


#: How a message names a value of each type.
_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               datetime: "a time", timedelta: "a timedelta", uuid.UUID: "an id",
               Mapping: "an object"}  # fmt: skip


def _check_type(name: str, value: Any, hint: Any) -> None:
    """InvalidJob unless ``value`` is of the type ``hint`` (a field's annotation: a class, a
    union of classes and None, a tuple of them, a Mapping): settings come from TOML files and
    JSON as well as from Python. A bool is no number."""
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, tuple):
            raise InvalidJob(f"{name} must be a list, not {_json_type(value)}")
        for each in value:
            _check_type(f"each of {name}", each, typing.get_args(hint)[0])
        return
    if not _fits(value, hint):
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        members = [t for t in typing.get_args(hint) if t is not type(None)] if union else [hint]
        words = " or ".join(_TYPE_WORDS[typing.get_origin(t) or t] for t in members)
        raise InvalidJob(f"{name} must be {words}, not {_json_type(value)}")


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the type ``hint`` (see _check_type)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, each) for each in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint in (int, float) and isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, int | float)
    return isinstance(value, origin or hint)


def _check_unique(key: Any, seconds: Any) -> None:
    """InvalidJob unless ``key`` is a unique key (or None) and ``seconds`` its window."""
    if key is not None and (not isinstance(key, str) or not key.strip() or "\x00" in key):
        raise InvalidJob("a unique key must be non-empty text without NUL characters")
    if seconds is None:
        return
    if key is None:
        raise InvalidJob("--unique-for is how long a --unique-key holds: give the key too")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
        raise InvalidJob(f"unique_for must be a positive duration, not {seconds!r}")


def _due_at(run_at: datetime | None, delay: float | timedelta | None) -> datetime | None:
    """When a job given ``run_at`` or ``delay`` (seconds or a timedelta from now) is due:
    InvalidJob for both, or a delay that is negative or over ten years."""
    if run_at is not None and delay is not None:
        raise InvalidJob("give a delay or a run_at time, not both")
    if delay is None:
        return run_at
    _check_type("delay", delay, float | timedelta)
    seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
    if not 0 <= seconds <= MAX_DURATION:
        raise InvalidJob(f"delay must be from 0 up to ten years, not {seconds}")
    return datetime.now(UTC) + timedelta(seconds=seconds)


# -- claude payloads ----------------------------------------------------------------------------

Check = Callable[[str, Any, Path], Any]

PERMISSION_MODES = ("acceptEdits", "auto", "bypassPermissions", "default", "dontAsk", "plan")
EFFORT_LEVELS = ("low", "medium", "high", "xhigh", "max")  # as claude --help lists them


def _check_text(name: str, value: Any, base_dir: Path) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidJob(f'"{name}" must be a non-empty string')
    return value


def _check_prompt(name: str, value: Any, base_dir: Path) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidJob('a claude job needs "prompt": a non-empty string')
    return value


def _check_flag(name: str, value: Any, base_dir: Path) -> bool:
    if not isinstance(value, bool):
        raise InvalidJob(f'"{name}" must be true or false')
    return value


def _check_count(name: str, value: Any, base_dir: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= PG_INT_MAX:
        raise InvalidJob(f'"{name}" must be a whole number from 1 to {PG_INT_MAX}')
    return value


def _check_amount(name: str, value: Any, base_dir: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e9:
        raise InvalidJob(f'"{name}" must be a positive number')
    return value


def _check_tools(name: str, value: Any, base_dir: Path) -> list[str]:
    tools = [value] if isinstance(value, str) else value
    if not (
        isinstance(tools, list) and tools and all(isinstance(t, str) and t.strip() for t in tools)
    ):
        raise InvalidJob(
            f'"{name}" must be a tool or a list of tools, e.g. ["Read", "Bash(git:*)"]'
        )
    # claude takes the values of a list option up to the next argument that begins with "-":
    # ["Read", "--model", "x"] would set its model.
    if any(tool.lstrip().startswith("-") for tool in tools):
        raise InvalidJob(f'"{name}" entries must not begin with "-" (claude would read a flag)')
    return tools


def _check_choice(choices: Sequence[str]) -> Check:
    """A check that the value is one of ``choices``."""

    def check(name: str, value: Any, base_dir: Path) -> str:
        if value not in choices:
            raise InvalidJob(f'"{name}" must be one of {", ".join(choices)}')
        return str(value)

    return check


def _check_dir(name: str, value: Any, base_dir: Path) -> str:
    """A directory, made absolute against ``base_dir``; it must exist."""
    path = Path(base_dir, os.path.expanduser(_check_text(name, value, base_dir))).resolve()
    if not path.is_dir():
        raise InvalidJob(f'"{name}" is not an existing directory: {path}')
    return str(path)


def _check_dirs(name: str, value: Any, base_dir: Path) -> list[str]:
    if not isinstance(value, list) or not value:
        raise InvalidJob(f'"{name}" must be a list of directories')
    return [_check_dir(name, each, base_dir) for each in value]


def _check_env(name: str, value: Any, base_dir: Path) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k) and isinstance(v, str)
        for k, v in value.items()
    ):
        raise InvalidJob(f'"{name}" must map variable names to strings, e.g. {{"DEBUG": "1"}}')
    return value


def _check_mcp_config(name: str, value: Any, base_dir: Path) -> str:
    """An MCP configuration: JSON (an object, or its text), or a file, made absolute."""
    if isinstance(value, dict):
        return json.dumps(value)
    text = _check_text(name, value, base_dir)
    if text.lstrip().startswith("{"):
        try:
            json.loads(text, parse_constant=_no_constant)
        except (ValueError, RecursionError, InvalidJob) as error:
            reason = getattr(error, "msg", error)
            raise InvalidJob(f'"{name}" is not valid JSON: {reason}') from None
        return text
    path = Path(base_dir, os.path.expanduser(text)).resolve()
    if not path.is_file():
        raise InvalidJob(f'"{name}" is neither JSON nor an existing file: {path}')
    return str(path)


def _check_timeout(name: str, value: Any, base_dir: Path) -> float:
    try:
        seconds = parse_duration(value) if isinstance(value, str) else value
    except InvalidJob:
        seconds = None
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        seconds = None
    if seconds is None or not 0 < seconds <= MAX_DURATION:  # NaN and Infinity fail too
        raise InvalidJob(f'"{name}" must be a duration up to ten years: seconds, or like "30m"')
    return float(seconds)


def _check_key(name: str, value: Any, base_dir: Path) -> str | None:
    return None if value is None else _check_text(name, value, base_dir)


def _check_tags(name: str, value: Any, base_dir: Path) -> list[str]:
    tags = [value] if isinstance(value, str) else value
    if not isinstance(tags, list | tuple) or not all(isinstance(tag, str) for tag in tags):
        raise InvalidJob(f'"{name}" must be a list of tags (strings)')
    for tag in tags:
        if not tag.strip() or len(tag) > MAX_TAG or "\x00" in tag:
            raise InvalidJob(f"invalid tag {tag!r}: not empty, at most {MAX_TAG} characters")
    return list(dict.fromkeys(tags))


def _check_commands(name: str, value: Any, base_dir: Path) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(each, str) for each in value):
        raise InvalidJob(f'"{name}" must be a list of shell commands (strings)')
    if not all(each.strip() for each in value):
        raise InvalidJob(f'"{name}": a check is a shell command, and one is empty')
    return value


def _check_rounds(name: str, value: Any, base_dir: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise InvalidJob(f'"{name}" must be a whole number from 0 to 100')
    return value


def _check_remote(name: str, value: Any, base_dir: Path) -> str:
    if not isinstance(value, str) or not _REMOTE_NAME.fullmatch(value):
        raise InvalidJob(f'"{name}" must name a git remote (such as "origin")')
    return value


def _check_branch(name: str, value: Any, base_dir: Path) -> str:
    if not isinstance(value, str) or not _BRANCH_NAME.fullmatch(value) or ".." in value:
        raise InvalidJob(f'"{name}" must be a branch name')
    return value


#: What a claude job's payload may hold: how each key is checked (and stored), and the claude
#: flag it becomes. Any other key is refused, so that a typo does not pass unseen.
CLAUDE_PAYLOAD: dict[str, tuple[Check, str | None]] = {
    "prompt": (_check_prompt, None),
    "cwd": (_check_dir, None),
    "worktree": (_check_flag, None),  # run in a fresh git worktree on a branch of its own
    "base": (_check_text, None),  # the worktree's starting point (default: HEAD)
    "concurrency_key": (_check_key, None),  # stored on the job, not in the payload
    "timeout": (_check_timeout, None),  # stored on the job, not in the payload
    "unique_key": (_check_key, None),  # stored on the job, not in the payload
    "unique_for": (_check_timeout, None),  # (the window of unique_key)
    "tags": (_check_tags, None),  # stored on the job, not in the payload
    "env": (_check_env, None),  # extra environment for claude
    "model": (_check_text, "--model"),
    "fallback_model": (_check_text, "--fallback-model"),
    "max_turns": (_check_count, "--max-turns"),
    "max_budget_usd": (_check_amount, "--max-budget-usd"),
    "allowed_tools": (_check_tools, "--allowedTools"),
    "disallowed_tools": (_check_tools, "--disallowedTools"),
    "append_system_prompt": (_check_text, "--append-system-prompt"),
    "system_prompt": (_check_text, "--system-prompt"),
    "permission_mode": (_check_choice(PERMISSION_MODES), "--permission-mode"),
    "add_dirs": (_check_dirs, "--add-dir"),
    "mcp_config": (_check_mcp_config, "--mcp-config"),
    "effort": (_check_choice(EFFORT_LEVELS), "--effort"),
    "checks": (_check_commands, None),  # shell commands that must pass after claude
    "check_rounds": (_check_rounds, None),  # rounds of repair (default DEFAULT_CHECK_ROUNDS)
    "push": (_check_remote, None),  # push a worktree job's branch to this remote
    "pr": (_check_flag, None),  # and open a pull request on GitHub (push defaults to origin)
    "pr_base": (_check_branch, None),  # its base (default: the branch the worktree left)
    "pr_ready": (_check_flag, None),  # ready for review, not a draft
    "pr_title": (_check_text, None),  # its title (default: claude's result's first line)
}
#: Payload keys that are the job's settings rather than claude's.
_JOB_KEYS = ("concurrency_key", "timeout", "unique_key", "unique_for", "tags")
#: Payload keys of a worktree job's delivery (see _deliver).
_DELIVERY_KEYS = ("push", "pr", "pr_base", "pr_ready", "pr_title")


def prepare_payload(kind: str, payload: Any, base_dir: str | Path | None = None) -> dict[str, Any]:
    """Check a payload for ``kind`` and return it ready to store.

    For claude jobs (see CLAUDE_PAYLOAD): ``prompt`` is a non-empty string; ``cwd`` and the
    other paths are made absolute against ``base_dir`` (default: the current directory) and
    must exist; unknown keys are refused.
    """
    return _checked_payload(kind, payload, base_dir)


@dataclass(frozen=True)
class _Prepared:
    """A checked payload as stored, with the job settings it carried."""

    payload: dict[str, Any]
    text: str  # the payload's JSON
    settings: dict[str, Any]  # the _JOB_KEYS the payload gave


def _prepare(
    kind: str,
    payload: Any,
    base_dir: str | Path | None,
    seen: dict[tuple[str, str | None], str | None] | None = None,
) -> _Prepared:
    return _as_prepared(kind, _checked_payload(kind, payload, base_dir, seen))


def _as_prepared(kind: str, checked: Mapping[str, Any]) -> _Prepared:
    """A checked payload as stored: the job's settings it carries (a claude payload's
    _JOB_KEYS) apart."""
    payload = dict(checked)
    settings = {
        key: payload.pop(key) for key in _JOB_KEYS if kind == DEFAULT_KIND and key in payload
    }
    return _Prepared(payload, _payload_json(payload), settings)


def _with_checked_callbacks(options: JobOptions, base_dir: str | Path | None) -> JobOptions:
    """``options`` with the payloads of its batch's callbacks checked (as enqueue checks a
    payload of its kind: a claude callback's cwd made absolute)."""
    changes: dict[str, Any] = {}
    for name in ("on_finish", "on_success"):
        if (payload := getattr(options, name)) is not None:
            try:
                changes[name] = _checked_payload(options.kind, dict(payload), base_dir)
            except InvalidJob as error:
                raise InvalidJob(f"{name}: {error}") from None
    return dataclasses.replace(options, **changes) if changes else options


def _checked_payload(
    kind: str,
    payload: Any,
    base_dir: str | Path | None,
    seen: dict[tuple[str, str | None], str | None] | None = None,
) -> dict[str, Any]:
    """A claude payload checked (see prepare_payload); ``seen``: the worktrees checked in this
    batch already (a repository and base checked once, not once a line)."""
    if not isinstance(payload, dict):
        raise InvalidJob(f"the payload must be a JSON object, not {_json_type(payload)}")
    if kind != DEFAULT_KIND:
        return payload
    unknown = sorted(set(payload) - set(CLAUDE_PAYLOAD))
    if unknown:
        raise InvalidJob(
            f"unknown payload key {', '.join(map(repr, unknown))} for a claude job "
            f"(allowed: {', '.join(CLAUDE_PAYLOAD)})"
        )
    if "prompt" not in payload:
        raise InvalidJob('a claude job needs "prompt": a non-empty string')
    if "base" in payload and not payload.get("worktree"):
        raise InvalidJob('"base" is the starting point of a worktree: it needs "worktree": true')
    delivered = [key for key in _DELIVERY_KEYS if payload.get(key) not in (None, False)]
    if delivered and not payload.get("worktree"):
        raise InvalidJob(
            f'"{delivered[0]}" delivers the branch of a worktree job: it needs "worktree": true '
            "(--worktree)"
        )
    if (of_pr := [key for key in delivered if key.startswith("pr_")]) and not payload.get("pr"):
        raise InvalidJob(f'"{of_pr[0]}" is for a pull request: it needs "pr": true (--pr)')
    if "check_rounds" in payload and not payload.get("checks"):
        raise InvalidJob('"check_rounds" counts the rounds of repair of checks: it needs "checks"')
    if _too_deep(payload):  # (before anything walks it: it may even hold itself)
        raise InvalidJob(f"the payload nests more than {MAX_PAYLOAD_DEPTH} levels deep")
    for key, value in payload.items():
        if _holds_nul(value):
            raise InvalidJob(f'"{key}" contains a NUL character, which PostgreSQL cannot store')
    base = Path(base_dir or os.getcwd())
    checked = {key: CLAUDE_PAYLOAD[key][0](key, value, base) for key, value in payload.items()}
    if checked.get("worktree") and checked.get("cwd"):  # (without one: the worker's directory)
        seen = {} if seen is None else seen
        where = (checked["cwd"], checked.get("base"))
        if where not in seen:
            seen[where] = _worktree_problem(*where)
        if problem := seen[where]:
            raise InvalidJob(problem)
    if checked.get("pr") and not checked.get("push"):
        checked["push"] = "origin"
    if checked.get("push") and checked.get("cwd"):
        checked.update(_delivery_checked(checked))
    return checked


def _holds_nul(value: Any) -> bool:
    """Whether any text in ``value`` (nested, keys too) holds a NUL character."""
    stack = [value]
    while stack:
        each = stack.pop()
        if isinstance(each, str) and "\x00" in each:
            return True
        if isinstance(each, dict):
            stack.extend([*each.keys(), *each.values()])
        elif isinstance(each, list):
            stack.extend(each)
    return False


def _concurrency_key(
    options: JobOptions, prepared: _Prepared, previous: Job | None = None
) -> str | None:
    """The key a job runs under: none with a limit of 0; else the payload's, the options',
    or by default, for a claude job, its cwd; in a worktree, none (it has the worktree to
    itself), but a continuation shares the worktree of the job it continues, and so its key
    (or, from the first job of the worktree, its branch)."""
    if options.concurrency_limit == 0:
        return None
    if "concurrency_key" in prepared.settings:
        return prepared.settings["concurrency_key"]
    if options.concurrency_key is not None:
        return options.concurrency_key
    payload = prepared.payload
    if options.kind != DEFAULT_KIND:
        return None
    if not payload.get("worktree"):
        return payload.get("cwd")
    if previous is not None and previous.payload.get("worktree"):
        return previous.concurrency_key or f"worktree {_branch_name(previous.id)}"
    return None


def _worker_name() -> str:
    """This process, as workers are named: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _branch_name(job_id: uuid.UUID) -> str:
    """The branch of a worktree job: claude-jobs/ and the start of its id."""
    return f"claude-jobs/{job_id.hex[:12]}"


def job_branch(job: Job) -> str | None:
    """The git branch a worktree job works on (a continuation: the one of the job it continues);
    None for other jobs."""
    if not job.payload.get("worktree"):
        return None
    recorded = job.worktree or (job.resumes or {}).get("worktree") or {}
    if "branch" in recorded:
        return recorded["branch"]
    return None if job.continue_from else _branch_name(job.id)  # (a chain's: not known yet)


def _row(options: JobOptions, prepared: _Prepared, previous: Job | None = None) -> dict[str, Any]:
    """The columns of one job (and the window of its unique key)."""
    unique_key = prepared.settings.get("unique_key", options.unique_key)
    unique_for = prepared.settings.get("unique_for", options.unique_for)
    _check_unique(unique_key, unique_for)
    concurrency_key = _concurrency_key(options, prepared, previous)
    for what, key in (("concurrency key", concurrency_key), ("unique key", unique_key)):
        if key is not None and len(key.encode("utf-8", "replace")) > MAX_KEY_BYTES:
            raise InvalidJob(
                f"the job's {what} is longer than {MAX_KEY_BYTES:,} bytes (a claude job's "
                "concurrency key is its cwd unless it gives one)"
            )
    tags = prepared.settings.get("tags", options.tags)
    return {
        "payload": prepared.text,
        "tags": list(tags) or None,
        "timeout": prepared.settings.get("timeout", options.timeout),
        "concurrency_key": concurrency_key,
        "concurrency_limit": options.concurrency_limit,
        "unique_key": unique_key,
        "unique_for": unique_for,
    }


def _continuing(payload: Any, previous: Job | None) -> Any:
    """A continuation's payload: every option of the job it continues (all but its prompt),
    unless it gives its own; a null drops an inherited option."""
    if previous is None or not isinstance(payload, Mapping):
        return payload
    merged = {**{k: v for k, v in previous.payload.items() if k != "prompt"}, **payload}
    return {key: value for key, value in merged.items() if value is not None}


def _as_continuation(
    options: JobOptions, prepared: _Prepared, previous: Job, dropped: Collection[str]
) -> tuple[JobOptions, list[str]]:
    """A continuation's options, and what it may do that the job it continues could not. It
    runs where that job ran (claude keeps sessions per directory), with its time limit and
    concurrency key (and limit) unless it gives its own, or drops them (``dropped``: the
    payload's keys given as null)."""
    cwd, was = prepared.payload.get("cwd"), previous.payload.get("cwd")
    if cwd != was:
        nowhere = "the directory of its worker"
        raise InvalidJob(
            f"a continuation runs where the job it continues ran ({was or nowhere}), not in "
            f"{cwd or nowhere}: claude keeps its sessions per directory"
        )
    given = "concurrency_key" in prepared.settings or options.concurrency_key is not None
    if "concurrency_key" in dropped:
        options = dataclasses.replace(options, concurrency_limit=0)
    elif not given and options.concurrency_limit and not previous.payload.get("worktree"):
        # (a worktree's continuations share its own key: see _concurrency_key)
        key, limit = previous.concurrency_key, previous.concurrency_limit
        options = dataclasses.replace(
            options, concurrency_key=key, concurrency_limit=limit if key else 0
        )
    if not ("timeout" in dropped or "timeout" in prepared.settings or options.timeout):
        options = dataclasses.replace(options, timeout=previous.timeout)
    return options, _widening(previous.payload, prepared.payload)


#: How much each permission mode lets claude do without asking, least first; without one,
#: claude runs with --dangerously-skip-permissions.
_PERMISSION_REACH = {"plan": 0, "default": 1, "dontAsk": 1, "acceptEdits": 2, "auto": 3,
                     "bypassPermissions": 4, None: 4}  # fmt: skip


def _widening(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """What a claude job with options ``after`` may do that one with ``before`` could not,
    a phrase per option: more tools or directories, fewer forbidden tools, higher limits, a
    laxer permission mode, other MCP servers or environment."""

    def listed(key: str, options: Mapping[str, Any]) -> list[str]:
        value = options.get(key) or []
        return [value] if isinstance(value, str) else list(value)

    def gone(key: str) -> str:
        return f"{key}: no longer given (was {', '.join(map(str, listed(key, before)))})"

    found: list[str] = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        if key in ("allowed_tools", "add_dirs"):  # what it may use
            added = [each for each in listed(key, after) if each not in listed(key, before)]
            if key == "allowed_tools" and new is None:
                found.append(gone(key))
            elif added and (old is not None or key == "add_dirs"):
                found.append(f"{key}: adds {', '.join(added)}")
        elif key == "disallowed_tools":  # what it may not use
            allowed = [each for each in listed(key, before) if each not in listed(key, after)]
            if new is None:
                found.append(gone(key))
            elif allowed:
                found.append(f"{key}: no longer forbids {', '.join(allowed)}")
        elif key in ("max_turns", "max_budget_usd") and old is not None:  # limits
            if new is None:
                found.append(gone(key))
            elif new > old:
                found.append(f"{key}: {old} → {new}")
        elif key == "permission_mode":
            if _PERMISSION_REACH[new] > _PERMISSION_REACH[old]:
                found.append(f"{key}: {old or 'none'} → {new or 'none (permissions skipped)'}")
        elif key in ("mcp_config", "env") and new is not None:
            found.append(f"{key}: {'changed' if old is not None else 'added'}")
    return found


#: A JSON escape of NUL (after an even number of backslashes, so not an escaped backslash).
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
#: One encoder for every payload (json.dumps with options would build one a call).
_PAYLOAD_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False)


#: How deeply a payload may nest arrays and objects (deeper ones are refused at enqueue, so
#: that nothing that reads a job later can be sent into a recursion without end).
MAX_PAYLOAD_DEPTH = 64


def _too_deep(value: Any, limit: int = MAX_PAYLOAD_DEPTH) -> bool:
    """Whether ``value`` nests arrays and objects more than ``limit`` levels deep (a value that
    holds itself is endlessly deep)."""
    stack = [(value, 0)]
    while stack:
        each, depth = stack.pop()
        if isinstance(each, dict | list):
            if depth >= limit:
                return True
            children = each.values() if isinstance(each, dict) else each
            stack.extend((child, depth + 1) for child in children)
    return False


def _payload_json(payload: dict[str, Any]) -> str:
    """The payload as JSON text jsonb accepts: no NaN, no NUL character, valid Unicode, not
    nested too deeply."""
    if _too_deep(payload):
        raise InvalidJob(f"the payload nests more than {MAX_PAYLOAD_DEPTH} levels deep")
    try:
        text = _PAYLOAD_ENCODER.encode(payload)
    except ValueError:
        raise InvalidJob("the payload holds NaN or Infinity, which JSON does not allow") from None
    except TypeError as error:
        raise InvalidJob(f"the payload is not JSON: {error}") from None
    if "\\u0000" in text and _NUL_ESCAPE.search(text):
        raise InvalidJob("the payload contains a NUL character, which PostgreSQL cannot store")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidJob("the payload contains text that is not valid Unicode") from None
    return text


###############################################################################
# Queue API: reading and explaining jobs
###############################################################################


def resolve_job_id(conn: psycopg.Connection, text: str | uuid.UUID) -> uuid.UUID:
    """The job whose id is ``text``, or starts with it (at least 6 hex digits, as git does).

    InvalidJob for what cannot be an id, or for a prefix of several; JobNotFound when no job
    matches.
    """
    if isinstance(text, uuid.UUID):
        return text
    digits = text.strip().lower().replace("-", "")
    if len(digits) == 32 and re.fullmatch(r"[0-9a-f]{32}", digits):
        return uuid.UUID(digits)
    if not re.fullmatch(r"[0-9a-f]{6,31}", digits):
        raise InvalidJob(f"{text!r} is not a job id: give an id, or its first 6 or more digits")
    found = _by_prefix(conn, JOBS_IN_RANGE, text)
    if found is None:
        raise JobNotFound(f"no job {text.strip()}")
    return found


def _by_prefix(conn: psycopg.Connection, query: str, text: str) -> uuid.UUID | None:
    """The one id that begins with the hex digits of ``text`` (``query``: the ids in a range,
    at most 6), None if none does; InvalidJob naming them if several do."""
    digits = text.strip().lower().replace("-", "")
    bounds = {"low": digits.ljust(32, "0"), "high": digits.ljust(32, "f")}
    ids = [row[0] for row in conn.execute(query, bounds).fetchall()]
    if len(ids) > 1:
        shown = ", ".join(str(each) for each in ids[:5]) + (", ..." if len(ids) > 5 else "")
        raise InvalidJob(f"{text.strip()} is ambiguous: it begins {shown}")
    return ids[0] if ids else None


def get_job(conn: psycopg.Connection, job_id: uuid.UUID | str, *, transcript: bool = True) -> Job:
    """One job (by id or unique prefix), with its transcript unless not asked for (it may
    be a megabyte); JobNotFound when there is none."""
    key = resolve_job_id(conn, job_id)
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(GET_JOB if transcript else GET_JOB_STATE, {"id": key}).fetchone()
    if row is None:
        raise JobNotFound(f"no job {key}")
    return Job.from_row(row)


def job_statuses(
    conn: psycopg.Connection, ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, tuple[str, str | None]]:
    """The status of each of these jobs that exists, and the host that keeps its claude
    session (what a job waiting for them waits for)."""
    if not ids:
        return {}
    rows = conn.execute(JOB_STATUSES, {"ids": list(ids)}).fetchall()
    return {job_id: (status, host) for job_id, status, host in rows}


def list_jobs(
    conn: psycopg.Connection,
    *,
    statuses: Sequence[str] | None = None,
    queue: str | None = None,
    kind: str | None = None,
    since: datetime | None = None,
    text: str | None = None,
    cwd: str | None = None,
    batch: uuid.UUID | None = None,
    pr: str | None = None,
    before: Job | tuple[datetime, int, uuid.UUID] | None = None,
    limit: int = 50,
    after: Job | tuple[datetime, int, uuid.UUID] | None = None,
    tag: str | None = None,
) -> list[Job]:
    """Jobs newest first, in enqueue order (without their transcripts), filtered by each
    given argument: ``text`` found in the prompt (any case), ``cwd`` the prompt's directory,
    ``batch`` the batch's id, ``pr`` the state of its pull request (open, merged, closed)
    when last looked at, ``tag`` one of its tags; ``before``: the page after the one that
    ended with this job (or its (created_at, seq, id)); ``after``: the page before the one
    that began with it."""
    query = LIST_NEWER_JOBS if after is not None else LIST_JOBS
    before = after if after is not None else before
    if isinstance(before, Job):
        before = (before.created_at, before.seq, before.id)
    params = {
        "statuses": list(statuses) if statuses else None,
        "queue": queue,
        "kind": kind,
        "since": since,
        "text": text,
        "cwd": cwd,
        "batch": batch,
        "pr": pr,
        "tag": tag,
        "before_at": before and before[0],
        "before_seq": before and before[1],
        "before_id": before and before[2],
        "limit": limit,
    }
    with conn.cursor(row_factory=dict_row) as cur:
        jobs = [Job.from_row(row) for row in cur.execute(query, params).fetchall()]
    return jobs[::-1] if after is not None else jobs


def resolve_batch(conn: psycopg.Connection, text: str | uuid.UUID) -> uuid.UUID:
    """The batch named ``text`` (the open one, else the newest of that name), or whose id is
    or begins with it (6 hex digits or more); NotFound, or InvalidJob for an ambiguous
    prefix."""
    if isinstance(text, uuid.UUID):
        return text
    if row := conn.execute(BATCH_BY_NAME, {"name": text}).fetchone():
        return row[0]
    digits = text.strip().lower().replace("-", "")
    if re.fullmatch(r"[0-9a-f]{6,32}", digits) and (
        found := _by_prefix(conn, BATCHES_IN_RANGE, text)
    ):
        return found
    raise NotFound(f"no batch {text!r}")


def get_batch(conn: psycopg.Connection, batch: str | uuid.UUID) -> Batch:
    """A batch (by name or id: see resolve_batch) and its progress."""
    key = resolve_batch(conn, batch)
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(GET_BATCH, {"id": key}).fetchone()
    if row is None:
        raise NotFound(f"no batch {batch!r}")
    return Batch.from_row(row)


def list_batches(
    conn: psycopg.Connection, *, only_open: bool = False, limit: int = 50
) -> list[Batch]:
    """The newest batches (``only_open``: those not finished), each with its progress."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(LIST_BATCHES, {"open": only_open, "limit": limit}).fetchall()
    return [Batch.from_row(row) for row in rows]


def batch_results(conn: psycopg.Connection, batch: uuid.UUID) -> list[dict[str, Any]]:
    """What each job of a batch came to, in the order they were queued: id, status, prompt
    (a claude job's), result (a claude job's answer, or the handler's result), cost_usd and
    error (the last one)."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(BATCH_RESULTS, {"id": batch}).fetchall()


def paused_queues(conn: psycopg.Connection) -> set[str]:
    """The queues that workers do not claim from."""
    return {row[0] for row in conn.execute(PAUSED_QUEUES).fetchall()}


def queue_stats(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Per queue: jobs by status, the oldest ready job's age, the last hour's outcomes, the
    median and p95 run time of the last day, the cost of its claude jobs, and its settings
    (paused, max_running, rate as N/PERIOD, rate_by)."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(QUEUE_STATS).fetchall()
    for row in rows:  # (the rate as people write it)
        row["rate"] = _rate_text(row)
        del row["rate_seconds"]
    return rows


def job_counts(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Per queue and status (kept counts, as cheap at a million jobs as at ten): ``jobs``
    there are now, ``entered``: jobs that ever entered the status (cleanup does not lower it),
    ``cost_usd`` of the jobs there are, ``run_seconds``: the run times of the jobs that
    ended there after running."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(JOB_COUNTS).fetchall()


def run_times(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Per queue and status (succeeded or failed), how many runs took at most ``le``
    seconds, for each bound of the histogram (the last one: infinity)."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(RUN_TIMES).fetchall()


def tag_counts(conn: psycopg.Connection, tag: str) -> list[dict[str, Any]]:
    """The jobs with ``tag`` (still in the table), by queue and status: jobs, cost_usd."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(TAG_COUNTS, {"tag": tag}).fetchall()


def timeline(conn: psycopg.Connection, hours: int = 6) -> dict[str, Any]:
    """The jobs that succeeded and failed in the last ``hours``, per minute (per hour beyond a
    day): ``step``, ``since`` and ``points`` (at, succeeded, failed; only where some ended).
    Jobs deleted by cleanup are not counted."""
    step = "minute" if hours <= 24 else "hour"
    since = (datetime.now(UTC) - timedelta(hours=hours)).replace(second=0, microsecond=0)
    if step == "hour":
        since = since.replace(minute=0)
    with conn.cursor(row_factory=dict_row) as cur:
        points = cur.execute(TIMELINE, {"step": step, "since": since}).fetchall()
    return {"step": step, "since": since, "points": points}


def cost_stats(conn: psycopg.Connection, days: int = 7) -> list[dict[str, Any]]:
    """What claude spent in the last ``days`` UTC days (today included), by the ledger that
    outlives the jobs, per day, queue and model, newest day first: day, queue, model ("" where
    claude did not say), runs, cost_usd, input_tokens, output_tokens, cache_read_tokens,
    cache_write_tokens."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(COST_STATS, {"days": days}).fetchall()


def list_holds(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """The kinds no worker starts now (a usage limit of claude): kind, until, reason."""
    with conn.cursor(row_factory=dict_row) as cur:
        return [
            {k: row[k] for k in ("kind", "until", "reason")}
            for row in cur.execute(HOLDS).fetchall()
        ]


def list_workers(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Registered workers: host, pid, queues, jobs running now, started, last heartbeat,
    ``lost`` (its session is gone, or no heartbeat within the lock grace period: dead, or cut
    off), ``draining_since`` (asked to drain), ``trouble`` (what is wrong with its parts: a
    thread died, or keeps failing), ``state`` (lost, failing, draining or alive), and until
    when and why it starts no claude job (claude_paused_until, claude_paused_reason). Then
    the workers found dead in the last LOST_WORKERS_KEPT seconds, lost, with ``lost_at``,
    ``lost_because`` and how many of their running jobs went back (``recovered``)."""
    with conn.cursor(row_factory=dict_row) as cur:
        workers = cur.execute(LIST_WORKERS).fetchall()
    for worker in workers:
        worker["lost"] = worker.pop("unlocked") or worker["silent_seconds"] > LOCK_GRACE
        worker["state"] = (
            "lost" if worker["lost"] else "failing" if worker["trouble"]
            else "draining" if worker["draining_since"] else "alive"
        )  # fmt: skip
        reason = worker.get("claude_paused_reason") or ""
        worker["unfit"] = bool(worker.get("claude_paused_until")) and not reason.startswith(
            BUDGET_NOTE
        )  # (it cannot run claude; not a spent budget)
    return workers


def queue_known(conn: psycopg.Connection, queue: str) -> bool:
    """Whether any job (or what claude spent) ever used ``queue``: a name that none did is
    likely a typo."""
    return bool(_the_row(conn.execute(QUEUE_KNOWN, {"queue": queue}))[0])


def known_queues(conn: psycopg.Connection) -> list[str]:
    """The queues that jobs, or the ledger of what claude spent, name."""
    return [row[0] for row in conn.execute(KNOWN_QUEUES).fetchall()]


def count_queued(conn: psycopg.Connection, queue: str) -> int:
    """How many jobs wait in ``queue``."""
    return _the_row(conn.execute(COUNT_QUEUED, {"queue": queue}))[0]


@dataclass(frozen=True)
class Waiting:
    """Why a job does not run now, or ended as it did: ``text`` says it in a sentence (for
    `show`, `logs -f`, `--wait`), ``short`` in a few words for a column of `list` (empty when
    there is nothing to mark there)."""

    short: str
    text: str

    @property
    def gist(self) -> str:
        """The reason without its relative times ("in 3m", "12s ago"), which change by the
        second: what tells that the reason itself changed."""
        return re.sub(r" \((?:in [^()]*|[^()]* ago)\)", "", self.text)


@dataclass(frozen=True)
class _Circumstances:
    """What decides whether jobs can run now and how they read, read once for many jobs (see
    _circumstances): the facts that `list`, `show`, `logs -f` and the API show jobs by."""

    now: datetime
    paused: frozenset[str]  # queues
    holds: Mapping[str, Mapping[str, Any]]  # kind: until, reason
    workers: Sequence[Mapping[str, Any]]  # the live ones, as list_workers gives them
    awaited: Mapping[uuid.UUID, tuple[str, str | None]]  # job: status, host of its session
    holders: Mapping[str, Sequence[uuid.UUID]]  # concurrency key: running jobs holding it
    limits: Mapping[uuid.UUID, Mapping[str, Any]]  # queued job: its queue's limits (JOB_LIMITS)


def _circumstances(conn: psycopg.Connection, jobs: Sequence[Job]) -> _Circumstances:
    """What is to be known of the queue to show and explain these jobs, read once: what
    holds back the unfinished ones, and the jobs each of them waits for or continues."""
    open_jobs = [job for job in jobs if job.status in (JobStatus.QUEUED, JobStatus.RUNNING)]
    keys = sorted({job.concurrency_key for job in open_jobs if job.concurrency_key})
    holders: dict[str, list[uuid.UUID]] = {}
    if keys:
        holders = dict(conn.execute(KEY_HOLDERS, {"keys": keys}).fetchall())
    limits: dict[uuid.UUID, dict[str, Any]] = {}
    if queued := [job.id for job in open_jobs if job.status == JobStatus.QUEUED]:
        with conn.cursor(row_factory=dict_row) as cur:
            limits = {row["id"]: row for row in cur.execute(JOB_LIMITS, {"ids": queued})}
    return _Circumstances(
        now=datetime.now(UTC),
        paused=frozenset(paused_queues(conn)) if jobs else frozenset(),
        holds={hold["kind"]: hold for hold in list_holds(conn)} if open_jobs else {},
        workers=[w for w in list_workers(conn) if not w["lost"]] if open_jobs else [],
        awaited=job_statuses(conn, [each for job in jobs for each in job.awaits]),
        holders=holders,
        limits=limits,
    )


def explain_jobs(conn: psycopg.Connection, jobs: Sequence[Job]) -> dict[uuid.UUID, Waiting]:
    """Why each of these jobs waits (queued), or is stuck (running on a lost worker), or ended
    as it did (failed, cancelled); jobs with nothing to explain are left out."""
    return _explained(jobs, _circumstances(conn, jobs))


def _explained(jobs: Sequence[Job], seen: _Circumstances) -> dict[uuid.UUID, Waiting]:
    """explain_jobs, from what was ``seen`` of the queue."""
    reasons = {job.id: _waiting(job, seen) for job in jobs}
    return {job_id: reason for job_id, reason in reasons.items() if reason is not None}


def _status_of(job: Job, paused: Collection[str]) -> str:
    """A job's status as it reads: "paused" for a queued job of a paused queue."""
    return "paused" if job.status == JobStatus.QUEUED and job.queue in paused else job.status


def _worker_lost(job: Job, seen: _Circumstances) -> bool:
    """Whether a running job's worker is lost (it waits for a live worker to put it back)."""
    return job.status == JobStatus.RUNNING and not any(
        worker["id"] == job.worker_id for worker in seen.workers
    )


def _waiting(job: Job, seen: _Circumstances) -> Waiting | None:
    """Why ``job`` waits, or ended as it did, from what was ``seen`` of the queue; None when
    there is nothing to say (it runs, or succeeded). The first reason that holds, in the order
    a worker would meet them."""
    if job.status == JobStatus.SUCCEEDED:
        return None
    if job.status == JobStatus.CANCELLED:
        return Waiting("", job.last_error or "cancelled")
    if job.status == JobStatus.FAILED:
        permanent = bool(job.errors) and bool(job.errors[-1].get("permanent"))
        how = "its error is one no retry can fix" if permanent else "its attempts are spent"
        return Waiting("", f"it failed for good: {how} ({job.attempts} of {job.max_attempts})")
    if job.status == JobStatus.RUNNING:
        if _worker_lost(job, seen):
            then = "within seconds" if seen.workers else "when a worker starts"
            return Waiting(
                "worker lost",
                f"its worker {job.worker} is lost: a live worker puts the job back {then}",
            )
        return None
    if _status_of(job, seen.paused) == "paused":
        return Waiting("paused", f"queue {job.queue} is paused: `claude-jobs resume {job.queue}`")
    if job.run_at > seen.now:
        return _waiting_for_time(job, seen.now)
    return _waiting_for_others(job, seen) or _waiting_for_a_worker(job, seen)


def _waiting_for_time(job: Job, now: datetime) -> Waiting:
    """A queued job whose run_at is still to come: after a failed attempt, a limit, or as
    enqueued."""
    when, soon = f"{job.run_at.astimezone():%Y-%m-%d %H:%M:%S %Z}", _ago(job.run_at, now)
    error = job.last_error
    if error and error.startswith(USAGE_LIMIT_NOTE):
        return Waiting(f"limit, {soon}", f"{error}; it runs again at {when} ({soon})")
    if error and job.attempts and job.errors and job.errors[-1].get("error") == error:
        failed = f"attempt {job.attempts} of {job.max_attempts} failed ({error})"
        return Waiting(f"retry {soon}", f"{failed}; it runs again at {when} ({soon})")
    if error:
        return Waiting(f"due {soon}", f"{error}; it runs again at {when} ({soon})")
    return Waiting(f"due {soon}", f"it is due at {when} ({soon})")


def _waiting_for_others(job: Job, seen: _Circumstances) -> Waiting | None:
    """What a ready job waits for that other jobs hold: jobs it waits for, the job it
    continues (and the host of its session), its queue's limits, a hold on its kind, its
    concurrency key."""
    blocking = [
        (each, seen.awaited.get(each, ("gone", None))[0])
        for each in job.after or ()
        if seen.awaited.get(each, ("gone", None))[0] != JobStatus.SUCCEEDED
    ]
    if blocking:
        jobs = ", ".join(f"{each} ({status})" for each, status in blocking)
        short = "after " + ",".join(str(each)[:8] for each, _ in blocking)
        return Waiting(short, f"it waits for job{'s' * (len(blocking) > 1)} {jobs} to succeed")
    if job.continue_from is not None:
        status, host = seen.awaited.get(job.continue_from, ("gone", None))
        if status not in FINISHED_STATUSES:
            short = f"continues {str(job.continue_from)[:8]}"
            return Waiting(short, f"it waits for job {job.continue_from} ({status}) to finish")
        if host and not [w for w in _takers(job, seen) if w["host"] == host]:
            return Waiting(
                f"on {host}",
                f"it runs only on {host}, where the claude session of job {job.continue_from} "
                "is kept, and no live worker there takes it",
            )
    limits = seen.limits.get(job.id)
    if limits is not None and limits["running"] >= (limits["max_running"] or math.inf):
        return Waiting(
            "queue full",
            f"queue {job.queue} runs its most: {limits['running']} of --max-running "
            f"{limits['max_running']} (`claude-jobs queue show {job.queue}`)",
        )
    if limits is not None and limits["opens"] is not None:
        until = f"{limits['opens'].astimezone():%H:%M:%S}"
        per = f" per {limits['rate_by']}" if limits["rate_by"] else ""
        return Waiting(
            f"rate limited until {until}",
            f"rate limited until {until} ({_ago(limits['opens'], seen.now)}): queue "
            f"{job.queue} starts at most {_rate_text(limits)}{per}",
        )
    hold = seen.holds.get(job.kind)
    if hold is not None:
        until = _hold_end(job.kind, hold["until"], seen.now)
        return Waiting("held", f"no worker starts {job.kind} jobs until {until}: {hold['reason']}")
    held_by = seen.holders.get(job.concurrency_key or "", ())
    if job.concurrency_key and len(held_by) >= job.concurrency_limit:
        jobs = ", ".join(map(str, held_by))
        return Waiting(
            "key busy",
            f"it waits for its concurrency key {job.concurrency_key}, held by "
            f"job{'s' * (len(held_by) > 1)} {jobs}",
        )
    return None


def _takers(job: Job, seen: _Circumstances) -> list[Mapping[str, Any]]:
    """The live workers that take jobs of this kind from this queue."""
    return [
        worker
        for worker in seen.workers
        if job.kind in worker["kinds"]
        and ("*" in worker["queues"] or job.queue in worker["queues"])
    ]


def _waiting_for_a_worker(job: Job, seen: _Circumstances) -> Waiting:
    """A job nothing else holds back: it waits for a worker, if one takes it and can run it."""
    takers = _takers(job, seen)
    if not takers:  # (not marked in `list`: every queued job would be, until one starts)
        return Waiting(
            "",
            f"no live worker takes {job.kind} jobs of queue {job.queue}: start one "
            "(`claude-jobs worker`)",
        )
    unfit = [w for w in takers if job.kind == DEFAULT_KIND and w["claude_paused_until"]]
    if len(unfit) == len(takers):
        said = "; ".join(
            f"{w['host']}:{w['pid']} starts none until "
            f"{w['claude_paused_until'].astimezone():%H:%M}: {w['claude_paused_reason']}"
            for w in unfit
        )
        return Waiting("no fit worker", f"no live worker can run {job.kind} jobs now: {said}")
    return Waiting("", "ready: it waits for a free worker")


@dataclass(frozen=True)
class FollowUpdate:
    """What changed in a followed job: its state, and the transcript text it gained."""

    status: JobStatus
    attempts: int
    max_attempts: int
    last_error: str | None
    run_at: datetime
    worker: str | None
    queue: str
    text: str  # new transcript text
    skipped: int  # characters of transcript that went past unseen (the kept tail is bounded)
    worker_lost: bool = False  # running, but its worker is gone: it waits for recovery
    paused: bool = False  # its queue is paused
    why: str | None = None  # why it waits, or ended as it did (see explain_jobs)
    gist: str | None = None  # that reason, without what changes by the second

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    @property
    def state(self) -> tuple[Any, ...]:
        """What a follower is told of when it changes (not the transcript)."""
        return (self.status, self.attempts, self.run_at, self.worker, self.worker_lost,
                self.paused, self.gist)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """The state as JSON-able values (not the transcript text)."""
        return _fields_of(self, skip={"text", "skipped", "gist"})


def follow_job(
    conn: psycopg.Connection, job_id: uuid.UUID | str, *, since: int = 0, poll: float = 5.0
) -> Iterator[FollowUpdate]:
    """Follow a job until it finishes: an update when its transcript grows (the worker's
    NOTIFY wakes us) or its state or why it waits changes (looked at every ``poll`` seconds,
    at least every 2 while it is queued); the last one is the finished job. ``since``:
    transcript characters already seen. ``conn`` must be in autocommit mode (notifications
    arrive between transactions)."""
    key = resolve_job_id(conn, job_id)
    _db_listen(conn, OUTPUT_CHANNEL)
    seen, last_state = since, None
    while True:
        update = job_update(conn, key, seen)
        seen += len(update.text) + update.skipped
        if update.text or update.skipped or update.state != last_state:
            yield update
        if update.finished:
            return
        last_state = update.state
        wait = min(poll, 2.0) if update.status == JobStatus.QUEUED else poll
        for notice in conn.notifies(timeout=wait):
            if notice.payload == str(key):
                break


def job_update(conn: psycopg.Connection, job_id: uuid.UUID, seen: int = 0) -> FollowUpdate:
    """A job's state now, why it waits, and the transcript text it gained after the first
    ``seen`` characters (what went past the kept tail unseen: ``skipped``)."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(FOLLOW_JOB, {"id": job_id, "seen": seen}).fetchone()
    if row is None:
        raise JobNotFound(f"job {job_id} was deleted")
    job, text = Job.from_row(row), row["new"] or ""
    circumstances = _circumstances(conn, [job])
    reason = _explained([job], circumstances).get(job_id)
    return FollowUpdate(
        status=job.status, attempts=job.attempts, max_attempts=job.max_attempts,
        last_error=job.last_error, run_at=job.run_at, worker=job.worker, queue=job.queue,
        text=text, skipped=max(0, job.transcript_size - seen - len(text)),
        worker_lost=_worker_lost(job, circumstances),
        paused=job.queue in circumstances.paused,
        why=reason.text if reason else None, gist=reason.gist if reason else None,
    )  # fmt: skip


###############################################################################
# Queue API: enqueue, batches and unique keys
###############################################################################


@dataclass(frozen=True)
class _Chain:
    """What a new job waits for: the jobs it runs after, the claude job it continues, and
    whether any of them is not over yet (it is enqueued blocked, then)."""

    after: list[uuid.UUID] | None
    previous: Job | None
    waits: bool


def _chain(conn: psycopg.Connection, options: JobOptions) -> _Chain:
    """The jobs this one waits for (they must exist, and not have failed or been cancelled)
    and the claude job it continues."""
    try:
        after = [resolve_job_id(conn, job_id) for job_id in options.after] or None
    except JobNotFound as error:
        raise JobNotFound(f"cannot wait for it: {error}") from None
    found = job_statuses(conn, after or [])
    for job_id in after or ():
        if job_id not in found:
            raise JobNotFound(f"cannot wait for it: no job {job_id}")
        status = found[job_id][0]
        if status in (JobStatus.FAILED, JobStatus.CANCELLED):
            raise InvalidJob(f"cannot wait for job {job_id}: it is {status}")
    previous = get_job(conn, options.continue_from) if options.continue_from else None
    if previous is not None and previous.kind != DEFAULT_KIND:
        raise InvalidJob(f"job {previous.id} is not a claude job: there is no session to continue")
    waits = any(found[job_id][0] != JobStatus.SUCCEEDED for job_id in after or ()) or (
        previous is not None and previous.status in (JobStatus.QUEUED, JobStatus.RUNNING)
    )
    return _Chain(after, previous, waits)


def _blocked(
    conn: psycopg.Connection, options: JobOptions, keys: Sequence[str | None], waits: bool
) -> list[str | None]:
    """How each of these new jobs (of these concurrency keys, in enqueue order) is marked:
    "jobs" (all of them) when they wait for jobs not over yet; else "key" for those that find
    every slot of their key taken (by jobs running, and those queued ahead of them), None for
    the rest. (A mark only keeps a job out of the claim's way: see UNBLOCK.)"""
    if waits:
        return ["jobs"] * len(keys)
    limit = options.concurrency_limit
    distinct = {key for key in keys if key is not None}
    if not distinct:
        return [None] * len(keys)
    taken = _db_key_taken(conn, distinct, options.priority, options.run_at, limit)
    marks: list[str | None] = []
    for key in keys:
        marks.append(None if key is None or taken[key] < limit else "key")
        if key is not None:
            taken[key] += 1
    return marks


_MadeT = TypeVar("_MadeT", bound="Job | Enqueued")


def _into_batch(
    conn: psycopg.Connection, options: JobOptions, insert: Callable[[uuid.UUID | None], _MadeT]
) -> _MadeT:
    """``insert(batch)`` the jobs of ``options`` into its batch: the open one of its name, or a
    new one; its callbacks set to those of ``options`` (checked: see _with_checked_callbacks).

    The jobs go in first and the batch's row is locked after, until the end of the
    transaction (FOR SHARE: enqueuers to a batch do not wait for each other, but for one that
    changes its callbacks): what ends a batch's last job waits for that lock, then sees the
    new jobs, and the batch stays open. In that order an enqueue never holds the batch while
    it waits for a job's row (a unique key's holder being ended), which the ender, holding
    that row, would wait for in turn. (A caller's transaction that goes on after an enqueue
    holds the lock meanwhile: two that both go on to end jobs of the batch can deadlock, and
    PostgreSQL then undoes one.) If the batch finished meanwhile, the jobs go again, into a
    new one. If all were duplicates (their unique keys taken), no batch is opened or
    changed."""
    if options.batch is None:
        return insert(None)
    params = {
        "id": uuid.uuid4(),
        "name": options.batch,
        "on_finish": _callback_spec(options, options.on_finish),
        "on_success": _callback_spec(options, options.on_success),
        "notify": _batch_notify(options),
    }
    callbacks = any(params[name] is not None for name in ("on_finish", "on_success", "notify"))
    while True:
        with _savepoint(conn) as savepoint:
            batch = _open_batch(conn, params)
            made = insert(batch)
            new = not made.duplicate if isinstance(made, Job) else len(made.duplicates) < len(made)
            if new:
                held = {**params, "id": batch}
                changed = callbacks and conn.execute(CHANGE_BATCH_CALLBACKS, held).fetchone()
                if changed or conn.execute(HOLD_BATCH, held).fetchone() is not None:
                    return made
            # (all duplicates: undone, no batch touched; else the batch finished meanwhile:
            # undone, and again, into a new one)
            raise psycopg.Rollback(savepoint)
        if not new:
            return made


def _open_batch(conn: psycopg.Connection, params: dict[str, Any]) -> uuid.UUID:
    """The id of the open batch of a name, opened if none is (OPEN_BATCH's ``params``)."""
    while True:  # (one of that name opened or finished between the two: look again)
        if (row := conn.execute(FIND_BATCH, params).fetchone()) is not None:
            return row[0]
        if (row := conn.execute(OPEN_BATCH, params).fetchone()) is not None:
            return row[0]


def _callback_spec(options: JobOptions, payload: Mapping[str, Any] | None) -> str | None:
    """What a batch keeps of a callback (checked), to queue it when the batch ends: a job of
    the kind and options of the jobs that set it (see claude_jobs_finish_batches)."""
    if payload is None:
        return None
    prepared = _as_prepared(options.kind, payload)
    plain = dataclasses.replace(
        options, unique_key=None, unique_for=None, batch=None, on_finish=None, on_success=None
    )
    row = _row(plain, prepared)
    return json.dumps({
        "queue": options.queue, "kind": options.kind, "priority": options.priority,
        "payload": prepared.payload, "max_attempts": options.max_attempts,
        "timeout": row["timeout"], "concurrency_key": row["concurrency_key"],
        "concurrency_limit": options.concurrency_limit,
    })  # fmt: skip


def enqueue(
    conn: psycopg.Connection,
    payload: Mapping[str, Any],
    *,
    base_dir: str | Path | None = None,
    **settings: Unpack[JobSettings],
) -> Job:
    """Queue one job on ``conn`` and return it.

    ``settings``: kind (default "claude"), queue ("default"), priority (0), run_at or delay
    (seconds or a timedelta), max_attempts (5), timeout (the handler's default),
    concurrency_key and concurrency_limit (1; 0: none), after (job ids), continue_from (a
    claude job id: the continuation runs in its directory, with every option of that job
    that its own payload does not replace, or drop with a null; what that widens is kept in
    ``widens``). A relative cwd in a claude payload is resolved against ``base_dir``
    (default: the current directory).

    With ``unique_key`` (and ``unique_for``, seconds or a timedelta), no job is made while a
    job of that key is queued or running (or was enqueued within ``unique_for``): the one
    returned is that job, with ``duplicate`` set.

    The insert and the NOTIFY that wakes idle workers are one statement, run in the caller's
    transaction: the job exists once the caller commits and vanishes if it rolls back.
    """
    request = _job_request(payload, base_dir, _checked_options(settings, base_dir))
    return _enqueue_checked(conn, request)


@dataclass(frozen=True)
class _JobRequest:
    """A job to enqueue, checked as far as it can be without the database: its options (its
    batch's callbacks checked) and its payload as stored; a continuation's payload is checked
    with the options of the job it continues, once that job is read (``prepared`` None)."""

    options: JobOptions
    payload: Mapping[str, Any]  # as given
    base_dir: str | Path | None
    prepared: _Prepared | None


def _checked_options(settings: Mapping[str, Any], base_dir: str | Path | None) -> JobOptions:
    """The options of enqueue's keywords, its batch's callbacks checked (see JobOptions.build
    and _with_checked_callbacks)."""
    return _with_checked_callbacks(JobOptions.build(**settings), base_dir)


def _job_request(
    payload: Mapping[str, Any], base_dir: str | Path | None, options: JobOptions
) -> _JobRequest:
    """A job checked once, before the database is needed (the command line checks what it
    is given before it connects, and hands this over): see _JobRequest."""
    continuation = options.continue_from is not None
    prepared = None if continuation else _prepare(options.kind, payload, base_dir)
    return _JobRequest(options, payload, base_dir, prepared)


def _enqueue_checked(conn: psycopg.Connection, request: _JobRequest) -> Job:
    """Queue one job checked by _job_request (see enqueue)."""
    options, prepared, widens = request.options, request.prepared, None
    chain = _chain(conn, options)
    previous = chain.previous
    if previous is not None and previous.worktree and "path" in previous.worktree:
        _db_lock_worktree(conn, str(previous.worktree["path"]))  # (not discarded meanwhile)
    if previous is not None:
        payload = request.payload
        prepared = _prepare(options.kind, _continuing(payload, previous), request.base_dir)
        dropped = {key for key, value in payload.items() if value is None}
        options, widens = _as_continuation(options, prepared, previous, dropped)
    assert prepared is not None  # (a job that continues none was prepared by _job_request)
    return _enqueue_prepared(conn, options, prepared, chain, widens)


def _enqueue_prepared(
    conn: psycopg.Connection,
    options: JobOptions,
    prepared: _Prepared,
    chain: _Chain,
    widens: list[str] | None = None,
    origin: tuple[str, datetime] | None = None,
) -> Job:
    """Queue one checked job (see enqueue); ``origin``: the schedule and due time it is a
    run of."""
    row = _row(options, prepared, chain.previous)
    blocked = _blocked(conn, options, [row["concurrency_key"]], chain.waits)[0]

    def insert(batch: uuid.UUID | None) -> Job:
        params = _enqueue_params(options, row, chain, blocked, widens, origin, batch)
        return _insert_job(conn, params)

    return _into_batch(conn, options, insert)


def _notify_json(options: JobOptions, previous: Job | None = None) -> str | None:
    """A job's ``notify`` column: whom it tells of what (None: nobody; a continuation that
    names none tells whom the job it continues told). A job of a batch tells only what needs
    attention, unless --notify-on names more: its batch tells of its end (_batch_notify)."""
    if not options.notify:
        return json.dumps(previous.notify) if previous and previous.notify else None
    on = _notify_events(options.notify_on, _JOB_EVENTS)
    if options.batch is not None and not on:
        if options.notify_on:  # (batch.finished alone)
            return None
        on = ["job.needs_attention"]
    return json.dumps({"urls": list(options.notify), "on": on})


def _batch_notify(options: JobOptions) -> str | None:
    """A batch's ``notify`` column (see _notify_json): whom its end is told."""
    if not options.notify or options.batch is None:
        return None
    told = _notify_events(options.notify_on, NOTIFY_EVENTS)
    if options.notify_on and "batch.finished" not in told:
        return None
    return json.dumps({"urls": list(options.notify), "on": []})


def _enqueue_params(
    options: JobOptions,
    row: dict[str, Any],
    chain: _Chain,
    blocked: str | None,
    widens: list[str] | None = None,
    origin: tuple[str, datetime] | None = None,
    batch: uuid.UUID | None = None,
) -> dict[str, Any]:
    """ENQUEUE's parameters for one job."""
    schedule, due = origin or (None, None)
    return {
        **dataclasses.asdict(options),
        **row,
        "after": chain.after,
        "continue_from": chain.previous.id if chain.previous else None,
        "widens": widens or None,
        "blocked": blocked,
        "channel": NOTIFY_CHANNEL,
        "schedule": schedule,
        "scheduled_for": due,
        "batch_id": batch,
        "notify": _notify_json(options, chain.previous),
    }


class _KeyTaken(Exception):
    """The unique key of a job being inserted is held by this job (the insert is undone)."""

    def __init__(self, holder: Job) -> None:
        self.holder = holder


def _insert_job(conn: psycopg.Connection, params: dict[str, Any]) -> Job:
    """Insert one job (ENQUEUE's ``params``, the id drawn here), unless a job holds its unique
    key: then that job, marked ``duplicate``. The index on unfinished keys decides, and the
    key's window: an enqueue with a window of its own opens it (its row, locked by whoever
    opens it, decides), one without keeps out of an open one. A holder that ends while we
    look makes us try again."""
    key, seconds = params["unique_key"], params["unique_for"]
    while True:
        params["id"] = uuid.uuid4()
        try:
            with _savepoint(conn), conn.cursor(row_factory=dict_row) as cur:
                if key is not None and seconds is not None:
                    _take_unique_window(cur, key, seconds, params["id"])
                elif key is not None:
                    row = cur.execute(OPEN_UNIQUE_WINDOW_JOB, {"key": key}).fetchone()
                    if row is not None:
                        raise _KeyTaken(Job.from_row({**row, "duplicate": True}))
                row = cur.execute(ENQUEUE, params).fetchone()
                if row is not None:
                    return Job.from_row(row)
                assert key is not None  # (only a unique key makes ENQUEUE insert nothing)
                holder = cur.execute(UNIQUE_HOLDER, {"key": key}).fetchone()
                if holder is not None:
                    raise _KeyTaken(Job.from_row({**holder, "duplicate": True}))
        except _KeyTaken as taken:  # (the transaction above is undone: the window too)
            return taken.holder


def _take_unique_window(cur: psycopg.Cursor[Any], key: str, seconds: float, job: uuid.UUID) -> None:
    """Open the window of ``key`` for the new job ``job``, or raise _KeyTaken with the job
    whose window is open. A window whose job is gone (cleaned up) is handed over."""
    params = {"key": key, "seconds": seconds, "id": job}
    if cur.execute(TAKE_UNIQUE_WINDOW, params).fetchone() is not None:
        return
    row = cur.execute(UNIQUE_WINDOW_HOLDER, params).fetchone()
    assert row is not None  # (the row is locked by TAKE_UNIQUE_WINDOW: it stays)
    if row["id"] is None:
        cur.execute(HAND_OVER_UNIQUE_WINDOW, params)
        return
    raise _KeyTaken(Job.from_row({**row, "duplicate": True}))


class Enqueued(list[uuid.UUID]):
    """The ids of the jobs enqueue_many queued, in the order of their payloads; where a
    payload's unique key was taken, the id of the job that holds it, and its position
    (0-based) in ``duplicates``."""

    def __init__(self, ids: Iterable[uuid.UUID] = (), duplicates: Iterable[int] = ()) -> None:
        super().__init__(ids)
        self.duplicates: list[int] = list(duplicates)


def enqueue_many(
    conn: psycopg.Connection,
    payloads: Iterable[Mapping[str, Any]],
    *,
    base_dir: str | Path | None = None,
    unique_keys: Sequence[str | None] | None = None,
    **settings: Unpack[JobSettings],
) -> Enqueued:
    """Queue many jobs with the same settings (those of enqueue, but continue_from), all or
    nothing; returns their ids in order.

    Every payload is checked before anything is written; a bad one raises InvalidJob naming
    its position (1-based). The rows go in with one COPY, followed by one NOTIFY, in the
    caller's transaction (or one of their own on an autocommit connection). Jobs with unique
    keys (``unique_keys``: one per payload, or None; a claude payload's "unique_key") go in
    one by one, and a payload whose key is taken makes no job (see Enqueued).
    """
    options = _checked_options(settings, base_dir)
    return _enqueue_many_checked(conn, payloads, options, base_dir, unique_keys)


def _enqueue_many_checked(
    conn: psycopg.Connection,
    payloads: Iterable[Mapping[str, Any]],
    options: JobOptions,
    base_dir: str | Path | None = None,
    unique_keys: Sequence[str | None] | None = None,
) -> Enqueued:
    """enqueue_many, its options checked already (_checked_options)."""
    prepared: list[_Prepared] = []
    seen: dict[tuple[str, str | None], str | None] = {}
    for number, payload in enumerate(payloads, 1):
        try:
            prepared.append(_prepare(options.kind, payload, base_dir, seen))
        except InvalidJob as error:
            raise InvalidJob(f"job {number}: {error}", position=number, detail=str(error)) from None
    if unique_keys is not None:
        if len(unique_keys) != len(prepared):
            raise InvalidJob(f"{len(unique_keys)} unique keys for {len(prepared)} payloads")
        for each, key in zip(prepared, unique_keys, strict=True):
            if key is not None:
                each.settings["unique_key"] = key
    return _copy_jobs(conn, options, prepared)


def _copy_jobs(
    conn: psycopg.Connection, options: JobOptions, prepared: list[_Prepared]
) -> Enqueued:
    """Insert checked jobs with one COPY, then NOTIFY (or one by one: see _insert_unique)."""
    if options.continue_from is not None:
        raise InvalidJob("a continuation is one job: enqueue it alone")
    chain = _chain(conn, options)
    rows = []
    for number, each in enumerate(prepared, 1):
        try:
            rows.append(_row(options, each))
        except InvalidJob as error:
            raise InvalidJob(f"job {number}: {error}", position=number, detail=str(error)) from None
    if not prepared:
        return Enqueued()
    ids = [uuid.uuid4() for _ in prepared]
    common = (options.queue, options.kind, options.priority, options.max_attempts)
    scheduled = () if options.run_at is None else (options.run_at,)
    marks = _blocked(conn, options, [row["concurrency_key"] for row in rows], chain.waits)

    def insert(batch: uuid.UUID | None) -> Enqueued:
        if any(row["unique_key"] is not None for row in rows):
            return _insert_unique(conn, options, chain, rows, marks, batch)
        with conn.cursor() as cur:
            with cur.copy(COPY_SCHEDULED_JOBS if scheduled else COPY_JOBS) as copy:
                for job_id, row, blocked in zip(ids, rows, marks, strict=True):
                    copy.write_row(
                        (job_id, *common, row["payload"], row["timeout"], row["concurrency_key"],
                         row["concurrency_limit"], chain.after, blocked, batch,
                         _notify_json(options), row["tags"], *scheduled)
                    )  # fmt: skip
            cur.execute(
                NOTIFY_QUEUE,
                {"channel": NOTIFY_CHANNEL, "queue": options.queue, "run_at": options.run_at},
            )
        return Enqueued(ids)

    with _atomic(conn):
        return _into_batch(conn, options, insert)


def _insert_unique(
    conn: psycopg.Connection,
    options: JobOptions,
    chain: _Chain,
    rows: list[dict[str, Any]],
    marks: list[str | None],
    batch: uuid.UUID | None,
) -> Enqueued:
    """Insert jobs one by one, in order, where some have unique keys (COPY cannot skip a
    row). The keys are locked first, in one order, so that two such batches sharing keys
    cannot each wait for the other."""
    keys = sorted({row["unique_key"] for row in rows if row["unique_key"] is not None})
    conn.execute(LOCK_UNIQUE_KEYS, {"namespace": UNIQUE_LOCK_NAMESPACE, "keys": keys})
    done = Enqueued()
    for position, (row, blocked) in enumerate(zip(rows, marks, strict=True)):
        job = _insert_job(conn, _enqueue_params(options, row, chain, blocked, batch=batch))
        done.append(job.id)
        if job.duplicate:
            done.duplicates.append(position)
    return done


###############################################################################
# Queue API: operations
###############################################################################


def cancel_job(conn: psycopg.Connection, job_id: uuid.UUID | str) -> JobStatus:
    """Cancel a job. A queued one is cancelled at once (returns CANCELLED); a running one is
    stopped by the worker that runs it, told by NOTIFY (returns RUNNING: the cancel is under
    way, and the job ends cancelled, not retried). WrongState for a finished job."""
    key = resolve_job_id(conn, job_id)
    return cancel_jobs(conn, [key])[key]


def cancel_jobs(
    conn: psycopg.Connection, job_ids: Sequence[uuid.UUID | str]
) -> dict[uuid.UUID, JobStatus]:
    """Cancel these jobs, all or none (WrongState, and nothing changes, if one is finished):
    what each came to, as cancel_job says it."""
    keys = list(dict.fromkeys(resolve_job_id(conn, job_id) for job_id in job_ids))
    return _cancel(conn, keys)


def _cancel(conn: psycopg.Connection, keys: list[uuid.UUID]) -> dict[uuid.UUID, JobStatus]:
    """cancel_jobs, of these ids."""
    done: dict[uuid.UUID, JobStatus] = {}
    with _atomic(conn):
        found: dict[uuid.UUID, str] = dict(conn.execute(LOCK_JOBS, {"ids": keys}).fetchall())
        for key in keys:
            if key not in found:
                raise JobNotFound(f"no job {key}")
            if found[key] not in (JobStatus.QUEUED, JobStatus.RUNNING):
                raise WrongState(
                    f"job {key} is {found[key]}: only queued or running jobs can be cancelled"
                    + ("; nothing was cancelled" if len(keys) > 1 else "")
                )
        cancelled: dict[uuid.UUID, str] = dict(
            conn.execute(CANCEL_QUEUED, {"ids": keys}).fetchall()
        )
        for key in keys:
            if key in cancelled:
                done[key] = JobStatus.CANCELLED
            else:
                conn.execute(REQUEST_CANCEL, {"id": key, "channel": NOTIFY_CHANNEL})
                done[key] = JobStatus.RUNNING
        if cancelled:
            _db_unblock(conn, list(cancelled), list(cancelled.values()))
    return done


def retry_jobs(
    conn: psycopg.Connection,
    ids: Sequence[uuid.UUID | str] | None = None,
    *,
    status: str | None = None,
    queue: str | None = None,
) -> list[uuid.UUID]:
    """Put failed or cancelled jobs back in the queue now, with fresh attempts: these
    ``ids`` (all of them, or WrongState and nothing changes), or every job of ``status``
    (failed or cancelled) in ``queue`` (any when None). Returns the ids requeued."""
    keys = [resolve_job_id(conn, job_id) for job_id in ids] if ids is not None else None
    if keys is None and status not in (JobStatus.FAILED, JobStatus.CANCELLED):
        raise InvalidJob("retry takes failed or cancelled jobs: give --status failed or cancelled")
    params = {
        "ids": keys,
        "statuses": [status] if status else [JobStatus.FAILED, JobStatus.CANCELLED],
        "queue": queue,
        "channel": NOTIFY_CHANNEL,
    }
    with conn.transaction():  # all of these ids, or none
        again = _retry(conn, params)
        if keys is not None and len(again) < len(set(keys)):
            wrong = [get_job(conn, key) for key in keys if key not in again]
            for job in wrong:
                if job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
                    raise WrongState(_why_blocked(conn, job))
            states = ", ".join(f"{job.id} is {job.status}" for job in wrong)
            raise WrongState(f"{states}: only failed or cancelled jobs can be retried")
    return again


def _retry(conn: psycopg.Connection, params: Mapping[str, Any]) -> list[uuid.UUID]:
    """RETRY (its batches locked first), the finished batches of the retried jobs opened
    again; the ids retried. WrongState when a job took the unique key of one meanwhile."""
    conn.execute(LOCK_RETRIED_BATCHES, params)
    try:
        again = [row[0] for row in conn.execute(RETRY, params).fetchall()]
    except psycopg.errors.UniqueViolation:
        raise WrongState(
            "a job was enqueued with the unique key of one of these meanwhile: nothing was retried"
        ) from None
    _reopen_batches(conn, again)
    return again


def _reopen_batches(conn: psycopg.Connection, jobs: Sequence[uuid.UUID]) -> None:
    """Open again the finished batches these retried jobs belong to, as if they had never
    finished: their callbacks are queued again (once) when they finish again. WrongState when
    another batch of one's name is open meanwhile (only one of a name can be)."""
    try:
        with conn.transaction():
            conn.execute(REOPEN_BATCHES, {"ids": list(jobs)})
    except psycopg.errors.UniqueViolation:
        raise WrongState(
            "a job of these belongs to a batch that finished, and another batch of its name is "
            "open now: nothing was retried (retry once that one has finished)"
        ) from None


def _why_blocked(conn: psycopg.Connection, job: Job) -> str:
    """Why retry refused a failed or cancelled job: another holds its unique key, or what
    it waits for or continues."""
    if job.unique_key is not None:
        holder = conn.execute(UNIQUE_HOLDER, {"key": job.unique_key}).fetchone()
        if holder is not None:
            return f"job {holder[0]} holds {job.id}'s unique key {job.unique_key!r}"
    found = job_statuses(conn, job.awaits)
    gone = [job_id for job_id in job.awaits if job_id not in found]
    if gone:
        return f"{job.id} waits for or continues {gone[0]}, which is gone: it cannot run again"
    blocking = [
        f"{d} ({found[d][0]})" for d in job.after or () if found[d][0] != JobStatus.SUCCEEDED
    ]
    if blocking or job.unique_key is None:
        return f"{job.id} waits for {', '.join(blocking)}: retry that first (or with it)"
    return f"{job.id} has the unique key {job.unique_key!r} of a newer job retried with it"


def cancel_batch(conn: psycopg.Connection, batch: str | uuid.UUID) -> dict[uuid.UUID, JobStatus]:
    """Cancel a batch's queued and running jobs (as cancel_jobs does); what each came to. Its
    on-finish callback is queued once they have all ended, as for any other ending."""
    key = resolve_batch(conn, batch)
    with _atomic(conn):
        params = {"id": key, "statuses": [JobStatus.QUEUED, JobStatus.RUNNING]}
        ids = [row[0] for row in conn.execute(BATCH_JOBS_IN, params).fetchall()]
        return cancel_jobs(conn, ids) if ids else {}


def retry_batch(conn: psycopg.Connection, batch: str | uuid.UUID) -> list[uuid.UUID]:
    """Put a batch's failed jobs back in the queue (as retry_jobs does) and, if it had
    finished, open it again: its callbacks are queued again when it finishes again. WrongState
    when it has no failed job, or when another batch of its name is open. Of several failed
    jobs with one unique key, the newest goes back."""
    key = resolve_batch(conn, batch)
    ids = [row[0] for row in conn.execute(BATCH_FAILED_JOBS, {"id": key}).fetchall()]
    if not ids:
        raise WrongState(f"batch {batch} has no failed job")
    return retry_jobs(conn, ids)


@dataclass(frozen=True)
class Lifted:
    """What lift_hold lifted: the hold on every worker (and how many jobs that met it run
    now), and how many workers that could not run such jobs try again."""

    hold: bool
    sooner: int
    workers: int


def lift_hold(conn: psycopg.Connection, kind: str = DEFAULT_KIND) -> Lifted | None:
    """Let workers start jobs of ``kind`` again: before the end of the hold on every worker (a
    usage limit that was lifted early, or misread), the jobs that met it running now; and,
    for claude, on the workers that backed off because they could not run claude (not logged
    in, a bad key, no claude: fixed meanwhile, no restart needed). A spent daily budget stays
    spent. None when there was nothing to lift."""
    params = {
        "kind": kind, "met": USAGE_LIMIT_NOTE, "channel": NOTIFY_CHANNEL,
        "refit": kind == DEFAULT_KIND, "budget": BUDGET_NOTE,
    }  # fmt: skip
    held, sooner, refit, _ = _the_row(conn.execute(LIFT_HOLD, params))
    lifted = Lifted(bool(held), int(sooner), int(refit))
    return lifted if lifted.hold or lifted.workers else None


def run_now(conn: psycopg.Connection, job_id: uuid.UUID | str) -> uuid.UUID:
    """Make a queued job that waits for its time (delayed, or retrying after a failure) due
    now; its id. WrongState when it is not waiting for its time."""
    key = resolve_job_id(conn, job_id)
    _change_queued(conn, key, now=True)
    return key


def reschedule(conn: psycopg.Connection, job_id: uuid.UUID | str, run_at: datetime) -> datetime:
    """Make a queued job due at ``run_at`` (sooner or later); the time it is due. WrongState
    for a job that is not queued."""
    if run_at.tzinfo is None:
        raise InvalidJob("run_at needs a time zone")
    return _change_queued(conn, job_id, run_at=_checked_time(run_at))[0]


def set_priority(conn: psycopg.Connection, job_id: uuid.UUID | str, priority: int) -> int:
    """Give a queued job another priority (higher runs first); the priority. WrongState for a
    job that is not queued."""
    if not PG_INT_MIN <= priority <= PG_INT_MAX:
        raise InvalidJob(f"priority {priority} is out of range [{PG_INT_MIN}, {PG_INT_MAX}]")
    return _change_queued(conn, job_id, priority=priority)[1]


def _change_queued(
    conn: psycopg.Connection,
    job_id: uuid.UUID | str,
    *,
    run_at: datetime | None = None,
    priority: int | None = None,
    now: bool = False,
) -> tuple[datetime, int]:
    """CHANGE_QUEUED: the job's due time and priority after; WrongState, saying why, when it
    is not queued (or, ``now``, due already)."""
    key = resolve_job_id(conn, job_id)
    params = {"id": key, "run_at": run_at, "priority": priority, "now": now,
              "channel": NOTIFY_CHANNEL}  # fmt: skip
    row = conn.execute(CHANGE_QUEUED, params).fetchone()
    if row is None:
        status = job_statuses(conn, [key]).get(key, ("gone",))[0]
        why = "only a queued job can be changed"
        if now:
            due = status == JobStatus.QUEUED
            why = "it is due already" if due else "only a queued job can run now"
        raise WrongState(f"job {key} is {status}: {why}")
    return row[1], row[2]


@dataclass(frozen=True)
class JobFilter:
    """Which jobs a bulk action takes (as `list` filters them): of these statuses (the
    action's own when empty), and each other field given; ``older_than``: enqueued longer ago
    than so many seconds; ``text``: found in the prompt (any case)."""

    statuses: tuple[str, ...] = ()
    queue: str | None = None
    kind: str | None = None
    tag: str | None = None
    cwd: str | None = None
    text: str | None = None
    older_than: float | None = None
    batch: uuid.UUID | None = None

    def given(self) -> bool:
        """Whether it narrows anything (a bulk action takes no filter at all for everything)."""
        return any(value not in (None, ()) for value in dataclasses.astuple(self))

    def params(self, statuses: Sequence[str]) -> dict[str, Any]:
        """The parameters of COUNT_MATCHING and MATCHING_CHUNK, among ``statuses`` (those
        the action takes: the filter's must be among them)."""
        wrong = sorted(set(self.statuses) - set(statuses))
        if wrong:
            raise InvalidJob(f"this takes jobs that are {' or '.join(statuses)}, not {wrong[0]}")
        before = None
        if self.older_than is not None:
            before = datetime.now(UTC) - timedelta(seconds=self.older_than)
        return {"statuses": list(self.statuses or statuses), "queue": self.queue,
                "kind": self.kind, "tag": self.tag, "cwd": self.cwd, "text": self.text,
                "before": before, "batch": self.batch}  # fmt: skip


#: A bulk action's statements take this many jobs at a time (one transaction for all).
BULK_CHUNK = 5000
#: The statuses each bulk action takes.
BULK_STATUSES = {
    "cancel": (JobStatus.QUEUED, JobStatus.RUNNING),
    "retry": (JobStatus.FAILED, JobStatus.CANCELLED),
    "run-now": (JobStatus.QUEUED,),
    "set-priority": (JobStatus.QUEUED,),
}


def count_matching(conn: psycopg.Connection, action: str, where: JobFilter) -> int:
    """How many jobs ``action`` (a key of BULK_STATUSES) would take by ``where``."""
    return int(_the_row(conn.execute(COUNT_MATCHING, where.params(BULK_STATUSES[action])))[0])


def bulk_action(
    conn: psycopg.Connection, action: str, where: JobFilter, priority: int | None = None
) -> int:
    """Do ``action`` (cancel, retry, run-now, set-priority to ``priority``) to every job
    ``where`` matches, all or none, in one transaction of statements of BULK_CHUNK jobs each
    (a million jobs take neither a statement of minutes nor their ids in memory at once);
    how many it changed. Retry passes over those a retry would refuse (see retry_jobs; it goes
    over them again while that retries more: a job and the one it waits for, taken in
    different chunks), and run-now those due already. InvalidJob for a filter that narrows
    nothing: that is every job, said with a filter (a status) or not at all."""
    if not where.given():
        raise InvalidJob("give a filter (--status, --queue, --tag...): --all alone is every job")
    if (action == "set-priority") != (priority is not None):
        raise InvalidJob("a priority goes with set-priority, and set-priority needs one")
    if priority is not None and not PG_INT_MIN <= priority <= PG_INT_MAX:
        raise InvalidJob(f"priority {priority} is out of range [{PG_INT_MIN}, {PG_INT_MAX}]")
    changed = 0
    with _atomic(conn):
        while more := _bulk_pass(conn, action, where, priority):
            changed += more
            if action != "retry":
                break
    return changed


def _bulk_pass(
    conn: psycopg.Connection, action: str, where: JobFilter, priority: int | None
) -> int:
    """One pass of bulk_action over the jobs ``where`` matches, newest first; how many it
    changed."""
    params = {**where.params(BULK_STATUSES[action]), "chunk": BULK_CHUNK,
              "last_at": None, "last_seq": None, "last": None}  # fmt: skip
    changed = 0
    while rows := conn.execute(MATCHING_CHUNK, params).fetchall():
        chunk = [row[0] for row in rows]
        params["last"], params["last_at"], params["last_seq"] = rows[-1]
        if action == "cancel":
            changed += len(_cancel(conn, chunk))
        elif action == "retry":
            again = {"ids": chunk, "statuses": params["statuses"], "queue": None,
                     "channel": NOTIFY_CHANNEL}  # fmt: skip
            changed += len(_retry(conn, again))
        else:
            many = {"ids": chunk, "now": action == "run-now", "priority": priority,
                    "channel": NOTIFY_CHANNEL}  # fmt: skip
            changed += int(_the_row(conn.execute(CHANGE_QUEUED_MANY, many))[0])
    return changed


def drain_worker(conn: psycopg.Connection, worker: str | uuid.UUID) -> dict[str, Any]:
    """Ask a worker (its id, a prefix of it, or its host:pid) to claim no more jobs and exit
    once its running jobs end; it learns it at once (NOTIFY), or at its next heartbeat. Its
    row (id, host, pid). WorkerNotFound when no worker answers to ``worker``, InvalidJob when
    several do."""
    name = str(worker).strip()
    params = {"prefix": name.lower().replace("%", "").replace("_", ""), "name": name}
    with conn.cursor(row_factory=dict_row) as cur:
        found = cur.execute(FIND_WORKERS, params).fetchall() if name else []
    if not found:
        raise WorkerNotFound(f"no worker {name} (`claude-jobs workers` lists them)")
    if len(found) > 1:
        ids = ", ".join(str(row["id"]) for row in found)
        raise InvalidJob(f"{name} is ambiguous: it begins {ids}")
    conn.execute(DRAIN_WORKER, {"id": found[0]["id"], "channel": NOTIFY_CHANNEL})
    return found[0]


def pause_queue(conn: psycopg.Connection, queue: str, by: str | None = None) -> bool:
    """Stop workers claiming from ``queue`` (its jobs stay queued; running ones finish).
    False when it was paused already."""
    row = conn.execute(PAUSE_QUEUE, {"queue": check_queue(queue), "by": by}).fetchone()
    return bool(row and row[0])


def pause_kind(conn: psycopg.Connection, kind: str, by: str | None = None) -> bool:
    """No worker starts ``kind`` jobs until `resume --kind` (lift_hold): a hold on every worker
    without an end (a broken handler, a claude that needs logging in again), running jobs
    finish. False when it was paused already. InvalidJob for an empty kind."""
    if not isinstance(kind, str) or not kind.strip() or "\x00" in kind:
        raise InvalidJob(f"invalid kind {kind!r}")
    with _atomic(conn):
        held = {hold["kind"]: hold["until"] for hold in list_holds(conn)}
        _db_set_hold(conn, kind, LATEST_TIME, f"paused{f' by {by}' if by else ''}")
    return held.get(kind, EARLIEST_TIME) < LATEST_TIME


def _hold_end(kind: str, until: datetime, now: datetime | None = None) -> str:
    """When a hold ends, as people read it: a time and how far it is, or, for a kind paused
    with `pause --kind`, when it is resumed."""
    if until >= LATEST_TIME:
        return f"it is resumed (`claude-jobs resume --kind {kind}`)"
    return f"{until.astimezone():%Y-%m-%d %H:%M %Z} ({_ago(until, now)})"


def resume_queue(conn: psycopg.Connection, queue: str) -> bool:
    """Let workers claim from ``queue`` again; False when it was not paused."""
    params = {"queue": check_queue(queue), "channel": NOTIFY_CHANNEL}
    return conn.execute(RESUME_QUEUE, params).fetchone() is not None


#: What `queue reset` removes: a setting's name as the options say it, and its columns.
QUEUE_SETTINGS_RESET = {
    "max_running": ("max_running",),
    "rate": ("rate", "rate_seconds", "rate_by"),
    "rate_by": ("rate_by",),
}


def set_queue_limits(
    conn: psycopg.Connection,
    queue: str,
    *,
    max_running: int | None = None,
    rate: Rate | str | None = None,
    rate_by: str | None = None,
    reset: Collection[str] = (),
) -> dict[str, Any]:
    """Limit ``queue`` on every worker at once: at most ``max_running`` of its jobs running,
    at most ``rate`` starts per window (per concurrency key, kind or cwd: ``rate_by``;
    "queue" for the whole queue again); ``reset`` removes settings first (names of
    QUEUE_SETTINGS_RESET). None leaves a setting as it is. The queue's settings after."""
    queue = check_queue(queue)
    if max_running is not None and (isinstance(max_running, bool) or max_running < 1):
        raise InvalidJob(f"invalid --max-running {max_running}: at least 1 (or pause the queue)")
    if rate_by not in (None, "queue", "key", "kind", "cwd"):
        raise InvalidJob(f"invalid --rate-by {rate_by!r}: queue, key, kind or cwd")
    if unknown := sorted(set(reset) - set(QUEUE_SETTINGS_RESET)):
        raise InvalidJob(f"no setting {unknown[0]!r} to reset")
    limit = Rate.parse(rate) if isinstance(rate, str) else rate
    with _atomic(conn):
        conn.execute(
            LOCK_LIMITER, {"namespace": LIMITER_LOCK_NAMESPACE, "limiter": f"queue {queue}"}
        )
        row = conn.cursor(row_factory=dict_row).execute(QUEUE_SETTINGS, {"queue": queue}).fetchone()
        values = {k: (row or {}).get(k) for k in ("max_running", "rate", "rate_seconds", "rate_by")}
        for name in reset:
            values.update(dict.fromkeys(QUEUE_SETTINGS_RESET[name]))
        if max_running is not None:
            values["max_running"] = max_running
        if limit is not None:
            values["rate"], values["rate_seconds"] = limit.count, limit.seconds
        if rate_by is not None:
            if values["rate"] is None:
                raise InvalidJob("--rate-by goes with a rate: give --rate N/PERIOD too")
            values["rate_by"] = None if rate_by == "queue" else rate_by
        conn.execute(SET_QUEUE_LIMITS, {"queue": queue, "channel": NOTIFY_CHANNEL, **values})
    return queue_settings(conn, queue)


def reset_queue(conn: psycopg.Connection, queue: str, settings: Collection[str]) -> dict[str, Any]:
    """Remove these ``settings`` of ``queue`` (names of QUEUE_SETTINGS_RESET, and "paused"):
    the queue's settings after. InvalidJob for a queue no job has used that has no settings
    (a typo, surely)."""
    queue = check_queue(queue)
    if not settings:
        raise InvalidJob("give what to reset: --max-running, --rate, --rate-by, --paused or --all")
    row = conn.execute(QUEUE_SETTINGS, {"queue": queue}).fetchone()
    if row is None and not queue_known(conn, queue):
        known = ", ".join(known_queues(conn)) or "none"
        raise InvalidJob(f"no queue {queue}: no job has used it, nothing set it (queues: {known})")
    with _atomic(conn):
        if "paused" in settings:
            resume_queue(conn, queue)
        return set_queue_limits(conn, queue, reset=[each for each in settings if each != "paused"])


def queue_settings(conn: psycopg.Connection, queue: str) -> dict[str, Any]:
    """A queue as `queues` shows it (counts, settings; see queue_stats), and how its rate
    stands now: the starts in its window and, for a rate of the whole queue, when it has room
    for one more (``rate_opens``; None: now)."""
    queue = check_queue(queue)
    found = [row for row in queue_stats(conn) if row["queue"] == queue]
    if not found:
        raise NotFound(f"no queue {queue}: no job has used it and it has no settings")
    with conn.cursor(row_factory=dict_row) as cur:
        now = cur.execute(QUEUE_NOW, {"queue": queue}).fetchone() or {}
    return {**found[0], "started_in_window": now.get("started_in_window"),
            "rate_opens": now.get("rate_opens")}  # fmt: skip


def _rate_text(row: Mapping[str, Any]) -> str | None:
    """A settings row's rate as N/PERIOD, or None."""
    if row.get("rate") is None:
        return None
    return str(Rate(row["rate"], row["rate_seconds"]))


def cleanup_jobs(
    conn: psycopg.Connection,
    older_than: float | timedelta,
    *,
    include_failed: bool = False,
    batch: int = 1000,
    exclusive: bool = False,
) -> int:
    """Delete succeeded and cancelled (and, with ``include_failed``, failed) jobs that
    finished more than ``older_than`` (seconds) ago, ``batch`` at a time, each batch its own
    short transaction; returns how many. Then forget the unique windows that ended, older
    schedule runs (not a schedule's latest) and finished batches with no job left.
    ``exclusive``: give way (stop) whenever another exclusive cleanup is at work, as workers
    do."""
    seconds = older_than.total_seconds() if isinstance(older_than, timedelta) else older_than
    statuses = [JobStatus.SUCCEEDED, JobStatus.CANCELLED]
    if include_failed:
        statuses.append(JobStatus.FAILED)
    before = datetime.now(UTC) - timedelta(seconds=seconds)
    params = {"statuses": statuses, "before": before, "batch": batch}
    deleted = 0
    while True:
        with conn.transaction():
            if exclusive and not _db_try_task_lock(conn, CLEANUP_TASK):
                return deleted
            count = conn.execute(CLEANUP_BATCH, params).rowcount
        deleted += count
        if count < batch:
            conn.execute(CLOSED_UNIQUE_WINDOWS)
            conn.execute(OLD_LOST_WORKERS)
            conn.execute(OLD_NOTIFICATIONS, {"before": before})
            conn.execute(OLD_SCHEDULE_RUNS, {"before": before})
            conn.execute(OLD_BATCHES, {"before": before})
            return deleted


def purge_queue(conn: psycopg.Connection, queue: str, *, batch: int = 1000) -> int:
    """Delete every queued job of ``queue`` (those enqueued before it began: not the
    callbacks of batches it ends), ``batch`` at a time; returns how many."""
    deleted = 0
    bound = _the_row(conn.execute(PURGE_BOUND))[0]
    params = {"queue": queue, "batch": batch, "bound": bound}
    while True:
        with _atomic(conn):
            rows = conn.execute(PURGE_BATCH, params).fetchall()
            if not rows:
                return deleted
            _db_unblock(conn, [row[0] for row in rows], [row[1] for row in rows])
        deleted += len(rows)


###############################################################################
# Queue API: worktrees
###############################################################################


def worktree_diff(job: Job, *, stat: bool = False) -> bytes:
    """What a worktree job changed against the commit its branch started from, as git prints
    it: committed on its branch, and (while its worktree is on this machine) not committed, new
    files too; ``stat``: a summary of the files. WrongState for a job with no worktree of its
    own; JobsError when neither its worktree nor its branch is here."""
    if not job.payload.get("worktree"):
        raise WrongState(f"job {job.id} is not a worktree job: it has no branch of its own")
    if not job.worktree:
        raise WrongState(f"job {job.id} has made no worktree yet: it has not run")
    quoted = ["-c", "core.quotePath=false"]  # (names as they are, not octal escapes)
    how = [*quoted, "diff", "--stat"] if stat else [*quoted, "diff"]
    tree = job.worktree
    try:
        tree = _checked_record(tree)
        if Path(tree["path"]).is_dir():  # everything in it, through an index of our own
            with tempfile.TemporaryDirectory(prefix="claude-jobs-") as scratch:
                env = {**os.environ, "GIT_INDEX_FILE": str(Path(scratch, "index"))}
                _git(tree["path"], "read-tree", "HEAD", env=env)
                _git(tree["path"], "add", "--all", env=env)
                return _git_bytes(tree["path"], *how, "--cached", tree["base"], env=env)
        return _git_bytes(tree["repo"], *how, tree["base"], tree["branch"], "--")
    except (_GitError, WorkerUnfit) as error:
        raise JobsError(
            f"cannot show what job {job.id} changed: {error} (its worktree {tree.get('path')} "
            f"and branch {tree.get('branch')} in {tree.get('repo')}, on the machine that ran it)"
        ) from None


def list_worktrees(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """The git worktrees jobs ran in (kept beyond the jobs' own rows), newest first: host,
    path, repo, branch, base, job_id, created_at, used_at, status (of the job that made it;
    None when deleted), busy (an unfinished job needs it); and, for those of this machine,
    here, exists, uncommitted, size_bytes, commits (on its branch since the base),
    branch_exists, detached_commits (of a detached HEAD, on no branch) and operation (one
    half done: "a rebase"...); None where git could not tell."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(LIST_WORKTREES).fetchall()
    here = socket.gethostname()
    for row in rows:
        row.update(_worktree_state(row) if row["host"] == here else {"here": False})
    return rows


def _worktree_state(row: Mapping[str, Any]) -> dict[str, Any]:
    """What a worktree of this machine is like now, on disk and in git (None where it cannot
    be told: its repository moved, say)."""
    state: dict[str, Any] = {"here": True, "exists": Path(row["path"]).is_dir(),
                             "uncommitted": None, "size_bytes": None, "commits": None,
                             "branch_exists": None, "detached_commits": None,
                             "operation": None}  # fmt: skip
    try:
        tree = _checked_record(row)
        state["branch_exists"] = _git_ok(
            tree["repo"], "rev-parse", "--verify", "--quiet", f"refs/heads/{tree['branch']}"
        )
        if state["branch_exists"]:
            since = f"{tree['base']}..{tree['branch']}"
            state["commits"] = int(_git(tree["repo"], "rev-list", "--count", since))
        if state["exists"]:
            state["uncommitted"] = bool(_git(tree["path"], "status", "--porcelain"))
            state["operation"] = _unfinished_operation(tree["path"])
            state["detached_commits"] = _detached_commits(tree["path"])
    except (_GitError, WorkerUnfit, ValueError):
        pass
    if state["exists"]:
        state["size_bytes"] = _size_of(Path(row["path"]))
    return state


def _size_of(path: Path) -> int:
    """The bytes of the files below ``path`` (those that vanish meanwhile count nothing)."""
    total = 0
    for top, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += Path(top, name).lstat().st_size
    return total


def prune_worktrees(
    conn: psycopg.Connection, *, older_than: float = 0, merged: bool = False, force: bool = False
) -> list[str]:
    """Remove the worktrees of this machine that are safe to remove: no unfinished job needs
    them (asked again right before each is removed), last used more than ``older_than`` seconds
    ago, and no uncommitted changes in them (git refuses to remove those; ``force``: those
    too). Their branches stay (they hold the work) unless ``merged``: then branches merged into
    their repository's HEAD go too, and those whose pull request was merged (a squash merge
    leaves no trace in git). Returns what it did, and what it kept and why, a line each."""
    done: list[str] = []
    since = datetime.now(UTC) - timedelta(seconds=older_than)
    for row in list_worktrees(conn):
        if not row["here"] or row["used_at"] > since:
            continue
        busy = conn.execute(WORKTREE_BUSY, {"job": row["job_id"], "path": row["path"]})
        if _the_row(busy)[0]:
            done.append(f"kept {row['path']}: a job that is not over needs it")
            continue
        try:
            pr_merged = row["pr_state"] == "merged"
            record = _checked_record(row)
            done.extend(_prune_worktree(record, merged=merged, force=force, pr_merged=pr_merged))
        except (_GitError, WorkerUnfit) as error:
            done.append(f"cannot prune {row['path']}: {error}")
            continue
        state = _worktree_state(row)
        if not state["exists"] and state["branch_exists"] is False:
            conn.execute(FORGET_WORKTREE, {"host": row["host"], "path": row["path"]})
    return done


def _prune_worktree(
    tree: Mapping[str, Any], *, merged: bool, force: bool, pr_merged: bool = False
) -> list[str]:
    """Prune one worktree of this machine (see prune_worktrees; ``pr_merged``: the branch's
    pull request was merged)."""
    done = []
    repo, path, branch = tree["repo"], tree["path"], tree["branch"]
    if Path(path).is_dir():
        listed = _git(repo, "worktree", "list", "--porcelain").splitlines()
        if f"worktree {path}" not in listed:
            return [f"kept {path}: git does not know it as a worktree of {repo}"]
        operation = _unfinished_operation(path)
        if not force and operation:
            return [f"kept {path}: it is in the middle of {operation} (finish or abort it; "
                    "--force removes it all the same)"]  # fmt: skip
        if not force and _git(path, "status", "--porcelain"):
            return [f"kept {path}: it has uncommitted changes (--force removes them)"]
        _, common = _repository_of(repo)
        if detached := _detached_commits(path):  # (saved on a branch first, even with --force)
            saved = _save_detached(common, repo, path, branch)
            done.append(f"saved {detached} commit(s) of the detached HEAD of {path} on branch "
                        f"{saved}")  # fmt: skip
        _git_retrying(common, repo, "worktree", "remove", *(["--force"] * force), path)
        done.append(f"removed worktree {path}")
    known = _git_ok(repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}")
    if (
        merged
        and known
        and (pr_merged or _git_ok(repo, "merge-base", "--is-ancestor", branch, "HEAD"))
    ):
        _, common = _repository_of(repo)
        _git_retrying(common, repo, "branch", "-D", branch)
        how = "its pull request was merged" if pr_merged else "merged"
        done.append(f"deleted branch {branch} ({how})")
    return done


def _save_detached(common: str, repo: str, path: str, branch: str) -> str:
    """Put a branch on the detached HEAD of the worktree at ``path`` (the job's ``branch``
    with -detached, and a number if that is taken); its name."""
    head = _git(path, "rev-parse", "HEAD")
    for number in itertools.count(1):
        name = f"{branch}-detached" + (f"-{number}" if number > 1 else "")
        if not _git_ok(repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{name}"):
            _git_retrying(common, repo, "branch", name, head)
            return name
    raise AssertionError("unreachable")


###############################################################################
# Queue API: delivery (a worktree job's branch pushed, its pull request on GitHub, tracked)
###############################################################################

SET_DELIVERY = """
-- set_delivery: what `deliver` did for a finished job, by hand
UPDATE claude_jobs SET delivery = %(delivery)s::jsonb, updated_at = now()
WHERE id = %(id)s AND status IN ('succeeded', 'failed', 'cancelled')
"""

DUE_PULL_REQUESTS = """
-- due_pull_requests: open pull requests not looked at since `before`, taken for a look now
-- (another worker skips them: they are locked, then no longer due)
WITH due AS (
    SELECT id FROM claude_jobs
    WHERE delivery->'pr'->>'state' = 'open'
      AND coalesce(delivery->'pr'->>'polled_at', '') < %(before)s
    ORDER BY delivery->'pr'->>'polled_at' NULLS FIRST
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE claude_jobs j
SET delivery = jsonb_set(j.delivery, '{pr,polled_at}', to_jsonb(%(now)s::text))
FROM due WHERE j.id = due.id
RETURNING j.id, j.delivery
"""

RECORD_PULL_REQUEST = """
-- record_pull_request: what a look at a job's pull request found
UPDATE claude_jobs SET delivery = jsonb_set(delivery, '{pr}', delivery->'pr' || %(pr)s::jsonb)
WHERE id = %(id)s AND delivery ? 'pr'
"""


class DeliveryError(JobsError):
    """A branch could not be pushed, or its pull request not opened (the job keeps its work)."""


def _exchange(request: urllib.request.Request, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """Send an HTTP request: (status, headers with lower-case names, body), whatever the
    status (an error answer is an answer too); OSError or HTTPException when none came."""
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, headers, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:  # (304, 4xx, 5xx)
        status, headers, raw = error.code, error.headers, error.read()
    return status, {name.lower(): value for name, value in headers.items()}, raw


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """The seconds an answer's Retry-After asks to wait (None: it asks nothing)."""
    value = headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


def github_token() -> str | None:
    """The token for GitHub's API: $GH_TOKEN, $GITHUB_TOKEN, or what `gh auth token` says
    when the gh CLI is installed and logged in. It is never printed, logged or stored."""
    for name in ("GH_TOKEN", "GITHUB_TOKEN"):
        if token := os.environ.get(name, "").strip():
            return token
    gh = shutil.which("gh")
    if gh is None:
        return None
    host = urllib.parse.urlsplit(github_api_url()).hostname or "api.github.com"
    hostname = [] if host == "api.github.com" else ["--hostname", host]
    try:
        done = subprocess.run([gh, "auth", "token", *hostname], capture_output=True, text=True,
                              timeout=30, stdin=subprocess.DEVNULL)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


class _GitHub:
    """GitHub's REST API, the few calls delivery and tracking make. A request that fails for
    a while (a connection error, a timeout, 5xx, a rate limit) is tried again after each of
    ``delays`` (or the Retry-After GitHub gives) before DeliveryError; other answers are
    returned as they are."""

    def __init__(
        self,
        token: str | None,
        api_url: str | None = None,
        delays: Sequence[float] | None = None,
        sleep: Callable[[float], Any] = time.sleep,
    ) -> None:
        if not token:
            raise DeliveryError(
                "no GitHub token: set GH_TOKEN or GITHUB_TOKEN for the worker (a token that may "
                "write contents and pull requests), or log in with `gh auth login`"
            )
        self.api_url = (api_url or github_api_url()).rstrip("/")
        if not re.match(r"https?://[^/]", self.api_url):
            raise DeliveryError(
                f"GitHub's API must be an http(s) URL: {_without_credentials(self.api_url)} "
                "(GITHUB_API_URL)"
            )
        self._delays = GITHUB_RETRY_DELAYS if delays is None else delays
        self._token, self._sleep = token, sleep

    def call(
        self, method: str, path: str, body: Any = None, etag: str | None = None
    ) -> tuple[int, Mapping[str, str], Any]:
        """(status, headers, JSON answer or None)."""
        for delay in (*self._delays, None):
            try:
                status, headers, answer = self._once(method, path, body, etag)
            except (OSError, http.client.HTTPException) as error:  # (URLError is an OSError)
                reason = getattr(error, "reason", None) or error
                if delay is None:
                    where = _without_credentials(self.api_url)
                    raise DeliveryError(f"cannot reach GitHub at {where}: {reason}") from None
                self._sleep(delay)
                continue
            wait = self._transient(status, headers)
            if wait is None:
                return status, headers, answer
            if delay is None:
                raise DeliveryError(f"GitHub answered {method} {path} with {status} "
                                    f"{self.message(answer)} (tried {len(self._delays) + 1} "
                                    "times)")  # fmt: skip
            if wait > GITHUB_RETRY_AFTER_LIMIT:
                raise DeliveryError(f"GitHub's rate limit is spent for {wait:.0f}s more "
                                    f"({method} {path} answered {status})")  # fmt: skip
            self._sleep(max(wait, delay))
        raise AssertionError("unreachable")

    @staticmethod
    def message(answer: Any) -> str:
        """What GitHub's error answer says, on one line."""
        if not isinstance(answer, dict):
            return ""
        said = [str(answer.get("message") or "")]
        for error in answer.get("errors") or []:
            said.append(str(error.get("message") or error) if isinstance(error, dict) else error)
        return _cut(" ".join(" · ".join(part for part in said if part).split()), 300)

    @staticmethod
    def _transient(status: int, headers: Mapping[str, str]) -> float | None:
        """Seconds to wait before trying again, for an answer that may change by itself (a
        spent rate limit: until its reset)."""
        retry_after = _retry_after(headers)
        spent = headers.get("x-ratelimit-remaining") == "0"
        asks = retry_after is not None
        if not (status >= 500 or status == 429 or (status == 403 and (asks or spent))):
            return None
        if retry_after is not None:
            return retry_after
        reset = headers.get("x-ratelimit-reset", "")
        if spent and reset.isdigit():
            return max(0.0, float(reset) - time.time())
        return 0.0

    def _once(
        self, method: str, path: str, body: Any, etag: str | None
    ) -> tuple[int, Mapping[str, str], Any]:
        headers = {"Accept": "application/vnd.github+json", "User-Agent": "claude-jobs",
                   "X-GitHub-Api-Version": "2022-11-28"}  # fmt: skip
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if etag:
            headers["If-None-Match"] = etag
        request = urllib.request.Request(self.api_url + path, data, headers, method=method)
        # (never sent on to where a redirect points)
        request.add_unredirected_header("Authorization", f"Bearer {self._token}")
        status, answer_headers, raw = _exchange(request, GITHUB_TIMEOUT)
        try:
            answer = json.loads(raw) if raw else None
        except ValueError:
            answer = None
        return status, answer_headers, answer


def _pr_title(job: Job, result: Any) -> str:
    """--pr-title, else the first line of claude's result, else the prompt's (72 characters)."""
    said = result.get("result") if isinstance(result, dict) else None
    for text in (job.payload.get("pr_title"), said, job.payload.get("prompt")):
        lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
        if lines:
            first = lines[0].lstrip("#").strip() or lines[0]
            return first if len(first) <= PR_TITLE_LIMIT else first[: PR_TITLE_LIMIT - 1] + "…"
    return f"claude-jobs {job.id}"


def _pr_round(job: Job, result: Any, checks: Mapping[str, Any] | None, cost: float) -> str:
    """A job's part of its pull request's body, in Markdown: claude's result, the checks that
    passed (and in which round), the cost, the job and the chain it belongs to."""
    said = result.get("result") if isinstance(result, dict) else None
    parts = [str(said).strip() if said else "_(claude gave no result text)_"]
    if checks:
        passed = [run for run in checks.get("runs", []) if run.get("status") == 0
                  and run.get("round") == checks.get("round")]  # fmt: skip
        if passed:
            rounds = checks.get("round", 0)
            after = f", after {rounds} round{'s' * (rounds != 1)} of repair" if rounds else ""
            lines = [f"- `{run['command']}` ({run.get('seconds', 0):.1f}s)" for run in passed]
            parts.append(f"**Checks passed**{after}:\n" + "\n".join(lines))
    chain = f", continuing job `{job.continue_from}`" if job.continue_from else ""
    parts.append(f"Job `{job.id}`{chain} · cost {_money(cost)} · made by claude-jobs")
    return "\n\n".join(parts)


def _commit_leftovers(path: str, title: str) -> None:
    """Commit what claude left uncommitted in the worktree at ``path`` (checked as it is: it
    goes with the branch)."""
    if not _git(path, "status", "--porcelain"):
        return
    identity: list[str] = []
    if not _git_ok(path, "config", "user.email"):
        identity = ["-c", "user.name=claude-jobs", "-c", "user.email=claude-jobs@localhost"]
    _git(path, "add", "-A")
    _git(path, *identity, "commit", "--quiet", "--no-verify", "-m", title,
         "-m", "(committed by claude-jobs: what the job left uncommitted)")  # fmt: skip


def _push(repo: str, remote: str, branch: str) -> None:
    """Push ``branch`` to ``remote`` (git's own credentials; it never asks: no terminal)."""
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    ref = f"refs/heads/{branch}"
    try:
        done = subprocess.run(["git", "push", "--porcelain", remote, f"{ref}:{ref}"], cwd=repo,
                              capture_output=True, text=True, timeout=600, env=env,
                              stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as error:
        raise DeliveryError(f"cannot push {branch} to {remote}: {error}") from None
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stdout + "\n" + done.stderr).splitlines()]
        said = [line for line in lines if line.startswith(("!", "fatal:", "error:", "remote:"))]
        detail = "; ".join(said[:3]) or f"git push exited {done.returncode}"
        raise DeliveryError(_without_credentials(f"push of {branch} to {remote} failed: {detail}"))


def _open_pull_request(
    github: _GitHub,
    job: Job,
    repository: tuple[str, str],
    branch: str,
    body: str,
    previous: Mapping[str, Any] | None,
    title: str,
    own: bool = False,
) -> dict[str, Any]:
    """Open the pull request of ``branch``, or update the one a job before it in the chain
    opened (its body gains this job's part; ``own``: the job opened it itself, and it is only
    read again); what it is now."""
    owner, name = repository
    pulls = f"/repos/{owner}/{name}/pulls"
    if previous and previous.get("number") and previous.get("repo") == f"{owner}/{name}":
        status, _, answer = github.call("GET", f"{pulls}/{previous['number']}")
        if status == 200 and isinstance(answer, dict) and not own:
            body = f"{answer.get('body') or ''}\n\n---\n\n{body}"
            status, _, answer = github.call("PATCH", f"{pulls}/{previous['number']}",
                                            {"body": body})  # fmt: skip
        if status != 200 or not isinstance(answer, dict):
            raise DeliveryError(f"GitHub refused to update pull request #{previous['number']} "
                                f"({status}): {github.message(answer)}")  # fmt: skip
        return _pull_request_fields(answer, owner, name, updated=not own)
    base = job.payload.get("pr_base")
    if not base:
        status, _, answer = github.call("GET", f"/repos/{owner}/{name}")
        base = answer.get("default_branch") if isinstance(answer, dict) else None
        if status != 200 or not base:
            raise DeliveryError(f"cannot read {owner}/{name} on GitHub ({status}): "
                                f"{github.message(answer)}")  # fmt: skip
    request = {"title": title, "head": branch, "base": base, "body": body,
               "draft": not job.payload.get("pr_ready", False)}  # fmt: skip
    status, _, answer = github.call("POST", pulls, request)
    if status == 422 and "already exists" in github.message(answer):
        query = urllib.parse.urlencode({"head": f"{owner}:{branch}", "state": "open"})
        found_status, _, found = github.call("GET", f"{pulls}?{query}")
        if found_status == 200 and isinstance(found, list) and found and isinstance(found[0], dict):
            return _pull_request_fields(found[0], owner, name)
    if status != 201 or not isinstance(answer, dict):
        raise DeliveryError(f"GitHub refused the pull request ({status}): "
                            f"{github.message(answer)}")  # fmt: skip
    return _pull_request_fields(answer, owner, name)


def _pull_request_fields(
    answer: Mapping[str, Any], owner: str, name: str, updated: bool = False
) -> dict[str, Any]:
    """What a job keeps of its pull request (see deliver)."""
    fields = {
        "number": answer.get("number"),
        "url": answer.get("html_url"),
        "repo": f"{owner}/{name}",
        "draft": bool(answer.get("draft")),
        "state": "merged" if answer.get("merged_at") else answer.get("state", "open"),
        "base": (answer.get("base") or {}).get("ref"),
    }
    return {**fields, "updated": True} if updated else fields


def _deliver(
    job: Job,
    tree: Mapping[str, Any],
    result: Any,
    checks: Mapping[str, Any] | None,
    *,
    remote: str,
    pr: bool,
    previous: Mapping[str, Any] | None,
    own: bool = False,
    cost: float | None = None,
    stopped: Callable[[], str | None] = lambda: None,
    sleep: Callable[[float], Any] = time.sleep,
) -> dict[str, Any]:
    """Deliver a worktree job's branch: commit what it left uncommitted (a job with checks that
    pushes committed it before they ran: what they made is not the job's), push the branch to
    ``remote``, and with ``pr`` open its pull request on GitHub, or update the one of the job
    it continues (``previous``: that job's delivery; ``own``: the job's own, read again).
    ``cost``: the job's, to say (default: as its row has it); ``stopped``: why the attempt
    must stop now, if it must (checked between the steps: raises _Interrupted).

    What was done, as the job keeps it: the remote, branch and commit pushed, the pull
    request; ``error`` when it failed (the job's work stays on its branch)."""
    repo, branch = tree["repo"], tree["branch"]
    delivery: dict[str, Any] = {"remote": remote, "branch": branch,
                                "at": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip
    title = _pr_title(job, result)

    def go_on() -> None:
        if reason := stopped():
            raise _Interrupted(reason)

    try:
        committed = job.payload.get("checks") and job.payload.get("push")  # (before the checks)
        if not committed and tree.get("path") and Path(tree["path"]).is_dir():
            _commit_leftovers(tree["path"], title)
        delivery["sha"] = _git(repo, "rev-parse", f"refs/heads/{branch}")
        go_on()
        _push(repo, remote, branch)
        delivery["pushed"] = True
        if pr:
            url = _remote_url(repo, remote) or ""
            repository = _github_repository(url)
            if repository is None:
                raise DeliveryError(f"the remote {remote} ({_without_credentials(url)}) is not "
                                    "on GitHub: no pull request")  # fmt: skip
            go_on()
            github = _GitHub(github_token(), sleep=sleep)
            body = _pr_round(job, result, checks, job.cost_usd if cost is None else cost)
            opened = _open_pull_request(github, job, repository, branch, body,
                                        (previous or {}).get("pr"), title, own)  # fmt: skip
            delivery["pr"] = {**opened, "api": _without_credentials(github.api_url)}
    except _Interrupted:
        raise
    except Exception as error:  # (whatever it was, the job's work is done and kept)
        said = str(error) if isinstance(error, JobsError | _GitError) else (
            f"{type(error).__name__}: {error}")  # fmt: skip
        delivery["error"] = _without_secrets(_without_credentials(said))
        logger.warning("job %s: delivery failed: %s", job.id, delivery["error"])
    return delivery


def _finished_worktree(
    conn: psycopg.Connection, job_id: uuid.UUID | str, doing: str
) -> tuple[Job, dict[str, Any]]:
    """A finished worktree job whose worktree and branch are on this machine, and its
    worktree's record: what deliver and discard (``doing``) take; WrongState, said, else."""
    job = get_job(conn, resolve_job_id(conn, job_id), transcript=False)
    if job.status not in FINISHED_STATUSES:
        raise WrongState(f"job {job.id} is {job.status}: {doing} it once it has finished")
    if not job.payload.get("worktree"):
        raise WrongState(f"job {job.id} is not a worktree job: it has no branch to {doing}")
    if not job.worktree or "branch" not in job.worktree:
        raise WrongState(f"job {job.id} made no worktree: it has no branch to {doing}")
    tree = _checked_record(job.worktree)
    if job.session_host not in (None, socket.gethostname()) or not Path(tree["repo"]).is_dir():
        raise WrongState(f"the worktree of job {job.id} is on {job.session_host or 'another'} "
                         f"machine: {doing} it there")  # fmt: skip
    return job, tree


def deliver(
    conn: psycopg.Connection,
    job_id: uuid.UUID | str,
    *,
    pr: bool = False,
    remote: str | None = None,
    sleep: Callable[[float], Any] = time.sleep,
) -> dict[str, Any]:
    """(Re)deliver a finished worktree job by hand, from the machine that has its repository:
    push its branch to ``remote`` (default: the job's, else origin) and, with ``pr``, when it
    was queued with one or has one, open its pull request (or read again the one it has).
    What was delivered (also kept on the job); DeliveryError when it failed, WrongState for
    a job that cannot be delivered (not finished, no worktree, its worktree in use by a job
    that continues it)."""
    job, tree = _finished_worktree(conn, job_id, "deliver")
    if _the_row(conn.execute(WORKTREE_BUSY, {"job": job.id, "path": tree["path"]}))[0]:
        raise WrongState(
            f"a job that continues job {job.id} works in its worktree now: deliver once it ends"
        )
    remote = remote or job.payload.get("push") or "origin"
    if _remote_url(tree["repo"], remote) is None:
        raise InvalidJob(f"the repository {tree['repo']} has no remote {remote!r} to push to")
    previous, own = job.delivery, bool((job.delivery or {}).get("pr"))
    if not own and job.continue_from:
        with contextlib.suppress(NotFound):
            previous = get_job(conn, job.continue_from, transcript=False).delivery
    delivery = _deliver(job, tree, job.result, job.checks, remote=remote,
                        pr=pr or own or bool(job.payload.get("pr")), previous=previous, own=own,
                        sleep=sleep)  # fmt: skip
    with _atomic(conn):
        conn.execute(SET_DELIVERY, {"id": job.id, "delivery": json.dumps(_storable(delivery))})
    if "error" in delivery:
        raise DeliveryError(delivery["error"])
    return delivery


def track_pull_requests(
    conn: psycopg.Connection,
    *,
    interval: float = DEFAULT_PR_POLL_INTERVAL,
    limit: int = PR_POLL_BATCH,
    token: str | None = None,
    budget: float = PR_POLL_BUDGET,
) -> int:
    """Look at the open pull requests of jobs not looked at for ``interval`` seconds (workers
    do it now and then, one at a time): whether each is still open, merged or closed, and the
    combined state of its head commit's checks (commit statuses and check runs: pending,
    success, failure). Conditional requests: an answer that did not change costs no rate
    limit. A pull request GitHub will not show (gone, no access) is marked so, with why; a
    pass ends when GitHub cannot be reached or after ``budget`` seconds (the rest wait for
    the next). How many were taken to be looked at (0 without a token)."""
    now = datetime.now(UTC)
    before = now - timedelta(seconds=interval)  # (times as text, all in one format: in order)
    params = {"before": before.isoformat(timespec="microseconds"),
              "now": now.isoformat(timespec="microseconds"), "limit": limit}  # fmt: skip
    with _atomic(conn):
        if not _db_try_task_lock(conn, TRACK_TASK):
            return 0
        due = conn.execute(DUE_PULL_REQUESTS, params).fetchall()
    token = (token or github_token()) if due else None  # (gh is asked only when it is needed)
    if token is None:  # (without one, nothing can be looked at: they wait for the next pass)
        return 0
    ends = time.monotonic() + budget
    for job_id, delivery in due:
        pr = delivery["pr"]
        try:
            found = _look_at_pull_request(_GitHub(token, pr.get("api"), delays=()), pr)
        except DeliveryError as error:  # (GitHub is away: the rest waits for the next pass)
            logger.info("cannot look at pull request %s: %s", pr.get("url"), error)
            break
        with _atomic(conn):
            conn.execute(RECORD_PULL_REQUEST, {"id": job_id, "pr": json.dumps(found)})
        if time.monotonic() > ends:
            break
    return len(due)


def _look_at_pull_request(github: _GitHub, pr: Mapping[str, Any]) -> dict[str, Any]:
    """What changed of a pull request (see track_pull_requests): its state, head, checks, and
    the ETags of the answers (so that asking again costs nothing while nothing changes)."""
    etags, parts = dict(pr.get("etags") or {}), dict(pr.get("ci_parts") or {})
    found: dict[str, Any] = {}
    status, headers, answer = github.call("GET", f"/repos/{pr['repo']}/pulls/{pr['number']}",
                                          etag=etags.get("pull"))  # fmt: skip
    head = pr.get("head")
    if status == 200 and isinstance(answer, dict):
        etags["pull"] = headers.get("etag")
        found["state"] = "merged" if answer.get("merged_at") else answer.get("state", "open")
        found["draft"] = bool(answer.get("draft"))
        head = found["head"] = (answer.get("head") or {}).get("sha")
    elif status in (404, 410):  # (deleted, or its repository: nothing more to look at)
        return {"state": "gone", "error": f"GitHub answered {status} {github.message(answer)}"}
    elif status != 304:  # (no access, say: said, and looked at again next time)
        return {"error": f"GitHub answered {status} {github.message(answer)}"}
    if head:
        base = f"/repos/{pr['repo']}/commits/{head}"
        for part, path in (("status", "/status"), ("runs", "/check-runs")):
            seen_head, etag = etags.get(part) or (None, None)
            status, headers, answer = github.call(
                "GET", base + path, etag=etag if seen_head == head else None
            )
            if status == 200 and isinstance(answer, dict):
                etags[part] = (head, headers.get("etag"))
                parts[part] = _ci_state(part, answer)
    found["ci"] = _combined(parts.values())
    return {**found, "etags": etags, "ci_parts": parts, "error": None}


def _ci_state(part: str, answer: Mapping[str, Any]) -> str | None:
    """pending, success or failure (None: nothing reported) of a combined commit status
    (``part`` "status") or of a commit's check runs ("runs")."""
    if part == "status":
        if not answer.get("total_count") and not answer.get("statuses"):
            return None
        state = answer.get("state")
        return "failure" if state in ("failure", "error") else state
    runs = [run for run in answer.get("check_runs") or [] if isinstance(run, dict)]
    if not runs:
        return None
    if any(run.get("conclusion") in ("failure", "timed_out", "cancelled", "action_required")
           for run in runs):  # fmt: skip
        return "failure"
    if any(run.get("status") != "completed" for run in runs):
        return "pending"
    return "success"


def _combined(states: Iterable[str | None]) -> str | None:
    """The worst of several CI states: failure, then pending, then success (None: none)."""
    given = [state for state in states if state]
    for state in ("failure", "pending", "success"):
        if state in given:
            return state
    return None


###############################################################################
# Queue API: review (what needs people: a worktree job's diff; reply, discard, mark seen)
###############################################################################

# (the predicate of the index claude_jobs_needs_you, which these statements go through)
_NEEDS_YOU = """reviewed_at IS NULL AND (status = 'failed' OR (status = 'succeeded'
        AND ((worktree IS NOT NULL AND delivery IS NULL) OR delivery ? 'error')))"""

NEEDS_YOU = f"""
-- needs_you: the newest jobs that failed, or succeeded with a worktree not delivered or a
-- delivery that failed, and nobody reviewed yet (replied to, delivered, discarded, seen)
SELECT {_JOB_COLUMNS} FROM claude_jobs
WHERE {_NEEDS_YOU}
ORDER BY finished_at DESC, id DESC LIMIT %(limit)s
"""

COUNT_NEEDS_YOU = f"""
-- count_needs_you: how many jobs need_you lists (up to a limit: the index tells)
SELECT count(*) FROM (SELECT FROM claude_jobs WHERE {_NEEDS_YOU} LIMIT %(limit)s) found
"""

MARK_REVIEWED = """
-- mark_reviewed: someone looked at this finished job (replied, discarded, marked it seen)
UPDATE claude_jobs SET reviewed_at = now()
WHERE id = %(id)s AND status IN ('succeeded', 'failed', 'cancelled') AND reviewed_at IS NULL
"""

MARK_WORKTREE_REVIEWED = f"""
-- mark_worktree_reviewed: the jobs that worked in a worktree just discarded are reviewed
UPDATE claude_jobs SET reviewed_at = now()
WHERE {_NEEDS_YOU} AND worktree->>'path' = %(path)s
"""

#: The most "Needs you" counts (the page title says 99+ beyond).
NEEDS_YOU_COUNTED = 100


def needs_you(conn: psycopg.Connection, limit: int = 50) -> tuple[int, list[Job]]:
    """What needs people, newest first: jobs that failed (their checks too), worktree jobs that
    succeeded and were not delivered, jobs whose delivery failed, none of them reviewed yet (see
    mark_reviewed); and how many there are (up to NEEDS_YOU_COUNTED)."""
    with conn.cursor(row_factory=dict_row) as cur:
        jobs = [Job.from_row(row) for row in cur.execute(NEEDS_YOU, {"limit": limit})]
        count = _the_row(cur.execute(COUNT_NEEDS_YOU, {"limit": NEEDS_YOU_COUNTED}))["count"]
    return count, jobs


def mark_reviewed(conn: psycopg.Connection, job_id: uuid.UUID | str) -> None:
    """Someone looked at a finished job: it leaves "Needs you" (until a retry ends it again).
    WrongState for a job that has not finished."""
    job = get_job(conn, resolve_job_id(conn, job_id), transcript=False)
    if job.status not in FINISHED_STATUSES:
        raise WrongState(f"job {job.id} is {job.status}: it has not finished")
    with _atomic(conn):
        conn.execute(MARK_REVIEWED, {"id": job.id})


def reply(conn: psycopg.Connection, job_id: uuid.UUID | str, prompt: str) -> Job:
    """Answer a finished claude job: queue a continuation of it with ``prompt`` (in the same
    session and directory, its worktree too, with its options), and mark the job reviewed.
    The new job; InvalidJob for an empty prompt, WrongState for a job that cannot be
    continued (see enqueue's continue_from)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidJob("a reply needs a prompt: what claude should do next")
    key = resolve_job_id(conn, job_id)
    with _atomic(conn):
        job = enqueue(conn, {"prompt": prompt}, continue_from=key)
        conn.execute(MARK_REVIEWED, {"id": key})
    return job


def discard(conn: psycopg.Connection, job_id: uuid.UUID | str) -> list[str]:
    """Throw away what a finished worktree job made, from the machine that has it: remove its
    worktree (uncommitted changes too) and delete its branch, and mark it reviewed. What it
    did, a line each. WrongState while a job needs the worktree (it, or one that continues
    it, is not over), or for one that has none here."""
    job, tree = _finished_worktree(conn, job_id, "discard")
    done = []
    with _atomic(conn):  # (no continuation of it is queued meanwhile: they take this lock too)
        _db_lock_worktree(conn, tree["path"])
        if _the_row(conn.execute(WORKTREE_BUSY, {"job": job.id, "path": tree["path"]}))[0]:
            raise WrongState(f"a job that continues job {job.id} needs its worktree: not discarded")
        _, common = _repository_of(tree["repo"])
        if Path(tree["path"]).is_dir():
            _git_retrying(common, tree["repo"], "worktree", "remove", "--force", tree["path"])
            done.append(f"removed worktree {tree['path']}")
        branch = f"refs/heads/{tree['branch']}"
        if _git_ok(tree["repo"], "rev-parse", "--verify", "--quiet", branch):
            _git_retrying(common, tree["repo"], "branch", "-D", tree["branch"])
            done.append(f"deleted branch {tree['branch']}")
        conn.execute(FORGET_WORKTREE, {"host": socket.gethostname(), "path": tree["path"]})
        conn.execute(MARK_REVIEWED, {"id": job.id})
        conn.execute(MARK_WORKTREE_REVIEWED, {"path": tree["path"]})
    return done or ["its worktree and branch were gone already"]


#: A file's diff is shown folded beyond this many lines, and cut beyond MAX_DIFF_LINES.
DIFF_FOLD_LINES, MAX_DIFF_LINES = 400, 5000


def _diff_path(header: str) -> str:
    """The path of a file in git's ``diff --git a/PATH b/PATH`` line (its new path when it was
    renamed; a name with " b/" in it is found when both paths are the same)."""
    rest = header.removeprefix("diff --git a/")
    half = (len(rest) - len(" b/")) // 2
    if rest[half : half + 3] == " b/" and rest[:half] == rest[half + 3 :]:
        return rest[:half]
    return rest.rpartition(" b/")[2]


def diff_files(diff: str) -> list[dict[str, Any]]:
    """A unified diff (worktree_diff's) as its files: path, lines added and removed, whether
    it is binary, its lines (cut at MAX_DIFF_LINES: ``cut`` says how many were left out) and
    whether to show it folded (a large one)."""
    files: list[dict[str, Any]] = []
    in_hunks = False  # (past a file's header: ---, +++ and the like are its lines)
    for line in diff.splitlines():
        if line.startswith("diff --git a/"):
            files.append({"path": _diff_path(line), "added": 0, "removed": 0, "binary": False,
                          "lines": [line], "cut": 0})  # fmt: skip
            in_hunks = False
            continue
        if not files:
            continue
        each = files[-1]
        in_hunks = in_hunks or line.startswith("@@")
        if not in_hunks and line.startswith("Binary files ") and line.endswith(" differ"):
            each["binary"] = True
        elif in_hunks and line.startswith("+"):
            each["added"] += 1
        elif in_hunks and line.startswith("-"):
            each["removed"] += 1
        if len(each["lines"]) < MAX_DIFF_LINES:
            each["lines"].append(line)
        else:
            each["cut"] += 1
    for each in files:
        each["folded"] = len(each["lines"]) > DIFF_FOLD_LINES
    return files


###############################################################################
# Queue API: notifications (whom a job tells when it ends: Standard Webhooks, Slack, Discord)
###############################################################################

TAKE_NOTIFICATIONS = """
-- take_notifications: the due notifications, each the oldest pending one of its subject and
-- URL (a job's are sent in order), leased for a while to this worker (one that dies while
-- sending leaves them to the others once it is found dead, see claude_jobs_release_sends, or
-- the lease ran out: at least once); another worker skips them
WITH due AS (
    SELECT n.id FROM claude_jobs_notifications n
    WHERE n.state = 'pending' AND n.next_at <= now()
      AND NOT EXISTS (SELECT FROM claude_jobs_notifications o
                      WHERE o.state = 'pending' AND o.subject = n.subject AND o.url = n.url
                        AND o.seq < n.seq)
    ORDER BY n.next_at, n.seq
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE claude_jobs_notifications n
SET next_at = now() + make_interval(secs => %(lease)s), attempts = n.attempts + 1,
    worker_id = %(worker_id)s
FROM due WHERE n.id = due.id
RETURNING n.id, n.seq, n.event, n.url, n.body::text AS body, n.attempts,
    extract(epoch FROM now() - n.created_at)::float8 AS age
"""

RELEASE_NOTIFICATIONS = """
-- release_notifications: taken, not sent (the worker stops, or their lease would run out
-- before it got to them): due again now, the try not counted
UPDATE claude_jobs_notifications
SET next_at = now(), worker_id = NULL, attempts = greatest(attempts - 1, 0)
WHERE id = ANY(%(ids)s::uuid[]) AND state = 'pending'
"""

NOTIFICATION_SENT = """
-- notification_sent: delivered (and counted)
WITH sent AS (
    UPDATE claude_jobs_notifications
    SET state = 'sent', sent_at = now(), last_error = NULL, worker_id = NULL
    WHERE id = %(id)s AND state = 'pending'
    RETURNING id
)
INSERT INTO claude_jobs_notification_counts AS c (outcome, count)
SELECT 'sent', count(*) FROM sent HAVING count(*) > 0
ON CONFLICT (outcome) DO UPDATE SET count = c.count + excluded.count
"""

NOTIFICATION_NOT_SENT = """
-- notification_not_sent: to be tried again after `delay` (state pending: `retried`), or
-- given up (failed; abandoned): counted
WITH not_sent AS (
    UPDATE claude_jobs_notifications
    SET state = %(state)s, last_error = %(error)s, worker_id = NULL,
        next_at = CASE WHEN %(state)s = 'pending'
                       THEN now() + make_interval(secs => %(delay)s) ELSE next_at END
    WHERE id = %(id)s AND state = 'pending'
    RETURNING state
)
INSERT INTO claude_jobs_notification_counts AS c (outcome, count)
SELECT CASE state WHEN 'pending' THEN 'retried' ELSE state END, 1 FROM not_sent
ON CONFLICT (outcome) DO UPDATE SET count = c.count + excluded.count
"""

NOTIFICATION_COUNTS = """
-- notification_counts: notifications ever sent, tried again, failed and abandoned; and those
-- pending now
SELECT outcome, count FROM claude_jobs_notification_counts
UNION ALL SELECT 'pending', count(*) FROM claude_jobs_notifications WHERE state = 'pending'
"""

_LIST_NOTIFICATIONS = """
-- list_notifications: those not delivered ({what}), newest first
SELECT id, event, subject, job_id, url, state, attempts, next_at, last_error, created_at
FROM claude_jobs_notifications WHERE {where}
ORDER BY created_at DESC, seq DESC LIMIT %(limit)s
"""
LIST_NOTIFICATIONS = _LIST_NOTIFICATIONS.format(
    what="pending, failed, abandoned", where="state <> 'sent'"
)
LIST_GIVEN_UP_NOTIFICATIONS = _LIST_NOTIFICATIONS.format(  # (through their index)
    what="failed, abandoned", where="state IN ('failed', 'abandoned')"
)

RETRY_NOTIFICATION = """
-- retry_notification: a failed or abandoned notification to be sent again now
UPDATE claude_jobs_notifications
SET state = 'pending', next_at = now(), attempts = 0, created_at = now()
WHERE id = %(id)s AND state IN ('failed', 'abandoned')
RETURNING id
"""


SET_PUBLIC_URL = """
-- set_public_url: where people reach the dashboard (links in notifications; NULL: nowhere)
WITH gone AS (
    DELETE FROM claude_jobs_settings WHERE name = 'public_url' AND %(url)s::text IS NULL
)
INSERT INTO claude_jobs_settings (name, value) SELECT 'public_url', %(url)s::text
WHERE %(url)s::text IS NOT NULL
ON CONFLICT (name) DO UPDATE SET value = excluded.value
"""


def set_public_url(conn: psycopg.Connection, url: str | None) -> None:
    """Where people reach the dashboard (`serve --public-url`): notifications link their job
    (or batch) there from now on; None: no links. InvalidJob for what is no http(s) URL."""
    if url is not None and (not _is_http_url(url) or urllib.parse.urlsplit(url).password):
        raise InvalidJob(f"--public-url {_without_credentials(url)!r}: not an http(s) URL "
                         "(without credentials)")  # fmt: skip
    with _atomic(conn):
        conn.execute(SET_PUBLIC_URL, {"url": url})


def _webhook_key() -> bytes | None:
    """The key that signs webhooks: CLAUDE_JOBS_WEBHOOK_SECRET, in Standard Webhooks'
    ``whsec_<base64>`` form (None: unsigned). ConfigError when it is not that."""
    secret = os.environ.get("CLAUDE_JOBS_WEBHOOK_SECRET", "").strip()
    if not secret:
        return None
    try:
        return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except ValueError:
        raise ConfigError(
            "CLAUDE_JOBS_WEBHOOK_SECRET must be whsec_ and base64 (as Standard Webhooks says)"
        ) from None


def _webhook_signature(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks' signature: v1, and the base64 HMAC-SHA256 of "id.timestamp.body"."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def _chat_message(url: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
    """A short message in the format of a Slack or Discord incoming webhook (known by its
    host), or None for any other URL (it gets the event as it is)."""
    parts = urllib.parse.urlsplit(url)
    data = body.get("data") or {}
    event = str(body.get("type", ""))
    if event.startswith("job."):
        text = f"claude-jobs: job {str(data.get('id'))[:8]} {event.removeprefix('job.')}"
    elif event == "batch.finished":
        counts = ", ".join(f"{n} {status}" for status, n in (data.get("jobs") or {}).items())
        text = f"claude-jobs: batch {data.get('name')} finished ({counts or 'no jobs'})"
    else:  # (hold.started, hold.ended, worker.unfit)
        where = f" on {data['host']}" if data.get("host") else ""
        text = f"claude-jobs: {event} for {data.get('kind')} jobs{where}"
    for name in ("prompt", "result", "error", "attention", "reason", "until", "cost_usd",
                 "pull_request", "url"):  # fmt: skip
        if data.get(name):
            text += f"\n{name}: {_cut(str(data[name]), 300)}"
    if parts.hostname == "hooks.slack.com":
        return {"text": text}
    if parts.hostname in ("discord.com", "discordapp.com") and "/api/webhooks/" in parts.path:
        return {"content": text}
    return None


def _send_notification(row: Mapping[str, Any], key: bytes | None) -> tuple[str, str | None, float]:
    """POST one notification; (what became of it: sent, pending or failed; the error; when to
    try again). 2xx is sent; a connection error, a timeout, 408, 429 and 5xx are tried again;
    other answers are not."""
    body = row["body"].encode()
    chat = _chat_message(row["url"], json.loads(row["body"]))
    headers = {"Content-Type": "application/json", "User-Agent": "claude-jobs"}
    if chat is not None:
        body = json.dumps(chat).encode()
    else:
        message_id, timestamp = f"msg_{row['id']}", int(time.time())
        headers.update({"webhook-id": message_id, "webhook-timestamp": str(timestamp)})
        if key is not None:
            headers["webhook-signature"] = _webhook_signature(key, message_id, timestamp, body)
    delay = min(NOTIFY_RETRY_FIRST * 2 ** (row["attempts"] - 1), NOTIFY_RETRY_MAX)
    delay *= 1 + random.random() / 10
    request = urllib.request.Request(row["url"], body, headers, method="POST")
    try:
        status, answer, _ = _exchange(request, NOTIFY_TIMEOUT)
    except (OSError, http.client.HTTPException, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        return "pending", _without_credentials(f"cannot reach it: {reason}"), delay
    if 200 <= status < 300:
        return "sent", None, 0.0
    said = f"it answered {status}"
    if status in (408, 429) or status >= 500:
        return "pending", said, max(delay, min(_retry_after(answer) or 0.0, NOTIFY_RETRY_MAX))
    return "failed", said + " (not tried again)", 0.0


def send_due_notifications(
    conn: psycopg.Connection,
    limit: int = 20,
    worker_id: uuid.UUID | None = None,
    stopping: Callable[[], bool] = lambda: False,
) -> int:
    """Send the notifications that are due (workers do it every second; several share the
    work, each notification taken by one), each job's in order; how many were tried. Signed
    with CLAUDE_JOBS_WEBHOOK_SECRET when it is set. A worker gives its id: those it takes are
    sent by the others as soon as it is found dead. Those not sent yet when ``stopping()``
    or when their lease would run out before an answer are given back, due at once."""
    key = _webhook_key()
    params = {"limit": limit, "lease": NOTIFY_LEASE, "worker_id": worker_id}
    with _atomic(conn), conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(TAKE_NOTIFICATIONS, params).fetchall()
    rows.sort(key=lambda row: row["seq"])  # (sent as they were written)
    deadline = time.monotonic() + NOTIFY_LEASE - NOTIFY_TIMEOUT - 1
    for done, row in enumerate(rows):
        if stopping() or time.monotonic() > deadline:
            with _atomic(conn):
                conn.execute(RELEASE_NOTIFICATIONS, {"ids": [r["id"] for r in rows[done:]]})
            return done
        state, error, delay = _send_notification(row, key)
        if state == "pending" and row["age"] + delay > NOTIFY_GIVE_UP:
            state, error = "abandoned", f"{error}; tried for {_duration_text(NOTIFY_GIVE_UP)}"
        with _atomic(conn):
            if state == "sent":
                conn.execute(NOTIFICATION_SENT, {"id": row["id"]})
            else:
                not_sent = {"id": row["id"], "state": state, "error": error, "delay": delay}
                conn.execute(NOTIFICATION_NOT_SENT, not_sent)
        if state != "sent":
            logger.info("notification %s of %s to %s: %s", row["id"], row["event"],
                        _without_credentials(row["url"]), error)  # fmt: skip
    return len(rows)


def notification_counts(conn: psycopg.Connection) -> dict[str, int]:
    """Notifications ever sent, retried (tries that failed and will be made again), failed and
    abandoned (counters: cleanup lowers none), and pending now."""
    counts = dict.fromkeys(("sent", "retried", "failed", "abandoned", "pending"), 0)
    counts.update(conn.execute(NOTIFICATION_COUNTS).fetchall())
    return counts


def list_notifications(
    conn: psycopg.Connection, limit: int = 100, *, given_up: bool = False
) -> list[dict[str, Any]]:
    """The notifications not delivered yet (pending, failed, abandoned; ``given_up``: failed
    and abandoned only), newest first, their URLs with credentials masked."""
    query = LIST_GIVEN_UP_NOTIFICATIONS if given_up else LIST_NOTIFICATIONS
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(query, {"limit": limit}).fetchall()
    return [{**row, "url": _without_credentials(row["url"])} for row in rows]


def retry_notification(conn: psycopg.Connection, notification_id: uuid.UUID | str) -> None:
    """Send a failed or abandoned notification again (NotFound if there is none such)."""
    try:
        key = uuid.UUID(str(notification_id))
    except ValueError:
        raise InvalidJob(f"{notification_id!r} is not a notification's id") from None
    with _atomic(conn):
        if conn.execute(RETRY_NOTIFICATION, {"id": key}).fetchone() is None:
            raise NotFound(f"no failed or abandoned notification {key}")


###############################################################################
# Queue API: schedules
###############################################################################


def _zone(name: str) -> zoneinfo.ZoneInfo:
    """The IANA time zone ``name``; InvalidJob for one there is no such zone."""
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidJob(
            f"unknown time zone {name!r}: give an IANA name such as Europe/Berlin or UTC"
        ) from None


def _cron(expression: str, start: datetime, *, reverse: bool = False) -> Iterator[datetime]:
    """The times of a five-field cron expression after ``start`` (before it, with
    ``reverse``), in ``start``'s zone: cronsim does the arithmetic, including the days when
    the clocks change (as Debian's cron: a time skipped runs when the clocks have moved on,
    a time repeated runs once)."""
    try:
        from cronsim import CronSim, CronSimError
    except ImportError:
        raise ConfigError(
            "cron schedules need cronsim: pip install 'claude-jobs[schedules]'"
        ) from None
    if len(expression.split()) != 5:
        raise InvalidJob(
            f"bad cron expression {expression!r}: give five fields, minute hour "
            "day-of-month month day-of-week (as 0 2 * * *)"
        )
    try:
        return iter(CronSim(expression, start, reverse=reverse))
    except (CronSimError, ValueError) as error:
        reason = str(error)
        raise InvalidJob(
            f"bad cron expression {expression!r}: {reason[:1].lower()}{reason[1:]}"
        ) from None


@dataclass(frozen=True)
class _Timing:
    """When a schedule's runs are due: the times of a cron expression in a time zone, or
    every so many seconds from a first due time. Pure arithmetic on given times (the
    database's clock, never this machine's)."""

    cron: str | None
    every: float | None
    zone: zoneinfo.ZoneInfo

    @classmethod
    def of(cls, cron: str | None, every: float | None, timezone: str) -> _Timing:
        """Checked: one of cron and every; InvalidJob for a bad expression or zone."""
        if (cron is None) == (every is None):
            raise InvalidJob("a schedule runs by --cron EXPRESSION or --every DURATION: give one")
        if every is not None and not 1 <= every <= MAX_DURATION:
            raise InvalidJob(f"--every must be from 1s up to ten years, not {every}")
        timing = cls(cron, every, _zone(timezone))
        if cron is not None:
            timing.next_after(datetime.now(UTC))  # (an expression that never fires fails now)
        return timing

    def next_after(self, moment: datetime, anchor: datetime | None = None) -> datetime:
        """The first due time after ``moment``; ``every``: one of anchor + n * every (the
        first after moment when there is no anchor)."""
        if self.cron is not None:
            try:
                return next(_cron(self.cron, moment.astimezone(self.zone))).astimezone(UTC)
            except StopIteration:
                raise InvalidJob(f"the cron expression {self.cron!r} never fires") from None
        assert self.every is not None
        if anchor is None:
            return moment + timedelta(seconds=self.every)
        steps = max(0, math.floor((moment - anchor).total_seconds() / self.every) + 1)
        return anchor + timedelta(seconds=steps * self.every)

    def due_until(self, first: datetime, now: datetime) -> tuple[list[datetime], int]:
        """The due times from ``first`` (itself one) up to ``now``: the latest
        CATCH_UP_LIMIT of them, oldest first, and how many there are (a cron schedule's
        count stops at MISSED_COUNT_LIMIT)."""
        if self.every is not None:
            count = math.floor((now - first).total_seconds() / self.every) + 1
            start = max(0, count - CATCH_UP_LIMIT)
            return [first + timedelta(seconds=n * self.every) for n in range(start, count)], count
        assert self.cron is not None
        times, count = [first], 1
        for moment in _cron(self.cron, first.astimezone(self.zone)):
            if moment > now or count >= MISSED_COUNT_LIMIT:
                break
            times.append(moment.astimezone(UTC))
            count += 1
            del times[:-CATCH_UP_LIMIT]
        if count >= MISSED_COUNT_LIMIT:  # (the latest ones, counting back from now)
            after_now = (now + timedelta(seconds=1)).astimezone(self.zone)  # (now included)
            back = (m.astimezone(UTC) for m in _cron(self.cron, after_now, reverse=True))
            times = sorted(itertools.islice((m for m in back if m <= now), CATCH_UP_LIMIT))
        return times, count


def _catching_up(
    policy: str, due: list[datetime], count: int, now: datetime
) -> tuple[list[datetime], str | None, datetime | None]:
    """Which of the due times a schedule fires now (``due``: the latest, oldest first;
    ``count``: how many there are), a note on those it leaves out, and the due time to
    record as missed when it fires none. A due time under SCHEDULE_GRACE old is only late;
    older ones were missed (no worker fired them) and the schedule's policy says what
    happens: "latest" fires one run for them all, "all" one for each (the latest
    CATCH_UP_LIMIT), "none" fires none of them."""
    earlier = count - 1
    many = f"{earlier:,}" + ("+" if count >= MISSED_COUNT_LIMIT else "")
    if policy == "all":
        dropped = count - len(due)
        note = f"{dropped:,}+ earlier due times dropped: at most {CATCH_UP_LIMIT} at once"
        return due, note if dropped else None, None
    latest = due[-1]
    if policy == "latest":
        return [latest], f"one run for {many} earlier due times missed" if earlier else None, None
    if (now - latest).total_seconds() <= SCHEDULE_GRACE:
        return [latest], f"{many} earlier due times missed, not run" if earlier else None, None
    return [], f"{count:,} due times missed, not run (--catch-up none)", latest


def _schedule_head(payload: Mapping[str, Any]) -> str | None:
    """The commit a claude schedule's job would start from: HEAD of its cwd's repository
    (a worktree job: its base); None where that cannot be read from here."""
    cwd = payload.get("cwd")
    if not cwd:
        return None
    ref = payload.get("base") or "HEAD" if payload.get("worktree") else "HEAD"
    try:
        return _git(cwd, "rev-parse", "--verify", "--end-of-options", f"{ref}^{{commit}}")
    except (_GitError, OSError):
        return None


def _schedule_columns(
    name: str,
    payload: Any,
    *,
    cron: str | None,
    every: float | timedelta | None,
    timezone: str,
    catch_up: str,
    overlap: str,
    only_if_changed: bool,
    base_dir: str | Path | None,
    settings: Mapping[str, Any],
) -> tuple[dict[str, Any], _Timing]:
    """The stored columns of a schedule, every part checked (InvalidJob says what is wrong),
    and its timing."""
    if not name or not name.strip() or len(name) > 200 or "\x00" in name:
        raise InvalidJob(f"invalid schedule name {name!r}: not empty, at most 200 characters")
    refused = sorted({"run_at", "delay", "after", "continue_from"} & set(settings))
    if refused:
        raise InvalidJob(f"a schedule's runs are due by its timing: not {', '.join(refused)}")
    if isinstance(every, timedelta):
        every = every.total_seconds()
    own = {"cron": (cron, str | None), "every": (every, float | None), "timezone": (timezone, str),
           "catch_up": (catch_up, str), "overlap": (overlap, str),
           "only_if_changed": (only_if_changed, bool)}  # fmt: skip
    for key, (value, hint) in own.items():
        _check_type(key, value, hint)
    timing = _Timing.of(cron, every, timezone)
    if catch_up not in CATCH_UPS:
        raise InvalidJob(f"--catch-up is one of {', '.join(CATCH_UPS)}, not {catch_up!r}")
    if overlap not in OVERLAPS:
        raise InvalidJob(f"--overlap is one of {', '.join(OVERLAPS)}, not {overlap!r}")
    options = _checked_options(settings, base_dir)
    prepared = _prepare(options.kind, payload, base_dir)
    options = dataclasses.replace(options, **prepared.settings)  # (the payload's keys win)
    _row(options, prepared)  # (what only a whole job can check: a unique key's window)
    if only_if_changed and not (
        options.kind == DEFAULT_KIND
        and prepared.payload.get("cwd")
        and _git_ok(prepared.payload["cwd"], "rev-parse", "--git-dir")
    ):
        raise InvalidJob("--only-if-changed is for claude jobs whose cwd is in a git repository")
    stored = dataclasses.asdict(options)
    for each in ("kind", "run_at", "after", "continue_from"):
        del stored[each]
    columns = {
        "name": name, "cron": cron, "every": every, "timezone": timezone, "kind": options.kind,
        "payload": prepared.text, "options": json.dumps(stored), "catch_up": catch_up,
        "overlap": overlap, "only_if_changed": only_if_changed,
    }  # fmt: skip
    return columns, timing


def _database_now(conn: psycopg.Connection) -> datetime:
    row = conn.execute(DATABASE_NOW).fetchone()
    assert row is not None
    return row[0]


def add_schedule(
    conn: psycopg.Connection,
    name: str,
    payload: Mapping[str, Any],
    *,
    cron: str | None = None,
    every: float | timedelta | None = None,
    timezone: str = "UTC",
    catch_up: str = "latest",
    overlap: str = "skip",
    only_if_changed: bool = False,
    base_dir: str | Path | None = None,
    **settings: Unpack[JobSettings],
) -> Schedule:
    """Add a schedule: a job of ``payload`` and ``settings`` (those of enqueue, but run_at,
    delay, after and continue_from) made at the times of ``cron`` (five fields, in
    ``timezone``) or ``every`` so many seconds (the first one from now). Workers fire it.

    ``catch_up``: what the first worker up after a time when none fired it does with the
    due times it missed: "latest" (one run), "all" (one each, up to CATCH_UP_LIMIT) or
    "none". ``overlap``: what a due time does while a run of it is still queued or running:
    "skip" it, "queue" one more (runs of a schedule without a concurrency key then get one
    of their own: they run one at a time), or "allow" it. ``only_if_changed``: a claude job's
    run is skipped while its repository's HEAD (a worktree job's base) is the commit it was
    at when the last successful run was fired. InvalidJob for anything wrong, WrongState if
    the name is taken."""
    columns, timing = _schedule_columns(
        name, payload, cron=cron, every=every, timezone=timezone, catch_up=catch_up,
        overlap=overlap, only_if_changed=only_if_changed, base_dir=base_dir, settings=settings,
    )  # fmt: skip
    columns["next_run_at"] = timing.next_after(_database_now(conn))
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(INSERT_SCHEDULE, columns).fetchone()
    if row is None:
        raise WrongState(f"a schedule named {name!r} exists: change it with `schedule edit`")
    return Schedule.from_row(row)


#: What edit_schedule may change besides the job's settings.
_SCHEDULE_SETTINGS = ("cron", "every", "timezone", "catch_up", "overlap", "only_if_changed")


def edit_schedule(
    conn: psycopg.Connection,
    name: str,
    *,
    payload: Mapping[str, Any] | None = None,
    base_dir: str | Path | None = None,
    **changes: Any,
) -> Schedule:
    """Change a schedule: a new ``payload`` (whole), and any of cron or every (one replaces
    the other), timezone, catch_up, overlap, only_if_changed and the job's settings (as
    add_schedule takes them; a None drops a setting). Checked as add_schedule checks; the
    next due time is computed again from now. JobNotFound-like NotFound if there is none."""
    with _atomic(conn), conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(LOCK_SCHEDULE, {"name": name}).fetchone()
        if row is None:
            raise NotFound(f"no schedule {name!r}")
        old = Schedule.from_row(row)
        values = {key: getattr(old, key) for key in _SCHEDULE_SETTINGS}
        if changes.get("cron") is not None:
            values["every"] = None
        if changes.get("every") is not None:
            values["cron"] = None
        values.update({key: changes.pop(key) for key in _SCHEDULE_SETTINGS if key in changes})
        settings = {**old.options, "kind": old.kind, **changes}
        settings = {key: value for key, value in settings.items() if value is not None}
        given = old.payload if payload is None else payload
        columns, timing = _schedule_columns(
            name, given, base_dir=base_dir, settings=settings, **values
        )
        columns["next_run_at"] = timing.next_after(row["now"])
        updated = cur.execute(UPDATE_SCHEDULE, columns).fetchone()
    assert updated is not None
    return Schedule.from_row(updated)


def get_schedule(conn: psycopg.Connection, name: str) -> Schedule:
    """One schedule, with its latest run; NotFound if there is none."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(GET_SCHEDULE, {"name": name}).fetchone()
    if row is None:
        raise NotFound(f"no schedule {name!r}")
    return Schedule.from_row(row)


def list_schedules(conn: psycopg.Connection) -> list[Schedule]:
    """Every schedule by name, each with its latest run."""
    with conn.cursor(row_factory=dict_row) as cur:
        return [Schedule.from_row(row) for row in cur.execute(LIST_SCHEDULES).fetchall()]


def schedule_runs(conn: psycopg.Connection, name: str, limit: int = 20) -> list[dict[str, Any]]:
    """A schedule's latest runs, newest first: due_at, job_id (None: it made none), outcome
    (enqueued, skipped, missed, manual), note, head, fired_at, fired_by, and its job's
    status, cost_usd and finished_at."""
    get_schedule(conn, name)
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(SCHEDULE_RUNS, {"name": name, "limit": limit}).fetchall()


def pause_schedule(conn: psycopg.Connection, name: str) -> None:
    """No run of it is fired until it is resumed."""
    if conn.execute(PAUSE_SCHEDULE, {"name": name}).fetchone() is None:
        raise NotFound(f"no schedule {name!r}")


def resume_schedule(conn: psycopg.Connection, name: str) -> Schedule:
    """Fire it again, from its next due time after now (what fell due while it was paused
    is not caught up)."""
    with _atomic(conn), conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(LOCK_SCHEDULE, {"name": name}).fetchone()
        if row is None:
            raise NotFound(f"no schedule {name!r}")
        schedule = Schedule.from_row(row)
        timing = _Timing.of(schedule.cron, schedule.every, schedule.timezone)
        next_run_at = timing.next_after(row["now"], anchor=schedule.next_run_at)
        cur.execute(RESUME_SCHEDULE, {"name": name, "next_run_at": next_run_at})
    return get_schedule(conn, name)


def remove_schedule(conn: psycopg.Connection, name: str) -> None:
    """Remove a schedule and its record of runs (the jobs it made stay)."""
    if conn.execute(REMOVE_SCHEDULE, {"name": name}).fetchone() is None:
        raise NotFound(f"no schedule {name!r}")


def run_schedule(conn: psycopg.Connection, name: str, *, by: str | None = None) -> Job:
    """One run of a schedule now, whatever its timing, overlap and only-if-changed say
    (`schedule run`): recorded among its runs as "manual"."""
    with _atomic(conn), conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(LOCK_SCHEDULE, {"name": name}).fetchone()
        if row is None:
            raise NotFound(f"no schedule {name!r}")
        schedule = Schedule.from_row(row)
        head = _schedule_head(schedule.payload) if schedule.only_if_changed else None
        run = _Run(schedule, row["now"], "manual", None, head, by or _worker_name())
        job = _fire_run(conn, run)
    assert job is not None
    return job


def fire_due_schedules(
    conn: psycopg.Connection, *, by: str | None = None, unfit: dict[str, float] | None = None
) -> list[Job]:
    """Fire the schedules that are due, each in a transaction of its own on an autocommit
    connection (as workers do every second; on another, each in a savepoint of the caller's
    transaction, for the caller to commit); ``by`` names who fires, the worker. The jobs
    made. A schedule another fires at the same moment is left to it; one that cannot be
    fired here (its cron needs cronsim, which is not installed) is left for another worker,
    with a warning, and tried again after JANITOR_INTERVAL (``unfit``: when each was left, on
    the monotonic clock)."""
    made: list[Job] = []
    unfit = {} if unfit is None else unfit
    for (name,) in conn.execute(DUE_SCHEDULES).fetchall():
        if time.monotonic() - unfit.get(name, -math.inf) < JANITOR_INTERVAL:
            continue
        try:
            made.extend(_fire_schedule(conn, name, by or _worker_name()))
        except (ConfigError, InvalidJob) as error:
            logger.warning("cannot fire schedule %s here (other workers may): %s", name, error)
            unfit[name] = time.monotonic()
    return made


#: The keys of a schedule in a `schedule sync` file besides its job's settings and payload.
_SYNC_PAYLOAD_KEYS = ("prompt", "cwd", "worktree", "base", "max_budget_usd")
_SYNC_DURATIONS = ("every", "timeout", "unique_for")


def _synced_schedule(name: str, entry: Any) -> tuple[Any, dict[str, Any]]:
    """The payload and add_schedule keywords of one schedule of a sync file (a TOML
    table: cron or every, timezone, catch_up, overlap, only_if_changed; the job's settings
    as enqueue's keywords; prompt, cwd, worktree, base, max_budget_usd and a payload table)."""
    if not isinstance(entry, dict):
        raise InvalidJob(f"give it as a table, [{name}]")
    entry = dict(entry)
    payload = entry.pop("payload", {})
    if not isinstance(payload, dict):
        raise InvalidJob("payload must be a table")
    payload = {**{key: entry.pop(key) for key in _SYNC_PAYLOAD_KEYS if key in entry}, **payload}
    for key in _SYNC_DURATIONS:
        if isinstance(entry.get(key), str):
            entry[key] = parse_duration(entry[key])
    allowed = {*_SCHEDULE_SETTINGS, *JobSettings.__annotations__} - {
        "run_at", "delay", "after", "continue_from"
    }  # fmt: skip
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise InvalidJob(
            f"unknown key {', '.join(unknown)} (allowed: "
            f"{', '.join(sorted(allowed | {'payload', *_SYNC_PAYLOAD_KEYS}))})"
        )
    return payload, entry


def sync_schedules(
    conn: psycopg.Connection,
    entries: Mapping[str, Any],
    *,
    base_dir: str | Path | None = None,
    prune: bool = False,
    dry_run: bool = False,
) -> list[tuple[str, str, list[str]]]:
    """Make the schedules match ``entries`` (name: table, as a `schedule sync` TOML file
    holds them; relative paths against ``base_dir``): add those missing, change those that
    differ, and with ``prune`` remove the rest; all or nothing (``dry_run``: nothing, only
    say). Returns (what, name, the fields that differ) for each: added, changed, unchanged,
    removed."""
    plan: list[tuple[str, str, list[str]]] = []
    with conn.transaction(force_rollback=dry_run), conn.cursor(row_factory=dict_row) as cur:
        now = _database_now(conn)
        existing = {schedule.name: schedule for schedule in list_schedules(conn)}
        for name, entry in entries.items():
            try:
                payload, settings = _synced_schedule(name, entry)
                columns, timing = _schedule_columns(
                    name, payload, base_dir=base_dir, **_schedule_keywords(settings)
                )
            except InvalidJob as error:
                raise InvalidJob(f"schedule {name!r}: {error}") from None
            columns["next_run_at"] = timing.next_after(now)
            old = existing.pop(name, None)
            if old is None:
                cur.execute(INSERT_SCHEDULE, columns)
                plan.append(("added", name, []))
                continue
            differ = [
                key for key in ("cron", "every", "timezone", "kind", "payload", "options",
                                "catch_up", "overlap", "only_if_changed")
                if (json.loads(columns[key]) if key in ("payload", "options") else columns[key])
                != getattr(old, key)
            ]  # fmt: skip
            if differ:
                cur.execute(UPDATE_SCHEDULE, columns)
            plan.append(("changed" if differ else "unchanged", name, differ))
        for name in existing if prune else ():
            cur.execute(REMOVE_SCHEDULE, {"name": name})
            plan.append(("removed", name, []))
    return plan


def _schedule_keywords(settings: dict[str, Any]) -> dict[str, Any]:
    """add_schedule's keywords of a schedule's settings: its own (with their defaults) and
    the job's (``settings``, what remains)."""
    own = {"cron": None, "every": None, "timezone": "UTC", "catch_up": "latest",
           "overlap": "skip", "only_if_changed": False}  # fmt: skip
    own.update({key: settings.pop(key) for key in _SCHEDULE_SETTINGS if key in settings})
    return {**own, "settings": settings}


@dataclass(frozen=True)
class _Run:
    """One due time of a schedule being fired: how, by whom, and what was seen of it."""

    schedule: Schedule
    due_at: datetime
    outcome: str  # enqueued, manual, skipped, missed
    note: str | None
    head: str | None
    by: str


def _fire_schedule(conn: psycopg.Connection, name: str, by: str) -> list[Job]:
    """Fire one due schedule: lock it (another worker firing it: leave it), the runs its
    catch-up policy says, and its next due time, in one transaction."""
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(LOCK_DUE_SCHEDULE, {"name": name}).fetchone()
        if row is None:
            return []
        schedule, now = Schedule.from_row(row), row["now"]
        timing = _Timing.of(schedule.cron, schedule.every, schedule.timezone)
        due, count = timing.due_until(schedule.next_run_at, now)
        fired, note, missed = _catching_up(schedule.catch_up, due, count, now)
        good = schedule.good_head
        if schedule.only_if_changed:
            found = cur.execute(LAST_SUCCESSFUL_HEAD, {"name": name}).fetchone()
            good = found["head"] if found else good
        made = []
        for due_at in fired:
            run = _Run(schedule, due_at, "enqueued", note, None, by)
            if job := _fire_run(conn, _checked_run(conn, run, good)):
                made.append(job)
        if missed is not None:
            _fire_run(conn, _Run(schedule, missed, "missed", note, None, by))
        next_run_at = timing.next_after(now, anchor=schedule.next_run_at)
        cur.execute(MOVE_SCHEDULE_ON, {"name": name, "next_run_at": next_run_at, "good_head": good})
    return made


def _checked_run(conn: psycopg.Connection, run: _Run, good: str | None) -> _Run:
    """A run, or the same run skipped: its schedule's previous run is still queued or
    running (--overlap skip), or its repository is where the last successful run found it
    (--only-if-changed)."""
    schedule = run.schedule
    if schedule.overlap == "skip":
        busy = conn.execute(UNFINISHED_RUN, {"name": schedule.name}).fetchone()
        if busy is not None:
            note = f"job {busy[0]}, a run before it, is still {busy[1]}"
            return dataclasses.replace(run, outcome="skipped", note=note)
    if not schedule.only_if_changed:
        return run
    head = _schedule_head(schedule.payload)
    if head is not None and head == good:
        note = f"unchanged: {schedule.payload['cwd']} is at {head[:12]}, as at the last success"
        return dataclasses.replace(run, outcome="skipped", note=note, head=head)
    return dataclasses.replace(run, head=head)


def _fire_run(conn: psycopg.Connection, run: _Run) -> Job | None:
    """Record a run of a schedule and, unless it is skipped or missed, make its job: in a
    savepoint, undone (None) if the due time was fired before (the key of a run is its
    schedule and due time)."""
    schedule = run.schedule
    params = {
        "schedule": schedule.name, "due_at": run.due_at, "outcome": run.outcome,
        "note": run.note, "head": run.head, "fired_by": run.by,
    }  # fmt: skip
    try:
        with conn.transaction():
            if conn.execute(RECORD_SCHEDULE_RUN, params).fetchone() is None:
                raise _FiredBefore
            if run.outcome not in ("enqueued", "manual"):
                return None
            job = _enqueue_run(conn, schedule, run.due_at)
            if job.duplicate:
                note = f"job {job.id} has the unique key {job.unique_key!r}"
                conn.execute(SET_RUN_JOB, {**params, "job_id": None, "outcome": "skipped",
                                           "note": note})  # fmt: skip
                return None
            conn.execute(SET_RUN_JOB, {**params, "job_id": job.id})
            return job
    except _FiredBefore:
        logger.warning("schedule %s: the run due %s was fired before", schedule.name, run.due_at)
        return None


class _FiredBefore(Exception):
    """A schedule's due time has a run already (its insert is undone)."""


def _enqueue_run(conn: psycopg.Connection, schedule: Schedule, due_at: datetime) -> Job:
    """The job of one run of a schedule, as it was checked when the schedule was stored
    (its paths are not looked at again: the worker firing it may be on another host)."""
    options = JobOptions(kind=schedule.kind, **schedule.options)
    prepared = _Prepared(schedule.payload, _payload_json(schedule.payload), {})
    if schedule.overlap == "queue" and _concurrency_key(options, prepared) is None:
        key = f"schedule {schedule.name}"  # (its runs, one at a time)
        options = dataclasses.replace(options, concurrency_key=key, concurrency_limit=1)
    chain = _Chain(None, None, False)
    return _enqueue_prepared(conn, options, prepared, chain, origin=(schedule.name, due_at))


###############################################################################
# Execution: what an attempt came to, and what a claude exit means
###############################################################################

#: Why a running attempt was told to stop.
STOP_SHUTDOWN = "shutdown"  # forced shutdown: the job goes back unspent
STOP_LOST = "lost"  # the claim is gone (or about to be): write nothing, someone else runs it
STOP_CANCEL = "cancel"  # `claude-jobs cancel`: the job ends cancelled


def backoff_delay(
    attempt: int, base: float = DEFAULT_BACKOFF_BASE, maximum: float = DEFAULT_BACKOFF_MAX
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based):
    ``min(base * 2^(attempt-1), maximum)`` plus up to 10% of that as jitter."""
    delay = min(base * 2.0 ** min(max(attempt, 1) - 1, 64), maximum)
    return delay + random.uniform(0, delay / 10)


def decide(
    job: Job,
    *,
    value: Any = None,
    error: BaseException | None = None,
    trace: str | None = None,
    stop: str | None = None,
    retry_delay: float = 0.0,
    jitter: float = 0.0,
) -> Outcome:
    """What an attempt of ``job`` came to, from what its handler returned (``value``) or
    raised (``error``, with its ``trace``), and why it was told to stop, if it was (``stop``):
    a lost claim writes nothing (but a usage limit or an unfit worker it met still has its
    effect on the worker); a cancel or a forced shutdown that interrupted it (or that it
    failed on) cancels it or puts it back unspent; Postpone puts it back unspent for later
    (a usage limit ``jitter`` seconds later still, and no worker starts the kind before the
    limit resets; WorkerUnfit: this worker backs off from the kind); JobFailed and any other
    exception fail the attempt (PermanentError for good) and it is retried after
    ``retry_delay``; a success shows the worker fit for the kind. A pure function: the
    worker's decision logic, tested without a database."""
    if isinstance(error, Postpone):
        run_at = None if error.run_at is None else _within_reach(error.run_at)
        said, effect, until = _storable(str(error)), None, None
        if isinstance(error, UsageLimitReached) and run_at is not None:
            effect, until = Effect.HOLD_EVERYWHERE, run_at
            run_at += timedelta(seconds=jitter)  # the workers waiting for it do not all start
        elif isinstance(error, WorkerUnfit):
            effect = Effect.BACK_OFF
        if stop == STOP_LOST:  # (nothing to write; what it says of the worker holds all the same)
            return Outcome(Verdict.ABANDONED, error=said, effect=effect, until=until)
        return Outcome(Verdict.RELEASED, error=said, run_at=run_at, quiet=True, effect=effect,
                       until=until)  # fmt: skip
    if stop == STOP_LOST:
        return Outcome(Verdict.ABANDONED)
    interrupted = isinstance(error, _Interrupted)
    if stop == STOP_CANCEL and error is not None:
        return Outcome(Verdict.CANCELLED)
    if interrupted or (stop == STOP_SHUTDOWN and error is not None):
        return Outcome(Verdict.RELEASED)
    if error is None:
        try:
            return Outcome(Verdict.SUCCEEDED, result=_to_json(value), effect=Effect.FIT)
        except ValueError as unstorable:
            error = PermanentError(str(unstorable))
    if isinstance(error, JobFailed):
        message, stored = str(error), error.result
    else:
        message, stored = f"{type(error).__name__}: {error}", None
    try:
        result = None if stored is None else _to_json(stored)
    except ValueError:
        result = None
    return Outcome(
        Verdict.FAILED,
        result=result,
        error=_storable(message),
        traceback=_storable(trace),
        permanent=isinstance(error, PermanentError),
        delay=retry_delay,
    )


def _within_reach(when: datetime) -> datetime:
    """A time a handler asked for (local time when it has no zone), brought within
    MAX_DURATION of now: a job is never put off into a time that cannot be stored or read."""
    now = datetime.now(UTC)
    try:
        when = when if when.tzinfo else when.astimezone()
    except (OverflowError, ValueError):
        return now
    return min(max(when, now), now + timedelta(seconds=MAX_DURATION))


#: What tells that claude cannot run on this worker at all, as it prints it, with what to tell
#: the operator: no job can succeed here until someone fixes the worker.
_UNFIT_CLAUDE_ERRORS = (
    (
        "Not logged in",
        "claude is not logged in: log in as the worker's user (run `claude`, then /login) "
        "or give the worker ANTHROPIC_API_KEY",
    ),
    ("Invalid API key", "claude's API key is invalid"),
    ("OAuth token has expired", "claude's login has expired: log in again"),
    ("Credit balance is too low", "the API account's credit balance is too low"),
    (
        "cannot be used with root/sudo privileges",
        "claude refuses --dangerously-skip-permissions as root: run the worker as a normal "
        "user, or set IS_SANDBOX=1 in its environment",
    ),
)
_MISSING_CLAUDE = (
    "claude executable not found: {!r} (install Claude Code, or point the worker's "
    "--claude-bin at it)"
)
_ROOT_REFUSAL = (
    "claude refuses --dangerously-skip-permissions as root, and this worker is running as root "
    "without IS_SANDBOX=1: run it as a normal user, or set IS_SANDBOX=1 in its environment"
)
_PERMANENT_CLAUDE_SUBTYPES = ("error_max_turns", "error_max_budget_usd")
#: What claude says when it has no session of that id here (resumed in another directory).
_NO_SESSION = "No conversation found with session ID"
#: What a claude session id may look like (claude's are UUIDs): one that does not is never
#: passed to --resume, where a value beginning with "-" would read as a flag.
_SESSION_ID = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,127}")
#: A subscription usage limit, as claude says it: "You've hit your 5-hour limit · resets Mar 17,
#: 2030, 5:46pm (UTC)", and in older versions "Claude AI usage limit reached|<epoch seconds>".
_USAGE_LIMIT_TEXT = re.compile(
    r"You(?:['\u2019]ve| have) hit your [^·\n]*limit"
    r"(?:\s*·\s*resets\s+(?:at\s+)?([^()\n]+?)\s*\(([^)\n]+)\))?"
)
_OLD_USAGE_LIMIT_TEXT = re.compile(r"Claude AI usage limit reached(?:\|(\d+))?")
_RESET_FORMATS = ("%b %d, %Y, %I:%M%p", "%b %d, %Y, %I%p", "%b %d, %I:%M%p", "%b %d, %I%p",
                  "%I:%M%p", "%I%p")  # fmt: skip
#: When claude gives no reset time for a usage limit, claude jobs wait this long.
USAGE_LIMIT_UNKNOWN_RESET = 1800.0
#: A reset given to the minute may have passed by this much when it is read: it means now,
#: not the same time tomorrow (or next year).
RESET_SLACK = timedelta(minutes=2)


def _reset_time(text: str, zone: str, now: datetime | None = None) -> datetime | None:
    """The moment a "resets ..." text means (the next one, when it gives no year or date)."""
    try:
        tz = zoneinfo.ZoneInfo(zone.strip())
    except (ValueError, zoneinfo.ZoneInfoNotFoundError):
        return None
    now = (now or datetime.now(UTC)).astimezone(tz)
    earliest = now - RESET_SLACK
    text = re.sub(r"\s*([ap]m)$", r"\1", " ".join(text.split()), flags=re.IGNORECASE)
    for form in _RESET_FORMATS:
        try:
            parsed = datetime.strptime(text, form)
        except ValueError:
            continue
        if "%Y" in form:
            return parsed.replace(tzinfo=tz)
        if "%b" in form:
            moment = parsed.replace(year=now.year, tzinfo=tz)
            return moment if moment > earliest else moment.replace(year=now.year + 1)
        moment = now.replace(hour=parsed.hour, minute=parsed.minute, second=0, microsecond=0)
        return moment if moment > earliest else moment + timedelta(days=1)
    return None


def _epoch(seconds: float) -> datetime | None:
    """An epoch time, in seconds or (when it is that large) milliseconds; None if absurd."""
    try:
        return datetime.fromtimestamp(seconds / 1000 if seconds > 1e11 else seconds, UTC)
    except (ValueError, OverflowError, OSError):
        return None


def _usage_limit(result: Mapping[str, Any], evidence: str, reset: float | None) -> Postpone | None:
    """A usage limit, if claude hit one (``reset``: from its rate_limit_event), with when it
    resets."""
    info = (result.get("api_error_params") or {}).get("rate_limit_info") or {}
    reset = reset or info.get("resetsAt")
    text, old = _USAGE_LIMIT_TEXT.search(evidence), _OLD_USAGE_LIMIT_TEXT.search(evidence)
    if not (reset or result.get("api_error") == "usage_limit_reached" or text or old):
        return None
    at = None
    if isinstance(reset, int | float) and not isinstance(reset, bool) and reset > 0:
        at = _epoch(reset)
    elif text and text.group(1):
        at = _reset_time(text.group(1), text.group(2))
    elif old and old.group(1):
        at = _epoch(int(old.group(1)))
    found = text or old
    said = found.group(0) if found else "usage limit reached"
    if at is None:
        at = datetime.now(UTC) + timedelta(seconds=USAGE_LIMIT_UNKNOWN_RESET)
        said += " (no reset time given)"
    return UsageLimitReached(f"{USAGE_LIMIT_NOTE}{said}", run_at=at)


def claude_outcome(
    ended: _ProcessExit,
    result: dict[str, Any] | None,
    plain: Sequence[str],
    rate_limit_reset: float | None = None,
    time_limit: float | None = None,
) -> Any:
    """The job's result from how claude ended (the whole of what a claude exit means, for
    decide to turn into an outcome): the CLI's result object on success (``time_limit``: the
    attempt's, for the error when it passed).

    Raises _Interrupted when it was stopped from outside (a shutdown, a cancel, a lost claim);
    UsageLimitReached when the subscription's usage limit was hit (``rate_limit_reset``: the
    resetsAt of a rejecting rate_limit_event); WorkerUnfit for what is wrong with the worker
    rather than the job (claude would not start, not logged in, a bad API key, no credit, the
    root refusal); PermanentError for what no retry can fix (a turn or budget limit, a session
    that is not there) and JobFailed for everything else (a timeout, its worker's lease that
    ran out, API errors, overload: retried with backoff).
    """
    if ended.cannot_run:
        raise WorkerUnfit(ended.cannot_run)
    ended.raise_if_stopped()
    said = (result or {}).get("result")
    said = said if isinstance(said, str) else ""
    errors = (result or {}).get("errors") or []
    detail = said or "; ".join(map(str, errors))
    if ended.timed_out:
        within = f" after {_duration_text(time_limit)}, its time limit" if time_limit else ""
        raise JobFailed(
            f"timed out{within}: claude and what it started were terminated", result=result
        )
    if ended.returncode == 0 and result is not None and result.get("is_error") is False:
        return result
    subtype = (result or {}).get("subtype")
    if subtype in _PERMANENT_CLAUDE_SUBTYPES:  # whatever limits it met on the way
        raise PermanentError(f"claude stopped: {subtype}: {detail}", result=result)
    evidence = "\n".join([said, ended.stderr, *plain])
    if _NO_SESSION in evidence:  # no retry can bring a session back
        found = evidence[evidence.index(_NO_SESSION) :].splitlines()[0]
        raise PermanentError(
            f"claude cannot resume the session: {found} (claude keeps sessions per "
            "directory and per machine)",
            result=result,
        )
    limit = _usage_limit(result or {}, evidence, rate_limit_reset)
    if limit is not None:
        limit.result = result
        raise limit
    for marker, explanation in _UNFIT_CLAUDE_ERRORS:
        if marker in evidence:
            raise WorkerUnfit(f"{explanation} (claude said: {marker})", result=result)
    if result is not None and detail:
        raise JobFailed(f"claude failed: {detail}", result=result)
    last_words = " ".join((ended.stderr.strip().splitlines() or plain or ["no output"])[-1:])
    if ended.returncode < 0:
        how = f"was killed by signal {-ended.returncode}"
    else:
        how = f"exited with status {ended.returncode}"
    raise JobFailed(f"claude {how} without a result: {last_words[:500]}", result=result)


class RunContext:
    """A running attempt as its handler sees it, through ``job.context``.

    ``stop`` is set when the handler must give up at once: a forced shutdown, or this worker
    lost (or is about to lose) its claim. ``deadline`` is the attempt's time limit on the
    ``time.monotonic()`` clock, or None. ``append_transcript`` and ``record`` only gather: the
    worker writes what they gathered twice a second and with the outcome, fenced on the
    claim, so a handler never waits for the database. ``batch_results``: for a batch's
    callback, the file (JSON Lines: see batch_results) of what each job of the batch came to.
    """

    def __init__(
        self,
        job_id: uuid.UUID,
        attempt: int = 1,
        claim: uuid.UUID | None = None,
        timeout: float | None = None,
        lease: Callable[[], float] | None = None,
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.claim = claim
        self._timeout = timeout
        self.deadline: float | None = None
        self.begin()
        self.stop = threading.Event()
        self.stop_reason: str | None = None
        self._lease = lease
        self._lock = threading.Lock()
        self._gathered = Progress()
        self.spent_usd = 0.0  # what this attempt has cost so far
        self.batch_results: Path | None = None
        # (a handler asks its worker to hold its kind on every worker: until when, and why)
        self.hold_after: tuple[datetime, str] | None = None

    def begin(self) -> None:
        """The attempt starts now (a job claimed ahead waited for a runner): its time limit
        runs from here."""
        self.deadline = time.monotonic() + self._timeout if self._timeout else None

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self.stop.set()

    def lease_deadline(self) -> float | None:
        """When the worker's claim on the job may pass to another worker unless renewed, on
        the CLOCK_BOOTTIME clock (None: never, outside a worker): by then, every process of
        the attempt must be gone."""
        return self._lease() if self._lease is not None else None

    def append_transcript(self, text: str) -> None:
        """Add output to the job's transcript (its last TRANSCRIPT_LIMIT characters are kept)."""
        self._gather(Progress(transcript=_storable(text)))

    def record(
        self,
        *,
        session_id: str | None = None,
        cost_usd: float | None = None,
        spend: Sequence[Spend] = (),
    ) -> None:
        """Note the claude session id, or a cost to add to the job's, and what was spent on
        which model (for the ledger)."""
        self.spent_usd += cost_usd or 0.0
        self._gather(
            Progress(session_id=_storable(session_id), cost_usd=cost_usd or 0.0, spend=tuple(spend))
        )

    def note_worktree(self, worktree: Mapping[str, Any]) -> None:
        """Note the git worktree and branch the job runs in."""
        self._gather(Progress(worktree=json.dumps(_storable(dict(worktree)))))

    def note_checks(self, state: Mapping[str, Any]) -> None:
        """Note where the job's checks are (see _Checks): a later attempt goes on from there."""
        self._gather(Progress(checks=json.dumps(_storable(dict(state)))))

    def note_delivery(self, delivery: Mapping[str, Any]) -> None:
        """Note what was delivered: the branch pushed, the pull request (see _deliver)."""
        self._gather(Progress(delivery=json.dumps(_storable(dict(delivery)))))

    def take_progress(self) -> Progress:
        """What was gathered since the last call (for the worker to write)."""
        with self._lock:
            gathered, self._gathered = self._gathered, Progress()
        return gathered

    def _gather(self, progress: Progress) -> None:
        with self._lock:
            self._gathered += progress


###############################################################################
# Execution: the claude handler, its supervisor and its worktrees
###############################################################################


@dataclass
class _ProcessExit:
    returncode: int
    stderr: str  # its tail
    timed_out: bool = False
    stopped: str | None = None  # the stop reason, when stopped from outside
    lease_ran_out: bool = False  # its supervisor ended it: the worker's lease ran out
    cannot_run: str | None = None  # its supervisor could not start it: why

    def raise_if_stopped(self) -> None:
        """Raise what the attempt comes to when the process was stopped from outside (a stop
        of the run context: _Interrupted) or by its supervisor as the lease ran out."""
        if self.stopped:
            raise _Interrupted(self.stopped)
        if self.lease_ran_out:  # (if the lease is truly lost, the watchdog says so too, and
            raise JobFailed(  # nothing is written: another worker may run the job now)
                "interrupted: no heartbeat of its worker reached the database in time, so its "
                "lease ran out and every process of the attempt was stopped"
            )


def _pipe(nonblocking_end: int) -> tuple[int, int]:
    """A pipe (read end, write end) whose end ``nonblocking_end`` (0 or 1) never blocks."""
    ends = os.pipe()
    os.set_blocking(ends[nonblocking_end], False)
    return ends


def _supervised(
    argv: Sequence[str],
    control: int,
    report: int,
    lease: float | None,
    grace: float,
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """``argv`` under a supervisor (see _SUPERVISOR) that reads its orders from the file
    descriptor ``control``, says why it ended early on ``report``, and gives the command (and
    only the command: a recovering worker finds an attempt's processes by them) ``env`` on top
    of its own environment; ``lease``: when the claim runs out unless renewed (None: never)."""
    python = sys.executable or shutil.which("python3") or "python3"
    deadline = "-" if lease is None else repr(lease)
    pairs = [f"{name}={value}" for name, value in (env or {}).items()]
    return [python, "-I", "-S", "-c", _SUPERVISOR, str(control), str(report), deadline,
            repr(grace), *pairs, "--", *argv]  # fmt: skip


def _run_process(
    argv: Sequence[str],
    *,
    cwd: str,
    env: Mapping[str, str],
    stdin: bytes,
    context: RunContext,
    on_line: Callable[[bytes], None],
    kill_grace: float,
    marks: Mapping[str, str] | None = None,
) -> _ProcessExit:
    """Run ``argv`` under a supervisor of its own (see _SUPERVISOR), without a shell, with
    ``env``, and ``marks`` on top for the command and its processes alone.

    ``stdin`` is written to the process and then closed; each stdout line goes to ``on_line``
    as it arrives. At the deadline, or when the context's stop is set, the supervisor stops
    every process of the attempt: SIGTERM, then SIGKILL after ``kill_grace`` seconds (at once
    when the claim is lost). It is told the context's lease as it is renewed, and ends the
    attempt by itself when the lease runs out or this process dies. When the command exits,
    whatever it left running is killed: no process of the job keeps running.
    """
    run = _SupervisedRun(argv, cwd, env, context, kill_grace, marks)
    return run.wait(stdin, _LineSplitter(on_line))


class _SupervisedRun:
    """One command under its supervisor (see _run_process): the pipes that steer the
    supervisor and hear from it, and the select loop that feeds the command's stdin and reads
    its output. Used by the one runner thread that runs the attempt."""

    def __init__(
        self,
        argv: Sequence[str],
        cwd: str,
        env: Mapping[str, str],
        context: RunContext,
        kill_grace: float,
        marks: Mapping[str, str] | None,
    ) -> None:
        self._context, self._kill_grace = context, kill_grace
        control, self._steer = _pipe(1)
        self._told, report = _pipe(0)
        self._lease = context.lease_deadline()
        try:
            self._process = subprocess.Popen(
                _supervised(argv, control, report, self._lease, kill_grace, marks),
                cwd=cwd,
                env=dict(env),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(control, report),
                start_new_session=True,  # away from the terminal's Ctrl-C and Ctrl-Z
            )
        except BaseException:
            os.close(self._steer)
            os.close(self._told)
            raise
        finally:
            os.close(control)
            os.close(report)
        self._result = _ProcessExit(returncode=0, stderr="")
        self._stopping: float | None = None  # when it was told to stop
        self._exited_at: float | None = None  # when the supervisor exited
        self._selector = selectors.DefaultSelector()
        self._pending = memoryview(b"")  # of stdin, still to write
        self._stderr_tail = bytearray()

    def wait(self, stdin: bytes, lines: _LineSplitter) -> _ProcessExit:
        """Write ``stdin``, feed stdout to ``lines`` and steer the supervisor until the
        output ends (or the supervisor is gone and something it lost holds the pipes)."""
        process, selector = self._process, self._selector
        assert process.stdin and process.stdout and process.stderr
        self._pending = memoryview(stdin)
        if self._pending:
            os.set_blocking(process.stdin.fileno(), False)
            selector.register(process.stdin, selectors.EVENT_WRITE)
        else:
            process.stdin.close()
        selector.register(process.stdout, selectors.EVENT_READ)
        selector.register(process.stderr, selectors.EVENT_READ)
        try:
            while selector.get_map() and self._steered(time.monotonic()):
                for key, _ in selector.select(timeout=0.1):
                    self._transfer(key, lines)
        finally:
            said = self._close()
        lines.flush()
        self._result.returncode = process.returncode
        self._result.stderr = _without_secrets(self._stderr_tail.decode("utf-8", "replace"))
        for line in said.splitlines():
            word, _, text = line.partition(" ")
            if word == "lease":
                self._result.lease_ran_out = True
            elif word == "cannot-run":
                self._result.cannot_run = text
        return self._result

    def _steered(self, now: float) -> bool:
        """Tell the supervisor what it must know (a stop, the timeout, a renewed lease);
        False when reading must stop: the command is gone but something holds its pipes."""
        context, result = self._context, self._result
        if self._stopping is None:
            if context.stop.is_set():
                result.stopped = context.stop_reason
                grace = 0.0 if context.stop_reason == STOP_LOST else FORCED_KILL_GRACE
                self._tell(f"stop {min(grace, self._kill_grace)}\n")
                self._stopping = now
            elif context.deadline is not None and now >= context.deadline:
                result.timed_out = True
                self._tell(f"stop {self._kill_grace}\n")
                self._stopping = now
        renewed = context.lease_deadline()
        if renewed is not None and renewed != self._lease:
            self._lease = renewed
            self._tell(f"lease {renewed!r}\n")
        if self._exited_at is None and self._process.poll() is not None:
            self._exited_at = now
        elif self._exited_at is not None and now - self._exited_at > 3.0:
            return False  # a process that escaped the supervisor holds our pipes
        elif self._stopping is not None and now - self._stopping > self._kill_grace + 30.0:
            with contextlib.suppress(OSError):  # the supervisor does not end: a last resort
                os.killpg(self._process.pid, signal.SIGKILL)
        return True

    def _transfer(self, key: selectors.SelectorKey, lines: _LineSplitter) -> None:
        """Write the next piece of stdin, or read what one of the outputs has."""
        stream = key.fileobj
        if stream is self._process.stdin:
            try:
                written = os.write(key.fd, self._pending[:65536])
            except BrokenPipeError:
                written = len(self._pending)  # it stopped reading; what it got, it got
            self._pending = self._pending[written:]
            if not self._pending:
                self._selector.unregister(stream)
                stream.close()
            return
        data = os.read(key.fd, 65536)
        if not data:
            self._selector.unregister(stream)
            stream.close()  # type: ignore[union-attr]  # (we register files, not descriptors)
        elif stream is self._process.stderr:
            self._stderr_tail = (self._stderr_tail + data)[-8192:]
        else:
            lines.feed(data)

    def _tell(self, order: str) -> None:
        with contextlib.suppress(OSError):  # gone, or (never, in practice) a full pipe
            os.write(self._steer, order.encode())

    def _close(self) -> str:
        """Close the pipes and wait for the supervisor; what it reported."""
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]  # (files, not descriptors)
        self._selector.close()
        os.close(self._steer)  # a supervisor still at work takes this as its worker gone: all die
        self._process.wait()
        said = ""
        with contextlib.suppress(OSError):
            said = os.read(self._told, 4096).decode("utf-8", "replace")
        os.close(self._told)
        return said


class _LineSplitter:
    """Cuts a byte stream into lines for ``on_line``, in time linear in its length however
    long a line is; a line longer than ``limit`` bytes is cut there (the rest is dropped)."""

    def __init__(self, on_line: Callable[[bytes], None], limit: int = MAX_OUTPUT_LINE) -> None:
        self._on_line = on_line
        self._limit = limit
        self._line = bytearray()
        self._dropped = 0  # bytes of the current line past the limit

    def feed(self, data: bytes) -> None:
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            self._add(data[start:end])
            self._emit()
            start = end + 1
        self._add(data[start:])

    def flush(self) -> None:
        if self._line or self._dropped:
            self._emit()

    def _add(self, piece: bytes) -> None:
        room = self._limit - len(self._line)
        self._line += piece[:room]
        self._dropped += max(0, len(piece) - room)

    def _emit(self) -> None:
        line = bytes(self._line)
        if self._dropped:
            line += f" … ({self._dropped:,} more bytes of this line not kept)".encode()
        self._line.clear()
        self._dropped = 0
        self._on_line(line)


class _ClaudeStream:
    """Reads claude's stream-json output as it comes: the transcript and session go to the
    run context as they arrive; the final result object is kept."""

    def __init__(self, context: RunContext) -> None:
        self.context = context
        self.session_id: str | None = None
        self.result: dict[str, Any] | None = None
        self.plain: list[str] = []  # lines that are not JSON (error messages, mostly)
        self.rate_limit_reset: float | None = None  # a usage limit was hit: when it resets
        self.warned: dict[str, Any] | None = None  # a window nearly used up (allowed_warning)

    def feed(self, raw: bytes) -> None:
        text = _without_secrets(raw.decode("utf-8", "replace").rstrip("\r"))
        self.context.append_transcript(_cut(text, TRANSCRIPT_LINE_LIMIT) + "\n")
        try:
            event = json.loads(text)
        except ValueError:
            if text.strip():
                self.plain = [*self.plain[-20:], _cut(text, 2000)]
            return
        if not isinstance(event, dict):
            return
        session_id = event.get("session_id")
        if (
            isinstance(session_id, str)
            and session_id != self.session_id
            and _SESSION_ID.fullmatch(session_id)
        ):
            self.session_id = session_id
            self.context.record(session_id=session_id)
        if event.get("type") == "rate_limit_event":
            info = event.get("rate_limit_info")
            info = info if isinstance(info, dict) else {}
            if info.get("status") == "rejected":
                self.rate_limit_reset = info.get("resetsAt") or self.rate_limit_reset
            elif info.get("status") == "allowed_warning" and isinstance(
                info.get("resetsAt"), int | float
            ):
                self.warned = info
        if event.get("type") == "result":
            self.result = event
            cost = event.get("total_cost_usd")
            if not (
                isinstance(cost, int | float) and not isinstance(cost, bool) and 0 < cost < 1e9
            ):
                cost = 0.0
            self.context.record(cost_usd=float(cost), spend=Spend.of_result(event))


def _headroom(info: Mapping[str, Any]) -> tuple[datetime, str]:
    """The hold of --leave-headroom after claude warned that a window of its usage is nearly
    used up (a rate_limit_event ``allowed_warning``): until the window resets, and why."""
    window = str(info.get("rateLimitType") or "usage").replace("_", "-")
    try:
        until = _within_reach(datetime.fromtimestamp(float(info["resetsAt"]), UTC))
    except (OverflowError, ValueError, OSError):  # (a reset no clock can hold: an hour)
        until = datetime.now(UTC) + timedelta(hours=1)
    return until, f"{HEADROOM_NOTE}claude's {window} window is nearly used up (allowed_warning)"


# -- git worktrees ------------------------------------------------------------------------------


@dataclass
class _Worktree:
    """The git worktree a job runs in, on a branch of its own."""

    repo: str  # the repository's top level
    common_dir: str  # its .git directory
    path: str
    branch: str
    base: str  # the commit the branch started from
    subdir: str  # where the job's cwd is within the repository
    fresh: bool = False  # its branch was made now, from the base (not found again)

    @property
    def cwd(self) -> str:
        return str(Path(self.path, self.subdir))

    def record(self, **more: Any) -> dict[str, Any]:
        return {"repo": self.repo, "path": self.path, "branch": self.branch, "base": self.base,
                **more}  # fmt: skip


def _open_worktree(job: Job, cwd: str, root: Path, resumed: Mapping[str, Any] | None) -> _Worktree:
    """Make (or find again) the job's worktree: a fresh one on a new branch from the base, or
    the one of the job it continues (its branch, at the same path, so that claude finds the
    session); a retry finds its own branch and goes on with it."""
    try:
        top, common = _repository_of(cwd)
    except _GitError:
        raise PermanentError(f'"worktree" needs a cwd inside a git repository: {cwd}') from None
    subdir = os.path.relpath(cwd, top)
    recorded = resumed or job.worktree  # a continuation's, or an earlier attempt's
    if recorded:
        try:
            recorded = _checked_record(recorded)
        except _GitError as error:
            raise PermanentError(str(error)) from None
        tree = _Worktree(top, common, recorded["path"], recorded["branch"], recorded["base"],
                         subdir)  # fmt: skip
    else:
        ref = job.payload.get("base", "HEAD")
        try:
            base = _commit_of(top, ref)
        except _GitError:
            raise PermanentError(f"the worktree's base is not a commit in {top}: {ref}") from None
        branch = _branch_name(job.id)
        path = root / f"{Path(top).name}-{branch.removeprefix('claude-jobs/')}"
        tree = _Worktree(top, common, str(path), branch, base, subdir)
    try:
        _git_retrying(common, top, "worktree", "prune")
        if Path(tree.path, ".git").exists():
            if _git(tree.path, "branch", "--show-current") != tree.branch:
                raise PermanentError(_off_its_branch(tree))
        elif _git_ok(top, "rev-parse", "--verify", "--quiet", f"refs/heads/{tree.branch}"):
            _git_retrying(common, top, "worktree", "add", tree.path, tree.branch)
        elif resumed:  # made again from the base, it would lack the work the session did
            raise PermanentError(
                f"the branch {tree.branch} of the job this one continues is gone from {top}"
            )
        else:
            _git_retrying(common, top, "worktree", "add", "-b", tree.branch, tree.path, tree.base)
            tree.fresh = True
    except _GitError as error:
        raise JobFailed(f"cannot make the worktree {tree.path}: {error}") from None
    if not Path(tree.cwd).is_dir():
        raise PermanentError(f"{subdir} is not in the worktree of {tree.branch} ({tree.path})")
    return tree


def _off_its_branch(tree: _Worktree) -> str:
    """Why a job cannot go on in its worktree, left off its branch by an earlier attempt (kept
    for what only it holds: see _close_worktree), and what to do."""
    left, earlier = "", ": an earlier attempt left it"
    if doing := _unfinished_operation(tree.path):
        left = f"{earlier} in the middle of {doing}"
    elif commits := _detached_commits(tree.path):
        left = f"{earlier} on a detached HEAD with {commits} commit(s) no branch holds"
    return (
        f"the worktree {tree.path} is not on the job's branch {tree.branch}{left}; finish or "
        f"undo that there and check out {tree.branch}, then retry the job"
    )


def _close_worktree(tree: _Worktree, keep: bool) -> dict[str, Any]:
    """What became of the worktree: its branch's new commits, and whether the directory was
    removed (never with what only it holds: uncommitted changes, commits of a detached HEAD,
    an operation half done; those stay for review, like the branch)."""
    try:
        commits = int(_git(tree.repo, "rev-list", "--count", f"{tree.base}..{tree.branch}"))
        dirty = bool(_git(tree.path, "status", "--porcelain"))
        held = dirty or bool(_detached_commits(tree.path) or _unfinished_operation(tree.path))
        if not (keep or held):
            _git_retrying(tree.common_dir, tree.repo, "worktree", "remove", tree.path)
    except (_GitError, WorkerUnfit, ValueError) as error:
        logger.warning("cannot tidy up the worktree %s: %s", tree.path, error)
        return tree.record()
    return tree.record(commits=commits, kept=keep or held, uncommitted=dirty)


# -- checks and their rounds of repair ----------------------------------------------------------


def _first_line(text: str) -> str:
    """The first line of ``text`` with something on it, cut short."""
    return next((_cut(line.strip(), 200) for line in text.splitlines() if line.strip()), "")


class _Checks:
    """A claude job's checks (payload "checks": shell commands) and its rounds of repair,
    as a state that is noted on the job as it moves, so that a later attempt (after a kill, a
    usage limit, a restart) goes on from the round it was in:

        {"phase": "checks" | "repair" | "passed" | "failed", "round": 0.., "rounds": N,
         "result": claude's result, "session": the claude session to resume for a repair,
         "runs": [{"round", "command", "status", "seconds", "failure"}...],
         "repair": {"command", "status", "output"} (while a repair is due)}

    Round 0 runs the checks after claude's own run; round k (1..N) is a repair (claude's
    session resumed with what failed) and the checks again. Checks run one after another and
    a round stops at the first that fails. A job that delivers its branch has what claude left
    uncommitted committed before each round (what is checked is what is pushed; what the
    checks make is not)."""

    def __init__(
        self,
        job: Job,
        cwd: str,
        env: Mapping[str, str],
        kill_grace: float,
        time_limit: float,
        fresh_tree: bool = False,
        commit: Callable[[], None] | None = None,
    ) -> None:
        self.commands: list[str] = list(job.payload.get("checks") or [])
        self._commit = commit  # what to do before each round's checks
        self.rounds: int = job.payload.get("check_rounds", DEFAULT_CHECK_ROUNDS)
        self._job, self._cwd, self._env = job, cwd, env
        self._kill_grace, self._time_limit = kill_grace, time_limit
        # An earlier attempt's state holds only where its work is: on this host (claude keeps
        # sessions per machine), and in its worktree, found again (not made afresh).
        state = job.checks or {}
        here = state.get("host") == socket.gethostname() and not fresh_tree
        going = state.get("phase") in ("checks", "repair", "passed")
        self.state: dict[str, Any] | None = dict(state) if here and going else None

    def begin(self, result: Any, context: RunContext) -> None:
        """claude's own run ended with ``result``: round 0 of the checks is next."""
        session = result.get("session_id") if isinstance(result, dict) else None
        self.state = {"phase": "checks", "round": 0, "rounds": self.rounds, "result": result,
                      "session": session or self._job.session_id, "runs": [],
                      "host": socket.gethostname()}  # fmt: skip
        context.note_checks(self.state)

    def run(self, context: RunContext) -> tuple[str, int] | None:
        """Run this round's checks in order; None when all passed, else the command that
        failed and its exit status (each run is noted, with its output in the transcript)."""
        state = self.state
        assert state is not None
        if self._commit is not None:
            self._commit()
        number = state["round"]
        state["runs"] = [run for run in state["runs"] if run["round"] < number]  # (run again)
        for command in self.commands:
            status, seconds, output = self._run_one(command, number, context)
            failure = _first_line(output) if status else None
            state["runs"].append({"round": number, "command": command, "status": status,
                                  "seconds": round(seconds, 3), "failure": failure})  # fmt: skip
            if status:
                state["repair"] = {"command": command, "status": status, "output": output}
                context.note_checks(state)
                return command, status
            context.note_checks(state)
        state.pop("repair", None)
        state["phase"] = "passed"
        context.note_checks(state)
        return None

    def repair_due(self, context: RunContext) -> bool:
        """After a failed round: whether a round of repair is left (noted as due), or the
        job fails (noted so)."""
        state = self.state
        assert state is not None
        if state["round"] >= self.rounds:
            state["phase"] = "failed"
            state.pop("repair", None)
            context.note_checks(state)
            return False
        state["round"] += 1
        state["phase"] = "repair"
        context.note_checks(state)
        return True

    def repair_prompt(self) -> str:
        """What claude is told in a round of repair: which check failed, how, and its output."""
        assert self.state is not None
        failed = self.state.get("repair") or {}
        listed = "\n".join(f"- `{command}`" for command in self.commands)
        return (
            f"A check of your work failed: the command `{failed.get('command')}` exited with "
            f"status {failed.get('status')}. The end of its output:\n\n```\n"
            f"{failed.get('output', '')}\n```\n\nFind the cause and fix it. When you are done, "
            f"every check runs again, in this order:\n{listed}\n"
        )

    def repaired(self, context: RunContext) -> None:
        """The round's repair ran: its checks are next."""
        assert self.state is not None
        self.state["phase"] = "checks"
        context.note_checks(self.state)

    def _run_one(self, command: str, number: int, context: RunContext) -> tuple[int, float, str]:
        """Run one check under a supervisor, as claude runs (its time limit, cancel,
        containment); its exit status (negative: killed by that signal), seconds, and the tail
        of its output (stdout and stderr together), which goes to the transcript too."""
        mark = {"type": "check", "round": number, "command": command}
        context.append_transcript(json.dumps({**mark, "event": "start"}) + "\n")
        tail = bytearray()

        def on_line(raw: bytes) -> None:
            tail.extend(raw[-CHECK_OUTPUT_LIMIT:] + b"\n")
            if len(tail) > 2 * CHECK_OUTPUT_LIMIT:
                del tail[:-CHECK_OUTPUT_LIMIT]
            text = _cut(raw.decode("utf-8", "replace").rstrip("\r"), TRANSCRIPT_LINE_LIMIT)
            line = {"type": "check_output", "line": _without_secrets(text)}
            context.append_transcript(json.dumps(line) + "\n")

        if not Path(self._cwd).is_dir():
            raise PermanentError(f"the check `{command}` cannot start: {self._cwd} is gone")
        started = time.monotonic()
        job = self._job
        try:
            ended = _run_process(
                ["/bin/sh", "-c", f"exec 2>&1\n{command}"],  # (its stderr with its stdout)
                cwd=self._cwd,
                env=self._env,
                stdin=b"",
                context=context,
                on_line=on_line,
                kill_grace=self._kill_grace,
                marks={"CLAUDE_JOBS_JOB_ID": str(job.id), "CLAUDE_JOBS_ATTEMPT": str(job.attempts)},
            )
        except OSError as error:
            raise PermanentError(
                f"the check `{command}` cannot start: {error.strerror or error}"
            ) from None
        seconds = time.monotonic() - started
        if ended.cannot_run:
            raise PermanentError(f"the check `{command}` cannot start: {ended.cannot_run}")
        ended.raise_if_stopped()
        if ended.timed_out:
            within = f" after {_duration_text(self._time_limit)}, its time limit"
            raise JobFailed(
                f"timed out{within}, in the check `{command}`: it and what it started were "
                "terminated"
            )
        output = _without_secrets(tail[-CHECK_OUTPUT_LIMIT:].decode("utf-8", "replace"))
        end = {**mark, "event": "end", "status": ended.returncode, "seconds": round(seconds, 3)}
        context.append_transcript(json.dumps(end) + "\n")
        return ended.returncode, seconds, output


# -- the claude handler -------------------------------------------------------------------------

#: Flags the worker sets itself, which --claude-arg may not.
_RESERVED_CLAUDE_FLAGS = frozenset(
    {"-p", "--print", "--output-format", "--input-format", "--verbose", "-r", "--resume",
     "-c", "--continue", "--session-id", "-w", "--worktree"}
)  # fmt: skip
_PAYLOAD_FLAGS = {flag: key for key, (_, flag) in CLAUDE_PAYLOAD.items() if flag}
_FLAG_SPELLINGS = {"--allowed-tools": "--allowedTools", "--disallowed-tools": "--disallowedTools"}


def _claude_arg_units(args: Sequence[str]) -> list[tuple[str | None, list[str]]]:
    """Worker-level claude arguments, grouped into (payload key or None, the arguments):
    ``--model opus`` and ``--model=opus`` both become ("model", [...]), which a job's own
    ``model`` replaces."""
    units: list[tuple[str | None, list[str]]] = []
    items = list(args)
    while items:
        item = items.pop(0)
        flag = _FLAG_SPELLINGS.get(item.split("=", 1)[0], item.split("=", 1)[0])
        if flag in _RESERVED_CLAUDE_FLAGS:
            raise ConfigError(f"--claude-arg {item}: the worker sets {flag} itself")
        key = _PAYLOAD_FLAGS.get(flag)
        if key is not None and "=" not in item:
            if not items or items[0].startswith("-"):
                raise ConfigError(f"--claude-arg {item} needs a value: --claude-arg={item}=VALUE")
            units.append((key, [item, items.pop(0)]))
        else:
            units.append((key, [item]))
    return units


def _flag_arguments(key: str, value: Any) -> list[str]:
    """A payload option as claude arguments."""
    flag = CLAUDE_PAYLOAD[key][1]
    assert flag is not None
    if isinstance(value, list):  # variadic: --allowedTools Read "Bash(git log:*)"
        return [flag, *map(str, value)]
    return [flag, str(value)]


class ClaudeHandler:
    """Runs claude jobs: ``claude -p --output-format stream-json --verbose`` (with
    ``--dangerously-skip-permissions`` unless a permission mode is given) in the job's cwd,
    without a shell, the prompt fed on stdin and then closed.

    The payload's options become claude's flags, after the worker's own ``claude_args`` (and
    ``model``), which they override. A continuation runs with ``--resume`` and the session of
    the job it continues; a ``worktree`` job in a git worktree of its own under
    ``worktree_dir``. The transcript and session id are saved as they arrive; the final result
    object is the job's result and its cost is added to the job. ``allow_dirs``, when given,
    confines jobs to those directory trees. ``max_starts`` caps the claude starts in a window
    across every worker of the database (--max-starts): over it, this worker starts no claude
    job until the window has room.
    """

    def __init__(
        self,
        claude_bin: str = DEFAULT_CLAUDE_BIN,
        *,
        default_timeout: float = DEFAULT_CLAUDE_TIMEOUT,
        allow_dirs: Sequence[str | Path] = (),
        claude_args: Sequence[str] = (),
        model: str | None = None,
        keep_worktrees: bool = False,
        worktree_dir: str | Path | None = None,
        kill_grace: float = KILL_GRACE,
        leave_headroom: bool = False,
        max_starts: Rate | str | None = None,
    ) -> None:
        self.claude_bin = claude_bin
        self.leave_headroom = leave_headroom
        self.max_starts = Rate.parse(max_starts) if isinstance(max_starts, str) else max_starts
        self.default_timeout = default_timeout
        self.allow_dirs = [Path(d).expanduser().resolve() for d in allow_dirs]
        self.defaults = _claude_arg_units([*claude_args, *(["--model", model] if model else [])])
        keys = [key for key, _ in self.defaults if key is not None]
        twice = sorted({key for key in keys if keys.count(key) > 1})
        if twice:
            flag = CLAUDE_PAYLOAD[twice[0]][1]
            raise ConfigError(f"the worker gives claude {flag} twice (--model, --claude-arg)")
        self.keep_worktrees = keep_worktrees
        self.worktree_dir = Path(worktree_dir or default_home() / "worktrees").expanduser()
        self.kill_grace = kill_grace

    def __call__(self, job: Job) -> Any:
        context = job.context or RunContext(job.id, job.attempts, job.claim)
        if context.deadline is None:
            context.deadline = time.monotonic() + (job.timeout or self.default_timeout)
        cwd = self._working_directory(job)
        executable = shutil.which(self.claude_bin)
        if executable is None:
            raise WorkerUnfit(_MISSING_CLAUDE.format(self.claude_bin))
        argv = [executable, *self.arguments(job)]
        sandbox = job.payload.get("env", {}).get("IS_SANDBOX", os.environ.get("IS_SANDBOX"))
        if SKIP_PERMISSIONS in argv and os.geteuid() == 0 and sandbox != "1":
            raise WorkerUnfit(_ROOT_REFUSAL)  # (claude would refuse it: not worth starting)
        tree = None
        if job.payload.get("worktree"):
            resumed = (job.resumes or {}).get("worktree")
            tree = _open_worktree(job, cwd, self.worktree_dir, resumed)
            context.note_worktree(tree.record())
            cwd = tree.cwd
        try:
            fresh = tree is not None and tree.fresh
            result, checks = self._checked(job, argv, cwd, context, fresh)
            if tree is not None and job.payload.get("push"):
                context.note_delivery(self._deliver_branch(job, tree, result, checks, context))
            return result
        finally:
            if tree is not None:
                context.note_worktree(_close_worktree(tree, self.keep_worktrees))

    def arguments(self, job: Job, session: str | None = None) -> list[str]:
        """claude's arguments for ``job`` (the prompt goes on stdin); ``session``: resume
        that one (a round of repair), not the one of the job it continues."""
        options = {key: job.payload[key] for key in _PAYLOAD_FLAGS.values() if key in job.payload}
        argv = list(CLAUDE_ARGS)
        if not any(key == "permission_mode" for key, _ in [*self.defaults, *options.items()]):
            argv.append(SKIP_PERMISSIONS)
        for key, arguments in self.defaults:
            if key not in options:
                argv += arguments
        for key, value in options.items():
            argv += _flag_arguments(key, value)
        if session is not None:
            if not _SESSION_ID.fullmatch(session):
                raise PermanentError(f"claude left no session to resume for a repair: {session}")
            argv += ["--resume", session]
        elif job.resumes is not None:
            session = job.resumes.get("session_id")
            if not session or not _SESSION_ID.fullmatch(session):
                raise PermanentError(f"job {job.resumes['id']} left no claude session to continue")
            argv += ["--resume", session]
        return argv

    @staticmethod
    def _deliver_branch(
        job: Job,
        tree: _Worktree,
        result: Any,
        checks: Mapping[str, Any] | None,
        context: RunContext,
    ) -> dict[str, Any]:
        """Deliver the branch of a worktree job that succeeded (see _deliver): on to the pull
        request of the job it continues, or its own, opened by an earlier attempt."""
        own = bool((job.delivery or {}).get("pr"))
        previous = job.delivery if own else (job.resumes or {}).get("delivery")
        return _deliver(
            job, tree.record(), result, checks, remote=job.payload["push"],
            pr=bool(job.payload.get("pr")), previous=previous, own=own,
            cost=job.cost_usd + context.spent_usd,  # (this attempt's is not written yet)
            stopped=lambda: context.stop_reason if context.stop.is_set() else None,
            sleep=context.stop.wait,
        )  # fmt: skip

    def _checked(
        self, job: Job, argv: list[str], cwd: str, context: RunContext, fresh_tree: bool = False
    ) -> tuple[Any, dict[str, Any] | None]:
        """claude's run, then the job's checks and rounds of repair, from where an earlier
        attempt left them (see _Checks); claude's result once every check passed, and the
        checks' state."""
        limit = job.timeout or self.default_timeout
        env = {**os.environ, **job.payload.get("env", {})}

        def commit() -> None:  # (before each round's checks, for a job that pushes)
            assert checks.state is not None
            with contextlib.suppress(_GitError):  # (the push will say what is wrong)
                _commit_leftovers(cwd, _pr_title(job, checks.state["result"]))

        pushes = bool(job.payload.get("push") and job.payload.get("worktree"))
        checks = _Checks(
            job, cwd, env, self.kill_grace, limit, fresh_tree, commit if pushes else None
        )
        if not checks.commands:
            return self._run(job, argv, cwd, context), None
        if checks.state is None:
            checks.begin(self._run(job, argv, cwd, context), context)
        assert checks.state is not None
        while checks.state["phase"] != "passed":
            if checks.state["phase"] == "repair":
                session = checks.state.get("session") or ""
                repair = [argv[0], *self.arguments(job, session=session)]
                prompt = checks.repair_prompt()
                self._run(job, repair, cwd, context, prompt, repair=checks.state["round"])
                checks.repaired(context)
            failed = checks.run(context)
            if failed is not None and not checks.repair_due(context):
                command, status = failed
                rounds = checks.rounds
                raise PermanentError(
                    f"checks failed after {rounds} round{'s' * (rounds != 1)}: {command} "
                    f"exited {status}"
                )
        return checks.state["result"], checks.state

    def _run(
        self,
        job: Job,
        argv: list[str],
        cwd: str,
        context: RunContext,
        prompt: str | None = None,
        repair: int | None = None,
    ) -> Any:
        """One run of claude (``prompt``: this one, not the job's own: round ``repair``)."""
        stream = _ClaudeStream(context)
        mark: dict[str, Any] = {
            "type": "claude_jobs", "attempt": job.attempts, "worker": _worker_name()
        }  # fmt: skip
        if repair is not None:
            mark["repair"] = repair
        context.append_transcript(json.dumps(mark) + "\n")
        env = {**os.environ, **job.payload.get("env", {})}
        if prompt is None:
            prompt = job.payload["prompt"]
            if context.batch_results is not None:  # (a batch's callback: where its outcome is)
                argv = [*argv, "--add-dir", str(context.batch_results.parent)]
                env["CLAUDE_JOBS_BATCH_RESULTS"] = str(context.batch_results)
                prompt += BATCH_RESULTS_NOTE.format(path=context.batch_results)
        try:
            ended = _run_process(
                argv,
                cwd=cwd,
                env=env,
                stdin=prompt.encode("utf-8"),
                context=context,
                on_line=stream.feed,
                kill_grace=self.kill_grace,
                marks={"CLAUDE_JOBS_JOB_ID": str(job.id), "CLAUDE_JOBS_ATTEMPT": str(job.attempts)},
            )
        except OSError as error:
            raise WorkerUnfit(f"cannot run {argv[0]}: {error.strerror or error}") from None
        limit = job.timeout or self.default_timeout
        if self.leave_headroom and stream.warned is not None:
            context.hold_after = _headroom(stream.warned)
        return claude_outcome(ended, stream.result, stream.plain, stream.rate_limit_reset, limit)

    def unfit(self) -> str | None:
        """Why no claude job can run on this worker at all, known before one comes: claude is
        missing."""
        if shutil.which(self.claude_bin) is None:
            return _MISSING_CLAUDE.format(self.claude_bin)
        return None

    def caveats(self) -> list[str]:
        """What keeps some claude jobs from running here, to say when the worker starts: as
        root without IS_SANDBOX=1, claude refuses to skip permissions (jobs with a permission
        mode, or IS_SANDBOX=1 in their env, run; the others go back, see __call__)."""
        skips = not any(key == "permission_mode" for key, _ in self.defaults)
        if skips and os.geteuid() == 0 and os.environ.get("IS_SANDBOX") != "1":
            return [
                "running as root without IS_SANDBOX=1: claude refuses to skip permissions as "
                "root, so only claude jobs with a permission_mode (or IS_SANDBOX=1 in their "
                "env) can run here; run the worker as a normal user, or set IS_SANDBOX=1"
            ]
        return []

    def _working_directory(self, job: Job) -> str:
        cwd = Path(job.payload.get("cwd") or os.getcwd())
        if not cwd.is_dir():
            raise PermanentError(f"the job's cwd is not a directory on this worker: {cwd}")
        resolved = cwd.resolve()
        if self.allow_dirs and not any(resolved.is_relative_to(d) for d in self.allow_dirs):
            allowed = ", ".join(map(str, self.allow_dirs))
            raise PermanentError(f"the job's cwd {resolved} is outside the allowed {allowed}")
        return str(resolved)


class ClaudePolicy:
    """What a worker asks about claude jobs besides running them (the worker's holds call
    it): whether the day's budget (``daily_budget_usd``) is spent, by the ledger; and how to
    show that this worker starts no claude job for a while (`workers` reads it)."""

    def __init__(self, daily_budget_usd: float | None = None) -> None:
        self.daily_budget_usd = daily_budget_usd

    @property
    def checks_each_start(self) -> bool:
        """With a budget, the day's spend is looked at again as each claude job starts: one
        that ended since this one was claimed may have spent the rest."""
        return self.daily_budget_usd is not None

    def held(self, conn: psycopg.Connection) -> tuple[float, str] | None:
        """(seconds, why) this worker starts no claude job: the day's budget is spent, until
        midnight UTC. None when it is not."""
        if self.daily_budget_usd is None:
            return None
        spent = _db_spent_today(conn)
        if spent < self.daily_budget_usd:
            return None
        now = datetime.now(UTC)
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
        reason = f"{BUDGET_NOTE}${self.daily_budget_usd:g} is spent ({_money(spent)})"
        return (midnight - now).total_seconds(), reason

    def show_hold(
        self, conn: psycopg.Connection, worker_id: uuid.UUID, until: datetime, reason: str
    ) -> None:
        """Show in `workers` that this worker starts no claude job until ``until``, and why."""
        _db_pause_worker_kind(conn, worker_id, until, reason)

    def show_lifted(self, conn: psycopg.Connection, worker_id: uuid.UUID, reason: str) -> None:
        """Show in `workers` that the hold of ``reason`` is over."""
        _db_unpause_worker_kind(conn, worker_id, reason)


@dataclass(frozen=True)
class ClaudeSettings:
    """How a worker runs claude: options of `claude-jobs worker` (and their CLAUDE_JOBS_*
    variables, built from these fields: see _flags), each a keyword of ClaudeHandler."""

    claude_bin: str = _option(DEFAULT_CLAUDE_BIN, "The claude executable.", env="CLAUDE_BIN")
    allow_dirs: tuple[str, ...] = _option(
        (),
        "Run claude jobs only in DIR or below (repeatable) [default: anywhere].",
        env="ALLOW_DIRS",
        flag="--allow-dir",
        multiple=True,
        type=click.Path(exists=True, file_okay=False),
        metavar="DIR",
    )
    claude_args: tuple[str, ...] = _option(
        (),
        "Give claude this argument (repeatable), e.g. --claude-arg=--max-turns=50; a job's "
        "own option of the same flag overrides it.",
        env="CLAUDE_ARGS",
        flag="--claude-arg",
        multiple=True,
        metavar="ARG",
    )
    model: str | None = _option(None, "claude's model, unless the job names one.", env="MODEL")
    keep_worktrees: bool = _option(
        False,
        "Keep the git worktrees of worktree jobs (their branches are always kept).",
        env="KEEP_WORKTREES",
        is_flag=True,
    )
    leave_headroom: bool = _option(
        False,
        "When claude warns that a window of its usage is nearly used up, start no claude job "
        "on any worker until it resets (running ones finish): the rest is left for people.",
        env="LEAVE_HEADROOM",
        is_flag=True,
    )
    max_starts: str | None = _option(
        None,
        "Start at most N claude jobs in any window of PERIOD, counting the starts of every "
        "worker of the database (N/PERIOD: 30/h, 100/5h, 1/10s); a cap known from experience "
        "of a subscription's limit.",
        env="MAX_STARTS",
        metavar="N/PERIOD",
        value="rate",
    )


def default_handlers(
    *,
    claude_bin: str = DEFAULT_CLAUDE_BIN,
    allow_dirs: Sequence[str | Path] = (),
    **claude_options: Any,
) -> dict[str, Handler]:
    """The handlers a worker runs by default: claude (``claude_options``: those of
    ClaudeHandler) and every registered Python kind."""
    claude = ClaudeHandler(claude_bin, allow_dirs=allow_dirs, **claude_options)
    return {**_registry, DEFAULT_KIND: claude}


###############################################################################
# Worker: what its parts share, and its session
###############################################################################

#: The clock of leases: unlike time.monotonic() on Linux, it keeps counting while the machine
#: sleeps, so a worker waking from suspend knows how long it was away.
_lease_clock: Callable[[], float] = (
    functools.partial(time.clock_gettime, time.CLOCK_BOOTTIME)
    if hasattr(time, "CLOCK_BOOTTIME")
    else time.monotonic
)


class _Backoff:
    """Delays for retrying: ``start`` doubling up to ``cap`` seconds, with jitter."""

    def __init__(self, start: float = 0.25, cap: float = 30.0) -> None:
        self.start, self.cap, self.failures = start, cap, 0

    def next(self) -> float:
        delay = min(self.start * 2 ** min(self.failures, 20), self.cap)
        self.failures += 1
        return delay * random.uniform(0.8, 1.0)

    def reset(self) -> None:
        self.failures = 0


class _Busy(Exception):
    """This worker's advisory lock is held elsewhere for a moment: try again shortly."""


def _log_job(event: str, job: Job, level: int = logging.INFO, **details: Any) -> None:
    """One log line per job event, with the job's id, queue, kind and attempt."""
    if not logger.isEnabledFor(level):
        return
    attempt = f"{job.attempts}/{job.max_attempts}"
    details = {k: v for k, v in details.items() if v is not None}
    text = f"job={job.id} queue={job.queue} kind={job.kind} attempt={attempt}"
    for name, value in details.items():
        text += f" {name}={_log_value(value)}"
    fields = {"event": event, "job": str(job.id), "queue": job.queue, "kind": job.kind}
    logger.log(
        level, "%s %s", event, text, extra={"fields": {**fields, "attempt": attempt, **details}}
    )


def _log_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if not text or " " in text else text


def _log_recovered(job: Mapping[str, Any]) -> None:
    _log_row(
        "recovered",
        job,
        attempt=f"{job['attempts']}/{job['max_attempts']}",
        from_worker=job["worker"],
        status=job["status"],
    )


def _log_row(event: str, job: Mapping[str, Any], **details: Any) -> None:
    """A warning about a job the worker does not run (a row it changed)."""
    fields = {"event": event, "job": str(job["id"]), "queue": job["queue"], "kind": job["kind"]}
    fields.update(details)
    text = " ".join(f"{k}={_log_value(v)}" for k, v in fields.items() if k != "event")
    logger.warning("%s %s", event, text, extra={"fields": fields})


def _clock_time(monotonic: float) -> str:
    """A time.monotonic() moment as a local wall-clock time."""
    return f"{datetime.now() + timedelta(seconds=monotonic - time.monotonic()):%Y-%m-%d %H:%M:%S}"


def _parse_queues(queues: str | Sequence[str]) -> tuple[str, ...]:
    names = [q.strip() for q in (queues.split(",") if isinstance(queues, str) else queues)]
    names = [q for q in names if q]
    if not names:
        raise ConfigError("no queue given: name queues, or use * for every queue")
    if "*" in names and len(names) > 1:
        raise ConfigError("* means every queue and cannot be combined with queue names")
    if len(set(names)) != len(names):
        raise ConfigError(f"a queue is named twice in {','.join(names)}")
    return tuple(names)


def _kill_leftovers(jobs: Iterable[Mapping[str, Any]]) -> int:
    """Kill the processes of this machine still running the interrupted attempts of these
    jobs (rows with id and attempts): found by the CLAUDE_JOBS_JOB_ID and CLAUDE_JOBS_ATTEMPT
    that claude passes down to every process it starts. The attempt's supervisor has killed
    them already, unless it was itself killed from outside: this is the second line. Matching
    the attempt spares a new attempt of the same job that a worker here may have started
    since."""
    wanted = [
        (
            f"CLAUDE_JOBS_JOB_ID={job['id']}".encode(),
            f"CLAUDE_JOBS_ATTEMPT={job['attempts']}".encode(),
        )
        for job in jobs
    ]
    if not wanted or not os.path.isdir("/proc"):
        return 0
    killed = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environment = set(Path(entry.path, "environ").read_bytes().split(b"\0"))
            if any(job_id in environment and attempt in environment for job_id, attempt in wanted):
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
        except OSError:
            continue  # gone, or not ours to read
    return killed


class _Pulse:
    """How the worker's long-lived parts fare: for each of their tasks, how many passes in a
    row failed and why (a task that always fails is not hidden by another of its part that
    goes through), and whether a part's thread died. Every part reports here; the heartbeat
    shows what is wrong in `workers`, and `health()` (so /readyz) reads it. One lock guards it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: (part, task): (passes failed in a row, why)
        self._failing: dict[tuple[str, str], tuple[int, str]] = {}
        self._dead: dict[str, str] = {}  # part: what ended its thread

    def passed(self, part: str, task: str = "") -> None:
        with self._lock:
            self._failing.pop((part, task), None)

    def failed(self, part: str, error: BaseException, task: str = "") -> int:
        """A pass of ``part``'s ``task`` failed; how many in a row have now."""
        with self._lock:
            count = self._failing.get((part, task), (0, ""))[0] + 1
            self._failing[part, task] = (count, _error_text(error))
        return count

    def died(self, part: str, error: BaseException) -> None:
        with self._lock:
            self._dead[part] = _error_text(error)

    def trouble(self) -> str | None:
        """What is wrong with the worker's parts, in a line: a part whose thread died, or that
        failed FAILING_PASSES passes in a row; None when nothing is."""
        with self._lock:
            said = [f"its {part} died ({why})" for part, why in sorted(self._dead.items())]
            said += [
                f"its {part} failed {count} passes in a row ({why})"
                for (part, _), (count, why) in sorted(self._failing.items())
                if count >= FAILING_PASSES
            ]
        return "; ".join(said) or None


def _worth_a_traceback(failures: int) -> bool:
    """Whether the ``failures``-th failure in a row of a part is logged with its traceback:
    the first few, then one in 60 (a pass a second fails, say, but the log is not flooded)."""
    return failures <= FAILING_PASSES or failures % 60 == 0


def _error_text(error: BaseException) -> str:
    """An exception in a few words: its class and its message's first line."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300]}" if text else type(error).__name__


def _given_back(job: Job) -> Outcome:
    """The outcome of an attempt that never ran its handler (held, refused a slot, claimed
    ahead and taken back, stopped before it began): back to the queue unspent, in its place,
    nothing said."""
    return Outcome(Verdict.RELEASED, run_at=job.run_at, quiet=True)


@dataclass
class _Attempt:
    """A claimed job this worker runs, from its claim until its outcome is written. Its
    runner sets ``outcome``; the dispatcher writes it."""

    job: Job
    context: RunContext
    started: float = field(default_factory=time.monotonic)  # handed over; then, begun
    outcome: Outcome | None = None
    begun: bool = False  # a runner took it (one claimed ahead waits until then)
    withdrawn: bool = False  # taken back before a runner took it: it goes back unspent


class _Book:
    """What the worker's threads share: the attempts it holds (claimed, outcome not written
    yet), how many of them are the runners' (running a handler, or claimed ahead and waiting
    for a runner), the finished ones waiting to be written, how long attempts took lately,
    and when the dispatcher should wake up. Every thread may use it; ``lock`` guards it all."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.wake = threading.Event()  # something for the dispatcher to do
        self._running: dict[uuid.UUID, _Attempt] = {}
        self._busy = 0  # attempts handed to the runners, not finished (nor withdrawn)
        self._finished: list[_Attempt] = []  # outcome decided, not yet written
        self._wakeups: list[float] = []  # heap of time.monotonic() times with jobs due
        self._pace: float | None = None  # how long attempts took lately (a moving average)

    def begin(self, attempt: _Attempt) -> None:
        """``attempt`` is handed to the runners (the next free one starts it)."""
        with self.lock:
            self._running[attempt.job.id] = attempt
            self._busy += 1

    def start(self, attempt: _Attempt) -> bool:
        """A runner takes ``attempt``: False if it was withdrawn meanwhile."""
        with self.lock:
            if attempt.withdrawn:
                return False
            attempt.begun = True
            attempt.started = time.monotonic()
        return True

    def withdraw(self, handed_before: float | None) -> list[_Attempt]:
        """Take back the attempts no runner took, of those handed before ``handed_before``
        (time.monotonic(); None: all of them)."""
        with self.lock:
            taken = [a for a in self._running.values()
                     if not (a.begun or a.withdrawn or a.outcome)
                     and (handed_before is None or a.started < handed_before)]  # fmt: skip
            for attempt in taken:
                attempt.withdrawn = True
                self._busy -= 1
            if taken and handed_before is not None:  # the runners are on longer jobs now
                self._pace = None
        return taken

    def ahead(self, concurrency: int) -> int:
        """How many jobs to claim beyond the free runners: as many again while attempts
        are quick (see CLAIM_AHEAD_BELOW), else none."""
        with self.lock:
            quick = self._pace is not None and self._pace < CLAIM_AHEAD_BELOW
        return concurrency if quick else 0

    def finish(self, attempt: _Attempt) -> None:
        """A runner is done with ``attempt``: its outcome is for the dispatcher to write (or,
        with none, it is forgotten: nothing may be written)."""
        took = time.monotonic() - attempt.started
        with self.lock:
            self._busy -= 1
            self._pace = took if self._pace is None else 0.8 * self._pace + 0.2 * took
            if attempt.outcome is None or attempt.outcome.verdict == Verdict.ABANDONED:
                self._forget(attempt)
            else:
                self._finished.append(attempt)
        self.wake.set()

    def take_finished(self, limit: int = RECORD_BATCH) -> list[_Attempt]:
        with self.lock:
            taken, self._finished = self._finished[:limit], self._finished[limit:]
        return taken

    def give_back(self, attempts: Sequence[_Attempt]) -> None:
        """Outcomes that could not be written yet: first in line for the next round."""
        with self.lock:
            self._finished[:0] = attempts

    def forget(self, attempt: _Attempt) -> None:
        with self.lock:
            self._forget(attempt)

    def _forget(self, attempt: _Attempt) -> None:
        """(Only this attempt: its job, given back, may have been claimed again since, by the
        round that wrote this one's outcome.)"""
        if self._running.get(attempt.job.id) is attempt:
            del self._running[attempt.job.id]

    def attempts(self) -> list[_Attempt]:
        with self.lock:
            return list(self._running.values())

    def get(self, job_id: uuid.UUID) -> _Attempt | None:
        with self.lock:
            return self._running.get(job_id)

    def knows(self, job_id: uuid.UUID) -> bool:
        with self.lock:
            return job_id in self._running

    def counts(self) -> tuple[int, int, int]:
        """(held, the runners' (running or waiting for a runner), finished and not written)."""
        with self.lock:
            return len(self._running), self._busy, len(self._finished)

    def wake_in(self, seconds: float) -> None:
        with self.lock:
            heapq.heappush(self._wakeups, time.monotonic() + min(seconds, MAX_DURATION))
        self.wake.set()  # the dispatcher recomputes its wait

    def idle_wait(self, until: float) -> float:
        """Seconds to wait: until ``until`` (time.monotonic()), or sooner when a known job
        becomes due."""
        with self.lock:
            now = time.monotonic()
            while self._wakeups and self._wakeups[0] <= now:
                heapq.heappop(self._wakeups)
            due = self._wakeups[0] if self._wakeups else until
        return max(0.0, min(until, due) - now)


@dataclass(frozen=True)
class _Hold:
    """A kind this worker alone starts no job of, until a time (time.monotonic()): a back-off
    because it cannot run them (``unfit``), or a policy's hold (a daily budget spent)."""

    until: float
    why: str
    unfit: bool
    since: float = field(default_factory=time.monotonic)


class _Holds:
    """Which kinds of job this worker may start now. A kind is held on every worker until a
    time (a usage limit: one row per kind in the database, learned at every poll and on
    NOTIFY), or on this worker alone (a _Hold): it is unfit for the kind (a back-off of 5
    minutes, doubling to an hour while it stays unfit), or a handler's policy holds it
    (claude's daily budget). An unfit worker's back-off is one thing, shown in `workers` (the
    worker's row, which `show` reads too) and lifted as one: by a job of the kind that
    succeeds here, or by `resume --hold` (heard by NOTIFY, or seen in the row at a poll). Any
    thread may ask and tell; one lock guards it all."""

    def __init__(
        self,
        kinds: Iterable[str],
        policies: Mapping[str, ClaudePolicy],
        worker_id: Callable[[], uuid.UUID | None],
    ) -> None:
        self.kinds = sorted(kinds)
        self._policies = policies  # kind: what else decides its holds (see ClaudePolicy)
        self._worker_id = worker_id
        self._lock = threading.Lock()
        self._everywhere: dict[str, tuple[float, str]] = {}  # kind: (until, why), monotonic
        self._here: dict[str, _Hold] = {}
        self._unfit_for = UNFIT_BACKOFF[0]  # the next back-off
        self.changed = True  # learn them again at the next round (any thread may set it)

    def may_start(self, kind: str) -> bool:
        """Whether this worker may start a ``kind`` job now."""
        now = time.monotonic()
        with self._lock:
            return not self._held(kind, now)

    def startable(self) -> list[str]:
        """The kinds this worker may start now."""
        now = time.monotonic()
        with self._lock:
            return [kind for kind in self.kinds if not self._held(kind, now)]

    def _held(self, kind: str, now: float) -> bool:
        """(Under the lock.) Whether ``kind`` is held at ``now``, everywhere or here."""
        everywhere, here = self._everywhere.get(kind), self._here.get(kind)
        return (everywhere is not None and everywhere[0] > now) or (
            here is not None and here.until > now
        )

    def unfit(self) -> dict[str, str]:
        """The kinds this worker cannot run, and why (until one runs, or is lifted)."""
        with self._lock:
            return {kind: hold.why for kind, hold in self._here.items() if hold.unfit}

    def learn(
        self, conn: psycopg.Connection
    ) -> tuple[list[tuple[str, float, str]], list[tuple[str, float, str]]]:
        """Learn the holds on every worker, and ask the policies (a budget spent); see whether
        someone lifted this worker's back-off while its notice was missed. Returns the holds
        on every worker that are new or longer, (kind, until, why), to be logged and woken up
        for, and the policies' holds of this worker, (kind, seconds, why)."""
        self.changed = False
        rows = _db_holds(conn)
        own = [(kind, *hold) for kind, policy in self._policies.items()
               if (hold := policy.held(conn)) is not None]  # fmt: skip
        now = time.monotonic()
        held = {kind: (now + remaining, reason) for kind, _, remaining, reason in rows}
        with self._lock:
            known = {k: t for k, (t, _) in self._everywhere.items() if t > now}
            self._everywhere = held
            shown = [kind for kind, hold in self._here.items()
                     if hold.unfit and hold.until > now and now - hold.since > LIFT_SEEN_AFTER
                     and kind in self._policies]  # fmt: skip
        worker_id = self._worker_id()
        if shown and worker_id is not None and not _db_worker_paused(conn, worker_id):
            for kind in shown:  # (lifted in its row: `resume --hold`, its notice missed)
                if self.refit(kind):
                    logger.info("this worker tries %s jobs again (its back-off was lifted)", kind,
                                extra={"fields": {"event": "refit", "kind": kind}})  # fmt: skip
        fresh = [(kind, until, why) for kind, (until, why) in held.items()
                 if abs(until - known.get(kind, 0.0)) > 1.0]  # fmt: skip
        return fresh, own

    def hold_everywhere(self, conn: psycopg.Connection | None, kind: str, until: datetime,
                        reason: str) -> float:  # fmt: skip
        """No worker starts ``kind`` jobs before ``until``: the others learn it by NOTIFY (or
        at their next poll; without ``conn``, from their own jobs), this one at once. Returns
        when, on the time.monotonic() clock."""
        if conn is not None:
            _db_set_hold(conn, kind, until, reason)
        when = time.monotonic() + (until - datetime.now(UTC)).total_seconds()
        with self._lock:
            self._everywhere[kind] = (when, reason)
        return when

    def back_off(self, kind: str) -> float | None:
        """This worker is unfit for ``kind`` jobs: the seconds it should start none for (None
        when it backs off already)."""
        with self._lock:
            hold = self._here.get(kind)
            if hold is not None and hold.unfit and hold.until > time.monotonic():
                return None
            seconds, self._unfit_for = self._unfit_for, min(self._unfit_for * 2, UNFIT_BACKOFF[1])
        return seconds

    def hold_here(self, conn: psycopg.Connection | None, kind: str, seconds: float,
                  reason: str, unfit: bool = False) -> bool:  # fmt: skip
        """This worker starts no ``kind`` job for ``seconds`` (``unfit``: it cannot run them),
        and its policy may show it (`workers`); False when it was held as long already."""
        now = time.monotonic()
        with self._lock:
            held = self._here.get(kind)
            if held is not None and held.until > now and held.until >= now + seconds - 1:
                return False
            self._here[kind] = _Hold(now + seconds, reason, unfit)
        policy, worker_id = self._policies.get(kind), self._worker_id()
        if policy is not None and conn is not None and worker_id is not None:
            until = datetime.now(UTC) + timedelta(seconds=seconds)
            policy.show_hold(conn, worker_id, until, reason)
        return True

    def refit(self, kind: str) -> str | None:
        """This worker may run ``kind`` jobs after all (one ran, or someone lifted its
        back-off): its back-off ends (a policy's hold stays). Why it was unfit, if it was."""
        with self._lock:
            hold = self._here.get(kind)
            if hold is None or not hold.unfit:
                return None
            del self._here[kind]
            self._unfit_for = UNFIT_BACKOFF[0]
        return hold.why


class _Shared:
    """What the worker's parts share, handed to each of them (so its constructor shows what it
    may touch): the worker's settings, name and host; the book, the holds and the pulse, each
    behind a lock of its own; the events of its life (``stop``: claim no more; ``force``: stop
    the running jobs too; ``closed``: the parts' loops end); its pool and session once they
    exist; the threads it started; and what a part may ask of the worker as a whole: start a
    thread, hold a kind here or lift that, fence a lease, drain. The Worker makes it."""

    def __init__(
        self,
        settings: WorkerSettings,
        conninfo: str,
        kinds: Iterable[str],
        policies: Mapping[str, ClaudePolicy],
    ) -> None:
        self.settings = settings
        self.conninfo = conninfo
        self.host = socket.gethostname()
        self.name = _worker_name()
        self.policies = policies
        self.book = _Book()
        self.pulse = _Pulse()
        self.holds = _Holds(kinds, policies, self.worker_id)
        self.stop = threading.Event()  # claim no more
        self.force = threading.Event()  # stop the running jobs too
        self.closed = threading.Event()  # the worker closes: the parts' loops end
        self.pool: ConnectionPool | None = None
        self.session: _Session | None = None
        self.threads: list[threading.Thread] = []

    def worker_id(self) -> uuid.UUID | None:
        """The worker's current registration, once connected."""
        return self.session.worker_id if self.session else None

    def spawn(self, target: Callable[[], None], name: str) -> None:
        """Start a thread of the worker; should it end by an error, the pulse says it died."""

        def run() -> None:
            try:
                target()
            except BaseException as error:
                logger.exception("the worker's thread %s stopped", name)
                self.pulse.died(name.removeprefix("claude-jobs-"), error)

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def hold_here(self, kind: str, seconds: float, reason: str, unfit: bool = False) -> None:
        """This worker starts no ``kind`` job for ``seconds`` (``unfit``: it cannot run them);
        say so (`workers` too)."""
        assert self.pool is not None
        held = False
        with contextlib.suppress(*_TRANSIENT), self.pool.connection() as conn:
            held = self.holds.hold_here(conn, kind, seconds, reason, unfit)
        if not held and not self.holds.hold_here(None, kind, seconds, reason, unfit):
            return
        logger.warning(
            "this worker starts no %s job until %s: %s",
            kind,
            _clock_time(time.monotonic() + seconds),
            reason,
            extra={"fields": {"event": "paused", "kind": kind, "reason": reason}},
        )
        self.book.wake_in(seconds)

    def lift_hold_here(self, kind: str, reason: str) -> None:
        """This worker's back-off from ``kind`` (for ``reason``) is over: `workers` says so."""
        assert self.pool is not None
        policy, worker_id = self.policies.get(kind), self.worker_id()
        if policy is not None and worker_id is not None:
            with contextlib.suppress(*_TRANSIENT), self.pool.connection() as conn:
                policy.show_lifted(conn, worker_id, reason)
        logger.info(
            "this worker runs %s jobs again", kind,
            extra={"fields": {"event": "refit", "kind": kind}},
        )  # fmt: skip

    def fence(self, epoch: int, why: str) -> None:
        """End the lease ``epoch`` and stop every job claimed under it, now: other workers
        may run them from here on."""
        assert self.session is not None
        with self.session.lease_lock:
            if not self.session.end_lease(epoch):
                return
            attempts = self.book.attempts()
        for attempt in attempts:
            attempt.context.request_stop(STOP_LOST)
        logger.error(
            "%s: stopped %d running job(s), which other workers may run now",
            why,
            len(attempts),
            extra={"fields": {"event": "lease lost", "jobs": len(attempts)}},
        )

    def request_stop(self, force: bool = False) -> None:
        """Claim no more and let running jobs finish; with ``force``, stop them now too."""
        self.stop.set()
        if force:
            self.force.set()
        self.book.wake.set()

    def drain(self) -> None:
        """Asked to drain (`claude-jobs drain`): claim no more, and exit once the running jobs
        end."""
        if not self.stop.is_set():
            logger.warning(
                "asked to drain: claiming no more jobs; exiting once the running ones end",
                extra={"fields": {"event": "draining"}},
            )
        self.request_stop()


class _Writer:
    """Writes what attempts produce: outcomes and progress, in one record statement per round
    (RECORD, which also keeps what outlives the jobs: spend, worktrees), sent in one pipeline
    with the claim that refills the runners: one round trip, one implicit transaction (no
    transaction stays open while this process runs Python, so a worker frozen between two
    rounds holds no lock). What the database refuses is written alone, and becomes a failure
    saying why. Not a thread: the dispatcher calls it. It owns the progress taken from running
    attempts and not written yet."""

    def __init__(self, host: str) -> None:
        self.host = host
        self._unsaved: dict[uuid.UUID, Progress] = {}

    def round(
        self,
        conn: psycopg.Connection,
        finished: Sequence[_Attempt],
        running: Sequence[_Attempt],
        claim: Callable[[psycopg.Connection], psycopg.Cursor[dict[str, Any]]] | None,
    ) -> tuple[dict[uuid.UUID, str | None], list[dict[str, Any]]]:
        """Write the outcomes of ``finished`` and the progress of ``running`` (those that
        have any), and ``claim``, together. Returns the new status of each finished job (""
        for one an earlier write whose reply was lost had written, None for one whose claim
        is gone) and the claimed rows."""
        rows = [self._row(a, a.outcome) for a in finished]
        ending = {a.job.id for a in finished}  # (one row a job: a second would be ignored)
        rows += [row for a in running
                 if a.job.id not in ending and (row := self._row(a, None)).progress]  # fmt: skip
        with conn.pipeline():  # nothing is fetched before the sync at its end
            recorded = _db_record(conn, rows, self.host)
            claiming = claim(conn) if claim is not None else None
        written = _db_recorded(recorded)
        claimed = claiming.fetchall() if claiming is not None else []
        for row in rows:
            self._unsaved.pop(row.job_id, None)
        missing = [(a.job.id, a.job.claim) for a in finished if a.job.id not in written]
        done = _db_already_recorded(conn, missing) if missing else set()
        return {a.job.id: written.get(a.job.id, "" if a.job.id in done else None)
                for a in finished}, claimed  # fmt: skip

    def one_by_one(
        self, conn: psycopg.Connection, finished: Sequence[_Attempt]
    ) -> dict[uuid.UUID, str | None]:
        """Write each outcome alone; one the database refuses becomes a failure saying why,
        and if even that is refused, the job goes back to the queue (or, should that fail
        too, stays claimed until the dispatcher's poll puts it back)."""
        written: dict[uuid.UUID, str | None] = {}
        for attempt in finished:
            try:
                written.update(self.round(conn, [attempt], [], None)[0])
                continue
            except _REFUSED as error:
                refused = error
            logger.error("the database refused the outcome of job %s: %s", attempt.job.id, refused)
            message = _storable(f"cannot record the outcome: {refused}")[:2000]
            written[attempt.job.id] = None
            for fallback in (Outcome(Verdict.FAILED, error=message, permanent=True),
                             Outcome(Verdict.RELEASED)):  # fmt: skip
                job = attempt.job
                row = _Row(job.id, job.claim, fallback, Progress(), job.concurrency_key)
                with contextlib.suppress(psycopg.Error), conn.transaction():
                    written.update(_db_recorded(_db_record(conn, [row], self.host)))
                    attempt.outcome = fallback
                    break
        return written

    def release(self, conn: psycopg.Connection, claims: Sequence[tuple[uuid.UUID, Any]]) -> int:
        """Put claimed jobs back unspent (fenced: one that finished meanwhile stays as it is);
        how many went back."""
        released = Outcome(Verdict.RELEASED)
        rows = [_Row(job_id, claim, released, Progress()) for job_id, claim in claims]
        with conn.transaction():  # (claimed, not admitted: they gave up no slot of a key)
            return len(_db_recorded(_db_record(conn, rows, self.host)))

    def _row(self, attempt: _Attempt, outcome: Outcome | None) -> _Row:
        """The record row of an attempt, with the progress it gathered since it was last
        written (kept here until it is)."""
        progress = self._unsaved.pop(attempt.job.id, Progress())
        progress += attempt.context.take_progress()
        if progress:
            self._unsaved[attempt.job.id] = progress  # until it is written
        job = attempt.job
        return _Row(job.id, job.claim, outcome, progress, job.concurrency_key)


class _Session(threading.Thread):
    """The worker's own PostgreSQL session, on a thread of its own.

    It holds the worker's session advisory lock, so that others can tell at once when this
    process is gone; LISTENs for new jobs; writes the heartbeat; and sweeps, putting back the
    running jobs of workers it finds dead. After any error it reconnects with backoff and takes
    its lock again.

    Its registration is a lease, numbered by ``epoch``: the worker claims and runs jobs only
    under a live lease. When the lease is lost (another worker declared this one dead, or the
    watchdog did because no heartbeat got through), the jobs claimed under it are stopped,
    and the session puts back whatever of them is still marked running and registers anew.
    ``lease_lock`` guards the lease; whoever takes it also takes the worker's lock, after it.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        identity: Mapping[str, Any],
        options: Mapping[str, Any],
        on_notify: Callable[[str], None],
        on_reaped: Callable[[int], None],
        on_drain: Callable[[], None],
        before_leaving: Callable[[], None],
        grace: float,
        heartbeat_timeout: float,
        pulse: _Pulse,
    ) -> None:
        super().__init__(name="claude-jobs-session", daemon=True)
        self._pulse = pulse
        self._conninfo = conninfo
        self._identity = identity
        self._options = options
        self._on_notify = on_notify
        self._on_reaped = on_reaped
        self._on_drain = on_drain
        self._before_leaving = before_leaving
        self._grace = grace
        self._heartbeat_timeout = heartbeat_timeout
        self._closing = threading.Event()
        self._leave_on_close = True
        self._lock_key: int | None = None
        self.lease_lock = threading.Lock()
        self.epoch = 0  # bumped by every registration
        self.alive = False  # the lease of the current registration holds
        self.worker_id: uuid.UUID | None = None
        self.ready = threading.Event()  # alive, connected and listening
        self.last_ok = _lease_clock()  # when a heartbeat last reached the database
        self.fatal: JobsError | None = None
        self.broken = False  # the connection failed and is not back yet

    def lease(self) -> tuple[uuid.UUID, int] | None:
        """(worker id, epoch) while jobs may be claimed; None otherwise."""
        with self.lease_lock:
            if self.alive and self.ready.is_set() and self.worker_id is not None:
                return self.worker_id, self.epoch
        return None

    def holds(self, epoch: int) -> bool:
        """Whether lease ``epoch`` still holds (the caller holds lease_lock)."""
        return self.alive and self.epoch == epoch

    def lease_deadline(self, epoch: int) -> float:
        """When lease ``epoch`` runs out unless a heartbeat renews it, on the lease clock:
        past it, other workers may take its jobs over, so nothing of them may run here then
        (the watchdog fences at that moment, and each job's supervisor on its own)."""
        with self.lease_lock:
            if not self.holds(epoch):
                return 0.0
            return self.last_ok + self._grace - FENCE_MARGIN

    def end_lease(self, epoch: int) -> bool:
        """Give up the lease ``epoch`` (the caller holds lease_lock); False if already over."""
        if not self.alive or self.epoch != epoch:
            return False
        self.alive = False
        self.ready.clear()
        return True

    def close(self, leave: bool = True) -> None:
        """Stop; with ``leave``, deregister (else leave the registration to the reapers)."""
        self._leave_on_close = leave
        self._closing.set()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as error:  # (not a pass's): stop the worker, it has no lease now
            logger.exception("the worker's database session failed")
            self._pulse.died("session", error)
            self.broken = True
            self.fatal = JobsError(f"the worker's database session failed: {error}")

    def _run(self) -> None:
        delay = _Backoff()
        while not self._closing.is_set():
            try:
                with connect(self._conninfo, autocommit=True, **self._options) as conn:
                    self._establish(conn)
                    if self.broken:
                        logger.info("database connection restored")
                    self.broken = False
                    delay.reset()
                    if self._serve(conn):
                        if self._leave_on_close:
                            self._leave(conn)
                        return
            except SchemaError as error:
                self.fatal = error
                return
            except Exception as error:  # the database went away, or a bug: reconnect
                self.ready.clear()
                self.broken = True
                failures = self._pulse.failed("session", error)
                if self._closing.is_set():
                    break
                # While the lease may still hold, try again at once: each second counts.
                quick = self.alive and _lease_clock() - self.last_ok < self._grace
                wait = random.uniform(0.1, 0.25) if quick else delay.next()
                reason = _scrub(str(error), self._conninfo)
                bug = not isinstance(error, DatabaseUnavailable | psycopg.Error | _Busy)
                if bug and _worth_a_traceback(failures):
                    logger.exception("the worker's database session failed; reconnecting")
                logger.warning(
                    "database session lost: %s; reconnecting in %.1fs",
                    reason,
                    wait,
                    extra={"fields": {"event": "db unavailable", "error": reason}},
                )
                self._closing.wait(wait)
        if self._leave_on_close:
            with (
                contextlib.suppress(JobsError, psycopg.Error),
                connect(self._conninfo, autocommit=True, connect_timeout=5) as conn,
            ):
                self._leave(conn)

    def _establish(self, conn: psycopg.Connection) -> None:
        """Listen, then take the lock again and confirm the lease, or register anew."""
        check_schema(conn)
        _configure_worker_connection(conn)  # its sweeps run every second: no JIT for them
        _db_listen(conn, NOTIFY_CHANNEL)  # first: no notice is missed from here on
        with self.lease_lock:
            alive, epoch = self.alive, self.epoch
        if self.worker_id is not None and alive:
            assert self._lock_key is not None
            if not _db_try_lock(conn, self._lock_key):
                raise _Busy("this worker's lock is held by another session for now")
            self._beat(conn, epoch)
        else:
            if self.worker_id is not None:  # a lease was lost: what finished under its
                self._before_leaving()  # claims is recorded under them, before the rest
            self._leave(conn)  # goes back: what the lost lease left marked running
            self._register(conn)
        with self.lease_lock:
            if self.alive:
                self.ready.set()

    def _register(self, conn: psycopg.Connection) -> None:
        worker_id = uuid.uuid4()
        key = _db_register_worker(conn, worker_id, self._identity)
        with self.lease_lock:
            self.worker_id, self._lock_key = worker_id, key
            self.epoch += 1
            self.alive = True
            self.last_ok = _lease_clock()
        logger.debug("registered as worker %s (lock key %s)", worker_id, key)

    def _beat(self, conn: psycopg.Connection, epoch: int) -> None:
        """Write the heartbeat of lease ``epoch``; when its registration is gone (another worker
        declared this one dead), register anew."""
        stamp = _lease_clock()
        assert self.worker_id is not None
        draining = _db_heartbeat(conn, self.worker_id, self._pulse.trouble())
        if draining is not None:
            self._pulse.passed("session")
            self.last_ok = stamp
            if draining:
                self._on_drain()
            return
        _db_unlock_all(conn)
        self._reaped(epoch)
        self._register(conn)
        with self.lease_lock:
            if self.alive:
                self.ready.set()

    def _reaped(self, epoch: int) -> None:
        logger.error(
            "another worker declared this one dead (its heartbeat stopped) and took over its "
            "running jobs; continuing as a new worker",
            extra={"fields": {"event": "declared dead"}},
        )
        self._on_reaped(epoch)

    def _serve(self, conn: psycopg.Connection) -> bool:
        """Listen, heartbeat and sweep until closing (True) or the lease is lost (False)."""
        next_sweep = 0.0
        while not self._closing.is_set():
            for notice in conn.notifies(timeout=HEARTBEAT_INTERVAL):
                try:
                    self._on_notify(notice.payload)
                except Exception:  # a notice must never take the session down
                    logger.exception("cannot handle the notice %r", notice.payload)
            with self.lease_lock:
                alive, epoch = self.alive, self.epoch
            if not alive:
                return False
            self._beat(conn, epoch)
            if time.monotonic() >= next_sweep:
                self._sweep(conn)
                next_sweep = time.monotonic() + SWEEP_INTERVAL
        return True

    def _leave(self, conn: psycopg.Connection) -> None:
        """Deregister, then put back any job still marked running under this registration
        (the attempt counted: it was interrupted) and kill what it left on this machine."""
        if self.worker_id is None:
            return
        jobs = _db_leave(conn, self.worker_id)
        _db_unlock_all(conn)
        _kill_leftovers(jobs)
        for job in jobs:
            _log_recovered(job)

    def _sweep(self, conn: psycopg.Connection) -> None:
        """Put back the running jobs of dead workers, and of jobs whose worker is unknown;
        cancel the jobs that wait for a job that will never succeed."""
        for worker in _db_stale_workers(conn, self._grace, self._heartbeat_timeout):
            if worker["id"] != self.worker_id:
                self._reap(conn, worker)
        orphans = _db_recover_orphans(conn)
        _kill_leftovers(orphans)
        for job in orphans:
            _log_recovered(job)
        for job in _db_cancel_blocked(conn):
            _log_row("cancelled", job, reason=job["last_error"])

    def _reap(self, conn: psycopg.Connection, worker: Mapping[str, Any]) -> None:
        jobs = _db_reap(conn, worker, self._grace)
        if jobs is None:
            return  # alive after all
        _kill_leftovers(jobs)
        why = "no heartbeat within the timeout" if worker["vanished"] else "its session ended"
        name = f"{worker['host']}:{worker['pid']}"
        logger.warning(
            "worker %s is dead (%s): %d running job(s) put back",
            name,
            why,
            len(jobs),
            extra={
                "fields": {"event": "worker dead", "worker": name, "reason": why, "jobs": len(jobs)}
            },
        )
        for job in jobs:
            _log_recovered(job)


###############################################################################
# Worker: the dispatcher, the runners, the other parts and the Worker
###############################################################################


#: Why an outcome is discarded when its write matched nothing.
_CLAIM_GONE = (
    "this worker's claim on the job is gone (the job was put back or taken over while the "
    "database was out of reach); this outcome is discarded"
)


class _Dispatcher:
    """Claims jobs for the runners and writes what they did, in rounds. A round writes the
    outcomes decided since the last one (and, twice a second, the progress of running
    attempts) and claims as many jobs as runners are free (while jobs are quick, as many
    again ahead of them: see CLAIM_AHEAD_BELOW), earlier queues first: one round
    trip and one commit (see _Writer). Between rounds it waits for an outcome, a notice, a job
    coming due, the poll or a stop. At every poll it compares what it holds with what the
    database says it holds, and learns the holds. While the database is away it keeps what it
    has to write and tries again.

    Runs in the thread that calls Worker.run() or run_once(); the session thread calls
    on_notify() and flush(). It owns the wake-up times (in the book) and the writer, and what a
    burst found it could not run (``idle_because``)."""

    def __init__(
        self,
        shared: _Shared,
        session: _Session,
        runners: _Runners,
        queues: Sequence[str],
        concurrency: int,
    ) -> None:
        assert shared.pool is not None
        self._shared = shared
        self._pool = shared.pool
        self._session = session
        self._book = shared.book
        self._holds = shared.holds
        self._runners = runners
        self._concurrency = concurrency
        self._writer = _Writer(shared.host)
        self._queues: tuple[str | None, ...] = (None,) if tuple(queues) == ("*",) else tuple(queues)
        #: After a burst: why it ran nothing though jobs were ready (it cannot run them).
        self.idle_because: str | None = None
        self._hurry = threading.Event()  # flush(): write now, not after the back-off
        self._writing = False  # a round is writing outcomes it took from the book
        self._check_claims = False  # a claim's reply was lost: compare with the database
        self._next_poll = 0.0
        self._next_save = 0.0
        self._failures = _Backoff(start=0.5, cap=10.0)

    # -- the loop ---------------------------------------------------------------------------

    def work(self, stop: threading.Event, burst: bool) -> None:
        """Rounds until ``stop`` (in burst mode: until nothing is ready and nothing is held)."""
        while not stop.is_set():
            self._book.wake.clear()
            if self._session.fatal:
                logger.error("stopping: %s", self._session.fatal)
                self._shared.fence(self._session.epoch, "it cannot go on")
                break
            claimed = self.round(claiming=True)
            if claimed is None:  # no lease: reconnecting
                self._book.wake.wait(0.2)
                continue
            held, _, _ = self._book.counts()
            if burst and claimed == 0 and held == 0:
                self.idle_because = self._why_idle()
                logger.info("nothing is ready: stopping (burst)")
                break
            self._book.wake.wait(self._idle_wait())

    def finish(self, until: float | None) -> None:
        """Rounds that write and claim nothing, until nothing is held, or ``until``
        (time.monotonic()) passes, or the worker forces its stop."""
        while self._book.counts()[0] and not self._shared.force.is_set():
            if until is not None and time.monotonic() >= until:
                return
            self._book.wake.clear()
            self.round(claiming=False)
            self._book.wake.wait(0.2)

    def _idle_wait(self) -> float:
        """How long to wait for something to do: the next poll, a job coming due, or, while
        attempts run, their next progress save."""
        until = self._next_poll
        if self._book.counts()[0]:
            until = min(until, self._next_save)
        return self._book.idle_wait(until)

    # -- a round ----------------------------------------------------------------------------

    def round(self, claiming: bool) -> int | None:
        """Write what is to be written and claim for the free runners; how many jobs were
        claimed (None: no lease)."""
        lease = self._session.lease()
        now = time.monotonic()
        polling = now >= self._next_poll
        finished: list[_Attempt] = []
        running: list[_Attempt] = []
        try:
            with self._pool.connection() as conn:
                if lease is not None and (polling or self._check_claims):
                    self._reconcile(conn, lease)
                if polling or self._holds.changed:
                    self._learn_holds(conn)
                finished = self._book.take_finished() + self._withdrawn(now)
                self._writing = bool(finished)
                running = self._book.attempts() if now >= self._next_save else []
                running = [a for a in running if a.outcome is None]  # (the others end now)
                free, kinds = self._free(lease) if claiming else (0, [])
                if not (finished or running or free):
                    return 0 if lease else None
                first = self._claim(lease, kinds, self._queues[0], free) if lease and free else None
                written, rows = self._writer.round(conn, finished, running, first)
                if lease and len(rows) < free:
                    rows += self._claim_further(conn, lease, kinds, free - len(rows))
                self._check_claims = False
                claimed = self._begin(conn, rows, lease[1]) if lease and rows else 0
                if polling and lease:
                    self._next_poll = time.monotonic() + self._shared.settings.poll_interval
                    due = _db_next_due(conn, self._holds.kinds, self._listened())
                    if due is not None:
                        self._book.wake_in(due)
        except _REFUSED:
            with self._pool.connection() as conn:
                written = self._writer.one_by_one(conn, finished)
            claimed = 0
        except Exception as error:  # the database went away, or a bug: the same round again
            self._book.give_back(finished)
            self._writing = False
            failures = self._shared.pulse.failed("dispatcher", error)
            if not isinstance(error, _TRANSIENT) and _worth_a_traceback(failures):
                logger.exception("a round of the dispatcher failed")
            self._wait_after(error, len(finished))
            return 0
        finally:
            self._writing = False
        self._shared.pulse.passed("dispatcher")
        if running:
            self._next_save = time.monotonic() + TRANSCRIPT_FLUSH_INTERVAL
        self._failures.reset()
        for attempt in finished:
            self._written(attempt, written.get(attempt.job.id))
        return claimed

    def _free(self, lease: tuple[uuid.UUID, int] | None) -> tuple[int, list[str]]:
        """How many jobs to claim now (runners free), and of which kinds (those this worker
        may start now)."""
        _, busy, _ = self._book.counts()
        kinds = self._holds.startable()
        free = self._concurrency + self._book.ahead(self._concurrency) - busy
        return (free, kinds) if lease is not None and free > 0 and kinds else (0, [])

    def _withdrawn(self, now: float) -> list[_Attempt]:
        """The jobs claimed ahead that no runner took, to go back to the queue unspent: all
        of them once the worker claims no more; before that, those that waited
        CLAIM_AHEAD_WAIT (the runners turned to longer jobs)."""
        handed_before = None if self._shared.stop.is_set() else now - CLAIM_AHEAD_WAIT
        withdrawn = self._book.withdraw(handed_before)
        for attempt in withdrawn:
            attempt.outcome = _given_back(attempt.job)
        return withdrawn

    def _claim(
        self, lease: tuple[uuid.UUID, int], kinds: list[str], queue: str | None, limit: int
    ) -> Callable[[psycopg.Connection], psycopg.Cursor[dict[str, Any]]]:
        """The claim of up to ``limit`` jobs from ``queue``, to be sent."""

        def send(conn: psycopg.Connection) -> psycopg.Cursor[dict[str, Any]]:
            self._check_claims = True  # until the reply is in hand
            shared = self._shared
            return _db_claim(conn, worker_id=lease[0], worker=shared.name, host=shared.host,
                             kinds=kinds, queue=queue, limit=limit)  # fmt: skip

        return send

    def _claim_further(
        self, conn: psycopg.Connection, lease: tuple[uuid.UUID, int], kinds: list[str], free: int
    ) -> list[dict[str, Any]]:
        """Claim from the next queues in order, while the first left runners free."""
        rows: list[dict[str, Any]] = []
        for queue in self._queues[1:]:
            with conn.transaction():  # (the claim and the locks it takes first)
                rows += self._claim(lease, kinds, queue, free - len(rows))(conn).fetchall()
            if len(rows) >= free:
                break
        return rows

    def _begin(self, conn: psycopg.Connection, rows: list[dict[str, Any]], epoch: int) -> int:
        """Hand claimed jobs to the runners, if the lease they were claimed under still holds;
        the others never run here: they go back unspent. How many were handed."""
        lease = functools.partial(self._session.lease_deadline, epoch)
        stale: list[tuple[uuid.UUID, uuid.UUID]] = []
        for row in rows:
            context = RunContext(row["id"], row["attempts"], row["claim"], row["timeout"], lease)
            attempt = _Attempt(Job.from_row(row, context), context)
            with self._session.lease_lock:
                if self._session.holds(epoch):
                    self._book.begin(attempt)
                    self._runners.submit(attempt)
                    continue
            stale.append((row["id"], row["claim"]))
        if stale:
            self._writer.release(conn, stale)
        return len(rows) - len(stale)

    def _reconcile(self, conn: psycopg.Connection, lease: tuple[uuid.UUID, int]) -> None:
        """Compare what the database says this worker runs with what it runs: jobs it does
        not know of (a claim whose reply was lost, or that committed after the error) go back
        to the queue unspent; a cancel whose notice was missed is acted on."""
        rows = _db_my_running_jobs(conn, lease[0])
        # Under the lease lock, no fence can stop (and forget) a job while we look: a job
        # this worker ran is still known here, unless the lease ended while we asked.
        with self._session.lease_lock:
            if not self._session.holds(lease[1]):
                return  # the session puts back (the attempt counted) what it left running
            unknown = [(job_id, claim) for job_id, claim, _ in rows
                       if not self._book.knows(job_id)]  # fmt: skip
        for job_id, _, cancel in rows:
            if cancel:
                self.cancel(job_id)
        if unknown and (back := self._writer.release(conn, unknown)):
            logger.warning("put back %d job(s) this worker claimed but never ran", back)

    def _learn_holds(self, conn: psycopg.Connection) -> None:
        now = time.monotonic()
        fresh, own = self._holds.learn(conn)
        for kind, until, reason in fresh:
            _log_hold(kind, until, reason)
            self._book.wake_in(until - now)
        for kind, seconds, reason in own:
            self._shared.hold_here(kind, seconds, reason)

    def _listened(self) -> list[str] | None:
        return None if self._queues == (None,) else [q for q in self._queues if q]

    def _wait_after(self, error: BaseException, unwritten: int) -> None:
        """The database is away: wait before the next round (less when a flush waits), or
        give up what cannot be written if the worker forces its stop."""
        if self._shared.force.is_set():
            for attempt in self._book.take_finished(limit=10**9):  # recovered when we are gone
                self._written(attempt, None)
            return
        wait = self._failures.next()
        logger.warning(
            "cannot %s yet: %s; retrying in %.1fs",
            f"record {unwritten} outcome(s)" if unwritten else "claim jobs",
            _scrub(str(error), self._shared.conninfo),
            wait,
            extra={"fields": {"event": "db unavailable"}},
        )
        end = time.monotonic() + wait
        while time.monotonic() < end and not self._shared.force.is_set():
            if self._hurry.is_set():  # a flush waits: soon, but not in a busy loop
                end = min(end, time.monotonic() + 0.2)
            self._shared.force.wait(0.05)

    def _why_idle(self) -> str | None:
        """Why a burst ran nothing though jobs were ready for it: it is unfit for them."""
        with self._book.lock:
            ran = self._runners.ran
        unfit = self._holds.unfit()
        if ran or not unfit:
            return None
        with self._pool.connection() as conn:
            kind = _db_ready_of_kinds(conn, sorted(unfit), self._listened())
        return None if kind is None else f"this worker cannot run {kind} jobs: {unfit[kind]}"

    # -- what the session asks ----------------------------------------------------------------

    def flush(self, timeout: float) -> bool:
        """Write every outcome decided so far, now (not after the retry's back-off), and
        return once they are written (True), or after ``timeout`` seconds (False). The
        session asks this before it gives back what a lost lease left marked running: what
        finished under its claims is recorded under them first."""
        self._hurry.set()
        self._book.wake.set()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self._book.counts()[2] and not self._writing:
                    return True
                self._shared.force.wait(0.05)
            return False
        finally:
            self._hurry.clear()

    def on_notify(self, payload: str) -> None:
        """A job was queued (or became ready) somewhere: wake up if it is for us; or a job
        is to be cancelled: stop it if it runs here; or a hold changed, or was lifted; or a
        worker is asked to drain: stop claiming if it is this one."""
        try:
            notice = json.loads(payload)
            if isinstance(notice, dict) and "cancel" in notice:
                self.cancel(uuid.UUID(str(notice["cancel"])))
                return
            if isinstance(notice, dict) and "drain" in notice:
                if notice["drain"] == str(self._session.worker_id):
                    self._shared.drain()
                return
            if isinstance(notice, dict) and "hold" in notice:
                self._holds.changed = True  # learned at the next round, which this wakes
                lifted = notice.get("lift") is True and isinstance(notice["hold"], str)
                if lifted and self._holds.refit(notice["hold"]):
                    logger.info(
                        "this worker tries %s jobs again (its back-off was lifted)",
                        notice["hold"],
                        extra={"fields": {"event": "refit", "kind": notice["hold"]}},
                    )
            queue, at = notice["queue"], notice.get("at")
            if not isinstance(queue, str) or not isinstance(at, int | float | None):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            self._book.wake.set()
            return
        if self._queues != (None,) and queue not in self._queues:
            return
        if at is None or not at > time.time():
            self._book.wake.set()
        else:
            self._book.wake_in(at - time.time())

    def cancel(self, job_id: uuid.UUID) -> None:
        """Stop a job that `cancel` asked to stop, if it runs here."""
        attempt = self._book.get(job_id)
        if attempt is not None and attempt.context.stop_reason is None:
            _log_job("cancelling", attempt.job, logging.WARNING)
            attempt.context.request_stop(STOP_CANCEL)

    # -- logging what was written -----------------------------------------------------------

    def _written(self, attempt: _Attempt, status: str | None) -> None:
        """An outcome was written (status: the job's new status; "" for a write an earlier
        lost reply had made; None if the claim was gone): log it, forget the attempt."""
        job, outcome = attempt.job, attempt.outcome
        assert outcome is not None
        duration = time.monotonic() - attempt.started
        self._book.forget(attempt)
        if status == "":  # written before: what it came to is what the verdict says
            status = {Verdict.SUCCEEDED: "succeeded", Verdict.RELEASED: "queued",
                      Verdict.CANCELLED: "cancelled"}.get(outcome.verdict, "recorded")  # fmt: skip
        if status is None:
            _log_job("abandoned", job, logging.WARNING, reason=_CLAIM_GONE)
        elif status == JobStatus.CANCELLED:
            _log_job("cancelled", job, logging.WARNING, duration=duration)
        elif outcome.verdict == Verdict.RELEASED:
            if not outcome.quiet:
                _log_job("released", job, logging.WARNING, reason="forced shutdown")
        elif status == JobStatus.SUCCEEDED:
            _log_job("succeeded", job, duration=duration)
        elif status == JobStatus.QUEUED:
            _log_job("retry scheduled", job, logging.WARNING, duration=duration,
                     retry_in=outcome.delay, error=outcome.error)  # fmt: skip
            self._book.wake_in(outcome.delay)
        else:
            _log_job("failed", job, logging.ERROR, duration=duration, error=outcome.error,
                     permanent=outcome.permanent or None)  # fmt: skip
        policy = self._shared.policies.get(job.kind)
        if policy is not None and policy.checks_each_start:
            self._holds.changed = True  # what it spent may hold the kind (a daily budget)
        self._book.wake.set()


def _log_hold(kind: str, until: float, reason: str) -> None:
    paused = until - time.monotonic() > 100 * 365 * 86400  # (pause --kind: no end)
    logger.warning(
        "no worker starts %s jobs until %s: %s",
        kind,
        "it is resumed" if paused else _clock_time(until),
        reason,
        extra={"fields": {"event": "held", "kind": kind, "reason": reason}},
    )


class _Runners:
    """The threads that run attempts ("claude-jobs-job-N"), one attempt at a time each: the
    holds and the job's concurrency key must let it start; then its handler runs, and
    decide() says what it came to, for the dispatcher to write. A postponement holds the kind
    (a usage limit: on every worker) or backs it off here (this worker is unfit for it). They
    own the attempt in hand, and nothing else; they hand attempts back through the book."""

    def __init__(self, shared: _Shared, handlers: Mapping[str, Handler], concurrency: int) -> None:
        assert shared.pool is not None
        self._shared = shared
        self._pool = shared.pool
        self._handlers = handlers
        self._concurrency = concurrency
        self._inbox: queue_module.SimpleQueue[_Attempt | None] = queue_module.SimpleQueue()
        self._max_starts: Rate | None = getattr(handlers.get(DEFAULT_KIND), "max_starts", None)
        self.ran = 0  # handlers that ran here (not giving their job back as unfit): the book's lock

    def start(self) -> None:
        for number in range(1, self._concurrency + 1):
            self._shared.spawn(self._loop, f"claude-jobs-job-{number}")

    def submit(self, attempt: _Attempt) -> None:
        self._inbox.put(attempt)

    def stop(self) -> None:
        for _ in range(self._concurrency):
            self._inbox.put(None)

    def _loop(self) -> None:
        while (attempt := self._inbox.get()) is not None:
            if not self._shared.book.start(attempt):
                continue  # claimed ahead and taken back (see _Dispatcher._withdrawn)
            attempt.context.begin()
            try:
                attempt.outcome = self._run(attempt)
            except BaseException:  # a bug; the job stays claimed until reconciled or recovered
                logger.exception("internal error while running job %s", attempt.job.id)
                attempt.outcome = None
            self._shared.book.finish(attempt)

    def _run(self, attempt: _Attempt) -> Outcome:
        """Run one attempt: what it came to."""
        job, context, shared = attempt.job, attempt.context, self._shared
        if context.stop_reason == STOP_CANCEL:  # (claimed ahead, and stopped before it began)
            return Outcome(Verdict.CANCELLED)
        if context.stop_reason is not None:  # (a forced stop, a lost lease: back unspent)
            return _given_back(job)
        policy = shared.policies.get(job.kind)
        if policy is not None and policy.checks_each_start:  # a job that ended since this
            hold = None  # one was claimed may have spent the budget
            with contextlib.suppress(*_TRANSIENT), self._pool.connection() as conn:
                hold = policy.held(conn)
            if hold is not None:
                shared.hold_here(job.kind, *hold)
        if not shared.holds.may_start(job.kind):  # (it was held since it was claimed)
            return _given_back(job)
        refused = self._admit(job)
        if refused is not None:  # it keeps its place in the queue
            _log_job("deferred", job, logging.DEBUG, reason=refused.reason, until=refused.until)
            if refused.until is not None:  # this worker claims again when it may start
                seconds = (refused.until - datetime.now(UTC)).total_seconds()
                if refused.capped:
                    shared.hold_here(job.kind, seconds, refused.reason)
                shared.book.wake_in(seconds)
            return _given_back(job)
        _log_job("claimed", job, worker=shared.name, branch=job_branch(job))
        value: Any = None
        error: BaseException | None = None
        trace: str | None = None
        try:
            with self._batch_results(job, context):
                value = self._handlers[job.kind](job)
        except (_Interrupted, JobFailed, Postpone) as raised:
            error = raised
        except BaseException as raised:  # KeyboardInterrupt and SystemExit too: the thread goes on
            error, trace = raised, traceback.format_exc()[-8000:]
        settings = shared.settings
        outcome = decide(
            job, value=value, error=error, trace=trace, stop=context.stop_reason,
            retry_delay=backoff_delay(job.attempts, settings.backoff_base, settings.backoff_max),
            jitter=random.uniform(0, 60),
        )  # fmt: skip
        if outcome.effect is not None:
            self._affected(job, outcome)
        if outcome.effect != Effect.BACK_OFF:
            with shared.book.lock:
                self.ran += 1
        if outcome.verdict == Verdict.ABANDONED:
            _log_job("abandoned", job, logging.WARNING, reason="the claim was lost")
        elif isinstance(error, Postpone):
            _log_job("postponed", job, logging.WARNING, until=outcome.run_at, reason=str(error))
        return outcome

    @contextlib.contextmanager
    def _batch_results(self, job: Job, context: RunContext) -> Iterator[None]:
        """For a batch's callback: the file of what the batch's jobs came to, written here
        for the handler (context.batch_results), removed after it."""
        if job.callback_of is None:
            yield
            return
        with self._pool.connection() as conn:
            results = batch_results(conn, job.callback_of)
        with tempfile.TemporaryDirectory(prefix=f"claude-jobs-batch-{job.id.hex[:12]}-") as d:
            path = Path(d) / "results.jsonl"
            lines = (json.dumps(_jsonable(row), ensure_ascii=False) + "\n" for row in results)
            path.write_text("".join(lines))
            context.batch_results = path
            yield

    def _admit(self, job: Job) -> _Refused | None:
        """Let the job start, if what limits it across workers allows (see _db_admit): None
        when it may (at once when nothing limits it)."""
        if job.concurrency_key is None and job.kind != DEFAULT_KIND:
            return None
        try:
            with self._pool.connection() as conn:
                return _db_admit(conn, job, self._max_starts)
        except _TRANSIENT:  # the job goes back; the database decides when it is back
            return _Refused("the database is away")

    def _affected(self, job: Job, outcome: Outcome) -> None:
        """What an outcome does to the worker (see Effect): a usage limit holds the kind on
        every worker; a worker unfit for it stops taking it for a while; one that ran it is
        fit for it."""
        holds, reason = self._shared.holds, outcome.error or ""
        if job.context is not None and job.context.hold_after is not None:  # --leave-headroom
            self._hold_everywhere(job.kind, *job.context.hold_after)
        if outcome.effect == Effect.FIT and (was := holds.refit(job.kind)):
            self._shared.lift_hold_here(job.kind, was)
        elif outcome.effect == Effect.HOLD_EVERYWHERE and outcome.until is not None:
            self._hold_everywhere(job.kind, outcome.until, reason)
        elif outcome.effect == Effect.BACK_OFF:
            seconds = holds.back_off(job.kind)
            if seconds is not None:
                self._shared.hold_here(job.kind, seconds, reason, unfit=True)

    def _hold_everywhere(self, kind: str, until: datetime, reason: str) -> None:
        """No worker starts ``kind`` jobs before ``until`` (a usage limit, or headroom)."""
        holds = self._shared.holds
        when = None
        with contextlib.suppress(*_TRANSIENT), self._pool.connection() as conn:
            when = holds.hold_everywhere(conn, kind, until, reason)
        if when is None:  # the database is away: the others learn it from their own jobs
            when = holds.hold_everywhere(None, kind, until, reason)
        _log_hold(kind, when, reason)
        self._shared.book.wake_in(when - time.monotonic())


class _Part(threading.Thread):
    """A long-lived thread of the worker ("claude-jobs-PART") that works in passes until the
    worker closes. No exception ends it: a pass that fails is logged (with its traceback, but
    for the database being away, which the session reports) and counted in the pulse, and the
    next pass comes as usual. Should the thread end all the same, the pulse says it died."""

    def __init__(self, shared: _Shared, part: str) -> None:
        super().__init__(name=f"claude-jobs-{part}", daemon=True)
        self.part = part
        self._shared = shared
        self._pulse = shared.pulse

    def run(self) -> None:
        try:
            self.work()
        except BaseException as error:  # (not a pass's: those are caught in attempt)
            logger.exception("the worker's %s stopped", self.part)
            self._pulse.died(self.part, error)

    def work(self) -> None:
        raise NotImplementedError

    def attempt(self, what: str, task: Callable[[], None]) -> bool:
        """Run one pass (or a task of one); whether it went through."""
        try:
            task()
        except _TRANSIENT as error:
            logger.debug("cannot %s for now: %s", what, error)
            self._pulse.failed(self.part, error, what)
            return False
        except Exception as error:
            failures = self._pulse.failed(self.part, error, what)
            if _worth_a_traceback(failures):
                logger.exception("cannot %s (%d time(s) in a row)", what, failures)
            return False
        self._pulse.passed(self.part, what)
        return True

    def pooled(self, what: str, task: Callable[[psycopg.Connection], None]) -> bool:
        """A pass that runs ``task`` on a connection of the worker's pool (see attempt)."""
        pool = self._shared.pool
        assert pool is not None

        def with_connection() -> None:
            with pool.connection() as conn:
                task(conn)

        return self.attempt(what, with_connection)


class _Watchdog(_Part):
    """Stops this worker's jobs before others may take them over: when no heartbeat has
    reached the database for nearly the lock grace period, it fences the lease (and each
    job's supervisor does the same on its own). Owns nothing."""

    def __init__(self, shared: _Shared, session: _Session) -> None:
        super().__init__(shared, "watchdog")
        self._session = session

    def work(self) -> None:
        while not self._shared.closed.wait(0.25):
            self.attempt("watch the heartbeat", self._watch)

    def _watch(self) -> None:
        with self._session.lease_lock:
            alive, epoch = self._session.alive, self._session.epoch
            silent = _lease_clock() - self._session.last_ok
        if alive and silent > self._shared.settings.lock_grace - FENCE_MARGIN:
            self._shared.fence(epoch, f"no heartbeat reached the database for {silent:.1f}s")


class _Janitor(_Part):
    """Keeps the queue tidy, one worker at a time for each task: now and then it unblocks
    the blocked jobs that may run and that nothing unblocked (two transactions at once may
    each leave one to the other), and it deletes succeeded and cancelled jobs older than the
    retention (failed ones stay for people to look at), in small batches, and the starts no
    rate's window reaches (claude_jobs_starts); and it keeps the
    planner's statistics of the jobs true to the backlog (see _db_refresh_statistics); and it
    looks at the open pull requests of jobs (see track_pull_requests). On a thread of its
    own, with a connection from the pool: none of it may hold up the heartbeat. Owns the
    times of its tasks."""

    def __init__(self, shared: _Shared) -> None:
        super().__init__(shared, "janitor")
        self._analyzed: float | None = None  # the unfinished jobs at its last ANALYZE

    def work(self) -> None:
        now = time.monotonic()
        next_unblock, next_cleanup = now, now + JANITOR_FIRST_PASS
        next_track = now + JANITOR_FIRST_PASS
        assert self._shared.session is not None
        self._shared.session.ready.wait(UNBLOCK_CHECK_INTERVAL)  # registered: it counts
        while True:  # (a first pass at once: what waited for a worker to exist)
            self.pooled("keep the planner's statistics", self._statistics)
            if time.monotonic() >= next_unblock:
                next_unblock = time.monotonic() + UNBLOCK_CHECK_INTERVAL
                self.pooled("unblock the jobs that may run", self._unblock)
                self.pooled("fold the kept counts", fold_counts)
                self.pooled("end the holds that ran out", self._holds_over)
            if time.monotonic() >= next_cleanup:
                next_cleanup = time.monotonic() + JANITOR_INTERVAL
                if self._shared.settings.retention:
                    self.pooled("clean up finished jobs", self._clean_up)
                self.pooled("forget the starts no rate counts", _db_forget_starts)
            polling = self._shared.settings.pr_poll_interval
            if polling and time.monotonic() >= next_track:
                next_track = time.monotonic() + min(polling, JANITOR_INTERVAL)
                self.pooled("look at pull requests", self._track)
            if self._shared.closed.wait(STATISTICS_INTERVAL):
                return

    def _statistics(self, conn: psycopg.Connection) -> None:
        self._analyzed, analyzed = _db_refresh_statistics(conn, self._analyzed)
        if analyzed:
            jobs = int(self._analyzed or 0)
            logger.info(
                "analyzed the jobs table: %d unfinished job(s), many more than its statistics "
                "said", jobs, extra={"fields": {"event": "analyzed", "jobs": jobs}},
            )  # fmt: skip

    def _unblock(self, conn: psycopg.Connection) -> None:
        if unblocked := _db_unblock_all(conn):
            logger.info(
                "unblocked %d job(s) that may run", unblocked,
                extra={"fields": {"event": "unblocked", "jobs": unblocked}},
            )  # fmt: skip

    def _holds_over(self, conn: psycopg.Connection) -> None:
        if (worker_id := self._shared.worker_id()) is not None:
            _db_holds_over(conn, worker_id)

    def _track(self, conn: psycopg.Connection) -> None:
        interval = self._shared.settings.pr_poll_interval
        if looked := track_pull_requests(conn, interval=interval):
            logger.debug("looked at %d pull request(s)", looked)

    def _clean_up(self, conn: psycopg.Connection) -> None:
        retention = self._shared.settings.retention
        if deleted := cleanup_jobs(conn, retention, exclusive=True):
            logger.info(
                "deleted %d succeeded or cancelled job(s) past the retention of %s",
                deleted,
                _duration_text(retention),
                extra={"fields": {"event": "cleanup", "deleted": deleted}},
            )


class _Notifier(_Part):
    """The thread "claude-jobs-notifier": sends the notifications that are due, every
    NOTIFY_INTERVAL (see send_due_notifications), off the claim's path: a receiver that is
    slow or down holds up this thread alone. With a connection from the pool."""

    def __init__(self, shared: _Shared) -> None:
        super().__init__(shared, "notifier")

    def work(self) -> None:
        while not self._shared.closed.wait(NOTIFY_INTERVAL):
            self.pooled("send notifications", self._send)

    def _send(self, conn: psycopg.Connection) -> None:
        worker_id, closed = self._shared.worker_id(), self._shared.closed.is_set
        while send_due_notifications(conn, worker_id=worker_id, stopping=closed):
            if closed():
                return


class _Scheduler(_Part):
    """The thread "claude-jobs-scheduler": every SCHEDULE_INTERVAL, fires the schedules that
    are due (fire_due_schedules: each due time once, whichever worker gets there first).
    With a connection from the pool; owns the names of the schedules it cannot fire."""

    def __init__(self, shared: _Shared) -> None:
        super().__init__(shared, "scheduler")
        self._unfit: dict[str, float] = {}  # the schedules it could not fire, and when

    def work(self) -> None:
        while not self._shared.closed.wait(SCHEDULE_INTERVAL):
            self.pooled("fire schedules", self._fire)

    def _fire(self, conn: psycopg.Connection) -> None:
        for job in fire_due_schedules(conn, by=self._shared.name, unfit=self._unfit):
            _log_job("scheduled", job, schedule=job.schedule, due=job.scheduled_for)


class _HealthServer(threading.Thread):
    """The thread "claude-jobs-health": answers a supervisor's probes (--health-port).
    GET /healthz: the process is up, and the worker's state; GET /readyz: 200 while the
    worker's lease holds, its heartbeats reach the database and it is not draining, else 503.
    Owns its socket; shares nothing but what Worker.health() reads."""

    def __init__(self, worker: Worker, host: str, port: int) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Probe(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                state: dict[str, Any] = worker.health()
                code = {"/healthz": 200, "/readyz": 200 if state["ready"] else 503}.get(
                    self.path.split("?")[0], 404
                )
                if code == 404:
                    state = {"error": "no such path: GET /healthz or /readyz"}
                body = json.dumps(state).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # (probes every few seconds would drown the worker's log)

        try:
            self.server = ThreadingHTTPServer((host, port), Probe)
        except OSError as error:
            raise ConfigError(f"cannot answer health checks on {host}:{port}: {error}") from None
        self.server.daemon_threads = True
        super().__init__(name="claude-jobs-health", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def run(self) -> None:
        self.server.serve_forever(poll_interval=0.5)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


#: The events a worker's --notify is told of: its own, and the ends of the jobs it runs.
_WORKER_EVENTS = tuple(event for event in NOTIFY_EVENTS if event != "batch.finished")


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker works: the keywords of Worker, and the options of `claude-jobs worker`
    with their CLAUDE_JOBS_* variables (built from these fields: see _flags). Validated when
    made (ConfigError)."""

    queues: str | Sequence[str] = _option(
        "*",
        "Comma-separated queues, earlier ones first; * for every queue.",
        env="QUEUES",
        aliases=("-q",),
    )
    concurrency: int = _option(
        DEFAULT_CONCURRENCY,
        "Jobs run at once (threads).",
        env="CONCURRENCY",
        aliases=("-c",),
        type=click.IntRange(1, 1000),
    )
    poll_interval: float = _option(
        DEFAULT_POLL_INTERVAL,
        "Look for ready jobs this often even without a notification.",
        env="POLL_INTERVAL",
        value="duration",
    )
    burst: bool = _option(False, "Exit once nothing is ready.", env="BURST", is_flag=True)
    shutdown_timeout: float | None = _option(
        None,
        "On SIGINT/SIGTERM, wait this long for running jobs, then stop them and put them "
        "back [default: as long as they take].",
        env="SHUTDOWN_TIMEOUT",
        value="duration",
    )
    daily_budget_usd: float | None = _option(
        None,
        "Start no claude job for the rest of the UTC day once the day's jobs cost this much.",
        env="DAILY_BUDGET_USD",
        type=click.FloatRange(0, min_open=True),
    )
    heartbeat_timeout: float = _option(
        DEFAULT_HEARTBEAT_TIMEOUT,
        "A worker silent this long is dead even if its session lingers.",
        env="HEARTBEAT_TIMEOUT",
        value="duration",
    )
    backoff_base: float = _option(
        DEFAULT_BACKOFF_BASE,
        "Retry delay after the first failure; it doubles.",
        env="BACKOFF_BASE",
        value="duration",
    )
    backoff_max: float = _option(
        DEFAULT_BACKOFF_MAX, "Longest retry delay.", env="BACKOFF_MAX", value="duration"
    )
    retention: float = _option(
        DEFAULT_RETENTION,
        "Delete succeeded and cancelled jobs that finished longer ago (0: keep everything).",
        env="RETENTION",
        value="duration, unit needed",
    )
    pr_poll_interval: float = _option(
        DEFAULT_PR_POLL_INTERVAL,
        "Look at each open pull request of a job this often (its state, its CI; 0: never).",
        env="PR_POLL_INTERVAL",
        value="duration",
    )
    health_port: int | None = _option(
        None,
        "Answer a supervisor's probes on this port: GET /healthz and /readyz, with the "
        "worker's state.",
        env="HEALTH_PORT",
        metavar="PORT",
        type=click.IntRange(0, 65535),
    )
    health_host: str = _option(
        "127.0.0.1", "The address of --health-port (0.0.0.0: every interface).", env="HEALTH_HOST"
    )
    schedules: bool = _option(
        True,
        "Fire due schedules (--no-schedules: leave them to other workers).",
        env="SCHEDULES",
        flag="--schedules/--no-schedules",
    )
    notify: str | Sequence[str] = _option(
        (),
        "Tell this URL (repeatable, or comma-separated) when this worker cannot run claude "
        "(worker.unfit) or holds (hold.started, hold.ended); and when a job it runs ends, "
        "unless the job has a --notify of its own.",
        env="NOTIFY",
        metavar="URL",
        multiple=True,
    )
    notify_on: str | Sequence[str] = _option(
        (),
        "Tell --notify only of these events (comma-separated): "
        + ", ".join(_WORKER_EVENTS)
        + "; or finished, attention [default: all].",
        env="NOTIFY_ON",
        metavar="EVENTS",
        multiple=True,
    )
    lock_grace: float = LOCK_GRACE  # (no option: how long a dead worker's lock may linger)

    def notify_json(self) -> str | None:
        """Its ``notify`` column (see _notify_json): whom it tells, of what."""
        urls, on = _comma_separated(self.notify), _comma_separated(self.notify_on)
        if not urls:
            return None
        return json.dumps({"urls": urls, "on": _notify_events(on, _WORKER_EVENTS)})

    def changed(self, **changes: Any) -> WorkerSettings:
        """These settings with ``changes`` (a ConfigError names a keyword that is none)."""
        unknown = sorted(set(changes) - {each.name for each in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"not a worker setting: {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def __post_init__(self) -> None:
        if self.daily_budget_usd is not None and not self.daily_budget_usd > 0:
            raise ConfigError(f"the daily budget must be positive, not {self.daily_budget_usd}")
        if not 1 <= self.concurrency <= 1000:
            raise ConfigError(f"concurrency must be between 1 and 1000, not {self.concurrency}")
        urls, on = _comma_separated(self.notify), _comma_separated(self.notify_on)
        try:
            _check_notify(urls, on, _WORKER_EVENTS, "a worker (a job's or batch's --notify is)")
        except InvalidJob as error:
            raise ConfigError(str(error)) from None
        durations = {
            "poll interval": self.poll_interval,
            "heartbeat timeout": self.heartbeat_timeout,
            "backoff base": self.backoff_base,
            "backoff max": self.backoff_max,
            "shutdown timeout": self.shutdown_timeout or 1.0,
            "retention": self.retention or 1.0,
        }
        for name, seconds in durations.items():
            if not 0 < seconds <= MAX_DURATION:
                raise ConfigError(f"the {name} must be between 0 and {MAX_DURATION:g}s")
        grace = self.lock_grace
        if self.heartbeat_timeout < grace or grace <= FENCE_MARGIN + HEARTBEAT_INTERVAL:
            raise ConfigError(
                f"the heartbeat timeout must be at least {grace:g}s "
                f"and the lock grace more than {FENCE_MARGIN + HEARTBEAT_INTERVAL:g}s"
            )


def _unfit_handlers(handlers: Mapping[str, Handler]) -> list[tuple[str, str]]:
    """Ask each handler whether it can run here: log its caveats, and say why for each that
    cannot, (kind, why)."""
    unfit = []
    for kind, handler in handlers.items():
        caveats = getattr(handler, "caveats", None)
        for caveat in caveats() if callable(caveats) else []:
            logger.warning("%s", caveat, extra={"fields": {"event": "caveat", "kind": kind}})
        check = getattr(handler, "unfit", None)
        reason = check() if callable(check) else None
        if reason:
            logger.error(
                "this worker cannot run %s jobs: %s",
                kind,
                reason,
                extra={"fields": {"event": "unfit", "kind": kind, "reason": reason}},
            )
            unfit.append((kind, reason))
    return unfit


class Worker:
    """Runs queued jobs with a pool of threads until stopped.

    It is a few parts, each with one job, on threads of its own (see the map at the top of
    the module): the dispatcher claims and records in rounds, in the thread that calls
    ``run()``; ``concurrency`` runners run handlers; the session holds the worker's lease
    (advisory lock, heartbeat, LISTEN, recovery of dead workers); a watchdog fences the lease
    when heartbeats stop getting through; a janitor unblocks jobs races left blocked and
    deletes old ones. What they share is in the book and the holds, each behind its lock.

    ``run()`` works until ``stop()``; ``run_once()`` runs what is ready now (then use the
    worker as a context manager, or call ``close()``).
    """

    def __init__(
        self,
        database_url: str,
        *,
        handlers: Mapping[str, Handler] | None = None,
        claude_bin: str = DEFAULT_CLAUDE_BIN,
        allow_dirs: Sequence[str | Path] = (),
        settings: WorkerSettings | None = None,
        **changes: Any,
    ) -> None:
        """``handlers``: by default claude's (with ``claude_bin`` and ``allow_dirs``) and every
        registered kind's; ``settings``, or any of its fields as keywords (``concurrency=10``):
        how it works (see WorkerSettings)."""
        check_conninfo(database_url)
        self.settings = settings = (settings or WorkerSettings()).changed(**changes)
        self.queues = _parse_queues(settings.queues)
        self.concurrency = settings.concurrency
        self.handlers: dict[str, Handler] = (
            dict(handlers)
            if handlers is not None
            else default_handlers(claude_bin=claude_bin, allow_dirs=allow_dirs)
        )
        if not self.handlers:
            raise ConfigError("a worker needs at least one handler")
        _webhook_key()  # (a CLAUDE_JOBS_WEBHOOK_SECRET that is none: said before anything starts)
        self._conninfo = database_url
        policies = {DEFAULT_KIND: ClaudePolicy(settings.daily_budget_usd)}
        self._shared = shared = _Shared(
            settings, database_url, self.handlers,
            policies if DEFAULT_KIND in self.handlers else {},
        )  # fmt: skip
        self.host, self.name = shared.host, shared.name
        # (what the worker's parts share, as the worker itself knows them)
        self._book, self._holds, self._pulse = shared.book, shared.holds, shared.pulse
        self._threads = shared.threads
        self._pool: ConnectionPool | None = None
        self._session: _Session | None = None
        self._runners: _Runners | None = None
        self._dispatcher: _Dispatcher | None = None
        self._health: _HealthServer | None = None
        self._checked = False  # its handlers were asked whether they can run here

    # -- public API -----------------------------------------------------------------------

    @property
    def id(self) -> uuid.UUID | None:
        """This worker's current registration, once connected."""
        return self._session.worker_id if self._session else None

    @property
    def failure(self) -> JobsError | None:
        """What made the worker stop on its own (its session failed), if anything."""
        return self._session.fatal if self._session else None

    @property
    def idle_because(self) -> str | None:
        """After a burst: why it ran nothing though jobs were ready (it cannot run them)."""
        return self._dispatcher.idle_because if self._dispatcher else None

    def run(self) -> None:
        """Work until stop() (in burst mode: until nothing is ready), then shut down cleanly:
        running jobs finish, or on a forced stop go back to the queue unspent."""
        try:
            if self._open():
                assert self._dispatcher is not None
                self._dispatcher.work(self._shared.stop, self.settings.burst)
        except BaseException:
            self.stop(force=True)  # going down on an error: stop the jobs, put them back
            raise
        finally:
            leftovers = self._drain()
            self.close(leave=not leftovers)
        if self.failure:
            raise self.failure

    def run_once(self) -> int:
        """Claim the jobs that are ready now (up to the concurrency; once jobs showed they are
        quick, as many again: see CLAIM_AHEAD_BELOW), run them to the end, and return how many
        there were."""
        if not self._open():
            return 0
        assert self._dispatcher is not None
        claimed = self._dispatcher.round(claiming=True) or 0
        self._dispatcher.finish(until=None)
        return claimed

    def stop(self, force: bool = False) -> None:
        """Stop claiming and let running jobs finish; with ``force``, stop them now and put
        them back in the queue without spending an attempt. Safe from any thread."""
        self._shared.request_stop(force)

    def drain(self) -> None:
        """Asked to drain (`claude-jobs drain`): stop claiming, and exit once the running jobs
        end (as stop() does). Safe from any thread."""
        self._shared.drain()

    def health(self) -> dict[str, Any]:
        """What a supervisor probes (--health-port): ``ready`` while the lease holds, the last
        heartbeat reached the database within the lock grace, no part of it is in ``trouble``
        (a thread died, or failed FAILING_PASSES passes in a row) and it is not draining; the
        jobs it runs; how long ago its last heartbeat got through. Safe from any thread."""
        session = self._session
        silent = _lease_clock() - session.last_ok if session is not None else None
        lease = bool(session is not None and session.alive)
        draining = self._shared.stop.is_set()
        fresh = silent is not None and silent < self.settings.lock_grace
        trouble = self._pulse.trouble()
        return {
            "worker_id": str(self.id) if self.id else None, "name": self.name,
            "ready": lease and fresh and not draining and trouble is None, "lease": lease,
            "draining": draining, "trouble": trouble, "running": self._book.counts()[0],
            "concurrency": self.concurrency,
            "last_heartbeat_seconds_ago": None if silent is None else round(silent, 3),
        }  # fmt: skip

    def close(self, leave: bool = True) -> None:
        """Stop the threads, deregister (unless ``leave`` is False: then the registration is
        left for other workers to reap) and close the connections. Idempotent."""
        shared = self._shared
        if shared.closed.is_set() or self._session is None:
            shared.closed.set()
            if self._health is not None:
                self._health.close()
                self._health = None
            return
        if self._dispatcher is not None and not shared.force.is_set():
            self._dispatcher.finish(until=time.monotonic() + 5.0)  # what is left to write
        shared.closed.set()
        assert self._pool is not None and self._runners is not None
        self._runners.stop()
        deadline = time.monotonic() + 2.0
        for thread in self._threads:  # a handler that ignores its stop event is left behind
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._session.close(leave)
        self._session.join(timeout=5.0)
        self._pool.close(timeout=5.0)
        if self._health is not None:
            self._health.close()
            self._health = None
        logger.info("worker %s stopped", self.name, extra={"fields": {"event": "stopped"}})

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lifecycle ------------------------------------------------------------------------

    def _open(self) -> bool:
        """Start the parts once; wait until registered. False when stopped before that."""
        if self._session is None:
            self._start()
        assert self._session is not None
        while not self._session.ready.wait(0.1):
            if self._session.fatal:
                raise self._session.fatal
            if self._shared.stop.is_set():
                return False
        if not self._checked:
            self._checked = True
            self._check_fitness()
        return True

    def _start(self) -> None:
        if self.settings.health_port is not None:  # (first: a port in use stops nothing)
            self._health = _HealthServer(self, self.settings.health_host, self.settings.health_port)
            self._health.start()
            logger.info("answering health checks on %s:%d (/healthz, /readyz)",
                        self.settings.health_host, self._health.port)  # fmt: skip
        # (by which a reaper finds this process's sessions, the token first: TERMINATE_VANISHED)
        token = uuid.uuid4().hex[:8]
        options = {"application_name": f"claude-jobs worker {token} {self.name}"[:63]}
        from psycopg_pool import ConnectionPool

        shared = self._shared
        self._pool = shared.pool = ConnectionPool(
            self._conninfo,
            min_size=1,
            max_size=self.concurrency + 4,  # (and the dispatcher, janitor, scheduler, notifier)
            open=False,
            kwargs={"autocommit": True, **_CONNECT_OPTIONS, **options},
            configure=_configure_worker_connection,
            name="claude-jobs",
            timeout=10.0,
        )
        self._pool.open(wait=False)
        self._runners = _Runners(shared, self.handlers, self.concurrency)
        self._session = shared.session = _Session(
            self._conninfo,
            identity={"host": self.host, "pid": os.getpid(), "queues": list(self.queues),
                      "kinds": self._holds.kinds, "concurrency": self.concurrency,
                      "notify": self.settings.notify_json()},
            options=options,
            on_notify=self._notified,
            on_reaped=lambda epoch: shared.fence(epoch, "another worker declared it dead"),
            on_drain=shared.drain,
            before_leaving=self._leaving,
            grace=self.settings.lock_grace,
            heartbeat_timeout=self.settings.heartbeat_timeout,
            pulse=shared.pulse,
        )  # fmt: skip
        self._dispatcher = _Dispatcher(
            shared, self._session, self._runners, self.queues, self.concurrency
        )
        self._session.start()
        self._runners.start()
        self._threads.append(_Watchdog(shared, self._session))
        self._threads.append(_Janitor(shared))
        self._threads.append(_Notifier(shared))
        if self.settings.schedules:
            self._threads.append(_Scheduler(shared))
        for thread in self._threads[self.concurrency :]:
            thread.start()
        logger.info(
            "worker %s started: queues=%s kinds=%s concurrency=%d",
            self.name,
            ",".join(self.queues),
            ",".join(self._holds.kinds),
            self.concurrency,
            extra={"fields": {"event": "started", "worker": self.name, "queues": self.queues,
                              "kinds": self._holds.kinds, "concurrency": self.concurrency}},
        )  # fmt: skip

    def _notified(self, payload: str) -> None:
        if self._dispatcher is not None:
            self._dispatcher.on_notify(payload)

    def _leaving(self) -> None:
        """Before the session lets its lock go: write what the runners finished."""
        if self._dispatcher is not None:
            self._dispatcher.flush(LEAVE_FLUSH_TIMEOUT)

    def _check_fitness(self) -> None:
        """Before any job comes: a handler that cannot run at all on this worker (claude is
        missing, say) makes the worker back off its kind as after a WorkerUnfit."""
        for kind, reason in _unfit_handlers(self.handlers):
            seconds = self._holds.back_off(kind)
            if seconds is not None:
                self._shared.hold_here(kind, seconds, reason, unfit=True)

    def _drain(self) -> int:
        """Wait for running jobs to finish and their outcomes to be written; at the shutdown
        timeout, or on a forced stop, stop them (they go back to the queue unspent). Returns
        how many are still running in handlers that ignore their stop event."""
        if self._dispatcher is None:
            return 0
        force = self._shared.force
        held, busy, _ = self._book.counts()
        if held and not force.is_set():
            logger.info(
                "stopping: waiting for %d running job(s) to finish%s; a second Ctrl-C (or "
                "SIGTERM) stops them now and puts them back in the queue",
                busy,
                f" (at most {self.settings.shutdown_timeout:g}s)"
                if self.settings.shutdown_timeout
                else "",
                extra={"fields": {"event": "stopping"}},
            )
        timeout = self.settings.shutdown_timeout
        self._dispatcher.finish(until=None if timeout is None else time.monotonic() + timeout)
        if not self._book.counts()[0]:
            return 0
        if not force.is_set():
            logger.warning("the shutdown timeout has passed")
        force.set()
        if self._book.counts()[1]:
            logger.warning(
                "stopping %d running job(s) now; they go back to the queue",
                self._book.counts()[1],
                extra={"fields": {"event": "forced stop"}},
            )
        for attempt in self._book.attempts():
            attempt.context.request_stop(STOP_SHUTDOWN)
        end = time.monotonic() + FORCED_KILL_GRACE + 2.0
        while self._book.counts()[0] and time.monotonic() < end:
            self._book.wake.clear()
            self._dispatcher.round(claiming=False)
            self._book.wake.wait(0.1)
        leftovers = self._book.counts()[1]
        if leftovers:
            logger.error(
                "%d handler(s) ignore their stop event and still run; their jobs stay "
                "claimed until this process exits, then other workers recover them",
                leftovers,
            )
        return leftovers


###############################################################################
# Logging
###############################################################################


#: Characters a terminal acts on instead of showing them: C0 controls but newline and tab,
#: DEL, C1 controls (0x9b is CSI), and the bidirectional overrides and isolates.
_TERMINAL_CONTROLS = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)
#: Of those, the ones json.dumps(ensure_ascii=False) leaves as they are.
_JSON_RAW_CONTROLS = re.compile("[\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _printable(text: str) -> str:
    """``text`` safe for a terminal: every control character written as an escape (\\x1b, \\u202e),
    so that what jobs contain (prompts, transcripts from untrusted repositories and web pages,
    errors) can neither set the window title, write the clipboard nor redraw the screen."""
    return _TERMINAL_CONTROLS.sub(lambda m: repr(m.group())[1:-1], text)


def _json_text(value: Any) -> str:
    """``value`` as one line of JSON that is safe for a terminal too: the same data, with the
    control characters json.dumps leaves raw written as \\u escapes."""
    text = json.dumps(_jsonable(value), ensure_ascii=False, default=str)
    return _JSON_RAW_CONTROLS.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


class _TextFormatter(logging.Formatter):
    """``time level message``, the time formatted once a second (a worker logs a lot)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s")
        self._stamp = (-1, "")  # (second, its text): one value, as threads format at once

    def format(self, record: logging.LogRecord) -> str:
        return _printable(super().format(record))

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second, stamp = self._stamp
        if second != int(record.created):
            second = int(record.created)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._stamp = (second, stamp)
        return f"{stamp},{int(record.msecs):03d}"


class _JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, the event's fields and the message."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC)
        data = {
            "time": when.isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            **getattr(record, "fields", {}),
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return _json_text(data)


class _LogWriter(logging.Handler):
    """Formats a line in the thread that logs it, and leaves the writing to a thread of its
    own ("claude-jobs-log"), which writes every line waiting at once: a job thread never
    waits for the terminal or the disk (nor hands the interpreter lock over to write). The
    lines still waiting when the process exits are written first (close(), which logging
    calls at exit); a SIGKILL loses those of its last moments, some milliseconds: the
    database is the record of truth."""

    def __init__(self, stream: Any, formatter: logging.Formatter) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self._stream = stream
        # lines; an event to set once the lines before it are written (flush); None: the end
        self._lines: queue_module.SimpleQueue[str | threading.Event | None] = (
            queue_module.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._write, name="claude-jobs-log", daemon=True)
        self._thread.start()

    def handle(self, record: logging.LogRecord) -> bool:
        # (no handler lock: formatting is thread-safe, and so is the queue)
        if self.filter(record):
            self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.put(self.format(record))
        except Exception:
            self.handleError(record)

    def _write(self) -> None:
        ended = False
        while not ended:
            batch = [self._lines.get()]
            with contextlib.suppress(queue_module.Empty):
                while isinstance(batch[-1], str) and len(batch) < 1000:
                    batch.append(self._lines.get_nowait())
            ended = batch[-1] is None
            lines = [line for line in batch if isinstance(line, str)]
            if lines:
                with contextlib.suppress(OSError, ValueError):  # a closed or broken stream
                    self._stream.write("\n".join(lines) + "\n")
                    self._stream.flush()
            if isinstance(batch[-1], threading.Event):
                batch[-1].set()

    def flush(self) -> None:
        """Return once the lines logged so far are written (or after a second)."""
        if self._thread.is_alive():
            written = threading.Event()
            self._lines.put(written)
            written.wait(1.0)

    def close(self) -> None:
        """Write what is waiting, then stop the writer."""
        if self._thread.is_alive():
            self._lines.put(None)
            self._thread.join(timeout=5.0)
        super().close()


def configure_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    """Log to stderr as text or JSON lines, written off the job threads' way (_LogWriter).
    The library never calls this; the CLI does."""
    formatter = _JsonFormatter() if log_format == "json" else _TextFormatter()
    # Nothing we print uses them, and a busy worker logs thousands of lines a second.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, _LogWriter):  # (an earlier call's: its lines written first)
            handler.close()
    root.handlers[:] = [_LogWriter(sys.stderr, formatter)]
    root.setLevel(logging.WARNING)
    logger.setLevel(level)
    # The pool reports each failed reconnection; the worker already says the database is away.
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)


###############################################################################
# Presentation: how jobs and transcripts read to people (the command line, the dashboard)
###############################################################################


def _excerpt(job: Job) -> str:
    """A job's prompt (claude) or payload, on one line."""
    text = job.payload.get("prompt") if job.kind == DEFAULT_KIND else None
    if not isinstance(text, str):
        text = json.dumps(job.payload, ensure_ascii=False)
    return " ".join(text.split())


def _when(job: Job, now: datetime) -> str:
    """When a job last moved: run_at when it waits for it, else its latest timestamp."""
    if job.status == JobStatus.QUEUED and job.run_at > now:
        return _ago(job.run_at, now)
    return _ago(job.finished_at or job.started_at or job.created_at, now)


def _render_event(
    line: str, last_words: str = "", full: bool = False
) -> tuple[list[str], str | None]:
    """One line of claude's stream-json transcript, as a person reads it, and claude's new
    last words when the line is a message of claude's. The result repeats ``last_words``:
    they are not printed twice. ``full``: a tool's output whole (see _render_block)."""
    try:
        event = json.loads(line)
    except ValueError:
        return ([line] if line.strip() else []), None
    if not isinstance(event, dict):
        return [line], None
    shown = _render_parsed(event, last_words, full)
    return shown, "\n".join(shown) if event.get("type") == "assistant" else None


def _render_parsed(event: Mapping[str, Any], last_words: str, full: bool = False) -> list[str]:
    kind, subtype = event.get("type"), event.get("subtype")
    if kind == "claude_jobs":  # the worker's mark: an attempt (or a round of repair) begins
        repair = f", repair round {event['repair']}" if "repair" in event else ""
        worker = event.get("worker", "?")
        return [f"── attempt {event.get('attempt', '?')}{repair} (worker {worker}) ──"]
    if kind == "check":  # a check begins or ends (see _Checks)
        if event.get("event") == "start":
            return [f"── check, round {event.get('round', '?')}: $ {event.get('command', '?')}"]
        status, seconds = event.get("status"), event.get("seconds") or 0
        verdict = "passed" if status == 0 else f"failed: exited {status}"
        return [f"   check {verdict} ({seconds:.1f}s)"]
    if kind == "check_output":
        return [f"   │ {event.get('line', '')}"]
    if kind == "system" and subtype == "init":
        model, cwd = event.get("model", "?"), event.get("cwd", "?")
        return [f"· session {event.get('session_id', '?')} · model {model} · {cwd}"]
    if kind == "system" and subtype == "api_retry":
        return [
            f"· API error {event.get('error_status', '?')} ({event.get('error', '?')}): "
            f"retry {event.get('attempt', '?')} of {event.get('max_retries', '?')}"
        ]
    if kind == "rate_limit_event":
        info = event.get("rate_limit_info")
        info = info if isinstance(info, dict) else {}
        resets = info.get("resetsAt")
        if isinstance(resets, int | float):
            with contextlib.suppress(OverflowError, ValueError, OSError):  # (none a clock holds)
                resets = f"{datetime.fromtimestamp(resets).astimezone():%Y-%m-%d %H:%M %Z}"
        return [f"· rate limit {info.get('status', '?')}, resets {resets or '?'}"]
    if kind in ("assistant", "user"):
        content = (event.get("message") or {}).get("content")
        blocks = content if isinstance(content, list) else []
        return [
            text
            for block in blocks
            if isinstance(block, dict)
            for text in _render_block(block, full)
        ]
    if kind == "result":
        said = event.get("result")
        said = said if isinstance(said, str) else "; ".join(map(str, event.get("errors") or []))
        if said.strip() == last_words.strip():
            said = ""
        cost = event.get("total_cost_usd") or 0
        summary = (
            f"· {'error (' if event.get('is_error') else ''}{event.get('subtype', 'result')}"
            f"{')' if event.get('is_error') else ''} · {event.get('num_turns', '?')} "
            f"turns · {_money(cost)} · {(event.get('duration_ms') or 0) / 1000:.1f}s"
        )
        return [*said.splitlines(), summary]
    return []


#: A tool's output shown whole (logs --full, the dashboard): its lines after the first, each
#: under its first line with this mark, at most MAX_TOOL_LINES of them.
TOOL_OUTPUT_MARK, MAX_TOOL_LINES = "    │ ", 500


def _render_block(block: Mapping[str, Any], full: bool = False) -> list[str]:
    """One block of a message: text, a tool call on one line, a tool's output on one line
    (``full``: and its other lines, marked; else how many there are)."""
    kind = block.get("type")
    if kind == "text":
        return str(block.get("text", "")).splitlines()
    if kind == "tool_use":
        arguments = block.get("input") or {}
        shown = next(
            (str(arguments[k]) for k in ("command", "file_path", "pattern", "url", "path")
             if k in arguments),
            json.dumps(arguments, ensure_ascii=False),
        )  # fmt: skip
        return [f"→ {block.get('name', 'tool')}: {' '.join(shown.split())[:200]}"]
    if kind == "tool_result":
        result = block.get("content")
        if isinstance(result, list):
            result = " ".join(
                str(part.get("text", "")) for part in result if isinstance(part, dict)
            )
        lines = str(result or "").splitlines() or [""]
        more = f" (+{len(lines) - 1} lines)" if len(lines) > 1 else ""
        mark = "✗" if block.get("is_error") else "←"
        head = f"  {mark} {lines[0][:160]}{more}"
        if not full:
            return [head]
        rest = [TOOL_OUTPUT_MARK + line for line in lines[1 : MAX_TOOL_LINES + 1]]
        if len(lines) > MAX_TOOL_LINES + 1:
            rest.append(f"{TOOL_OUTPUT_MARK}… ({len(lines) - 1 - MAX_TOOL_LINES} more lines)")
        return [head, *rest]
    return []


class _TranscriptPrinter:
    """Turns transcript text, however it arrives in pieces, into readable lines (``full``:
    tools' output whole)."""

    def __init__(self, full: bool = False) -> None:
        self._partial = ""
        self._last_words = ""  # the text of claude's last message
        self._full = full

    def feed(self, text: str) -> list[str]:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        return [shown for line in lines for shown in self._render(line)]

    @property
    def pending(self) -> int:
        """Characters of a line not complete yet (not rendered)."""
        return len(self._partial)

    def flush(self) -> list[str]:
        rest, self._partial = self._partial, ""
        return self._render(rest) if rest else []

    def _render(self, line: str) -> list[str]:
        shown, last_words = _render_event(line, self._last_words, self._full)
        if last_words is not None:
            self._last_words = last_words
        return [_printable(each) for each in shown]


def _stored_transcript(job: Job, full: bool = False) -> list[str]:
    """The kept tail of a job's transcript, rendered (``full``: tools' output whole); its
    first line may have been cut."""
    text = job.transcript or ""
    lines = []
    if job.transcript_size > len(text):
        lines.append(f"… ({job.transcript_size - len(text):,} earlier characters not kept)")
        text = text.split("\n", 1)[1] if "\n" in text else ""
    printer = _TranscriptPrinter(full)
    return [*lines, *printer.feed(text), *printer.flush()]


def _dependency(job: Job) -> str:
    """The jobs a job waits for, or waited for, by the first 8 digits of their ids."""
    waits = [f"after {','.join(str(i)[:8] for i in job.after)}"] if job.after else []
    if job.continue_from:
        waits.append(f"continues {str(job.continue_from)[:8]}")
    return "; ".join(waits)


def _job_rows(
    job: Job, seen: _Circumstances, reason: Waiting | None = None
) -> list[tuple[str, str]]:
    """A job as a person reads it, row by row (``seen``: the paused queues, the status of
    each job it waits for and the host that keeps its claude session; ``reason``: why it waits
    or ended so); the second row is its status."""

    def when(moment: datetime | None) -> str:
        return f"{moment.astimezone():%Y-%m-%d %H:%M:%S %Z} ({_ago(moment)})" if moment else "-"

    reason_text = reason.text if reason else None
    # (the error that ended it; an earlier attempt's error is that attempt's, see
    # _attempt_lines, and why a queued job waits is its reason)
    ended_by = job.last_error if job.status in (JobStatus.FAILED, JobStatus.CANCELLED) else None
    outcome = f"{_status_of(job, seen.paused)}, attempt {job.attempts} of {job.max_attempts}"
    if job.status == JobStatus.QUEUED and job.run_at > datetime.now(UTC):
        outcome += f", runs {_ago(job.run_at)}"
    if job.cancel_requested_at and job.status == JobStatus.RUNNING:
        outcome += ", cancel requested"
    rows = [
        ("job", f"{job.id} · {job.kind} · queue {job.queue} · priority {job.priority}"),
        ("status", outcome),
        *([("why", reason.text)] if reason else []),
        *([("error", ended_by)] if ended_by and ended_by != reason_text else []),
        ("created", when(job.created_at)),
        ("started", when(job.started_at)),
        ("finished", when(job.finished_at)),
        ("worker", job.worker or "-"),
    ]
    if job.started_at and job.finished_at:
        rows.append(("took", f"{(job.finished_at - job.started_at).total_seconds():.1f}s"))
    return rows + _chain_rows(job, seen.awaited) + _content_rows(job)


def _describe(
    job: Job,
    seen: _Circumstances,
    reason: Waiting | None = None,
    paint: Callable[[str, str], str] = lambda text, status: text,
) -> str:
    """A job as `show` prints it: its rows, its failed attempts, the end of its transcript;
    ``paint`` colours its status (and nothing of the job's)."""
    rows = _job_rows(job, seen, reason)
    status = _status_of(job, seen.paused)
    lines = [
        f"{name:<9} {_indent(_printable(str(value)), 10)}" if name != "status"
        else f"{name:<9} {paint(status, status)}{value[len(status) :]}"
        for name, value in rows
    ]  # fmt: skip
    lines += _attempt_lines(job)
    if job.transcript:
        lines.append("transcript (the end):")
        lines.extend(f"  {line}" for line in _stored_transcript(job)[-15:])
    return "\n".join(lines)


def _chain_rows(
    job: Job, awaited: Mapping[uuid.UUID, tuple[str, str | None]]
) -> list[tuple[str, str]]:
    """What a job waits for or continues, what that widens, and its concurrency key."""
    rows = [
        (("after", f"{waited} ({awaited.get(waited, ('gone',))[0]})")) for waited in job.after or []
    ]
    if job.continue_from:
        status, host = awaited.get(job.continue_from, ("gone", None))
        text = f"{job.continue_from} ({status}), resuming its session"
        if job.status == JobStatus.QUEUED and host:
            text += f", kept on {host}: only a worker there can run it"
        rows.append(("continues", text))
    if job.widens:
        rows.append(("widens", "; ".join(job.widens)))
    if job.concurrency_key is not None:
        rows.append(("key", f"{job.concurrency_key} (at most {job.concurrency_limit} at once)"))
    return rows


def _content_rows(job: Job) -> list[tuple[str, str]]:
    """What a job was asked (a claude job: where, its prompt and options) and what it gave."""
    rows = []
    if job.kind == DEFAULT_KIND:
        rows.append(("cwd", job.payload.get("cwd") or "(the worker's directory)"))
        if job.worktree or job.payload.get("worktree"):
            rows.append(("branch", _branch_text(job)))
        rows.append(("prompt", job.payload.get("prompt", "")))
        options = {k: v for k, v in job.payload.items() if CLAUDE_PAYLOAD[k][1] or k == "env"}
        if options:
            rows.append(("options", json.dumps(options, ensure_ascii=False)))
    else:
        rows.append(("payload", json.dumps(job.payload, ensure_ascii=False)))
    result = job.result
    if isinstance(result, dict) and result.get("type") == "result":
        said = result.get("result") or "; ".join(map(str, result.get("errors") or []))
        rows.append(("result", said))
        rows.append(("turns", str(result.get("num_turns", "-"))))
    elif result is not None:
        rows.append(("result", json.dumps(result, ensure_ascii=False)))
    if job.kind == DEFAULT_KIND:
        rows.append(("cost", _money(job.cost_usd)))
        rows.append(("session", job.session_id or "-"))
    if job.payload.get("checks") and job.kind == DEFAULT_KIND:
        rows.append(("checks", _checks_text(job)))
    if job.delivery or (job.payload.get("push") and job.kind == DEFAULT_KIND):
        rows.append(("delivery", _delivery_text(job)))
    if job.notify:
        urls = ", ".join(_without_credentials(url) for url in job.notify.get("urls", []))
        rows.append(("notifies", f"{urls} of {', '.join(job.notify.get('on') or ['its end'])}"))
    if job.tags:
        rows.append(("tags", ", ".join(job.tags)))
    return rows


def _checks_mark(job: Job) -> str:
    """A job's checks in a word or two (for `list`): passed, failed, or the round it is in."""
    state = job.checks or {}
    phase, number = state.get("phase"), state.get("round", 0)
    if not job.payload.get("checks"):
        return "-"
    if phase in ("passed", "failed"):
        return f"{phase}" + (f" (round {number})" if number else "")
    if phase in ("checks", "repair"):
        return f"round {number}" if number else "running"
    return "to run"


def _checks_text(job: Job) -> str:
    """Each check of a job with its result per round (for `show`)."""
    state = job.checks or {}
    rounds = job.payload.get("check_rounds", DEFAULT_CHECK_ROUNDS)
    lines = [f"{_checks_mark(job)}; at most {rounds} round{'s' * (rounds != 1)} of repair"]
    for run in state.get("runs") or []:
        verdict = "passed" if run.get("status") == 0 else f"exited {run.get('status')}"
        took = f"{run.get('seconds', 0):.1f}s"
        line = f"round {run.get('round')}: {run.get('command')} {verdict} ({took})"
        lines.append(line + (f": {run['failure']}" if run.get("failure") else ""))
    if not state.get("runs"):
        lines += [f"{command} (not run yet)" for command in job.payload.get("checks") or []]
    return "\n".join(lines)


def _pr_mark(job: Job) -> str:
    """A job's delivery in a few words (for `list`): its pull request and its state, or how
    far it got."""
    delivery = job.delivery or {}
    pr = delivery.get("pr")
    if pr:
        ci = f", CI {pr['ci']}" if pr.get("ci") else ""
        return f"#{pr.get('number')} {pr.get('state', 'open')}{ci}"
    if delivery.get("error"):
        return "delivery failed"
    return "pushed" if delivery.get("pushed") else "-"


def _delivery_text(job: Job) -> str:
    """What was delivered of a job, or why not (for `show`)."""
    delivery = job.delivery
    if not delivery:
        to = "a pull request" if job.payload.get("pr") else f"a push to {job.payload.get('push')}"
        return f"{to}, once the job succeeds"
    lines = []
    if delivery.get("pushed"):
        sha = str(delivery.get("sha", ""))[:12]
        lines.append(f"pushed {delivery.get('branch')} ({sha}) to {delivery.get('remote')}")
    if pr := delivery.get("pr"):
        draft = " (draft)" if pr.get("draft") else ""
        lines.append(f"pull request #{pr.get('number')}{draft}: {pr.get('url')}")
        state = f"{pr.get('state', 'open')}" + (f", CI {pr['ci']}" if pr.get("ci") else "")
        polled = ""
        if pr.get("polled_at"):
            polled = f" (looked at {_ago(datetime.fromisoformat(pr['polled_at']))})"
        lines.append(f"state: {state}{polled}" + (f": {pr['error']}" if pr.get("error") else ""))
    if delivery.get("error"):
        lines.append(
            f"failed: {delivery['error']} (deliver it again: claude-jobs deliver {job.id})"
        )
    return "\n".join(lines)


def _attempt_lines(job: Job) -> list[str]:
    """A line for each attempt that ended in an error: where, when, how long, what error."""
    lines = []
    for entry in job.errors:
        at = datetime.fromisoformat(entry["at"]) if entry.get("at") else None
        when = [entry.get("worker") or "?", _ago(at)]
        if at and entry.get("started"):
            took = (at - datetime.fromisoformat(entry["started"])).total_seconds()
            when.append(f"took {_duration_text(took) if took >= 60 else f'{took:.1f}s'}")
        lines.append(
            _printable(f"attempt {entry.get('attempt')} ({', '.join(when)}): ")
            + _indent(_printable(str(entry.get("error"))), 4)
        )
    return lines


def _branch_text(job: Job) -> str:
    """The branch of a worktree job, whether it has new commits, and where its worktree is
    while it exists."""
    tree = job.worktree
    if not tree and job.status in FINISHED_STATUSES:
        return "none: the job ended before it made one"
    if not tree:
        return "(made when the job runs)"
    text = tree["branch"]
    if "commits" in tree:
        commits = tree["commits"]
        text += f" ({commits} new commit{'s' * (commits != 1)})" if commits else " (no new commits)"
    if tree.get("uncommitted"):
        text += f"; uncommitted changes are left in {tree['path']}"
    elif tree.get("kept") or "commits" not in tree:
        text += f"; worktree {tree['path']}"
    return text


def _indent(text: str, width: int) -> str:
    return text.replace("\n", "\n" + " " * width)


###############################################################################
# HTTP: the dashboard, the JSON API, /metrics and health checks (claude-jobs serve)
###############################################################################

#: A followed job and the overview are looked at this often even when no notice wakes the
#: server (a job that is claimed, or ends without a transcript, sends none).
WEB_POLL_INTERVAL = 2.0
#: The overview is read at most this often, however often notices wake it.
OVERVIEW_INTERVAL = 1.0
#: An idle event stream sends a comment this often, so that proxies keep it open.
KEEPALIVE_INTERVAL = 15.0
#: Connections the server's requests share (the one that listens comes on top).
WEB_POOL_SIZE = 2
#: The largest page of jobs the API gives.
MAX_PAGE = 500
#: The most of a prompt (on one line) a job's summary gives.
EXCERPT_LIMIT = 500
#: The largest request body the server reads (serve --max-body).
DEFAULT_MAX_BODY = 10 * 1024 * 1024
#: A client has this long (serve --client-timeout) to send a request's line and headers, on a
#: new connection or a kept one, and then each piece of its body: one slower (or that stops
#: half way) is dropped.
DEFAULT_CLIENT_TIMEOUT = 10.0
#: The host names every server answers to (and any IP address: a page cannot rebind one).
LOCAL_HOST_NAMES = ("localhost",)
#: What the server needs besides the core: the `web` extra.
WEB_EXTRA_HINT = "claude-jobs serve needs the web extra: pip install 'claude-jobs[web]'"


class _HTTPError(JobsError):
    """A request the server refuses, with its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


#: How each library error reads over HTTP.
_HTTP_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (NotFound, 404),
    (WrongState, 409),
    (InvalidJob, 422),
    (ConfigError, 422),
    (DatabaseUnavailable, 503),
    (DeliveryError, 502),  # GitHub or the remote refused, or cannot be reached
    (psycopg.DataError, 400),  # a value PostgreSQL cannot take
    (psycopg.errors.ProgramLimitExceeded, 400),  # one too large for its index
    (psycopg.OperationalError, 503),
    (JobsError, 400),
)


def _http_status(error: BaseException) -> int:
    if isinstance(error, _HTTPError):
        return error.status
    if type(error).__name__ == "PoolTimeout":  # (psycopg_pool's: the database is unreachable)
        return 503
    return next(status for kind, status in _HTTP_STATUS if isinstance(error, kind))


def _sse(event: str, data: Any, event_id: int | None = None) -> str:
    """One Server-Sent Event (JSON keeps the data on one line)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, default=_jsonable)}\n\n"


class _Feed:
    """What one followed job (or the overview) looks like now, read once however many
    streams follow it. ``text``: the transcript's kept tail, from character ``base`` on.
    Lives on the event loop; its reads run on threads."""

    def __init__(self, read: Callable[[int], Any], take: Callable[[_Feed, Any], bool]) -> None:
        self._read, self._take = read, take  # (a read, on a thread; what it read, on the loop)
        self.version = 0  # bumped by every read that changed something
        self.followers = 0
        self.state: Any = None
        self.text, self.base, self.size = "", 0, 0
        self.error: BaseException | None = None
        self._changed: Any = None  # an asyncio.Event, made on the loop
        self._reading = self._again = False
        self._read_at = 0.0

    def text_since(self, seen: int) -> tuple[str, int]:
        """The transcript after the first ``seen`` characters, and how many went past unseen."""
        if seen < self.base:
            return self.text, self.base - seen
        return self.text[seen - self.base :], 0

    def take_update(self, update: FollowUpdate) -> bool:
        """A job's new state and the transcript it gained; whether anything changed."""
        grew = bool(update.text or update.skipped)
        if update.skipped:  # (only the kept tail was there to read)
            self.text, self.base = update.text, self.size + update.skipped
        else:
            self.text += update.text
        self.size += len(update.text) + update.skipped
        if len(self.text) > TRANSCRIPT_LIMIT:
            self.base += len(self.text) - TRANSCRIPT_LIMIT
            self.text = self.text[-TRANSCRIPT_LIMIT:]
        moved = self.state is None or update.state != self.state.state
        self.state = update
        return grew or moved

    def take_overview(self, overview: dict[str, Any]) -> bool:
        changed, self.state = overview != self.state, overview
        return changed

    async def changed(self, version: int, timeout: float) -> None:
        """Wait until the version is not ``version`` (or ``timeout`` passes)."""
        import asyncio

        if self._changed is None:
            self._changed = asyncio.Event()
        while self.version == version:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                return

    async def ready(self) -> None:
        """Wait until it was read once (or failed to be)."""
        while self.state is None and self.error is None:
            if self._reading:
                await self.changed(self.version, 1.0)
            else:
                await self.refresh()

    async def refresh(self, at_most_every: float = 0.0) -> None:
        """Read it again (once, however many ask at once; then again if asked meanwhile)."""
        import asyncio

        from starlette.concurrency import run_in_threadpool

        if self._reading:
            self._again = True
            return
        self._reading = True
        try:
            while True:
                self._again = False
                if wait := self._read_at + at_most_every - time.monotonic():
                    await asyncio.sleep(max(0.0, wait))
                self._read_at = time.monotonic()
                try:
                    read = await run_in_threadpool(self._read, self.size)
                    changed, self.error = self._take(self, read), None
                except Exception as error:  # (told to the streams: they end, or say so)
                    changed, self.error = True, error
                if changed:
                    self.version += 1
                    if self._changed is not None:
                        self._changed.set()
                if not self._again:
                    return
        finally:
            self._reading = False


class _Hub:
    """The one LISTEN connection every event stream shares: a thread waits for the workers'
    notices and wakes the feeds they concern (a job's, by its id; the overview, by any),
    and every WEB_POLL_INTERVAL all of them; now and then it folds the kept counts, as
    workers do (there may be none). Feeds exist while someone follows them."""

    def __init__(self, url: str, pool: ConnectionPool) -> None:
        self.url, self._pool = url, pool
        self._feeds: dict[uuid.UUID | None, _Feed] = {}  # None: the overview
        self._loop: Any = None
        self._tasks: set[Any] = set()
        self._closed = threading.Event()
        # (a daemon, joined on close: it never keeps a stopped process alive)
        self._thread = threading.Thread(
            target=self._listen, name="claude-jobs-listener", daemon=True
        )
        self.listening = False
        self.ending = False  # the server stops: the streams end

    def start(self, loop: Any) -> None:
        self._loop = loop
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        self._thread.join()

    def end_streams(self) -> None:
        """The server stops: every event stream ends now (from any thread, a signal handler
        too), rather than keep the server waiting for it."""
        self.ending = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake_every_stream)

    def _wake_every_stream(self) -> None:
        for feed in self._feeds.values():
            feed.version += 1
            if feed._changed is not None:
                feed._changed.set()

    @contextlib.contextmanager
    def follow(self, key: uuid.UUID | None) -> Iterator[_Feed]:
        """The feed of job ``key`` (None: the overview), while the caller follows it."""
        feed = self._feeds.get(key)
        if feed is None:
            feed = self._feeds[key] = (
                _Feed(self._read_overview, _Feed.take_overview) if key is None
                else _Feed(functools.partial(self._read_job, key), _Feed.take_update)
            )  # fmt: skip
        feed.followers += 1
        try:
            yield feed
        finally:
            feed.followers -= 1
            if not feed.followers:
                del self._feeds[key]

    def _listen(self) -> None:
        backoff, folded = _Backoff(start=0.5, cap=10.0), 0.0
        while not self._closed.is_set():
            try:
                with connect(self.url, autocommit=True) as conn:
                    _db_listen(conn, NOTIFY_CHANNEL)
                    _db_listen(conn, OUTPUT_CHANNEL)
                    self.listening = True
                    backoff.reset()
                    self._wake(None)  # (what changed while it was not listening)
                    polled = time.monotonic()
                    while not self._closed.is_set():
                        for notice in conn.notifies(timeout=WEB_POLL_INTERVAL):
                            self._wake({notice.payload})
                            if time.monotonic() - polled > WEB_POLL_INTERVAL:
                                break
                        self._wake(None)
                        polled = time.monotonic()
                        if polled - folded > UNBLOCK_CHECK_INTERVAL:  # (no worker may run)
                            self._fold()
                            folded = polled
            except (psycopg.Error, DatabaseUnavailable) as error:
                logger.debug("listening for notices failed: %s", error)
            self.listening = False
            self._closed.wait(backoff.next())

    def _fold(self) -> None:
        """Fold the kept counts; a failure waits for the next time (and keeps the LISTEN)."""
        try:
            with self._pool.connection() as conn:
                fold_counts(conn)
        except psycopg.Error as error:
            logger.debug("cannot fold the kept counts for now: %s", error)

    def _wake(self, payloads: set[str] | None) -> None:
        """Refresh the feeds these notices concern (None: every feed)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._refresh, payloads)

    def _refresh(self, payloads: set[str] | None) -> None:
        import asyncio

        for key, feed in list(self._feeds.items()):
            if key is None or payloads is None or str(key) in payloads:
                task = asyncio.ensure_future(feed.refresh(OVERVIEW_INTERVAL if key is None else 0))
                self._tasks.add(task)  # (the loop keeps only a weak reference to a task)
                task.add_done_callback(self._tasks.discard)

    def _read_job(self, key: uuid.UUID, seen: int) -> FollowUpdate:
        with self._pool.connection() as conn:
            return job_update(conn, key, seen)

    def _read_overview(self, seen: int) -> dict[str, Any]:
        with self._pool.connection() as conn:
            return _overview(conn)


def _configure_web_connection(conn: psycopg.Connection) -> None:
    """A plan for each request's own filters: psycopg prepares a statement run five times on
    a connection, and a generic plan of LIST_JOBS (its filters optional) could not pick the
    index that a filter needs."""
    conn.execute("SET plan_cache_mode = force_custom_plan")


#: How many of the newest batches the overview shows.
OVERVIEW_BATCHES = 10
#: The overview lists this many of the jobs that need people.
OVERVIEW_NEEDS_YOU = 20


def _overview(conn: psycopg.Connection) -> dict[str, Any]:
    """What the dashboard's overview shows: per queue the counts by status, the oldest ready
    job, cost today and in the last 7 days, paused or not; live workers and the jobs they
    run; the holds; the newest batches' progress; the schedules; the notifications given up
    on; what needs people (see needs_you). Cheap at a million jobs (kept counts, an index
    probe per queue, a batch's progress from its index, the unreviewed jobs' index)."""
    today = datetime.now(UTC).date()
    cost: dict[str, dict[str, float]] = {}
    for row in cost_stats(conn, 7):
        spent = cost.setdefault(row["queue"], {"today": 0.0, "week": 0.0})
        spent["week"] += float(row["cost_usd"])
        if row["day"] == today:
            spent["today"] += float(row["cost_usd"])
    queues = queue_stats(conn)
    for queue in queues:
        spent = cost.get(queue["queue"], {"today": 0.0, "week": 0.0})
        queue["cost_today_usd"], queue["cost_7d_usd"] = spent["today"], spent["week"]
    running = list_jobs(conn, statuses=[JobStatus.RUNNING], limit=200)
    workers = list_workers(conn)
    taken = {q for w in workers if w["state"] != "lost" for q in w["queues"]}
    for queue in queues:  # (ready jobs that no live worker takes: flagged)
        queue["no_worker"] = bool(queue["ready"]) and not ({"*", queue["queue"]} & taken)
    for worker in workers:
        worker["jobs"] = [_job_summary(job) for job in running if job.worker_id == worker["id"]]
    batches = [batch.to_dict() for batch in list_batches(conn, limit=OVERVIEW_BATCHES)]
    schedules = [_schedule_view(schedule) for schedule in list_schedules(conn)]
    undelivered = list_notifications(conn, OVERVIEW_BATCHES, given_up=True)
    count, needing = needs_you(conn, OVERVIEW_NEEDS_YOU)
    return _jsonable({"queues": queues, "workers": workers, "holds": list_holds(conn),
                      "batches": batches, "schedules": schedules,
                      "notifications": undelivered,
                      "needs_you": {"count": count,
                                    "jobs": [_needing(job) for job in needing]}})  # fmt: skip


def _job_summary(
    job: Job, paused: Collection[str] = (), why: Waiting | None = None
) -> dict[str, Any]:
    """A job as the API lists it: everything but its transcript, its prompt on one line, what
    its status reads as (paused, for a queued job of a paused queue), and why it waits."""
    data = job.to_dict()
    del data["transcript"]
    excerpt = _cut(_excerpt(job), EXCERPT_LIMIT)
    data.update(excerpt=excerpt, shown_status=_status_of(job, paused), why=why and why.text,
                waits_for=_dependency(job))  # fmt: skip
    return data


def _cursor_text(job: Job) -> str:
    """Where the next page begins: after this job (its enqueue time in microseconds, its
    sequence number, its id)."""
    micros = (job.created_at - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    return f"{micros}.{job.seq}.{job.id}"


def _parse_cursor(text: str) -> tuple[datetime, int, uuid.UUID]:
    try:
        micros, seq, key = text.split(".", 2)
        at = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(micros))
        return at, int(seq), uuid.UUID(key)
    except (ValueError, OverflowError):
        raise _HTTPError(400, f"bad cursor {text!r}: give the `next` of the last page") from None


def _enqueue_request(conn: psycopg.Connection, body: Any) -> Job:
    """POST /api/jobs: ``{"payload": {...}, "queue": ..., ...}`` with the options of enqueue
    (run_at as ISO 8601; delay and timeout as seconds or as 30m, 2h); checked as `enqueue`
    checks them. A claude job's cwd must be absolute: the server's directory means nothing to
    the caller."""
    if not isinstance(body, dict) or not isinstance(body.get("payload"), dict):
        raise _HTTPError(400, 'the body must be a JSON object with a "payload" object')
    _check_keys(body, {"payload", *JobSettings.__annotations__})
    settings = _enqueue_settings({key: value for key, value in body.items() if key != "payload"})
    _check_absolute_cwds(body)
    with conn.transaction():
        return enqueue(conn, body["payload"], **settings)


def _check_keys(body: Mapping[str, Any], documented: Collection[str]) -> None:
    """InvalidJob for a key of a request's body that is not one of the ``documented``."""
    unknown = sorted(set(body) - set(documented))
    if unknown:
        raise InvalidJob(f"not a job option: {', '.join(map(repr, unknown))}")


def _check_absolute_cwds(body: Mapping[str, Any]) -> None:
    """InvalidJob unless the cwd of each payload of a request's body (the job's, and its
    batch's callbacks') is absolute: the server's directory means nothing to the caller."""
    for key in ("payload", "on_finish", "on_success"):
        payload = body.get(key)
        cwd = payload.get("cwd") if isinstance(payload, dict) else None
        if isinstance(cwd, str) and not os.path.isabs(os.path.expanduser(cwd)):
            where = '"cwd"' if key == "payload" else f'the "cwd" of {key}'
            raise InvalidJob(f"{where} must be an absolute path over HTTP, not {cwd!r}")


def _enqueue_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as JSON gives them: run_at as ISO 8601 text, delay and timeout as seconds or
    as text (30m, 2h)."""
    try:
        if settings.get("run_at") is not None:
            if not isinstance(settings["run_at"], str):
                raise InvalidJob('"run_at" must be an ISO 8601 time, as text')
            settings["run_at"] = parse_time(settings["run_at"])
        for name in ("delay", "timeout", "unique_for", "every"):
            value = settings.get(name)
            if isinstance(value, str):
                settings[name] = parse_duration(value)
            elif value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise InvalidJob(f'"{name}" must be seconds or a duration such as 30m')
    except (ValueError, click.BadParameter) as error:
        raise InvalidJob(str(error)) from None
    return settings


def _prometheus_families(conn: psycopg.Connection) -> list[Any]:
    """The metrics of one scrape, from eight cheap queries (kept counts and run times, the
    oldest queued job per queue through its index, the spend ledger, the workers, the
    holds, the paused queues): the same few milliseconds at a million jobs as at ten."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    jobs = GaugeMetricFamily("claude_jobs_jobs", "Jobs there are, by queue and status.",
                             labels=["queue", "status"])  # fmt: skip
    ended = CounterMetricFamily(
        "claude_jobs_ended", "Jobs that ever ended, by queue and status (cleanup does not "
        "lower it).", labels=["queue", "status"],
    )  # fmt: skip
    counts = job_counts(conn)
    for row in counts:
        jobs.add_metric([row["queue"], row["status"]], float(row["jobs"]))
        if row["status"] in FINISHED_STATUSES:
            ended.add_metric([row["queue"], row["status"]], float(row["entered"]))
    run_time = HistogramMetricFamily(
        "claude_jobs_run_seconds", "Run time of the jobs that ended after running.",
        labels=["queue", "status"],
    )  # fmt: skip
    sums = {(r["queue"], r["status"]): float(r["run_seconds"]) for r in counts}
    buckets: dict[tuple[str, str], list[tuple[str, float]]] = {}
    for row in run_times(conn):
        bound = "+Inf" if math.isinf(row["le"]) else f"{row['le']:g}"
        buckets.setdefault((row["queue"], row["status"]), []).append((bound, float(row["runs"])))
    for (queue, status), found in buckets.items():
        run_time.add_metric([queue, status], _all_buckets(found), sums.get((queue, status), 0))
    ages = GaugeMetricFamily("claude_jobs_ready_age_seconds",
                             "How long the oldest ready job of a queue has waited.",
                             labels=["queue"])  # fmt: skip
    for queue, age in conn.execute(READY_AGES).fetchall():
        if age is not None:  # (a queue whose jobs are all due later)
            ages.add_metric([queue], float(age))
    cost = CounterMetricFamily("claude_jobs_cost_usd", "What claude cost (the spend ledger).",
                               labels=["queue"])  # fmt: skip
    for queue, spent in conn.execute(COST_TOTALS).fetchall():
        cost.add_metric([queue], float(spent))
    workers = GaugeMetricFamily("claude_jobs_workers", "Registered workers, alive or lost.",
                                labels=["state"])  # fmt: skip
    # (registered ones: not those already found dead and recovered, listed for a while)
    states = [worker["state"] for worker in list_workers(conn) if worker["lost_at"] is None]
    for state in ("alive", "lost", "failing", "draining"):
        workers.add_metric([state], float(states.count(state)))
    holds = GaugeMetricFamily("claude_jobs_hold_until_seconds",
                              "Until when no worker starts jobs of a kind (Unix time).",
                              labels=["kind"])  # fmt: skip
    for hold in list_holds(conn):
        holds.add_metric([hold["kind"]], hold["until"].timestamp())
    paused = GaugeMetricFamily("claude_jobs_queue_paused", "1 for a paused queue.",
                               labels=["queue"])  # fmt: skip
    for queue in sorted(paused_queues(conn)):
        paused.add_metric([queue], 1.0)
    told = CounterMetricFamily(
        "claude_jobs_notifications", "Notifications (--notify) sent, tried again (each try "
        "that failed and will be made again), failed (not tried again) and abandoned.",
        labels=["outcome"],
    )  # fmt: skip
    counted = notification_counts(conn)
    for outcome in ("sent", "retried", "failed", "abandoned"):
        told.add_metric([outcome], float(counted[outcome]))
    pending = GaugeMetricFamily(
        "claude_jobs_notifications_pending", "Notifications waiting to be sent.",
        value=counted["pending"],
    )  # fmt: skip
    return [jobs, ended, run_time, ages, cost, workers, holds, paused, told, pending]


def _all_buckets(found: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    """Every bucket of the histogram: one the kept run times have no row for holds as many
    runs as the one below it."""
    counts = dict(found)
    total, filled = 0.0, []
    for bound in RUN_TIME_BUCKETS:
        total = counts.get(bound, total)
        filled.append((bound, total))
    return filled


def web_app(
    url: str,
    *,
    token: str | None = None,
    read_only: bool = False,
    public_metrics: bool = False,
    pool_size: int = WEB_POOL_SIZE,
    allowed_hosts: Collection[str] = (),
    max_body: int = DEFAULT_MAX_BODY,
    client_timeout: float = DEFAULT_CLIENT_TIMEOUT,
) -> Any:
    """The ASGI app of `claude-jobs serve` (Starlette): the dashboard at /, the JSON API under
    /api, /metrics, /healthz and /readyz, on the database at ``url``. ``token``: every request
    but the health checks (and /metrics with ``public_metrics``) needs ``Authorization:
    Bearer <token>``; ``read_only``: no action and no enqueue. It answers only requests whose
    Host is an IP address, localhost, or one of ``allowed_hosts`` (a name of this machine's,
    a proxy's; "*": any): a page whose name was made to resolve to this machine (DNS
    rebinding) gets 421. A request body over ``max_body`` bytes gets 413, one that stalls
    for ``client_timeout`` seconds 408. Serve it with
    uvicorn, or mount it in another Starlette app (with
    ``lifespan=app.router.lifespan_context``: its pool and its listening connection open and
    close with the app's lifespan). ConfigError when the web extra is not installed."""
    try:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from prometheus_client.registry import CollectorRegistry
        from psycopg_pool import ConnectionPool
        from starlette.applications import Starlette
        from starlette.concurrency import run_in_threadpool
        from starlette.exceptions import HTTPException
        from starlette.middleware import Middleware
        from starlette.requests import Request
        from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
        from starlette.routing import Route
    except ImportError:
        raise ConfigError(WEB_EXTRA_HINT) from None
    check_conninfo(url)
    pool = ConnectionPool(
        url, min_size=1, max_size=pool_size, open=False, timeout=5.0, name="claude-jobs-web",
        kwargs={"autocommit": True}, check=ConnectionPool.check_connection,
        configure=_configure_web_connection,
    )  # fmt: skip
    hub = _Hub(url, pool)

    class Collector:
        def collect(self) -> list[Any]:
            with pool.connection() as conn:
                return _prometheus_families(conn)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())

    def database(call: Callable[..., Any], created: int = 200) -> Callable[[Request], Any]:
        """An endpoint that runs ``call(conn, request, body)`` on a thread with a pooled
        connection; its return value as JSON (status ``created``), its errors as
        {"error": ...}."""

        async def endpoint(request: Request) -> Response:
            try:
                _check_text_given(request)
                if request.method == "POST":
                    _check_action(request, read_only)
                posted = request.method == "POST"
                body = await _json_body(request, max_body, client_timeout) if posted else None

                def run() -> Any:
                    with pool.connection() as conn:
                        return call(conn, request, body)

                result = await run_in_threadpool(run)
            except Exception as error:
                return _error_response(error, url)
            # (an enqueue that found its unique key taken created nothing)
            duplicate = isinstance(result, dict) and result.get("duplicate") is True
            return JSONResponse(_jsonable(result), status_code=200 if duplicate else created)

        return endpoint

    shown = _PAGE.replace("<body>", '<body class="read-only">') if read_only else _PAGE

    async def page(request: Request) -> Response:
        return HTMLResponse(shown, headers=_PAGE_HEADERS)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "up"})

    async def readyz(request: Request) -> Response:
        def ready() -> Any:
            with pool.connection() as conn:
                check_schema(conn)

        try:
            await run_in_threadpool(ready)
        except Exception as error:
            return _error_response(error, url, status=503)
        return JSONResponse({"status": "ready", "listening": hub.listening})

    async def metrics(request: Request) -> Response:
        try:
            body = await run_in_threadpool(generate_latest, registry)
        except Exception as error:
            return _error_response(error, url)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def job_events(request: Request) -> Response:
        try:
            since = int(request.headers.get("last-event-id") or request.query_params.get("since")
                        or 0)  # fmt: skip
        except ValueError:
            return _error_response(_HTTPError(400, "Last-Event-ID must be a number"), url)

        def find() -> uuid.UUID:
            with pool.connection() as conn:
                return resolve_job_id(conn, request.path_params["job"])

        try:
            key = await run_in_threadpool(find)
        except Exception as error:
            return _error_response(error, url)
        return StreamingResponse(_job_stream(hub, key, max(0, since)), headers=_SSE_HEADERS,
                                 media_type="text/event-stream")  # fmt: skip

    async def overview_events(request: Request) -> Response:
        return StreamingResponse(_overview_stream(hub), headers=_SSE_HEADERS,
                                 media_type="text/event-stream")  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        import asyncio

        pool.open(wait=False)
        hub.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            hub.close()
            pool.close()

    async def http_error(request: Request, error: Exception) -> Response:
        """Starlette's own refusals (no such path, a method the path does not take): JSON under
        /api, as every other error there."""
        assert isinstance(error, HTTPException)
        if not _route_path(request.scope).startswith("/api/"):
            return Response(error.detail, status_code=error.status_code, headers=error.headers)
        said = {404: f"no such path: {request.method} {_route_path(request.scope)}",
                405: f"{request.method} is not allowed here: "
                     f"{(error.headers or {}).get('allow', 'see the API')}"}  # fmt: skip
        return JSONResponse({"error": said.get(error.status_code, error.detail)},
                            status_code=error.status_code, headers=error.headers)  # fmt: skip

    routes = [
        Route("/", page),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/api/events", overview_events),
        Route("/api/jobs", database(_api_jobs), methods=["GET"]),
        Route("/api/jobs", database(_api_enqueue, created=201), methods=["POST"]),
        Route("/api/jobs/{job}", database(_api_job)),
        Route("/api/jobs/{job}/events", job_events),
        Route("/api/jobs/{job}/diff", database(_api_diff)),
        Route("/api/needs-you", database(_api_needs_you)),
        Route("/api/timeline", database(_api_timeline)),
        Route("/api/bulk", database(_api_bulk_count), methods=["GET"]),
        Route("/api/bulk", database(_api_bulk), methods=["POST"]),
        Route("/api/jobs/{job}/{action}", database(_api_job_action), methods=["POST"]),
        Route("/api/queues", database(_api_queues)),
        Route("/api/queues/{queue}/{action}", database(_api_queue_action), methods=["POST"]),
        Route("/api/workers", database(lambda conn, request, body: list_workers(conn))),
        Route("/api/workers/{worker}/drain", database(_api_drain), methods=["POST"]),
        Route("/api/holds/{kind}/lift", database(_api_lift), methods=["POST"]),
        Route(
            "/api/notifications/{notification}/retry",
            database(_api_retry_notification),
            methods=["POST"],
        ),
        Route("/api/stats", database(_api_stats)),
        Route("/api/batches", database(_api_batches)),
        Route("/api/batches/{batch}", database(_api_batch)),
        Route("/api/batches/{batch}/{action}", database(_api_batch_action), methods=["POST"]),
        Route("/api/schedules", database(_api_schedules)),
        Route("/api/schedules", database(_api_add_schedule, created=201), methods=["POST"]),
        Route("/api/schedules/{name}", database(_api_schedule)),
        Route("/api/schedules/{name}/{action}", database(_api_schedule_action), methods=["POST"]),
    ]
    open_paths = {"/healthz", "/readyz", "/", *(["/metrics"] if public_metrics else [])}
    middleware = [Middleware(_HostCheck, allowed=allowed_hosts)]
    if token:
        middleware.append(Middleware(_Guard, token=token, open_paths=open_paths))
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware,
                    exception_handlers={HTTPException: http_error})  # fmt: skip
    app.state.end_streams = hub.end_streams  # (for the server that stops: see serve)
    return app


class _HostCheck:
    """ASGI middleware: only requests to this server by a name it answers to (see web_app)
    get through; any other Host gets 421 before a route runs. A page on evil.example whose
    name is made to resolve to 127.0.0.1 is same-origin with the server as the browser sees
    it: only the Host header it sends tells it apart."""

    def __init__(self, app: Any, allowed: Collection[str]) -> None:
        self.app = app
        self._allowed = {_host_name(name) for name in (*LOCAL_HOST_NAMES, *allowed)}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            name = _host_name(given)
            if not _answers_to(name, self._allowed):
                said = f"this server does not answer to the host name {given[:100]!r}"
                await _refuse(
                    send, 421, f"{said}: see serve --allowed-host", b"connection", b"close"
                )
                return
        await self.app(scope, receive, send)


async def _refuse(send: Any, status: int, error: str, *header: bytes) -> None:
    """Answer an ASGI request, before any route runs, with {"error": ...} (and ``header``: a
    name and its value)."""
    headers = [(b"content-type", b"application/json"), *([tuple(header)] if header else [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps({"error": error}).encode()})


def _host_name(host: str) -> str:
    """A Host header's name, without its port and brackets, in lower case."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8080
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _answers_to(name: str, allowed: Collection[str]) -> bool:
    """Whether a server that answers to ``allowed`` names answers to ``name``: one of them,
    or any IP address ("*" among them: any name at all)."""
    if "*" in allowed or name in allowed:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class _Guard:
    """ASGI middleware: every request but those to ``open_paths`` needs the bearer token."""

    def __init__(self, app: Any, token: str, open_paths: Collection[str]) -> None:
        self.app, self._token, self._open = app, token.encode(), set(open_paths)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and _route_path(scope) not in self._open:
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, value = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), self._token):
                said = "this server needs its token: Authorization: Bearer <token>"
                await _refuse(send, 401, said, b"www-authenticate", b"Bearer")
                return
        await self.app(scope, receive, send)


def _route_path(scope: Any) -> str:
    """The request's path within the app (mounted below a prefix, without it)."""
    path, root = scope["path"], scope.get("root_path", "")
    return (path[len(root) :] or "/") if root and path.startswith(root) else path


def _check_action(request: Any, read_only: bool) -> None:
    """A request that changes something: not on a read-only server, and only from this
    server's own page or from a client that is no browser (no cross-site form or script)."""
    if read_only:
        raise _HTTPError(403, "this server is read-only (--read-only): it changes nothing")
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise _HTTPError(403, f"a cross-site request ({site}) may change nothing here")
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
        raise _HTTPError(403, f"a request from {origin} may change nothing here")


def _check_text_given(request: Any) -> None:
    """400 for a path or query parameter that holds a NUL character (no text in PostgreSQL
    can)."""
    given = [*request.path_params.values(), *request.query_params.values()]
    if any("\x00" in str(value) for value in given):
        raise _HTTPError(400, "a parameter holds a NUL character, which no job or name can")


async def _json_body(request: Any, limit: int, timeout: float) -> Any:
    """A request's JSON body ({} when empty): 413 past ``limit`` bytes (refused before it is
    read whole), 408 when it has not come whole within ``timeout`` seconds (a slow client holds
    a connection no longer), 400 when it is not JSON (or nests so deep that Python cannot read
    it) or the client went away."""
    import asyncio

    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length", "")
    too_big = _HTTPError(413, f"the body is larger than {limit:,} bytes (serve --max-body)")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    pieces, size, stream = [], 0, request.stream()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                piece = await asyncio.wait_for(anext(stream), deadline - time.monotonic())
            except StopAsyncIteration:
                break
            size += len(piece)
            if size > limit:
                raise too_big
            pieces.append(piece)
    except TimeoutError:
        raise _HTTPError(408, f"the body did not come whole within {timeout:g}s") from None
    except ClientDisconnect:
        raise _HTTPError(400, "the client went away before its body arrived whole") from None
    raw = b"".join(pieces)
    if not raw.strip():
        return {}
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (ValueError, InvalidJob) as error:
        raise _HTTPError(400, f"the body is not JSON: {error}") from None
    except RecursionError:
        raise _HTTPError(400, "the body nests too deeply to be read") from None


def _error_response(error: BaseException, url: str, status: int | None = None) -> Any:
    """An error as the API answers it: {"error": its first line, password masked}. One the
    API does not know (a bug) is a 500, logged with its traceback."""
    from starlette.responses import JSONResponse

    try:
        status = status or _http_status(error)
    except StopIteration:
        logger.error("internal error: %s", _scrub(str(error), url), exc_info=error)
        said = _scrub(_error_text(error), url)
        return JSONResponse({"error": f"internal error: {said}"}, status_code=500)
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if status == 503 and not isinstance(error, _HTTPError | SchemaError):
        message = f"the database is unreachable: {message}"
    return JSONResponse({"error": _scrub(message, url)}, status_code=status)


_SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
#: The page runs no script but its own, loads nothing from elsewhere, and cannot be framed.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


async def _job_stream(hub: _Hub, key: uuid.UUID, since: int) -> Any:
    """A job's events: ``status`` when its state changes, ``transcript`` with the lines it
    gained (rendered as `logs` renders them; the id is where a stream resumes with
    Last-Event-ID; tools' output whole, for the page to fold), and ``end`` once it
    finished."""
    printer, seen, told = _TranscriptPrinter(full=True), since, None
    with hub.follow(key) as feed:
        await feed.ready()
        while not hub.ending:
            version = feed.version
            if feed.error is not None:
                yield _sse("error", {"error": _scrub(str(feed.error), hub.url)})
                return
            update: FollowUpdate = feed.state
            text, skipped = feed.text_since(seen)
            seen += len(text) + skipped
            lines = printer.feed(text)
            if update.finished:
                lines += printer.flush()
            if lines or skipped:
                complete = seen - printer.pending
                yield _sse("transcript", {"lines": lines, "skipped": skipped}, complete)
            if update.state != told:
                told = update.state
                yield _sse("status", {**update.to_dict(), "finished": update.finished})
            if update.finished:
                yield _sse("end", {"status": update.status, "last_error": update.last_error})
                return
            await feed.changed(version, KEEPALIVE_INTERVAL)
            if feed.version == version:
                yield ": keepalive\n\n"


async def _overview_stream(hub: _Hub) -> Any:
    """The overview, each time it changes."""
    with hub.follow(None) as feed:
        await feed.ready()
        while not hub.ending:
            version = feed.version
            if feed.error is not None:
                yield _sse("error", {"error": _scrub(str(feed.error), hub.url)})
            else:
                yield _sse("overview", feed.state)
            await feed.changed(version, KEEPALIVE_INTERVAL)
            while feed.version == version and not hub.ending:
                yield ": keepalive\n\n"
                await feed.changed(version, KEEPALIVE_INTERVAL)


# -- the API's endpoints: (connection, request, JSON body) -> what they answer ------------------


def _query_int(request: Any, name: str, default: int, high: int = MAX_PAGE) -> int:
    """The whole number a query parameter gives (``default`` without one), from 1 to
    ``high``; 400 for another."""
    try:
        value = int(request.query_params.get(name) or default)
    except ValueError:
        raise _HTTPError(400, f"{name} must be a number") from None
    if not 1 <= value <= high:
        raise _HTTPError(400, f"{name} must be from 1 to {high}")
    return value


def _api_jobs(conn: psycopg.Connection, request: Any, body: Any) -> dict[str, Any]:
    """GET /api/jobs?status=&queue=&kind=&q=&cwd=&batch=&tag=&before=&after=&limit=: a page of
    jobs, newest first, the cursor of the next (``next``, older; null on the last) and of
    the one before (``prev``, newer; null on the first)."""
    query = request.query_params
    statuses = _comma_separated(query.getlist("status"))
    for status in statuses:
        if status not in JobStatus.__members__.values():
            raise _HTTPError(400, f"unknown status {status!r}: one of "
                             + ", ".join(JobStatus))  # fmt: skip
    limit = _query_int(request, "limit", 50)
    before = _parse_cursor(query["before"]) if query.get("before") else None
    after = _parse_cursor(query["after"]) if query.get("after") else None
    batch = resolve_batch(conn, query["batch"]) if query.get("batch") else None
    jobs = list_jobs(
        conn, statuses=statuses or None, queue=query.get("queue") or None,
        kind=query.get("kind") or None, text=query.get("q") or None, cwd=query.get("cwd") or None,
        batch=batch, before=before, after=after, limit=limit + 1 if after else limit,
        tag=query.get("tag") or None,
    )  # fmt: skip
    newer = bool(before) or len(jobs) > limit  # (paging back: one more tells whether any are)
    jobs = jobs[-limit:]
    seen = _circumstances(conn, jobs)
    reasons = _explained(jobs, seen)
    return {
        "jobs": [_job_summary(j, seen.paused, reasons.get(j.id)) for j in jobs],
        "next": _cursor_text(jobs[-1]) if jobs and (len(jobs) == limit or after) else None,
        "prev": _cursor_text(jobs[0]) if jobs and newer else None,
    }


def _api_job(conn: psycopg.Connection, request: Any, body: Any) -> dict[str, Any]:
    """GET /api/jobs/{id or prefix}: everything `show` prints, row by row, and the job (its
    transcript comes by its events)."""
    job = get_job(conn, request.path_params["job"], transcript=False)
    seen = _circumstances(conn, [job])
    reason = _explained([job], seen).get(job.id)
    try:
        diff_stat = worktree_diff(job, stat=True).decode(errors="replace") if job.worktree else None
    except JobsError:  # (the worktree is on another host, or gone)
        diff_stat = None
    return {
        **_job_summary(job, seen.paused, reason),
        "rows": _job_rows(job, seen, reason),
        "attempt_errors": _attempt_lines(job),
        "diff_stat": diff_stat,
    }


def _api_enqueue(conn: psycopg.Connection, request: Any, body: Any) -> dict[str, Any]:
    """POST /api/jobs: enqueue one job (see _enqueue_request); the job as listed, without its
    payload (it was just sent: a big prompt is not sent back)."""
    summary = _job_summary(_enqueue_request(conn, body))
    del summary["payload"]
    return summary


def _api_job_action(conn: psycopg.Connection, request: Any, body: Any) -> dict[str, Any]:
    """POST /api/jobs/{id}/cancel|retry|run-now|reschedule|deliver|reply|discard|reviewed|
    priority."""
    action = request.path_params["action"]
    actions = ("cancel", "retry", "run-now", "reschedule", "deliver", "reply", "discard",
               "reviewed")  # fmt: skip
    if action not in (*actions, "priority"):
        raise _HTTPError(404, f"no action {action!r}: {', '.join(actions)} or priority")
    key = resolve_job_id(conn, request.path_params["job"])
    if action == "reply":  # {"prompt": "..."}: the continuation, as listed
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(prompt, str):
            raise _HTTPError(400, 'give "prompt": the reply, a string')
        return _job_summary(reply(conn, key, prompt))
    if action == "discard":
        return {"id": str(key), "done": discard(conn, key)}
    if action == "reviewed":
        mark_reviewed(conn, key)
        return {"id": str(key), "reviewed": True}
    if action == "cancel":
        return {"id": str(key), "status": cancel_job(conn, key)}
    if action == "retry":
        with conn.transaction():
            return {"id": str(key), "retried": len(retry_jobs(conn, [key]))}
    if action == "run-now":
        return {"id": str(run_now(conn, key)), "due": "now"}
    if action == "reschedule":  # {"at": ISO 8601} or {"delay": 3600 or "1h"}
        return {"id": str(key), "run_at": _api_reschedule(conn, key, body)}
    if action == "deliver":  # {"pr": true} or ?pr=true: open its pull request too (see deliver)
        pr = (isinstance(body, dict) and body.get("pr") is True) or (
            request.query_params.get("pr") == "true")  # fmt: skip
        return {"id": str(key), "delivery": deliver(conn, key, pr=pr)}
    priority = body.get("priority") if isinstance(body, dict) else None  # {"priority": N}
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise _HTTPError(400, 'give "priority", a whole number')
    return {"id": str(key), "priority": set_priority(conn, key, priority)}


def _api_diff(conn: psycopg.Connection, request: Any, body: Any) -> dict[str, Any]:
    """GET /api/jobs/{id}/diff: what a worktree job changed, file by file (see diff_files)."""
    job = get_job(conn, request.path_params["job"], transcript=False)
    return {"id": str(job.id), "files": diff_files(worktree_diff(job).decode(errors="replace"))}


def _api_needs_you(conn: psycopg.Connection, request: Any, body: Any) -> dict[str, Any]:
    """GET /api/needs-you: how many jobs need people (see needs_you), and the newest."""
    count, jobs = needs_you(conn, _query_int(request, "limit", 50))
    return {"count": count, "jobs": [_needing(job) for job in jobs]}


def _needing(job: Job) -> dict[str, Any]:
    """A job of "Needs you", as listed, with why it is there."""
    if job.status == JobStatus.FAILED:
        why = "checks failed" if (job.checks or {}).get("phase") == "failed" else "failed"
    elif job.delivery and "error" in job.delivery:
        why = "delivery failed"
    else:
        why = "to review"
    return {**_job_summary(job), "why": why}


def _api_reschedule(conn: psycopg.Connection, job: uuid.UUID, body: Any) -> datetime:
    """The new due time of POST /api/jobs/{id}/reschedule."""
    if not isinstance(body, dict):
        raise _HTTPError(400, 'the body must be a JSON object: {"at": ...} or {"delay": ...}')
    when = _enqueue_settings({"run_at": body.get("at"), "delay": body.get("delay")})
    run_at = _due_at(when["run_at"], when["delay"])
    if run_at is None:
        raise _HTTPError(400, 'give "at" (an ISO 8601 time) or "delay", one of them')
    return reschedule(conn, job, run_at)


def _api_queues(conn: psycopg.Connection, request: Any, body: Any) -> dict[str, Any]:
    """GET /api/queues: per queue the counts by status and more (`stats`), and the holds."""
    return {"queues": queue_stats(conn), "holds": list_holds(conn)}


def _api_queue_action(conn: psycopg.Connection, request: Any, body: Any) -> dict[str, Any]:
    """POST /api/queues/{name}/pause|resume|settings."""
    queue, action = check_queue(request.path_params["queue"]), request.path_params["action"]
    if action == "pause":
        return {"queue": queue, "paused": True, "changed": pause_queue(conn, queue, "serve")}
    if action == "resume":
        return {"queue": queue, "paused": False, "changed": resume_queue(conn, queue)}
    if action == "settings":
        return _api_queue_settings(conn, queue, body)
    raise _HTTPError(404, f"no action {action!r}: pause, resume or settings")


def _api_queue_settings(conn: psycopg.Connection, queue: str, body: Any) -> dict[str, Any]:
    """POST /api/queues/{name}/settings: ``max_running`` (a number), ``rate`` (N/PERIOD),
    ``rate_by`` (queue, key, kind or cwd), each left as it is when absent and removed when
    null. The queue's settings after."""
    if not isinstance(body, dict) or not body:
        raise _HTTPError(400, 'give "max_running", "rate" or "rate_by" (null removes one)')
    if unknown := sorted(set(body) - set(QUEUE_SETTINGS_RESET)):
        raise _HTTPError(400, f"not a queue setting: {', '.join(map(repr, unknown))}")
    max_running, rate, rate_by = (body.get(key) for key in QUEUE_SETTINGS_RESET)
    if max_running is not None and (type(max_running) is not int):
        raise _HTTPError(400, '"max_running" must be a whole number, or null')
    for key, value in (("rate", rate), ("rate_by", rate_by)):
        if value is not None and not isinstance(value, str):
            raise _HTTPError(400, f'"{key}" must be a string, or null')
    reset = [key for key in QUEUE_SETTINGS_RESET if key in body and body[key] is None]
    return set_queue_limits(conn, queue, max_running=max_running, rate=rate, rate_by=rate_by,
                            reset=reset)  # fmt: skip


def _api_drain(conn: psycopg.Connection, request: Any, body: Any) -> dict[str, Any]:
    """POST /api/workers/{id}/drain."""
    row = drain_worker(conn, request.path_params["worker"])
    return {"id": str(row["id"]), "draining": True}


def _api_lift(conn: psycopg.Connection, request: Any, body: Any) -> dict[str, Any]:
    """POST /api/holds/{kind}/lift."""
    lifted = lift_hold(conn, request.path_params["kind"])
    if lifted is None:
        raise WrongState(f"nothing holds {request.path_params['kind']} jobs")
    return dataclasses.asdict(lifted)


#: The filters of GET and POST /api/bulk (those of GET /api/jobs, and older_than).
_BULK_FILTERS = ("status", "queue", "kind", "tag", "cwd", "q", "batch", "older_than")


def _bulk_request(conn: psycopg.Connection, params: Mapping[str, Any]) -> tuple[str, JobFilter]:
    """The action and filter of GET/POST /api/bulk: ``status`` (commas), ``queue``, ``kind``,
    ``tag``, ``cwd``, ``q`` (text in the prompt), ``batch`` (name or id), ``older_than``
    (seconds, or 2h); no other key. A retry with no status takes the failed jobs."""
    action = params.get("action")
    if action not in BULK_STATUSES:
        raise _HTTPError(400, f"give an action: {', '.join(BULK_STATUSES)}")
    _check_keys({k: v for k, v in params.items() if k not in ("action", "priority")},
                _BULK_FILTERS)  # fmt: skip
    for key in _BULK_FILTERS:
        value = params.get(key)
        if value is not None and not isinstance(value, str) and key != "older_than":
            raise _HTTPError(400, f'"{key}" must be a string')
    statuses = _comma_separated(str(params.get("status") or ""))
    if action == "retry" and not statuses:
        statuses = [JobStatus.FAILED]
    older = params.get("older_than")
    batch = params.get("batch")
    where = JobFilter(
        statuses=tuple(statuses), queue=params.get("queue") or None,
        kind=params.get("kind") or None, tag=params.get("tag") or None,
        cwd=params.get("cwd") or None, text=params.get("q") or None,
        older_than=_enqueue_settings({"timeout": older})["timeout"] if older else None,
        batch=resolve_batch(conn, batch) if batch else None,
    )  # fmt: skip
    return str(action), where


def _api_bulk_count(conn: psycopg.Connection, request: Any, body: Any) -> dict[str, Any]:
    """GET /api/bulk?action=&...filters: how many jobs the bulk action would take."""
    action, where = _bulk_request(conn, request.query_params)
    return {"action": action, "count": count_matching(conn, action, where)}


def _api_bulk(conn: psycopg.Connection, request: Any, body: Any) -> dict[str, Any]:
    """POST /api/bulk {"action": ..., the filters, "priority": N}: the bulk action, all or
    none (see bulk_action); how many jobs it changed."""
    if not isinstance(body, dict):
        raise _HTTPError(400, 'the body must be a JSON object: {"action": ..., filters}')
    action, where = _bulk_request(conn, body)
    priority = body.get("priority")
    if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool)):
        raise _HTTPError(400, 'give "priority", a whole number')
    return {"action": action, "changed": bulk_action(conn, action, where, priority)}


def _api_retry_notification(conn: psycopg.Connection, request: Any, body: Any) -> dict[str, Any]:
    """POST /api/notifications/{id}/retry."""
    retry_notification(conn, request.path_params["notification"])
    return {"retried": request.path_params["notification"]}


def _api_batches(conn: psycopg.Connection, request: Any, body: Any) -> list[dict[str, Any]]:
    """GET /api/batches?open=1&limit=50: the newest batches and their progress."""
    limit = _query_int(request, "limit", 50)
    only_open = request.query_params.get("open") in ("1", "true")
    return [batch.to_dict() for batch in list_batches(conn, only_open=only_open, limit=limit)]


def _api_batch(conn: psycopg.Connection, request: Any, body: Any) -> dict[str, Any]:
    """GET /api/batches/{name or id}: a batch and its progress (its jobs: /api/jobs?batch=)."""
    return get_batch(conn, request.path_params["batch"]).to_dict()


def _api_batch_action(conn: psycopg.Connection, request: Any, body: Any) -> dict[str, Any]:
    """POST /api/batches/{name or id}/cancel|retry."""
    batch, action = request.path_params["batch"], request.path_params["action"]
    if action == "cancel":
        done = cancel_batch(conn, batch)
        return {
            "cancelled": [str(key) for key, status in done.items() if status != "running"],
            "stopping": [str(key) for key, status in done.items() if status == "running"],
        }
    if action == "retry":
        return {"retried": [str(key) for key in retry_batch(conn, batch)]}
    raise _HTTPError(404, f"no action {action!r}: cancel or retry")


def _schedule_view(schedule: Schedule) -> dict[str, Any]:
    """A schedule as the API gives it: its fields, and ``when`` as people write it."""
    return {**schedule.to_dict(), "when": schedule.when}


def _api_schedules(conn: psycopg.Connection, request: Any, body: Any) -> list[dict[str, Any]]:
    """GET /api/schedules: every schedule, with its latest run."""
    return [_schedule_view(schedule) for schedule in list_schedules(conn)]


def _api_schedule(conn: psycopg.Connection, request: Any, body: Any) -> dict[str, Any]:
    """GET /api/schedules/{name}?runs=20: a schedule and its latest runs (each with the
    status of the job it made)."""
    name = request.path_params["name"]
    limit = _query_int(request, "runs", 20, high=10_000)
    return {**_schedule_view(get_schedule(conn, name)), "runs": schedule_runs(conn, name, limit)}


def _api_timeline(conn: psycopg.Connection, request: Any, body: Any) -> dict[str, Any]:
    """GET /api/timeline?hours=6: the jobs that succeeded and failed over time (timeline)."""
    return timeline(conn, _query_int(request, "hours", 6, high=24 * 31))


def _schedule_request(body: Any, fields: str = "") -> tuple[Any, dict[str, Any]]:
    """The payload (None: not given) and keywords of a schedule's body (see
    _api_add_schedule); a claude job's cwd must be absolute, as for POST /api/jobs."""
    if not isinstance(body, dict) or not isinstance(body.get("payload", {}), dict):
        raise _HTTPError(400, f'the body must be a JSON object{fields}, "payload" an object')
    _check_keys(body, {"name", "payload", *_SCHEDULE_SETTINGS, *JobSettings.__annotations__})
    settings = _enqueue_settings({key: value for key, value in body.items() if key != "payload"})
    _check_absolute_cwds(body)
    return body.get("payload"), settings


def _api_add_schedule(conn: psycopg.Connection, request: Any, body: Any) -> dict[str, Any]:
    """POST /api/schedules: ``{"name": ..., "payload": {...}, "cron": ... or "every": ...,
    "timezone", "catch_up", "overlap", "only_if_changed", and enqueue's options}``."""
    payload, settings = _schedule_request(body, ' with "name" and "payload"')
    name = settings.pop("name", None)
    if not isinstance(name, str) or payload is None:
        raise _HTTPError(400, 'give "name" (text) and "payload" (an object)')
    return add_schedule(conn, name, payload, **settings).to_dict()


def _api_schedule_action(conn: psycopg.Connection, request: Any, body: Any) -> dict[str, Any]:
    """POST /api/schedules/{name}/pause|resume|run|remove|edit (edit: the body holds what
    changes, as POST /api/schedules takes it)."""
    name, action = request.path_params["name"], request.path_params["action"]
    if action == "pause":
        pause_schedule(conn, name)
    elif action == "resume":
        resume_schedule(conn, name)
    elif action == "run":
        return _job_summary(run_schedule(conn, name, by="claude-jobs serve"))
    elif action == "remove":
        remove_schedule(conn, name)
        return {"name": name, "removed": True}
    elif action == "edit":
        payload, changes = _schedule_request(body)
        edit_schedule(conn, name, payload=payload, **changes)
    else:
        raise _HTTPError(404, f"no action {action!r}: pause, resume, run, remove or edit")
    return get_schedule(conn, name).to_dict()


def _api_stats(conn: psycopg.Connection, request: Any, body: Any) -> dict[str, Any]:
    """GET /api/stats?days=7: the overview, and what claude cost per day, queue and model."""
    days = _query_int(request, "days", 7, high=3660)
    return {**_overview(conn), "cost": cost_stats(conn, days)}


###############################################################################
# MCP: the queue as tools for Claude Code and other MCP clients (claude-jobs mcp)
###############################################################################

MCP_EXTRA_HINT = "claude-jobs mcp needs the mcp extra: pip install 'claude-jobs[mcp]'"
#: The longest wait_for_jobs waits (an MCP client has its own time limits).
MCP_WAIT_LIMIT = 3600.0
#: How much of a job's transcript job_logs gives at most, in rendered lines.
MCP_LOG_LINES = 500


@dataclass(frozen=True)
class McpLimits:
    """What `claude-jobs mcp` lets its client do: ``read_only`` (no enqueue, cancel or
    retry); ``queues`` (the only queues it may enqueue to; empty: any); ``cwd_under`` (the
    only directory trees a job may run in; empty: any)."""

    read_only: bool = False
    queues: tuple[str, ...] = ()
    cwd_under: tuple[str, ...] = ()

    def check_enqueue(self, queue: str, cwd: str) -> str:
        """The job's directory, resolved; InvalidJob when these limits refuse it."""
        if self.queues and queue not in self.queues:
            raise InvalidJob(f"this server enqueues only to {', '.join(self.queues)}, not {queue}")
        if not Path(cwd).is_absolute():
            raise InvalidJob(f"cwd must be an absolute path, not {cwd!r}")
        resolved = Path(cwd).resolve()
        allowed = [Path(each).expanduser().resolve() for each in self.cwd_under]
        if allowed and not any(resolved.is_relative_to(each) for each in allowed):
            raise InvalidJob(
                f"cwd {resolved} is outside what this server allows: "
                + ", ".join(map(str, allowed))
            )
        return str(resolved)


def _mcp_job(conn: psycopg.Connection, job: Job) -> dict[str, Any]:
    """A job as the MCP tools give it: its state, why it waits or ended so, its answer, cost,
    checks and delivery (no transcript: job_logs)."""
    seen = _circumstances(conn, [job])
    reason = _explained([job], seen).get(job.id)
    result = job.result
    answer = result.get("result") if isinstance(result, dict) else result
    return {
        "id": str(job.id), "status": _status_of(job, seen.paused), "queue": job.queue,
        "kind": job.kind, "prompt": _cut(_excerpt(job), EXCERPT_LIMIT),
        "why": reason.text if reason else None, "error": job.last_error, "result": answer,
        "cost_usd": job.cost_usd, "attempts": job.attempts, "branch": job_branch(job),
        "checks": _checks_mark(job) if job.payload.get("checks") else None,
        "pull_request": ((job.delivery or {}).get("pr") or {}).get("url"),
        "created_at": job.created_at.isoformat(),
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }  # fmt: skip


def mcp_server(url: str, limits: McpLimits = McpLimits()) -> Any:
    """The MCP server of `claude-jobs mcp` (mcp's MCPServer; run it with ``.run("stdio")``):
    tools over the queue API on the database at ``url`` (a connection per call), within
    ``limits``. Errors are tool errors with the message the command line would print."""
    try:
        from mcp.server.mcpserver import MCPServer
        from mcp.server.mcpserver.exceptions import ToolError
    except ImportError:
        raise ConfigError(MCP_EXTRA_HINT) from None
    server = MCPServer(
        "claude-jobs",
        instructions="A durable queue of Claude Code jobs on PostgreSQL: enqueue prompts to run "
        "unattended in a directory, follow them, wait for them, read what they answered.",
    )

    def tool(function: Callable[..., Any]) -> Callable[..., Any]:
        """Register ``function`` as the tool of its name without ``tool_``, whose answer is
        JSON and whose errors read as the command line's."""

        @functools.wraps(function)
        def answered(*args: Any, **kwargs: Any) -> Any:
            try:
                return _jsonable(function(*args, **kwargs))
            except (JobsError, psycopg.Error) as error:
                raise ToolError(_scrub(str(error), url)) from None

        answered.__name__ = function.__name__.removeprefix("tool_")  # (its schema's title)
        return server.tool(name=answered.__name__)(answered)

    def database() -> psycopg.Connection:
        conn = connect(url, autocommit=True)
        check_schema(conn)
        return conn

    @tool
    def tool_list_jobs(
        status: str | None = None, queue: str | None = None, limit: int = 20
    ) -> list[dict[str, Any]]:
        """Jobs, newest first: id, status, queue, prompt, why each waits or how it ended."""
        if status is not None and status not in [each.value for each in JobStatus]:
            raise InvalidJob(f"status must be one of {', '.join(JobStatus)}, not {status!r}")
        with database() as conn:
            statuses = [status] if status else None
            jobs = list_jobs(
                conn, statuses=statuses, queue=queue, limit=max(1, min(limit, MAX_PAGE))
            )
            return [_mcp_job(conn, job) for job in jobs]

    @tool
    def tool_get_job(id: str) -> dict[str, Any]:
        """One job (an id or a unique prefix of 6 or more characters): status, why it waits or
        ended so, claude's answer, its cost, branch, checks and pull request."""
        with database() as conn:
            return _mcp_job(conn, get_job(conn, resolve_job_id(conn, id), transcript=False))

    @tool
    def tool_job_logs(id: str, lines: int = 50) -> str:
        """The end of a job's transcript, as `claude-jobs logs` prints it."""
        with database() as conn:
            job = get_job(conn, resolve_job_id(conn, id))
        shown = _stored_transcript(job)[-max(1, min(lines, MCP_LOG_LINES)) :]
        return "\n".join(shown) or "(no transcript yet)"

    @tool
    def tool_wait_for_jobs(ids: list[str], timeout: float = 600) -> dict[str, Any]:
        """Wait until every one of these jobs has finished, or ``timeout`` seconds passed (at
        most an hour); each job's status then, and whether all finished."""
        ends = time.monotonic() + max(0.0, min(timeout, MCP_WAIT_LIMIT))
        with database() as conn:
            keys = [resolve_job_id(conn, each) for each in ids]
            while True:
                statuses = {key: status for key, (status, _) in job_statuses(conn, keys).items()}
                done = all(statuses.get(key) in FINISHED_STATUSES for key in keys)
                if done or time.monotonic() >= ends:
                    return {"finished": done, "jobs": {str(key): statuses.get(key, "gone")
                                                       for key in keys}}  # fmt: skip
                time.sleep(min(1.0, max(0.0, ends - time.monotonic())))

    @tool
    def tool_stats() -> list[dict[str, Any]]:
        """Per queue: how many jobs are queued, running, succeeded, failed, cancelled."""
        with database() as conn:
            return queue_stats(conn)

    if limits.read_only:
        return server

    @tool
    def tool_enqueue(
        prompt: str,
        cwd: str,
        queue: str = DEFAULT_QUEUE,
        priority: int = 0,
        worktree: bool = False,
        after: list[str] | None = None,
        checks: list[str] | None = None,
        pr: bool = False,
        model: str | None = None,
        max_budget_usd: float | None = None,
    ) -> dict[str, Any]:
        """Queue a claude job: ``prompt`` to run in ``cwd`` (an absolute path), optionally in
        a git worktree of its own, after other jobs, with checks to pass and a pull request
        to open. Its id and status."""
        where = limits.check_enqueue(queue, cwd)
        payload = {"prompt": prompt, "cwd": where, "worktree": worktree or None,
                   "checks": checks, "pr": pr or None, "model": model,
                   "max_budget_usd": max_budget_usd}  # fmt: skip
        payload = {key: value for key, value in payload.items() if value is not None}
        with database() as conn:
            job = enqueue(conn, payload, queue=queue, priority=priority, after=after or [])
            return _mcp_job(conn, job)

    @tool
    def tool_cancel_job(id: str) -> dict[str, Any]:
        """Cancel a queued or running job (a running one is stopped by its worker)."""
        with database() as conn:
            key = resolve_job_id(conn, id)
            return {"id": str(key), "status": cancel_job(conn, key)}

    @tool
    def tool_retry_job(id: str) -> dict[str, Any]:
        """Put a failed or cancelled job back in the queue, with fresh attempts."""
        with database() as conn, conn.transaction():
            key = resolve_job_id(conn, id)
            return {"id": str(key), "retried": bool(retry_jobs(conn, [key]))}

    return server


###############################################################################
# Command line: the group, its types, migrate and enqueue
###############################################################################


class _Cli(click.Group):
    """Every error is one line on stderr, never a traceback: exit status 2 for bad input,
    1 for an operation that failed."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        _stop_by_exception(signal.SIGTERM)
        try:
            outcome = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = outcome if isinstance(outcome, int) else 0
        except click.UsageError as error:
            code = _fail(error.format_message(), 2)
        except click.ClickException as error:
            code = _fail(error.format_message(), error.exit_code)
        except (KeyboardInterrupt, _Stopped) as stopped:  # (the process exits: atexit runs,
            code = 128 + getattr(stopped, "signum", signal.SIGINT)  # the embedded server goes)
        except click.Abort as error:  # (click's own, for Ctrl-C: stopped, not failed)
            interrupted = isinstance(error.__context__, KeyboardInterrupt)
            code = 128 + signal.SIGINT if interrupted else _fail("aborted", 1)
        except (InvalidJob, ConfigError) as error:
            code = _fail(str(error), 2)
        except JobsError as error:
            code = _fail(str(error), 1)
        except psycopg.Error as error:
            code = _fail(f"database error: {error}", 1)
        if standalone_mode:
            gc.freeze()  # the collection at exit would walk every object for nothing: ~50 ms
            sys.exit(code)
        return code


class _Stopped(BaseException):
    """The process got ``signum`` (SIGTERM): it unwinds as for Ctrl-C, and exits 128 + signum
    (so what it holds is let go: the embedded PostgreSQL stops once its last user has gone)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop_by_exception(signum: int) -> None:
    """From now on, ``signum`` raises _Stopped in the main thread (unless it is ignored, as
    under nohup); the commands that stop gracefully (worker, serve) set their own handlers."""
    if signal.getsignal(signum) is signal.SIG_IGN:
        return

    def stop(number: int, frame: object) -> None:
        raise _Stopped(number)

    with contextlib.suppress(ValueError):  # (not the main thread: a test calling main())
        signal.signal(signum, stop)


def _fail(message: str, code: int) -> int:
    for handler in logging.getLogger().handlers:  # what was logged comes first
        handler.flush()
    click.echo(f"Error: {_printable(' '.join(message.split()))}", err=True)
    return code


@dataclass
class _Config:
    """What the command group knows: where the database is."""

    database_url: str | None
    home: Path
    _url: str | None = None

    def url(self) -> str:
        """The database URL; with none given, the embedded server's (started and migrated)."""
        if self._url is None:
            if self.database_url:
                check_conninfo(self.database_url)
                self._url = self.database_url
            else:
                url = start_embedded(self.home)
                with connect(url, autocommit=True) as conn:
                    migrate(conn)
                self._url = url
        return self._url

    def connect(self) -> psycopg.Connection:
        """An autocommit connection to a database with the current schema."""
        conn = connect(self.url(), autocommit=True)
        try:
            check_schema(conn)
        except BaseException:
            conn.close()
            raise
        return conn


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class _DurationType(click.ParamType):
    """A duration; with ``unit_needed``, a bare number (seconds) is refused, where seconds are
    surely not what was meant and would do harm (``cleanup --older-than 7``)."""

    name = "duration"

    def __init__(self, unit_needed: bool = False) -> None:
        self.unit_needed = unit_needed

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int | float):
            return float(value)
        if self.unit_needed and _is_number(value) and float(value) != 0:
            self.fail(f"{value!r} needs a unit: {value.strip()}d, {value.strip()}h...", param, ctx)
        try:
            return parse_duration(value)
        except InvalidJob as error:
            self.fail(str(error), param, ctx)


class _TimeType(click.ParamType):
    name = "time"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, datetime):
            return value
        try:
            return parse_time(value)
        except InvalidJob as error:
            self.fail(str(error), param, ctx)


class _PayloadType(click.ParamType):
    """A payload: a JSON object, or @PATH, a file that holds one."""

    name = "payload"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, Mapping):
            return value
        try:
            payload = _payload_given(value, "it")
        except InvalidJob as error:
            self.fail(str(error), param, ctx)
        if not isinstance(payload, dict):
            self.fail(f"must be a JSON object, not {_json_type(payload)}", param, ctx)
        return payload


class _SizeType(click.ParamType):
    """A size in bytes: 1048576, 512k, 10MiB, 1G (k, M, G: powers of 1024)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(?:i?b)?\s*", str(value), flags=re.I)
        if not match or int(match.group(1)) == 0:
            self.fail(f"{value!r} is not a size: give bytes, or like 512k, 10MiB, 1G", param, ctx)
        return int(match.group(1)) * 1024 ** "_kmg".index(match.group(2).lower() or "_")


_DURATION_TYPE = _DurationType()


class _RateType(click.ParamType):
    name = "rate"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, Rate):
            return str(value)
        try:
            return str(Rate.parse(value))
        except InvalidJob as error:
            self.fail(str(error), param, ctx)


_TIME_TYPE = _TimeType()
_VALUE_TYPES = {
    "rate": _RateType(),
    "payload": _PayloadType(),
    "duration": _DURATION_TYPE,
    "duration, unit needed": _DurationType(unit_needed=True),
    "time": _TIME_TYPE,
}


def _flags(settings: type, *names: str) -> Callable[[Any], Any]:
    """The command-line options of a settings dataclass's fields (those named, or every one
    with a flag), in field order, as their metadata says (see _option): one source for the
    Python API, the options and their environment variables."""

    def add(command: Any) -> Any:
        for each in reversed(dataclasses.fields(settings)):
            if "flag" not in each.metadata or (names and each.name not in names):
                continue
            spec = dict(each.metadata["flag"])
            env, value = spec.pop("env"), spec.pop("value")
            flag = spec.pop("flag", "--" + each.name.replace("_", "-"))
            decls = [flag, *spec.pop("aliases", ()), each.name]
            default = spec.setdefault("default", each.default)
            if value:
                spec["type"] = _VALUE_TYPES[value]
            if not (default is None or default is False or default == ()):
                spec.setdefault("show_default", True)
                text = _duration_text(default) if value and "duration" in value else None
                if text and parse_duration(text) == default:  # as people write it: 5s, not 5.0
                    spec["default"] = text
            if env is None:
                command = click.option(*decls, **spec)(command)
            else:
                command = _setting(*decls, env=env, **spec)(command)
        return command

    return add


def _setting(*decls: str, env: str, **kwargs: Any) -> Callable[[Any], Any]:
    """An option with its CLAUDE_JOBS_* environment variable, shown in --help."""
    return click.option(*decls, envvar=f"CLAUDE_JOBS_{env}", show_envvar=True, **kwargs)


_import_option = _setting(
    "--import",
    "imports",
    env="IMPORT",
    multiple=True,
    metavar="MODULE",
    help="Import MODULE first, so the job kinds it registers with @handler are known (repeatable).",
)


def _import_modules(names: Sequence[str]) -> None:
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: modules of the project at hand
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as error:
            raise ConfigError(f"cannot import {name}: {type(error).__name__}: {error}") from None


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--database-url",
    envvar=["CLAUDE_JOBS_DATABASE_URL", "DATABASE_URL"],
    show_envvar=True,
    metavar="URL",
    help="PostgreSQL URL or conninfo. Without one, an embedded PostgreSQL "
    "kept in --home is used (pip install 'claude-jobs[embedded]').",
)
@_setting(
    "--home",
    env="HOME",
    type=click.Path(file_okay=False, path_type=Path),
    default=default_home,
    show_default="~/.local/share/claude-jobs",
    help="Where the embedded PostgreSQL keeps its data.",
)
@click.pass_context
def cli(ctx: click.Context, database_url: str | None, home: Path) -> None:
    """A durable job queue on PostgreSQL for unattended Claude Code (`claude -p`) runs.

    \b
    Example:
      claude-jobs enqueue --payload '{"prompt": "explain this code", "cwd": "."}'
      claude-jobs worker --burst
      claude-jobs show 6f1c2e9a-...
    """
    ctx.obj = _Config(database_url or None, home)


@cli.command("migrate")
@click.option(
    "--print-sql",
    is_flag=True,
    help="Print the schema script (the text of migrations.sql) instead of applying it.",
)
@click.pass_obj
def migrate_command(config: _Config, print_sql: bool) -> None:
    """Create the schema, or upgrade an older one in place.

    Idempotent, and safe to run from several machines at once.

    \b
    Example:
      claude-jobs --database-url postgresql://me@db/app migrate
      claude-jobs migrate --print-sql > migrations.sql
    """
    if print_sql:
        click.echo(schema_sql(), nl=False)
        return
    url = config.url()
    with connect(url, autocommit=True) as conn:
        before, after = migrate(conn)
    if before == after:
        click.echo(f"the schema of {mask_url(url)} is up to date (version {after})")
    else:
        click.echo(f"migrated {mask_url(url)} from version {before or 'none'} to {after}")


def _payload_flags(command: Any) -> Any:
    """The options that give a job's payload (enqueue, schedule add and edit): a PROMPT
    argument, --prompt-file, --cwd, --payload, --worktree, --base, --max-budget-usd."""
    for option in reversed([
        click.argument("prompt", required=False),
        click.option(
            "--prompt-file",
            metavar="PATH",
            help="Read the prompt from this file, byte for byte ('-': stdin).",
        ),
        click.option(
            "--cwd",
            metavar="DIR",
            help='The claude job\'s directory (payload "cwd") [default with a prompt: here].',
        ),
        click.option(
            "--payload",
            metavar="JSON",
            help="The job's payload, a JSON object (@PATH: read it from a file); with a "
            "prompt, the rest of it (claude's options).",
        ),
        click.option(
            "--worktree",
            is_flag=True,
            help='Run claude in a fresh git worktree on its own branch (payload "worktree": '
            "true).",
        ),
        click.option(
            "--base", metavar="REF", help="The worktree's starting point [default: HEAD]."
        ),
        click.option(
            "--max-budget-usd",
            type=click.FloatRange(0, min_open=True),
            help='claude stops once the job has cost this much (payload "max_budget_usd").',
        ),
        click.option(
            "--check", "checks", multiple=True, metavar="CMD",
            help="After claude, run this shell command in the job's directory (repeatable, "
            "in order); one that fails goes back to claude to fix (payload \"checks\").",
        ),
        click.option(
            "--check-rounds", type=int, metavar="N",
            help=f"Rounds of repair after a check fails [default: {DEFAULT_CHECK_ROUNDS}; 0: "
            "none].",
        ),
        click.option(
            "--push", is_flag=False, flag_value="origin", metavar="[REMOTE]",
            help="After success, push the worktree job's branch to REMOTE [default: origin] "
            "(--push=REMOTE before a prompt).",
        ),
        click.option(
            "--pr", is_flag=True,
            help="Push, then open a GitHub pull request from the branch (draft unless "
            "--pr-ready).",
        ),
        click.option(
            "--pr-base", metavar="BRANCH",
            help="The pull request's base [default: the branch the worktree started from].",
        ),
        click.option("--pr-ready", is_flag=True, help="Open the pull request ready for review."),
        click.option(
            "--pr-title", metavar="TEXT",
            help="The pull request's title [default: claude's result's first line].",
        ),
    ]):  # fmt: skip
        command = option(command)
    return command


#: The options of _payload_flags that stand for keys of a claude payload, by payload key.
_PAYLOAD_OPTIONS = {"worktree": "--worktree", "base": "--base",
                    "max_budget_usd": "--max-budget-usd", "checks": "--check",
                    "check_rounds": "--check-rounds", "push": "--push", "pr": "--pr",
                    "pr_base": "--pr-base", "pr_ready": "--pr-ready",
                    "pr_title": "--pr-title"}  # fmt: skip


def _payload_options(options: dict[str, Any], only_given: bool = False) -> dict[str, Any]:
    """Take the values of _PAYLOAD_OPTIONS out of a command's ``options`` (``only_given``: of
    those that are there, as schedule edit has them)."""
    return {key: options.pop(key) for key in _PAYLOAD_OPTIONS if not only_given or key in options}


@cli.command("enqueue")
@_payload_flags
@click.option(
    "--file",
    "payload_file",
    type=click.File("rb"),
    metavar="PATH",
    help="JSON Lines, one payload object a line ('-': stdin); all are queued or none.",
)
@_flags(JobOptions)
@_setting(
    "--delay",
    env="DELAY",
    type=_DURATION_TYPE,
    help="Run no sooner than this from now: 30s, 5m, 1h30m.",
)
@click.option("--no-concurrency-key", is_flag=True, help="Run regardless of other jobs' keys.")
@_import_option
@click.option("--json", "as_json", is_flag=True, help="Print the new job as JSON, not its id.")
@click.option(
    "--wait", is_flag=True,
    help="Then follow the job like `logs -f`; exit 0 only if it succeeded.",
)  # fmt: skip
@click.pass_obj
def enqueue_command(
    config: _Config,
    prompt: str | None,
    prompt_file: str | None,
    cwd: str | None,
    payload: str | None,
    payload_file: Any,
    imports: Sequence[str],
    as_json: bool,
    wait: bool,
    no_concurrency_key: bool,
    after: Sequence[str],
    **options: Any,
) -> None:
    """Queue a claude job with PROMPT (or --prompt-file), run in this directory (or --cwd);
    or a job of any kind with --payload; or a file of jobs with --file. Prints the new id.

    A claude job's payload holds "prompt" and optionally "cwd", a directory resolved against
    where you run this ("." means here; without one the job runs in the worker's directory),
    and claude's options: model, max_turns, allowed_tools, permission_mode... (see the
    README).

    \b
    Examples:
      claude-jobs enqueue "explain this code"
      claude-jobs enqueue --prompt-file review.md --cwd ~/src/shop --queue reviews
      git diff | claude-jobs enqueue --prompt-file - --wait
      claude-jobs enqueue "add type hints" --worktree --payload '{"model": "opus"}'
      claude-jobs enqueue --file reviews.jsonl --queue nightly --delay 8h --priority 10
      claude-jobs enqueue --continue-from 3f2a9c "now write the tests"
      claude-jobs enqueue "fix the flaky test" --worktree --check 'pytest -q' --pr
    """
    _import_modules(imports)
    payload_options = _payload_options(options)
    pushed = payload_options["push"]
    if prompt is None and pushed is not None and not _REMOTE_NAME.fullmatch(pushed):
        raise InvalidJob(
            f"--push took {pushed!r} for its remote: put --push after the prompt, or write "
            "--push=REMOTE"
        )
    text = _prompt_given(prompt, prompt_file, payload_file)
    one = text is not None or payload is not None
    _check_enqueue_flags(one, payload_file is not None, wait, as_json, no_concurrency_key, options)
    options["after"] = [job_id for each in after for job_id in each.split(",") if job_id.strip()]
    job_options = _checked_options(options, None)  # the options first, before reading input
    extra = _claude_keys(job_options.kind, cwd, payload_options)
    if one:  # (here, unless --cwd says where, or it continues a job: there)
        here = cwd is None and options["continue_from"] is None
        given = _payload_of(job_options.kind, text, payload, extra, here=here)
        if not isinstance(given, dict):
            raise InvalidJob(f"the payload must be a JSON object, not {_json_type(given)}")
        request = _job_request(given, None, job_options)  # checked before the database is needed
        jobs = [_enqueue_one(config, request, wait, options["delay"])]
    else:
        jobs = _enqueue_file(config, payload_file, extra, job_options, as_json, options["delay"])
    for job in jobs:
        click.echo(_json_text(job.to_dict()) if as_json else job.id)


def _enqueue_file(
    config: _Config,
    stream: Any,
    extra: Mapping[str, Any],
    options: JobOptions,
    rows: bool,
    delay: float | None,
) -> list[Job]:
    """Queue every job of a JSON Lines file, or none (an error names the line). Print their
    ids, or with ``rows`` return the jobs."""
    lines, payloads = _read_json_lines(stream, extra)
    with config.connect() as conn:
        try:
            ids = _enqueue_many_checked(conn, payloads, _from_now(options, delay))
        except InvalidJob as error:
            if error.position is None:
                raise
            raise InvalidJob(f"{lines[error.position - 1]}: {error.detail}") from None
        for position in ids.duplicates:
            _note_duplicate(get_job(conn, ids[position], transcript=False), lines[position])
        if not rows:
            click.echo("".join(f"{job_id}\n" for job_id in ids), nl=False)
            return []
        jobs = [get_job(conn, job_id, transcript=False) for job_id in ids]
        return [
            dataclasses.replace(job, duplicate=True) if n in ids.duplicates else job
            for n, job in enumerate(jobs)
        ]


def _note_duplicate(holder: Job, where: str = "") -> None:
    """Say on stderr that a job was not made: ``holder`` has its unique key."""
    click.echo(
        f"note: {where + ': ' if where else ''}job {holder.id} ({holder.status}) has the unique "
        f"key {_printable(repr(holder.unique_key))}: nothing was enqueued",
        err=True,
    )


def _from_now(options: JobOptions, delay: float | None) -> JobOptions:
    """``options`` with their --delay counted from now, when the job is about to be queued
    (the command checked them before it read its input and connected)."""
    return options if delay is None else dataclasses.replace(options, run_at=_due_at(None, delay))


def _check_enqueue_flags(
    one: bool, many: bool, wait: bool, as_json: bool, no_key: bool, options: dict[str, Any]
) -> None:
    """Refuse flags that contradict each other (``one``: a prompt or payload was given,
    ``many``: a file); --no-concurrency-key becomes a limit of 0."""
    if [one, many].count(True) != 1:
        raise InvalidJob("give a prompt (or --prompt-file), --payload JSON, or --file PATH")
    if wait and many:
        raise InvalidJob("--wait follows one job: give a prompt or --payload, not --file")
    if wait and as_json:
        raise InvalidJob("--wait prints the job's transcript, --json its row: give one of them")
    if no_key:
        if options["concurrency_key"] is not None:
            raise InvalidJob("give --concurrency-key or --no-concurrency-key, not both")
        options["concurrency_limit"] = 0


def _enqueue_one(config: _Config, request: _JobRequest, wait: bool, delay: float | None) -> Job:
    """Queue one job; say what a continuation widens; with ``wait``, follow it to its end
    (and exit as it ended)."""
    with config.connect() as conn:
        options = _from_now(request.options, delay)
        job = _enqueue_checked(conn, dataclasses.replace(request, options=options))
        if job.duplicate:
            _note_duplicate(job)
        if job.widens:
            click.echo(
                f"note: this continuation widens what job {job.continue_from} could do: "
                + _printable("; ".join(job.widens)),
                err=True,
            )
        if wait:
            click.echo(f"queued job {job.id}", err=True)
            sys.exit(_follow(conn, job.id, since=0))
    return job


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text, parse_constant=_no_constant)
    except InvalidJob as error:
        raise InvalidJob(f"{where} is not valid JSON: {error}") from None
    except ValueError as error:
        reason = getattr(error, "msg", str(error))
        raise InvalidJob(f"{where} is not valid JSON: {reason}") from None
    except RecursionError:
        raise InvalidJob(f"{where} nests more than {MAX_PAYLOAD_DEPTH} levels deep") from None


def _claude_keys(kind: str, cwd: str | None, options: Mapping[str, Any]) -> dict[str, Any]:
    """The payload keys that --cwd and the _PAYLOAD_OPTIONS ``options`` stand for (a
    payload's own keys win over them; an option not given is none)."""
    extra = {
        key: list(value) if key == "checks" else value
        for key, value in options.items()
        if not (value is None or value is False or value == ())  # (0 is a value)
    }
    if extra and kind != DEFAULT_KIND:
        given = ", ".join(_PAYLOAD_OPTIONS[key] for key in extra)
        raise InvalidJob(f"{given} {'is' if len(extra) == 1 else 'are'} for claude jobs")
    if cwd is not None and kind != DEFAULT_KIND:
        raise InvalidJob("--cwd is for claude jobs")
    return extra if cwd is None else {**extra, "cwd": cwd}


def _prompt_given(prompt: str | None, prompt_file: str | None, payload_file: Any) -> str | None:
    """The prompt given as an argument or in --prompt-file (read as it is, byte for byte)."""
    if prompt is not None and prompt_file is not None:
        raise InvalidJob(
            "give the prompt once: as an argument, with --prompt-file, or in --payload"
        )
    if (prompt is not None or prompt_file is not None) and payload_file is not None:
        raise InvalidJob("--file reads many jobs, one payload a line: give it no prompt")
    if prompt_file is None:
        return prompt
    try:
        raw = sys.stdin.buffer.read() if prompt_file == "-" else Path(prompt_file).read_bytes()
    except OSError as error:
        raise InvalidJob(f"cannot read --prompt-file {prompt_file}: {error.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidJob(f"--prompt-file {prompt_file} is not UTF-8 text") from None
    if not text.strip():
        where = "stdin" if prompt_file == "-" else prompt_file
        raise InvalidJob(f"--prompt-file {where} is empty: a claude job needs a prompt")
    return text


def _payload_given(payload: str, what: str = "--payload") -> Any:
    """The JSON of --payload (or ``what``), or of the file it names as @PATH."""
    if not payload.startswith("@"):
        return _parse_json(payload, what)
    path = payload[1:]
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise InvalidJob(f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise InvalidJob(f"{path} is not UTF-8 text") from None
    return _parse_json(text, path)


def _payload_of(
    kind: str, text: str | None, payload: str | None, extra: Mapping[str, Any], here: bool
) -> Any:
    """The payload that a prompt ``text``, --payload and the keys ``extra`` (of --cwd,
    --worktree...) give together; ``here``: a prompt runs in this directory unless told."""
    given = _payload_given(payload) if payload is not None else {}
    if text is not None:
        given = _with_prompt(kind, given, text, here=here)
    return {**extra, **given} if isinstance(given, dict) else given


def _with_prompt(kind: str, given: Any, prompt: str, here: bool) -> dict[str, Any]:
    """A claude payload of ``prompt`` and the rest of the payload ``given``; ``here``: run in
    this directory unless ``given`` says where."""
    if kind != DEFAULT_KIND:
        raise InvalidJob(f"a prompt is for claude jobs: give a {kind} job its --payload")
    if not isinstance(given, dict):
        raise InvalidJob(f"--payload must be a JSON object, not {_json_type(given)}")
    if "prompt" in given:
        raise InvalidJob(
            "give the prompt once: as an argument, with --prompt-file, or in --payload"
        )
    default = {"cwd": "."} if here and "cwd" not in given else {}
    return {**default, **given, "prompt": prompt}


def _read_json_lines(
    stream: Any, extra: Mapping[str, Any] | None = None
) -> tuple[list[str], list[Any]]:
    """The payloads of a JSON Lines stream (with ``extra`` keys they lack), and where each
    is ("line 3 of jobs.jsonl"); an error names its line."""
    lines, payloads = [], []
    name = getattr(stream, "name", "<stdin>")
    for number, raw in enumerate(stream, 1):
        try:
            line = raw.decode("utf-8")
            if line.strip():
                payload = _parse_json(line, "it")
                payloads.append(
                    {**(extra or {}), **payload} if isinstance(payload, dict) else payload
                )
                lines.append(f"line {number} of {name}")
        except UnicodeDecodeError:
            raise InvalidJob(f"line {number} of {name} is not UTF-8 text") from None
        except InvalidJob as error:
            raise InvalidJob(f"line {number} of {name}: {error}") from None
    return lines, payloads


###############################################################################
# Command line: schedules and batches
###############################################################################


#: The job settings a schedule's runs take: enqueue's, but those of timing and chains.
_RUN_SETTINGS = (
    "kind", "queue", "priority", "max_attempts", "timeout", "concurrency_key",
    "concurrency_limit", "unique_key", "unique_for", "batch", "on_finish", "on_success",
    "notify", "notify_on", "tags",
)  # fmt: skip


def _schedule_flags(command: Any) -> Any:
    """The options of a schedule's timing and policies (schedule add and edit)."""
    for option in reversed([
        click.option("--cron", metavar="EXPR", help="Run at the times of this cron expression "
                     "(five fields: minute hour day month weekday), e.g. '0 2 * * *'."),
        click.option("--every", type=_DURATION_TYPE, help="Or run every so often: 30m, 6h, 1d "
                     "(the first run one interval from now)."),
        click.option("--timezone", default="UTC", show_default=True, metavar="ZONE",
                     help="The time zone of --cron's times (IANA: Europe/Berlin)."),
        click.option("--catch-up", type=click.Choice(CATCH_UPS), default="latest",
                     show_default=True, help="Due times missed while no worker ran: one run "
                     "for all (latest), one each (all, at most 100), or none."),
        click.option("--overlap", type=click.Choice(OVERLAPS), default="skip",
                     show_default=True, help="While a run is still queued or running: skip "
                     "the next, queue it (to run after), or allow both at once."),
        click.option("--only-if-changed/--always", default=False, show_default=True,
                     help="Skip a claude run while its repository's HEAD is where it was at "
                     "the last successful run."),
        click.option("--no-concurrency-key", is_flag=True,
                     help="Runs go regardless of other jobs' keys."),
    ]):  # fmt: skip
        command = option(command)
    return command


def _given(ctx: click.Context, values: Mapping[str, Any]) -> dict[str, Any]:
    """Of these parameters, those given on the command line (not defaults, nor variables)."""
    source = click.core.ParameterSource.COMMANDLINE
    return {key: value for key, value in values.items() if ctx.get_parameter_source(key) == source}


def _local_time(moment: datetime | None, schedule: Schedule) -> str:
    """A time in a schedule's zone, and how far it is: 2026-12-03 02:00 CET (in 7h); to the
    second for a schedule whose runs are not a whole number of minutes apart."""
    if moment is None:
        return "-"
    seconds = ":%S" if schedule.every is not None and schedule.every % 60 else ""
    return (
        f"{moment.astimezone(_zone(schedule.timezone)):%Y-%m-%d %H:%M{seconds} %Z} ({_ago(moment)})"
    )


@cli.group("schedule")
def schedule_group() -> None:
    """Jobs made again and again, by cron or every so often; workers fire them.

    \b
    Examples:
      claude-jobs schedule add nightly-review "review today's changes" --cwd ~/src/shop \\
          --cron '0 2 * * *' --timezone Europe/Berlin --only-if-changed
      claude-jobs schedule list
      claude-jobs schedule show nightly-review
      claude-jobs schedule sync schedules.toml --prune
    """


@schedule_group.command("add")
@click.argument("name")
@_payload_flags
@_schedule_flags
@_flags(JobOptions, *_RUN_SETTINGS)
@_import_option
@click.option("--json", "as_json", is_flag=True, help="Print the schedule as JSON.")
@click.pass_obj
def schedule_add_command(
    config: _Config,
    name: str,
    prompt: str | None,
    prompt_file: str | None,
    cwd: str | None,
    payload: str | None,
    no_concurrency_key: bool,
    imports: Sequence[str],
    as_json: bool,
    **options: Any,
) -> None:
    """Add schedule NAME: the job of PROMPT (or --prompt-file, or --payload; the options of
    `enqueue`), made at the times of --cron (in --timezone) or --every so often. A run is an
    ordinary job that records its schedule and due time.

    \b
    Examples:
      claude-jobs schedule add nightly-review --prompt-file review.md --cwd ~/src/shop \\
          --cron '0 2 * * *' --timezone Europe/Berlin --only-if-changed --max-budget-usd 5
      claude-jobs schedule add bump --every 7d --catch-up none "bump the dependencies"
      claude-jobs schedule add vacuum --kind maintenance --import myapp.jobs \\
          --payload '{"table": "events"}' --cron '30 3 * * 0' --overlap queue
    """
    _import_modules(imports)
    text = _prompt_given(prompt, prompt_file, None)
    if text is None and payload is None:
        raise InvalidJob("give the job: a PROMPT (or --prompt-file), or --payload JSON")
    job = {key: options.pop(key) for key in _RUN_SETTINGS}
    if no_concurrency_key:
        job["concurrency_limit"] = 0
    extra = _claude_keys(job["kind"], cwd, _payload_options(options))
    given = _payload_of(job["kind"], text, payload, extra, here=cwd is None)
    with config.connect() as conn:
        schedule = add_schedule(conn, name, given, **options, **job)
    if as_json:
        click.echo(_json_text(schedule.to_dict()))
    else:
        click.echo(f"added schedule {name}: {schedule.when}, next run "
                   f"{_local_time(schedule.next_run_at, schedule)}")  # fmt: skip


@schedule_group.command("edit")
@click.argument("name")
@_payload_flags
@_schedule_flags
@_flags(JobOptions, *_RUN_SETTINGS)
@_import_option
@click.option("--json", "as_json", is_flag=True, help="Print the schedule as JSON.")
@click.pass_context
def schedule_edit_command(
    ctx: click.Context,
    name: str,
    prompt: str | None,
    prompt_file: str | None,
    payload: str | None,
    imports: Sequence[str],
    as_json: bool,
    **options: Any,
) -> None:
    """Change what schedule NAME makes or when: each option given replaces the schedule's
    (a PROMPT or --prompt-file its prompt; --payload's keys its payload's, a null drops one;
    --cron replaces --every and the other way round). The next run is computed again.

    \b
    Examples:
      claude-jobs schedule edit nightly-review --cron '0 3 * * 1-5'
      claude-jobs schedule edit nightly-review --prompt-file review-v2.md --max-budget-usd 8
    """
    _import_modules(imports)
    config: _Config = ctx.obj
    text = _prompt_given(prompt, prompt_file, None)
    changes = _given(ctx, options)
    if changes.pop("no_concurrency_key", False):
        changes["concurrency_limit"] = 0
    keys = _payload_options(changes, only_given=True)
    cwd = changes.pop("cwd", None)
    if not changes and not keys and cwd is None and text is None and payload is None:
        raise InvalidJob("nothing to change: give the options to change")
    with config.connect() as conn:
        old = get_schedule(conn, name)
        new_payload = None
        if keys or cwd is not None or text is not None or payload is not None:
            kind = changes.get("kind", old.kind)
            extra = _claude_keys(kind, cwd, keys)
            merged = {**old.payload, **_payload_of(kind, text, payload, extra, here=False)}
            new_payload = {key: value for key, value in merged.items() if value is not None}
        schedule = edit_schedule(conn, name, payload=new_payload, **changes)
    if as_json:
        click.echo(_json_text(schedule.to_dict()))
    else:
        click.echo(f"changed schedule {name}: {schedule.when}, next run "
                   f"{_local_time(schedule.next_run_at, schedule)}")  # fmt: skip


@schedule_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON Lines, one schedule a line.")
@click.pass_obj
def schedule_list_command(config: _Config, as_json: bool) -> None:
    """Every schedule: when it runs, in which zone, its next run, its last run (the job it
    made and how that went, or why it made none), and whether it is paused.

    \b
    Example:
      claude-jobs schedule list
    """
    with config.connect() as conn:
        schedules = list_schedules(conn)
    if as_json:
        for schedule in schedules:
            click.echo(_json_text(schedule.to_dict()))
        return
    if not schedules:
        click.echo("no schedules", err=True)
        return
    rows = [
        [s.name, s.when, s.timezone,
         "paused" if s.paused_at else _local_time(s.next_run_at, s),
         _last_run_text(s.last_run)]
        for s in schedules
    ]  # fmt: skip
    click.echo(_table(["NAME", "WHEN", "ZONE", "NEXT RUN", "LAST RUN"], rows))


def _last_run_text(run: Mapping[str, Any] | None) -> str:
    """A schedule's latest run on one line: when it was due, the job it made (and how that
    went) or why it made none."""
    if run is None:
        return "-"
    made = f"job {str(run['job_id'])[:8]} {run['status'] or 'deleted'}" if run["job_id"] else ""
    why = f"{run['outcome']}: {run['note']}" if run["outcome"] in ("skipped", "missed") else ""
    return f"{_ago(run['due_at'])}: {made or why or run['outcome']}"


@schedule_group.command("show")
@click.argument("name")
@click.option("--runs", "limit", default=20, show_default=True, type=click.IntRange(1, 10_000),
              help="How many of its latest runs to show.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the schedule and its runs as JSON.")
@click.pass_obj
def schedule_show_command(config: _Config, name: str, limit: int, as_json: bool) -> None:
    """Schedule NAME: what it makes, when, its policies, and its latest runs (the job each
    made, its status and cost, or why it made none).

    \b
    Example:
      claude-jobs schedule show nightly-review --runs 50
    """
    with config.connect() as conn:
        schedule = get_schedule(conn, name)
        runs = schedule_runs(conn, name, limit)
    if as_json:
        click.echo(_json_text({**schedule.to_dict(), "runs": runs}))
        return
    options = {k: v for k, v in schedule.options.items() if v not in (None, ())}
    fields = [
        ("name", schedule.name), ("when", f"{schedule.when} ({schedule.timezone})"),
        ("next run", "paused since " + _ago(schedule.paused_at) if schedule.paused_at
         else _local_time(schedule.next_run_at, schedule)),
        ("kind", schedule.kind), ("catch up", schedule.catch_up), ("overlap", schedule.overlap),
        ("only if changed", "yes" if schedule.only_if_changed else "no"),
        ("job options", _json_text(options)), ("payload", _json_text(schedule.payload)),
    ]  # fmt: skip
    for label, value in fields:
        click.echo(f"{label + ':':<17}{_printable(value)}")
    if not runs:
        click.echo("no runs yet")
        return
    rows = [
        [_local_time(r["due_at"], schedule), r["outcome"],
         str(r["job_id"])[:8] if r["job_id"] else "-", r["status"] or "-",
         _money(float(r["cost_usd"] or 0)), r["note"] or ""]
        for r in runs
    ]  # fmt: skip
    click.echo()
    click.echo(_table(["DUE", "OUTCOME", "JOB", "STATUS", "COST", "NOTE"], rows))


@schedule_group.command("pause")
@click.argument("name")
@click.pass_obj
def schedule_pause_command(config: _Config, name: str) -> None:
    """Fire no run of schedule NAME until it is resumed."""
    with config.connect() as conn:
        pause_schedule(conn, name)
    click.echo(f"paused schedule {name}")


@schedule_group.command("resume")
@click.argument("name")
@click.pass_obj
def schedule_resume_command(config: _Config, name: str) -> None:
    """Fire schedule NAME again, from its next due time (what fell due while it was paused
    is not caught up)."""
    with config.connect() as conn:
        schedule = resume_schedule(conn, name)
    click.echo(f"resumed schedule {name}: next run "
               f"{_local_time(schedule.next_run_at, schedule)}")  # fmt: skip


@schedule_group.command("remove")
@click.argument("name")
@click.pass_obj
def schedule_remove_command(config: _Config, name: str) -> None:
    """Remove schedule NAME and its record of runs (the jobs it made stay)."""
    with config.connect() as conn:
        remove_schedule(conn, name)
    click.echo(f"removed schedule {name}")


@schedule_group.command("run")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the new job as JSON, not its id.")
@click.pass_obj
def schedule_run_command(config: _Config, name: str, as_json: bool) -> None:
    """Make one run of schedule NAME now, whatever its timing and policies say; prints the
    new job's id. Its timing goes on as before.

    \b
    Example:
      claude-jobs schedule run nightly-review
    """
    with config.connect() as conn:
        job = run_schedule(conn, name, by=f"{_worker_name()} (schedule run)")
    click.echo(_json_text(job.to_dict()) if as_json else job.id)


@schedule_group.command("sync")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--prune", is_flag=True, help="Remove the schedules the file does not have.")
@click.option("--dry-run", is_flag=True, help="Say what would change; change nothing.")
@_import_option
@click.pass_obj
def schedule_sync_command(
    config: _Config, path: Path, prune: bool, dry_run: bool, imports: Sequence[str]
) -> None:
    """Make the schedules match a TOML file kept in version control: one table per
    schedule, named as the schedule, with the keys of `schedule add` (cron or every,
    timezone, catch_up, overlap, only_if_changed, prompt, cwd, queue, max_budget_usd...,
    and a payload table). Relative paths are against the file's directory. Prints what
    changed; all or nothing.

    \b
    Example:
      claude-jobs schedule sync schedules.toml --prune --dry-run
    """
    import tomllib

    _import_modules(imports)
    try:
        entries = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise InvalidJob(f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise InvalidJob(f"{path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as error:
        raise InvalidJob(f"{path} is not valid TOML: {error}") from None
    with config.connect() as conn:
        plan = sync_schedules(
            conn, entries, base_dir=path.resolve().parent, prune=prune, dry_run=dry_run
        )
    for what, name, differ in plan:
        if what == "unchanged":
            continue
        verb = {"added": "add", "changed": "change", "removed": "remove"}[what]
        said = f"would {verb}" if dry_run else what
        click.echo(f"{said} {name}" + (f" ({', '.join(differ)})" if differ else ""))
    if all(what == "unchanged" for what, _, _ in plan):
        click.echo("the schedules match the file", err=True)


# -- batches ---------------------------------------------------------------------------------


@cli.group("batch")
def batch_group() -> None:
    """Jobs grouped under a name (enqueue --batch NAME), and what follows when they end.

    \b
    Examples:
      claude-jobs enqueue --file repos.jsonl --batch review --on-finish @summarise.json
      claude-jobs batch list
      claude-jobs batch show review
      claude-jobs batch retry review
    """


def _batch_line(batch: Batch) -> list[str]:
    """A batch as `batch list` shows it."""
    counts = batch.counts
    by_status = ", ".join(f"{counts[s]} {s}" for s in JobStatus if counts.get(s))
    return [
        str(batch.id)[:8], batch.name, f"{batch.ended}/{batch.jobs}", by_status or "-",
        _money(batch.cost_usd), _ago(batch.created_at),
        _ago(batch.finished_at) if batch.finished_at else "open",
        ", ".join(str(c)[:8] for c in batch.callbacks) or "-",
    ]  # fmt: skip


_BATCH_HEADERS = ["ID", "NAME", "ENDED", "JOBS", "COST", "CREATED", "FINISHED", "CALLBACKS"]


@batch_group.command("list")
@click.option("--open", "only_open", is_flag=True, help="Only batches not finished yet.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON Lines, one batch a line.")
@click.pass_obj
def batch_list_command(config: _Config, only_open: bool, limit: int, as_json: bool) -> None:
    """The newest batches: how many of their jobs have ended (and in which status), their
    cost, when they were made and finished, the callbacks they queued.

    \b
    Example:
      claude-jobs batch list --open
    """
    with config.connect() as conn:
        batches = list_batches(conn, only_open=only_open, limit=limit)
    if as_json:
        for batch in batches:
            click.echo(_json_text(batch.to_dict()))
        return
    if not batches:
        click.echo("no batches", err=True)
        return
    click.echo(_table(_BATCH_HEADERS, [_batch_line(batch) for batch in batches]))


@batch_group.command("show")
@click.argument("batch", metavar="NAME|ID")
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True,
              help="How many of its jobs to list, newest first.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the batch as JSON (no jobs).")
@click.pass_obj
def batch_show_command(config: _Config, batch: str, limit: int, as_json: bool) -> None:
    """A batch (by name: the open one, else the newest; or by id): its progress, n of m by
    status, cost so far, started, finished, its callbacks, then its jobs.

    \b
    Example:
      claude-jobs batch show nightly-review
    """
    with config.connect() as conn:
        found = get_batch(conn, batch)
        if as_json:
            click.echo(_json_text(found.to_dict()))
            return
        counts = ", ".join(f"{found.counts[s]} {s}" for s in JobStatus if found.counts.get(s))
        callbacks = [("on finish", found.on_finish), ("on success", found.on_success)]
        fields = [
            ("batch", f"{found.name} ({found.id})"),
            ("progress", f"{found.ended} of {found.jobs} ended{': ' if counts else ''}{counts}"),
            *([("purged", f"{found.purged} job(s), deleted before they ran")] * bool(found.purged)),
            ("cost", _money(found.cost_usd)),
            ("created", _ago(found.created_at)), ("started", _ago(found.started_at)),
            ("finished", _ago(found.finished_at) if found.finished_at else "not yet"),
            *((label, _json_text(payload)) for label, payload in callbacks if payload),
            ("callbacks", ", ".join(map(str, found.callbacks)) or "-"),
        ]  # fmt: skip
        for label, value in fields:
            click.echo(f"{label + ':':<12}{_printable(value)}")
        click.echo()
        _print_jobs(conn, list_jobs(conn, batch=found.id, limit=limit), as_json=False)


@batch_group.command("cancel")
@click.argument("batch", metavar="NAME|ID")
@click.pass_obj
def batch_cancel_command(config: _Config, batch: str) -> None:
    """Cancel a batch's queued and running jobs (its on-finish callback then runs, as when
    they end otherwise)."""
    with config.connect() as conn:
        done = cancel_batch(conn, batch)
    stopping = sum(status == JobStatus.RUNNING for status in done.values())
    click.echo(f"cancelled {len(done) - stopping} queued job(s); stopping {stopping} running")


@batch_group.command("retry")
@click.argument("batch", metavar="NAME|ID")
@click.pass_obj
def batch_retry_command(config: _Config, batch: str) -> None:
    """Put a batch's failed jobs back in the queue; a finished batch opens again, and its
    callbacks run again when it finishes again."""
    with config.connect() as conn:
        again = retry_batch(conn, batch)
    click.echo(f"retrying {len(again)} failed job(s)")


###############################################################################
# Command line: worker and serve
###############################################################################


@cli.command("worker")
@_flags(WorkerSettings, "concurrency", "queues", "poll_interval", "burst")
@_import_option
@_flags(WorkerSettings, "shutdown_timeout")
@_flags(ClaudeSettings)
@_flags(WorkerSettings, "daily_budget_usd", "heartbeat_timeout", "backoff_base", "backoff_max",
        "retention", "pr_poll_interval", "notify", "notify_on", "health_port", "health_host",
        "schedules")  # fmt: skip
@_setting(
    "--log-format",
    env="LOG_FORMAT",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
)
@click.pass_obj
def worker_command(
    config: _Config, imports: Sequence[str], log_format: str, **options: Any
) -> None:
    """Run jobs until SIGINT/SIGTERM (a second signal stops running jobs at once and puts them
    back in the queue unspent).

    \b
    Examples:
      claude-jobs worker --concurrency 3 --queues urgent,default
      claude-jobs worker --burst --import myapp.jobs
      claude-jobs worker --model sonnet --claude-arg=--max-turns=50 --daily-budget-usd 20
    """
    _import_modules(imports)
    claude = {each.name: options.pop(each.name) for each in dataclasses.fields(ClaudeSettings)}
    handlers = default_handlers(**claude, worktree_dir=config.home / "worktrees")
    worker = Worker(config.url(), handlers=handlers, **options)
    with contextlib.suppress(DatabaseUnavailable):  # then the worker waits for the database
        config.connect().close()  # a missing or old schema: say so before starting
    configure_logging(log_format)
    _stop_on_signals(worker)
    worker.run()
    if worker.idle_because:  # a burst that could do nothing of what was ready
        raise JobsError(f"ran nothing: {worker.idle_because}")


def _stop_on_signals(worker: Worker) -> None:
    """First SIGINT/SIGTERM/SIGHUP: stop claiming and let jobs finish. Second: stop them now.
    (SIGHUP: the worker's terminal was closed; left to its default, it would kill the worker
    without a word, its jobs marked running until recovered.)"""
    received: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        received.append(signum)
        # Not here: a handler runs in the main thread between two of its steps, maybe inside
        # an Event's lock, which stop() takes (and a Lock is not reentrant). A thread may wait.
        force = len(received) > 1
        threading.Thread(target=worker.stop, args=(force,), name="claude-jobs-signal").start()

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # `nohup claude-jobs worker`
            signal.signal(signum, on_signal)


@cli.command("serve")
@_setting("--host", env="HOST", default="127.0.0.1", show_default=True,
          help="Address to listen on; any but this machine's own needs --token.")  # fmt: skip
@_setting("--port", env="PORT", type=click.IntRange(0, 65535), default=8080, show_default=True)
@_setting("--token", env="TOKEN", help="Every request needs `Authorization: Bearer TOKEN` "
          "(but /healthz and /readyz); the page asks for it once.")  # fmt: skip
@_setting("--read-only", env="READ_ONLY", is_flag=True,
          help="No actions and no enqueue: watch only.")  # fmt: skip
@_setting("--public-metrics", env="PUBLIC_METRICS", is_flag=True,
          help="/metrics needs no token (for a scraper on a trusted network).")  # fmt: skip
@_setting("--allowed-host", "allowed_hosts", env="ALLOWED_HOSTS", multiple=True, metavar="NAME",
          help="Answer requests to this host name too (repeatable): a reverse proxy's, or "
          "this machine's. Others get 421 (IP addresses and localhost need none).")  # fmt: skip
@_setting("--max-body", env="MAX_BODY", type=_SizeType(), default="10MiB", show_default=True,
          help="Refuse request bodies larger than this (413).")  # fmt: skip
@_setting("--client-timeout", env="CLIENT_TIMEOUT", type=_DURATION_TYPE, default="10s",
          show_default=True, help="Drop a client that takes longer than this to send a "
          "request's headers, or the next piece of its body.")  # fmt: skip
@_setting("--public-url", env="PUBLIC_URL", metavar="URL",
          help="Where people reach this dashboard (https://jobs.example.com/): notifications "
          "link their job there (kept in the database for every worker).")  # fmt: skip
@click.option("--open", "open_browser", is_flag=True, help="Open the dashboard in a browser.")
@click.pass_obj
def serve_command(
    config: _Config, host: str, port: int, token: str | None, read_only: bool,
    public_metrics: bool, allowed_hosts: Sequence[str], max_body: int, client_timeout: float,
    public_url: str | None, open_browser: bool,
) -> None:  # fmt: skip
    """Serve the dashboard, the JSON API, /metrics and health checks: watch and steer every
    job and worker from a browser, a script or Prometheus. Whoever can reach it can start
    agents: it listens on this machine only unless given a token. SIGTERM or Ctrl-C ends its
    event streams and stops it within seconds.

    \b
    Examples:
      claude-jobs serve --open
      CLAUDE_JOBS_TOKEN=$(openssl rand -hex 16) claude-jobs serve --host 0.0.0.0
      claude-jobs serve --read-only --port 9000 --allowed-host jobs.example.internal
    """
    try:
        import uvicorn
    except ImportError:
        raise ConfigError(WEB_EXTRA_HINT) from None
    if not token and not _loopback(host):
        raise click.UsageError(
            f"listening on {host} needs --token (or CLAUDE_JOBS_TOKEN): whoever reaches the "
            "server could start agents"
        )
    app = web_app(
        config.url(), token=token, read_only=read_only, public_metrics=public_metrics,
        allowed_hosts=[*allowed_hosts, *_names_of(host)], max_body=max_body,
        client_timeout=client_timeout,
    )  # fmt: skip
    with config.connect() as conn:  # (a missing or old schema: said before serving)
        if public_url is not None:
            set_public_url(conn, public_url)
    listener = _listening_socket(host, port)
    address = f"http://{f'[{host}]' if ':' in host else host}:{listener.getsockname()[1]}/"
    # (a stop asked for from here on, even before uvicorn listens for it, and the signal that
    # stopped it, which uvicorn raises again once it has, end the command as it should end)
    with contextlib.suppress(KeyboardInterrupt, _Stopped):
        click.echo(f"claude-jobs serve: {address}{' (read-only)' if read_only else ''} on "
                   f"{mask_url(config.url())}")  # fmt: skip
        configure_logging("text", logging.WARNING)
        if open_browser:
            import webbrowser

            threading.Timer(0.5, webbrowser.open, [address]).start()
        server = _server_class()(app, uvicorn.Config(
            app, log_level="warning", timeout_graceful_shutdown=2, lifespan="on",
            timeout_keep_alive=5, http=_impatient_protocol(client_timeout),
        ))  # fmt: skip
        server.run(sockets=[listener])


def _names_of(host: str) -> list[str]:
    """The host names a server listening on ``host`` is reached by: that name, or, on every
    interface (0.0.0.0, ::), this machine's names (IP addresses need no naming)."""
    if host in ("0.0.0.0", "::", ""):
        return [socket.gethostname(), socket.getfqdn()]
    return [host]


def _server_class() -> type:
    """uvicorn's Server, but a stop (SIGTERM, Ctrl-C) first ends the event streams of the app
    (which never end on their own), so that it stops within seconds."""
    import uvicorn

    class Server(uvicorn.Server):
        def __init__(self, app: Any, config: Any) -> None:
            super().__init__(config)
            self._app = app

        def handle_exit(self, sig: int, frame: Any) -> None:
            self._app.state.end_streams()
            super().handle_exit(sig, frame)

    return Server


def _impatient_protocol(timeout: float) -> Any:
    """uvicorn's HTTP/1.1 protocol (h11), but a client gets ``timeout`` seconds to send a
    request's line and headers, on a new connection or a kept one, and is dropped after it:
    uvicorn itself would hold a half-sent request for ever. (What a body may take is the app's
    to say: web_app's client_timeout.) uvicorn's own, where its internals are not as expected."""
    try:
        from uvicorn.protocols.http.h11_impl import H11Protocol
    except ImportError:
        return "auto"

    class Impatient(H11Protocol):
        _timer: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._expect_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            cycle = getattr(self, "cycle", None)
            if self._timer is not None and cycle is not None and not cycle.response_complete:
                self._timer.cancel()  # the headers are in
                self._timer = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._expect_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._timer is not None:
                self._timer.cancel()
            super().connection_lost(exc)

        def _expect_headers(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_later(timeout, self._too_slow)

        def _too_slow(self) -> None:
            self._timer = None
            cycle = getattr(self, "cycle", None)
            if (cycle is None or cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return Impatient


def _listening_socket(host: str, port: int) -> socket.socket:
    """A socket listening on ``host``:``port`` (0: any free port), for uvicorn to serve on:
    clients that come before it starts wait in the backlog rather than fail."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # (IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it a keep-alive client waits 40 ms for every answer)
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
        listener.listen(2048)
    except OSError as error:
        listener.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    return listener


def _loopback(host: str) -> bool:
    """Whether ``host`` is this machine's own address, reachable from nowhere else."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@cli.command("mcp")
@_setting("--read-only", env="MCP_READ_ONLY", is_flag=True,
          help="Only the tools that read: no enqueue, cancel or retry.")  # fmt: skip
@_setting("--queue", "queues", env="MCP_QUEUES", multiple=True, metavar="QUEUE",
          help="Enqueue only to this queue (repeatable) [default: any].")  # fmt: skip
@_setting("--cwd-under", env="MCP_CWD_UNDER", multiple=True, metavar="DIR",
          type=click.Path(exists=True, file_okay=False),
          help="Enqueue only jobs whose cwd is in DIR or below (repeatable) "
          "[default: any].")  # fmt: skip
@click.pass_obj
def mcp_command(
    config: _Config, read_only: bool, queues: Sequence[str], cwd_under: Sequence[str]
) -> None:
    """Serve the queue to an MCP client over stdio (Claude Code, Claude Desktop...): tools
    enqueue, list_jobs, get_job, wait_for_jobs, cancel_job, retry_job, job_logs and stats.
    Whoever talks to it can start agents, as an enqueuer: narrow it with --queue and
    --cwd-under, or --read-only.

    \b
    Examples:
      claude mcp add claude-jobs -- claude-jobs mcp --queue agents --cwd-under ~/src
      claude-jobs mcp --read-only
    """
    for queue in queues:
        check_queue(queue)
    limits = McpLimits(read_only, tuple(queues), tuple(cwd_under))
    server = mcp_server(config.url(), limits)
    config.connect().close()  # a missing or old schema: say so before serving
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)  # (stdout: the protocol's)
    server.run("stdio")


###############################################################################
# Command line: seeing and steering jobs
###############################################################################


_STATUS_COLORS = {
    "queued": "cyan",
    "running": "yellow",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "magenta",
    "paused": "blue",
}


def _stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def _color() -> bool:
    """Colour only on a terminal, and never with NO_COLOR set (https://no-color.org)."""
    return _stdout_is_terminal() and not os.environ.get("NO_COLOR")


def _paint(text: str, status: str) -> str:
    color = _STATUS_COLORS.get(status)
    return click.style(text, fg=color) if color and _color() else text


def _table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    paint: str | None = None,
    optional: Sequence[str] = (),
) -> str:
    """Aligned columns fitting the terminal's width: while too wide, the ``optional`` columns
    are left out (those that say nothing, all zeros or dashes, first; then in that order),
    then the widest columns are cut with … (not below 8 characters); the last one gets what
    is left (at least 10). Piped, to no terminal, nothing is left out or cut (unless
    COLUMNS asks for a width). Column ``paint`` (a status) is coloured."""
    width = shutil.get_terminal_size((120, 24)).columns
    if not (_stdout_is_terminal() or os.environ.get("COLUMNS")):
        width = sys.maxsize  # (no limit)
    rows = [[_printable(cell) for cell in row] for row in rows]
    optional = [name for name in optional if name in headers]
    natural = {h: max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)}
    shown = list(headers)

    def wide(columns: Sequence[str], widths: Mapping[str, int]) -> int:
        return sum(widths[h] + 2 for h in columns[:-1]) + min(widths[columns[-1]], 10)

    says_nothing = ("", "-", "0", "$0.00")
    blank = [n for n in optional if all(r[headers.index(n)] in says_nothing for r in rows)]
    for name in [*blank, *(name for name in optional if name not in blank)]:
        if wide(shown, natural) <= width:
            break
        shown.remove(name)
    widths = {h: natural[h] for h in shown}
    while wide(shown, widths) > width:  # cut the widest, never below 8 (an id prefix)
        widest = max(shown[:-1], key=lambda h: widths[h] - max(len(h), 8), default=None)
        if widest is None or widths[widest] <= max(len(widest), 8):
            break
        widths[widest] -= 1
    room = max(10, width - sum(widths[h] + 2 for h in shown[:-1]))
    widths[shown[-1]] = room

    def cut(text: str, size: int) -> str:
        return text if len(text) <= size else text[: size - 1] + "…"

    lines = []
    for number, row in enumerate([headers, *rows]):
        cells = dict(zip(headers, row, strict=True))
        out = []
        for name in shown:
            cell = cut(cells[name], widths[name])
            if name != shown[-1]:
                cell = cell.ljust(widths[name])
            if name == paint and number > 0:
                cell = _paint(cell, cells[name].strip())
            out.append(cell)
        lines.append("  ".join(out).rstrip())
    return "\n".join(lines)


def _follow(conn: psycopg.Connection, job_id: uuid.UUID, since: int, full: bool = False) -> int:
    """Print a job's transcript as it grows and say what happens to it, until it finishes;
    returns its exit status: 0 when it succeeded, else 1 (130 when Ctrl-C stopped it).
    ``full``: tools' output whole."""
    try:
        return _print_followed(conn, job_id, since, full)
    except KeyboardInterrupt:
        click.echo(
            f"stopped following job {job_id}, which goes on (`claude-jobs logs -f {job_id}`)",
            err=True,
        )
        return 128 + signal.SIGINT


def _print_followed(
    conn: psycopg.Connection, job_id: uuid.UUID, since: int, full: bool = False
) -> int:
    printer = _TranscriptPrinter(full)
    said = ""
    for update in follow_job(conn, job_id, since=since):
        if update.skipped:
            click.echo(f"… ({update.skipped:,} characters went by unseen)", err=True)
        for line in printer.feed(update.text):
            click.echo(line)
        note = _printable(_progress_note(update))
        if note and note != said:
            click.echo(note, err=True)
            said = note
        if update.finished:
            for line in printer.flush():
                click.echo(line)
            outcome = f"job {job_id} {_paint(update.status, update.status)}"
            if update.status != JobStatus.SUCCEEDED and update.last_error:
                outcome += f": {_printable(update.last_error)}"
            click.echo(outcome, err=True)
            return 0 if update.status == JobStatus.SUCCEEDED else 1
    return 1


def _progress_note(update: FollowUpdate) -> str:
    """What a followed job is waiting for, if anything."""
    if update.finished or not update.why:
        return ""
    return f"waiting: {update.why}"


def _job_ids_argument(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.argument("job_ids", metavar="ID...", nargs=-1, required=True)(function)


@cli.command("list")
@click.option(
    "--status", "statuses", multiple=True, metavar="STATUS",
    type=click.Choice([s.value for s in JobStatus]), help="Only jobs in this status (repeatable).",
)  # fmt: skip
@click.option("--queue", help="Only jobs of this queue.")
@click.option("--kind", help="Only jobs of this kind.")
@click.option("--since", type=_DURATION_TYPE, help="Only jobs enqueued this recently: 30m, 2h, 7d.")
@click.option("--search", "text", metavar="TEXT", help="Only jobs whose prompt has this text.")
@click.option("--cwd", help="Only jobs whose prompt runs in this directory.")
@click.option("--batch", metavar="NAME|ID", help="Only jobs of this batch.")
@click.option(
    "--pr", type=click.Choice(PR_STATES),
    help="Only jobs whose pull request is in this state (as last looked at).",
)  # fmt: skip
@click.option("--tag", metavar="TAG", help="Only jobs with this tag.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON Lines, one job a line.")
@click.pass_obj
def list_command(
    config: _Config,
    statuses: Sequence[str],
    queue: str | None,
    kind: str | None,
    since: float | None,
    text: str | None,
    cwd: str | None,
    batch: str | None,
    pr: str | None,
    tag: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List jobs, newest first.

    \b
    Examples:
      claude-jobs list
      claude-jobs list --status failed --queue nightly --since 1d
      claude-jobs list --status running --json | jq -r .id
      claude-jobs list --search "security review" --cwd ~/src/api
      claude-jobs list --batch nightly-review --status failed
      claude-jobs list --pr open
      claude-jobs list --tag nightly --status failed
    """
    after = datetime.now(UTC) - timedelta(seconds=since) if since is not None else None
    if cwd is not None:
        cwd = str(Path(cwd).expanduser().resolve())
    with config.connect() as conn:
        batch_id = resolve_batch(conn, batch) if batch is not None else None
        jobs = list_jobs(
            conn, statuses=statuses, queue=queue, kind=kind, since=after, text=text, cwd=cwd,
            batch=batch_id, pr=pr, limit=limit, tag=tag,
        )  # fmt: skip
        _print_jobs(conn, jobs, as_json)


def _print_jobs(conn: psycopg.Connection, jobs: Sequence[Job], as_json: bool) -> None:
    """Jobs as `list` prints them: a table with why each waits, or JSON Lines."""
    seen = _circumstances(conn, jobs)
    reasons = _explained(jobs, seen)
    if as_json:
        for job in jobs:
            reason = reasons.get(job.id)
            paused = job.queue in seen.paused
            data = {**job.to_dict(), "paused": paused, "why": reason and reason.text}
            data.pop("transcript")
            click.echo(_json_text(data))
        return
    if not jobs:
        click.echo("no jobs", err=True)
        return
    now = datetime.now(UTC)
    rows = [
        [
            str(job.id)[:8], job.queue, job.kind, _status_of(job, seen.paused), str(job.priority),
            f"{job.attempts}/{job.max_attempts}", _when(job, now),
            "".join(f"[{tag}] " for tag in job.tags or ()) + _excerpt(job),
        ]
        for job in jobs
    ]  # fmt: skip
    headers = ["ID", "QUEUE", "KIND", "STATUS", "PRI", "TRIES", "WHEN", "PROMPT / PAYLOAD"]
    shorts = {  # (what a job waited for is no reason once it has finished)
        job.id: (reasons[job.id].short if job.id in reasons else "")
        or ("" if job.status in FINISHED_STATUSES else _dependency(job))
        for job in jobs
    }
    if any(shorts.values()):
        headers.insert(7, "WAITS FOR")
        for row, job in zip(rows, jobs, strict=True):
            row.insert(7, shorts.get(job.id) or "-")
    if any(job.payload.get("worktree") for job in jobs if job.kind == DEFAULT_KIND):
        headers.insert(-1, "BRANCH")
        for row, job in zip(rows, jobs, strict=True):
            row.insert(-1, job_branch(job) or "-")
    for header, mark, shown in (("CHECKS", _checks_mark, "checks"), ("PR", _pr_mark, "push")):
        if any(job.payload.get(shown) or (shown == "push" and job.delivery) for job in jobs
               if job.kind == DEFAULT_KIND):  # fmt: skip
            headers.insert(-1, header)
            for row, job in zip(rows, jobs, strict=True):
                row.insert(-1, mark(job) if job.kind == DEFAULT_KIND else "-")
    optional = ("PRI", "TRIES", "KIND", "BRANCH", "WAITS FOR", "CHECKS", "PR")
    click.echo(_table(headers, rows, paint="STATUS", optional=optional))


@cli.command("show")
@click.argument("job_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print the job as one JSON object.")
@click.pass_obj
def show_command(config: _Config, job_id: str, as_json: bool) -> None:
    """Show everything about one job: payload, every attempt and its error, worker, times,
    claude's answer, cost, session and the end of its transcript. ID may be a prefix.

    \b
    Example:
      claude-jobs show 6f1c2e9a
      claude-jobs show 6f1c2e9a --json | jq .result.result
    """
    with config.connect() as conn:
        job = get_job(conn, job_id)
        seen = _circumstances(conn, [job])
        reason = _explained([job], seen).get(job.id)
    if as_json:
        click.echo(_json_text({**job.to_dict(), "why": reason and reason.text}))
    else:
        click.echo(_describe(job, seen, reason, paint=_paint))


@cli.command("logs")
@click.argument("job_id", metavar="ID")
@click.option(
    "-f", "--follow", is_flag=True,
    help="Keep printing as the job runs, until it ends; exit 0 only if it succeeded.",
)  # fmt: skip
@click.option(
    "--full", is_flag=True,
    help=f"Print tools' output whole (up to {MAX_TOOL_LINES} lines each), not its first line.",
)  # fmt: skip
@click.pass_obj
def logs_command(config: _Config, job_id: str, follow: bool, full: bool) -> None:
    """Print a job's transcript as a person reads it: claude's text, one line per tool call,
    tool results cut short (--full: whole), the result and its cost.

    \b
    Examples:
      claude-jobs logs 6f1c2e9a
      claude-jobs logs -f 6f1c2e9a
      claude-jobs logs --full 6f1c2e9a
    """
    with config.connect() as conn:
        job = get_job(conn, job_id)
        for line in _stored_transcript(job, full):
            click.echo(line)
        if follow:
            sys.exit(_follow(conn, job.id, since=job.transcript_size, full=full))
    if not job.transcript:
        click.echo(
            _printable(f"job {job.id} has no transcript yet ({job.kind}, {job.status})"), err=True
        )


def _bulk_flags(command: Any) -> Any:
    """--all and the filters of a bulk action (those of `list`), and --yes."""
    for option in reversed([
        click.option("--all", "everything", is_flag=True,
                     help="Every job the filters match (all or none, in one transaction)."),
        click.option("--queue", help="With --all: only this queue."),
        click.option("--kind", help="With --all: only this kind."),
        click.option("--tag", metavar="TAG", help="With --all: only jobs with this tag."),
        click.option("--cwd", help="With --all: only jobs whose prompt runs in this directory."),
        click.option("--search", "text", metavar="TEXT",
                     help="With --all: only jobs whose prompt has this text."),
        click.option("--older-than", type=_DURATION_TYPE,
                     help="With --all: only jobs enqueued longer ago than this: 2h, 7d."),
        click.option("--batch", metavar="NAME|ID", help="With --all: only jobs of this batch."),
        click.option("--yes", is_flag=True, help="Do not ask on a terminal."),
    ]):  # fmt: skip
        command = option(command)
    return command


def _bulk(config: _Config, action: str, filters: dict[str, Any], statuses: Sequence[str] = (),
          priority: int | None = None) -> int:  # fmt: skip
    """A bulk action of the command line: how many it would take, asked on a terminal (unless
    --yes); then done; how many it changed."""
    cwd, yes, batch = filters.pop("cwd"), filters.pop("yes"), filters.pop("batch")
    with config.connect() as conn:
        where = JobFilter(
            statuses=tuple(statuses), cwd=cwd and str(Path(cwd).expanduser().resolve()),
            batch=resolve_batch(conn, batch) if batch else None, **filters,
        )  # fmt: skip
        if not yes and sys.stdin.isatty():
            count = count_matching(conn, action, where)
            click.confirm(f"{action} {count} job(s)?", abort=True, err=True)
        return bulk_action(conn, action, where, priority)


def _no_filters(everything: bool, ids: Sequence[str], filters: Mapping[str, Any]) -> None:
    """InvalidJob for job ids with --all, neither, or filters without --all."""
    if bool(ids) == everything:
        raise InvalidJob("give job ids, or --all (and filters)")
    given = [name for name, value in filters.items()
             if value not in (None, False, ()) and name != "yes"]  # fmt: skip
    if not everything and given:
        flag = {"text": "search"}.get(given[0], given[0]).replace("_", "-")
        raise InvalidJob(f"--{flag} goes with --all, not with job ids")


@cli.command("cancel")
@click.argument("job_ids", metavar="[ID...]", nargs=-1)
@click.option("--no-wait", is_flag=True, help="Do not wait for running jobs to stop.")
@click.option("--status", "statuses", multiple=True, metavar="STATUS",
              type=click.Choice([JobStatus.QUEUED.value, JobStatus.RUNNING.value]),
              help="With --all: only queued, or only running, jobs.")  # fmt: skip
@_bulk_flags
@click.pass_obj
def cancel_command(
    config: _Config, job_ids: Sequence[str], no_wait: bool, statuses: Sequence[str],
    everything: bool, **filters: Any,
) -> None:  # fmt: skip
    """Cancel jobs: a queued one at once; a running one is stopped by its worker (claude and
    every process it started are terminated) and is not retried. --all cancels every queued
    and running job the filters match (running ones are asked to stop: not waited for).

    \b
    Examples:
      claude-jobs cancel 6f1c2e9a 0b3d77c1
      claude-jobs cancel --all --tag nightly --yes
    """
    _no_filters(everything, job_ids, {**filters, "status": statuses})
    if everything:
        click.echo(f"cancelled {_bulk(config, 'cancel', filters, statuses)} job(s)")
        return
    failures = []
    with config.connect() as conn:
        for key, status in cancel_jobs(conn, job_ids).items():  # all or none
            if status == JobStatus.CANCELLED:
                click.echo(f"{key} cancelled")
            elif no_wait:
                click.echo(f"{key} is running: its worker was asked to stop it")
            else:
                click.echo(f"{key} is running: waiting for its worker to stop it", err=True)
                failure = _await_cancel(conn, key)
                if failure:
                    failures.append(failure)
    for failure in failures:
        click.echo(f"Error: {_printable(failure)}", err=True)
    if failures:
        sys.exit(1)


def _await_cancel(conn: psycopg.Connection, key: uuid.UUID) -> str | None:
    """Wait for a running job's cancel to take effect; what went otherwise, if anything."""
    for update in follow_job(conn, key, poll=0.5):
        if update.worker_lost:  # the cancel stands: recovery ends the job cancelled
            click.echo(
                _printable(
                    f"{key}: its worker {update.worker} is lost; the job is cancelled when a "
                    "live worker recovers it"
                )
            )
            return None
        if update.finished:
            if update.status == JobStatus.CANCELLED:
                click.echo(f"{key} cancelled")
                return None
            return f"job {key} {update.status} before it could be stopped"
    return None


@cli.command("retry")
@click.argument("job_ids", metavar="[ID...]", nargs=-1)
@click.option(
    "--status", type=click.Choice([JobStatus.FAILED.value, JobStatus.CANCELLED.value]),
    help="With --all: which jobs [default: failed].",
)  # fmt: skip
@_bulk_flags
@click.pass_obj
def retry_command(
    config: _Config, job_ids: Sequence[str], status: str | None, everything: bool,
    **filters: Any,
) -> None:  # fmt: skip
    """Put failed or cancelled jobs back in the queue now, with fresh attempts. --all: every
    one the filters match (but those a retry would refuse: see `retry ID`).

    \b
    Examples:
      claude-jobs retry 6f1c2e9a
      claude-jobs retry --all --status failed --queue nightly
      claude-jobs retry --all --tag nightly --older-than 1h --yes
    """
    _no_filters(everything, job_ids, {**filters, "status": status})
    if everything:
        status = status or JobStatus.FAILED
        click.echo(f"retried {_bulk(config, 'retry', filters, [status])} {status} job(s)")
        return
    with config.connect() as conn:
        for job_id in retry_jobs(conn, job_ids):
            click.echo(f"{job_id} queued again")


@cli.command("stats")
@click.option(
    "--cost", is_flag=True, help="What claude spent, per UTC day, queue and model, with tokens."
)
@click.option(
    "--days",
    type=click.IntRange(1, 3660),
    default=7,
    show_default=True,
    help="With --cost: the last this many days, today included.",
)
@click.option("--tag", metavar="TAG", help="Instead, the jobs with this tag by queue and status.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON Lines, one row a line.")
@click.pass_obj
def stats_command(config: _Config, cost: bool, days: int, tag: str | None, as_json: bool) -> None:
    """Per queue: jobs by status, the oldest ready job's age, running now, the last hour's
    successes and failures, median and p95 run time (last day) and total cost; what no
    worker starts now (a usage limit); the open batches. With --cost: cost per day and queue.
    With --tag: the jobs of a tag (still kept) by queue and status, and their cost.

    \b
    Examples:
      claude-jobs stats
      claude-jobs stats --cost --days 30
      claude-jobs stats --tag nightly
    """
    with config.connect() as conn:
        if cost:
            _print_costs(cost_stats(conn, days), as_json)
            return
        if tag is not None:
            _print_tag_counts(tag, tag_counts(conn, tag), as_json)
            return
        queues = queue_stats(conn)
        holds = list_holds(conn)
        batches = list_batches(conn, only_open=True)
    if as_json:
        for queue in queues:
            click.echo(_json_text(queue))
        for hold in holds:
            click.echo(_json_text({"hold": hold}))
        for batch in batches:
            click.echo(_json_text({"batch": batch.to_dict()}))
        return
    _print_holds(holds)
    if not queues:
        click.echo("no jobs", err=True)
        return
    if batches:  # (after the queues' table, below)
        open_batches = _table(_BATCH_HEADERS, [_batch_line(batch) for batch in batches])
    else:
        open_batches = ""

    def seconds(value: float | None) -> str:
        return "-" if value is None else _duration_text(value) if value >= 60 else f"{value:.1f}s"

    rows = [
        [
            q["queue"], "paused" if q["paused"] else "active",
            *(str(q[k] or 0) for k in ("ready", "scheduled", "running", "succeeded", "failed",
                                       "cancelled", "succeeded_last_hour", "failed_last_hour")),
            seconds(q["oldest_ready_seconds"]), seconds(q["median_run_seconds"]),
            seconds(q["p95_run_seconds"]), _money(float(q["cost_usd"] or 0)),
        ]
        for q in queues
    ]  # fmt: skip
    headers = ["QUEUE", "STATE", "READY", "LATER", "RUNNING", "SUCCEEDED", "FAILED",
               "CANCELLED", "OK/1H", "FAIL/1H", "OLDEST", "MEDIAN", "P95", "COST"]  # fmt: skip
    optional = ("CANCELLED", "LATER", "FAIL/1H", "OK/1H", "P95", "MEDIAN", "OLDEST", "RUNNING")
    click.echo(_table(headers, rows, paint="STATE", optional=optional))
    if open_batches:
        click.echo(f"\nopen batches:\n{open_batches}")


def _print_holds(holds: Sequence[Mapping[str, Any]]) -> None:
    """One line per kind no worker starts now, on stderr (the table stays parseable)."""
    for hold in holds:
        until = _hold_end(hold["kind"], hold["until"])
        click.echo(
            _printable(
                f"held: no worker starts {hold['kind']} jobs until {until}: {hold['reason']}"
            ),
            err=True,
        )


def _print_tag_counts(tag: str, rows: Sequence[Mapping[str, Any]], as_json: bool) -> None:
    """`stats --tag`: a row per queue, a column per status, and the cost."""
    if as_json:
        for row in rows:
            click.echo(_json_text({"tag": tag, **row}))
        return
    if not rows:
        click.echo(_printable(f"no jobs with tag {tag}"), err=True)
        return
    queues: dict[str, dict[str, Any]] = {}
    for row in rows:
        counts = queues.setdefault(row["queue"], {"cost": 0.0})
        counts[row["status"]] = row["jobs"]
        counts["cost"] += float(row["cost_usd"])
    statuses = [status.value for status in JobStatus]
    table = [[queue, *(str(counts.get(s, 0)) for s in statuses), _money(counts["cost"])]
             for queue, counts in queues.items()]  # fmt: skip
    click.echo(_table(["QUEUE", *(s.upper() for s in statuses), "COST"], table))


#: The columns of `stats --cost` after day, queue and model: (header, key); the last is money.
_COST_COLUMNS = (("RUNS", "runs"), ("INPUT", "input_tokens"), ("OUTPUT", "output_tokens"),
                 ("CACHE READ", "cache_read_tokens"), ("CACHE WRITE", "cache_write_tokens"),
                 ("COST", "cost_usd"))  # fmt: skip


def _print_costs(rows: Sequence[Mapping[str, Any]], as_json: bool) -> None:
    if as_json:
        for row in rows:
            click.echo(_json_text(row))
        return
    if not rows:
        click.echo("nothing was spent in that time", err=True)
        return

    def cells(values: Mapping[str, Any]) -> list[str]:
        *counts, (_, money) = _COST_COLUMNS
        return [f"{int(values[key]):,}" for _, key in counts] + [_money(float(values[money]))]

    table = [[str(r["day"]), r["queue"], r["model"] or "-", *cells(r)] for r in rows]
    totals = {key: sum(r[key] for r in rows) for _, key in _COST_COLUMNS}
    table.append(["total", "", "", *cells(totals)])
    headers = ["DAY (UTC)", "QUEUE", "MODEL", *(name for name, _ in _COST_COLUMNS)]
    click.echo(_table(headers, table, optional=("CACHE WRITE", "CACHE READ", "MODEL")))


@cli.command("workers")
@click.option("--json", "as_json", is_flag=True, help="Print JSON Lines, one worker a line.")
@click.pass_obj
def workers_command(config: _Config, as_json: bool) -> None:
    """Registered workers: host, pid, queues, concurrency, jobs running now, started, last
    heartbeat; one that stopped heartbeating shows as lost; NOTE says why one starts no claude
    jobs for now (claude is not logged in there, its daily budget is spent...).

    \b
    Example:
      claude-jobs workers
    """
    with config.connect() as conn:
        workers = list_workers(conn)
        holds = list_holds(conn)
    if as_json:
        for worker in workers:
            click.echo(_json_text(worker))
        return
    _print_holds(holds)
    if not workers:
        click.echo("no workers", err=True)
        return
    rows = [
        [
            str(w["id"])[:8], w["host"], str(w["pid"]), w["state"],
            f"{w['running']}/{w['concurrency']}", _ago(w["started_at"]),
            _ago(w["last_heartbeat"]), ",".join(w["queues"]), _worker_note(w),
        ]
        for w in workers
    ]  # fmt: skip
    headers = ["ID", "HOST", "PID", "STATE", "RUNNING", "STARTED", "HEARTBEAT", "QUEUES", "NOTE"]
    click.echo(_table(headers, rows, optional=("STARTED", "PID", "RUNNING")))


@cli.command("drain")
@click.argument("worker")
@click.pass_obj
def drain_command(config: _Config, worker: str) -> None:
    """Ask a worker to claim no more jobs and exit once its running jobs end (it learns it at
    once, through NOTIFY). WORKER: its id, a prefix of it, or HOST:PID, as `workers` lists.

    \b
    Example:
      claude-jobs drain 3f2a91c0
      claude-jobs drain build-box:4242
    """
    with config.connect() as conn:
        row = drain_worker(conn, worker)
    click.echo(f"worker {row['id']} ({row['host']}:{row['pid']}) drains: it exits once its "
               "running jobs end")  # fmt: skip


@cli.command("reschedule")
@click.argument("job_id", metavar="ID")
@click.option("--at", "run_at", type=_TIME_TYPE, help="Run no sooner than this ISO 8601 time.")
@click.option("--delay", type=_DURATION_TYPE, help="Run no sooner than this from now: 30m, 2h.")
@click.pass_obj
def reschedule_command(
    config: _Config, job_id: str, run_at: datetime | None, delay: float | None
) -> None:
    """Change when a queued job runs (sooner or later).

    \b
    Examples:
      claude-jobs reschedule 6f1c2e9a --delay 2h
      claude-jobs reschedule 6f1c2e9a --at 2026-12-24T02:00:00+01:00
    """
    when = _due_at(run_at, delay)
    if when is None:
        raise click.UsageError("give --at or --delay (one of them)")
    with config.connect() as conn:
        key = resolve_job_id(conn, job_id)
        due = reschedule(conn, key, when)
    click.echo(f"job {key} runs {_ago(due)} ({due.astimezone():%Y-%m-%d %H:%M:%S %Z})")


@cli.command("set-priority")
@click.argument("given", metavar="[ID] PRIORITY", nargs=-1, required=True)
@_bulk_flags
@click.pass_obj
def set_priority_command(
    config: _Config, given: Sequence[str], everything: bool, **filters: Any
) -> None:
    """Give a queued job another priority (higher runs first); --all: every queued job the
    filters match.

    \b
    Examples:
      claude-jobs set-priority 6f1c2e9a 10
      claude-jobs set-priority --all --tag urgent 100
    """
    if len(given) != (1 if everything else 2):
        raise InvalidJob("give a job's ID and a PRIORITY, or --all (and filters) and a PRIORITY")
    try:
        priority = int(given[-1])
    except ValueError:
        raise InvalidJob(f"the priority must be a whole number, not {given[-1]!r}") from None
    _no_filters(everything, given[:-1], filters)
    if everything:
        changed = _bulk(config, "set-priority", filters, priority=priority)
        click.echo(f"{changed} job(s) have priority {priority}")
        return
    job_id = given[0]
    with config.connect() as conn:
        key = resolve_job_id(conn, job_id)
        set_priority(conn, key, priority)
    click.echo(f"job {key} has priority {priority}")


@cli.command("run-now")
@click.argument("job_ids", metavar="[ID]", nargs=-1)
@_bulk_flags
@click.pass_obj
def run_now_command(
    config: _Config, job_ids: Sequence[str], everything: bool, **filters: Any
) -> None:
    """Run a queued job that waits for its time (delayed, or retrying after a failure) as
    soon as a worker is free; --all: every such job the filters match.

    \b
    Examples:
      claude-jobs run-now 6f1c2e9a
      claude-jobs run-now --all --queue nightly
    """
    _no_filters(everything, job_ids, filters)
    if everything:
        click.echo(f"{_bulk(config, 'run-now', filters)} job(s) are due now")
        return
    if len(job_ids) != 1:
        raise InvalidJob("give one job's ID (or --all)")
    job_id = job_ids[0]
    with config.connect() as conn:
        key = run_now(conn, job_id)
    click.echo(f"job {key} is due now")


def _worker_note(worker: Mapping[str, Any]) -> str:
    """What `workers` says of a worker besides its state: when a lost one was found dead and
    what went back, what is wrong with a failing one's parts, why it starts no claude job."""
    notes = []
    if worker["lost_at"] is not None:
        notes.append(
            f"found dead {_ago(worker['lost_at'])}: {worker['lost_because']}; "
            f"{worker['recovered']} running job(s) went back"
        )
    elif worker["lost"]:
        notes.append("its jobs go back to the queue within seconds, unless it comes back")
    if worker["trouble"]:
        notes.append(f"trouble: {worker['trouble']}")
    if (until := worker["claude_paused_until"]) is not None:
        notes.append(
            f"no claude jobs until {until.astimezone():%H:%M}: {worker['claude_paused_reason']}"
        )
    return "; ".join(notes)


@cli.command("pause")
@click.argument("queue", required=False)
@click.option("--kind", metavar="KIND",
              help="Instead, stop every worker starting KIND jobs, in every queue.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print what happened as a JSON object.")
@click.pass_obj
def pause_command(config: _Config, queue: str | None, kind: str | None, as_json: bool) -> None:
    """Stop workers taking jobs from QUEUE; its jobs stay queued, running ones finish. A queue
    no job has used yet can be paused ahead (with a warning: it may be a typo). With --kind,
    no worker starts jobs of that kind, in any queue, until `resume --kind` (a broken handler,
    a claude that needs logging in again).

    \b
    Examples:
      claude-jobs pause nightly
      claude-jobs pause --kind claude
    """
    if (queue is None) == (kind is None):
        raise InvalidJob("give a QUEUE to pause, or --kind KIND")
    if kind is not None:
        with config.connect() as conn:
            newly = pause_kind(conn, kind, by=f"{socket.gethostname()}:{os.getpid()}")
        if as_json:
            click.echo(_json_text({"kind": kind, "paused": True, "newly": newly}))
        else:
            state = "paused" if newly else "were already paused"
            click.echo(_printable(f"{kind} jobs {state} on every worker until "
                                  f"`claude-jobs resume --kind {kind}`"))  # fmt: skip
        return
    assert queue is not None
    with config.connect() as conn:
        newly = pause_queue(conn, queue, by=f"{socket.gethostname()}:{os.getpid()}")
        waiting = count_queued(conn, queue)
        known = queue_known(conn, queue)
        others = [] if known or as_json else known_queues(conn)
    if as_json:
        data = {"queue": queue, "paused": True, "newly": newly, "known": known, "queued": waiting}
        click.echo(_json_text(data))
        return
    state = "paused" if newly else "was already paused"
    click.echo(
        _printable(f"queue {queue} {state}: {waiting} queued job(s) wait for `claude-jobs resume`")
    )
    if not known:
        click.echo(
            _printable(
                f"warning: no job has ever used queue {queue} (known queues: "
                f"{', '.join(others) or 'none'}); it is paused anyway, for the jobs to come"
            ),
            err=True,
        )


@cli.command("resume")
@click.argument("queue", required=False)
@click.option(
    "--hold",
    "--kind",
    "kind",
    metavar="KIND",
    help="Instead, lift the hold on KIND jobs (claude's usage limit; `pause --kind`) before "
    "its end.",
)
@click.pass_obj
def resume_command(config: _Config, queue: str | None, kind: str | None) -> None:
    """Let workers take jobs from QUEUE again; or, with --hold claude, start claude jobs again
    before the usage limit's announced reset (it was lifted early, or misread).

    \b
    Examples:
      claude-jobs resume nightly
      claude-jobs resume --hold claude
      claude-jobs resume --kind resize
    """
    if queue is not None and kind is None:
        with config.connect() as conn:
            resumed = resume_queue(conn, queue)
        click.echo(f"queue {queue} {'resumed' if resumed else 'was not paused'}")
    elif kind is not None and queue is None:
        with config.connect() as conn:
            lifted = lift_hold(conn, kind)
        if lifted is None:
            raise WrongState(f"no hold is on {kind} jobs")
        said = [f"workers start {kind} jobs again"]
        if lifted.hold:
            said.append(f"{lifted.sooner} job(s) put off by it run now")
        if lifted.workers:
            said.append(f"{lifted.workers} worker(s) that could not run {kind} try again")
        click.echo(_printable("; ".join(said)))
    else:
        raise InvalidJob("give a QUEUE to resume, or --kind KIND")


@cli.command("queues")
@click.option("--json", "as_json", is_flag=True, help="Print JSON Lines, one queue a line.")
@click.pass_obj
def queues_command(config: _Config, as_json: bool) -> None:
    """Every queue that jobs used or that has settings: its jobs by status and its settings
    (paused; --max-running; --rate, and what it counts per). Change them with `queue set`.

    \b
    Example:
      claude-jobs queues
    """
    with config.connect() as conn:
        queues = queue_stats(conn)
    if as_json:
        for queue in queues:
            click.echo(_json_text(queue))
        return
    if not queues:
        click.echo("no queues: no job was enqueued and no queue has settings", err=True)
        return
    rows = [
        [q["queue"], "paused" if q["paused"] else "active",
         *(str(q[k] or 0) for k in ("ready", "scheduled", "running", "succeeded", "failed")),
         str(q["max_running"] or "-"), _rate_cell(q)]
        for q in queues
    ]  # fmt: skip
    headers = ["QUEUE", "STATE", "READY", "LATER", "RUNNING", "SUCCEEDED", "FAILED",
               "MAX RUNNING", "RATE"]  # fmt: skip
    click.echo(_table(headers, rows, paint="STATE", optional=("LATER", "SUCCEEDED", "FAILED")))


def _rate_cell(queue: Mapping[str, Any]) -> str:
    """A queue's rate as `queues` shows it: 30/h, 5/m per key, or -."""
    if not queue["rate"]:
        return "-"
    return queue["rate"] + (f" per {queue['rate_by']}" if queue["rate_by"] else "")


@cli.group("queue")
def queue_group() -> None:
    """Settings of a queue, stored in the database: every worker obeys them at once.

    \b
    Examples:
      claude-jobs queue set reviews --max-running 4 --rate 30/h
      claude-jobs queue show reviews
      claude-jobs queue reset reviews --rate
    """


@queue_group.command("set")
@click.argument("queue")
@click.option(
    "--max-running",
    type=int,
    metavar="N",
    help="At most N jobs of the queue running at once, on all workers together.",
)
@click.option(
    "--rate",
    metavar="N/PERIOD",
    help="At most N job starts in any window of PERIOD, on all workers together: "
    "30/h, 5/m, 1/10s (s, m, h or d; at most 7d).",
)
@click.option(
    "--rate-by",
    type=click.Choice(["queue", "key", "kind", "cwd"]),
    help="Count the rate per concurrency key, per kind or per cwd (repository) "
    "instead of for the whole queue.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the queue's settings as JSON.")
@click.pass_obj
def queue_set_command(
    config: _Config,
    queue: str,
    max_running: int | None,
    rate: str | None,
    rate_by: str | None,
    as_json: bool,
) -> None:
    """Limit QUEUE on every worker: what is not given stays as it was. A job that may not
    start yet is not claimed (`list` and `show` say until when); its wait spends no attempt.
    Pause and resume it with `pause` and `resume`.

    \b
    Examples:
      claude-jobs queue set reviews --max-running 4
      claude-jobs queue set nightly --rate 30/h --rate-by cwd
    """  # fmt: skip
    if max_running is None and rate is None and rate_by is None:
        raise InvalidJob("give a setting: --max-running N, --rate N/PERIOD or --rate-by")
    with config.connect() as conn:
        known = queue_known(conn, queue)
        settings = set_queue_limits(conn, queue, max_running=max_running, rate=rate,
                                    rate_by=rate_by)  # fmt: skip
    _print_queue(settings, as_json)
    if not known and not as_json:
        click.echo(_printable(f"warning: no job has used queue {queue} yet; it is set for the "
                              "jobs to come"), err=True)  # fmt: skip


@queue_group.command("show")
@click.argument("queue")
@click.option("--json", "as_json", is_flag=True, help="Print the queue as JSON.")
@click.pass_obj
def queue_show_command(config: _Config, queue: str, as_json: bool) -> None:
    """QUEUE's jobs by status, its settings, and how its limits stand now.

    \b
    Example:
      claude-jobs queue show reviews
    """
    with config.connect() as conn:
        settings = queue_settings(conn, queue)
    _print_queue(settings, as_json)


@queue_group.command("reset")
@click.argument("queue")
@click.option(
    "--max-running",
    "settings",
    flag_value="max_running",
    multiple=True,
    help="Remove the limit on running jobs.",
)
@click.option(
    "--rate",
    "settings",
    flag_value="rate",
    multiple=True,
    help="Remove the rate (and what it counts per).",
)
@click.option(
    "--rate-by",
    "settings",
    flag_value="rate_by",
    multiple=True,
    help="Count the rate for the whole queue again.",
)
@click.option(
    "--paused",
    "settings",
    flag_value="paused",
    multiple=True,
    help="Resume the queue (as `resume` does).",
)
@click.option("--all", "settings", flag_value="all", multiple=True, help="All of them.")
@click.option("--json", "as_json", is_flag=True, help="Print the queue's settings after as JSON.")
@click.pass_obj
def queue_reset_command(
    config: _Config, queue: str, settings: Sequence[str], as_json: bool
) -> None:
    """Remove settings of QUEUE: it runs as if they had never been set.

    \b
    Examples:
      claude-jobs queue reset reviews --max-running
      claude-jobs queue reset nightly --all
    """  # fmt: skip
    chosen = set(settings)
    if "all" in chosen:
        chosen = {*QUEUE_SETTINGS_RESET, "paused"}
    with config.connect() as conn:
        after = reset_queue(conn, queue, chosen)
    _print_queue(after, as_json)


def _print_queue(queue: Mapping[str, Any], as_json: bool) -> None:
    """A queue's settings, counts and limits as `queue show` prints them."""
    if as_json:
        click.echo(_json_text(queue))
        return
    lines = [
        ("queue", queue["queue"]),
        ("state", "paused" if queue["paused"] else "active"),
        ("jobs", f"{queue['ready']} ready, {queue['scheduled']} later, {queue['running']} "
                 f"running, {queue['succeeded']} succeeded, {queue['failed']} failed, "
                 f"{queue['cancelled']} cancelled"),
    ]  # fmt: skip
    if queue["max_running"]:
        lines.append(("max running", f"{queue['max_running']} on all workers "
                                     f"({queue['running']} running now)"))  # fmt: skip
    else:
        lines.append(("max running", "- (as many as workers take)"))
    if queue["rate"]:
        window = f"{queue['started_in_window']} started in the window now"
        if queue["rate_opens"] is not None:
            window += f"; rate limited until {queue['rate_opens'].astimezone():%H:%M:%S}"
        per = f" per {queue['rate_by']}" if queue["rate_by"] else ""
        lines.append(("rate", f"{queue['rate']}{per} ({window})"))
    else:
        lines.append(("rate", "- (no limit)"))
    width = max(len(name) for name, _ in lines)
    for name, value in lines:
        click.echo(_printable(f"{name + ':':<{width + 1}} {value}"))


@cli.command("diff")
@click.argument("job_id", metavar="ID")
@click.option("--stat", is_flag=True, help="Only which files changed, and how much.")
@click.pass_obj
def diff_command(config: _Config, job_id: str, stat: bool) -> None:
    """Show what a worktree job changed against the commit its branch started from: what it
    committed, and what it left uncommitted in its worktree (new files too), while the
    worktree is on this machine.

    \b
    Examples:
      claude-jobs diff 6f1c2e9a
      claude-jobs diff --stat 6f1c2e9a
    """
    with config.connect() as conn:
        job = get_job(conn, job_id)
    changes = worktree_diff(job, stat=stat)
    if not changes:
        click.echo(f"job {job.id} changed nothing", err=True)
    elif _stdout_is_terminal():  # a patch shows what a repository holds: nothing may drive it
        click.echo(_printable(changes.decode("utf-8", "replace")), nl=False)
    else:  # byte for byte, so that it applies as a patch
        sys.stdout.buffer.write(changes)


@cli.command("deliver")
@click.argument("job_id", metavar="ID")
@click.option("--pr", is_flag=True, help="Open (or update) its GitHub pull request too.")
@click.option("--remote", metavar="REMOTE", help="Push here [default: the job's, else origin].")
@click.option("--json", "as_json", is_flag=True, help="Print the delivery as JSON.")
@click.pass_obj
def deliver_command(
    config: _Config, job_id: str, pr: bool, remote: str | None, as_json: bool
) -> None:
    """Deliver a finished worktree job by hand, on the machine that has its repository: push
    its branch (what it left uncommitted is committed first) and, with --pr or when it was
    queued with one, open its pull request or update the one it has. Also for a job queued
    without --push, or whose delivery failed. The token comes from GH_TOKEN, GITHUB_TOKEN or
    `gh auth token`.

    \b
    Examples:
      claude-jobs deliver 6f1c2e9a --pr
      claude-jobs deliver 6f1c2e9a --remote fork
    """
    if remote is not None and not _REMOTE_NAME.fullmatch(remote):
        raise InvalidJob(f"--remote {remote!r} is not a git remote's name")
    with config.connect() as conn:
        delivery = deliver(conn, job_id, pr=pr, remote=remote)
    if as_json:
        click.echo(_json_text(delivery))
        return
    click.echo(
        f"pushed {delivery['branch']} ({str(delivery.get('sha'))[:12]}) to {delivery['remote']}"
    )
    if found := delivery.get("pr"):
        how = "updated" if found.get("updated") else "opened"
        draft = " (draft)" if found.get("draft") else ""
        click.echo(f"{how} pull request #{found['number']}{draft}: {found['url']}")


@cli.command("discard")
@click.argument("job_id", metavar="ID")
@click.option("--yes", is_flag=True, help="Really delete; without it, only say what it would.")
@click.pass_obj
def discard_command(config: _Config, job_id: str, yes: bool) -> None:
    """Throw away what a finished worktree job made, on the machine that has it: remove its
    worktree (with anything not committed) and delete its branch. Refused while a job that
    continues it needs them. The job leaves the dashboard's "Needs you".

    \b
    Examples:
      claude-jobs discard 6f1c2e9a --yes
    """
    with config.connect() as conn:
        if not yes:
            job = get_job(conn, resolve_job_id(conn, job_id), transcript=False)
            click.echo(f"would remove the worktree and branch of job {job.id} "
                       f"({_branch_text(job)}): add --yes to do it")  # fmt: skip
            return
        for line in discard(conn, job_id):
            click.echo(line)


@cli.group("notifications", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON Lines, one a line.")
@click.pass_context
def notifications_command(ctx: click.Context, as_json: bool) -> None:
    """The notifications (--notify) not delivered yet: pending (with when they are tried
    next), failed (the receiver refused: not tried again) and abandoned (tried for a day).
    `notifications retry ID` sends one again. ABOUT: the job, batch:ID, hold:KIND, worker:ID.

    \b
    Examples:
      claude-jobs notifications
      claude-jobs notifications retry 0b6f1e2a-...
    """
    if ctx.invoked_subcommand is not None:
        return
    with ctx.obj.connect() as conn:
        found = list_notifications(conn)
    if as_json:
        for each in found:
            click.echo(_json_text(_jsonable(each)))
        return
    if not found:
        click.echo("no notifications waiting or failed", err=True)
        return
    headers = ["ID", "EVENT", "ABOUT", "STATE", "TRIES", "NEXT", "URL", "LAST ERROR"]
    rows = [[str(each["id"]), each["event"], _subject_text(each["subject"]), each["state"],
             str(each["attempts"]), _ago(each["next_at"]) if each["state"] == "pending" else "-",
             each["url"], each["last_error"] or "-"] for each in found]  # fmt: skip
    click.echo(_table(headers, rows, optional=("TRIES", "NEXT")))


def _subject_text(subject: str) -> str:
    """What a notification is about, short: a job's id or a batch's, or hold:KIND."""
    kind, _, key = subject.rpartition(":")
    if kind in ("batch", "worker"):
        return f"{kind}:{key[:8]}"
    return subject if kind else subject[:8]


@notifications_command.command("retry")
@click.argument("notification_id", metavar="ID")
@click.pass_obj
def notifications_retry_command(config: _Config, notification_id: str) -> None:
    """Send a failed or abandoned notification again, now."""
    with config.connect() as conn:
        retry_notification(conn, notification_id)
    click.echo(f"notification {notification_id} is sent again")


@cli.group("worktrees", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON Lines, one worktree a line.")
@click.pass_context
def worktrees_command(ctx: click.Context, as_json: bool) -> None:
    """List the git worktrees jobs ran in, and their branches (they outlive the jobs): the
    job, its status, the branch, whether the directory is still there with uncommitted
    changes, its size and age. `worktrees prune` removes what is safe to remove.

    \b
    Examples:
      claude-jobs worktrees
      claude-jobs worktrees prune --older-than 7d --merged
    """
    if ctx.invoked_subcommand is not None:
        return
    with ctx.obj.connect() as conn:
        trees = list_worktrees(conn)
    if as_json:
        for tree in trees:
            data = {("job" if key == "job_id" else key): value for key, value in tree.items()}
            click.echo(_json_text(data))
        return
    if not trees:
        click.echo("no worktrees", err=True)
        return
    rows = [
        [
            str(t["job_id"])[:8], t["status"] or "deleted", t["branch"], _tree_state(t),
            _size_text(t.get("size_bytes")), _ago(t["created_at"]), t["path"],
        ]
        for t in trees
    ]  # fmt: skip
    headers = ["JOB", "STATUS", "BRANCH", "STATE", "SIZE", "AGE", "PATH"]
    click.echo(_table(headers, rows, paint="STATUS", optional=("AGE", "SIZE")))


def _tree_state(tree: Mapping[str, Any]) -> str:
    """A worktree's state, in a few words."""
    if not tree["here"]:
        return f"on {tree['host']}"
    commits = "" if tree["commits"] is None else f", {tree['commits']} commit(s)"
    if tree["exists"]:
        state = {True: "uncommitted changes", False: "clean", None: "not a worktree of git's"}
        said = state[tree["uncommitted"]] + commits
        if tree["detached_commits"]:
            said += f", {tree['detached_commits']} on a detached HEAD only"
        if tree["operation"]:
            said += f", in the middle of {tree['operation']}"
        return said
    if tree["branch_exists"]:
        return f"removed, branch kept{commits}"
    return "gone"


def _size_text(size: int | None) -> str:
    if size is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


@worktrees_command.command("prune")
@click.option(
    "--older-than", type=_DurationType(unit_needed=True), default="0", show_default=True,
    help="Only worktrees no job has used for this long.",
)  # fmt: skip
@click.option("--merged", is_flag=True, help="Delete the branches merged into HEAD too.")
@click.option("--force", is_flag=True, help="Remove worktrees with uncommitted changes too.")
@click.pass_obj
def worktrees_prune_command(config: _Config, older_than: float, merged: bool, force: bool) -> None:
    """Remove the worktrees of this machine that no unfinished job needs and that hold no
    uncommitted changes (--force: those too); their branches stay, unless merged into their
    repository's HEAD and --merged is given.

    \b
    Examples:
      claude-jobs worktrees prune
      claude-jobs worktrees prune --older-than 7d --merged
    """
    with config.connect() as conn:
        done = prune_worktrees(conn, older_than=older_than, merged=merged, force=force)
    for line in done:
        click.echo(_printable(line))
    if not done:
        click.echo("nothing to prune", err=True)


@cli.command("cleanup")
@_setting(
    "--older-than", env="CLEANUP_OLDER_THAN", type=_DurationType(unit_needed=True), default="14d",
    show_default=True, help="Delete jobs that finished longer ago than this.",
)  # fmt: skip
@click.option("--include-failed", is_flag=True, help="Delete failed jobs too.")
@click.pass_obj
def cleanup_command(config: _Config, older_than: float, include_failed: bool) -> None:
    """Delete succeeded and cancelled jobs (and, with --include-failed, failed ones) that
    finished before then, in small batches that never hold long locks.

    \b
    Example:
      claude-jobs cleanup --older-than 7d
    """
    with config.connect() as conn:
        deleted = cleanup_jobs(conn, older_than, include_failed=include_failed)
    kinds = "succeeded, cancelled or failed" if include_failed else "succeeded or cancelled"
    click.echo(f"deleted {deleted} {kinds} job(s) older than {_duration_text(older_than)}")


@cli.command("purge")
@click.argument("queue")
@click.option("--yes", is_flag=True, help="Really delete; without it, only say what it would.")
@click.pass_obj
def purge_command(config: _Config, queue: str, yes: bool) -> None:
    """Delete every queued job of QUEUE (running and finished ones stay).

    \b
    Example:
      claude-jobs purge experiments --yes
    """
    check_queue(queue)
    with config.connect() as conn:
        if not yes:
            waiting = count_queued(conn, queue)
            click.echo(f"would delete {waiting} queued job(s) of queue {queue}: add --yes to do it")
            return
        deleted = purge_queue(conn, queue)
    click.echo(f"deleted {deleted} queued job(s) of queue {queue}")


def main() -> None:
    """The `claude-jobs` console script."""
    cli.main(prog_name="claude-jobs")


###############################################################################
# Assets: the supervisor's script, the dashboard's page
###############################################################################


#: The supervisor of one attempt's processes: a small program of its own (run as ``python -I -S
#: -c``), so that it keeps working while its worker cannot (killed, stopped, frozen, cut off).
#: It starts the command in a session of its own and is the subreaper of everything the command
#: starts (Linux), so that no descendant escapes it, not even one in a session of its own (as
#: claude's Bash tool runs commands). It kills that whole tree: when the command exits
#: (SIGTERM, SIGKILL a second later), on "stop GRACE" from its worker or on SIGTERM, SIGHUP or
#: SIGINT (SIGTERM, then SIGKILL after GRACE seconds), and at once when its worker is gone (the
#: control pipe closes) or the worker's lease runs out ("lease DEADLINE" renews it; DEADLINE is
#: on CLOCK_BOOTTIME): past it, another worker may take the job over. It watches all of that
#: until the last process of the tree is gone, tells its worker why it ended early on a report
#: pipe of their own, and exits as the command did. Arguments: the control and report file
#: descriptors, the deadline (or -), the grace, NAME=VALUE environment for the command only,
#: then -- and the command. It imports `_signal`, not `signal`: `signal` imports `enum`, which
#: would double its start-up.
_SUPERVISOR = r"""
import os, select, sys, time, _signal

control, report, deadline, grace = sys.argv[1:5]
control, report, grace = int(control), int(report), float(grace)
deadline = float("inf") if deadline == "-" else float(deadline)
split = sys.argv.index("--")
env = dict(os.environ, **dict(pair.split("=", 1) for pair in sys.argv[5:split]))
command = sys.argv[split + 1 :]
me = os.getpid()
clock = getattr(time, "CLOCK_BOOTTIME", None)
now = (lambda: time.clock_gettime(clock)) if clock is not None else time.monotonic

def tell(word, text=""):
    try:
        os.write(report, (word + " " + text).strip().encode() + b"\n")
    except OSError:
        pass

try:
    import ctypes
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come to us
except (ImportError, OSError, AttributeError):
    pass
wake, woken = os.pipe()
os.set_blocking(woken, False)
_signal.set_wakeup_fd(woken)
asked = []
for number in (_signal.SIGTERM, _signal.SIGHUP, _signal.SIGINT):
    _signal.signal(number, lambda number, frame: asked.append(number))
_signal.signal(_signal.SIGCHLD, lambda number, frame: None)  # only to wake the select
os.set_inheritable(control, False)
os.set_inheritable(report, False)
try:  # (Python ignores SIGPIPE and SIGXFSZ; the command gets them as a program expects)
    child = os.posix_spawnp(
        command[0], command, env, setsid=True, setsigdef=(_signal.SIGPIPE, _signal.SIGXFSZ)
    )
except OSError as error:
    tell("cannot-run", "cannot run " + command[0] + ": " + (error.strerror or str(error)))
    os._exit(127)
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):  # the pipes are the command's now: they end when its processes end
    os.dup2(null, fd)
status = None

def below():
    # Every live process below this one; None where /proc cannot tell.
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    children = {}
    for name in names:
        if name.isdigit():
            try:
                with open("/proc/" + name + "/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append((int(name), fields[0] != b"Z"))
            except (OSError, IndexError, ValueError):
                pass
    found, todo = [], [me]
    while todo:
        for pid, alive in children.get(todo.pop(), ()):
            todo.append(pid)
            if alive:
                found.append(pid)
    return found

def kill(number):
    pids = below()
    for pid in [-child] if pids is None else pids:  # without /proc: the command's group
        try:
            os.kill(pid, number)
        except OSError:
            pass

def reap():
    # Reap whatever has exited; False once no child is left (nor, as their subreaper, any
    # process below us).
    global status
    while True:
        try:
            pid, code = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True
        if pid == child:
            status = code

why, kill_at, pending = None, None, b""
while True:
    left = reap()
    if status is not None and kill_at is None and left:  # exited, leaving processes behind
        kill(_signal.SIGTERM)
        kill_at = now() + 1.0
    if not left or why is not None:
        break
    wait = min(deadline, kill_at or deadline) - now()
    ready = select.select([control, wake], [], [], min(max(wait, 0.0), 1.0))[0]
    if wake in ready:
        os.read(wake, 512)
    if control in ready:
        data = os.read(control, 4096)
        if not data:
            why = "its worker is gone"
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            verb, _, value = line.decode().partition(" ")
            if verb == "lease":
                deadline = float(value)
            elif verb == "stop" and kill_at is None:
                kill(_signal.SIGTERM)
                kill_at = now() + float(value)
    if asked and kill_at is None:
        kill(_signal.SIGTERM)
        kill_at = now() + grace
    if now() >= deadline:
        why = "lease"
        tell("lease", "its worker's lease ran out: the worker is stopped, frozen or cut off")
    elif kill_at is not None and now() >= kill_at:
        kill(_signal.SIGKILL)
        kill_at = now() + 0.2  # again, if something is left then (not at once: no busy loop)
end = now() + 10.0
while reap() and now() < end:  # as their subreaper, no child left means nothing left
    kill(_signal.SIGKILL)
    time.sleep(0.05)
if status is None:
    os._exit(137)
if os.WIFSIGNALED(status):
    number = os.WTERMSIG(status)
    try:
        if number not in (_signal.SIGKILL, _signal.SIGSTOP):
            _signal.signal(number, _signal.SIG_DFL)
        os.kill(me, number)
    except OSError:
        pass
    os._exit(128 + number)
os._exit(os.waitstatus_to_exitcode(status))
"""


#: The dashboard: one page, no build step, nothing from elsewhere. Every value from a job is
#: put in the page as text (textContent), never as markup: a prompt cannot run in it.
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>claude-jobs</title>
<style>
:root { --bg: #fbfbfa; --fg: #1d1d1f; --dim: #6e6e73; --line: #e3e3e0; --card: #fff;
  --queued: #6b7280; --running: #2563eb; --succeeded: #15803d; --failed: #b91c1c;
  --cancelled: #a16207; --paused: #7c3aed; }
@media (prefers-color-scheme: dark) { :root { --bg: #161618; --fg: #ececec; --dim: #9a9aa0;
  --line: #2c2c30; --card: #1e1e21; } }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
  background: var(--bg); color: var(--fg); }
header { display: flex; gap: 1rem; align-items: baseline; padding: .7rem 1rem;
  border-bottom: 1px solid var(--line); background: var(--card); position: sticky; top: 0; }
header h1 { font-size: 1.05rem; margin: 0; } header a { color: inherit; }
#live { color: var(--dim); font-size: .85rem; margin-left: auto; }
main { padding: 1rem; max-width: 1400px; margin: auto; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: .8rem 1rem; margin-bottom: 1rem; overflow-x: auto; }
h2 { font-size: .95rem; margin: 0 0 .5rem; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .3rem .5rem; border-bottom: 1px solid var(--line);
  white-space: nowrap; vertical-align: top; }
th { font-weight: 600; color: var(--dim); font-size: .8rem; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.text { white-space: normal; max-width: 40rem; overflow-wrap: anywhere; }
.s { font-weight: 600; } .s-queued { color: var(--queued); } .s-running { color: var(--running); }
.s-succeeded { color: var(--succeeded); } .s-failed { color: var(--failed); }
.s-cancelled { color: var(--cancelled); } .s-paused, .s-draining { color: var(--paused); }
.s-lost, .s-failing { color: var(--failed); } .s-alive { color: var(--succeeded); }
button { font: inherit; padding: .15rem .6rem; border: 1px solid var(--line); border-radius: 5px;
  background: var(--bg); color: var(--fg); cursor: pointer; }
button:hover { border-color: var(--dim); }
form { display: flex; flex-wrap: wrap; gap: .4rem; margin-bottom: .6rem; }
input, select { font: inherit; padding: .2rem .4rem; border: 1px solid var(--line);
  border-radius: 5px; background: var(--bg); color: var(--fg); }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .25rem 1rem; margin: 0; }
dt { color: var(--dim); } dd { margin: 0; white-space: pre-wrap; overflow-wrap: anywhere;
  max-height: 12em; overflow-y: auto; }
pre { margin: 0; white-space: pre-wrap; overflow-wrap: anywhere; font: 12.5px/1.45 ui-monospace,
  SFMono-Regular, Menlo, monospace; max-height: 70vh; overflow-y: auto; }
.dim { color: var(--dim); } .error { color: var(--failed); } #message:empty { display: none; }
#message { position: fixed; bottom: 1rem; right: 1rem; background: var(--card); padding: .5rem 1rem;
  border: 1px solid var(--line); border-radius: 6px; max-width: 90vw; }
.add { color: var(--succeeded); } .del { color: var(--failed); } .hunk { color: var(--running); }
details { margin: .3rem 0; } details.tool { margin: 0; } .tool-output { color: var(--dim); }
summary { cursor: pointer; font-family: ui-monospace, monospace; }
textarea { font: inherit; width: 100%; box-sizing: border-box; padding: .3rem .4rem;
  border: 1px solid var(--line); border-radius: 5px; background: var(--bg); color: var(--fg); }
.reply { display: flex; gap: .4rem; align-items: flex-start; margin: .5rem 0; }
.bar-succeeded { fill: var(--succeeded); } .bar-failed { fill: var(--failed); }
.axis { fill: var(--dim); font-size: 11px; } .plot svg { width: 100%; max-height: 12rem; }
.tag { border: 1px solid var(--line); border-radius: 4px; padding: 0 .3rem; margin-right: .3rem;
  font-size: .8rem; color: var(--dim); }
.read-only .action { display: none; }  /* (a --read-only server refuses them anyway) */
a { color: var(--running); text-decoration: none; } a:hover { text-decoration: underline; }
@media (max-width: 700px) { main { padding: .5rem; } .wide { display: none; } }
@media (max-width: 480px) {  /* rows as cards, not tables scrolling sideways */
  table, tbody, tr, td { display: block; } thead { display: none; }
  tr { border: 1px solid var(--line); border-radius: 6px; margin: .4rem 0; padding: .3rem .5rem; }
  td { border: none; padding: .1rem 0; white-space: normal; max-width: none; }
  td[data-label]::before { content: attr(data-label) ": "; color: var(--dim); }
  td.wide { display: none; }
}
</style></head>
<body>
<header><h1><a href="#/">claude-jobs</a></h1><span id="live">connecting…</span></header>
<main id="main"></main>
<div id="message" role="status"></div>
<script>
"use strict";
const $ = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "onclick") node.onclick = value;
    else if (value !== undefined && value !== null) node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined)
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
};
const fill = (node, ...children) =>  // (what is null or undefined is left out)
  node.replaceChildren(...children.flat().filter(c => c !== null && c !== undefined));
const main = document.getElementById("main");
const say = (text, bad) => { const m = document.getElementById("message");
  m.textContent = text; m.className = bad ? "error" : ""; clearTimeout(say.t);
  say.t = setTimeout(() => { m.textContent = ""; }, 6000); };
const headers = () => { const t = sessionStorage.getItem("claude-jobs-token");
  return t ? { Authorization: "Bearer " + t } : {}; };
function askToken() {
  const t = prompt("This server needs its token:");
  if (t) sessionStorage.setItem("claude-jobs-token", t.trim());
}
async function api(path, method = "GET", sent = undefined) {
  for (let tries = 0; tries < 3; tries++) {
    const h = headers();
    if (sent !== undefined) h["Content-Type"] = "application/json";
    const r = await fetch(path, { method, headers: h,
      body: sent === undefined ? undefined : JSON.stringify(sent) });
    if (r.status === 401) { askToken(); continue; }
    const body = await r.json().catch(() => ({ error: r.statusText }));
    if (!r.ok) throw new Error(body.error || r.statusText);
    return body;
  }
  throw new Error("no token");
}
async function act(path, done) {
  try { await api(path, "POST"); say("done: " + path.split("/").slice(-1)[0]);
        if (done) done(); }
  catch (e) { say(e.message, true); }
}
async function post(path, sent, done) {  // an action with a JSON body
  try { await api(path, "POST", sent); say("done: " + path.split("/").slice(-1)[0]);
        if (done) done(); }
  catch (e) { say(e.message, true); }
}
const sleep = ms => new Promise(ok => setTimeout(ok, ms));
const action = (label, onclick) => $("button", { class: "action", onclick }, label);
// (paths are relative: the app may be mounted below a prefix)
// Server-Sent Events over fetch (EventSource cannot send the token); resumes with Last-Event-ID.
async function follow(path, onEvent, signal) {
  let lastId = null;
  while (!signal.aborted) {
    try {
      const h = headers(); if (lastId !== null) h["Last-Event-ID"] = lastId;
      const r = await fetch(path, { headers: h, signal });
      if (r.status === 401) { askToken(); continue; }
      if (!r.ok) { const b = await r.json().catch(() => ({})); say(b.error || r.statusText, true);
                   if (r.status === 404) return; throw new Error(r.status); }
      live(true);
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
          const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
          let event = "message", data = "";
          for (const line of block.split("\\n")) {
            if (line.startsWith("event: ")) event = line.slice(7);
            else if (line.startsWith("data: ")) data += line.slice(6);
            else if (line.startsWith("id: ")) lastId = line.slice(4);
          }
          if (data && onEvent(event, JSON.parse(data)) === false) return;
        }
      }
    } catch (e) { if (signal.aborted) return; }
    live(false);
    await sleep(2000);
  }
}
function live(on) { document.getElementById("live").textContent = on ? "● live" : "reconnecting…"; }
function ago(iso) {
  if (!iso) return $("span", {}, "-");
  const s = (Date.parse(iso) - Date.now()) / 1000, a = Math.abs(s);
  const text = a < 60 ? Math.round(a) + "s" : a < 3600 ? Math.round(a / 60) + "m"
    : a < 86400 ? (a / 3600).toFixed(1) + "h" : (a / 86400).toFixed(1) + "d";
  return $("span", { title: iso }, s > 1 ? "in " + text : text + " ago");
}
const secs = v => v === null || v === undefined ? "-" : v >= 60 ? (v / 60).toFixed(1) + "m"
  : Number(v).toFixed(1) + "s";
const money = v => "$" + Number(v || 0).toFixed(2);
const status = s => $("span", { class: "s s-" + s }, s);
// (on a phone, each row is a card: its cells say their column's name)
const table = (heads, rows) => {
  const labels = heads.map(h => h.replace("·", ""));
  for (const row of rows.flat()) {
    [...row.children].forEach((cell, i) => { if (labels[i]) cell.dataset.label = labels[i]; });
  }
  return $("table", {}, $("thead", {}, $("tr", {},
    heads.map(h => $("th", { class: h.startsWith("·") ? "wide" : "" }, h.replace("·", ""))))),
    $("tbody", {}, rows));
};

// -- the overview and the jobs ---------------------------------------------------------------
let view = null;
function overviewPage(params) {
  const stop = new AbortController();
  const needing = $("section", { id: "needs-you" });
  const queues = $("section", {}, $("h2", {}, "Queues"), $("p", { class: "dim" }, "loading…"));
  const chart = $("section", { id: "chart" }, $("h2", {}, "Finished over time"));
  const workers = $("section", {}, $("h2", {}, "Workers"));
  const batches = $("section", { id: "batches" }, $("h2", {}, "Batches"));
  const schedules = $("section", { id: "schedules" }, $("h2", {}, "Schedules"));
  const jobs = $("section", { id: "jobs" }, $("h2", {}, "Jobs"));
  fill(main, needing, queues, chart, workers, batches, schedules, jobs);
  const filters = jobFilters(jobs, params);
  const timer = timelineChart(chart);
  let lastCounts = "";
  follow("api/events", (event, data) => {
    if (event === "error") { say(data.error, true); return; }
    if (event !== "overview") return;
    const n = data.needs_you.count;
    document.title = (n ? "(" + (n >= 100 ? "99+" : n) + ") " : "") + "claude-jobs";
    fill(needing, n ? [$("h2", {}, "Needs you (" + (n >= 100 ? "99+" : n) + ")"),
      needsYouTable(data.needs_you.jobs)] : []);
    fill(queues, $("h2", {}, "Queues"), queueTable(data), holdList(data.holds),
      undelivered(data.notifications));
    fill(workers, $("h2", {}, "Workers"), workerTable(data.workers));
    fill(batches, $("h2", {}, "Batches"), batchTable(data.batches));
    fill(schedules, $("h2", {}, "Schedules"), scheduleTable(data.schedules));
    const counts = JSON.stringify(data.queues.map(q => [q.queue, q.ready, q.scheduled,
      q.running, q.succeeded, q.failed, q.cancelled]));
    if (counts !== lastCounts && filters.firstPage()) filters.load();
    lastCounts = counts;
  }, stop.signal);
  return () => { stop.abort(); clearInterval(timer); };
}
// Jobs that succeeded and failed over time, per minute (6 h) or per hour (7 d): an SVG of
// stacked bars, drawn here from GET api/timeline, again every minute.
function timelineChart(section) {
  let hours = 6;
  const picker = $("select", { id: "span" }, $("option", { value: 6 }, "last 6 hours"),
    $("option", { value: 24 }, "last 24 hours"), $("option", { value: 168 }, "last 7 days"));
  const plot = $("div", { class: "plot" });
  section.append(picker, plot);
  picker.onchange = () => { hours = Number(picker.value); draw(); };
  async function draw() {
    try {
      const data = await api("api/timeline?hours=" + hours);
      const step = data.step === "minute" ? 60e3 : 3600e3;
      const start = Date.parse(data.since), buckets = Math.ceil((Date.now() - start) / step);
      const counts = Array.from({ length: buckets }, () => [0, 0]);
      for (const p of data.points) {
        const i = Math.floor((Date.parse(p.at) - start) / step);
        if (i >= 0 && i < buckets) counts[i] = [p.succeeded, p.failed];
      }
      const top = Math.max(1, ...counts.map(([ok, bad]) => ok + bad));
      const width = 720, height = 120, bar = width / buckets;
      const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
      svg.setAttribute("viewBox", "0 0 " + width + " " + (height + 16));
      svg.setAttribute("role", "img");
      const total = counts.reduce((n, [ok, bad]) => [n[0] + ok, n[1] + bad], [0, 0]);
      svg.setAttribute("aria-label", total[0] + " succeeded, " + total[1] + " failed");
      const rect = (x, y, h, cls, title) => {
        const r = document.createElementNS(svg.namespaceURI, "rect");
        for (const [k, v] of Object.entries({ x, y, width: Math.max(bar - 0.5, 0.5), height: h,
          class: cls })) r.setAttribute(k, v);
        const t = document.createElementNS(svg.namespaceURI, "title");
        t.textContent = title; r.append(t); svg.append(r);
      };
      counts.forEach(([ok, bad], i) => {
        if (!ok && !bad) return;
        const when = new Date(start + i * step).toLocaleString();
        const okH = ok / top * height, badH = bad / top * height;
        rect(i * bar, height - okH - badH, badH, "bar-failed", when + ": " + bad + " failed");
        rect(i * bar, height - okH, okH, "bar-succeeded", when + ": " + ok + " succeeded");
      });
      const label = document.createElementNS(svg.namespaceURI, "text");
      label.setAttribute("x", 0); label.setAttribute("y", height + 13);
      label.setAttribute("class", "axis");
      label.textContent = "max " + top + " per " + data.step + " · " + total[0]
        + " succeeded, " + total[1] + " failed";
      svg.append(label);
      fill(plot, svg);
    } catch (e) { say(e.message, true); }
  }
  draw();
  return setInterval(draw, 60000);
}
// A queue's limits, asked for in two prompts (empty: none); cancelled: nothing changes.
function editLimits(q) {
  const running = prompt("Queue " + q.queue + ": at most how many jobs running at once, on "
    + "all workers? (empty: no limit)", q.max_running || "");
  if (running === null) return;
  const rate = prompt("At most how many starts per period, N/PERIOD like 30/h or 1/10s, "
    + "optionally counted per key, kind or cwd (30/h per key)? (empty: no limit)",
    q.rate ? q.rate + (q.rate_by ? " per " + q.rate_by : "") : "");
  if (rate === null) return;
  const [given, by] = rate.trim().split(/\\s+per\\s+/);
  const sent = { max_running: running.trim() ? Number(running) : null, rate: given || null };
  if (given) sent.rate_by = by || "queue";
  post("api/queues/" + encodeURIComponent(q.queue) + "/settings", sent);
}
const limitsText = q => [q.max_running ? "≤ " + q.max_running + " running" : null,
  q.rate ? q.rate + (q.rate_by ? " per " + q.rate_by : "") : null].filter(x => x)
  .join(", ") || "-";
function queueTable(data) {
  if (!data.queues.length) return $("p", { class: "dim" }, "no jobs yet");
  return table(["queue", "state", "ready", "·later", "running", "succeeded", "failed",
    "·cancelled", "oldest ready", "·ok/1h", "·fail/1h", "·median", "cost today", "·cost 7d",
    "limits", ""],
    data.queues.map(q => $("tr", {},
      $("td", {}, q.queue), $("td", {}, status(q.paused ? "paused" : "active"),
        q.no_worker ? $("div", { class: "error no-worker" }, "no live worker takes it") : null),
      ...[q.ready, q.scheduled, q.running, q.succeeded, q.failed, q.cancelled].map((v, i) =>
        $("td", { class: "num" + ([1, 5].includes(i) ? " wide" : "") }, v)),
      $("td", { class: "num" }, secs(q.oldest_ready_seconds)),
      $("td", { class: "num wide" }, q.succeeded_last_hour),
      $("td", { class: "num wide" }, q.failed_last_hour),
      $("td", { class: "num wide" }, secs(q.median_run_seconds)),
      $("td", { class: "num" }, money(q.cost_today_usd)),
      $("td", { class: "num wide" }, money(q.cost_7d_usd)),
      $("td", { class: "limits" }, limitsText(q)),
      $("td", {}, action(q.paused ? "resume" : "pause", () => act("api/queues/"
        + encodeURIComponent(q.queue) + (q.paused ? "/resume" : "/pause"))), " ",
        action("limits", () => editLimits(q))))));
}
function holdList(holds) {
  if (!holds.length) return null;
  return $("p", {}, ...holds.map(h => $("span", {}, "hold on ", $("b", {}, h.kind), " until ",
    h.until.startsWith("9999") ? "resumed" : ago(h.until), ": ", h.reason, " ",
    action("lift", () => act("api/holds/" + encodeURIComponent(h.kind) + "/lift")))));
}
function undelivered(list) {
  if (!list.length) return null;
  return $("div", { id: "undelivered" }, $("h3", {}, "Notifications not delivered"),
    table(["event", "about", "url", "state", "·tries", "error", ""], list.map(n => $("tr", {},
      $("td", {}, n.event),
      $("td", {}, n.job_id ? $("a", { href: "#/jobs/" + n.job_id }, n.job_id.slice(0, 8))
        : n.subject),
      $("td", { class: "text" }, n.url), $("td", {}, $("span", { class: "s s-failed" }, n.state)),
      $("td", { class: "num wide" }, n.attempts),
      $("td", { class: "text" }, n.last_error || ""),
      $("td", {}, action("retry", () => act("api/notifications/" + n.id + "/retry")))))));
}
function needsYouTable(jobs) {
  return table(["id", "why", "finished", "prompt / payload", ""], jobs.map(j => $("tr", {},
    $("td", {}, $("a", { href: "#/jobs/" + j.id }, j.id.slice(0, 8))),
    $("td", {}, $("span", { class: "s s-" + (j.why === "to review" ? "running" : "failed") },
      j.why), " ", prBadge(j)),
    $("td", {}, ago(j.finished_at)), $("td", { class: "text" }, j.excerpt.slice(0, 200)),
    $("td", {}, action("seen", () => act("api/jobs/" + j.id + "/reviewed"))))));
}
function workerTable(list) {
  if (!list.length) return $("p", { class: "dim" }, "no workers");
  return table(["worker", "state", "running", "·queues", "heartbeat", "jobs", ""],
    list.map(w => $("tr", {}, $("td", { title: w.id }, w.host + ":" + w.pid),
        $("td", {}, status(w.state),
          w.trouble ? $("div", { class: "dim" }, w.trouble) : null,
          w.claude_paused_until ? $("div", { class: "error" + (w.unfit ? " unfit" : "") },
            "no claude jobs until ", ago(w.claude_paused_until), ": ", w.claude_paused_reason,
            " ", w.unfit ? action("try again", () => act("api/holds/claude/lift")) : null)
            : null,
          w.lost_at ? $("div", { class: "dim" }, "found dead ", ago(w.lost_at), ": ",
            w.lost_because + "; " + w.recovered + " running job(s) went back") : null),
        $("td", { class: "num" }, w.running + "/" + w.concurrency),
        $("td", { class: "wide" }, w.queues.join(",")), $("td", {}, ago(w.last_heartbeat)),
        $("td", { class: "text" }, ...w.jobs.map(j => $("div", {},
          $("a", { href: "#/jobs/" + j.id }, j.id.slice(0, 8)), " ", j.excerpt.slice(0, 80)))),
        $("td", {}, w.state === "alive" ? action("drain", () => {
          if (confirm("Drain " + w.host + ":" + w.pid + "? It takes no more jobs and exits once "
            + "its running jobs end.")) act("api/workers/" + w.id + "/drain"); }) : null))));
}
function batchTable(list) {
  if (!list.length) return $("p", { class: "dim" }, "no batches");
  const shown = ["succeeded", "failed", "cancelled", "running", "queued"];
  return table(["batch", "progress", "jobs", "cost", "created", "finished", "callbacks", ""],
    list.map(b => $("tr", {},
      $("td", { title: b.id }, $("a", { href: "#/batch/" + b.id }, b.name)),
      $("td", {}, $("progress", { max: b.jobs || 1, value: b.ended }), " ",
        b.ended + " of " + b.jobs),
      $("td", {}, ...shown.filter(s => b.counts[s]).map(s =>
        $("span", {}, status(s), " " + b.counts[s] + " "))),
      $("td", { class: "num" }, money(b.cost_usd)), $("td", {}, ago(b.created_at)),
      $("td", {}, b.finished_at ? ago(b.finished_at) : "open"),
      $("td", {}, ...b.callbacks.map(id => $("a", { href: "#/jobs/" + id }, id.slice(0, 8) + " "))),
      $("td", {}, b.finished_at ? null : action("cancel", () => {
          if (confirm("Cancel the unfinished jobs of batch " + b.name + "?"))
            act("api/batches/" + b.id + "/cancel"); }),
        b.counts.failed ? action("retry failed", () => act("api/batches/" + b.id + "/retry"))
          : null))));
}
function scheduleTable(list) {
  if (!list.length) return $("p", { class: "dim" }, "no schedules");
  return table(["schedule", "when", "next run", "last run", ""],
    list.map(s => $("tr", {},
      $("td", {}, $("a", { href: "#/schedule/" + encodeURIComponent(s.name) }, s.name)),
      $("td", {}, s.when + " (" + s.timezone + ")"),
      $("td", {}, s.paused_at ? status("paused") : ago(s.next_run_at)),
      $("td", { class: "text" }, !s.last_run ? "-" : [ago(s.last_run.due_at), " ",
        s.last_run.job_id ? $("a", { href: "#/jobs/" + s.last_run.job_id },
          s.last_run.job_id.slice(0, 8)) : s.last_run.outcome,
        " ", s.last_run.status ? status(s.last_run.status) : (s.last_run.note || "")]),
      $("td", {}, action("run now", () => act("api/schedules/"
          + encodeURIComponent(s.name) + "/run")),
        action(s.paused_at ? "resume" : "pause", () => act("api/schedules/"
          + encodeURIComponent(s.name) + (s.paused_at ? "/resume" : "/pause")))))));
}
// The jobs table's filters and page live in the URL (#/?status=failed&queue=nightly&before=...):
// a view can be bookmarked and shared. Paged both ways by keyset (older, newer).
function jobFilters(section, params) {
  const field = (name, hint) => $("input", { name, placeholder: hint, size: 12 });
  const statusSelect = $("select", { name: "status" }, $("option", { value: "" }, "any status"),
    ["queued", "running", "succeeded", "failed", "cancelled"].map(s => $("option", {}, s)));
  const form = $("form", {}, statusSelect, field("queue", "queue"), field("kind", "kind"),
    field("q", "text in the prompt"), field("cwd", "cwd"), field("batch", "batch"),
    field("tag", "tag"), $("button", {}, "filter"));
  for (const el of form.elements) {
    if (el.name && params.has(el.name)) el.value = params.get(el.name);
  }
  const body = $("div", {});
  const newer = $("button", { id: "newer" }, "← newer");
  const older = $("button", { id: "older" }, "older →");
  // every job the filters match, not only this page: asked with their number first
  const bulk = (which, label) => action(label, async () => {
    const p = query(); p.set("action", which);
    try {
      const { count } = await api("api/bulk?" + p);
      if (!count) { say("no job matches to " + label); return; }
      let priority;
      if (which === "set-priority") {
        const given = prompt("The priority of the " + count + " queued job(s) matching:");
        if (given === null || !given.trim()) return;
        priority = Number(given);
        if (!Number.isInteger(priority)) { say("a priority is a whole number", true); return; }
      } else if (!confirm(label[0].toUpperCase() + label.slice(1) + " " + count
                          + " job(s) matching these filters?")) return;
      const sent = which === "set-priority" ? { action: which, priority } : { action: which };
      for (const [k, v] of query()) sent[k] = v;
      const done = await api("api/bulk", "POST", sent);
      say(label + ": " + done.changed + " job(s)"); load();
    } catch (e) { say(e.message, true); }
  });
  section.append(form, body, $("p", {}, newer, " ", older),
    $("p", { id: "bulk", class: "dim" }, "all matching: ", bulk("cancel", "cancel"), " ",
      bulk("retry", "retry"), " ", bulk("run-now", "run now"), " ",
      bulk("set-priority", "set priority")));
  let page = { before: params.get("before"), after: params.get("after") };
  let asked = 0;  // (the latest request: an earlier one's answer that comes after is dropped)
  const query = () => { const p = new URLSearchParams();
    for (const el of form.elements) if (el.name && el.value) p.set(el.name, el.value);
    return p; };
  async function load() {
    const p = query();
    for (const key of ["before", "after"]) if (page[key]) p.set(key, page[key]);
    history.replaceState(null, "", "#/" + (String(p) ? "?" + p : ""));
    const mine = ++asked;
    try {
      const data = await api("api/jobs?" + p);
      if (mine !== asked) return;
      // (past either end, as an old bookmark may be: the first page)
      if (!data.jobs.length && (page.after || page.before)) { page = {}; return load(); }
      if (page.after && !data.prev) {  // (back on the first page: it follows the queue live)
        page = {};
        const q = query(); history.replaceState(null, "", "#/" + (String(q) ? "?" + q : ""));
      }
      fill(body, jobTable(data.jobs));
      older.style.display = data.next ? "" : "none";
      newer.style.display = data.prev ? "" : "none";
      older.onclick = () => { page = { before: data.next }; load(); };
      newer.onclick = () => { page = { after: data.prev }; load(); };
    } catch (e) { say(e.message, true); }
  }
  form.onsubmit = e => { e.preventDefault(); page = {}; load(); };
  load();
  return { load, firstPage: () => !page.before && !page.after };
}
// A job's pull request as a link (only to an http(s) address), its state and its CI.
function prBadge(job) {
  const pr = job.delivery && job.delivery.pr;
  if (!pr) return job.delivery && job.delivery.error
    ? $("span", { class: "error", title: job.delivery.error }, "delivery failed") : null;
  const text = "PR #" + pr.number + " " + (pr.state || "open") + (pr.ci ? ", CI " + pr.ci : "");
  return /^https?:[/][/]/.test(pr.url || "")
    ? $("a", { href: pr.url, class: "pr", rel: "noopener noreferrer", target: "_blank" }, text)
    : $("span", { class: "pr" }, text);
}
function jobTable(jobs) {
  if (!jobs.length) return $("p", { class: "dim" }, "no jobs");
  return table(["id", "queue", "·kind", "status", "·tries", "when", "·waits for",
    "prompt / payload"],
    jobs.map(j => $("tr", {}, $("td", {}, $("a", { href: "#/jobs/" + j.id }, j.id.slice(0, 8))),
      $("td", {}, j.queue), $("td", { class: "wide" }, j.kind),
      $("td", { title: j.why || "" }, status(j.shown_status), " ", prBadge(j)),
      $("td", { class: "num wide" }, j.attempts + "/" + j.max_attempts),
      $("td", {}, ago(j.status === "queued" && Date.parse(j.run_at) > Date.now() ? j.run_at
        : j.finished_at || j.started_at || j.created_at)),
      $("td", { class: "wide" }, j.waits_for || ""),
      $("td", { class: "text" }, (j.tags || []).map(t => $("span", { class: "tag" }, t)),
        j.excerpt.slice(0, 200)))));
}

// -- a job -----------------------------------------------------------------------------------
function jobPage(id) {
  const stop = new AbortController();
  const facts = $("section", {}, $("h2", {}, "Job ", id));
  const actions = $("p", {});
  const transcript = $("pre", { id: "transcript" });
  const outcome = $("p", { id: "outcome", class: "dim" }, "following…");
  const review = $("section", { id: "review" });
  fill(main, facts, review, $("section", {}, $("h2", {}, "Transcript"), transcript, outcome));
  let reviewed = null;  // (built once the job has finished: what is typed in it stays)
  const refresh = async () => {
    try {
      const job = await api("api/jobs/" + encodeURIComponent(id));
      if (reviewed !== job.id && ["succeeded", "failed", "cancelled"].includes(job.status)) {
        reviewed = job.id;
        reviewPanel(review, job, refresh);
      }
      const rows = job.rows.map(([name, value]) => [$("dt", {}, name),
        $("dd", {}, name === "status" ? status(job.shown_status) : value,
          name === "status" ? value.slice(job.shown_status.length) : "")]);
      const extra = job.attempt_errors.map(line => $("div", { class: "error" }, line));
      fill(actions,
        ["queued", "running"].includes(job.status) ? action("cancel", () => {
          if (job.status !== "running" || confirm("Cancel job " + job.id.slice(0, 8) + "? It is "
            + "running: claude is stopped, and what it did so far stays where it is."))
            act("api/jobs/" + job.id + "/cancel", refresh); }) : null, " ",
        job.status === "queued" ? [action("reschedule", () => {
          const when = prompt("Run it when? A delay (30m, 2h) or a time (2026-12-24T09:00Z):");
          if (when) post("api/jobs/" + job.id + "/reschedule", /^\\d+(\\.\\d+)?[smhd]?$/
            .test(when.trim()) ? { delay: when.trim() } : { at: when.trim() }, refresh); }), " ",
          action("priority", () => {
            const value = prompt("Its priority (higher runs first; now " + job.priority + "):");
            if (value !== null && value.trim()) post("api/jobs/" + job.id + "/priority",
              { priority: Number(value) }, refresh); })] : null, " ",
        ["failed", "cancelled"].includes(job.status)
          ? action("retry", () => act("api/jobs/" + job.id + "/retry", () => location.reload()))
          : null, " ",
        job.status === "queued" && Date.parse(job.run_at) > Date.now()
          ? action("run now", () => act("api/jobs/" + job.id + "/run-now", refresh)) : null, " ",
        job.payload.worktree && job.worktree && ["succeeded", "failed", "cancelled"]
          .includes(job.status) ? [action(job.delivery ? "deliver again" : "deliver",
            () => act("api/jobs/" + job.id + "/deliver", refresh)), " ",
            job.payload.pr || (job.delivery && job.delivery.pr) ? null : action("open a PR",
            () => act("api/jobs/" + job.id + "/deliver?pr=true", refresh))] : null);
      if (["succeeded", "failed", "cancelled"].includes(job.status) && !job.reviewed_at) {
        actions.append(" ", action("seen", () => act("api/jobs/" + job.id + "/reviewed",
          refresh)));
      }
      if (job.payload.worktree && job.worktree && job.worktree.branch
          && ["succeeded", "failed", "cancelled"].includes(job.status)) {
        actions.append(" ", action("discard", () => {
          if (confirm("Discard what job " + job.id.slice(0, 8) + " made? Its worktree (with "
            + "anything not committed) and its branch " + job.worktree.branch + " are deleted."))
            act("api/jobs/" + job.id + "/discard", refresh); }));
      }
      fill(facts, $("h2", {}, "Job ", job.id), actions, $("p", {}, prBadge(job)),
        $("dl", {}, rows.flat()), ...extra, job.diff_stat ? $("pre", {}, job.diff_stat) : null);
    } catch (e) { say(e.message, true); }
  };
  refresh();
  follow("api/jobs/" + encodeURIComponent(id) + "/events", (event, data) => {
    if (event === "transcript") {
      if (data.skipped) transcript.append("… (" + data.skipped + " characters not kept)\\n");
      const atEnd = transcript.scrollTop + transcript.clientHeight >= transcript.scrollHeight - 4;
      transcript.append(...foldToolOutput(data.lines));
      if (atEnd) transcript.scrollTop = transcript.scrollHeight;
    } else if (event === "status") {
      fill(outcome, status(data.status), " attempt " + data.attempts + " of "
        + data.max_attempts, data.why ? " · " + data.why : "");
      refresh();
    } else if (event === "end") {
      fill(outcome, "job ", status(data.status),
        data.last_error && data.status !== "succeeded" ? ": " + data.last_error : "");
      live(false); document.getElementById("live").textContent = "ended";
      return false;
    } else if (event === "error") { say(data.error, true); }
  }, stop.signal);
  return () => stop.abort();
}

// A transcript's lines, a tool's output folded under its first line (the lines the server
// marks with TOOL_OUTPUT_MARK): open it to see the rest.
const TOOL_MARK = "    \u2502 ";
function foldToolOutput(lines) {
  const nodes = [];
  let body = null;
  for (const line of lines) {
    if (body && line.startsWith(TOOL_MARK)) {
      body.append(line.slice(TOOL_MARK.length) + "\\n");
      continue;
    }
    body = null;
    if (/ \\(\\+\\d+ lines\\)$/.test(line)) {
      body = $("div", { class: "tool-output" });
      nodes.push($("details", { class: "tool" }, $("summary", {}, line), body));
      continue;
    }
    nodes.push(line + "\\n");
  }  // (a line that only looked like a tool's: not folded)
  return nodes.map(n => n instanceof Node && !n.lastChild.firstChild
    ? n.firstChild.textContent + "\\n" : n);
}

// What a finished job made, and the answer to it: its worktree's diff, file by file (a large
// file's folded), and a reply that continues it (the page then follows the new job).
function reviewPanel(section, job, refresh) {
  const parts = [];
  if (job.kind === "claude") {
    const text = $("textarea", { id: "reply", rows: 3, placeholder: "Reply: what claude should "
      + "do next, in the same session" + (job.payload.worktree ? " and worktree" : "") });
    const send = async () => {
      if (!text.value.trim()) { say("type a reply first", true); return; }
      try {
        const next = await api("api/jobs/" + job.id + "/reply", "POST", { prompt: text.value });
        location.hash = "#/jobs/" + next.id;
      } catch (e) { say(e.message, true); }
    };
    parts.push($("div", { class: "action reply" }, text, action("reply", send)));
  }
  const changes = $("div", { id: "changes" });
  if (job.payload.worktree && job.worktree) parts.push($("h2", {}, "Changes"), changes);
  fill(section, parts);
  if (!job.payload.worktree || !job.worktree) return;
  api("api/jobs/" + job.id + "/diff").then(d => {
    if (!d.files.length) { fill(changes, $("p", { class: "dim" }, "no changes")); return; }
    const added = d.files.reduce((n, f) => n + f.added, 0);
    const removed = d.files.reduce((n, f) => n + f.removed, 0);
    fill(changes, $("p", {}, d.files.length + " file(s), ", $("span", { class: "add" },
      "+" + added), " ", $("span", { class: "del" }, "-" + removed)),
      d.files.map(f => $("details", f.folded ? {} : { open: "" },
        $("summary", {}, f.path, " ", f.binary ? $("span", { class: "dim" }, "(binary)")
          : [$("span", { class: "add" }, "+" + f.added), " ",
             $("span", { class: "del" }, "-" + f.removed)],
          f.folded ? $("span", { class: "dim" }, " (large: open to see)") : null),
        $("pre", { class: "diff" }, diffLines(f.lines),
          f.cut ? $("span", { class: "dim" }, "… " + f.cut + " more line(s)") : null))));
  }).catch(e => fill(changes, $("p", { class: "dim" }, e.message)));
}

// A file's diff, each line marked: its header (before the first @@) dim, hunks, added, removed.
function diffLines(lines) {
  let inHunks = false;
  return lines.map(line => {
    inHunks = inHunks || line.startsWith("@@");
    const kind = !inHunks ? "dim" : line.startsWith("@@") ? "hunk" : line.startsWith("+") ? "add"
      : line.startsWith("-") ? "del" : "";
    return $("span", { class: kind }, line + "\\n");
  });
}

// -- a batch ---------------------------------------------------------------------------------
function batchPage(id) {
  const facts = $("section", {}, $("h2", {}, "Batch ", id));
  const jobs = $("section", {}, $("h2", {}, "Its jobs"));
  fill(main, facts, jobs);
  const refresh = async () => {
    try {
      const b = await api("api/batches/" + encodeURIComponent(id));
      const page = await api("api/jobs?limit=200&batch=" + encodeURIComponent(id));
      const rows = [["progress", b.ended + " of " + b.jobs + " ended"],
        ["by status", Object.entries(b.counts).map(([k, v]) => v + " " + k).join(", ") || "-"],
        ["cost", money(b.cost_usd)], ["created", ago(b.created_at)],
        ["started", b.started_at ? ago(b.started_at) : "-"],
        ["finished", b.finished_at ? ago(b.finished_at) : "not yet"],
        ["on finish", b.on_finish ? JSON.stringify(b.on_finish) : "-"],
        ["on success", b.on_success ? JSON.stringify(b.on_success) : "-"]];
      fill(facts, $("h2", {}, "Batch ", b.name), $("progress", { max: b.jobs || 1,
        value: b.ended }), $("dl", {}, rows.map(([k, v]) => [$("dt", {}, k), $("dd", {}, v)])
        .flat(), $("dt", {}, "callbacks"), $("dd", {}, ...b.callbacks.map(c =>
          $("a", { href: "#/jobs/" + c }, c.slice(0, 8) + " ")))));
      fill(jobs, $("h2", {}, "Its jobs"), jobTable(page.jobs));
    } catch (e) { say(e.message, true); }
  };
  refresh();
  const timer = setInterval(refresh, 3000);
  return () => clearInterval(timer);
}

// -- a schedule ------------------------------------------------------------------------------
function schedulePage(name) {
  const facts = $("section", {}, $("h2", {}, "Schedule ", name));
  const runs = $("section", { id: "runs" }, $("h2", {}, "Its runs"));
  fill(main, facts, runs);
  const refresh = async () => {
    try {
      const s = await api("api/schedules/" + encodeURIComponent(name) + "?runs=100");
      const rows = [["when", s.when + " (" + s.timezone + ")"],
        ["next run", s.paused_at ? "paused " + new Date(s.paused_at).toLocaleString()
          : new Date(s.next_run_at).toLocaleString()],
        ["kind", s.kind], ["catch up", s.catch_up], ["overlap", s.overlap],
        ["only if changed", s.only_if_changed ? "yes" : "no"],
        ["payload", JSON.stringify(s.payload)], ["options", JSON.stringify(s.options)]];
      fill(facts, $("h2", {}, "Schedule ", s.name), $("p", {},
        action("run now", () => act("api/schedules/" + encodeURIComponent(s.name) + "/run",
          refresh)), " ",
        action(s.paused_at ? "resume" : "pause", () => act("api/schedules/"
          + encodeURIComponent(s.name) + (s.paused_at ? "/resume" : "/pause"), refresh))),
        $("dl", {}, rows.map(([k, v]) => [$("dt", {}, k), $("dd", {}, v)]).flat()));
      fill(runs, $("h2", {}, "Its runs"), !s.runs.length ? $("p", { class: "dim" }, "none yet")
        : table(["due", "outcome", "job", "status", "·cost", "note"], s.runs.map(r =>
          $("tr", {}, $("td", {}, ago(r.due_at)),
            $("td", {}, $("span", { class: "s s-" + (r.outcome === "enqueued" || r.outcome
              === "manual" ? "succeeded" : r.outcome === "missed" ? "failed" : "paused") },
              r.outcome === "enqueued" ? "fired" : r.outcome)),
            $("td", {}, r.job_id ? $("a", { href: "#/jobs/" + r.job_id }, r.job_id.slice(0, 8))
              : "-"),
            $("td", {}, r.status ? status(r.status) : "-"),
            $("td", { class: "num wide" }, r.cost_usd === null ? "-" : money(r.cost_usd)),
            $("td", { class: "text" }, r.note || "")))));
    } catch (e) { say(e.message, true); }
  };
  refresh();
  const timer = setInterval(refresh, 5000);
  return () => clearInterval(timer);
}

function route() {
  if (view) view();
  const hash = location.hash;
  const job = hash.match(/^#\\/jobs\\/([0-9a-fA-F-]+)$/);
  const batch = hash.match(/^#\\/batch\\/([^?]+)$/);
  const schedule = hash.match(/^#\\/schedule\\/([^?]+)$/);
  const params = new URLSearchParams(hash.includes("?") ? hash.slice(hash.indexOf("?")) : "");
  const decoded = text => { try { return decodeURIComponent(text); } catch { return text; } };
  view = job ? jobPage(job[1]) : batch ? batchPage(decoded(batch[1]))
    : schedule ? schedulePage(decoded(schedule[1])) : overviewPage(params);
}
window.addEventListener("hashchange", route);
route();
</script></body></html>
"""


if __name__ == "__main__":
    # Run the importable module rather than this __main__ copy, so that the handlers which
    # --import modules register land in the registry the worker reads.
    import claude_jobs

    claude_jobs.main()
