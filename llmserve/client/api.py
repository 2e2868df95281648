"""A small client of the OpenAI chat API over httpx: models, and streamed chat completions
that can be cancelled and, on llmserve, resumed after a dropped connection.

httpx rather than the `openai` package: resuming needs each SSE event's `id` and a GET of
the stored stream with `Last-Event-ID`, which the SDK's stream object does not expose."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from llmserve.client.sse import iter_events

CHAT = "/chat/completions"


class ApiError(Exception):
    """An error the server answered (a status, or an error event mid-stream)."""

    def __init__(self, message: str, status: int | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


class ConnectionLost(ApiError):
    """The connection dropped and the answer could not be resumed."""


@dataclass(frozen=True, slots=True)
class Piece:
    """A streamed piece of the answer, or of a thinking model's reasoning before it."""

    text: str
    reasoning: bool = False


@dataclass
class Answer:
    """What one streamed answer gave, and how fast."""

    text: str = ""
    reasoning: str = ""  # a thinking model's, apart from the answer
    completion_id: str | None = None
    finish_reason: str | None = None
    completion_tokens: int | None = None  # from the usage chunk, where the server sends one
    chunks: int = 0  # chunks that carried text or reasoning: the tokens where usage is missing
    started: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    ended: float | None = None
    resumes: int = 0  # reconnections after a dropped connection

    @property
    def tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else self.chunks

    @property
    def tokens_per_second(self) -> float | None:
        """Decoding speed: tokens after the first over the time since it came."""
        if self.first_token is None or self.ended is None or self.tokens < 2:
            return None
        span = self.ended - self.first_token
        return (self.tokens - 1) / span if span > 0 else None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.started


class ApiClient:
    """One server: `base_url` ends in /v1, as the OpenAI SDK's does."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600,
                 resume_tries: int = 5) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers,
                                  timeout=httpx.Timeout(timeout, connect=10))
        self.resume_tries = resume_tries  # reconnections in a row without a new event
        self.store = False  # ask for stored, resumable streams (llmserve only)

    def close(self) -> None:
        self._http.close()

    def models(self) -> list[dict[str, Any]]:
        return _json(self._http.get("/models"))["data"]

    def detect_llmserve(self) -> bool:
        """llmserve lists its models as owned by "llmserve": there, streams are stored and
        resumable. Elsewhere nothing is stored (OpenAI would keep the chats)."""
        try:
            self.store = any(m.get("owned_by") == "llmserve" for m in self.models())
        except (httpx.HTTPError, ApiError, KeyError, TypeError):
            self.store = False
        return self.store

    def stream(self, body: dict[str, Any]) -> ChatStream:
        return ChatStream(self, body)

    def delete(self, completion_id: str) -> None:
        """Delete a stored completion; a running one stops generating."""
        try:
            self._http.delete(f"{CHAT}/{completion_id}", timeout=10)
        except httpx.HTTPError:
            pass  # the server is gone: nothing to stop

    def open_stream(self, body: dict[str, Any], completion_id: str | None,
              position: str | None) -> httpx.Response:
        """POST a streamed request, or with a completion id and position, GET the rest of
        a stored stream after that event; an error status raises ApiError."""
        if completion_id is not None and position is not None:
            request = self._http.build_request(
                "GET", f"{CHAT}/{completion_id}", params={"stream": "true"},
                headers={"Last-Event-ID": position})
        else:
            request = self._http.build_request("POST", CHAT, json=body)
        response = self._http.send(request, stream=True)
        if response.status_code >= 400:
            response.read()
            response.close()
            _json(response)  # raises ApiError
        return response


class ChatStream:
    """A streamed chat completion: iterate for its pieces; `answer` keeps what came.
    `close()` (or leaving early, as on Ctrl-C) hangs up and stops the generation: a plain
    stream stops when its client hangs up; a stored one would run on, so it is deleted."""

    def __init__(self, api: ApiClient, body: dict[str, Any]) -> None:
        self.api = api
        self.body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        self.stored = api.store
        self.answer = Answer()
        self._done = False
        self._pieces = self._run()

    def __iter__(self) -> Iterator[Piece]:
        return self._pieces

    def close(self) -> None:
        self._pieces.close()
        if self.answer.ended is None:
            self.answer.ended = time.monotonic()
        if not self._done and self.stored and self.answer.completion_id is not None:
            self.api.delete(self.answer.completion_id)

    def _run(self) -> Iterator[Piece]:
        position: str | None = None
        tries = 0
        while True:
            try:
                response = self._connect(position)
                try:
                    for event in iter_events(response.iter_lines()):
                        if event.id is not None:
                            position = event.id
                        if event.data == "[DONE]":
                            self._done = True
                            self.answer.ended = time.monotonic()
                            return
                        yield from self._chunk(json.loads(event.data))
                        tries = 0  # progress: a later drop gets every try again
                finally:
                    response.close()
                raise httpx.RemoteProtocolError("the stream ended before [DONE]")
            except httpx.TransportError as exc:
                resumable = self.stored and self.answer.completion_id and position is not None
                tries += 1
                if not resumable or tries > self.api.resume_tries:
                    raise ConnectionLost(f"connection lost: {exc}") from exc
                self.answer.resumes += 1
                time.sleep(min(0.2 * 2 ** (tries - 1), 3))

    def _connect(self, position: str | None) -> httpx.Response:
        if position is not None:
            return self.api.open_stream(self.body, self.answer.completion_id, position)
        if not self.stored:
            return self.api.open_stream(self.body, None, None)
        try:
            return self.api.open_stream({**self.body, "store": True}, None, None)
        except ApiError as exc:
            if exc.status != 400:
                raise
            # Maybe a server that refuses `store` (llmserve with --store none): if the
            # same request without it goes through, plain streams from now on.
            response = self.api.open_stream(self.body, None, None)
            self.stored = self.api.store = False
            return response

    def _chunk(self, chunk: dict[str, Any]) -> Iterator[Piece]:
        if "error" in chunk:
            error = chunk["error"] or {}
            raise ApiError(error.get("message") or "the server ended the answer with an error")
        self.answer.completion_id = chunk.get("id") or self.answer.completion_id
        if chunk.get("usage"):
            self.answer.completion_tokens = chunk["usage"].get("completion_tokens")
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            if choice.get("finish_reason"):
                self.answer.finish_reason = choice["finish_reason"]
            delta = choice.get("delta") or {}
            # llmserve's, llama-server's and vLLM's name, and vLLM's newer one
            thought = delta.get("reasoning_content") or delta.get("reasoning")
            text = delta.get("content")
            if thought or text:
                if self.answer.first_token is None:
                    self.answer.first_token = time.monotonic()
                self.answer.chunks += 1
            if thought:
                self.answer.reasoning += thought
                yield Piece(thought, reasoning=True)
            if text:
                self.answer.text += text
                yield Piece(text)


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 400:
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            raise ApiError(error.get("message") or str(error), response.status_code,
                           error.get("param"))
        raise ApiError(f"HTTP {response.status_code}: {response.text[:200]}",
                       response.status_code)
    if not isinstance(body, dict):
        raise ApiError(f"not a JSON object: {response.text[:200]}", response.status_code)
    return body
