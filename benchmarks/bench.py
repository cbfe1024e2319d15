"""Benchmarks for claude-jobs: enqueue, drain, the claude subprocess path, pickup latency,
backlog, the raw-SQL floor and a worker's memory; the peer (pgqueuer, the `bench` extra) side
by side with the floor; the real claude CLI against a local mock API. Prints a table and
writes JSON.

    python benchmarks/bench.py                      # on a throwaway PostgreSQL, 3 runs each
    python benchmarks/bench.py --quick              # smaller counts, 1 run: a smoke test
    python benchmarks/bench.py --only drain,floor   # some of them
    python benchmarks/bench.py --database-url postgresql://me@host/empty_db

Every figure is the median of --runs runs, with min and max. Workers are real
`claude-jobs worker` processes; drain rates come from the database's own timestamps (from the
first job started to the last one finished), so process start-up is not counted.
With --database-url, the database must be one the benchmark may fill and empty.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

import psycopg
from psycopg import sql

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import bench_handlers  # noqa: E402, F401  (registers the "noop" kind here too)

import claude_jobs  # noqa: E402

FAKE_CLAUDE = """#!/bin/sh
cat > /dev/null
echo '{"type":"system","subtype":"init","session_id":"bench"}'
echo '{"type":"result","subtype":"success","is_error":false,"result":"ok",'\
'"session_id":"bench","total_cost_usd":0,"num_turns":1}'
"""

# (figure, comparison, target, what the issue asks)
TARGETS = [
    ("drain c10", ">=", 5000, "no-op drain, concurrency 10: at least 5,000 jobs/s"),
    ("drain c10 / floor", ">=", 0.6, "no-op drain, concurrency 10: at least 60% of the floor"),
    ("latency p50", "<", 5, "pickup latency p50 under 5 ms"),
    ("latency p99", "<", 25, "pickup latency p99 under 25 ms"),
    ("enqueue_many", ">=", 50000, "bulk enqueue at least 50,000 jobs/s"),
    ("backlog 1M / 10k", ">=", 0.8, "drain at a 1M backlog at least 80% of the 10k figure"),
    ("claude / raw spawn", ">=", 0.8, "the subprocess path within 80% of the raw spawn rate"),
    ("memory idle", "<", 60, "an idle worker under 60 MB resident"),
    ("claim query, 100k blocked", "<", 1, "claim with 100,000 blocked jobs under 1 ms"),
    ("batch progress 10k", "<", 10, "a 10,000-job batch's progress under 10 ms"),
    ("list", "<", 250, "`claude-jobs list` under 250 ms wall, import included"),
    ("api jobs p99", "<", 50, "GET /api/jobs at 2M jobs: p99 under 50 ms"),
    ("api job p99", "<", 50, "GET /api/jobs/{id} at 2M jobs: p99 under 50 ms"),
    ("metrics p99", "<", 100, "a /metrics scrape at 2M jobs under 100 ms"),
    ("api stats p99", "<", 200, "GET /api/stats (the overview) at 2M jobs under 200 ms"),
    ("stats 2M", "<", 200, "what `stats` asks at 2M jobs under 200 ms (2.1 s before)"),
    ("list 2M", "<", 200, "what `list` asks at 2M jobs under 200 ms (1.0 s before)"),
    ("sse db connections", "<=", 3, "200 event streams on at most 3 database connections"),
    ("sse delay p99", "<", 250, "200 event streams: event delay p99 under 250 ms"),
    ("warm burst / fresh", ">=", 0.9, "a warm worker drains a burst at 90% of a fresh one"),
    ("transcript WAL / byte", "<=", 3, "a transcript's WAL at most 3 bytes per byte"),
    ("side by side: c10 / pgqueuer", ">=", 2, "no-op drain, concurrency 10: 2x the peer"),
    ("side by side: c10 / floor", ">=", 0.5, "... and at least 50% of the floor"),
    ("side by side: c10 / pgqueuer, busy core", ">=", 1.5, "one core kept busy: 1.5x the peer"),
    ("latency p50 - floor", "<=", 1, "pickup latency p50 within 1 ms of the floor's"),
    ("latency p99", "<", 10, "pickup latency p99 under 10 ms"),
    ("claude overhead", "<", 0.1, "a claude job adds under 10% to a bare `claude -p`"),
    ("supervisor uss", "<", 5, "a running claude job adds under 5 MB (private)"),
]


@dataclass
class Figure:
    name: str
    unit: str
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def as_dict(self) -> dict[str, object]:
        return {
            "unit": self.unit,
            "median": self.median,
            "min": min(self.values),
            "max": max(self.values),
            "runs": self.values,
        }


class Bench:
    """The database, worker processes, and the figures collected so far."""

    def __init__(self, url: str | None, runs: int, quick: bool, workdir: Path) -> None:
        self.runs = runs
        self.quick = quick
        self.workdir = workdir
        self.figures: dict[str, Figure] = {}
        self._server = None
        if url is None:
            import pgserver

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._server = pgserver.get_server(workdir / "pgdata", cleanup_mode="delete")
            url = self._server.get_uri()
        self.url = url
        with psycopg.connect(url, autocommit=True) as conn:
            claude_jobs.migrate(conn)
            self.postgres = conn.execute("SHOW server_version").fetchone()[0]
            self.jit = conn.execute("SELECT pg_jit_available()").fetchone()[0]
        self.fake_claude = workdir / "claude"
        self.fake_claude.write_text(FAKE_CLAUDE)
        self.fake_claude.chmod(0o755)

    def close(self) -> None:
        if self._server is not None:
            self._server.cleanup()

    # -- recording ------------------------------------------------------------------------

    def record(self, name: str, unit: str, value: float) -> None:
        self.figures.setdefault(name, Figure(name, unit)).values.append(value)
        print(f"  {name}: {value:,.2f} {unit}", flush=True)

    def ratio(self, name: str, numerator: str, denominator: str, difference: bool = False) -> None:
        """A figure of two others' medians: their ratio (or ``difference``)."""
        if numerator in self.figures and denominator in self.figures:
            one, other = self.figures[numerator], self.figures[denominator]
            if difference:
                self.figures[name] = Figure(name, one.unit, [one.median - other.median])
            else:
                self.figures[name] = Figure(name, "ratio", [one.median / other.median])

    # -- database -------------------------------------------------------------------------

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            yield conn

    @contextlib.contextmanager
    def database(self, name: str) -> Iterator[None]:
        """Meanwhile, the database ``name`` on the same server (made and migrated if it is
        not there): for states too big to rebuild between rounds taken in turn."""
        main = self.url
        with self.connection() as conn:
            made = not conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", [name]
            ).fetchone()
            if made:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.url = urllib.parse.urlsplit(main)._replace(path=f"/{name}").geturl()
        try:
            if made:
                with self.connection() as conn:
                    claude_jobs.migrate(conn)
            yield
        finally:
            self.url = main

    def reset(self) -> None:
        """An empty queue without settings, with fresh statistics."""
        with self.connection() as conn:
            conn.execute(
                "TRUNCATE claude_jobs, claude_jobs_output, claude_jobs_workers, claude_jobs_starts"
            )
            conn.execute("DELETE FROM claude_jobs_queues")
            conn.execute("VACUUM ANALYZE claude_jobs")

    def fill(self, count: int, kind: str = "noop", status: str = "queued") -> None:
        """`count` jobs straight into the table (faster than enqueue for big backlogs)."""
        with self.connection() as conn:
            conn.execute(
                """INSERT INTO claude_jobs (kind, payload, status, finished_at)
                   SELECT %s, '{"prompt": "bench"}', %s,
                          CASE WHEN %s <> 'queued' THEN now() END
                   FROM generate_series(1, %s)""",
                [kind, status, status, count],
            )
            conn.execute("ANALYZE claude_jobs")  # (or the floor's claim may sort them all)

    def count(self, status: str) -> int:
        with self.connection() as conn:
            query = "SELECT count(*) FROM claude_jobs WHERE status = %s"
            return conn.execute(query, [status]).fetchone()[0]

    def status(self, job_id: uuid.UUID) -> str:
        with self.connection() as conn:
            query = "SELECT status FROM claude_jobs WHERE id = %s"
            return conn.execute(query, [job_id]).fetchone()[0]

    def unfinished(self, queue: str) -> int:
        with self.connection() as conn:
            query = "SELECT count(*) FROM claude_jobs WHERE queue = %s AND status <> 'succeeded'"
            return conn.execute(query, [queue]).fetchone()[0]

    def queue_rate(self, queue: str) -> float:
        """Jobs per second of a queue, from its first start to its last finish."""
        with self.connection() as conn:
            count, first, last = conn.execute(
                "SELECT count(*), min(started_at), max(finished_at) FROM claude_jobs "
                "WHERE queue = %s",
                [queue],
            ).fetchone()
        return count / (last - first).total_seconds()

    def count_workers(self) -> int:
        with self.connection() as conn:
            return conn.execute("SELECT count(*) FROM claude_jobs_workers").fetchone()[0]

    def drain_rate(self, limit: int | None = None) -> float:
        """Jobs per second, from the first start to the last (or `limit`-th) finish."""
        with self.connection() as conn:
            rows = conn.execute(
                """SELECT min(started_at) OVER (), finished_at FROM claude_jobs
                   WHERE status = 'succeeded' AND started_at IS NOT NULL
                   ORDER BY finished_at LIMIT %s""",
                [limit],
            ).fetchall()
        first, last = rows[0][0], rows[-1][1]
        return len(rows) / (last - first).total_seconds()

    # -- workers --------------------------------------------------------------------------

    def worker(self, *args: str, log: str = "worker.log") -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)]),
            "IS_SANDBOX": "1",
        }
        with open(self.workdir / log, "ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "claude_jobs", "--database-url", self.url, "worker",
                 "--import", "bench_handlers", *args],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise SystemExit(f"benchmark stuck: {what} (see {self.workdir})")
            time.sleep(0.02)

    def run_burst(self, *args: str, sample_memory: bool = False) -> float:
        """Run a burst worker to the end; returns its peak resident memory in MB."""
        worker = self.worker("--burst", *args)
        peak = 0.0
        while worker.poll() is None:
            if sample_memory:
                peak = max(peak, rss_mb(worker.pid))
            time.sleep(0.05)
        if worker.returncode != 0:
            raise SystemExit(f"the worker failed (see {self.workdir / 'worker.log'})")
        return peak


