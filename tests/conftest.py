"""Shared fixtures: a throwaway PostgreSQL, a fake `claude`, and real worker processes.

PostgreSQL: one throwaway server per test session, started with pgserver (which runs it as an
unprivileged user when the tests run as root), and pytest-postgresql's `postgresql_noproc`
pointed at it. pytest-postgresql migrates a template database once; every test gets a fresh
copy of it as `postgresql` (a psycopg connection), and `db_url` is the URL of that copy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pgserver
import psycopg
import pytest
from click.testing import CliRunner, Result
from pytest_postgresql import factories

import claude_jobs

TESTS = Path(__file__).parent
#: Where the tests' HTTP clients say they send their requests (a name the server answers to).
LOCAL = "http://localhost"
FIXTURES = TESTS / "fixtures" / "claude-cli"


#: A test that uses one of these needs PostgreSQL or starts processes: it is marked `slow`,
#: and `pytest -m "not slow"` runs the fast tier (test_units.py and the like) in seconds.
SLOW_FIXTURES = {
    "pg_server",
    "postgresql",
    "unmigrated",
    "fake_claude",
    "real_claude",
    "start_worker",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@dataclass
class Server:
    """What pytest-postgresql's noproc factory reads from the fixture it depends on."""

    host: str
    port: int
    pgdata: Path
    user: str = "postgres"
    password: str | None = None
    options: str = ""
    maintenance_dbname: str = "postgres"
    template_dbname: str | None = None

    def url(self, dbname: str) -> str:
        return f"postgresql://{self.user}@/{dbname}?host={self.host}&port={self.port}"


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    pgdata = tmp_path_factory.mktemp("postgres") / "data"
    server = pgserver.get_server(pgdata, cleanup_mode="delete")
    info = server.get_postmaster_info()
    yield Server(host=str(info.socket_dir), port=info.port, pgdata=pgdata)
    server.cleanup()


def load_schema(host: str, port: int, user: str, dbname: str, password: str | None, **_: Any):
    with psycopg.connect(
        host=host, port=port, user=user, dbname=dbname, password=password, autocommit=True
    ) as conn:
        claude_jobs.migrate(conn)


postgresql_noproc = factories.postgresql_noproc(depends_on="pg_server", load=[load_schema])
postgresql = factories.postgresql("postgresql_noproc")
unmigrated_noproc = factories.postgresql_noproc(depends_on="pg_server", dbname="unmigrated")
unmigrated = factories.postgresql("unmigrated_noproc")


@pytest.fixture
def db_url(pg_server: Server, postgresql: psycopg.Connection) -> str:
    """The URL of this test's database (a fresh copy of the migrated template)."""
    postgresql.autocommit = True
    return pg_server.url(postgresql.info.dbname)


@pytest.fixture
def conn(postgresql: psycopg.Connection) -> psycopg.Connection:
    """This test's database, autocommit."""
    postgresql.autocommit = True
    return postgresql


@pytest.fixture
def invoke(db_url: str) -> Callable[..., Result]:
    """Run the command line in this process, on this test's database."""

    def run(*args: str, input: str | None = None, color: bool = False) -> Result:
        command = ["--database-url", db_url, *args]
        return CliRunner().invoke(claude_jobs.cli, command, input=input, color=color)

    return run


def wait_for(
    condition: Callable[[], Any], timeout: float = 15.0, what: str = "the condition"
) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def job_row(conn: psycopg.Connection, job_id: Any) -> dict[str, Any]:
    """A job's row, with its transcript's kept tail as stored (in chunks of its own)."""
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        row = cur.execute("SELECT * FROM claude_jobs WHERE id = %s", (job_id,)).fetchone()
    assert row is not None
    row["transcript"] = claude_jobs.get_job(conn, row["id"]).transcript
    return row


def status_of(conn: psycopg.Connection, job_id: Any) -> str:
    return job_row(conn, job_id)["status"]


# -- git -------------------------------------------------------------------------------------


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository on main with one commit (app.py)."""
    path = tmp_path / "repo"
    path.mkdir()
    (path / "app.py").write_text("print('hi')\n")
    git(path, "init", "-q", "-b", "main")
    git(path, "add", ".")
    git(path, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "first")
    return path


# -- the fake claude ----------------------------------------------------------------------

FAKE_CLAUDE = '''\
#!{python}
"""A stand-in for the Claude Code CLI. It records how it was run in $FAKE_CLAUDE_LOG, then
behaves as the prompt says: a prompt starting with "FAKE:" holds a JSON object of directives,
any other prompt gets a successful stream-json run answering "echo: <prompt start>".

