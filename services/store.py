"""Session registry, checkpoints and replay logs: Redis when a URL is given, else an in-process store.

Both stores implement `SessionStore` (async, the gateway's event loop) with the same semantics; the tests run
every behaviour against both. What lives here:

    session records   session -> tenant, status, replicas per stage, next sequence number, frames in/out,
                      created / last-seen (from an injectable clock), the resume token's hash
    checkpoints       the last checkpoint cut of a session: one SessionSnapshot per checkpointed stage, all
                      taken after the same request, plus JSON metadata (services/recovery.py)
    replay log        the requests processed since that cut, as the first checkpointed stage's input
                      (FramesIn or LatentChunk bytes); writing a cut empties it in the same transaction
    draining          replica ids per stage that take no new sessions and are being emptied

Redis layout (prefix `sana:`): hash `session:{id}`, set `sessions`, hash `ckpt:{id}` (field `meta`: JSON;
fields `{stage}:{i}`: the stage's snapshot cut into pieces of at most `piece_bytes`, because a Redis string
holds at most 512 MB and the 2B Ingest snapshot alone is ~941 MB), list `replay:{id}`, set `draining:{stage}`.

Non-goals: the job queue (a later issue), tenants' keys and quotas (records only carry the tenant name).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

Clock = Callable[[], float]

STATUSES = ("attached", "detached", "finished", "failed")
"""attached: a StreamEdit call drives it; detached: the client is gone, resumable until reaped."""


@dataclass
class SessionRecord:
    session_id: str
    tenant: str
    token_hash: str
    status: str = "attached"
    created: float = 0.0
    last_seen: float = 0.0
    next_seq: int = 0
    replicas: dict[str, str] = field(default_factory=dict)
    """stage -> replica unique id holding the session's part."""
    frames_in: int = 0
    frames_out: int = 0
    cut_chunks: int = 0
    """Chunks finished since the last checkpoint cut (services/recovery.py)."""
    prompt: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    output_format: int = 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> SessionRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})  # records of older builds load


class SessionStore(Protocol):
    clock: Clock

    async def create(self, rec: SessionRecord) -> None: ...
    async def get(self, session_id: str) -> SessionRecord | None: ...
    async def put(self, rec: SessionRecord) -> None: ...
    async def delete(self, session_id: str) -> None: ...
    async def list(self) -> list[SessionRecord]: ...
    async def idle(self, timeout_s: float) -> list[SessionRecord]: ...
    async def put_checkpoint(self, session_id: str, parts: dict[str, bytes], meta: dict) -> None: ...
    async def get_checkpoint(self, session_id: str) -> tuple[dict[str, bytes], dict] | None: ...
    async def append_replay(self, session_id: str, blob: bytes) -> None: ...
    async def get_replay(self, session_id: str) -> list[bytes]: ...
    async def set_draining(self, stage: str, replica_id: str, on: bool = True) -> None: ...
    async def draining(self, stage: str) -> set[str]: ...
    async def close(self) -> None: ...


def _is_idle(rec: SessionRecord, now: float, timeout_s: float) -> bool:
    """Not seen for `timeout_s`, whatever its status (a gateway skips the sessions its own streams drive: an
    attached session whose gateway died is reaped like a detached one)."""
    return now - rec.last_seen > timeout_s


class MemoryStore:
    """In-process store (one gateway replica): plain dicts, same behaviour as RedisStore."""

    def __init__(self, clock: Clock = time.time) -> None:
        self.clock = clock
        self._sessions: dict[str, str] = {}
        self._ckpt: dict[str, tuple[dict[str, bytes], str]] = {}
        self._replay: dict[str, list[bytes]] = {}
        self._draining: dict[str, set[str]] = {}

    async def create(self, rec: SessionRecord) -> None:
        if rec.session_id in self._sessions:
            raise KeyError(f"session {rec.session_id} exists")
        rec.created = rec.last_seen = self.clock()
        self._sessions[rec.session_id] = rec.to_json()

    async def get(self, session_id: str) -> SessionRecord | None:
        text = self._sessions.get(session_id)
        return None if text is None else SessionRecord.from_json(text)

    async def put(self, rec: SessionRecord) -> None:
        rec.last_seen = self.clock()
        self._sessions[rec.session_id] = rec.to_json()

    async def delete(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)
        self._ckpt.pop(session_id, None)
        self._replay.pop(session_id, None)

    async def list(self) -> list[SessionRecord]:
        return [SessionRecord.from_json(t) for t in list(self._sessions.values())]

    async def idle(self, timeout_s: float) -> list[SessionRecord]:
        now = self.clock()
        return [r for r in await self.list() if _is_idle(r, now, timeout_s)]

    async def put_checkpoint(self, session_id: str, parts: dict[str, bytes], meta: dict) -> None:
        self._ckpt[session_id] = (dict(parts), json.dumps(meta, sort_keys=True))
        self._replay[session_id] = []

    async def get_checkpoint(self, session_id: str) -> tuple[dict[str, bytes], dict] | None:
        got = self._ckpt.get(session_id)
        return None if got is None else (dict(got[0]), json.loads(got[1]))

    async def append_replay(self, session_id: str, blob: bytes) -> None:
        self._replay.setdefault(session_id, []).append(blob)

    async def get_replay(self, session_id: str) -> list[bytes]:
        return list(self._replay.get(session_id, []))

    async def set_draining(self, stage: str, replica_id: str, on: bool = True) -> None:
        s = self._draining.setdefault(stage, set())
        (s.add if on else s.discard)(replica_id)

    async def draining(self, stage: str) -> set[str]:
        return set(self._draining.get(stage, set()))

    async def close(self) -> None:
        pass


