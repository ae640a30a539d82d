"""Modules over HTTP(S): `image_url` starting with http:// or https:// (upstream §4).

Upstream's rules, kept: Content-Type must be empty, application/wasm or application/octet-stream;
a Content-Length over the limit (100 MiB) is refused before any body byte is read, and the limit
is enforced again while streaming (chunked or close-delimited bodies carry no length); 4xx/5xx is
an error naming the status. TLS: an extra CA file (upstream PROPLET_HTTP_TLS_CA_CERT) or no
verification at all (PROPLET_HTTP_TLS_INSECURE_SKIP_VERIFY). One shared httpx client keeps
connections alive between fetches.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import zlib
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import httpx

from core.domain import is_http_url
from proplet.sources.base import (
    DEFAULT_MAX_MODULE_BYTES,
    BackgroundSha256,
    FetchError,
    ModuleBytes,
    ModuleTooLarge,
    WasmRef,
    format_size,
)

log = logging.getLogger(__name__)

ACCEPTED_CONTENT_TYPES = frozenset({"", "application/wasm", "application/octet-stream"})
# Bytes handed to the hashing thread at a time (see _download).
HASH_BATCH_BYTES = 2 * 1024 * 1024


def display_url(url: str) -> str:
    """The URL without credentials or query string: error messages travel to the manager and the
    console, and a presigned URL's query is a secret."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}{'?…' if parts.query else ''}"


class HttpSource:
    """Streams a module over HTTP(S) with httpx, hashing it as it arrives.

    `fetched_bytes` counts body bytes received (upstream's proplet_wasm_fetch_bytes_total),
    including those of downloads that failed part-way.
    """

    def __init__(
        self,
        *,
        max_bytes: int = DEFAULT_MAX_MODULE_BYTES,
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        total_timeout: float = 300.0,
        ca_file: str | None = None,
        insecure_skip_verify: bool = False,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.total_timeout = total_timeout
        self.fetched_bytes = 0
        self.fetches = 0
        self.failures = 0
        # Checked now, so a wrong CA file is a configuration error at start, not at the first fetch.
        self._verify = tls_verify_setting(ca_file, insecure_skip_verify)
        # Built on first use: httpx and its TLS stack cost ~15 MB of memory, which a proplet that
        # never fetches a URL should not pay.
        self._client: Any = client

    def client(self) -> httpx.AsyncClient:
        """The proplet's HTTP client (module URLs and federated learning), built on first use."""
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(connect=self.connect_timeout, read=self.read_timeout,
                                      write=self.read_timeout, pool=self.connect_timeout),
                verify=self._verify,
                follow_redirects=True,
                max_redirects=10,
            )
        return self._client

    async def __aenter__(self) -> HttpSource:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def accepts(self, ref: WasmRef) -> bool:
        return is_http_url(ref.image_url)

    async def fetch(self, ref: WasmRef) -> ModuleBytes:
        data, _ = await self.fetch_with_digest(ref)
        return data

    async def fetch_with_digest(self, ref: WasmRef) -> tuple[ModuleBytes, str]:
        self.fetches += 1
        try:
            async with asyncio.timeout(self.total_timeout):
                return await self._download(ref.image_url)
        except FetchError:
            self.failures += 1
            raise
        except TimeoutError:
            self.failures += 1
            raise FetchError(
                f"Downloading the module from {display_url(ref.image_url)} took longer than "
                f"{self.total_timeout:g} s and was abandoned. Check the server's bandwidth, or ship a "
                "smaller module."
            ) from None
        except Exception as exc:
            import httpx

            if not isinstance(exc, httpx.HTTPError):
                raise
            self.failures += 1
            raise FetchError(self._describe(ref.image_url, exc)) from None

    async def _download(self, url: str) -> tuple[ModuleBytes, str]:
        shown = display_url(url)
        # Uncompressed, please: httpx would otherwise offer gzip and deflate and inflate each 64 KiB
        # read whole before the size check below saw it (see _BoundedDecoder).
        async with self.client().stream("GET", url, headers={"Accept-Encoding": "identity"}) as response:
            if response.status_code >= 400:
                hint = " Check that the file is published at that address." if response.status_code == 404 else ""
                raise FetchError(
                    f"Downloading the module from {shown} failed: the server answered HTTP "
                    f"{response.status_code} {response.reason_phrase}.{hint} Check the task's image_url."
                )
            content_type = response.headers.get("content-type", "")
            media_type = content_type.split(";", 1)[0].strip().lower()
            if media_type not in ACCEPTED_CONTENT_TYPES:
                raise FetchError(
                    f"{shown} is served as '{content_type}', which is not a wasm module (accepted: "
                    "application/wasm, application/octet-stream or no Content-Type). Check the URL, or "
                    "make the server send application/wasm."
                )
            declared = response.headers.get("content-length")
            if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
                # Leaving the block closes the connection without reading the body.
                raise ModuleTooLarge(
                    f"{shown} is {format_size(int(declared))} ({declared} bytes), over the proplet's "
                    f"limit of {format_size(self.max_bytes)} for a module. Ship a smaller module or "
                    "raise PROPLET_WASM_FETCH_MAX_BYTES on the proplet."
                )
            decoder = _BoundedDecoder.for_response(response.headers.get("content-encoding", ""), shown)
            # httpx hands over 64 KiB pieces: hash them 2 MiB at a time, so that the hashing thread
            # needs the GIL (which the download keeps busy) a few times per module, not hundreds.
            hasher = BackgroundSha256(batch_bytes=HASH_BATCH_BYTES)
            # Appended as they arrive rather than joined after the last piece: the page faults of
            # the module's memory fall in the gaps between pieces (see chunks.py, _Transfer.data).
            data = bytearray()
            async for raw in response.aiter_raw():
                piece = raw if decoder is None else decoder.decode(raw, self.max_bytes - len(data) + 1)
                self.fetched_bytes += len(piece)
                if len(data) + len(piece) > self.max_bytes:
                    raise ModuleTooLarge(
                        f"{shown} sent more than the proplet's limit of {format_size(self.max_bytes)} "
                        "for a module; the download was stopped. Ship a smaller module or raise "
                        "PROPLET_WASM_FETCH_MAX_BYTES on the proplet."
                    )
                data += piece
                hasher.update(piece)
            if decoder is not None and not decoder.finished:
                raise FetchError(
                    f"{shown} ended before its compressed body did; the module arrived incomplete. "
                    "Start the task again; if it persists, check the file on the server."
                )
        log.debug("fetched %s: %d bytes", shown, len(data))
        return data, await hasher.digest()

    def _describe(self, url: str, exc: httpx.HTTPError) -> str:
        import httpx

        shown = display_url(url)
        host = urlsplit(url).hostname or "the server"
        if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
            return (f"Connecting to {host} for {shown} timed out after {self.connect_timeout:g} s. Check that "
                    "the server is up and reachable from this proplet.")
        if isinstance(exc, httpx.ReadTimeout):
            return (f"{shown} stopped sending data for {self.read_timeout:g} s; the download was abandoned. "
                    "Check that the server is healthy, then start the task again.")
        if isinstance(exc, httpx.ConnectError):
            reason = str(exc) or type(exc).__name__
            if "certificate" in reason.lower() or "ssl" in reason.lower():
                return (f"TLS with {host} failed for {shown} ({reason}). Give the proplet the CA that signed "
                        "the server's certificate (PROPLET_HTTP_TLS_CA_CERT).")
            return f"Cannot connect to {host} for {shown} ({reason}). Check the URL and that the server is up."
        if isinstance(exc, httpx.TooManyRedirects):
            return f"{shown} redirects too often (more than 10 times). Check the URL."
        if isinstance(exc, httpx.RemoteProtocolError):
            return (f"The server broke off the download of {shown} ({exc}). Start the task again; if it "
                    "persists, check the server.")
        return f"Downloading the module from {shown} failed: {exc or type(exc).__name__}."


