"""A real HTTP server on 127.0.0.1 that speaks enough of the OpenAI API for the tests.

``POST /v1/chat/completions`` answers JSON or, with ``"stream": true``, server-sent
events (one chunk per word, the usage in a final chunk with no choices when the
request asks ``stream_options.include_usage``, then ``data: [DONE]``).
``POST /v1/embeddings`` returns deterministic vectors (float lists or base64).

Behaviour is chosen by the model name: ``error-429`` and ``error-500`` answer with
that status and an OpenAI error body. The answer is ``server.answer`` if set, else
``"Echo: <last user message>"``; ``server.message``, if set, is sent as the whole reply
message instead (for replies that compatible servers shape oddly). Every request body
is kept in ``server.requests``.
"""

from __future__ import annotations

import base64
import json
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PROMPT_TOKENS_PER_MESSAGE = 4


def words(text: str) -> list[str]:
    """The chunks the server streams: each word with its leading space."""
    parts = text.split(" ")
    return [parts[0]] + [" " + p for p in parts[1:]]


class _Handler(BaseHTTPRequestHandler):
    server: OpenAIServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length) or b"{}")
        self.server.requests.append({"path": self.path, "body": body})
        model = body.get("model", "")
        if model in ("error-429", "error-500"):
            status = int(model[-3:])
            self._send_json(
                status,
                {
                    "error": {
                        "message": f"injected {status}",
                        "type": "rate_limit_error" if status == 429 else "server_error",
                        "code": None,
                    }
                },
            )
            return
        if self.path.endswith("/chat/completions"):
            self._chat(body)
        elif self.path.endswith("/embeddings"):
            self._embeddings(body)
        else:
            self._send_json(404, {"error": {"message": f"no route {self.path}"}})

    def _answer(self, body: dict[str, Any]) -> str:
        if self.server.answer is not None:
            return self.server.answer
        users = [m for m in body.get("messages", []) if m.get("role") == "user"]
        content = users[-1].get("content", "") if users else ""
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if p.get("type") == "text")
        return f"Echo: {content}"

    def _usage(self, body: dict[str, Any], answer: str) -> dict[str, Any]:
        prompt = PROMPT_TOKENS_PER_MESSAGE * len(body.get("messages", []))
        completion = len(words(answer))
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": self.server.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }

    def _chat(self, body: dict[str, Any]) -> None:
        answer = self._answer(body)
        model = body["model"]
        created = int(time.time())
        if not body.get("stream"):
            self._send_json(
                200,
                {
                    "id": "chatcmpl-test",
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": self.server.message
                            or {"role": "assistant", "content": answer},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": self._usage(body, answer),
                },
            )
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()

        def chunk(delta: dict[str, Any], finish: str | None, **extra: Any) -> dict[str, Any]:
            return {
                "id": "chatcmpl-test",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }

        events = [chunk({"role": "assistant", "content": ""}, None)]
        events += [chunk({"content": w}, None) for w in words(answer)]
        events.append(chunk({}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage_chunk = chunk({}, None, usage=self._usage(body, answer))
            usage_chunk["choices"] = []
            events.append(usage_chunk)
        try:
            for event in events:
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
                if self.server.chunk_delay_s:
                    time.sleep(self.server.chunk_delay_s)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading
            pass
        self.close_connection = True

    def _embeddings(self, body: dict[str, Any]) -> None:
        inputs = body.get("input")
        texts = [inputs] if isinstance(inputs, str) else list(inputs or [])
        data = []
        for i, text in enumerate(texts):
            vector = [float(len(str(text))), float(i), 0.5]
            encoded: Any = vector
            if body.get("encoding_format") == "base64":
                encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        tokens = sum(len(str(t).split()) for t in texts)
        self._send_json(
            200,
            {
                "object": "list",
                "model": body.get("model"),
                "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )


class OpenAIServer(ThreadingHTTPServer):
    """Start with :meth:`start`; ``base_url`` is what ``openai.OpenAI(base_url=...)`` takes."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict[str, Any]] = []
        self.answer: str | None = None
        self.message: dict[str, Any] | None = None
        self.cached_tokens = 0
        self.chunk_delay_s = 0.0
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def start(self) -> OpenAIServer:
        self._thread = threading.Thread(target=self.serve_forever, name="openai-test-server")
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