class RedisStore:
    """The same store in Redis (redis-py asyncio), shared by every gateway replica."""

    def __init__(self, url: str, clock: Clock = time.time, prefix: str = "sana:", piece_bytes: int = 256 << 20) -> None:
        import redis.asyncio as aioredis

        self.clock = clock
        self.url = url
        self.p = prefix
        self.piece_bytes = piece_bytes
        """Largest Redis value a checkpoint blob is cut into (Redis strings stop at 512 MB)."""
        self.r = aioredis.from_url(url)

    async def create(self, rec: SessionRecord) -> None:
        rec.created = rec.last_seen = self.clock()
        ok = await self.r.set(f"{self.p}session:{rec.session_id}", rec.to_json(), nx=True)
        if not ok:
            raise KeyError(f"session {rec.session_id} exists")
        await self.r.sadd(f"{self.p}sessions", rec.session_id)

    async def get(self, session_id: str) -> SessionRecord | None:
        text = await self.r.get(f"{self.p}session:{session_id}")
        return None if text is None else SessionRecord.from_json(text)

    async def put(self, rec: SessionRecord) -> None:
        rec.last_seen = self.clock()
        await self.r.set(f"{self.p}session:{rec.session_id}", rec.to_json())

    async def delete(self, session_id: str) -> None:
        keys = [f"{self.p}{k}:{session_id}" for k in ("session", "ckpt", "replay")]
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(*keys)
            pipe.srem(f"{self.p}sessions", session_id)
            await pipe.execute()

    async def list(self) -> list[SessionRecord]:
        ids = sorted(x.decode() for x in await self.r.smembers(f"{self.p}sessions"))
        if not ids:
            return []
        texts = await self.r.mget([f"{self.p}session:{i}" for i in ids])
        return [SessionRecord.from_json(t) for t in texts if t is not None]

    async def idle(self, timeout_s: float) -> list[SessionRecord]:
        now = self.clock()
        return [r for r in await self.list() if _is_idle(r, now, timeout_s)]

    async def put_checkpoint(self, session_id: str, parts: dict[str, bytes], meta: dict) -> None:
        key = f"{self.p}ckpt:{session_id}"
        n = self.piece_bytes
        fields: dict[str, bytes | str] = {"meta": json.dumps({**meta, "_pieces": {
            name: max(1, -(-len(blob) // n)) for name, blob in parts.items()}}, sort_keys=True)}  # fmt: skip
        for name, blob in parts.items():
            view = memoryview(blob)
            for i in range(max(1, -(-len(blob) // n))):
                fields[f"{name}:{i}"] = bytes(view[i * n : (i + 1) * n])
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(key)  # a cut replaces the previous one whole (no stale pieces)
            pipe.hset(key, mapping=fields)
            pipe.delete(f"{self.p}replay:{session_id}")
            await pipe.execute()

    async def get_checkpoint(self, session_id: str) -> tuple[dict[str, bytes], dict] | None:
        got = await self.r.hgetall(f"{self.p}ckpt:{session_id}")  # one command: one consistent cut
        if not got:
            return None
        meta = json.loads(got[b"meta"])
        pieces = meta.pop("_pieces")
        parts = {name: b"".join(got[f"{name}:{i}".encode()] for i in range(count)) for name, count in pieces.items()}
        return parts, meta

    async def append_replay(self, session_id: str, blob: bytes) -> None:
        await self.r.rpush(f"{self.p}replay:{session_id}", blob)

    async def get_replay(self, session_id: str) -> list[bytes]:
        return list(await self.r.lrange(f"{self.p}replay:{session_id}", 0, -1))

    async def set_draining(self, stage: str, replica_id: str, on: bool = True) -> None:
        key = f"{self.p}draining:{stage}"
        await (self.r.sadd(key, replica_id) if on else self.r.srem(key, replica_id))

    async def draining(self, stage: str) -> set[str]:
        return {x.decode() for x in await self.r.smembers(f"{self.p}draining:{stage}")}

    async def close(self) -> None:
        await self.r.aclose()


def make_store(redis_url: str | None, clock: Clock = time.time) -> SessionStore:
    return RedisStore(redis_url, clock) if redis_url else MemoryStore(clock)
