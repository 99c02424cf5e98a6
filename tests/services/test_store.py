"""The session registry: the in-process store and the Redis store behave the same (injectable clock)."""

from __future__ import annotations

import asyncio

import pytest

from services.store import MemoryStore, RedisStore, SessionRecord


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "redis"])
def store(request):
    clock = Clock()
    if request.param == "memory":
        s = MemoryStore(clock)
    else:
        import uuid

        # 3-byte pieces: checkpoint blobs are cut into several Redis values and put back together
        s = RedisStore(request.getfixturevalue("redis_url"), clock, prefix=f"t{uuid.uuid4().hex[:8]}:", piece_bytes=3)
    yield s, clock
    asyncio.run(s.close()) if request.param == "memory" else None


def test_records_idle_reaping_checkpoints_replay_draining(store):
    s, clock = store

    async def go():
        await s.create(SessionRecord("a", "t1", "h"))
        await s.create(SessionRecord("b", "t1", "h", status="detached"))
        with pytest.raises(KeyError):
            await s.create(SessionRecord("a", "t1", "h"))
        rec = await s.get("a")
        assert rec.tenant == "t1" and rec.created == 1000.0
        rec.replicas["generator"] = "r1"
        rec.next_seq = 7
        clock.now = 1005.0
        await s.put(rec)
        back = await s.get("a")
        assert back.replicas == {"generator": "r1"} and back.next_seq == 7 and back.last_seen == 1005.0
        assert [r.session_id for r in await s.idle(3.0)] == ["b"]  # b last seen at 1000
        clock.now = 1010.0
        assert sorted(r.session_id for r in await s.idle(3.0)) == ["a", "b"]
        cut = {"ingest": b"ingest-part", "generator": b"gen", "egress": b""}
        await s.put_checkpoint("a", cut, {"next_seq": 5})
        await s.append_replay("a", b"x")
        await s.append_replay("a", b"y")
        assert await s.get_checkpoint("a") == (cut, {"next_seq": 5}) and await s.get_replay("a") == [b"x", b"y"]
        await s.put_checkpoint("a", {"generator": b"g2"}, {"next_seq": 8})  # replaces the whole cut, empties the log
        assert await s.get_checkpoint("a") == ({"generator": b"g2"}, {"next_seq": 8})
        assert await s.get_replay("a") == []
        await s.set_draining("generator", "r1")
        assert await s.draining("generator") == {"r1"}
        await s.set_draining("generator", "r1", on=False)
        assert await s.draining("generator") == set()
        await s.delete("a")
        assert await s.get("a") is None and await s.get_checkpoint("a") is None
        assert [r.session_id for r in await s.list()] == ["b"]
        await s.delete("b")
        if isinstance(s, RedisStore):
            await s.close()

    asyncio.run(go())
