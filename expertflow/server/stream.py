"""The asyncio side of a request: a `Listener` whose events cross from the engine thread into an
`asyncio.Queue`, and a `Detokenizer` that turns each choice's tokens into text deltas, honouring stop
strings.

Event kinds: ("token", index, token id), ("finish", index, finish reason), ("error", index, exception)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from expertflow.engine.steps import Sequence

Event = tuple[str, int, object]


class RequestStream:
    """One HTTP request's sequences (one per choice); implements `loop.Listener`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self.choice_of: dict[int, int] = {}   # sequence index -> choice index
        self.sequences: list[Sequence] = []   # in choice order

    def track(self, seq: Sequence) -> None:
        self.choice_of[seq.index] = len(self.sequences)
        self.sequences.append(seq)

    def cancel(self) -> None:
        """The client went away: each sequence leaves the engine at its next step."""
        for seq in self.sequences:
            seq.cancelled = True

    # ---- engine thread ----
    def on_token(self, seq: Sequence, token: int) -> None:
        self._send(("token", self.choice_of[seq.index], token))

    def on_finish(self, seq: Sequence) -> None:
        self._send(("finish", self.choice_of[seq.index], seq.finish_reason))

    def on_error(self, seq: Sequence, exc: BaseException) -> None:
        self._send(("error", self.choice_of[seq.index], exc))

    def _send(self, event: Event) -> None:
        if not self._loop.is_closed():  # the server shut down under a request: nobody to tell
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    # ---- event loop ----
    async def events(self) -> AsyncIterator[Event]:
        """Every event until each choice has finished or failed."""
        open_choices = len(self.sequences)
        while open_choices:
            event = await self._queue.get()
            if event[0] != "token":
                open_choices -= 1
            yield event


class Detokenizer:
    """Incremental text of one choice. Decodes the whole completion each time (byte-level BPE tokens are
    not text on their own) and holds back what could still become a stop string or a split character."""

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]) -> None:
        self._decode = decode
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.tokens: list[int] = []
        self.emitted = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """The new text safe to send after `token`; sets `stopped` when a stop string appeared."""
        self.tokens.append(token)
        text = self._decode(self.tokens)
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._take(text[:cut])
        safe = len(text) - self._hold
        while safe > self.emitted and text[safe - 1] == "\ufffd":  # an unfinished multi-byte character
            safe -= 1
        return self._take(text[:max(safe, self.emitted)])

    def flush(self) -> str:
        """The held-back rest, once the choice has finished without a stop string."""
        return "" if self.stopped else self._take(self._decode(self.tokens))

    def _take(self, text: str) -> str:
        delta = text[self.emitted:]
        self.emitted = max(self.emitted, len(text))
        return delta

    @property
    def text(self) -> str:
        full = self._decode(self.tokens)
        if self.stopped:
            return full[:min(i for i in (full.find(s) for s in self._stop) if i >= 0)]
        return full
