"""HttpSource against a real HTTP server started by the test (asyncio streams, minimal HTTP/1.1),
so each response can misbehave exactly as needed: wrong type, huge or missing length, stalls."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from proplet.sources import FetchError, HttpSource, ModuleFetcher, WasmRef
from tests.services import free_port
from tests.tls import self_signed

pytestmark = pytest.mark.timeout(60)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class HttpServer:
    """Routes by path; each handler writes the raw response. `hung_up[path]` is set when the client
    closed the connection while the handler was still sending or waiting."""

    def __init__(self, routes: dict[str, Handler], *, tls: ssl.SSLContext | None = None) -> None:
        self.routes = routes
        self.tls = tls
        self.port = 0
        self.hung_up: dict[str, asyncio.Event] = {path: asyncio.Event() for path in routes}
        self.requests: list[str] = []
        self.headers: list[bytes] = []  # each request's header lines, lowercased
        self._server: asyncio.Server | None = None

    def url(self, path: str) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}{path}"

    async def __aenter__(self) -> HttpServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                path = line.split()[1].decode()
                head = b""
                while (header := await reader.readline()).strip():
                    head += header.lower()
                self.headers.append(head)
                self.requests.append(path)
                handler = self.routes.get(path)
                if handler is None:
                    await respond(writer, b"", status="404 Not Found", content_type="text/plain")
                    continue
                try:
                    await handler(reader, writer)
                except (ConnectionError, asyncio.CancelledError):
                    self.hung_up[path].set()
                    raise
                if writer.is_closing():
                    return
        except (ConnectionError, ssl.SSLError, IndexError):
            return
        except asyncio.CancelledError:
            # The test's loop closing cancels a connection kept alive. Left cancelled, the task makes
            # the done-callback asyncio 3.11's start_server puts on it raise (task.exception()).
            return
        finally:
            writer.close()


async def respond(writer: asyncio.StreamWriter, body: bytes, *, status: str = "200 OK",
                  content_type: str | None = "application/wasm", length: int | None = -1,
                  extra: str = "") -> None:
    head = f"HTTP/1.1 {status}\r\n"
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n"
    if length is not None:
        head += f"Content-Length: {len(body) if length == -1 else length}\r\n"
    writer.write((head + extra + "\r\n").encode() + body)
    await writer.drain()


def serve(body: bytes, **kwargs: object) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await respond(writer, body, **kwargs)  # type: ignore[arg-type]

    return handler


async def wait_for_hang_up(reader: asyncio.StreamReader) -> None:
    """Send nothing more; return (raising) once the client has closed the connection."""
    await reader.read()
    raise ConnectionResetError("client closed the connection")


MODULE = b"\0asm\1\0\0\0" + os.urandom(300_000)


@pytest.fixture
async def source() -> AsyncIterator[HttpSource]:
    async with HttpSource(max_bytes=1_000_000, read_timeout=30) as src:
        yield src


async def test_fetches_the_module_and_its_digest(source: HttpSource) -> None:
    async with HttpServer({"/m.wasm": serve(MODULE, content_type="application/wasm; charset=binary"),
                           "/plain": serve(MODULE, content_type=None),
                           "/octets": serve(MODULE, content_type="application/octet-stream")}) as server:
        for path in ("/m.wasm", "/plain", "/octets"):
            data, digest = await source.fetch_with_digest(WasmRef("t", image_url=server.url(path)))
            assert data == MODULE
            assert digest == "sha256:" + hashlib.sha256(MODULE).hexdigest()
    assert source.fetched_bytes == 3 * len(MODULE)


@pytest.mark.parametrize("framing", ["content-length", "chunked", "gzip"])
async def test_a_module_of_several_hash_batches_gets_the_digest_of_all_its_bytes_in_order(framing: str) -> None:
    """The body is hashed on a thread in batches of HASH_BATCH_BYTES, in order, whatever the framing:
    httpx hands the pieces over differently for a known length, chunked framing and a compressed
    body."""
    import gzip

    from proplet.sources.http import HASH_BATCH_BYTES

    big = b"\0asm\1\0\0\0" + os.urandom(2 * HASH_BATCH_BYTES + 123_457)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if framing == "content-length":
            await respond(writer, big)
        elif framing == "gzip":
            await respond(writer, gzip.compress(big, compresslevel=1), extra="Content-Encoding: gzip\r\n")
        else:
            await respond(writer, b"", length=None, extra="Transfer-Encoding: chunked\r\n")
            for start in range(0, len(big), 100_000):
                piece = big[start:start + 100_000]
                writer.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    async with HttpSource(max_bytes=2 * len(big)) as http, HttpServer({"/big.wasm": handler}) as server:
        data, digest = await http.fetch_with_digest(WasmRef("t", image_url=server.url("/big.wasm")))
    assert data == big
    assert digest == "sha256:" + hashlib.sha256(big).hexdigest()


async def test_follows_redirects(source: HttpSource) -> None:
    async def redirect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await respond(writer, b"", status="302 Found", content_type=None,
                      extra=f"Location: http://127.0.0.1:{server.port}/m.wasm\r\n")

    async with HttpServer({"/old": redirect, "/m.wasm": serve(MODULE)}) as server:
        assert await source.fetch(WasmRef("t", image_url=server.url("/old"))) == MODULE


async def test_an_http_error_names_the_status(source: HttpSource) -> None:
    unavailable = serve(b"oops", status="503 Service Unavailable", content_type="text/plain")
    async with HttpServer({"/boom": unavailable}) as server:
        with pytest.raises(FetchError, match=r"failed: the server answered HTTP 404 Not Found\. Check that the file"):
            await source.fetch(WasmRef("t", image_url=server.url("/missing.wasm")))
        with pytest.raises(FetchError, match="HTTP 503 Service Unavailable"):
            await source.fetch(WasmRef("t", image_url=server.url("/boom")))


async def test_a_wrong_content_type_is_refused(source: HttpSource) -> None:
    async with HttpServer({"/page": serve(b"<html></html>", content_type="text/html; charset=utf-8")}) as server:
        with pytest.raises(FetchError, match=r"served as 'text/html; charset=utf-8', which is not a wasm module"):
            await source.fetch(WasmRef("t", image_url=server.url("/page")))


async def test_a_content_length_over_the_limit_fails_before_any_body_byte(source: HttpSource) -> None:
    async def huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Announce 2 GB and send none of it: a client that tried to read the body would sit here
        # until its 30 s read timeout instead of hanging up at once.
        await respond(writer, b"", length=2_000_000_000)
        await wait_for_hang_up(reader)

    async with HttpServer({"/huge": huge}) as server:
        # The way out names the setting: "raise the proplet's fetch limit" left the operator to find it.
        expected = (r"is 1\.863 GiB \(2000000000 bytes\), over the proplet's limit of 976\.6 KiB for a module\. "
                    r"Ship a smaller module or raise PROPLET_WASM_FETCH_MAX_BYTES on the proplet\.")
        with pytest.raises(FetchError, match=expected):
            await asyncio.wait_for(source.fetch(WasmRef("t", image_url=server.url("/huge"))), 5)
        await asyncio.wait_for(server.hung_up["/huge"].wait(), 5)
    assert source.fetched_bytes == 0


@pytest.mark.parametrize("framing", ["close-delimited", "chunked"])
async def test_a_body_without_content_length_is_capped_while_streaming(source: HttpSource, framing: str) -> None:
    sent = 0

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        extra = "Transfer-Encoding: chunked\r\n" if framing == "chunked" else "Connection: close\r\n"
        await respond(writer, b"", length=None, extra=extra)
        piece = b"\0" * 65536
        while sent < 50_000_000:
            if framing == "chunked":
                writer.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
            else:
                writer.write(piece)
            sent += len(piece)
            await writer.drain()

    async with HttpServer({"/endless": endless}) as server:
        with pytest.raises(FetchError, match=r"sent more than the proplet's limit of 976\.6 KiB .*raise "
                           r"PROPLET_WASM_FETCH_MAX_BYTES on the proplet\."):
            await asyncio.wait_for(source.fetch(WasmRef("t", image_url=server.url("/endless"))), 10)
        await asyncio.wait_for(server.hung_up["/endless"].wait(), 5)
    # The client stopped near the limit, not after the 50 MB the server was ready to send.
    assert 1_000_000 < source.fetched_bytes <= 1_000_000 + 2 * 65536
    assert sent < 20_000_000


async def test_a_body_shorter_than_its_content_length_is_an_error(source: HttpSource) -> None:
    async def short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await respond(writer, MODULE[:1000], length=len(MODULE))
        writer.close()

    async with HttpServer({"/short": short}) as server:
        with pytest.raises(FetchError, match="The server broke off the download"):
            await source.fetch(WasmRef("t", image_url=server.url("/short")))


async def test_a_server_that_stops_sending_times_out() -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await respond(writer, MODULE[:1000], length=len(MODULE))
        await wait_for_hang_up(reader)

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await wait_for_hang_up(reader)

    async with HttpSource(read_timeout=0.3) as source, HttpServer({"/stall": stall, "/silent": silent}) as server:
        for path in ("/stall", "/silent"):
            with pytest.raises(FetchError, match=r"stopped sending data for 0.3 s; the download was abandoned"):
                await asyncio.wait_for(source.fetch(WasmRef("t", image_url=server.url(path))), 5)
    assert source.failures == 2


async def test_a_slow_drip_hits_the_total_timeout() -> None:
    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await respond(writer, b"", length=len(MODULE))
        for i in range(len(MODULE)):
            writer.write(MODULE[i:i + 1])
            await writer.drain()
            await asyncio.sleep(0.05)

    async with HttpSource(read_timeout=5, total_timeout=0.5) as source, HttpServer({"/drip": drip}) as server:
        with pytest.raises(FetchError, match=r"took longer than 0.5 s and was abandoned"):
            await asyncio.wait_for(source.fetch(WasmRef("t", image_url=server.url("/drip"))), 5)


async def test_nothing_listening_is_a_clear_error(source: HttpSource) -> None:
    url = f"http://127.0.0.1:{free_port()}/m.wasm?X-Amz-Signature=secret"
    with pytest.raises(FetchError) as failure:
        await source.fetch(WasmRef("t", image_url=url))
    message = str(failure.value)
    assert message.startswith("Cannot connect to 127.0.0.1 for http://127.0.0.1:")
    assert "/m.wasm?…" in message and "secret" not in message


# ---- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (cert file doubles as the CA file)."""
    return self_signed(tmp_path_factory.mktemp("tls"))


