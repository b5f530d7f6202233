"""A scriptable OpenAI-compatible chat completions server on 127.0.0.1, for tests and benchmarks.

    with FakeOpenAIServer() as server:                      # a real ThreadingHTTPServer on a free port
        server.respond_with(lambda request: Reply.chat(grade_json(80), delay_s=0.2))
        server.queue(Reply.error(429, headers={"Retry-After": "1"}))   # served first, then the responder
        client = openai.OpenAI(base_url=server.base_url, api_key="...")
        ...
        server.requests        # every request received: headers, JSON body, arrival time
        server.max_in_flight   # the most requests handled at the same moment

Replies can delay, fail with any status and headers, or send a raw (malformed, truncated) body.
The server never prints: request lines and headers could carry credentials.
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

ASPECTS = ("accuracy_to_prompt", "creativity_and_originality", "visual_quality_and_realism",
           "consistency_and_cohesion", "emotional_or_thematic_resonance")


@dataclass
class Reply:
    status: int = 200
    content: str | None = None  # assistant message text, wrapped in a chat.completion body
    body: bytes | str | None = None  # raw body sent as is (overrides content)
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0

    @classmethod
    def chat(cls, content: str, delay_s: float = 0.0) -> Reply:
        return cls(content=content, delay_s=delay_s)

    @classmethod
    def error(cls, status: int, headers: dict[str, str] | None = None, delay_s: float = 0.0) -> Reply:
        body = json.dumps({"error": {"message": f"fake error {status}", "type": "fake", "code": status}})
        return cls(status=status, body=body, headers=headers or {}, delay_s=delay_s)

    @classmethod
    def raw(cls, body: bytes | str, status: int = 200, delay_s: float = 0.0) -> Reply:
        return cls(status=status, body=body, delay_s=delay_s)


@dataclass
class RecordedRequest:
    index: int
    path: str
    headers: dict[str, str]  # names lower-cased
    body: Any  # parsed JSON, or None when the body was not JSON
    received_at: float


Responder = Callable[[RecordedRequest], Reply]


def grade_json(overall: float | None = 75, aspects: dict[str, Any] | None = None) -> str:
    """A grader reply in the rubric's format."""
    doc: dict[str, Any] = {name: {"score": 70, "justification": "fine"} for name in ASPECTS}
    doc.update(aspects or {})
    if overall is not None:
        doc["overall"] = overall
    return json.dumps(doc)


def completion_body(content: str, model: str = "fake-model") -> bytes:
    return json.dumps({
        "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }).encode()


class FakeOpenAIServer:
    def __init__(self, responder: Responder | None = None) -> None:
        self._responder: Responder = responder or (lambda request: Reply.chat(grade_json(75)))
        self._queue: deque[Reply] = deque()
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._in_flight = 0
        self.max_in_flight = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True  # a client that timed out must not block shutdown
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ control
    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def respond_with(self, responder: Responder) -> None:
        self._responder = responder

    def queue(self, *replies: Reply) -> None:
        """Replies served in order before the responder is asked again."""
        with self._lock:
            self._queue.extend(replies)

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
            self._queue.clear()
            self.max_in_flight = 0

    def start(self) -> FakeOpenAIServer:
        # a short poll interval makes stop() quick (shutdown waits for the serving loop to notice)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ serving
    def _next_reply(self, request: RecordedRequest) -> Reply:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
        return self._responder(request)

    def _record(self, path: str, headers: dict[str, str], raw: bytes) -> RecordedRequest:
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        with self._lock:
            request = RecordedRequest(len(self._requests), path, headers, body, time.monotonic())
            self._requests.append(request)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        return request

    def _done(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like a real API server

            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(Reply.error(404))
                    return
                request = server._record(self.path, {k.lower(): v for k, v in self.headers.items()}, raw)
                try:
                    reply = server._next_reply(request)
                    if reply.delay_s:
                        time.sleep(reply.delay_s)
                    self._send(reply)
                finally:
                    server._done()

            def _send(self, reply: Reply) -> None:
                if reply.body is not None:
                    body = reply.body.encode() if isinstance(reply.body, str) else reply.body
                else:
                    body = completion_body(reply.content if reply.content is not None else grade_json(75))
                try:
                    self.send_response(reply.status)
                    headers = {"Content-Type": "application/json", **reply.headers}
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test): nothing to deliver

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (base-class signature)
                pass

        return Handler
