"""The fast tier: pure functions, no database and no process (`pytest -m "not slow"`)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import claude_jobs
from claude_jobs import (
    Job,
    JobFailed,
    JobStatus,
    Outcome,
    PermanentError,
    Postpone,
    Spend,
    UsageLimitReached,
    Verdict,
    WorkerUnfit,
    backoff_delay,
    claude_outcome,
    decide,
    parse_duration,
)

FIXTURES = Path(__file__).parent / "fixtures" / "claude-cli"
NOW = datetime(2030, 3, 17, 12, 0, tzinfo=UTC)


def a_job(**fields: Any) -> Job:
    values: dict[str, Any] = {
        "id": uuid.uuid4(), "queue": "default", "kind": "claude", "priority": 0,
        "payload": {"prompt": "p"}, "status": JobStatus.QUEUED, "run_at": NOW, "attempts": 1,
        "max_attempts": 3, "timeout": None, "last_error": None, "errors": [], "worker_id": None,
        "worker": None, "result": None, "session_id": None, "cost_usd": 0.0,
        "created_at": NOW, "started_at": None, "finished_at": None, "updated_at": NOW,
    }  # fmt: skip
    return Job(**{**values, **fields})


# -- what an attempt comes to ----------------------------------------------------------------


def test_a_returned_value_succeeds_with_its_json() -> None:
    assert decide(a_job(), value={"answer": 42}) == Outcome(
        Verdict.SUCCEEDED, result='{"answer": 42}'
    )


def test_a_value_json_cannot_hold_fails_for_good() -> None:
    outcome = decide(a_job(), value=object())
    assert outcome.verdict == Verdict.FAILED and outcome.permanent


def test_an_exception_fails_the_attempt_with_its_type_and_the_retry_delay() -> None:
    outcome = decide(a_job(), error=ValueError("bad"), trace="Traceback...", retry_delay=7.5)
    assert outcome.verdict == Verdict.FAILED
    assert (outcome.error, outcome.traceback, outcome.delay) == (
        "ValueError: bad",
        "Traceback...",
        7.5,
    )
    assert not outcome.permanent


def test_job_failed_keeps_its_message_and_result_and_permanent_error_is_for_good() -> None:
    outcome = decide(a_job(), error=JobFailed("claude failed", result={"cost": 1}))
    assert (outcome.error, json.loads(outcome.result)) == ("claude failed", {"cost": 1})
    assert decide(a_job(), error=PermanentError("no cwd")).permanent


def test_a_lost_claim_writes_nothing_whatever_the_handler_did() -> None:
    for kwargs in ({"value": 1}, {"error": ValueError()}, {"error": PermanentError()}):
        assert decide(a_job(), stop=claude_jobs.STOP_LOST, **kwargs).verdict == Verdict.ABANDONED


def test_a_cancel_cancels_a_job_that_stopped_on_it_but_not_one_that_finished() -> None:
    stopped = decide(a_job(), error=RuntimeError("killed"), stop=claude_jobs.STOP_CANCEL)
    assert stopped.verdict == Verdict.CANCELLED
    assert decide(a_job(), value=1, stop=claude_jobs.STOP_CANCEL).verdict == Verdict.SUCCEEDED


def test_a_job_given_back_and_claimed_again_in_one_round_stays_known_to_the_worker() -> None:
    """The round that writes an attempt's release may claim the same job again: writing the
    first attempt must not forget the second (the worker would put it back as unknown)."""
    book, job = claude_jobs._Book(), a_job()
    first = claude_jobs._Attempt(job, claude_jobs.RunContext(job.id, 1, uuid.uuid4()))
    book.begin(first)
    first.outcome = Outcome(Verdict.RELEASED, quiet=True)
    book.finish(first)
    second = claude_jobs._Attempt(job, claude_jobs.RunContext(job.id, 1, uuid.uuid4()))
    book.begin(second)  # (claimed again by the round that writes the first's release)
    book.forget(first)  # (that release written)
    assert book.get(job.id) is second
    second.outcome = None  # a runner's bug: the attempt is dropped, its own
    book.finish(second)
    assert not book.knows(job.id)


def test_jobs_are_claimed_ahead_only_while_attempts_are_quick_and_withdrawn_unstarted() -> None:
    """Claim-ahead: none until attempts have shown they are quick, none once they are slow;
    a job no runner took can be withdrawn (then no runner starts it), one a runner took
    cannot."""
    book = claude_jobs._Book()
    assert book.ahead(10) == 0  # nothing ran yet

    def handed() -> claude_jobs._Attempt:
        job = a_job()
        attempt = claude_jobs._Attempt(job, claude_jobs.RunContext(job.id, 1, uuid.uuid4()))
        book.begin(attempt)
        return attempt

    quick = handed()
    assert book.start(quick)
    quick.outcome = Outcome(Verdict.SUCCEEDED)
    book.finish(quick)
    assert book.ahead(10) == 10
    taken, waiting = handed(), handed()
    assert book.start(taken)
    assert book.counts()[1] == 2
    assert book.withdraw(handed_before=waiting.started) == []  # (not waited long enough)
    assert book.withdraw(handed_before=None) == [waiting]
    assert not book.start(waiting)  # a runner that picks it up later leaves it
    assert book.counts()[1] == 1 and book.knows(
        waiting.job.id
    )  # written as released, then forgotten
    taken.started -= 1.0  # it took a second: attempts are not quick any more
    taken.outcome = Outcome(Verdict.SUCCEEDED)
    book.finish(taken)
    assert book.ahead(10) == 0


def test_a_forced_shutdown_puts_the_job_back_unspent() -> None:
    outcome = decide(a_job(), error=RuntimeError("killed"), stop=claude_jobs.STOP_SHUTDOWN)
    assert outcome == Outcome(Verdict.RELEASED)
    interrupted = decide(a_job(), error=claude_jobs._Interrupted())
    assert interrupted == Outcome(Verdict.RELEASED)


def test_a_postponement_goes_back_unspent_at_its_time_and_a_usage_limit_later_still() -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    outcome = decide(a_job(), error=Postpone("busy", run_at=later), jitter=30)
    assert (outcome.verdict, outcome.run_at, outcome.quiet) == (Verdict.RELEASED, later, True)
    limited = decide(a_job(), error=UsageLimitReached("limit", run_at=later), jitter=30)
    assert limited.run_at == later + timedelta(seconds=30)
    assert decide(a_job(), error=WorkerUnfit("not logged in")).run_at is None


def test_what_an_outcome_does_to_the_worker_is_decided_with_it() -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    limited = decide(a_job(), error=UsageLimitReached("limit", run_at=later), jitter=30)
    assert (limited.effect, limited.until) == (claude_jobs.Effect.HOLD_EVERYWHERE, later)
    assert decide(a_job(), error=WorkerUnfit("not logged in")).effect == claude_jobs.Effect.BACK_OFF
    assert decide(a_job(), value=1).effect == claude_jobs.Effect.FIT
    lost = decide(a_job(), error=WorkerUnfit("not logged in"), stop=claude_jobs.STOP_LOST)
    assert (lost.verdict, lost.effect) == (Verdict.ABANDONED, claude_jobs.Effect.BACK_OFF)
    lost = decide(
        a_job(), error=UsageLimitReached("limit", run_at=later), stop=claude_jobs.STOP_LOST
    )
    assert (lost.verdict, lost.effect, lost.until) == (
        Verdict.ABANDONED, claude_jobs.Effect.HOLD_EVERYWHERE, later)  # fmt: skip
    assert decide(a_job(), value=1, stop=claude_jobs.STOP_LOST).effect is None
    for kwargs in ({"error": ValueError()}, {"error": Postpone("busy")},
                   {"error": RuntimeError(), "stop": claude_jobs.STOP_SHUTDOWN}):  # fmt: skip
        assert decide(a_job(), **kwargs).effect is None


def test_what_a_claude_exit_means_if_claude_never_ran_or_was_stopped() -> None:
    exit_ = claude_jobs._ProcessExit
    with pytest.raises(WorkerUnfit, match="cannot run claude"):
        claude_outcome(exit_(127, "", cannot_run="cannot run claude: No such file"), None, [])
    with pytest.raises(claude_jobs._Interrupted):
        claude_outcome(exit_(-15, "", stopped=claude_jobs.STOP_SHUTDOWN), None, [])
    with pytest.raises(JobFailed, match="its lease ran out"):
        claude_outcome(exit_(-9, "", lease_ran_out=True), None, [])


def test_a_postponement_into_an_unreachable_future_is_brought_within_reach() -> None:
    outcome = decide(a_job(), error=Postpone("later", run_at=datetime(9999, 12, 31, tzinfo=UTC)))
    assert outcome.run_at is not None
    limit = datetime.now(UTC) + timedelta(seconds=claude_jobs.MAX_DURATION + 60)
    assert outcome.run_at < limit


def test_what_postgresql_cannot_store_is_replaced() -> None:
    outcome = decide(a_job(), error=ValueError("nul \x00 and \ud800"))
    assert "\x00" not in outcome.error and "\ud800" not in outcome.error


# -- retries, durations, money -----------------------------------------------------------------


def test_backoff_doubles_to_its_maximum_with_up_to_ten_percent_jitter() -> None:
    for attempt, expected in ((1, 5), (2, 10), (3, 20), (7, 300), (1000, 300)):
        for _ in range(50):
            assert expected <= backoff_delay(attempt, 5, 300) <= expected * 1.1


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("1.5", 1.5), ("30s", 30), ("5m", 300), ("1h30m", 5400), ("2d", 172800),
     ("250ms", 0.25), (" 1H ", 3600)],
)  # fmt: skip
def test_durations_read_as_people_write_them(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "5x", "m", "-5m", "1e999"])
def test_a_bad_duration_is_invalid_input(text: str) -> None:
    with pytest.raises(claude_jobs.InvalidJob, match="duration"):
        parse_duration(text)


def test_money_reads_to_the_cent_and_below_a_cent_to_four_digits() -> None:
    assert claude_jobs._money(0) == "$0.00"
    assert claude_jobs._money(1234.5) == "$1,234.50"
    assert claude_jobs._money(0.000235) == "$0.0002350"


# -- what claude says ----------------------------------------------------------------------


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def ended(returncode: int = 0, stderr: str = "", **fields: Any) -> Any:
    return claude_jobs._ProcessExit(returncode, stderr, **fields)


def test_a_successful_run_is_its_result_object() -> None:
    result = fixture("mock-success.json")
    assert claude_outcome(ended(), result, []) is result


def test_turn_and_budget_limits_fail_for_good() -> None:
    for name in ("max-turns.json", "max-budget.json"):
        with pytest.raises(PermanentError, match="claude stopped: error_max"):
            claude_outcome(ended(1), fixture(name), [])


def test_a_worker_that_is_not_logged_in_or_has_no_credit_is_unfit_not_the_job() -> None:
    for name in ("not-logged-in.json", "invalid-api-key.json", "credit-too-low.json"):
        with pytest.raises(WorkerUnfit):
            claude_outcome(ended(1), fixture(name), [])


def test_api_trouble_fails_the_attempt_for_a_retry() -> None:
    for name in ("server-error-500.json", "overloaded-529.json"):
        with pytest.raises(JobFailed) as raised:
            claude_outcome(ended(1), fixture(name), [])
        assert type(raised.value) is JobFailed


def test_a_usage_limit_postpones_to_its_reset() -> None:
    text = (FIXTURES / "usage-limit.txt").read_text().strip()
    with pytest.raises(UsageLimitReached) as raised:
        claude_outcome(ended(1), None, [text])
    assert raised.value.run_at == datetime(2030, 3, 17, 17, 46, tzinfo=UTC)


def test_a_timeout_and_a_silent_death_fail_with_what_happened() -> None:
    with pytest.raises(JobFailed, match="timed out"):
        claude_outcome(ended(-15, timed_out=True), None, [])
    with pytest.raises(JobFailed, match="killed by signal 9 without a result: oops"):
        claude_outcome(ended(-9, "oops\n"), None, [])


def test_reset_times_without_a_date_are_the_next_such_moment() -> None:
    now = datetime(2030, 3, 17, 18, 0, tzinfo=UTC)
    assert claude_jobs._reset_time("5pm", "UTC", now) == datetime(2030, 3, 18, 17, tzinfo=UTC)
    assert claude_jobs._reset_time("7:30pm", "UTC", now) == datetime(
        2030, 3, 17, 19, 30, tzinfo=UTC
    )
    assert claude_jobs._reset_time("5pm", "Not/AZone", now) is None


def test_spend_per_model_from_a_result_object() -> None:
    spends = Spend.of_result(fixture("max-turns.json"))
    assert [(s.model, s.runs, s.input_tokens) for s in spends] == [("claude-opus-5-5", 1, 100)]
    assert sum(s.cost_usd for s in spends) == pytest.approx(0.0005)
    assert Spend.of_result({}) == []  # (nothing said, nothing spent)


def test_lines_are_split_in_linear_time_and_cut_at_the_limit() -> None:
    lines: list[bytes] = []
    splitter = claude_jobs._LineSplitter(lines.append, limit=10)
    for chunk in (b"one\ntw", b"o\n", b"x" * 25, b"y\nlast"):
        splitter.feed(chunk)
    splitter.flush()
    assert lines[:2] == [b"one", b"two"]
    assert lines[2] == b"x" * 10 + " … (16 more bytes of this line not kept)".encode()
    assert lines[3:] == [b"last"]


# -- continuations and worktrees ----------------------------------------------------------------


def test_widening_names_what_a_continuation_may_do_that_its_job_could_not() -> None:
    before = {"permission_mode": "plan", "allowed_tools": ["Read"], "max_turns": 5}
    after = {"permission_mode": "acceptEdits", "allowed_tools": ["Read", "Bash"], "max_turns": 5}
    widened = claude_jobs._widening(before, after)
    assert any("permission_mode" in phrase for phrase in widened)
    assert any("Bash" in phrase for phrase in widened)
    assert claude_jobs._widening(before, before) == []
    assert claude_jobs._widening(after, before) == []  # narrower is not wider


def test_a_worktree_record_is_trusted_only_as_claude_jobs_writes_them() -> None:
    good = {"repo": "/r", "path": "/r/.wt", "branch": "claude-jobs/0123456789ab", "base": "a" * 40}
    assert claude_jobs._checked_record(good)["branch"] == "claude-jobs/0123456789ab"
    for bad in ({"path": "relative"}, {"branch": "main"}, {"base": "--force"}):
        with pytest.raises(claude_jobs._GitError):
            claude_jobs._checked_record({**good, **bad})


# -- one source for options ------------------------------------------------------------------


def test_the_keywords_of_enqueue_are_the_fields_of_job_options_and_a_delay() -> None:
    fields = {f.name for f in dataclasses.fields(claude_jobs.JobOptions)}
    assert set(claude_jobs.JobSettings.__annotations__) == fields | {"delay"}


def test_job_options_are_built_with_the_fields_defaults_and_a_delay_becomes_run_at() -> None:
    options = claude_jobs.JobOptions.build(delay=timedelta(minutes=5), after=["x"])
    assert options.queue == "default" and options.after == ("x",) and options.max_attempts == 5
    assert options.run_at is not None and options.run_at > datetime.now(UTC)
    with pytest.raises(claude_jobs.InvalidJob, match="not a job option"):
        claude_jobs.JobOptions.build(colour="red")  # type: ignore[call-arg]
    with pytest.raises(claude_jobs.InvalidJob, match="not both"):
        claude_jobs.JobOptions.build(delay=1, run_at=datetime.now(UTC))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"priority": "high"}, "priority must be an integer, not a string"),
        ({"max_attempts": 2.5}, "max_attempts must be an integer, not a number"),
        ({"timeout": True}, "timeout must be a number, not a boolean"),
        ({"timeout": [1]}, "timeout must be a number, not an array"),
        ({"delay": "soon"}, "delay must be a number or a timedelta, not a string"),
        ({"after": "abc"}, "after must be a list of job ids, not a string"),
        ({"after": [1]}, "each of after must be an id or a string, not a number"),
        ({"queue": None}, "queue must be a string, not null"),
        ({"batch": "b", "on_finish": [1]}, "on_finish must be an object, not an array"),
    ],
)
def test_job_options_of_the_wrong_type_say_which(settings: dict[str, Any], message: str) -> None:
    """Settings come from TOML and JSON too: a wrong type is InvalidJob, not a TypeError."""
    with pytest.raises(claude_jobs.InvalidJob) as raised:
        claude_jobs.JobOptions.build(**settings)
    assert str(raised.value) == message


def test_job_options_take_a_whole_float_for_an_integer() -> None:
    assert claude_jobs.JobOptions.build(priority=3.0, max_attempts=2.0).priority == 3


def test_worker_settings_are_checked_when_made() -> None:
    with pytest.raises(claude_jobs.ConfigError, match="concurrency"):
        claude_jobs.WorkerSettings(concurrency=0)
    with pytest.raises(claude_jobs.ConfigError, match="poll interval"):
        claude_jobs.WorkerSettings(poll_interval=-1)
    with pytest.raises(claude_jobs.ConfigError, match="not a worker setting"):
        claude_jobs.Worker("postgresql://localhost/x", colour="red")


def test_every_setting_with_a_flag_is_an_option_of_its_command() -> None:
    commands = [("enqueue", claude_jobs.JobOptions), ("worker", claude_jobs.WorkerSettings),
                ("worker", claude_jobs.ClaudeSettings)]  # fmt: skip
    for command, settings in commands:
        options = {p.name for p in claude_jobs.cli.commands[command].params}
        flagged = {f.name for f in dataclasses.fields(settings) if "flag" in f.metadata}
        assert flagged <= options, command


def test_the_claude_settings_of_a_worker_are_keywords_of_the_claude_handler() -> None:
    keywords = inspect.signature(claude_jobs.ClaudeHandler).parameters
    assert {f.name for f in dataclasses.fields(claude_jobs.ClaudeSettings)} <= set(keywords)


# -- the HTTP face ------------------------------------------------------------------------------


def test_a_page_cursor_names_the_exact_moment_and_job() -> None:
    moment = datetime(2026, 12, 2, 15, 4, 5, 123456, tzinfo=UTC)
    job = claude_jobs.Job.from_row(
        {"id": uuid.uuid4(), "queue": "q", "kind": "claude", "priority": 0, "payload": {},
         "status": "queued", "run_at": moment, "attempts": 0, "max_attempts": 1,
         "errors": [], "cost_usd": 0, "created_at": moment, "updated_at": moment}
    )  # fmt: skip
    assert claude_jobs._parse_cursor(claude_jobs._cursor_text(job)) == (moment, 0, job.id)
    for bad in ("", "12", "x.y", f"1e400.1.{uuid.uuid4()}", f"12.{uuid.uuid4()}"):
        with pytest.raises(claude_jobs._HTTPError) as raised:
            claude_jobs._parse_cursor(bad)
        assert raised.value.status == 400


def test_every_bucket_of_the_histogram_is_given_cumulatively() -> None:
    filled = dict(claude_jobs._all_buckets([("60", 1.0), ("300", 2.0), ("+Inf", 3.0)]))
    assert list(filled) == list(claude_jobs.RUN_TIME_BUCKETS)
    assert (filled["1"], filled["30"], filled["60"], filled["120"], filled["7200"]) == (
        0, 0, 1, 1, 2,
    )  # fmt: skip
    assert filled["+Inf"] == 3


def test_library_errors_read_as_http_statuses() -> None:
    cases = {
        claude_jobs.JobNotFound("x"): 404, claude_jobs.WorkerNotFound("x"): 404,
        claude_jobs.WrongState("x"): 409, claude_jobs.InvalidJob("x"): 422,
        claude_jobs.DatabaseUnavailable("x"): 503, claude_jobs.JobsError("x"): 400,
    }  # fmt: skip
    for error, status in cases.items():
        assert claude_jobs._http_status(error) == status, error
    with pytest.raises(StopIteration):
        claude_jobs._http_status(KeyError("a bug is a 500, not a 4xx"))


def test_only_this_machines_addresses_count_as_loopback() -> None:
    assert all(map(claude_jobs._loopback, ["127.0.0.1", "127.1.2.3", "::1", "localhost"]))
    assert not any(map(claude_jobs._loopback, ["0.0.0.0", "::", "192.168.1.4", "example.com"]))


# -- the names the module catches -----------------------------------------------------------------


def _caught(value: Any) -> list[Any]:
    """The classes an except clause's value names (a class, or tuples of them)."""
    return [c for each in value for c in _caught(each)] if isinstance(value, tuple) else [value]


