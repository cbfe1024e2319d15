"""A local Anthropic Messages API, good enough for the real `claude` CLI to run on.

Point the CLI at it (:meth:`MockMessagesAPI.env` gives the variables) and it answers
each conversation turn with the next reply of a script::

    with MockMessagesAPI([Bash("touch made-by-claude.txt"), Text("done")]) as mock:
        subprocess.run(
            [claude, "--dangerously-skip-permissions", "-p", ...],
            input=b"prompt", cwd=workdir, env={**base_env, **mock.env(), "HOME": home},
        )
    assert len(mock.turns) == 2

What Claude Code 2.1.197 did against it (``-p --output-format stream-json --verbose``):

- ``HEAD /`` first (a connection warm-up; we answer 200, a 404 works too), then one
  ``POST /v1/messages?beta=true`` per turn: ``"stream": true``, the model
  (``claude-opus-4-8`` by default), ``max_tokens`` 64000, ``thinking``, ``system``,
  ``tools`` (Bash, Read, Edit, ...) and headers ``x-api-key``, ``anthropic-version``,
  ``anthropic-beta``, ``X-Claude-Code-Session-Id``. A text reply ends the run after one
  request; a Bash reply makes the CLI run the command in its working directory and send
  the ``tool_result`` in the next request. No other endpoint (``count_tokens``, models).
- Without ``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1`` it may also send, alongside the
  first turn, a title request: same model, streaming, no tools, ``output_config.format``
  a JSON schema for ``{"title": ...}``. :meth:`MockMessagesAPI.is_side_request` spots it
  (and non-streaming or tool-less Haiku helper calls, which other versions may send) and
  answers ``side_reply`` without consuming the script. With the variable set, none came.
- A retried request (5xx, 429) is a new request and consumes the next reply, so
  ``[APIError(500), Text("ok")]`` with ``CLAUDE_CODE_MAX_RETRIES=1`` succeeds. The CLI
  honours ``retry-after``. By default it retries 10 times (a steady 500 took 187 s);
  ``CLAUDE_CODE_MAX_RETRIES=0`` makes it fail in about a second, exit status 1.
- The CLI resets its keep-alive connection when it exits; that is not reported.
"""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType


@dataclass(frozen=True)
class Text:
    """A final answer: the turn ends with ``stop_reason: end_turn``."""

    text: str


@dataclass(frozen=True)
class Bash:
    """A Bash tool call: the CLI runs ``command`` in its working directory."""

    command: str
    description: str = "Run a command"


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


@dataclass(frozen=True)
class APIError:
    """HTTP error with the API's JSON error body: ``APIError(429, retry_after=2)``."""

    status: int = 500
    message: str = "Internal server error"
    retry_after: float | None = None

    @property
    def error_type(self) -> str:
        return _ERROR_TYPES.get(self.status, "api_error")


Reply = Text | Bash | APIError


