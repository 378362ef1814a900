"""`expertflow serve --replicas N`: N engine replicas as Ray actors behind the one FastAPI app.

Each `Replica` actor loads its own model (so its own expert cache) and runs the usual `EngineLoop`; the
driver's `ReplicaRouter` is the service's `EngineBackend`: it places each sequence with a `Placement`
(routing-aware from the RPP's predicted path of the prompt, or round-robin) and relays the replica's
events back to the request's listener through a Ray streaming generator. A replica that dies fails only
the sequences it was running (their requests get 5xx error objects); Ray restarts it (`max_restarts`) and
it loads the model again while the others keep serving.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray.exceptions import ActorDiedError, RayError

from expertflow.api import ExpertflowModel
from expertflow.engine.steps import BatchRunner, Sequence
from expertflow.config import EngineConfig
from expertflow.distributed.placement import (Placement, ReplicaSet, RoundRobin, RoutingPath, placement_class,
                                              prompt_path)
from expertflow.engine.sampling import Sampler
from expertflow.scheduler import scheduler_class
from expertflow.server import ServeConfig
from expertflow.server.loop import EngineLoop, Listener
from expertflow.server.metrics import ServerMetrics
from expertflow.server.service import Service

log = logging.getLogger(__name__)

Event = tuple[str, Any]   # ("token", id) | ("finish", reason) | ("error", message)


@dataclass(frozen=True)
class ReplicaConfig:
    replicas: int = 2
    placement: str = "routing"
    max_restarts: int = -1            # Ray restarts a dead replica this many times (-1: always)
    num_cpus: float = 1.0             # Ray CPUs reserved per replica
    threads: int | None = None        # torch threads per replica (default: Ray's, one per reserved CPU)

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        placement_class(self.placement)
        if self.num_cpus <= 0:
            raise ValueError(f"num_cpus per replica must be > 0, got {self.num_cpus}")


class _Outbox:
    """A `Listener` inside the actor: events cross from its engine thread to the actor's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def on_token(self, seq: Sequence, token: int) -> None:
        self._loop.call_soon_threadsafe(self.queue.put_nowait, ("token", token))

    def on_finish(self, seq: Sequence) -> None:
        self._loop.call_soon_threadsafe(self.queue.put_nowait, ("finish", seq.finish_reason))

    def on_error(self, seq: Sequence, exc: BaseException) -> None:
        self._loop.call_soon_threadsafe(self.queue.put_nowait, ("error", f"{type(exc).__name__}: {exc}"))