async def test_https_with_the_servers_ca_or_without_verification(certificate: tuple[Path, Path]) -> None:
    cert_file, key_file = certificate
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert_file, key_file)
    async with HttpServer({"/m.wasm": serve(MODULE)}, tls=tls) as server:
        url = server.url("/m.wasm")
        async with HttpSource() as default:
            with pytest.raises(FetchError, match=r"TLS with 127.0.0.1 failed .*PROPLET_HTTP_TLS_CA_CERT"):
                await default.fetch(WasmRef("t", image_url=url))
        async with HttpSource(ca_file=str(cert_file)) as with_ca:
            assert await with_ca.fetch(WasmRef("t", image_url=url)) == MODULE
        async with HttpSource(insecure_skip_verify=True) as insecure:
            assert await insecure.fetch(WasmRef("t", image_url=url)) == MODULE


def test_an_unreadable_ca_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fix PROPLET_HTTP_TLS_CA_CERT"):
        HttpSource(ca_file=str(tmp_path / "missing.pem"))


async def test_through_the_fetcher_the_digest_is_verified(source: HttpSource) -> None:
    fetcher = ModuleFetcher([source])
    good = "sha256:" + hashlib.sha256(MODULE).hexdigest()
    async with HttpServer({"/m.wasm": serve(MODULE)}) as server:
        url = server.url("/m.wasm")
        assert await fetcher.fetch(WasmRef("t", image_url=url, digest=good)) == (MODULE, good)
        with pytest.raises(FetchError, match=f"The module's sha256 is {good} but the task expects sha256:0000"):
            await fetcher.fetch(WasmRef("t", image_url=url, digest="sha256:" + "0" * 64))


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_compressed_body_is_capped_on_its_decoded_bytes_without_inflating_past_the_limit(
        source: HttpSource, encoding: str) -> None:
    """A gzip bomb: ~200 KB on the wire that inflates to 200 MB. The limit counts decoded bytes, and
    about the limit at most is held in memory: httpx inflates each 64 KiB read whole (~64 MB at
    once) before the size check sees it. The proplet asks for no compression; a server that
    compresses anyway (an object stored pre-compressed) is still decoded, within the limit."""
    import tracemalloc
    import zlib

    def packed(data: bytes) -> bytes:
        packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
        return packer.compress(data) + packer.flush()

    extra = f"Content-Encoding: {encoding}\r\n"
    routes = {"/m.wasm": serve(packed(MODULE), extra=extra),
              "/bomb.wasm": serve(packed(bytes(200_000_000)), extra=extra)}
    async with HttpServer(routes) as server:
        assert await source.fetch(WasmRef("t", image_url=server.url("/m.wasm"))) == MODULE
        tracemalloc.start()
        try:
            with pytest.raises(FetchError, match=r"sent more than the proplet's limit of 976\.6 KiB .*raise "
                           r"PROPLET_WASM_FETCH_MAX_BYTES on the proplet\."):
                await asyncio.wait_for(source.fetch(WasmRef("t", image_url=server.url("/bomb.wasm"))), 10)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 8_000_000, f"{peak / 1e6:.0f} MB held while refusing a body over a 1 MB limit"
    assert all(b"accept-encoding: identity\r\n" in head for head in server.headers)