def rss_mb(pid: int) -> float:
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# -- the benchmarks -----------------------------------------------------------------------


def bench_enqueue(b: Bench) -> None:
    """1. single enqueue() calls from one thread, and bulk enqueue of 100,000 jobs."""
    singles = 500 if b.quick else 3000
    bulk = 20_000 if b.quick else 100_000
    lines = b.workdir / "jobs.jsonl"
    lines.write_text("".join(json.dumps({"prompt": f"job {n}"}) + "\n" for n in range(bulk)))
    for _ in range(b.runs):
        b.reset()
        with b.connection() as conn:
            started = time.perf_counter()
            for n in range(singles):
                claude_jobs.enqueue(conn, {"n": n}, kind="noop")
            b.record("enqueue single", "calls/s", singles / (time.perf_counter() - started))
            payloads = [{"prompt": f"job {n}"} for n in range(bulk)]
            started = time.perf_counter()
            claude_jobs.enqueue_many(conn, payloads)
            b.record("enqueue_many", "jobs/s", bulk / (time.perf_counter() - started))
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "claude_jobs", "--database-url", b.url, "enqueue",
             "--file", str(lines)],
            capture_output=True, cwd=HERE.parent, check=True,
        )  # fmt: skip
        elapsed = time.perf_counter() - started
        assert len(done.stdout.splitlines()) == bulk
        b.record("enqueue --file", "jobs/s", bulk / elapsed)


def bench_drain(b: Bench) -> None:
    """2 and 7. 50,000 no-op jobs drained by one worker process at concurrency 10 and 50, and
    the worker's resident memory at concurrency 50."""
    count = 5_000 if b.quick else 50_000
    for concurrency in (10, 50):
        for _ in range(b.runs):
            b.reset()
            b.fill(count)
            peak = b.run_burst("--concurrency", str(concurrency), sample_memory=True)
            assert b.count("succeeded") == count
            b.record(f"drain c{concurrency}", "jobs/s", b.drain_rate())
            if concurrency == 50:
                b.record("memory c50", "MB", peak)


def bench_limits(b: Bench) -> None:
    """9. The drain at concurrency 10 of a queue without settings, with --max-running 8 and
    with a rate that never binds, by a worker of that queue (--queues default), rounds
    interleaved: what admission under a queue's limits costs; and with --max-running 8 by a
    worker of every queue (its claims walk past the full queue's jobs)."""
    count = 5_000 if b.quick else 50_000
    variants = {
        "limits: none": ({}, "default"),
        "limits: max-running 8": ({"max_running": 8}, "default"),
        "limits: rate unbound": ({"rate": "1000000/h"}, "default"),
        "limits: max-running 8, any queue": ({"max_running": 8}, "*"),
    }
    for _ in range(b.runs):
        for name, (settings, queues) in variants.items():
            b.reset()
            b.fill(count)
            if settings:
                with b.connection() as conn:
                    claude_jobs.set_queue_limits(conn, "default", **settings)
            b.run_burst("--concurrency", "10", "--queues", queues)
            assert b.count("succeeded") == count
            b.record(name, "jobs/s", b.drain_rate())