class _BoundedDecoder:
    """Inflates a gzip or deflate body with a cap on each piece's output.

    The proplet asks for identity, but a server may compress anyway (an object stored compressed
    is served with its Content-Encoding whatever the client asked). zlib's max_length keeps a piece
    at most one byte over what the limit still allows, so a small compressed body that inflates a
    thousandfold (a gzip bomb) is refused with about the limit in memory, not ~64 MB per read.
    """

    __slots__ = ("_first", "_zlib", "encoding")

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._first = True
        self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)

    @classmethod
    def for_response(cls, content_encoding: str, shown: str) -> _BoundedDecoder | None:
        encoding = content_encoding.strip().lower()
        if encoding in ("", "identity"):
            return None
        if encoding in ("gzip", "x-gzip"):
            return cls("gzip")
        if encoding == "deflate":
            return cls("deflate")
        raise FetchError(
            f"{shown} is sent with Content-Encoding '{content_encoding}', which the proplet does not decode "
            "(accepted: none, gzip or deflate). Serve the module uncompressed."
        )

    def decode(self, raw: bytes, max_length: int) -> bytes:
        first, self._first = self._first, False
        try:
            return self._zlib.decompress(raw, max_length)
        except zlib.error:
            if first and self.encoding == "deflate":
                # Some servers send raw deflate without the zlib header (httpx retries likewise).
                self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
                return self.decode(raw, max_length)
            raise FetchError(f"The server sent a {self.encoding} body that does not decompress; the module "
                             "cannot be read. Check the file on the server.") from None

    @property
    def finished(self) -> bool:
        return self._zlib.eof


def tls_verify_setting(ca_file: str | None, insecure_skip_verify: bool) -> ssl.SSLContext | bool:
    """httpx's `verify` for the proplet's HTTP TLS settings (module URLs and FL services alike)."""
    if insecure_skip_verify:
        return False
    if ca_file:
        try:
            return ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"cannot load the HTTP CA certificate {ca_file} ({exc}); fix PROPLET_HTTP_TLS_CA_CERT"
            ) from None
    return True