def test_every_exception_class_an_except_clause_names_exists() -> None:
    """Python looks up the names of an except clause only when an exception arrives: one that
    names a class its library lacks (psycopg.errors.TransactionRollbackError) raises
    AttributeError then, which ended the scheduler's thread after one database outage. Every
    clause (and every contextlib.suppress) is looked up here, the names imported inside
    functions too."""
    import ast
    import importlib

    tree = ast.parse(Path(claude_jobs.__file__).read_text())
    namespace = dict(vars(claude_jobs))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            module = importlib.import_module(node.module)
            for alias in node.names:
                namespace.setdefault(alias.asname or alias.name, getattr(module, alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                namespace.setdefault(alias.asname or top, importlib.import_module(top))
    clauses = [node.type for node in ast.walk(tree)
               if isinstance(node, ast.ExceptHandler) and node.type is not None]  # fmt: skip
    suppress = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
                and ast.unparse(node.func) == "contextlib.suppress"]  # fmt: skip
    clauses += [arg for node in suppress for arg in node.args]
    assert len(clauses) > 50
    for clause in clauses:
        if isinstance(clause, ast.Starred):  # contextlib.suppress(*_TRANSIENT)
            clause = clause.value
        value = eval(compile(ast.Expression(clause), "<clause>", "eval"), namespace)
        for each in _caught(value):
            assert isinstance(each, type) and issubclass(each, BaseException), ast.unparse(clause)


def test_a_task_that_always_fails_makes_its_part_failing_whatever_its_other_tasks_do() -> None:
    pulse, passes = claude_jobs._Pulse(), claude_jobs.FAILING_PASSES
    for _ in range(passes):
        pulse.failed("janitor", RuntimeError("no"), "clean up finished jobs")
        pulse.passed("janitor", "keep the planner's statistics")
    assert pulse.trouble() == f"its janitor failed {passes} passes in a row (RuntimeError: no)"
    pulse.passed("janitor", "clean up finished jobs")
    assert pulse.trouble() is None


# -- delivery ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "found"),
    [
        ("https://github.com/octo/shop.git", ("octo", "shop")),
        ("https://github.com/octo/shop", ("octo", "shop")),
        ("https://x-access-token:abc@github.com/octo/shop.git", ("octo", "shop")),
        ("git@github.com:octo/shop.git", ("octo", "shop")),
        ("ssh://git@github.com/octo/shop.git", ("octo", "shop")),
        ("ssh://git@github.com:22/octo/my.repo", ("octo", "my.repo")),
        ("https://ghe.example.com/octo/shop.git", ("octo", "shop")),  # (GITHUB_API_URL's host)
        ("https://gitlab.com/octo/shop.git", None),
        ("git@gitlab.com:octo/shop.git", None),
        ("/srv/git/shop.git", None),
        ("https://github.com/octo", None),
    ],
)
def test_a_remote_s_owner_and_name_come_from_its_url_when_it_is_on_github(
    url: str, found: tuple[str, str] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GITHUB_API_URL", "https://ghe.example.com/api/v3")
    assert claude_jobs._github_repository(url) == found


def test_credentials_in_a_url_are_masked_wherever_one_is_quoted() -> None:
    said = "fatal: unable to access 'https://x:ghp_SECRET@github.com/o/r.git/': 403"
    assert claude_jobs._without_credentials(said) == (
        "fatal: unable to access 'https://***@github.com/o/r.git/': 403"
    )


def test_a_pull_request_s_title_is_the_first_line_of_claude_s_answer_cut_at_72() -> None:
    job = claude_jobs.Job.from_row(
        {"id": uuid.uuid4(), "queue": "q", "kind": "claude", "priority": 0,
         "payload": {"prompt": "the prompt\nmore"}, "status": "succeeded",
         "run_at": datetime.now(UTC), "attempts": 1, "max_attempts": 1, "errors": [],
         "cost_usd": 0, "created_at": datetime.now(UTC), "updated_at": datetime.now(UTC)}
    )  # fmt: skip
    assert claude_jobs._pr_title(job, {"result": "\n## Fix the cache\n\nbody"}) == "Fix the cache"
    long = claude_jobs._pr_title(job, {"result": "x" * 100})
    assert len(long) == 72 and long.endswith("…")
    assert claude_jobs._pr_title(job, {"result": ""}) == "the prompt"
    assert claude_jobs._pr_title(job, None) == "the prompt"


def test_ci_states_combine_to_the_worst() -> None:
    assert claude_jobs._ci_state("runs", {"check_runs": []}) is None
    runs = {"check_runs": [{"status": "completed", "conclusion": "success"},
                           {"status": "in_progress", "conclusion": None}]}  # fmt: skip
    assert claude_jobs._ci_state("runs", runs) == "pending"
    assert claude_jobs._ci_state("status", {"state": "error", "total_count": 1}) == "failure"
    assert claude_jobs._ci_state("status", {"state": "pending", "total_count": 0}) is None
    assert claude_jobs._combined(["success", None, "pending"]) == "pending"
    assert claude_jobs._combined(["success", "failure"]) == "failure"
    assert claude_jobs._combined([None]) is None