def bench_peer(b: Bench) -> None:
    """12. Side by side: the raw-SQL floor, claude-jobs' drain at concurrency 10 and the peer,
    pgqueuer (asyncpg, its defaults, its own no-op entrypoint, one worker process: the `bench`
    extra), 50,000 no-op jobs each on the same database, rounds interleaved; then the same
    three with one core kept busy by another process for the whole round (rates from each
    one's own timestamps: first job taken to last one done)."""
    count = 5_000 if b.quick else 50_000
    for _ in range(b.runs):
        for label, busy in (("", False), (", busy core", True)):
            with busy_core() if busy else contextlib.nullcontext():
                b.record(f"side by side: floor{label}", "jobs/s", floor_drain(b, count))
                b.reset()
                b.fill(count)
                b.run_burst("--concurrency", "10")
                b.record(f"side by side: claude-jobs c10{label}", "jobs/s", b.drain_rate())
                b.record(f"side by side: pgqueuer{label}", "jobs/s", pgqueuer_drain(b, count))


@contextlib.contextmanager
def busy_core() -> Iterator[None]:
    """Another process keeping one core busy (a Python loop), for as long as the block runs."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def pgqueuer_drain(b: Bench, count: int) -> float:
    """pgqueuer's drain of ``count`` no-op jobs (benchmarks/bench_pgq.py), in jobs/s from its
    log table: its first job picked to its last one done."""
    import asyncio

    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries

    async def fill() -> None:
        connection = await asyncpg.connect(b.url)
        queries = Queries(AsyncpgDriver(connection))
        if not await connection.fetchval("SELECT to_regclass('pgqueuer') IS NOT NULL"):
            await queries.install()
        await connection.execute("TRUNCATE pgqueuer, pgqueuer_log")
        await queries.enqueue(["noop"] * count, [None] * count, [0] * count)
        await connection.execute("VACUUM ANALYZE pgqueuer")
        await connection.close()

    asyncio.run(fill())
    env = {**os.environ, "PGQ_DSN": b.url, "PYTHONPATH": str(HERE)}
    with open(b.workdir / "pgqueuer.log", "ab") as out:
        subprocess.run([sys.executable, str(HERE / "bench_pgq.py")], env=env, stdout=out,
                       stderr=subprocess.STDOUT, check=True, timeout=600)  # fmt: skip
    with b.connection() as conn:
        done, first, last = conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'successful'), "
            "min(created) FILTER (WHERE status = 'picked'), "
            "max(created) FILTER (WHERE status = 'successful') FROM pgqueuer_log"
        ).fetchone()
    assert done == count, f"pgqueuer ran {done} of {count} jobs"
    return count / (last - first).total_seconds()


def bench_floor(b: Bench) -> None:
    """6. The same drain as the simplest raw SQL loop: claim a batch with SKIP LOCKED (the
    batch as large as the worker's concurrency, 10), mark it done, on one connection."""
    count = 5_000 if b.quick else 50_000
    for _ in range(b.runs):
        b.record("floor", "jobs/s", floor_drain(b, count))


#: The floor's claim: the simplest that takes what the worker's claim would (10 at a time).
FLOOR_CLAIM = """WITH batch AS (
    SELECT id FROM claude_jobs
    WHERE status = 'queued' AND blocked IS NULL AND run_at <= now()
    ORDER BY priority DESC, run_at, seq LIMIT 10
    FOR UPDATE SKIP LOCKED)
UPDATE claude_jobs j SET status = 'running', started_at = now()
FROM batch WHERE j.id = batch.id RETURNING j.id"""
FLOOR_DONE = "UPDATE claude_jobs SET status = 'succeeded', finished_at = now() WHERE id = ANY(%s)"


def floor_drain(b: Bench, count: int) -> float:
    """The floor's drain of ``count`` no-op jobs, in jobs/s (wall time of the loop)."""
    b.reset()
    b.fill(count)
    with b.connection() as conn:
        started = time.perf_counter()
        while rows := conn.execute(FLOOR_CLAIM).fetchall():
            conn.execute(FLOOR_DONE, [[row[0] for row in rows]])
        return count / (time.perf_counter() - started)


def bench_claude(b: Bench) -> None:
    """3. The claude handler with a fake claude that exits at once, against spawning that
    executable as often with the same parallelism."""
    count = 300 if b.quick else 2_000
    concurrency = 10
    for _ in range(b.runs):
        b.reset()
        with b.connection() as conn:
            claude_jobs.enqueue_many(
                conn, [{"prompt": "bench", "cwd": str(b.workdir)}] * count, concurrency_limit=0
            )
        b.run_burst("--concurrency", str(concurrency), "--claude-bin", str(b.fake_claude))
        assert b.count("succeeded") == count
        b.record("claude", "jobs/s", b.drain_rate())

        def spawn(_: int) -> None:
            subprocess.run(
                [str(b.fake_claude), *claude_jobs.CLAUDE_ARGS, claude_jobs.SKIP_PERMISSIONS],
                input=b"bench", capture_output=True, cwd=b.workdir, start_new_session=True,
                check=True,
            )  # fmt: skip

        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(spawn, range(count)))
        b.record("raw spawn", "spawns/s", count / (time.perf_counter() - started))


#: Where the tests install the real Claude Code CLI (tests/conftest.py, real_claude).
REAL_CLAUDE = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    / "claude-jobs-tests" / "node_modules" / ".bin" / "claude"
)  # fmt: skip

#: The real claude, run by a job through this wrapper: it appends when claude started and
#: ended (seconds since the epoch, as the database's timestamps) to a file of its own.
TIMED_CLAUDE = """#!/bin/bash
started=$EPOCHREALTIME
{claude} "$@"
code=$?
echo "$started $EPOCHREALTIME" >> {times}
exit $code
"""

SLOW_CLAUDE = """#!/bin/sh
cat > /dev/null
echo '{"type":"system","subtype":"init","session_id":"bench"}'
sleep 5
echo '{"type":"result","subtype":"success","is_error":false,"result":"ok",'\
'"session_id":"bench","total_cost_usd":0,"num_turns":1}'
"""


