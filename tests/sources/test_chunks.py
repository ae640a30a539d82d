"""ChunkSource against a real Mosquitto, with a ChunkServer or a raw publisher on the other side."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random

import pytest

from core import protocol
from core.protocol import ChunkMessage
from proplet.sources import ChunkSource, FetchError, WasmRef
from proplet.sources.chunks import MAX_MISSING_PER_REQUEST
from tests.services import Mosquitto
from tests.sources.conftest import (
    LossyChunkServer,
    RawChunkPublisher,
    chunk_server,
    chunks_of,
    proplet_side,
    until,
)

pytestmark = pytest.mark.timeout(60)

REF = "registry.example/wasm/app:v1"


def module(size: int) -> bytes:
    return b"\0asm\1\0\0\0" + os.urandom(size - 8)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
async def test_in_order_transfer_reassembles_and_reports_the_digest(broker: Mosquitto, topics, binary) -> None:
    data = module(9_500)
    async with chunk_server(broker.url, topics, {REF: data}, chunk_size=1000) as server, \
            proplet_side(broker.url, topics, binary=binary) as source:
        got, digest = await source.fetch_with_digest(WasmRef("t1", image_url=REF))
    assert got == data
    assert digest == protocol.sha256_digest(data)
    assert [(r.missing, r.encoding) for r in server.requests] == [((), "binary" if binary else "")]
    assert source.counters.chunks == 10 and source.counters.resumes == 0
    assert source.counters.binary_chunks == (10 if binary else 0)
    assert source.active == () and source.buffered_bytes() == 0


async def test_a_binary_request_to_a_server_without_binary_chunks_is_answered_in_json(broker: Mosquitto,
                                                                                     topics) -> None:
    # Upstream's proxy ignores `encoding` and answers on registry/server as always.
    data = module(5_000)
    async with chunk_server(broker.url, topics, {REF: data}, chunk_size=1000, binary_topic=None) as server, \
            proplet_side(broker.url, topics, binary=True) as source:
        got = await asyncio.wait_for(source.fetch(WasmRef("t1", image_url=REF)), 5)
    assert got == data
    assert server.requests[0].encoding == "binary"
    assert source.counters.chunks == 5 and source.counters.binary_chunks == 0


async def test_binary_chunks_that_never_arrive_fall_back_to_json_for_good(broker: Mosquitto, topics) -> None:
    # As behind a broker ACL written before registry/server/binary existed: the server publishes
    # binary chunks where this proplet never receives them.
    data = module(3_000)
    async with chunk_server(broker.url, topics, {REF: data, "other/app:v2": data}, chunk_size=1000,
                            binary_topic=topics.topic("registry/server/dropped")) as server, \
            proplet_side(broker.url, topics, binary=True, stall_timeout=0.3) as source:
        assert await asyncio.wait_for(source.fetch(WasmRef("t1", image_url=REF)), 5) == data
        assert await asyncio.wait_for(source.fetch(WasmRef("t2", image_url="other/app:v2")), 5) == data
    assert [r.encoding for r in server.requests] == ["binary", "", ""]
    assert source.counters.json_fallbacks == 1 and source.counters.resumes == 1


async def test_binary_chunks_of_other_refs_are_dropped_unread_and_malformed_ones_counted(broker: Mosquitto,
                                                                                       topics) -> None:
    data = module(3_000)
    async with RawChunkPublisher(broker.url, topics) as raw, proplet_side(broker.url, topics, binary=True) as source:
        fetch = asyncio.create_task(source.fetch(WasmRef("t1", image_url=REF)))
        await raw.wait_requests(1)
        for chunk in chunks_of("other/app:1", module(4_000), 1000):
            await raw.send_binary(chunk)
        await raw.send_binary(b"no header line at all")
        await raw.send_binary(b"[1, 2]\n\0asm")
        await raw.send_binary(json.dumps({"app_name": REF, "chunk_idx": 0, "total_chunks": 3, "data": "AA=="}).encode()
                              + b"\n\0asm")
        await raw.send_binary(json.dumps({"app_name": REF, "chunk_idx": 3, "total_chunks": 3}).encode() + b"\nxx")
        for chunk in chunks_of(REF, data, 1000):
            await raw.send_binary(chunk)
        assert await asyncio.wait_for(fetch, 5) == data
    assert source.counters.ignored == 4
    assert source.counters.invalid == 4
    assert source.counters.binary_chunks == 3


async def test_out_of_order_and_duplicated_chunks(broker: Mosquitto, topics) -> None:
    data = module(20_000)
    chunks = chunks_of(REF, data, 1500)
    arrival = chunks + chunks[3:9]  # every chunk once, six of them twice
    random.Random(7).shuffle(arrival)
    assert arrival[0].chunk_idx != 0
    async with RawChunkPublisher(broker.url, topics) as raw, proplet_side(broker.url, topics) as source:
        fetch = asyncio.create_task(source.fetch(WasmRef("t1", image_url=REF)))
        await raw.wait_requests(1)
        for chunk in arrival:
            await raw.send(chunk)
        assert await asyncio.wait_for(fetch, 5) == data
    assert source.counters.duplicates == 6
    assert source.counters.resumes == 0


async def test_chunks_are_appended_in_order_whatever_order_they_arrive_in() -> None:
    # The module is built by appending chunks in index order; one that arrives early waits for
    # those before it. The last one first, then one from the middle, then the rest.
    data = module(10_500)
    source, fetch = await _fetch_fed_by_hand()
    chunks = chunks_of(REF, data, 1000)
    for chunk in [chunks[-1], chunks[4], *chunks[:4], *chunks[5:-1]]:
        source.on_chunk(chunk)
    got, digest = await asyncio.wait_for(fetch, 5)
    assert got == data and digest == protocol.sha256_digest(data)


async def test_upstreams_chunks_without_a_size_or_digest_make_the_module() -> None:
    data = module(10_500)
    source, fetch = await _fetch_fed_by_hand()
    chunks = chunks_of(REF, data, 1000, digest=False)
    for chunk in reversed(chunks):
        source.on_chunk(chunk)
    got, digest = await asyncio.wait_for(fetch, 5)
    assert got == data and digest == protocol.sha256_digest(data)


async def test_chunks_that_add_up_to_more_than_the_announced_size_fail_the_fetch() -> None:
    source, fetch = await _fetch_fed_by_hand()
    for chunk in (ChunkMessage(REF, 0, 2, b"a" * 1000, size=1500), ChunkMessage(REF, 1, 2, b"b" * 1000, size=1500)):
        source.on_chunk(chunk)
    with pytest.raises(FetchError, match=r"arrived as 2000 bytes but OCI proxy .* announced 1500"):
        await asyncio.wait_for(fetch, 5)
    assert source.active == () and source.counters.failed == 1


async def _fetch_fed_by_hand() -> tuple[ChunkSource, asyncio.Task[tuple[bytes | bytearray, str]]]:
    """A ChunkSource whose request has gone out, for chunks handed to on_chunk directly."""
    requested = asyncio.Event()

    async def publish(topic: str, payload: bytes) -> None:
        requested.set()

    source = ChunkSource(publish, "registry/proplet")
    fetch = asyncio.create_task(source.fetch_with_digest(WasmRef("t1", image_url=REF)))
    await asyncio.wait_for(requested.wait(), 5)
    return source, fetch


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
async def test_a_lost_chunk_is_asked_for_again_and_the_module_still_verifies(broker: Mosquitto, topics,
                                                                             binary) -> None:
    data = module(10_000)
    async with chunk_server(broker.url, topics, {REF: data}, server_cls=LossyChunkServer, lose={3},
                            chunk_size=1000) as server, \
            proplet_side(broker.url, topics, stall_timeout=0.3, binary=binary) as source:
        got, digest = await source.fetch_with_digest(WasmRef("t1", image_url=REF))
    assert got == data and digest == protocol.sha256_digest(data)
    assert server.server.lost == [3]  # type: ignore[attr-defined]
    # The first request asked for everything, the resume only for the lost index.
    assert [r.missing for r in server.requests] == [(), (3,)]
    assert {r.encoding for r in server.requests} == {"binary" if binary else ""}
    assert source.counters.resumes == 1


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
async def test_an_error_chunk_fails_the_fetch_at_once_with_the_servers_reason(broker: Mosquitto, topics,
                                                                              binary) -> None:
    async with chunk_server(broker.url, topics, {}) as _, \
            proplet_side(broker.url, topics, stall_timeout=30, binary=binary) as source:
        # Far below the stall timeout: the failure comes from the error chunk, not from waiting.
        with pytest.raises(FetchError, match=r"no artifact named registry\.example/wasm/app:v1 here"):
            await asyncio.wait_for(source.fetch(WasmRef("t1", image_url=REF)), 5)
    assert source.active == ()


async def test_the_stall_timeout_resumes_a_few_times_then_names_the_likely_cause(broker: Mosquitto, topics) -> None:
    async with RawChunkPublisher(broker.url, topics) as raw, \
            proplet_side(broker.url, topics, stall_timeout=0.2, max_resumes=2) as source:
        with pytest.raises(FetchError) as failure:
            await source.fetch(WasmRef("t1", image_url=REF))
        requests = await raw.wait_requests(3)
    assert str(failure.value) == (
        f"No chunk of {REF} arrived for 0.2 s after 3 requests; is the OCI proxy (propeller proxy) running "
        "and connected to the same broker, tenant and channel?")
    assert len(requests) == 3 and all(r.missing == () for r in requests)
    assert source.active == ()


async def test_a_stalled_partial_transfer_asks_only_for_what_is_missing_then_fails(broker: Mosquitto, topics) -> None:
    chunks = chunks_of(REF, module(5_000), 1000)
    async with RawChunkPublisher(broker.url, topics) as raw, \
            proplet_side(broker.url, topics, stall_timeout=0.2, max_resumes=1) as source:
        fetch = asyncio.create_task(source.fetch(WasmRef("t1", image_url=REF)))
        await raw.wait_requests(1)
        for chunk in (chunks[0], chunks[2], chunks[4]):
            await raw.send(chunk)
        with pytest.raises(FetchError, match=r"stalled \(3 of 5 chunks received\)"):
            await fetch
        requests = await raw.wait_requests(2)
    assert requests[1].missing == (1, 3)


async def test_a_chunk_announcing_millions_of_chunks_does_not_make_a_huge_resume_request(broker: Mosquitto,
                                                                                    topics) -> None:
    # One 10-byte chunk claiming 10**6 chunks made the stall's resume request list every missing
    # index: an 8 MB request built on the event loop (10**7 chunks: 79 MB and half a GB of memory).
    async with RawChunkPublisher(broker.url, topics) as raw, \
            proplet_side(broker.url, topics, stall_timeout=0.2, max_resumes=1) as source:
        fetch = asyncio.create_task(source.fetch(WasmRef("t1", image_url=REF)))
        await raw.wait_requests(1)
        await raw.send(ChunkMessage(REF, 0, 10**6, b"x" * 10))
        with pytest.raises(FetchError, match=r"stalled \(1 of 1000000 chunks received\)"):
            await fetch
        requests = await raw.wait_requests(2)
    assert requests[1].missing == tuple(range(1, 1 + MAX_MISSING_PER_REQUEST))


async def test_concurrent_fetches_of_one_ref_share_one_transfer(broker: Mosquitto, topics) -> None:
    data = module(50_000)
    async with chunk_server(broker.url, topics, {REF: data}, chunk_size=4096) as server, \
            proplet_side(broker.url, topics) as source:
        first, second = await asyncio.gather(
            source.fetch(WasmRef("t1", image_url=REF)), source.fetch(WasmRef("t2", image_url=REF)))
    assert first == data and second == data
    assert len(server.requests) == 1
    assert source.counters.requests == 1


async def test_chunks_of_other_refs_are_ignored_and_not_buffered(broker: Mosquitto, topics) -> None:
    mine = module(4_000)
    theirs = module(30_000)
    my_chunks = chunks_of(REF, mine, 1000)
    async with RawChunkPublisher(broker.url, topics) as raw, proplet_side(broker.url, topics) as source:
        # Before anyone here waits: nothing is kept.
        for chunk in chunks_of("other/app:1", theirs, 1000)[:5]:
            await raw.send(chunk)
        fetch = asyncio.create_task(source.fetch(WasmRef("t1", image_url=REF)))
        await raw.wait_requests(1)
        await raw.send(my_chunks[0])
        for chunk in chunks_of("other/app:1", theirs, 1000)[5:]:
            await raw.send(chunk)
        # An upstream-style encoder (spaces after the colons) must still reach us.
        last = my_chunks[-1]
        await raw.send(json.dumps({"app_name": REF, "chunk_idx": last.chunk_idx, "total_chunks": last.total_chunks,
                                   "data": base64.b64encode(last.data).decode()}).encode())
        await until(lambda: source.counters.chunks >= 2)
        assert source.buffered_bytes() == len(my_chunks[0].data) + len(last.data)
        for chunk in my_chunks[1:-1]:
            await raw.send(chunk)
        assert await asyncio.wait_for(fetch, 5) == mine
    assert source.counters.ignored == 30


async def test_a_tag_moved_mid_transfer_restarts_on_the_new_artifact(broker: Mosquitto, topics) -> None:
    old, new = module(3_000), module(3_000)
    async with RawChunkPublisher(broker.url, topics) as raw, proplet_side(broker.url, topics) as source:
        fetch = asyncio.create_task(source.fetch(WasmRef("t1", image_url=REF)))
        await raw.wait_requests(1)
        await raw.send(chunks_of(REF, old, 1000)[0])
        for chunk in chunks_of(REF, new, 1000):
            await raw.send(chunk)
        assert await asyncio.wait_for(fetch, 5) == new


async def test_a_tag_moved_while_the_last_hash_is_pending_restarts_cleanly() -> None:
    # Every chunk of the old artifact is in and its completion waits for the hashing thread when a
    # chunk of the new one arrives (fed synchronously: no turn of the loop in between).
    old, new = module(300_000), module(3_000)
    source, fetch = await _fetch_fed_by_hand()
    for chunk in chunks_of(REF, old, 100_000):
        source.on_chunk(chunk)
    first, *rest = chunks_of(REF, new, 1000)
    source.on_chunk(first)
    await asyncio.sleep(0.05)  # the old artifact's completion must not run on the new one's pieces
    for chunk in rest:
        source.on_chunk(chunk)
    data, digest = await asyncio.wait_for(fetch, 5)
    assert data == new and digest == protocol.sha256_digest(new)
    assert source.active == ()


@pytest.mark.parametrize(("bad", "message"), [
    (ChunkMessage(REF, 1, 7, b"x" * 1000), "disagree on their number"),
    (ChunkMessage(REF, 1, 3, b"x" * 1000, size=999_999), "larger than the proplet's limit"),
])
async def test_inconsistent_or_oversized_chunks_fail_the_fetch(broker: Mosquitto, topics, bad, message) -> None:
    async with RawChunkPublisher(broker.url, topics) as raw, \
            proplet_side(broker.url, topics, max_bytes=100_000) as source:
        fetch = asyncio.create_task(source.fetch(WasmRef("t1", image_url=REF)))
        await raw.wait_requests(1)
        if "number" in message:
            await raw.send(ChunkMessage(REF, 0, 3, b"y" * 1000))
        await raw.send(bad)
        with pytest.raises(FetchError, match=message):
            await asyncio.wait_for(fetch, 5)
    assert source.active == ()


async def test_more_bytes_than_the_limit_fail_even_without_a_size(broker: Mosquitto, topics) -> None:
    async with RawChunkPublisher(broker.url, topics) as raw, \
            proplet_side(broker.url, topics, max_bytes=2_500) as source:
        fetch = asyncio.create_task(source.fetch(WasmRef("t1", image_url=REF)))
        await raw.wait_requests(1)
        for chunk in chunks_of(REF, module(5_000), 1000, digest=False):
            await raw.send(chunk)
        with pytest.raises(FetchError, match=r"larger than the proplet's limit of 2\.441 KiB .*raise "
                           r"PROPLET_WASM_FETCH_MAX_BYTES on the proplet\."):
            await asyncio.wait_for(fetch, 5)


async def test_chunks_that_do_not_match_the_announced_digest_are_rejected(broker: Mosquitto, topics) -> None:
    data = module(3_000)
    chunks = chunks_of(REF, data, 1000)
    tampered = ChunkMessage(REF, 1, 3, b"\xff" * 1000, digest=chunks[1].digest, size=chunks[1].size)
    async with RawChunkPublisher(broker.url, topics) as raw, proplet_side(broker.url, topics) as source:
        fetch = asyncio.create_task(source.fetch(WasmRef("t1", image_url=REF)))
        await raw.wait_requests(1)
        for chunk in (chunks[0], tampered, chunks[2]):
            await raw.send(chunk)
        with pytest.raises(FetchError, match="chunks were corrupted on the way"):
            await asyncio.wait_for(fetch, 5)


async def test_a_cancelled_fetch_drops_its_state_and_later_chunks(broker: Mosquitto, topics) -> None:
    chunks = chunks_of(REF, module(3_000), 1000)
    async with RawChunkPublisher(broker.url, topics) as raw, proplet_side(broker.url, topics) as source:
        fetch = asyncio.create_task(source.fetch(WasmRef("t1", image_url=REF)))
        await raw.wait_requests(1)
        await raw.send(chunks[0])
        await until(lambda: source.buffered_bytes() > 0)
        fetch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fetch
        assert source.active == () and source.buffered_bytes() == 0
        before = source.counters.ignored
        await raw.send(chunks[1])
        await until(lambda: source.counters.ignored > before)
        assert source.buffered_bytes() == 0


async def test_malformed_chunks_are_counted_and_dropped(broker: Mosquitto, topics) -> None:
    data = module(2_000)
    async with RawChunkPublisher(broker.url, topics) as raw, proplet_side(broker.url, topics) as source:
        fetch = asyncio.create_task(source.fetch(WasmRef("t1", image_url=REF)))
        await raw.wait_requests(1)
        await raw.send(b"not json")
        await raw.send(json.dumps({"app_name": REF, "chunk_idx": 5, "total_chunks": 2, "data": ""}).encode())
        await raw.send(json.dumps({"app_name": REF, "chunk_idx": 0, "total_chunks": 2, "data": "%%%"}).encode())
        for chunk in chunks_of(REF, data, 1000):
            await raw.send(chunk)
        assert await asyncio.wait_for(fetch, 5) == data
    assert source.counters.invalid == 3


def test_accepts_every_non_http_image_url() -> None:
    async def publish(topic: str, payload: bytes) -> None:
        raise AssertionError("accepts() must not publish")

    source = ChunkSource(publish, "m/t/c/default/registry/proplet")
    assert source.accepts(WasmRef("t", image_url="ghcr.io/a/b:1"))
    assert source.accepts(WasmRef("t", image_url="blob:sha256:" + "0" * 64))
    assert not source.accepts(WasmRef("t", image_url="https://example.com/a.wasm"))
    assert not source.accepts(WasmRef("t", image_url="HTTP://example.com/a.wasm"))
    assert not source.accepts(WasmRef("t", file=b"\0asm"))
