"""Where the time goes: the measurements behind the misses reported in the README.

    python benchmarks/profiles.py                 # all of them, on a throwaway PostgreSQL
    python benchmarks/profiles.py drain spawn     # some of them

drain    a worker's CPU per no-op job, with and without its log lines, and its busiest functions
rounds   the dispatcher's rounds while 20,000 no-op jobs drain: how many, how long, how full
sql      what PostgreSQL spends on a round's statements (EXPLAIN ANALYZE: claim, record of 20)
spawn    starting the fake claude: bare, under the supervisor, and through the worker's runner
enqueue  enqueue_many of 100,000 jobs under cProfile
backlog  claim and completion round trips while draining 10,000 jobs from 10k and 1M backlogs,
         and the waits of the worker's PostgreSQL backends meanwhile
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import cProfile
import logging
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import bench_handlers  # noqa: E402
from bench import FAKE_CLAUDE  # noqa: E402

import claude_jobs  # noqa: E402


def server(workdir: Path) -> Any:
    import pgserver

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pgserver.get_server(workdir / f"pg-{uuid.uuid4().hex[:8]}", cleanup_mode="delete")


def fresh(url: str, queued: int, finished: int = 0) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        claude_jobs.migrate(conn)
        conn.execute("TRUNCATE claude_jobs, claude_jobs_output, claude_jobs_workers")
        for status, count in (("succeeded", finished), ("queued", queued)):
            conn.execute(
                """INSERT INTO claude_jobs (kind, payload, status, finished_at)
                   SELECT 'noop', '{}', %s, CASE WHEN %s <> 'queued' THEN now() END
                   FROM generate_series(1, %s)""",
                [status, status, count],
            )
        conn.execute("VACUUM ANALYZE claude_jobs")


@contextlib.contextmanager
def timed(calls: list[tuple[float, int, Any]], cls: type, name: str) -> Iterator[None]:
    """Meanwhile, record every call of cls.name: its duration, the length of its first list
    argument, and what it returned."""
    original = getattr(cls, name)

    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        result = original(self, *args, **kwargs)
        items = next((len(arg) for arg in args if isinstance(arg, list)), 0)
        calls.append((time.perf_counter() - started, items, result))
        return result

    setattr(cls, name, wrapper)
    try:
        yield
    finally:
        setattr(cls, name, original)


def drain_in_process(url: str, count: int, until: int | None = None) -> float:
    """Drain with a Worker in this process (concurrency 10); returns jobs per second."""
    worker = claude_jobs.Worker(url, handlers={"noop": bench_handlers.noop}, concurrency=10)
    thread = threading.Thread(target=worker.run)
    started = time.perf_counter()
    thread.start()
    with psycopg.connect(url, autocommit=True) as conn:
        query = "SELECT count(*) FROM claude_jobs WHERE status = 'succeeded'"
        while conn.execute(query).fetchone()[0] < (until or count):
            time.sleep(0.05)
    elapsed = time.perf_counter() - started
    worker.stop()
    thread.join()
    return count / elapsed


def profile_drain(workdir: Path) -> None:
    """CPU of the worker per no-op job, with and without logging; its busiest functions."""
    srv = server(workdir)
    url = srv.get_uri()
    count = 20_000
    for label, log in (("without log lines", False), ("with its INFO log lines", True)):
        fresh(url, count)
        logging.getLogger().handlers.clear()
        if log:
            devnull = open(os.devnull, "w")  # noqa: SIM115
            stderr, sys.stderr = sys.stderr, devnull
            claude_jobs.configure_logging("text")
        else:
            logging.getLogger("claude_jobs").setLevel(logging.WARNING)
        before = resource.getrusage(resource.RUSAGE_SELF)
        rate = drain_in_process(url, count)
        after = resource.getrusage(resource.RUSAGE_SELF)
        if log:
            sys.stderr = stderr
            logging.getLogger().handlers.clear()
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        print(f"  {label}: {rate:,.0f} jobs/s, {cpu / count * 1e6:.0f} µs of worker CPU a job")
    try:
        import yappi  # thread-aware; cProfile would see the calling thread only
    except ImportError:
        print("  (pip install yappi to see the busiest functions across the worker's threads)")
        srv.cleanup()
        return
    fresh(url, count)
    logging.getLogger("claude_jobs").setLevel(logging.WARNING)
    yappi.set_clock_type("cpu")
    yappi.start()
    drain_in_process(url, count)
    yappi.stop()
    print("  busiest functions across the worker's threads (own CPU time, under yappi):")
    functions = yappi.get_func_stats()
    functions.sort("tsub")
    for entry in list(functions)[:12]:
        where = f"{Path(entry.module).name}:{entry.lineno} {entry.name}"
        print(f"    {entry.tsub:6.2f}s {entry.ncall:8d}  {where}")
    srv.cleanup()


def profile_rounds(workdir: Path) -> None:
    """The dispatcher's rounds (record what finished, claim, one round trip) while a worker
    at concurrency 10 drains 20,000 no-op jobs: their number, their time (the Python around
    the statements included) and how many jobs each wrote and claimed."""
    srv = server(workdir)
    url = srv.get_uri()
    fresh(url, 20_000)
    logging.getLogger("claude_jobs").setLevel(logging.WARNING)
    calls: list[tuple[float, int, Any]] = []
    with timed(calls, claude_jobs._Writer, "round"):  # (its result: statuses, claimed rows)
        started = time.perf_counter()
        rate = drain_in_process(url, 20_000)
        elapsed = time.perf_counter() - started
    rounds = [(seconds, written, len(result[1])) for seconds, written, result in calls]
    times = [r[0] * 1000 for r in rounds]
    median = statistics.median(times)
    print(
        f"  {rate:,.0f} jobs/s; {len(rounds):,} rounds, median {median:.2f} ms, "
        f"p95 {sorted(times)[len(times) * 95 // 100]:.2f} ms; "
        f"{statistics.mean(r[1] for r in rounds):.1f} written and "
        f"{statistics.mean(r[2] for r in rounds):.1f} claimed a round; "
        f"{sum(times) / 1000 / elapsed:.0%} of the drain's time in rounds"
    )
    srv.cleanup()


def profile_sql(workdir: Path) -> None:
    """EXPLAIN ANALYZE of a claim of 20 jobs and of the record of their 20 outcomes (as the
    worker's connections run them), five times each: execution time and its triggers'."""
    srv = server(workdir)
    url = srv.get_uri()
    fresh(url, 20_000)
    worker_id = uuid.uuid4()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO claude_jobs_workers (id, lock_key, host, pid, queues, kinds, concurrency)"
            " VALUES (%s, 1, 'bench', 1, '{*}', '{noop}', 10)",
            [worker_id],
        )
    timings: dict[str, list[float]] = defaultdict(list)

    def note(label: str, plan: list[tuple[str]]) -> None:
        for (line,) in plan:
            if line.startswith("Execution Time"):
                timings[f"{label}: execution"].append(float(line.split()[2]))
            elif line.startswith("Trigger"):
                name = line.split()[1]
                timings[f"{label}: trigger {name}"].append(float(line.split("time=")[1].split()[0]))

    with psycopg.connect(url) as conn:
        claude_jobs._configure_worker_connection(conn)
        for _ in range(5):
            params = {"worker_id": worker_id, "worker": "bench", "host": "bench",
                      "kinds": ["noop"], "queue": None, "limit": 20}  # fmt: skip
            explain = "EXPLAIN (ANALYZE) " + claude_jobs.CLAIM_FROM_ANY_QUEUE
            note("claim of 20", conn.execute(explain, params).fetchall())
            claimed = conn.execute(
                "SELECT id, claim FROM claude_jobs WHERE status = 'running' AND worker_id = %s",
                [worker_id],
            ).fetchall()
            conn.commit()
            done = claude_jobs.Outcome(claude_jobs.Verdict.SUCCEEDED, result="null")
            rows = [claude_jobs._Row(job_id, claim, done, claude_jobs.Progress())
                    for job_id, claim in claimed]  # fmt: skip
            text, names = claude_jobs._positional(claude_jobs.RECORD)
            values = claude_jobs._record_params(rows, "bench")
            plan = psycopg.RawCursor(conn).execute(
                "EXPLAIN (ANALYZE) " + text, [values[name] for name in names]
            )
            note("record of 20", plan.fetchall())
            conn.commit()
    for label, values in timings.items():
        print(f"  {label}: median {statistics.median(values):.2f} ms")
    srv.cleanup()


def profile_spawn(workdir: Path) -> None:
    """Starting the fake claude 300 times, 10 at a time: what each layer costs."""
    fake = workdir / "claude"
    fake.write_text(FAKE_CLAUDE)
    fake.chmod(0o755)
    argv = [str(fake), *claude_jobs.CLAUDE_ARGS, claude_jobs.SKIP_PERMISSIONS]

    def bare(_: int) -> None:
        subprocess.run(argv, input=b"x", capture_output=True, start_new_session=True)

    def supervised(_: int) -> None:
        read, write = claude_jobs._pipe(1)
        told, report = claude_jobs._pipe(0)
        command = claude_jobs._supervised(argv, read, report, None, 1.0)
        subprocess.run(
            command, input=b"x", capture_output=True, start_new_session=True,
            pass_fds=(read, report),
        )  # fmt: skip
        for fd in (read, write, told, report):
            os.close(fd)

    def runner(_: int) -> None:
        context = claude_jobs.RunContext(uuid.uuid4(), 1, None, 60)
        claude_jobs._run_process(
            argv, cwd=str(workdir), env=os.environ, stdin=b"x", context=context,
            on_line=lambda line: None, kill_grace=1,
        )  # fmt: skip

    cases: list[tuple[str, Callable[[int], None]]] = [
        ("subprocess.run", bare),
        ("subprocess.run under the supervisor", supervised),
        ("the worker's process runner", runner),
    ]
    for label, spawn in cases:
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            list(pool.map(spawn, range(300)))
        print(f"  {label}: {300 / (time.perf_counter() - started):,.0f} spawns/s")


def profile_enqueue(workdir: Path) -> None:
    """enqueue_many of 100,000 payloads under cProfile."""
    srv = server(workdir)
    with psycopg.connect(srv.get_uri(), autocommit=True) as conn:
        claude_jobs.migrate(conn)
        payloads = [{"prompt": f"job {n}"} for n in range(100_000)]
        profiler = cProfile.Profile()
        profiler.enable()
        claude_jobs.enqueue_many(conn, payloads)
        profiler.disable()
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:8]  # type: ignore[attr-defined]
    for (filename, line, function), (_, calls, own, _total, _) in rows:
        print(f"    {own:6.2f}s {calls:8d}  {Path(filename).name}:{line} {function}")
    srv.cleanup()


def profile_backlog(workdir: Path) -> None:
    """Claim and completion round trips while 10,000 jobs drain from each backlog, and what
    the worker's PostgreSQL backends were doing meanwhile (sampled every millisecond)."""
    logging.getLogger("claude_jobs").setLevel(logging.WARNING)
    for label, queued, finished in (("10k", 10_000, 0), ("1M", 1_000_000, 1_000_000)):
        srv = server(workdir)
        url = srv.get_uri()
        fresh(url, queued, finished)
        calls: list[tuple[float, int, Any]] = []
        with timed(calls, claude_jobs._Writer, "round"), sampled_waits(url) as waits:
            rate = drain_in_process(url, 10_000, until=finished + 10_000)
        print(f"  {label} backlog: {rate:,.0f} jobs/s")
        durations = [seconds * 1000 for seconds, _, _ in calls]
        print(
            f"    round (record and claim): median {statistics.median(durations):.2f} ms, "
            f"mean {statistics.mean(durations):.2f} ms, "
            f"p95 {sorted(durations)[len(durations) * 95 // 100]:.2f} ms"
        )
        busy = sum(waits.events.values())
        print(
            f"    backends busy: {busy:,} samples; WAL written {waits.wal_bytes / 1e6:.1f} MB "
            f"in {waits.wal_syncs:,} fsyncs of {waits.wal_sync_ms / max(waits.wal_syncs, 1):.2f} ms"
        )
        for what, samples in waits.events.most_common(4):
            print(f"      {what}: {samples / busy:.0%}")
        srv.cleanup()


@dataclass
class Waits:
    """What the busy backends of a claude-jobs worker were found doing, sample by sample (on
    the CPU, or their wait event), and the WAL written meanwhile."""

    events: collections.Counter[str] = field(default_factory=collections.Counter)
    wal_bytes: int = 0
    wal_syncs: int = 0  # the WAL's fsyncs, and the time they took (track_wal_io_timing)
    wal_sync_ms: float = 0.0


@contextlib.contextmanager
def sampled_waits(url: str) -> Iterator[Waits]:
    """Meanwhile, every millisecond, sample what the worker's backends are doing; and the
    WAL written and its fsyncs (the server's own counts, pg_stat_wal)."""
    waits = Waits()
    stop = threading.Event()
    query = """SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU')
               FROM pg_stat_activity WHERE state = 'active' AND pid <> pg_backend_pid()
               AND application_name LIKE 'claude-jobs%' AND datname = current_database()"""

    def sample() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            while not stop.wait(0.001):
                waits.events.update(event for (event,) in conn.execute(query).fetchall())

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET track_wal_io_timing = on")  # (a throwaway server)
        conn.execute("SELECT pg_reload_conf()")
        wal = "SELECT pg_current_wal_lsn() - '0/0', wal_sync, wal_sync_time FROM pg_stat_wal"
        before = conn.execute(wal).fetchone()
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            yield waits
        finally:
            stop.set()
            sampler.join()
            after = conn.execute(wal).fetchone()
            waits.wal_bytes = int(after[0] - before[0])
            waits.wal_syncs = after[1] - before[1]
            waits.wal_sync_ms = after[2] - before[2]


PROFILES = {
    "drain": profile_drain,
    "rounds": profile_rounds,
    "sql": profile_sql,
    "spawn": profile_spawn,
    "enqueue": profile_enqueue,
    "backlog": profile_backlog,
}


def main() -> None:
    chosen = sys.argv[1:] or list(PROFILES)
    with tempfile.TemporaryDirectory(prefix="claude-jobs-profile-") as tmp:
        for name in chosen:
            print(f"{name}: {PROFILES[name].__doc__}", flush=True)
            PROFILES[name](Path(tmp))


if __name__ == "__main__":
    main()