def bench_claude_real(b: Bench) -> None:
    """13. The time a claude job adds to a bare `claude -p` run: the real CLI (the tests'
    copy) against a local mock of the Messages API, a bare run and a job in turn, one at a
    time (a worker at concurrency 1, waiting, takes each job as it is enqueued): claude's
    part of a job from the database's timestamps, and a job from its enqueue to its end.
    Claude's own run varies by more than a job adds to it, so the job runs claude through a
    wrapper that notes when claude started and ended: what the job adds is its time less
    claude's own, pair by pair (the wrapper's own start counts as added)."""
    cli = Path(os.environ.get("CLAUDE_JOBS_TEST_CLAUDE") or REAL_CLAUDE)
    if not cli.exists():
        print(f"  skipped: no Claude Code CLI at {cli} (the real_claude tests install it)")
        return
    sys.path.insert(0, str(HERE.parent / "tests"))
    from mock_messages_api import MockMessagesAPI, Text

    count = 5 if b.quick else 20
    home, project = b.workdir / "claude-home", b.workdir / "claude-project"
    home.mkdir(exist_ok=True)
    project.mkdir(exist_ok=True)
    times = b.workdir / "claude-times"
    timed = b.workdir / "claude-timed"
    timed.write_text(
        TIMED_CLAUDE.format(claude=shlex.quote(str(cli)), times=shlex.quote(str(times)))
    )
    timed.chmod(0o755)
    argv = [str(cli), *claude_jobs.CLAUDE_ARGS, claude_jobs.SKIP_PERMISSIONS]
    with MockMessagesAPI([Text("done")]) as api:  # (its last reply repeats: every turn)
        variables = {**api.env(), "HOME": str(home), "CLAUDE_CODE_MAX_RETRIES": "0"}
        with mock.patch.dict(os.environ, variables):  # (the bare runs' and b.worker's)

            def bare() -> float:
                started = time.perf_counter()
                done = subprocess.run(
                    argv, input=b"say done", capture_output=True, cwd=project,
                    env=dict(os.environ), start_new_session=True, check=False,
                )  # fmt: skip
                took = time.perf_counter() - started
                lines = done.stdout.decode(errors="replace").strip().splitlines()
                last = json.loads(lines[-1]) if lines else {}
                if done.returncode != 0 or last.get("is_error") is not False:
                    raise SystemExit(f"a bare claude run failed: {done.stderr[-500:]!r}")
                return took

            def job(conn: psycopg.Connection) -> tuple[float, float, float]:
                queued = claude_jobs.enqueue(conn, {"prompt": "say done", "cwd": str(project)})
                b.wait_for(lambda: b.status(queued.id) in ("succeeded", "failed"), 60, "a job")
                row = conn.execute(
                    "SELECT status, started_at, finished_at, created_at FROM claude_jobs "
                    "WHERE id = %s",
                    [queued.id],
                ).fetchone()
                assert row[0] == "succeeded", f"a claude job failed (see {b.workdir})"
                last = times.read_text().replace(",", ".").splitlines()[-1]  # (a locale's comma)
                started, ended = map(float, last.split())
                return (
                    (row[2] - row[1]).total_seconds(),
                    (row[2] - row[3]).total_seconds(),
                    ended - started,
                )

            for _ in range(b.runs):
                b.reset()
                worker = b.worker("--concurrency", "1", "--claude-bin", str(timed))
                try:
                    b.wait_for(lambda: b.count_workers() == 1, 30, "the worker to register")
                    bare()  # (warm-up: node's caches, claude's first-run files in HOME)
                    alone, inside, whole, own = [], [], [], []
                    with b.connection() as conn:
                        job(conn)  # (warm-up)
                        for _ in range(count):
                            alone.append(bare())
                            run, queued_to_end, claude_alone = job(conn)
                            inside.append(run)
                            whole.append(queued_to_end)
                            own.append(claude_alone)
                finally:
                    worker.terminate()
                    worker.wait()
                added = statistics.median(run - mine for run, mine in zip(inside, own, strict=True))
                b.record("claude bare", "s", statistics.median(alone))
                b.record("claude in claude-jobs", "s", statistics.median(inside))
                b.record("claude in claude-jobs, claude's own run", "s", statistics.median(own))
                b.record("claude in claude-jobs, enqueue to end", "s", statistics.median(whole))
                b.record("claude added by the job", "ms", added * 1000)
                b.record("claude overhead", "fraction", added / statistics.median(alone))
                b.record(
                    "claude overhead, ratio of medians",
                    "fraction",
                    statistics.median(inside) / statistics.median(alone) - 1,
                )


def bench_claude_memory(b: Bench) -> None:
    """14. The memory a running claude job adds beyond claude's own processes: its
    supervisor's (resident, proportional and private) and the worker's growth, five fake
    claudes of 5 s running at once."""
    slow = b.workdir / "claude-slow"
    slow.write_text(SLOW_CLAUDE)
    slow.chmod(0o755)
    running = 5
    for _ in range(b.runs):
        b.reset()
        worker = b.worker("--concurrency", str(running), "--claude-bin", str(slow),
                          log="claude-memory.log")  # fmt: skip
        try:
            b.wait_for(lambda: b.count_workers() == 1, 30, "the worker to register")
            time.sleep(2.0)
            idle = rss_mb(worker.pid)
            with b.connection() as conn:
                claude_jobs.enqueue_many(
                    conn, [{"prompt": "bench", "cwd": str(b.workdir)}] * running,
                    concurrency_limit=0,
                )  # fmt: skip
            b.wait_for(
                lambda w=worker: len(_supervisors(w.pid)) == running, 30, "five claude jobs to run"
            )
            time.sleep(1.0)  # (claude's first line in; still 4 s to go)
            rollups = [_smaps_rollup(pid) for pid in _supervisors(worker.pid)]
            busy = rss_mb(worker.pid)
            assert len(rollups) == running and b.count("running") == running
            for name, field in (("rss", "Rss"), ("pss", "Pss"), ("uss", "Private")):
                b.record(f"supervisor {name}", "MB",
                         statistics.mean(r[field] for r in rollups) / 1024)  # fmt: skip
            b.record("worker rss per running claude job", "MB", (busy - idle) / running)
            b.wait_for(lambda: b.count("succeeded") == running, 60, "the slow claude jobs")
        finally:
            worker.terminate()
            worker.wait()


def _supervisors(worker: int) -> list[int]:
    """The worker's children that are claude supervisors (python -I -S -c, _supervised)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent == worker and (entry / "cmdline").read_bytes().split(b"\0")[1:4] == [
                b"-I", b"-S", b"-c"
            ]:  # fmt: skip
                found.append(int(entry.name))
    return found


def _smaps_rollup(pid: int) -> dict[str, int]:
    """A process's Rss, Pss and Private (clean + dirty) memory in kB."""
    fields: dict[str, int] = {"Private": 0}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        kilobytes = int(rest.split()[0])
        fields[name] = kilobytes
        if name in ("Private_Clean", "Private_Dirty"):
            fields["Private"] += kilobytes
    return fields


def bench_long_line(b: Bench) -> None:
    """8. The worker's CPU time to take in one line of 400 MB from claude (the transcript
    keeps its first 64 KiB): linear in the line's length, not quadratic."""
    megabytes = 40 if b.quick else 400
    command = ["sh", "-c", f"head -c {megabytes * 1_000_000} /dev/zero | tr '\\0' x; echo"]
    for _ in range(b.runs):
        context = claude_jobs.RunContext(uuid.uuid4(), 1, None, 600)
        stream = claude_jobs._ClaudeStream(context)
        started = time.process_time()
        claude_jobs._run_process(
            command, cwd=str(b.workdir), env=os.environ, stdin=b"", context=context,
            on_line=stream.feed, kill_grace=1,
        )  # fmt: skip
        b.record(f"one {megabytes} MB line", "s CPU", time.process_time() - started)


STREAMER = """#!{python}
import base64, json, os, sys, time
sys.stdin.read()
print(json.dumps({{"type": "system", "subtype": "init", "session_id": "bench"}}), flush=True)
for n in range({lines}):
    text = base64.b64encode(os.urandom(3000)).decode()  # (4,000 characters that hardly compress)
    print(json.dumps({{"type": "assistant", "message": {{"content": [
        {{"type": "text", "text": text}}]}}}}), flush=True)
    time.sleep({interval})
print(json.dumps({{"type": "result", "subtype": "success", "is_error": False, "result": "ok",
                  "session_id": "bench", "total_cost_usd": 0, "num_turns": 1}}), flush=True)
"""


