"""pgqueuer's side of the peer benchmark (`bench.py --only peer`): its own no-op entrypoint,
its defaults, the asyncpg driver; run as one worker process that drains the queue and exits,
as `pgq run bench_pgq:create --mode drain` would (pgqueuer 1.6.0's CLI fails on its own
--log-level default here, so the same supervisor is started without it)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import asyncpg
from pgqueuer import AsyncpgDriver, PgQueuer
from pgqueuer.models import Job


@contextlib.asynccontextmanager
async def create() -> AsyncIterator[PgQueuer]:
    connection = await asyncpg.connect(os.environ["PGQ_DSN"])
    pgq = PgQueuer(AsyncpgDriver(connection))

    @pgq.entrypoint("noop")
    async def noop(job: Job) -> None:
        pass

    try:
        yield pgq
    finally:
        await connection.close()


if __name__ == "__main__":
    import pgqueuer
    from pgqueuer.adapters.cli.cli import asyncio_run
    from pgqueuer.domain.types import QueueExecutionMode

    asyncio_run(pgqueuer.run(create, mode=QueueExecutionMode.drain))
