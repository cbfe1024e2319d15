BEGIN;
-- The claude-jobs schema, version 17.
-- Generated from claude_jobs.MIGRATIONS by `claude-jobs migrate --print-sql`; do not edit.
-- Safe to run again and to run on an older claude-jobs schema: each version is applied once.
-- One migration at a time (the lock lasts until the end of the transaction):
SELECT pg_advisory_xact_lock(1667919714, 0);
CREATE TABLE IF NOT EXISTS claude_jobs_schema (
    version     integer PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- version 1
DO $migration_1$ BEGIN
IF NOT EXISTS (SELECT 1 FROM claude_jobs_schema WHERE version = 1) THEN
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
INSERT INTO claude_jobs_schema (version) VALUES (1);
END IF;
END $migration_1$;

-- version 2
DO $migration_2$ BEGIN
IF NOT EXISTS (SELECT 1 FROM claude_jobs_schema WHERE version = 2) THEN
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
INSERT INTO claude_jobs_schema (version) VALUES (2);
END IF;
END $migration_2$;

-- version 3
DO $migration_3$ BEGIN
IF NOT EXISTS (SELECT 1 FROM claude_jobs_schema WHERE version = 3) THEN
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
INSERT INTO claude_jobs_schema (version) VALUES (3);
END IF;
END $migration_3$;

-- version 4
DO $migration_4$ BEGIN
IF NOT EXISTS (SELECT 1 FROM claude_jobs_schema WHERE version = 4) THEN
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
INSERT INTO claude_jobs_schema (version) VALUES (4);
END IF;
END $migration_4$;

-- version 5
DO $migration_5$ BEGIN
IF NOT EXISTS (SELECT 1 FROM claude_jobs_schema WHERE version = 5) THEN
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
INSERT INTO claude_jobs_schema (version) VALUES (5);
END IF;
END $migration_5$;

-- version 6
DO $migration_6$ BEGIN
IF NOT EXISTS (SELECT 1 FROM claude_jobs_schema WHERE version = 6) THEN
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
INSERT INTO claude_jobs_schema (version) VALUES (6);
END IF;
END $migration_6$;

-- version 7
DO $migration_7$ BEGIN
IF NOT EXISTS (SELECT 1 FROM claude_jobs_schema WHERE version = 7) THEN
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
INSERT INTO claude_jobs_schema (version) VALUES (7);
END IF;
END $migration_7$;

-- version 8
DO $migration_8$ BEGIN
IF NOT EXISTS (SELECT 1 FROM claude_jobs_schema WHERE version = 8) THEN
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
INSERT INTO claude_jobs_schema (version) VALUES (8);
END IF;
END $migration_8$;

-- version 9
DO $migration_9$ BEGIN
IF NOT EXISTS (SELECT 1 FROM claude_jobs_schema WHERE version = 9) THEN
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
INSERT INTO claude_jobs_schema (version) VALUES (9);
END IF;
END $migration_9$;

-- version 10
DO $migration_10$ BEGIN
IF NOT EXISTS (SELECT 1 FROM claude_jobs_schema WHERE version = 10) THEN
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
INSERT INTO claude_jobs_schema (version) VALUES (10);
END IF;
END $migration_10$;

-- version 11
DO $migration_11$ BEGIN
IF NOT EXISTS (SELECT 1 FROM claude_jobs_schema WHERE version = 11) THEN
-- A concurrency limit of 0 means no key: enqueue stores none then, and the table says so, once
-- for every statement (which look at the key alone from now on).
UPDATE claude_jobs SET concurrency_key = NULL
WHERE concurrency_limit = 0 AND concurrency_key IS NOT NULL;
ALTER TABLE claude_jobs ADD CONSTRAINT claude_jobs_no_key_without_a_limit
    CHECK (concurrency_limit > 0 OR concurrency_key IS NULL);
INSERT INTO claude_jobs_schema (version) VALUES (11);
END IF;
END $migration_11$;

-- version 12
DO $migration_12$ BEGIN
IF NOT EXISTS (SELECT 1 FROM claude_jobs_schema WHERE version = 12) THEN
-- The last mile: a job's checks (the round it is in, each check's result per round), and its
-- delivery (the branch pushed, its pull request and what became of it).
ALTER TABLE claude_jobs ADD COLUMN checks jsonb, ADD COLUMN delivery jsonb;
-- Workers look at the open pull requests now and then through this one (few rows).
CREATE INDEX claude_jobs_open_pull_requests ON claude_jobs ((delivery->'pr'->>'polled_at'))
    WHERE delivery->'pr'->>'state' = 'open';
INSERT INTO claude_jobs_schema (version) VALUES (12);
END IF;
END $migration_12$;

-- version 13
DO $migration_13$ BEGIN
IF NOT EXISTS (SELECT 1 FROM claude_jobs_schema WHERE version = 13) THEN
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
            'prompt', left(split_part(NEW.payload->>'prompt', E'
', 1), 300),
            'result', left(split_part(CASE jsonb_typeof(NEW.result) WHEN 'object'
                                      THEN NEW.result->>'result' END, E'
', 1), 300),
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
INSERT INTO claude_jobs_schema (version) VALUES (13);
END IF;
END $migration_13$;

-- version 14
DO $migration_14$ BEGIN
IF NOT EXISTS (SELECT 1 FROM claude_jobs_schema WHERE version = 14) THEN
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
        'prompt', left(split_part(NEW.payload->>'prompt', E'
', 1), 300),
        'result', left(split_part(CASE jsonb_typeof(NEW.result) WHEN 'object'
                                  THEN NEW.result->>'result' END, E'
', 1), 300),
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
INSERT INTO claude_jobs_schema (version) VALUES (14);
END IF;
END $migration_14$;

-- version 15
DO $migration_15$ BEGIN
IF NOT EXISTS (SELECT 1 FROM claude_jobs_schema WHERE version = 15) THEN
-- Tags: labels a job is enqueued with (enqueue --tag), to find and count its kind of work
-- (list --tag, stats --tag). Only tagged jobs are in the index.
ALTER TABLE claude_jobs ADD COLUMN tags text[];
CREATE INDEX claude_jobs_tags ON claude_jobs USING gin (tags) WHERE tags IS NOT NULL;
INSERT INTO claude_jobs_schema (version) VALUES (15);
END IF;
END $migration_15$;

-- version 16
DO $migration_16$ BEGIN
IF NOT EXISTS (SELECT 1 FROM claude_jobs_schema WHERE version = 16) THEN
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
INSERT INTO claude_jobs_schema (version) VALUES (16);
END IF;
END $migration_16$;

-- version 17
DO $migration_17$ BEGIN
IF NOT EXISTS (SELECT 1 FROM claude_jobs_schema WHERE version = 17) THEN
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
INSERT INTO claude_jobs_schema (version) VALUES (17);
END IF;
END $migration_17$;
COMMIT;