class Replica:
    """One engine replica (an async Ray actor): its model, expert cache and engine thread."""

    def __init__(self, engine_config: EngineConfig, serve_config: ServeConfig, threads: int | None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.model = ExpertflowModel(engine_config)
        runner = BatchRunner(self.model.engine, scheduler_class(serve_config.scheduler)(),
                             serve_config.max_batch_size, unit=2)
        self.loop = EngineLoop(runner)
        self.loop.start()
        self.sequences: dict[int, Sequence] = {}

    async def ready(self) -> bool:
        return True

    async def generate(self, index: int, prompt: list[int], max_new_tokens: int, temperature: float,
                       seed: int | None) -> AsyncIterator[list[Event]]:
        """The sequence's events, in batches of whatever arrived since the last one (fewer Ray objects)."""
        seq = Sequence(index, prompt, max_new_tokens, Sampler(temperature, seed))
        outbox = _Outbox(asyncio.get_running_loop())
        self.sequences[index] = seq
        self.loop.add(seq, outbox)
        try:
            while True:
                events = [await outbox.queue.get()]
                while not outbox.queue.empty():
                    events.append(outbox.queue.get_nowait())
                yield events
                if events[-1][0] != "token":
                    return
        finally:  # the router went away (its generator was dropped): free the slot
            seq.cancelled = True
            self.sequences.pop(index, None)

    async def cancel(self, index: int) -> None:
        if index in self.sequences:
            self.sequences[index].cancelled = True

    async def score(self, ids: list[int]) -> torch.Tensor:
        return await self.loop.score(ids)

    async def status(self) -> dict:
        return {"running": self.loop.running, "engine_alive": self.loop.alive,
                "cache": await self.loop.cache_report()}


@dataclass
class _ReplicaState:
    handle: Any
    restarts: int = 0             # deaths seen by the router (Ray restarted the actor after each)
    failed: int = 0               # sequences failed because the replica died under them
    pending_restart: asyncio.Task | None = field(default=None, repr=False)


class ReplicaRouter:
    """The `EngineBackend` over Ray replicas. `predict(prompt ids)` gives a request's routing path for
    the placement; without it every path is empty (routing-aware placement needs a predictor)."""

    STATUS_TIMEOUT = 2.0   # seconds /health waits for a replica before calling it unavailable

    def __init__(self, handles: list[Any], placement: Placement,
                 predict: Callable[[list[int]], RoutingPath] | None) -> None:
        self.handles = list(handles)
        self._replicas = [_ReplicaState(h) for h in handles]
        self.placement = placement
        self._predict = predict
        self._set = ReplicaSet(len(handles))
        self._ids = itertools.count()
        self._tasks: set[asyncio.Task] = set()
        self._stopped = False

    def start(self) -> None:
        """The actors were started when the router was built (`build_router`)."""

    def stop(self) -> None:
        self._stopped = True
        for replica in self._replicas:
            ray.kill(replica.handle, no_restart=True)

    @property
    def alive(self) -> bool:
        return not self._stopped

    @property
    def running(self) -> int:
        return sum(self._set.load(r) for r in range(self._set.num_replicas))

    def next_index(self) -> int:
        return next(self._ids)

    def add(self, seq: Sequence, listener: Listener) -> None:
        task = asyncio.get_running_loop().create_task(self._run(seq, listener))
        self._tasks.add(task)   # asyncio keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def _run(self, seq: Sequence, listener: Listener) -> None:
        path = await asyncio.to_thread(self._predict, seq.prompt) if self._predict else frozenset()
        r = self.placement.choose(path, self._set)
        self._set.add(r, path)
        try:
            await self._relay(r, seq, listener)
        finally:
            self._set.remove(r, path)

    async def _relay(self, r: int, seq: Sequence, listener: Listener) -> None:
        replica = self._replicas[r]
        events = replica.handle.generate.options(num_returns="streaming").remote(
            seq.index, seq.prompt, seq.max_new_tokens, seq.sampler.temperature, _seed(seq.sampler))
        told_cancel = False
        try:
            async for ref in events:
                for kind, value in await ref:
                    if kind == "token":
                        listener.on_token(seq, value)
                    elif kind == "finish":
                        seq.finish_reason = value
                        listener.on_finish(seq)
                        return  # not waiting for the stream's end: a death after this is not this sequence's
                    else:
                        listener.on_error(seq, RuntimeError(value))
                        return
                if seq.cancelled and not told_cancel:  # a stop string, or the client left
                    replica.handle.cancel.remote(seq.index)
                    told_cancel = True
        except RayError as exc:  # the replica died under this sequence
            log.warning("replica %d died while running sequence %d: %s", r, seq.index, exc)
            replica.failed += 1
            self._note_death(replica)
            listener.on_error(seq, RuntimeError(f"replica {r} died: {type(exc).__name__}"))

    def _note_death(self, replica: _ReplicaState) -> None:
        """Count one death per restart, however many sequences it took with it."""
        if replica.pending_restart is None or replica.pending_restart.done():
            replica.restarts += 1
            replica.pending_restart = asyncio.get_running_loop().create_task(self._await_ready(replica))

    @staticmethod
    async def _await_ready(replica: _ReplicaState) -> None:
        """Until Ray has restarted the actor (calls fail as unavailable meanwhile) or given it up."""
        while True:
            try:
                await replica.handle.ready.remote()
                return
            except ActorDiedError:
                log.warning("a replica died for good (no restarts left)")
                return
            except RayError:
                await asyncio.sleep(0.5)

    async def score(self, ids: list[int]) -> torch.Tensor:
        r = min(range(self._set.num_replicas), key=self._set.load)
        return await self._replicas[r].handle.score.remote(ids)

    async def _statuses(self) -> list[dict | None]:
        async def one(replica: _ReplicaState) -> dict | None:
            try:
                return await asyncio.wait_for(replica.handle.status.remote(), self.STATUS_TIMEOUT)
            except (RayError, asyncio.TimeoutError):
                return None
        return list(await asyncio.gather(*[one(r) for r in self._replicas]))

    async def cache_report(self) -> dict:
        return sum_cache_figures([s["cache"] for s in await self._statuses() if s is not None])

    async def report(self) -> dict:
        rows = []
        for r, (replica, status) in enumerate(zip(self._replicas, await self._statuses())):
            restarting = replica.pending_restart is not None and not replica.pending_restart.done()
            state = "ok" if status is not None and status["engine_alive"] else (
                "restarting" if restarting else "unavailable")
            rows.append({"replica": r, "state": state, "running": self._set.load(r), "restarts": replica.restarts,
                         "failed_sequences": replica.failed,
                         "cache_hit_ratio": None if status is None else status["cache"]["hit_ratio"]})
        return {"placement": self.placement.name, "replicas": rows}


def sum_cache_figures(reports: list[dict]) -> dict:
    """The replicas' cache figures added up, the hit ratio recomputed from the summed counts."""
    if not reports:
        return {}
    total = {key: sum(r[key] for r in reports) for key in reports[0] if key != "hit_ratio"}
    uses = total["hits"] + total["correction_loads"]
    return {"hit_ratio": total["hits"] / uses if uses else 1.0, **total}


def _seed(sampler: Sampler) -> int:
    """The seed a Sampler was made with (its generator's initial seed), to make the same one remotely."""
    return sampler.generator.initial_seed()


def predictor_path_fn(model: ExpertflowModel) -> Callable[[list[int]], RoutingPath] | None:
    """The request's predicted routing path (top-k per layer of the RPP's forecast after the prompt's last
    token: what its first decode step needs), or None if the model has no predictor."""
    predictor = model.engine.predictor
    if predictor is None:
        return None
    top_k = model.top_k

    def predict(ids: list[int]) -> RoutingPath:
        with torch.inference_mode():
            return prompt_path(predictor.predict([ids])[0].cpu().numpy(), top_k, "last")
    return predict


def build_router(model: ExpertflowModel, serve_config: ServeConfig, config: ReplicaConfig) -> ReplicaRouter:
    """Start the replica actors (on the Ray cluster this process is connected to, or a new local one)."""
    if not ray.is_initialized():  # enough logical CPUs that every replica gets placed on a small machine
        cpus = max(os.cpu_count() or 1, math.ceil(config.replicas * config.num_cpus))
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    actor = ray.remote(num_cpus=config.num_cpus, max_restarts=config.max_restarts)(Replica)
    handles = [actor.remote(model.config, serve_config, config.threads) for _ in range(config.replicas)]
    ray.get([h.ready.remote() for h in handles])
    predict = predictor_path_fn(model)
    placement = placement_class(config.placement)()
    if config.placement == "routing" and predict is None:
        log.warning("routing-aware placement needs a routing predictor (--predictor); placing round-robin")
        placement = RoundRobin()
    return ReplicaRouter(handles, placement, predict)


def build_replica_service(model: ExpertflowModel, serve_config: ServeConfig, config: ReplicaConfig) -> Service:
    """A service whose requests run on Ray replicas; `model` (in this process) tokenizes and detokenizes."""
    return Service(model, build_router(model, serve_config, config), ServerMetrics())