def bench_transcript(b: Bench) -> None:
    """10. Five claude jobs at once that each stream 2.4 MB over 30 s (600 assistant lines of
    4,000 random base64 characters, a fake claude): the WAL PostgreSQL writes per byte of
    transcript, and what the jobs' tables grew by."""
    lines = 120 if b.quick else 600
    streamer = b.workdir / "streamer"
    streamer.write_text(STREAMER.format(python=sys.executable, lines=lines, interval=0.05))
    streamer.chmod(0o755)
    for _ in range(b.runs):
        b.reset()
        with b.connection() as conn:
            conn.execute("CHECKPOINT")
            sizes = ("SELECT pg_total_relation_size('claude_jobs') + coalesce("
                     "pg_total_relation_size(to_regclass('claude_jobs_output')), 0)")  # fmt: skip
            before_size = conn.execute(sizes).fetchone()[0]
            claude_jobs.enqueue_many(
                conn, [{"prompt": "stream", "cwd": str(b.workdir)}] * 5, concurrency_limit=0
            )
            wal = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        b.run_burst("--concurrency", "5", "--claude-bin", str(streamer))
        with b.connection() as conn:
            written, transcript = conn.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s), sum(transcript_size) "
                "FROM claude_jobs",
                [wal],
            ).fetchone()
            grown = conn.execute(sizes).fetchone()[0] - before_size
        assert b.count("succeeded") == 5
        b.record("transcript WAL / byte", "ratio", float(written) / float(transcript))
        b.record("transcript tables grew", "MB", grown / 1e6)


def bench_upgrade(b: Bench) -> None:
    """11. The upgrade to transcripts in chunks (migration 17) of a database of 1,000,000 jobs
    (100,000 of them with a 10 kB transcript in their row) while a worker's statements keep
    writing jobs: how long `claude-jobs migrate` takes, and the longest a write waits."""
    import threading

    count = 100_000 if b.quick else 1_000_000
    with b.connection() as conn:
        conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        claude_jobs.migrate(conn, claude_jobs.MIGRATIONS[:-1])
        conn.execute(
            """INSERT INTO claude_jobs (kind, payload, status, finished_at, transcript,
                   transcript_size)
               SELECT 'noop', '{}', CASE WHEN n %% 10 = 0 THEN 'queued' ELSE 'succeeded' END,
                   CASE WHEN n %% 10 = 0 THEN NULL ELSE now() END,
                   CASE WHEN n %% 10 = 1 THEN repeat(md5(n::text), 320) END,
                   CASE WHEN n %% 10 = 1 THEN 10240 ELSE 0 END
               FROM generate_series(1, %s) n""",
            [count],
        )
        conn.execute("VACUUM ANALYZE claude_jobs")
        ids = [row[0] for row in conn.execute("SELECT id FROM claude_jobs LIMIT 1000")]
    waits: list[float] = []
    stop = threading.Event()

    def writer() -> None:  # (a worker's writes: a row updated and committed, again and again)
        with b.connection() as conn:
            while not stop.is_set():
                for job_id in ids:
                    started = time.perf_counter()
                    conn.execute("UPDATE claude_jobs SET updated_at = now() WHERE id = %s",
                                 [job_id])  # fmt: skip
                    waits.append(time.perf_counter() - started)
                    if stop.is_set():
                        break

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(1)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "claude_jobs", "--database-url", b.url, "migrate"],
                   check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(HERE.parent)})  # fmt: skip
    took = time.perf_counter() - started
    time.sleep(1)
    stop.set()
    thread.join()
    b.record("upgrade 1M: migrate", "s", took)
    b.record("upgrade 1M: longest write", "ms", max(waits) * 1000)
    b.reset()


def bench_latency(b: Bench) -> None:
    """4. An idle worker; 500 jobs enqueued 10 ms apart; start minus enqueue. Then the same
    for the floor: a loop that LISTENs and, woken, claims with the floor's statements."""
    count = 100 if b.quick else 500
    for _ in range(b.runs):
        b.reset()
        worker = b.worker("--concurrency", "10")
        try:
            b.wait_for(lambda: b.count_workers() == 1, 30, "the worker to register")
            time.sleep(1.0)  # idle: no poll is due soon, so NOTIFY is what wakes it
            latencies = enqueue_trickle(b, count)
        finally:
            worker.terminate()
            worker.wait()
        for p in (50, 95, 99):
            b.record(f"latency p{p}", "ms", float(percentile(latencies, p)))
        b.reset()
        stop = threading.Event()
        listener = threading.Thread(target=floor_listener, args=(b, stop))
        listener.start()
        try:
            time.sleep(1.0)
            latencies = enqueue_trickle(b, count)
        finally:
            stop.set()
            listener.join()
        for p in (50, 99):
            b.record(f"floor latency p{p}", "ms", float(percentile(latencies, p)))


def enqueue_trickle(b: Bench, count: int) -> list[float]:
    """Enqueue ``count`` no-op jobs 10 ms apart; once all ran, each one's start minus its
    enqueue, in ms."""
    with b.connection() as conn:
        for n in range(count):
            claude_jobs.enqueue(conn, {"n": n}, kind="noop")
            time.sleep(0.01)
    b.wait_for(lambda: b.count("succeeded") == count, 60, "the jobs to run")
    with b.connection() as conn:
        query = "SELECT extract(epoch FROM started_at - created_at) * 1000 FROM claude_jobs"
        return [float(row[0]) for row in conn.execute(query)]


def floor_listener(b: Bench, stop: threading.Event) -> None:
    """The floor's pickup: LISTEN for new jobs, and, woken, claim (and finish) what is ready."""
    with b.connection() as conn:
        conn.execute(f"LISTEN {claude_jobs.NOTIFY_CHANNEL}")
        while not stop.is_set():
            if list(conn.notifies(timeout=0.2, stop_after=1)):  # (the connection is free after)
                while rows := conn.execute(FLOOR_CLAIM).fetchall():
                    conn.execute(FLOOR_DONE, [[row[0] for row in rows]])


def bench_backlog(b: Bench) -> None:
    """5. Drain rate and claim-query time with 10,000 queued, and with 1,000,000 queued plus
    1,000,000 finished jobs in the table: each state in a database of its own, filled once,
    the two drains taken in turn (the same 10,000 jobs queued again after each)."""
    measured = 5_000 if b.quick else 10_000
    big = 100_000 if b.quick else 1_000_000
    states = (
        ("10k", "claude_jobs_bench_10k", measured, 0),
        ("1M", "claude_jobs_bench_1m", big, big),
    )
    try:
        for _label, database, queued, finished in states:
            with b.database(database):
                print(f"  (filling: {queued:,} queued, {finished:,} finished)", flush=True)
                b.reset()
                b.fill(finished, status="succeeded")
                b.fill(queued)
                with b.connection() as conn:
                    conn.execute("VACUUM ANALYZE claude_jobs")
        for _ in range(b.runs):
            for label, database, _queued, finished in states:
                with b.database(database):
                    _backlog_drain(b, label, finished + measured, measured)
    finally:
        with b.connection() as conn:
            for _label, database, _queued, _finished in states:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(database)))


