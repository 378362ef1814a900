"""What each endpoint does between the HTTP layer and the engine thread: checks a request, hands its
sequences to the `EngineLoop`, and assembles the OpenAI response from the events that come back, either
whole or as server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from anyio import CapacityLimiter, to_thread

from expertflow.api import ExpertflowModel
from expertflow.engine.steps import Sequence
from expertflow.engine.sampling import Sampler
from expertflow.server import schemas
from expertflow.server.errors import APIError, server_error
from expertflow.server.backend import EngineBackend
from expertflow.server.metrics import ServerMetrics
from expertflow.server.prompts import encode_prompts, encode_text, render_chat, token_limit
from expertflow.server.schemas import ChatRequest, Choice, CompletionRequest
from expertflow.server.scoring import logprobs_object
from expertflow.server.stream import Detokenizer, RequestStream

ChunkFn = Callable[[int, str, str | None], dict]   # (choice index, text delta, finish reason) -> chunk


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class Service:
    def __init__(self, model: ExpertflowModel, loop: EngineBackend, metrics: ServerMetrics) -> None:
        self.model = model
        self.loop = loop
        self.metrics = metrics
        self.model_id = model.name
        self.max_positions = model.engine.max_positions
        # Prompts are tokenized in a worker thread, as a prompt of megabytes takes seconds and would stall the
        # event loop; one at a time, as Hugging Face's fast tokenizers are not safe to share across threads.
        self._tokenizing = CapacityLimiter(1)

    def check_model(self, name: str) -> None:
        if name != self.model_id:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_id!r}",
                           param="model", code="model_not_found")

    # ---- completions ---------------------------------------------------------------------------
    async def completion(self, req: CompletionRequest) -> dict | AsyncIterator[str]:
        self.check_model(req.model)
        if req.stream and (req.echo or req.logprobs is not None):
            raise APIError(400, "echo and logprobs are answered whole: send them without stream",
                           param="stream", code="unsupported")
        prompts = await self._tokenize(encode_prompts, self.model.tokenizer, req.prompt,
                                       self.model.model.config.vocab_size)
        stream, texts = self._start(prompts, req, token_limit(prompts, req.max_tokens, self.max_positions))
        rid = schemas.new_id("cmpl")
        if req.stream:
            def chunk(index: int, text: str, reason: str | None) -> dict:
                return schemas.completion_chunk(rid, self.model_id, index, text, reason)
            return self._sse(stream, texts, prompts, chunk, None)
        choices = await self._collect(stream, texts, prompts)
        if req.echo or req.logprobs is not None:
            choices = [await self._with_logprobs(c, p, d, req) for c, p, d in zip(choices, prompts, texts)]
        return schemas.completion_body(rid, self.model_id, choices)

    async def _with_logprobs(self, choice: Choice, prompt: list[int], text: Detokenizer,
                             req: CompletionRequest) -> Choice:
        ids = prompt + text.tokens
        if req.echo:
            choice.text = self.model.decode(prompt) + choice.text
        if req.logprobs is not None:
            logp = await self.loop.score(ids)
            first = 0 if req.echo else len(prompt)
            choice.logprobs = logprobs_object(ids, logp, first, req.logprobs, self._piece)
        return choice

    def _piece(self, token: int) -> str:
        return self.model.tokenizer.decode([token])

    # ---- chat ----------------------------------------------------------------------------------
    async def chat(self, req: ChatRequest) -> dict | AsyncIterator[str]:
        self.check_model(req.model)
        prompt = [await self._tokenize(self._chat_ids, req.messages)]
        limit = token_limit(prompt, req.token_limit(), self.max_positions)
        stream, texts = self._start(prompt, req, limit)
        rid = schemas.new_id("chatcmpl")
        if req.stream:
            def chunk(_: int, text: str, reason: str | None) -> dict:  # the last chunk has an empty delta
                return schemas.chat_chunk(rid, self.model_id, {"content": text} if text or reason is None else {},
                                          reason)
            opening = schemas.chat_chunk(rid, self.model_id, {"role": "assistant", "content": ""}, None)
            return self._sse(stream, texts, prompt, chunk, opening)
        (choice,) = await self._collect(stream, texts, prompt)
        return schemas.chat_body(rid, self.model_id, choice)

    def _chat_ids(self, messages: list[schemas.ChatMessage]) -> list[int]:
        return encode_text(self.model.tokenizer, render_chat(self.model.tokenizer, messages), "messages")

    # ---- shared --------------------------------------------------------------------------------
    async def _tokenize(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await to_thread.run_sync(fn, *args, limiter=self._tokenizing)

    def _start(self, prompts: list[list[int]], req: schemas.GenerationRequest,
               limit: int) -> tuple[RequestStream, list[Detokenizer]]:
        """Hand one sequence per prompt to the engine thread; they join the batches at its next step."""
        stream = RequestStream(asyncio.get_running_loop())
        texts = [Detokenizer(self.model.decode, req.stop_strings()) for _ in prompts]
        for ids in prompts:
            seq = Sequence(self.loop.next_index(), ids, limit, Sampler(req.temperature, req.seed))
            stream.track(seq)
        for seq in stream.sequences:
            self.loop.add(seq, stream)
        return stream, texts

    def _on_token(self, stream: RequestStream, texts: list[Detokenizer], index: int, token: int) -> str:
        """The choice's new text; a stop string ends the choice at its next step."""
        text = texts[index]
        if text.stopped:  # tokens the engine made before it saw the stop
            return ""
        delta = text.push(token)
        if text.stopped:
            stream.sequences[index].cancelled = True
        return delta

    async def _collect(self, stream: RequestStream, texts: list[Detokenizer],
                       prompts: list[list[int]]) -> list[Choice]:
        start = time.perf_counter()
        first: float | None = None
        reasons: dict[int, str] = {}
        try:
            async for kind, index, value in stream.events():
                if kind == "token":
                    first = first if first is not None else time.perf_counter() - start
                    self._on_token(stream, texts, index, value)
                elif kind == "finish":
                    reasons[index] = schemas.FINISH_REASONS[value]
                else:
                    raise server_error(value)
        except BaseException:  # an engine failure, or the client went away: free the other choices' slots
            stream.cancel()
            raise
        choices = [Choice(i, t.text, reasons[i], len(p), len(t.tokens)) for i, (t, p) in
                   enumerate(zip(texts, prompts))]
        self._record(start, first, choices)
        return choices

    async def _sse(self, stream: RequestStream, texts: list[Detokenizer], prompts: list[list[int]],
                   chunk: ChunkFn, opening: dict | None) -> AsyncIterator[str]:
        start = time.perf_counter()
        first: float | None = None
        outcome = "cancelled"   # unless the stream reaches [DONE] or an engine failure
        try:
            if opening is not None:
                yield sse(opening)
            async for kind, index, value in stream.events():
                if kind == "token":
                    first = first if first is not None else time.perf_counter() - start
                    delta = self._on_token(stream, texts, index, value)
                    if delta:
                        yield sse(chunk(index, delta, None))
                elif kind == "finish":
                    yield sse(chunk(index, texts[index].flush(), schemas.FINISH_REASONS[value]))
                else:
                    outcome = "server_errors"
                    yield sse(server_error(value).body())
                    return
            outcome = "succeeded"
            yield sse("[DONE]")
        finally:  # the client left mid-stream (the generator is closed or cancelled): free its slots
            stream.cancel()
            if outcome == "succeeded":
                self._record(start, first, [Choice(i, "", "", len(p), len(t.tokens))
                                            for i, (t, p) in enumerate(zip(texts, prompts))])
            else:
                self.metrics.count(outcome)

    def _record(self, start: float, first: float | None, choices: list[Choice]) -> None:
        self.metrics.finished(time.perf_counter() - start, first, sum(c.prompt_tokens for c in choices),
                              sum(c.completion_tokens for c in choices))