Directives: emit (a fixture file to print to stdout), stdout / stderr (text to print),
stream (lines to print one by one, `interval` seconds apart, before the usual result),
sleep (seconds, before finishing), child (spawn a grandchild that sleeps, recording its pid),
detach (spawn a grandchild in a session of its own, as claude's Bash tool runs commands, that
outlives this process; "ignore_term": it ignores SIGTERM; its pid is recorded as "detached"),
exit (the exit status, default 0), result (the result text of the default success run),
ignore_term (ignore SIGTERM), cost (total_cost_usd), session (the session id), run (commands,
argv lists, to run in the working directory first), track (a directory: while it runs, a file
of its own is there, and on start it appends how many there are to <track>.counts), unless
(a path: when it exists, every other directive is ignored: a plain success), big_line (print
one line of that many "x" before the result), copy_results (a path: copy the file that
$CLAUDE_JOBS_BATCH_RESULTS names there, as a batch's callback would read it), repairs (a
list of directives: a run that resumes this session with a prompt of no directives, as a
round of repair does, takes the next of them; kept in $FAKE_CLAUDE_LOG), print_env (names of
variables to print as NAME=value lines). The directives are
the first line of the prompt (the worker may add lines after it).
"""
import base64, json, os, signal, subprocess, sys, time, uuid

prompt = sys.stdin.buffer.read()
record = {{
    "argv": sys.argv, "cwd": os.getcwd(), "pid": os.getpid(), "pgid": os.getpgid(0),
    "started": time.time(),
    "stdin": base64.b64encode(prompt).decode(), "stdin_closed": sys.stdin.buffer.read() == b"",
    "env": {{k: os.environ.get(k) for k in ("CLAUDE_JOBS_JOB_ID", "CLAUDE_JOBS_ATTEMPT",
            "IS_SANDBOX", "FAKE_MARKER", "CLAUDE_JOBS_BATCH_RESULTS")}},
}}
text = prompt.decode("utf-8", "replace")
directives = json.loads(text[5:].partition(chr(10))[0]) if text.startswith("FAKE:") else {{}}
log = os.environ.get("FAKE_CLAUDE_LOG")
resumed = sys.argv[sys.argv.index("--resume") + 1] if "--resume" in sys.argv else None
if resumed and not directives and log and os.path.exists(os.path.join(log, f"session-{{resumed}}")):
    with open(os.path.join(log, f"session-{{resumed}}")) as f:
        repairs = json.load(f)
    directives = repairs.pop(0) if repairs else {{}}
    with open(os.path.join(log, f"session-{{resumed}}"), "w") as f:
        json.dump(repairs, f)
    directives.setdefault("session", resumed)
if "copy_results" in directives:
    with open(os.environ["CLAUDE_JOBS_BATCH_RESULTS"], "rb") as f:
        results = f.read()
    with open(directives["copy_results"], "wb") as out:
        out.write(results)
if "unless" in directives and os.path.exists(directives["unless"]):
    directives = {{}}
for command in directives.get("run", []):
    subprocess.run(command, check=True, capture_output=True)
if "track" in directives:
    mine = os.path.join(directives["track"], str(os.getpid()))
    open(mine, "w").close()
    with open(directives["track"] + ".counts", "a") as f:
        f.write(f"{{len(os.listdir(directives['track']))}}\\n")
if directives.get("ignore_term"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if directives.get("child"):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    record["child"] = child.pid
if "detach" in directives:
    code = "import signal, time; "
    if directives["detach"].get("ignore_term"):
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    detached = subprocess.Popen(
        [sys.executable, "-c", code + "time.sleep(3012)"], start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    record["detached"] = detached.pid
if log:
    env = record["env"]
    name = f"{{env['CLAUDE_JOBS_JOB_ID']}}-{{env['CLAUDE_JOBS_ATTEMPT']}}-{{os.getpid()}}.json"
    with open(os.path.join(log, name + ".tmp"), "w") as f:
        json.dump(record, f)
    os.replace(os.path.join(log, name + ".tmp"), os.path.join(log, name))  # whole, or not there
session = directives.get("session") or str(uuid.uuid4())
if "repairs" in directives and log:
    with open(os.path.join(log, f"session-{{session}}"), "w") as f:
        json.dump(directives["repairs"], f)
if "emit" in directives:
    with open(os.path.join({fixtures!r}, directives["emit"])) as f:
        sys.stdout.write(f.read())
elif "stdout" not in directives:
    lines = [
        {{"type": "system", "subtype": "init", "cwd": record["cwd"], "session_id": session,
          "tools": ["Bash"], "model": "fake"}},
        {{"type": "assistant", "session_id": session, "message": {{"role": "assistant",
          "content": [{{"type": "text", "text": "working on it"}}]}}}},
    ]
    for line in lines:
        print(json.dumps(line), flush=True)
if "big_line" in directives:
    for _ in range(directives["big_line"] // 65536):
        sys.stdout.write("x" * 65536)
    print(flush=True)
for name in directives.get("print_env", []):
    print(f"{{name}}={{os.environ.get(name)}}", flush=True)
for line in directives.get("stream", []):
    print(json.dumps(line) if not isinstance(line, str) else line, flush=True)
    time.sleep(directives.get("interval", 0))
if "stdout" in directives:
    sys.stdout.write(directives["stdout"])
if "stderr" in directives:
    sys.stderr.write(directives["stderr"])
sys.stdout.flush()
time.sleep(directives.get("sleep", 0))
if "track" in directives:
    os.remove(mine)
if "emit" not in directives and "stdout" not in directives:
    result = directives.get("result", "echo: " + text[:40])
    print(json.dumps({{"type": "result", "subtype": "success", "is_error": False,
        "result": result, "session_id": session, "total_cost_usd": directives.get("cost", 0.0125),
        "num_turns": 2, "duration_ms": 12, "usage": {{"input_tokens": 10, "output_tokens": 5}},
        "modelUsage": {{"claude-fake": {{"inputTokens": 10, "outputTokens": 5,
            "cacheReadInputTokens": 2, "cacheCreationInputTokens": 1,
            "costUSD": directives.get("cost", 0.0125)}}}}}}), flush=True)
if log:  # when it ended (a file beside the record: <record>.ended)
    with open(os.path.join(log, name[:-5] + ".ended"), "w") as f:
        f.write(repr(time.time()))
sys.exit(directives.get("exit", 0))
'''


@pytest.fixture(scope="session")
def fake_claude(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The path of the fake `claude` executable."""
    path = tmp_path_factory.mktemp("bin") / "claude"
    path.write_text(FAKE_CLAUDE.format(python=sys.executable, fixtures=str(FIXTURES)))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def claude_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the fake claude records each run (one JSON file a run)."""
    log = tmp_path / "claude-runs"
    log.mkdir()
    monkeypatch.setenv("FAKE_CLAUDE_LOG", str(log))
    monkeypatch.setenv("IS_SANDBOX", "1")
    return log


def claude_runs(log: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(log.glob("*.json"))]


def claude_spans(log: Path) -> list[tuple[float, float]]:
    """(started, ended) of each fake claude run that ended, by its own clock."""
    return sorted(
        (json.loads(p.read_text())["started"], float(p.with_suffix(".ended").read_text()))
        for p in log.glob("*.json")
        if p.with_suffix(".ended").exists()
    )


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most of these (start, end) spans that were under way at one moment."""
    return max((sum(1 for s, e in spans if s <= start < e) for start, _ in spans), default=0)


