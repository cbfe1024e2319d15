"""A local stand-in for the few calls of GitHub's REST API that claude-jobs makes: a
repository's default branch, pull requests (open, read, list by head, update) and the checks
of a commit (its combined status and its check runs), with ETags and conditional requests as
GitHub answers them. Tests set what it answers (`fail`, `merge`, `ci`) and read what it was
asked (`requests`)."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class MockGitHub:
    owner: str = "octo"
    name: str = "shop"
    default_branch: str = "main"
    pulls: dict[int, dict[str, Any]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    #: Answers to give before the real ones: (method, path pattern) -> [(status, headers)...]
    failures: dict[tuple[str, str], list[tuple[int, dict[str, str]]]] = field(default_factory=dict)
    statuses: dict[str, str] = field(default_factory=dict)  # sha -> combined status state
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # sha -> check runs

    def __post_init__(self) -> None:
        mock = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                request = Request(self.command, self.path, dict(self.headers.items()), body)
                with mock.lock:
                    mock.requests.append(request)
                    status, headers, answer = mock.answer(request)
                data = b"" if answer is None else json.dumps(answer).encode()
                etag = '"' + hashlib.sha1(data).hexdigest() + '"'
                if status == 200 and request.headers.get("If-None-Match") == etag:
                    status, data = 304, b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status in (200, 201):
                    self.send_header("ETag", etag)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = _serve

        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fail(self, method: str, pattern: str, status: int, times: int = 1, **headers: str) -> None:
        """Answer the next ``times`` requests of ``method`` to a path matching ``pattern`` so."""
        self.failures.setdefault((method, pattern), []).extend([(status, headers)] * times)

    def asked(self, method: str, pattern: str = "") -> list[Request]:
        return [r for r in self.requests if r.method == method and re.search(pattern, r.path)]

    def answer(self, request: Request) -> tuple[int, dict[str, str], Any]:
        for (method, pattern), queued in self.failures.items():
            if method == request.method and re.search(pattern, request.path) and queued:
                status, headers = queued.pop(0)
                return status, headers, {"message": f"mock failure {status}"}
        if request.headers.get("Authorization") != "Bearer " + TOKEN:
            return 401, {}, {"message": "Bad credentials"}
        url = urlsplit(request.path)
        repo = f"/repos/{self.owner}/{self.name}"
        if url.path == repo and request.method == "GET":
            return 200, {}, {"full_name": f"{self.owner}/{self.name}",
                             "default_branch": self.default_branch}  # fmt: skip
        if url.path == f"{repo}/pulls" and request.method == "POST":
            body = request.body
            head = body["head"]
            if any(p["head"]["ref"] == head and p["state"] == "open" for p in self.pulls.values()):
                return 422, {}, {"message": "Validation Failed",
                                 "errors": [{"message": f"A pull request already exists for "
                                             f"{self.owner}:{head}."}]}  # fmt: skip
            number = len(self.pulls) + 1
            self.pulls[number] = {
                "number": number, "title": body["title"], "body": body["body"],
                "draft": body.get("draft", False), "state": "open", "merged_at": None,
                "html_url": f"https://github.com/{self.owner}/{self.name}/pull/{number}",
                "head": {"ref": head, "sha": "0" * 40}, "base": {"ref": body["base"]},
            }  # fmt: skip
            return 201, {}, self.pulls[number]
        if url.path == f"{repo}/pulls" and request.method == "GET":
            head = parse_qs(url.query).get("head", [""])[0].split(":")[-1]
            return 200, {}, [p for p in self.pulls.values() if p["head"]["ref"] == head]
        if found := re.fullmatch(rf"{repo}/pulls/(\d+)", url.path):
            pull = self.pulls.get(int(found[1]))
            if pull is None:
                return 404, {}, {"message": "Not Found"}
            if request.method == "PATCH":
                pull.update(request.body)
            return 200, {}, pull
        if found := re.fullmatch(rf"{repo}/commits/(\w+)/status", url.path):
            state = self.statuses.get(found[1])
            statuses = [{"state": state}] if state else []
            return 200, {}, {"state": state or "pending", "total_count": len(statuses),
                             "statuses": statuses}  # fmt: skip
        if found := re.fullmatch(rf"{repo}/commits/(\w+)/check-runs", url.path):
            runs = self.runs.get(found[1], [])
            return 200, {}, {"total_count": len(runs), "check_runs": runs}
        return 404, {}, {"message": "Not Found"}

    def merge(self, number: int) -> None:
        self.pulls[number].update(state="closed", merged_at="2026-12-05T12:00:00Z")


#: The token the tests give claude-jobs (and must find in no output).
TOKEN = "ghp_mockTOKEN0123456789abcdefSECRET"
