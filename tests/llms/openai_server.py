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

With ``"n": k`` the reply has k choices: choice 0 is the answer above, choice i the
text ``alternative(i)``; a stream interleaves their chunks, word by word. With
``server.tool_calls`` set (a list of ``(id, name, arguments)``), the reply is those
tool calls (finish reason "tool_calls"); streamed, each call comes as a first fragment
with its id and name, then its arguments in pieces of at most 5 characters. With
``server.deltas`` set (a list of delta dicts), a stream sends those as choice 0's
chunks instead of the answer's words (for replies such as legacy function calls and
refusals). ``server.finish_reason``, if set, is choice 0's finish reason.
``server.embedding_usage = False`` leaves the usage out of embedding replies.
``server.reply_model`` is the model a chat reply names, as OpenAI names a snapshot.
``server.fail_first`` (a list of statuses) answers the next requests with those
errors, one each (for the client's retries); ``server.delay_s`` delays every answer;
``server.stream_error_after = k`` ends a stream with an error event after k chunks.
``POST /v1/completions`` (legacy) and ``POST /v1/responses`` echo their input, not
streamed.
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


def alternative(i: int) -> str:
    """The text of choice ``i`` > 0 of a reply with several choices."""
    return f"Alternative {i} is different"


def pieces(text: str, size: int = 5) -> list[str]:
    """``text`` cut into pieces of ``size`` characters, as tool-call arguments stream."""
    return [text[i : i + size] for i in range(0, len(text), size)]


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
        if self.server.delay_s:
            time.sleep(self.server.delay_s)
        status = self.server.fail_first.pop(0) if self.server.fail_first else 0
        if model in ("error-429", "error-500"):
            status = int(model[-3:])
        if status:
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
        path = self.path.split("?", 1)[0]  # Azure adds ?api-version=...
        if path.endswith("/chat/completions"):
            self._chat(body)
        elif path.endswith("/completions"):
            self._completion(body)
        elif path.endswith("/responses"):
            self._response(body)
        elif path.endswith("/embeddings"):
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
        model = self.server.reply_model or body["model"]
        created = int(time.time())
        n = int(body.get("n") or 1)
        texts = [answer] + [alternative(i) for i in range(1, n)]
        calls = self.server.tool_calls
        if not body.get("stream"):
            choices: list[dict[str, Any]] = []
            for i, text in enumerate(texts):
                message: dict[str, Any] = self.server.message or {
                    "role": "assistant",
                    "content": text,
                }
                if calls:
                    message = {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {"id": c, "type": "function", "function": {"name": f, "arguments": a}}
                            for c, f, a in calls
                        ],
                    }
                reason = "tool_calls" if calls else "stop" if i == 0 else "length"
                if i == 0 and self.server.finish_reason is not None:
                    reason = self.server.finish_reason
                choices.append({"index": i, "message": message, "finish_reason": reason})
            self._send_json(
                200,
                {
                    "id": "chatcmpl-test",
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": choices,
                    "usage": self._usage(body, answer),
                },
            )
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()

        def chunk(
            delta: dict[str, Any], finish: str | None, index: int = 0, **extra: Any
        ) -> dict[str, Any]:
            return {
                "id": "chatcmpl-test",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
                **extra,
            }

        if self.server.deltas is not None:
            events = [chunk(delta, None) for delta in self.server.deltas]
            events.append(chunk({}, self.server.finish_reason or "stop"))
        elif calls:
            events = [chunk({"role": "assistant", "content": None}, None)]
            for i, (call_id, name, arguments) in enumerate(calls):
                first = {"index": i, "id": call_id, "type": "function"}
                first["function"] = {"name": name, "arguments": ""}
                events.append(chunk({"tool_calls": [first]}, None))
                events += [
                    chunk({"tool_calls": [{"index": i, "function": {"arguments": p}}]}, None)
                    for p in pieces(arguments)
                ]
            events.append(chunk({}, "tool_calls"))
        else:
            events = [chunk({"role": "assistant", "content": ""}, None, i) for i in range(n)]
            split = [words(text) for text in texts]
            for position in range(max(len(w) for w in split)):
                events += [
                    chunk({"content": w[position]}, None, i)
                    for i, w in enumerate(split)
                    if position < len(w)
                ]
            first = self.server.finish_reason or "stop"
            events += [chunk({}, first if i == 0 else "length", i) for i in range(n)]
        if (body.get("stream_options") or {}).get("include_usage"):
            usage_chunk = chunk({}, None, usage=self._usage(body, answer))
            usage_chunk["choices"] = []
            events.append(usage_chunk)
        if self.server.stream_error_after is not None:  # an error in place of the rest
            events = events[: self.server.stream_error_after]
            events.append({"error": {"message": "injected stream error", "type": "server_error"}})
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

    def _completion(self, body: dict[str, Any]) -> None:
        """The legacy completions endpoint (not streamed): the prompt echoed."""
        answer = f"Echo: {body.get('prompt', '')}"
        self._send_json(
            200,
            {
                "id": "cmpl-test",
                "object": "text_completion",
                "created": int(time.time()),
                "model": body.get("model"),
                "choices": [
                    {"index": 0, "text": answer, "finish_reason": "stop", "logprobs": None}
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
            },
        )

    def _response(self, body: dict[str, Any]) -> None:
        """The Responses API (not streamed): the input echoed."""
        answer = f"Echo: {body.get('input', '')}"
        self._send_json(
            200,
            {
                "id": "resp_test",
                "object": "response",
                "created_at": int(time.time()),
                "model": body.get("model"),
                "status": "completed",
                "output": [
                    {
                        "type": "message",
                        "id": "msg_test",
                        "status": "completed",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": answer, "annotations": []}],
                    }
                ],
                "parallel_tool_calls": True,
                "tool_choice": "auto",
                "tools": [],
                "usage": {
                    "input_tokens": 3,
                    "output_tokens": 3,
                    "total_tokens": 6,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens_details": {"reasoning_tokens": 0},
                },
            },
        )

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
        reply: dict[str, Any] = {"object": "list", "model": body.get("model"), "data": data}
        if self.server.embedding_usage:
            reply["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        self._send_json(200, reply)


class OpenAIServer(ThreadingHTTPServer):
    """Start with :meth:`start`; ``base_url`` is what ``openai.OpenAI(base_url=...)`` takes."""

    daemon_threads = True
    request_queue_size = 128  # many clients at once (the default backlog is 5)
    # Class-level defaults, so that a subclass with its own __init__ has them too.
    deltas: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    embedding_usage = True
    #: The model a chat reply names (OpenAI names its dated snapshot); None: as asked.
    reply_model: str | None = None

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict[str, Any]] = []
        self.answer: str | None = None
        self.message: dict[str, Any] | None = None
        self.cached_tokens = 0
        self.chunk_delay_s = 0.0
        self.tool_calls: list[tuple[str, str, str]] | None = None
        #: Statuses to answer the next requests with, one each, before answering normally.
        self.fail_first: list[int] = []
        #: Seconds to wait before answering a request (for client timeouts).
        self.delay_s = 0.0
        #: A stream sends an error event after this many chunks, and nothing more.
        self.stream_error_after: int | None = None
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