def _backlog_drain(b: Bench, label: str, goal: int, measured: int) -> None:
    """The claim query's time, then a drain of ``measured`` jobs until ``goal`` have
    succeeded; the drained jobs are queued again as they were (a finished job of the fill has
    no start, so the drain's rate counts the drained ones only)."""
    b.record(f"claim query {label}", "ms", claim_query_ms(b))
    b.record(f"claim query {label}, generic plan", "ms", claim_query_ms(b, generic=True))
    if b.jit:  # what a worker would pay per claim without turning JIT off
        b.record(
            f"claim query {label}, generic plan, JIT on",
            "ms",
            claim_query_ms(b, generic=True, jit=True),
        )
    with b.connection() as conn:
        conn.execute("DELETE FROM claude_jobs_workers")
    worker = b.worker("--concurrency", "10")
    try:
        b.wait_for(lambda: b.count("succeeded") >= goal, 600, "the backlog drain")
    finally:
        worker.terminate()
        worker.wait()
    b.record(f"backlog {label}", "jobs/s", b.drain_rate(limit=measured))
    with b.connection() as conn:  # the same jobs queued again, and the table vacuumed
        conn.execute(
            "UPDATE claude_jobs SET status = 'queued', attempts = 0, started_at = NULL, "
            "finished_at = NULL WHERE started_at IS NOT NULL"
        )
        conn.execute("VACUUM ANALYZE claude_jobs")


def bench_blocked(b: Bench) -> None:
    """8. The claim query with 100,000 jobs blocked (one directory's key busy, and jobs waiting
    for a running job) in front of 10 ready ones of higher run_at."""
    blocked = 20_000 if b.quick else 100_000
    b.reset()
    with b.connection() as conn:
        running = conn.execute(
            """INSERT INTO claude_jobs (kind, payload, status, concurrency_key, key_held)
               VALUES ('noop', '{}', 'running', 'repo', true) RETURNING id"""
        ).fetchone()[0]
        conn.execute(
            """INSERT INTO claude_jobs (kind, payload, concurrency_key, after, blocked, run_at)
               SELECT 'noop', '{"prompt": "bench"}',
                      CASE WHEN i %% 2 = 0 THEN 'repo' END,
                      CASE WHEN i %% 2 = 1 THEN ARRAY[%s::uuid] END,
                      CASE WHEN i %% 2 = 0 THEN 'key' ELSE 'jobs' END,
                      now() - interval '1 hour'
               FROM generate_series(1, %s) AS i""",
            [running, blocked],
        )
        b.fill(10)
        conn.execute("VACUUM ANALYZE claude_jobs")
    for _ in range(b.runs):
        b.record("claim query, 100k blocked", "ms", claim_query_ms(b))
        b.record("claim query, 100k blocked, generic plan", "ms", claim_query_ms(b, generic=True))


def bench_list(b: Bench) -> None:
    """9. Wall time of `claude-jobs list` with a database URL (10,000 jobs in the table),
    interpreter start-up and import included."""
    b.reset()
    b.fill(5_000, status="succeeded")
    b.fill(5_000)
    # The console script, as people run it (its bytecode cached: see main).
    command = [str(Path(sys.executable).parent / "claude-jobs"), "--database-url", b.url, "list"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    for _ in range(b.runs):
        times = []
        for _ in range(7):
            started = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            times.append((time.perf_counter() - started) * 1000)
        b.record("list", "ms", statistics.median(times))


def bench_batch(b: Bench) -> None:
    """11. A 10,000-job batch's progress (get_batch: counts by status, cost, times, callbacks;
    what `batch show`, `batch list` and the dashboard read), half its jobs ended, among
    200,000 other jobs: the median of 51 calls, round trip included."""
    b.reset()
    b.fill(100_000)
    b.fill(100_000, status="succeeded")
    with b.connection() as conn:
        ids = claude_jobs.enqueue_many(
            conn, [{"n": n} for n in range(10_000)], kind="noop", batch="bench",
            on_finish={"then": "summary"},
        )  # fmt: skip
        for status, chunk in (("succeeded", ids[:4000]), ("failed", ids[4000:5000])):
            conn.execute(
                "UPDATE claude_jobs SET status = %s, cost_usd = 0.01, started_at = now(), "
                "finished_at = now() WHERE id = ANY(%s)",
                [status, list(chunk)],
            )
        conn.execute("VACUUM ANALYZE claude_jobs")
        for _ in range(b.runs):
            times = []
            for _ in range(51):
                started = time.perf_counter()
                batch = claude_jobs.get_batch(conn, "bench")
                times.append((time.perf_counter() - started) * 1000)
            assert batch.jobs == 10_000 and batch.ended == 5_000
            b.record("batch progress 10k", "ms", statistics.median(times))


def bench_web(b: Bench) -> None:
    """10. `claude-jobs serve` at 1M queued + 1M finished jobs: the API, a job, /metrics, the
    overview, `stats` and `list`; then 200 event streams following one running job."""
    import asyncio

    import httpx2 as httpx

    big = 20_000 if b.quick else 1_000_000
    b.reset()
    print(f"  (filling: {big:,} queued, {big:,} finished over 14 days, 0.1% failed)", flush=True)
    b.fill(big)
    with b.connection() as conn:
        conn.execute(
            """INSERT INTO claude_jobs (kind, payload, status, created_at, started_at,
                   finished_at, queue)
               SELECT 'noop', '{"prompt": "bench"}',
                      CASE WHEN n %% 1000 = 0 THEN 'failed' ELSE 'succeeded' END,
                      t - interval '1 minute',
                      t - interval '30 seconds', t, 'q' || (n %% 4)
               FROM generate_series(1, %s) n,
                    LATERAL (SELECT now() - (n * interval '14 days') / %s AS t) at""",
            [big, big],
        )
        conn.execute("VACUUM ANALYZE claude_jobs")
        claude_jobs.fold_counts(conn)
        some_job = conn.execute("SELECT id FROM claude_jobs ORDER BY random() LIMIT 1").fetchone()
    port = 18080
    log = open(b.workdir / "serve.log", "ab")  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-m", "claude_jobs", "--database-url", b.url, "serve", "--port",
         str(port)], stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        b.wait_for(lambda: _answers(f"{base}/readyz"), 30, "serve to answer")
        with httpx.Client(base_url=base, timeout=30) as client:
            for name, path in (("api jobs", "/api/jobs"),
                               ("api jobs queued", "/api/jobs?status=queued"),
                               ("api jobs failed", "/api/jobs?status=failed"),
                               ("api jobs search", "/api/jobs?q=bench"),
                               ("api job", f"/api/jobs/{some_job[0]}"),
                               ("metrics", "/metrics"), ("api stats", "/api/stats")):  # fmt: skip
                times = _request_times(client, path, 20 if b.quick else 200)
                b.record(f"{name} p50", "ms", percentile(times, 50))
                b.record(f"{name} p99", "ms", percentile(times, 99))
        # What `stats` and `list` ask of the database (their own work: the interpreter's
        # start, the same at any size, is in the wall times below)
        with b.connection() as conn:
            for name, work in (
                ("stats 2M", lambda: (claude_jobs.queue_stats(conn), claude_jobs.list_holds(conn))),
                ("list 2M", lambda: claude_jobs.explain_jobs(conn, claude_jobs.list_jobs(conn))),
            ):
                times = []
                for _ in range(20):
                    started = time.perf_counter()
                    work()
                    times.append((time.perf_counter() - started) * 1000)
                b.record(name, "ms", statistics.median(times))
        console = str(Path(sys.executable).parent / "claude-jobs")
        for name, command in (("stats 2M wall", "stats"), ("list 2M wall", "list")):
            times = []
            for _ in range(5):
                started = time.perf_counter()
                subprocess.run([console, "--database-url", b.url, command], check=True,
                               stdout=subprocess.DEVNULL)  # fmt: skip
                times.append((time.perf_counter() - started) * 1000)
            b.record(name, "ms", statistics.median(times))
        delays, connections = asyncio.run(_follow_with_many(b, base, 20 if b.quick else 200))
        b.record("sse delay p50", "ms", percentile(delays, 50))
        b.record("sse delay p99", "ms", percentile(delays, 99))
        b.record("sse db connections", "connections", connections)
        b.record("sse server rss", "MB", rss_mb(server.pid))
    finally:
        server.terminate()
        server.wait()
        log.close()


