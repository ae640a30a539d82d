"""ModuleFetcher: source selection, digest verification, the signature hook; InlineSource alone."""

from __future__ import annotations

import hashlib

import pytest

from proplet.sources import FetchError, HttpSource, InlineSource, ModuleFetcher, WasmRef
from proplet.sources.fetcher import HASH_IN_THREAD_ABOVE

MODULE = b"\0asm\1\0\0\0" + bytes(range(256)) * 8
DIGEST = "sha256:" + hashlib.sha256(MODULE).hexdigest()


async def test_inline_source_returns_the_decoded_file() -> None:
    source = InlineSource()
    assert source.accepts(WasmRef("t", file=MODULE))
    assert not source.accepts(WasmRef("t", image_url="ghcr.io/a/b:1"))
    assert await source.fetch(WasmRef("t", file=MODULE)) == MODULE


async def test_a_matching_digest_passes_and_is_returned() -> None:
    fetcher = ModuleFetcher([InlineSource()])
    assert await fetcher.fetch(WasmRef("t", file=MODULE, digest=DIGEST)) == (MODULE, DIGEST)
    # Without an expected digest the module passes and its digest is still reported.
    assert await fetcher.fetch(WasmRef("t", file=MODULE)) == (MODULE, DIGEST)
    assert fetcher.fetched["InlineSource"] == 2


async def test_a_digest_mismatch_stops_the_module() -> None:
    fetcher = ModuleFetcher([InlineSource()])
    wanted = "sha256:" + "ab" * 32
    with pytest.raises(FetchError) as failure:
        await fetcher.fetch(WasmRef("t", file=MODULE, digest=wanted))
    assert str(failure.value).startswith(f"The module's sha256 is {DIGEST} but the task expects {wanted}.")
    assert fetcher.digest_mismatches == 1
    assert fetcher.fetched["InlineSource"] == 0


async def test_large_modules_are_hashed_correctly_off_the_loop() -> None:
    big = bytes(HASH_IN_THREAD_ABOVE + 1)
    digest = "sha256:" + hashlib.sha256(big).hexdigest()
    assert await ModuleFetcher([InlineSource()]).fetch(WasmRef("t", file=big, digest=digest)) == (big, digest)


async def test_the_first_accepting_source_wins() -> None:
    class Fixed:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def accepts(self, ref: WasmRef) -> bool:
            return True

        async def fetch(self, ref: WasmRef) -> bytes:
            return self.data

    fetcher = ModuleFetcher([InlineSource(), Fixed(b"second")])
    assert (await fetcher.fetch(WasmRef("t", file=MODULE)))[0] == MODULE
    assert (await fetcher.fetch(WasmRef("t", image_url="x/y:1")))[0] == b"second"


async def test_a_ref_no_source_accepts_is_a_clear_error() -> None:
    async with HttpSource() as http:
        fetcher = ModuleFetcher([InlineSource(), http])
        with pytest.raises(FetchError, match="Task t7 names no module: its start message has neither a file nor an"):
            await fetcher.fetch(WasmRef("t7"))
        with pytest.raises(FetchError, match=r"this proplet has no way to fetch 'ghcr\.io/a/b:1'"):
            await fetcher.fetch(WasmRef("t7", image_url="ghcr.io/a/b:1"))


async def test_an_unexpected_source_error_becomes_a_fetch_error() -> None:
    class Broken:
        def accepts(self, ref: WasmRef) -> bool:
            return True

        async def fetch(self, ref: WasmRef) -> bytes:
            raise KeyError("surprise")

    with pytest.raises(FetchError, match=r"failed unexpectedly \(KeyError: 'surprise'\)"):
        await ModuleFetcher([Broken()]).fetch(WasmRef("t", image_url="x/y:1"))


async def test_the_signature_hook_sees_the_verified_digest_and_can_refuse() -> None:
    seen: list[tuple[str, str]] = []

    class Verifier:
        def __init__(self, trusted: set[str]) -> None:
            self.trusted = trusted

        async def verify(self, ref: WasmRef, data: bytes, digest: str) -> None:
            seen.append((ref.task_id, digest))
            if digest not in self.trusted:
                raise FetchError(f"{digest} is not signed by a trusted key")

    trusting = ModuleFetcher([InlineSource()], verifier=Verifier({DIGEST}))
    assert (await trusting.fetch(WasmRef("a", file=MODULE)))[1] == DIGEST
    with pytest.raises(FetchError, match="is not signed by a trusted key"):
        await ModuleFetcher([InlineSource()], verifier=Verifier(set())).fetch(WasmRef("b", file=MODULE))
    assert seen == [("a", DIGEST), ("b", DIGEST)]
