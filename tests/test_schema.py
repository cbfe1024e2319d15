"""The schema: migrations.sql matches the module, and migrate is versioned, idempotent,
safe to run concurrently and upgrades an older schema in place."""

import threading
from pathlib import Path

import psycopg
from click.testing import CliRunner

import claude_jobs

ROOT = Path(__file__).parent.parent


def test_migrations_sql_is_the_schema_of_the_module() -> None:
    assert (ROOT / "migrations.sql").read_text() == claude_jobs.schema_sql()


def test_migrate_print_sql_prints_migrations_sql() -> None:
    result = CliRunner().invoke(claude_jobs.cli, ["migrate", "--print-sql"])
    assert result.exit_code == 0
    assert result.output == (ROOT / "migrations.sql").read_text()


def test_migrate_records_the_version_and_is_idempotent(unmigrated: psycopg.Connection) -> None:
    unmigrated.autocommit = True
    assert claude_jobs.schema_version(unmigrated) is None
    assert claude_jobs.migrate(unmigrated) == (None, claude_jobs.SCHEMA_VERSION)
    assert claude_jobs.schema_version(unmigrated) == claude_jobs.SCHEMA_VERSION
    claude_jobs.enqueue(unmigrated, {"prompt": "keep me"})
    assert claude_jobs.migrate(unmigrated) == (claude_jobs.SCHEMA_VERSION,) * 2
    versions = unmigrated.execute("SELECT version FROM claude_jobs_schema").fetchall()
    assert versions == [(v,) for v, _ in claude_jobs.MIGRATIONS]
    assert unmigrated.execute("SELECT count(*) FROM claude_jobs").fetchone() == (1,)


def test_concurrent_migrates_apply_each_version_once(unmigrated: psycopg.Connection) -> None:
    url = unmigrated.info.dsn
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def run() -> None:
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                start.wait()
                claude_jobs.migrate(conn)
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    unmigrated.autocommit = True
    assert claude_jobs.schema_version(unmigrated) == claude_jobs.SCHEMA_VERSION
    count = unmigrated.execute("SELECT count(*) FROM claude_jobs_schema").fetchone()
    assert count == (len(claude_jobs.MIGRATIONS),)


def test_migrate_upgrades_an_older_schema_in_place(unmigrated: psycopg.Connection) -> None:
    unmigrated.autocommit = True
    claude_jobs.migrate(unmigrated)
    job = claude_jobs.enqueue(unmigrated, {"prompt": "survive the upgrade"})
    newer = (
        *claude_jobs.MIGRATIONS,
        (claude_jobs.SCHEMA_VERSION + 1, "ALTER TABLE claude_jobs ADD COLUMN label text;"),
    )
    before, after = claude_jobs.migrate(unmigrated, newer)
    assert (before, after) == (claude_jobs.SCHEMA_VERSION, claude_jobs.SCHEMA_VERSION + 1)
    row = unmigrated.execute("SELECT payload, label FROM claude_jobs WHERE id = %s", [job.id])
    assert row.fetchone() == ({"prompt": "survive the upgrade"}, None)
    # the code of the older version now refuses to run on the newer schema
    try:
        claude_jobs.check_schema(unmigrated)
    except claude_jobs.SchemaError as error:
        assert "newer than this claude-jobs" in str(error)
    else:
        raise AssertionError("check_schema accepted a newer schema")


def test_commands_ask_for_migrate_when_the_schema_is_missing(
    pg_server, unmigrated: psycopg.Connection
) -> None:
    url = pg_server.url(unmigrated.info.dbname)
    result = CliRunner().invoke(
        claude_jobs.cli, ["--database-url", url, "enqueue", "--payload", '{"prompt": "x"}']
    )
    assert result.exit_code == 1
    assert result.output == (
        "Error: this database has no claude-jobs schema: run `claude-jobs migrate`\n"
    )
    result = CliRunner().invoke(claude_jobs.cli, ["--database-url", url, "migrate"])
    assert result.exit_code == 0, result.output
    assert f"from version none to {claude_jobs.SCHEMA_VERSION}" in result.output


def test_commands_ask_for_migrate_when_the_schema_is_older(db_url: str, conn) -> None:
    conn.execute("DELETE FROM claude_jobs_schema WHERE version = %s", [claude_jobs.SCHEMA_VERSION])
    result = CliRunner().invoke(claude_jobs.cli, ["--database-url", db_url, "show", "x"])
    assert result.exit_code == 1
    assert result.output == (
        f"Error: the database schema is version {claude_jobs.SCHEMA_VERSION - 1}, this "
        f"claude-jobs needs {claude_jobs.SCHEMA_VERSION}: run `claude-jobs migrate`\n"
    )


def test_a_version_1_database_is_upgraded_in_place_with_its_jobs(
    unmigrated: psycopg.Connection,
) -> None:
    unmigrated.autocommit = True
    claude_jobs.migrate(unmigrated, claude_jobs.MIGRATIONS[:1])
    job_id = unmigrated.execute(
        """INSERT INTO claude_jobs (payload, status, transcript)
           VALUES ('{"prompt": "from version 1"}', 'failed', 'old output') RETURNING id"""
    ).fetchone()[0]
    assert claude_jobs.migrate(unmigrated) == (1, claude_jobs.SCHEMA_VERSION)
    job = claude_jobs.get_job(unmigrated, job_id)
    assert (job.payload, job.status, job.transcript) == (
        {"prompt": "from version 1"}, "failed", "old output",
    )  # fmt: skip
    assert (job.transcript_size, job.cancel_requested_at) == (0, None)
    assert claude_jobs.needs_you(unmigrated) == (0, []), "what ended before is not news"
    assert claude_jobs.retry_jobs(unmigrated, [job_id]) == [job_id]


def test_migration_4_brings_due_times_no_client_could_read_back_within_range(
    unmigrated: psycopg.Connection,
) -> None:
    unmigrated.autocommit = True
    claude_jobs.migrate(unmigrated, claude_jobs.MIGRATIONS[:3])
    unmigrated.execute(
        "INSERT INTO claude_jobs (payload, run_at) VALUES ('{}', '0001-01-01 00:00+14'), "
        "('{}', '9999-12-31 23:59:59-14')"
    )
    claude_jobs.migrate(unmigrated)
    days = unmigrated.execute("SELECT run_at::text FROM claude_jobs ORDER BY run_at").fetchall()
    assert [day[0][:10] for day in days] == ["0001-01-02", "9999-12-30"]