def _answers(url: str) -> bool:
    import httpx2 as httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _request_times(client: object, path: str, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        response = client.get(path)  # type: ignore[attr-defined]
        response.raise_for_status()
        times.append((time.perf_counter() - started) * 1000)
    return times


async def _follow_with_many(b: Bench, base: str, clients: int) -> tuple[list[float], int]:
    """`clients` streams follow one running job while lines are appended to its transcript
    every 100 ms, as a worker does: how late each line reaches each stream, and how many
    database connections the server holds meanwhile."""
    import asyncio

    import httpx2 as httpx

    with b.connection() as conn:
        job_id = conn.execute(
            "INSERT INTO claude_jobs (kind, payload, status, started_at) VALUES "
            "('claude', '{\"prompt\": \"followed\"}', 'running', now()) RETURNING id"
        ).fetchone()[0]
    delays: list[float] = []
    ready = asyncio.Event()
    opened = 0
    lines = 20 if b.quick else 50

    async def follow(client: httpx.AsyncClient) -> None:
        nonlocal opened
        async with client.stream("GET", f"/api/jobs/{job_id}/events") as response:
            opened += 1
            if opened == clients:
                ready.set()
            seen = 0
            async for line in response.aiter_lines():
                if line.startswith("data: ") and '"lines"' in line:
                    for text in json.loads(line[6:])["lines"]:
                        if text.startswith("t="):
                            delays.append((time.time() - float(text[2:])) * 1000)
                            seen += 1
                if seen >= lines:
                    return

    limits = httpx.Limits(max_connections=clients + 10)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        tasks = [asyncio.create_task(follow(client)) for _ in range(clients)]
        await asyncio.wait_for(ready.wait(), 60)
        await asyncio.sleep(1.0)
        with b.connection() as conn:
            connections = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            ).fetchone()[0]
            for _ in range(lines):
                event = {
                    "type": "assistant",
                    "message": {"content": [{"type": "text", "text": f"t={time.time()}"}]},
                }
                text = json.dumps(event) + "\n"
                conn.execute(  # (as a worker's flush: a chunk, the size)
                    "WITH grown AS (UPDATE claude_jobs SET transcript_size = transcript_size "
                    "+ length(%s) WHERE id = %s RETURNING transcript_size) "
                    "INSERT INTO claude_jobs_output SELECT %s, transcript_size, %s FROM grown",
                    [text, job_id, job_id, text],
                )
                conn.execute("SELECT pg_notify('claude_jobs_output', %s)", [str(job_id)])
                await asyncio.sleep(0.1)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    return delays, connections


def claim_query_ms(b: Bench, generic: bool = False, jit: bool = False) -> float:
    """The median time of the claim query (10 jobs) on a connection set up as the worker's,
    rolled back each time. ``generic``: as a prepared statement with its generic plan, which
    PostgreSQL may pick for a statement psycopg prepares (it estimates LIMIT $n high, so the
    plan's cost passes jit_above_cost); ``jit``: with JIT left on, JIT compilation included."""
    query = claude_jobs.CLAIM_FROM_ANY_QUEUE
    names = ("worker_id", "kinds", "host", "limit", "worker")
    for number, name in enumerate(names, 1):
        query = query.replace(f"%({name})s", f"${number}")
    times = []
    with b.connection() as conn:
        claude_jobs._configure_worker_connection(conn)
        conn.execute(f"SET jit = {'on' if jit else 'off'}")
        conn.execute(f"SET plan_cache_mode = force_{'generic' if generic else 'custom'}_plan")
        conn.execute(f"PREPARE claim (uuid, text[], text, bigint, text) AS {query}")
        worker_id = uuid.uuid4()
        conn.execute(
            "INSERT INTO claude_jobs_workers (id, lock_key, host, pid, queues, kinds, "
            "concurrency) VALUES (%s, -1, 'bench', 0, '{*}', '{noop}', 10)",
            [worker_id],
        )
        for _ in range(5 if jit else 21):
            with contextlib.suppress(_Rollback), conn.transaction():
                plan = conn.execute(
                    "EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE claim "
                    f"('{worker_id}', ARRAY['noop'], 'bench', 10, 'bench')"
                ).fetchone()[0]
                times.append(plan[0]["Execution Time"])
                raise _Rollback
        conn.execute("DELETE FROM claude_jobs_workers WHERE id = %s", [worker_id])
    return statistics.median(times)


class _Rollback(Exception):
    pass