def _sse(event: str, **fields: object) -> bytes:
    """One server-sent event whose data is ``{"type": event, **fields}``."""
    data = json.dumps({"type": event, **fields})
    return f"event: {event}\ndata: {data}\n\n".encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    mock: MockMessagesAPI

    def handle_error(self, request: object, client_address: object) -> None:
        """Stay quiet: the CLI resets its keep-alive connection when it exits."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output clean."""

    def do_HEAD(self) -> None:
        self.server.mock.hits.append(("HEAD", self.path))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        self.server.mock.hits.append(("GET", self.path))
        self._send_error(APIError(404, f"Not found: {self.path}"))

    def do_POST(self) -> None:
        mock = self.server.mock
        mock.hits.append(("POST", self.path))
        length = int(self.headers.get("Content-Length") or 0)
        body: dict[str, Any] = json.loads(self.rfile.read(length) or b"{}")
        path = self.path.split("?", 1)[0]
        if path == "/v1/messages/count_tokens":
            self._send_json(200, {"input_tokens": mock.input_tokens})
        elif path == "/v1/messages":
            reply = mock.answer(body, dict(self.headers))
            if isinstance(reply, APIError):
                self._send_error(reply)
            elif body.get("stream"):
                self._send_stream(mock.message(body, reply))
            else:
                self._send_json(200, mock.message(body, reply))
        else:
            self._send_error(APIError(404, f"Not found: {self.path}"))

    def _send_json(
        self,
        status: int,
        payload: dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", "req_mock")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: APIError) -> None:
        headers = {}
        if error.retry_after is not None:
            headers["retry-after"] = str(error.retry_after)
        payload = {
            "type": "error",
            "error": {"type": error.error_type, "message": error.message},
            "request_id": "req_mock",
        }
        self._send_json(error.status, payload, headers)

    def _send_stream(self, message: dict[str, Any]) -> None:
        """Send ``message`` as the event stream the API uses for ``"stream": true``."""
        content, usage = message.pop("content"), message.pop("usage")
        stop_reason = message.pop("stop_reason")
        start_usage = {**usage, "output_tokens": 1}
        start = {**message, "content": [], "stop_reason": None, "usage": start_usage}
        out = _sse("message_start", message=start)
        for index, block in enumerate(content):
            empty: dict[str, Any]
            if block["type"] == "text":
                empty = {"type": "text", "text": ""}
                delta = {"type": "text_delta", "text": block["text"]}
            else:
                empty = {**block, "input": {}}
                partial = json.dumps(block["input"])
                delta = {"type": "input_json_delta", "partial_json": partial}
            out += _sse("content_block_start", index=index, content_block=empty)
            out += _sse("content_block_delta", index=index, delta=delta)
            out += _sse("content_block_stop", index=index)
        out += _sse(
            "message_delta",
            delta={"stop_reason": stop_reason, "stop_sequence": None},
            usage={"output_tokens": usage["output_tokens"]},
        )
        out += _sse("message_stop")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Content-Length", str(len(out)))
        self.send_header("request-id", "req_mock")
        self.end_headers()
        self.wfile.write(out)


class MockMessagesAPI:
    """A Messages API on 127.0.0.1 that plays ``script``, one reply per turn.

    The last reply repeats once the script is used up. Filled in as requests arrive:
    ``requests`` (every JSON body POSTed to /v1/messages), ``turns`` (those that
    consumed the script), ``side_requests`` (the others), ``headers`` (the headers of
    each turn) and ``hits`` (``(method, path)`` of every request, any endpoint).
    """

    def __init__(
        self,
        script: Sequence[Reply] = (Text("done"),),
        *,
        side_reply: str = '{"title": "Mock session"}',
        input_tokens: int = 12,
        output_tokens: int = 5,
    ) -> None:
        if not script:
            msg = "the script needs at least one reply"
            raise ValueError(msg)
        self.script = list(script)
        self.side_reply = side_reply
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.requests: list[dict[str, Any]] = []
        self.turns: list[dict[str, Any]] = []
        self.side_requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.hits: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:40123``."""
        if self._server is None:
            msg = "the mock API is not running"
            raise RuntimeError(msg)
        return f"http://127.0.0.1:{self._server.server_port}"

    def env(self) -> dict[str, str]:
        """Variables that send a `claude -p` run here (choose ``HOME`` yourself)."""
        return {
            "ANTHROPIC_BASE_URL": self.url,
            "ANTHROPIC_API_KEY": "sk-mock",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_AUTOUPDATER": "1",
            "IS_SANDBOX": "1",
        }

    def start(self) -> Self:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.mock = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},  # so that stop() returns quickly
            name="mock-messages-api",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server, self._thread = None, None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def is_side_request(self, body: dict[str, Any]) -> bool:
        """Whether a /v1/messages body is a helper call (title, quota), not a turn.

        Every turn streams and carries the tool list; the title request has no tools and
        asks for structured output. (A run with ``--tools ""`` and ``--model haiku``
        would be misread; override this method for such a test.)
        """
        if not body.get("stream"):
            return True
        if body.get("tools"):
            return False
        structured = "format" in (body.get("output_config") or {})
        return structured or "haiku" in str(body.get("model", ""))

    def answer(self, body: dict[str, Any], headers: dict[str, str]) -> Reply:
        """Record a /v1/messages request and choose its reply."""
        with self._lock:
            self.requests.append(body)
            if self.is_side_request(body):
                self.side_requests.append(body)
                return Text(self.side_reply)
            self.turns.append(body)
            self.headers.append(headers)
            return self.script[min(len(self.turns), len(self.script)) - 1]

    def message(self, body: dict[str, Any], reply: Text | Bash) -> dict[str, Any]:
        """The complete assistant message for ``reply``, as the API would return it."""
        number = next(self._ids)
        if isinstance(reply, Text):
            content: list[dict[str, Any]] = [{"type": "text", "text": reply.text}]
            stop_reason = "end_turn"
        else:
            tool_use = {
                "type": "tool_use",
                "id": f"toolu_mock_{number}",
                "name": "Bash",
                "input": {"command": reply.command, "description": reply.description},
            }
            content = [tool_use]
            stop_reason = "tool_use"
        return {
            "id": f"msg_mock_{number}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model", "claude-mock"),
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {
                "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens,
            },
        }