def fake(**directives: Any) -> str:
    """A prompt that makes the fake claude behave as told."""
    return "FAKE:" + json.dumps(directives)


# -- the real claude ------------------------------------------------------------------------

CLI_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "claude-jobs-tests"


@pytest.fixture(scope="session")
def real_claude() -> Path:
    """The real Claude Code CLI: $CLAUDE_JOBS_TEST_CLAUDE, or installed from npm (cached)."""
    if given := os.environ.get("CLAUDE_JOBS_TEST_CLAUDE"):
        return Path(given)
    binary = CLI_CACHE / "node_modules" / ".bin" / "claude"
    if not binary.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed, so the real Claude Code CLI cannot be installed")
        try:  # within the test's own timeout (.ci/run installs it before the tests)
            install = subprocess.run(
                [npm, "install", "--prefix", str(CLI_CACHE), "@anthropic-ai/claude-code"],
                capture_output=True, text=True, timeout=90,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            pytest.skip("npm took over 90 s to install @anthropic-ai/claude-code: no registry?")
        if install.returncode != 0 or not binary.exists():
            pytest.skip(f"npm could not install @anthropic-ai/claude-code: {install.stderr[-300:]}")
    return binary


# -- worker processes -----------------------------------------------------------------------


class WorkerProcess:
    """`claude-jobs worker` as a real process, its log in a file."""

    def __init__(self, db_url: str, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.log_path = log
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "claude_jobs", "--database-url", db_url, "worker", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 15.0) -> None:
        wait_for(lambda: text in self.log(), timeout, f"{text!r} in the worker log:\n{self.log()}")

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not exit within {timeout}s; its log:\n{self.log()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self._log.close()


@pytest.fixture
def start_worker(
    db_url: str, fake_claude: Path, tmp_path: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    """Start `claude-jobs worker` processes on this test's database (killed at the end)."""
    started: list[WorkerProcess] = []

    def start(*args: str, url: str | None = None, **env: str) -> WorkerProcess:
        environment = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)]),
            "CLAUDE_JOBS_CLAUDE_BIN": str(fake_claude),
            "IS_SANDBOX": "1",
            **env,
        }
        log = tmp_path / f"worker-{len(started) + 1}.log"
        worker = WorkerProcess(url or db_url, list(args), log, environment)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie counts as dead: it has exited and waits for its parent to reap it.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # (it went between the two looks)
        return False


def dedent(text: str) -> str:
    return textwrap.dedent(text).lstrip()


# -- a real browser -----------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium from the distribution's packages (.ci/run installs them), driven by
    Selenium through the distribution's chromedriver."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("no Chromium: apt-get install chromium chromium-driver (as .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--no-first-run", "--window-size=1280,900",
                     f"--user-data-dir={tmp_path / 'chromium'}"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def until(driver: Any, condition: Callable[[Any], Any], what: str, timeout: float = 20) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        condition, f"waiting for {what}"
    )


def page_text(driver: Any) -> str:
    return driver.find_element("tag name", "body").text