def bench_warm(b: Bench) -> None:
    """9. A warm worker's burst: a worker that ran 30 jobs one at a time on a queue with a
    history (100,000 finished jobs, analyzed: its statistics say no job is queued) drains a
    burst of 20,000, against a fresh worker started on the next such burst (as a ratio)."""
    history = 10_000 if b.quick else 100_000
    burst = 5_000 if b.quick else 20_000
    for _ in range(b.runs):
        b.reset()
        b.fill(history, status="succeeded")
        with b.connection() as conn:
            conn.execute("VACUUM ANALYZE claude_jobs")
            # (no autoanalyze in the middle of a measurement: the worker's own is measured)
            conn.execute("ALTER TABLE claude_jobs SET (autovacuum_enabled = false)")
        try:
            for label, warm in (("warm", True), ("fresh", False)):
                worker = b.worker("--concurrency", "10", log=f"{label}.log")
                try:
                    b.wait_for(lambda: b.count_workers() == 1, 30, "the worker to register")
                    with b.connection() as conn:
                        for n in range(30 if warm else 0):  # a trickle, one at a time
                            job = claude_jobs.enqueue(conn, {"n": n}, kind="noop", queue="trickle")
                            b.wait_for(
                                lambda j=job: b.status(j.id) == "succeeded", 30, "a trickled job"
                            )
                        payloads = [{"n": n} for n in range(burst)]
                        claude_jobs.enqueue_many(conn, payloads, kind="noop", queue=label)
                    b.wait_for(lambda q=label: b.unfinished(q) == 0, 600, f"the {label} burst")
                    b.record(f"{label} burst", "jobs/s", b.queue_rate(label))
                finally:
                    worker.terminate()
                    worker.wait()
        finally:
            with b.connection() as conn:
                conn.execute("ALTER TABLE claude_jobs RESET (autovacuum_enabled)")


def bench_notify(b: Bench) -> None:
    """8. 1,000 no-op jobs with --notify, run by a worker (concurrency 10), their 1,000
    notifications sent to a local receiver: how long from the first job's end to the last
    notification received, and each one's delay after its job ended."""
    import http.server
    import threading

    count = 200 if b.quick else 1_000
    received: list[tuple[float, str]] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append((time.time(), body["data"]["finished_at"]))
            self.send_response(204)
            self.end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    notify = json.dumps({"urls": [f"http://127.0.0.1:{server.server_address[1]}/"], "on": []})
    try:
        for _ in range(b.runs):
            b.reset()
            received.clear()
            with b.connection() as conn:
                conn.execute("TRUNCATE claude_jobs_notifications")
                conn.execute(
                    """INSERT INTO claude_jobs (kind, payload, notify)
                       SELECT 'noop', '{}', %s::jsonb FROM generate_series(1, %s)""",
                    [notify, count],
                )
            worker = b.worker("--concurrency", "10")
            try:
                b.wait_for(lambda: len(received) >= count, 300, "every notification")
            finally:
                worker.terminate()
                worker.wait()
            with b.connection() as conn:
                first = conn.execute("SELECT min(finished_at) FROM claude_jobs").fetchone()[0]
            delays = [(at - datetime.fromisoformat(ended).timestamp()) * 1000
                      for at, ended in received]  # fmt: skip
            took = max(at for at, _ in received) - first.timestamp()
            b.record(f"notify {count}", "s", took)
            b.record("notify delay p50", "ms", percentile(delays, 50))
            b.record("notify delay p99", "ms", percentile(delays, 99))
    finally:
        server.shutdown()


def bench_memory(b: Bench) -> None:
    """7. An idle worker's resident memory (the busy figure comes from the c50 drain)."""
    for _ in range(b.runs):
        b.reset()
        worker = b.worker("--concurrency", "5")
        try:
            b.wait_for(lambda: b.count_workers() == 1, 30, "the worker to register")
            time.sleep(2.0)
            b.record("memory idle", "MB", rss_mb(worker.pid))
        finally:
            worker.terminate()
            worker.wait()


BENCHMARKS: dict[str, Callable[[Bench], None]] = {
    "enqueue": bench_enqueue,
    "drain": bench_drain,
    "floor": bench_floor,
    "claude": bench_claude,
    "latency": bench_latency,
    "backlog": bench_backlog,
    "memory": bench_memory,
    "notify": bench_notify,
    "long_line": bench_long_line,
    "blocked": bench_blocked,
    "list": bench_list,
    "web": bench_web,
    "batch": bench_batch,
    "warm": bench_warm,
    "limits": bench_limits,
    "transcript": bench_transcript,
    "upgrade": bench_upgrade,
    "peer": bench_peer,
    "claude_real": bench_claude_real,
    "claude_memory": bench_claude_memory,
}


def report(b: Bench, started: datetime, settings: dict[str, object]) -> dict[str, object]:
    b.ratio("drain c10 / floor", "drain c10", "floor")
    b.ratio("backlog 1M / 10k", "backlog 1M", "backlog 10k")
    b.ratio("claude / raw spawn", "claude", "raw spawn")
    b.ratio("warm burst / fresh", "warm burst", "fresh burst")
    for busy in ("", ", busy core"):
        ours, peer = f"side by side: claude-jobs c10{busy}", f"side by side: pgqueuer{busy}"
        floor = f"side by side: floor{busy}"
        b.ratio(f"side by side: c10 / pgqueuer{busy}", ours, peer)
        b.ratio(f"side by side: c10 / floor{busy}", ours, floor)
        b.ratio(f"side by side: pgqueuer / floor{busy}", peer, floor)
    b.ratio("latency p50 - floor", "latency p50", "floor latency p50", difference=True)
    b.ratio("max-running 8 / none", "limits: max-running 8", "limits: none")
    b.ratio("rate unbound / none", "limits: rate unbound", "limits: none")
    print(f"\n{'figure':<40} {'median':>12} {'min':>12} {'max':>12}  unit")
    for figure in b.figures.values():
        values = figure.values
        print(
            f"{figure.name:<40} {figure.median:>12,.2f} {min(values):>12,.2f} "
            f"{max(values):>12,.2f}  {figure.unit}"
        )
    print(f"\n{'target':<54} {'measured':>12}  met")
    verdicts = []
    for name, op, target, what in TARGETS:
        if name not in b.figures:
            continue
        value = b.figures[name].median
        met = value >= target if op == ">=" else value <= target if op == "<=" else value < target
        verdicts.append({"figure": name, "target": f"{op} {target}", "value": value, "met": met})
        print(f"{what:<54} {value:>12,.2f}  {'yes' if met else 'NO'}")
    return {
        "date": started.isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "postgresql": b.postgres,
            "psycopg": psycopg.__version__,
        },
        "settings": settings,
        "figures": {name: figure.as_dict() for name, figure in b.figures.items()},
        "targets": verdicts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", help="an empty database to use (default: throwaway)")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (default 3)")
    parser.add_argument("--quick", action="store_true", help="small counts and 1 run")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--json", type=Path, default=HERE / "results.json", help="output file")
    args = parser.parse_args()
    # Every process as installed: pip compiles a package's bytecode as it installs it; without
    # it (PYTHONDONTWRITEBYTECODE set, as on the machines this ran on) every start compiles
    # claude_jobs.py anew, which takes time and leaves about 35 MB more on a worker's heap.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    runs = 1 if args.quick else args.runs
    chosen = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = set(chosen) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark {', '.join(sorted(unknown))}")
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="claude-jobs-bench-") as tmp:
        b = Bench(args.database_url, runs, args.quick, Path(tmp))
        try:
            for name in chosen:
                print(f"{name}: {BENCHMARKS[name].__doc__.splitlines()[0]}", flush=True)
                BENCHMARKS[name](b)
            settings = {"runs": runs, "quick": args.quick, "benchmarks": chosen}
            result = report(b, started, settings)
        finally:
            b.close()
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
