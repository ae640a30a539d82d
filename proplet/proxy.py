"""The OCI chunk proxy: pulls wasm artifacts from an OCI registry and serves them as MQTT chunks.

Upstream's proxy (§4) answers `registry/proplet` requests on `registry/server`. This one keeps the
wire format and fixes its defects: the reference's own tag or digest is pulled, not always
`latest` (defect 15); chunks carry the artifact's digest and size (16); a failed publish is
retried instead of leaving a hole (18, in core.chunks); requests beyond the queue are refused with
an error chunk rather than dropped, and an unknown image or unreachable registry is answered with
an error chunk so the proplet fails at once with the reason (19).

    async with OciProxy(ProxySettings()) as proxy:   # any asyncio program, the manager included
        await proxy.wait_closed()

or `group.create_task(run_proxy(settings))` in a task group, cancelled to stop.

`blob:` refs are the manager's own and are left to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import orjson
from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from core import protocol
from core.chunks import Artifact, ArtifactCache, ArtifactUnavailable, ChunkServer, is_blob_ref
from core.config import MqttClientSettings
from core.lifecycle import cancel_and_wait
from core.mqtt import MqttBus, parse_broker_url
from core.protocol import InvalidMessage
from core.topics import Topics

log = logging.getLogger(__name__)

# Layer media types that hold a wasm binary: the CNCF wasm artifact layout, wasm-to-oci, and wkg.
WASM_LAYER_TYPES = (
    "application/wasm",
    "application/vnd.wasm.content.layer.v1+wasm",
    "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm",
)
_INDEX_TYPES = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")


class ProxySettings(MqttClientSettings):
    """Everything `propeller proxy` needs; upstream's `PROXY_*` variables plus a few of our own."""

    model_config = SettingsConfigDict(env_prefix="PROXY_", extra="ignore")
    CONFIG_SECTION: ClassVar[str] = "proxy"

    mqtt_address: str | None = Field(
        default=None,
        description="Broker URL: mqtt://host:port (also tcp://), mqtts://host:port (also ssl://, tls://) "
        "or host:port. Unset: localhost:1883.",
    )
    tenant_id: str = Field(default="propeller", description="Domain of the MQTT topics (m/<tenant>/c/<channel>/...).")
    channel_id: str = Field(default="default", description="Channel of the MQTT topics.")
    entity_id: str = Field(default="propeller-proxy", description="MQTT client id and username.")
    api_key: str = Field(default="", description="MQTT password (upstream: the entity's API key).")
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log level.")
    chunk_size: int = Field(
        default=protocol.UPSTREAM_CHUNK_SIZE, ge=1024, le=64 * 1024 * 1024,
        description="Raw bytes per chunk: sent as they are to proplets that ask for binary chunks (ours, the "
        "firmware), as base64 (about 4/3 of it) in upstream's JSON chunks.",
    )
    registry_url: str = Field(
        default="",
        description="The registry the credentials are for, and the one used for references without a "
        "registry host (host[:port], optionally with http:// or https://).",
    )
    registry_insecure: bool = Field(
        default=False,
        description="Talk plain HTTP to the registry of registry_url. Registries on a loopback address get plain "
        "HTTP unless registry_url names one with https:// or registry_ca_cert is set.",
    )
    registry_ca_cert: str | None = Field(
        default=None,
        description="PEM file of the CA that signed the certificate of the registry of registry_url (a private "
        "registry's own CA); other registries are checked against the system's CAs.",
    )
    authenticate: bool = Field(default=False, description="Send credentials to the registry of registry_url.")
    registry_username: str = Field(default="", description="Registry user (with authenticate).")
    registry_password: str = Field(default="", description="Registry password (with authenticate).")
    registry_token: str = Field(
        default="", description="Registry bearer token, used when no username is set (with authenticate)."
    )
    registry_timeout: float = Field(
        default=30.0, gt=0, description="Seconds to wait for the registry to connect or answer."
    )
    pull_timeout: float = Field(
        default=300.0, gt=0,
        description="Seconds a pull (manifests and layer) may take in all; registry_timeout bounds each read, so "
        "without this a registry sending a byte now and then would hold a pull for ever.",
    )
    max_artifact_bytes: int = Field(
        default=100 * 1024 * 1024, ge=1, description="Largest wasm layer the proxy pulls; larger ones are refused."
    )
    cache_bytes: int = Field(
        default=256 * 1024 * 1024, ge=0, description="Pulled artifacts kept in memory, by digest (least recently "
        "used evicted).",
    )
    tag_ttl: float = Field(
        default=60.0, ge=0,
        description="Seconds a tag is trusted to point at the same artifact before the registry is asked again.",
    )
    workers: int = Field(default=4, ge=1, le=64, description="Requests served at once.")
    max_queued: int = Field(
        default=256, ge=1, description="Requests waiting for a worker; beyond it they are refused with an error chunk."
    )
    http_host: str = Field(default="127.0.0.1", description="Address of the health endpoint.")
    http_port: int | None = Field(
        default=None, ge=0, le=65535,
        description="Port of GET /health (upstream's default is 9191). Unset: no health endpoint.",
    )

    @model_validator(mode="after")
    def _credentials_need_a_registry(self) -> ProxySettings:
        if self.registry_ca_cert and not self.registry_url:
            raise ValueError("PROXY_REGISTRY_CA_CERT needs PROXY_REGISTRY_URL: the CA is trusted for that registry")
        if self.registry_ca_cert and not os.path.isfile(self.registry_ca_cert):
            raise ValueError(f"PROXY_REGISTRY_CA_CERT names {self.registry_ca_cert}, which is not a file")
        if self.authenticate and not self.registry_url:
            raise ValueError(
                "PROXY_AUTHENTICATE needs PROXY_REGISTRY_URL: credentials are only sent to that registry"
            )
        if self.authenticate and not (self.registry_username or self.registry_token):
            raise ValueError(
                "PROXY_AUTHENTICATE needs PROXY_REGISTRY_USERNAME and PROXY_REGISTRY_PASSWORD, or PROXY_REGISTRY_TOKEN"
            )
        return self



# ---------------------------------------------------------------------------------------------
# pulling from the registry (synchronous: oras-py uses requests; call through asyncio.to_thread)


@dataclass(frozen=True, slots=True)
class OciRef:
    registry: str
    repository: str  # namespace/name
    tag: str
    digest: str  # "" unless pinned

    @property
    def reference(self) -> str:
        """What the manifest is fetched by: the digest when pinned, else the tag."""
        return self.digest or self.tag

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}" + (f"@{self.digest}" if self.digest else f":{self.tag}")


def parse_oci_ref(ref: str, default_registry: str) -> OciRef:
    import oras.container

    text = ref.strip()
    if "://" in text:
        raise ArtifactUnavailable(
            f"{ref!r} is not an OCI reference: write it without a scheme, as registry/repository:tag or "
            "registry/repository@sha256:<digest>")
    try:
        container = oras.container.Container(text, registry=default_registry or None)
    except ValueError:
        raise ArtifactUnavailable(
            f"{ref!r} is not an OCI reference (expected registry/repository:tag or "
            "registry/repository@sha256:<digest>)") from None
    repository = f"{container.namespace}/{container.repository}" if container.namespace else container.repository
    registry = container.registry
    if registry in ("docker.io", "index.docker.io"):
        # Docker Hub's API lives elsewhere, and its official images sit under library/.
        registry = "registry-1.docker.io"
        if "/" not in repository:
            repository = f"library/{repository}"
    return OciRef(registry, repository, container.tag, container.digest or "")


def is_loopback_host(registry: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1, with or without a port."""
    host = registry
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def speaks_plain_http(registry: str, *, insecure: bool, serves_tls: bool) -> bool:
    """Whether to speak plain HTTP to `registry`: when told to (insecure), or on a loopback address,
    as a local docker-registry serves, unless something says it serves TLS (an https:// URL for it,
    a CA given for it). The proxy's pulls and `propeller push` follow this one rule."""
    return insecure or (is_loopback_host(registry) and not serves_tls)


def _registry_host(url: str) -> tuple[str, bool | None]:
    """host[:port] of PROXY_REGISTRY_URL, and True/False when its scheme says http/https."""
    text = url.strip().rstrip("/")
    scheme: bool | None = None
    if text.startswith("http://"):
        text, scheme = text[7:], True
    elif text.startswith("https://"):
        text, scheme = text[8:], False
    return text.split("/", 1)[0], scheme


_CLIENTS_PER_THREAD = 16
# Distribution refuses to store manifests over 4 MiB; a larger one comes from a registry that
# misbehaves (any host a reference names), and is not read into memory whole.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024


class RegistryPuller:
    """Pulls the wasm layer of an OCI artifact with oras-py. Thread-safe; every call blocks."""

    def __init__(
        self,
        *,
        registry_url: str = "",
        insecure: bool = False,
        username: str = "",
        password: str = "",
        token: str = "",
        authenticate: bool = False,
        timeout: float = 30.0,
        pull_timeout: float = 300.0,
        max_bytes: int = 100 * 1024 * 1024,
        ca_cert: str | None = None,
    ) -> None:
        self.default_registry, scheme_insecure = _registry_host(registry_url) if registry_url else ("", None)
        self.insecure = insecure or bool(scheme_insecure)
        self.ca_cert = ca_cert
        # PROXY_REGISTRY_URL with https://, or a CA for it: its registry serves TLS, even on loopback.
        self._serves_tls = scheme_insecure is False or bool(ca_cert)
        self.username = username
        self.password = password
        self.token = token
        self.authenticate = authenticate
        self.timeout = timeout
        self.pull_timeout = pull_timeout
        self.max_bytes = max_bytes
        # requests.Session is not safe to share between threads: one client per worker thread.
        self._local = threading.local()

    @classmethod
    def from_settings(cls, settings: ProxySettings) -> RegistryPuller:
        return cls(
            registry_url=settings.registry_url, insecure=settings.registry_insecure,
            username=settings.registry_username, password=settings.registry_password,
            token=settings.registry_token, authenticate=settings.authenticate,
            timeout=settings.registry_timeout, pull_timeout=settings.pull_timeout,
            max_bytes=settings.max_artifact_bytes, ca_cert=settings.registry_ca_cert,
        )

    def parse(self, ref: str) -> OciRef:
        return parse_oci_ref(ref, self.default_registry)

    def plain_http(self, registry: str) -> bool:
        if registry == self.default_registry:
            return speaks_plain_http(registry, insecure=self.insecure, serves_tls=self._serves_tls)
        return speaks_plain_http(registry, insecure=False, serves_tls=False)

    def _client(self, registry: str) -> Any:
        # Bounded: references name any host. Overflow: the least recently used client is closed.
        clients: OrderedDict[str, Any] = self._local.__dict__.setdefault("clients", OrderedDict())
        client = clients.get(registry)
        if client is not None:
            clients.move_to_end(registry)
            return client
        client = make_registry_client(registry, plain_http=self.plain_http(registry), timeout=self.timeout,
                                      ca_cert=self.ca_cert if registry == self.default_registry else None)
        if self.authenticate and registry == self.default_registry:
            if self.username:
                client.auth.set_basic_auth(self.username, self.password)
            else:
                client.auth.set_token_auth(self.token)
        clients[registry] = client
        while len(clients) > _CLIENTS_PER_THREAD:
            _, evicted = clients.popitem(last=False)
            evicted.session.close()
        return client

    def _url(self, ref: OciRef) -> str:
        return f"{'http' if self.plain_http(ref.registry) else 'https'}://{ref.registry}"

    def deadline(self) -> float:
        """When a pull starting now is abandoned (time.monotonic())."""
        return time.monotonic() + self.pull_timeout

    def resolve(self, ref: OciRef, deadline: float) -> dict[str, Any]:
        """The wasm layer's descriptor (mediaType, digest, size) of the manifest `ref` names."""
        manifest = self._manifest(ref, ref.reference, deadline)
        if manifest.get("mediaType") in _INDEX_TYPES or "manifests" in manifest:
            manifest = self._manifest(ref, self._pick_from_index(ref, manifest), deadline)
        return self._pick_layer(ref, manifest)

    def pull(self, ref: OciRef, layer: dict[str, Any], deadline: float) -> bytes:
        """The layer's bytes, size-capped and checked against the layer's digest."""
        import requests

        expected = str(layer.get("digest", ""))
        client = self._client(ref.registry)
        try:
            response = client.do_request(f"{self._url(ref)}/v2/{ref.repository}/blobs/{expected}", "GET", stream=True)
        except requests.RequestException as exc:
            raise ArtifactUnavailable(self._unreachable(ref, exc)) from None
        with response:
            if response.status_code != 200:
                raise ArtifactUnavailable(self._status_error(ref, response, f"layer {expected}"))
            hasher = hashlib.sha256()
            data = self._read_body(ref, response, deadline, self.max_bytes, hasher)
        if expected.startswith("sha256:") and "sha256:" + hasher.hexdigest() != expected:
            raise ArtifactUnavailable(
                f"the registry at {ref.registry} sent a layer of {ref} whose sha256 does not match its "
                f"digest {expected}; the registry's storage may be corrupt")
        return data

    def _read_body(self, ref: OciRef, response: Any, deadline: float, limit: int,
                   hasher: Any = None, what: str = "") -> bytes:
        """A streamed response's body, at most `limit` bytes, read by `deadline`.

        read1 returns after one read from the socket: requests' iter_content (like urllib3's
        read(amt)) keeps reading until it has the whole piece, and each read may take up to the
        read timeout, so a registry sending a byte every few seconds filled no piece and never
        timed out. The deadline is checked between reads, so a pull ends at most one read timeout
        after it.
        """
        import requests
        import urllib3

        pieces: list[bytes] = []
        received = 0
        try:
            while piece := response.raw.read1(1024 * 1024, decode_content=True):
                received += len(piece)
                if received > limit:
                    raise ArtifactUnavailable(
                        f"the registry at {ref.registry} sent a {what} of {ref} that is over the proxy's limit of "
                        f"{limit} bytes ({received} bytes or more); the registry misbehaves" if what
                        else self._too_large(ref, received))
                if hasher is not None:
                    hasher.update(piece)
                pieces.append(piece)
                if time.monotonic() > deadline:
                    raise ArtifactUnavailable(
                        f"the registry at {self._url(ref)} took longer than {self.pull_timeout:g} s to send {ref} "
                        f"({received} bytes so far); check its health and bandwidth, or raise PROXY_PULL_TIMEOUT")
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise ArtifactUnavailable(self._unreachable(ref, exc)) from None
        return b"".join(pieces)

    def _manifest(self, ref: OciRef, reference: str, deadline: float) -> dict[str, Any]:
        import oras.defaults
        import requests

        client = self._client(ref.registry)
        url = f"{self._url(ref)}/v2/{ref.repository}/manifests/{reference}"
        accept = ", ".join([*oras.defaults.default_manifest_accepted_media_types, *_INDEX_TYPES])
        try:
            # Streamed, so the body is read within the pull's deadline like the layer's.
            response = client.do_request(url, "GET", headers={"Accept": accept}, stream=True)
        except requests.RequestException as exc:
            raise ArtifactUnavailable(self._unreachable(ref, exc)) from None
        with response:
            if response.status_code != 200:
                raise ArtifactUnavailable(self._status_error(ref, response, "manifest"))
            body = self._read_body(ref, response, deadline, MAX_MANIFEST_BYTES, what="manifest")
        try:
            manifest = json.loads(body)
        except ValueError:
            raise ArtifactUnavailable(
                f"the registry at {ref.registry} sent a manifest of {ref} that is not JSON") from None
        if not isinstance(manifest, dict):
            raise ArtifactUnavailable(f"the registry at {ref.registry} sent a manifest of {ref} that is not an object")
        return manifest

    @staticmethod
    def _pick_from_index(ref: OciRef, index: dict[str, Any]) -> str:
        entries = [m for m in index.get("manifests") or [] if isinstance(m, dict) and m.get("digest")]
        for entry in entries:
            platform = entry.get("platform") or {}
            if platform.get("architecture") == "wasm" or str(platform.get("os", "")).startswith("wasi"):
                return str(entry["digest"])
        if len(entries) == 1:
            return str(entries[0]["digest"])
        raise ArtifactUnavailable(
            f"{ref} is an image index with {len(entries)} manifests and none for a wasm platform; push the "
            "wasm module as a single artifact (propeller push module.wasm <reference>)")

    def _pick_layer(self, ref: OciRef, manifest: dict[str, Any]) -> dict[str, Any]:
        layers = [layer for layer in manifest.get("layers") or []
                  if isinstance(layer, dict) and layer.get("digest")]
        wasm = [layer for layer in layers if layer.get("mediaType") in WASM_LAYER_TYPES]
        candidates = wasm or layers
        if not candidates:
            raise ArtifactUnavailable(
                f"{ref} has no layers; push the wasm module with propeller push module.wasm <reference>")
        # Upstream takes the largest layer; a wasm-typed layer wins over any other first.
        layer = max(candidates, key=lambda item: int(item.get("size") or 0))
        size = int(layer.get("size") or 0)
        if size > self.max_bytes:
            raise ArtifactUnavailable(self._too_large(ref, size))
        return layer

    def _too_large(self, ref: OciRef, size: int) -> str:
        return (f"the wasm layer of {ref} is over the proxy's limit of {self.max_bytes} bytes ({size} bytes "
                "or more); raise PROXY_MAX_ARTIFACT_BYTES or ship a smaller module")

    def _unreachable(self, ref: OciRef, exc: Exception) -> str:
        import requests
        import urllib3

        url = self._url(ref)
        if isinstance(exc, requests.exceptions.SSLError):
            return (f"TLS with the registry at {url} failed ({tls_reason(exc)}). If its certificate comes from a "
                    "private CA, set PROXY_REGISTRY_URL to it and PROXY_REGISTRY_CA_CERT to that CA's PEM file; if "
                    "it speaks plain HTTP, set PROXY_REGISTRY_URL to it with PROXY_REGISTRY_INSECURE=true")
        if isinstance(exc, requests.Timeout | urllib3.exceptions.TimeoutError | TimeoutError):
            return f"the registry at {url} did not answer within {self.timeout:g} s; check that it is healthy"
        reason = "connection refused" if "refused" in str(exc).lower() else type(exc).__name__
        return (f"cannot reach the registry at {url} ({reason}); start it, or fix the image reference or "
                "PROXY_REGISTRY_URL")

    def _status_error(self, ref: OciRef, response: Any, what: str) -> str:
        code = response.status_code
        if code in (401, 403):
            if self.authenticate and ref.registry == self.default_registry:
                return (f"the registry at {ref.registry} refused the proxy's credentials for {ref} (HTTP {code}); "
                        "check PROXY_REGISTRY_USERNAME/PASSWORD or PROXY_REGISTRY_TOKEN")
            return (f"the registry at {ref.registry} requires credentials for {ref} (HTTP {code}); set "
                    "PROXY_REGISTRY_URL to it with PROXY_AUTHENTICATE=true and a username/password or token")
        if code == 404:
            return (f"{ref} does not exist in the registry at {ref.registry} (no {what} for "
                    f"'{ref.reference}'); check the image name and tag, or push it with propeller push")
        body = ""
        with contextlib.suppress(Exception):
            # 200 bytes, not the whole body: neither the manifest cap nor the deadline bounds this read.
            body = response.raw.read(200, decode_content=True).decode("utf-8", "replace")
        return f"the registry at {ref.registry} answered HTTP {code} for the {what} of {ref}: {body}".rstrip(": ")


def tls_reason(exc: Exception) -> str:
    """The useful end of requests' nested TLS error ("... certificate verify failed: self-signed
    certificate in certificate chain (_ssl.c:992)"), not its three layers of wrappers."""
    text = str(exc)
    for marker in ("certificate verify failed: ", "SSL: "):
        if marker in text:
            text = text.split(marker, 1)[1]
            break
    return text.split(" (_ssl.c")[0].rstrip("')\"")


def make_registry_client(registry: str, *, plain_http: bool, timeout: float, ca_cert: str | None = None) -> Any:
    """An oras-py registry client for `registry` (the proxy's pulls, `propeller push`); `ca_cert`:
    the PEM file its certificate is checked against instead of the system's CAs."""
    import oras.auth
    import oras.provider
    import requests

    class _Registry(oras.provider.Registry):
        """oras-py's registry client without its retry decorator, which sleeps 3 s, 5 s, 11 s, 29 s
        and 83 s before a refused connection surfaces, and with a timeout on every request
        (requests has none by default). Basic-auth registries (htpasswd) are answered with the
        configured credentials, which oras-py's token backend cannot do.

        `last_refusal` is the last request the registry refused (HTTP 4xx/5xx, HEADs aside: a
        missing blob is how a push learns to upload it): oras-py's push raises a bare ValueError
        and only logs the registry's reason, which this keeps for the caller."""

        last_refusal: requests.Response | None = None

        def do_request(self, url: str, method: str = "GET", data: Any = None, headers: dict | None = None,
                       json: Any = None, stream: bool = False) -> requests.Response:
            response = self._send_authenticated(url, method, data, headers, json, stream)
            if response.status_code >= 400 and method != "HEAD":
                self.last_refusal = response
            return response

        def _send_authenticated(self, url: str, method: str, data: Any, headers: dict | None, json: Any,
                                stream: bool) -> requests.Response:
            headers = dict(headers or {})
            token = getattr(self.auth, "token", None)
            if token:
                headers["Authorization"] = f"Bearer {token}"

            def send() -> requests.Response:
                return self.session.request(method, url, data=data, json=json, headers=headers,
                                            stream=stream, verify=ca_cert or self._tls_verify, timeout=timeout)

            response = send()
            if response.status_code not in (401, 403):
                return response
            challenge = response.headers.get("Www-Authenticate", "")
            basic = getattr(self.auth, "_basic_auth", None)
            if challenge.lower().startswith("basic"):
                if not basic:
                    return response
                headers["Authorization"] = f"Basic {basic}"
            else:
                try:
                    headers, changed = self.auth.authenticate_request(response, headers)
                except oras.auth.AuthenticationException:
                    return response
                if not changed:
                    return response
            return send()

    return _Registry(hostname=registry, insecure=plain_http, auth_backend="token")


# ---------------------------------------------------------------------------------------------
# caches


class _RefCache(ArtifactCache):
    """The chunk server's cache, by requested reference.

    A digest reference is immutable and stays until evicted (least recently used, bounded by
    bytes). A tag can be moved, so a tag entry is trusted for `tag_ttl` seconds only: long enough
    that a resume request is served from the bytes of the first one.
    """

    def __init__(self, max_bytes: int, tag_ttl: float, clock: Any = time.monotonic) -> None:
        super().__init__(max_bytes)
        self.tag_ttl = tag_ttl
        self._clock = clock
        self._entries: OrderedDict[str, tuple[Artifact, float]] = OrderedDict()
        self._total = 0

    def get(self, key: str) -> Artifact | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        artifact, stamp = entry
        if "@" not in key and self._clock() - stamp > self.tag_ttl:
            return None
        self._entries.move_to_end(key)
        return artifact

    def put(self, key: str, artifact: Artifact) -> None:
        if len(artifact.data) > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._total -= len(old[0].data)
        self._entries[key] = (artifact, self._clock())
        self._total += len(artifact.data)
        while self._total > self.max_bytes:
            _, (evicted, _) = self._entries.popitem(last=False)
            self._total -= len(evicted.data)


# ---------------------------------------------------------------------------------------------
# the proxy


@dataclass(slots=True)
class ProxyCounters:
    requests: int = 0
    invalid: int = 0
    ignored: int = 0
    pulls: int = 0
    cache_hits: int = 0
    errors: int = 0


class OciArtifacts:
    """What answers a registry request for an OCI reference: the artifact pulled from its registry
    (concurrent requests for one reference share one pull), kept by digest. Served by a ChunkServer
    on the MQTT connection of `propeller proxy` (OciProxy) or of a manager that hosts the proxy
    (MANAGER_OCI_PROXY), whose connection already answers the manager's own chunk requests."""

    def __init__(self, settings: ProxySettings, *, puller: RegistryPuller | None = None,
                 counters: ProxyCounters | None = None) -> None:
        self.settings = settings
        self.puller = puller or RegistryPuller.from_settings(settings)
        self.counters = counters or ProxyCounters()
        # Pulled layers by digest, shared by every tag that points at them. The chunk server's cache
        # by reference holds the same bytes objects, so together they stay near cache_bytes.
        self._blobs = ArtifactCache(settings.cache_bytes)
        self._pulling: dict[str, asyncio.Future[Artifact]] = {}

    @staticmethod
    def accepts(app_name: str) -> bool:
        return not is_blob_ref(app_name)

    def chunk_server(self, bus: MqttBus, topics: Topics) -> ChunkServer:
        s = self.settings
        return ChunkServer(
            bus, topics.registry_chunk, resolve=self.resolve, accepts=self.accepts,
            chunk_size=s.chunk_size, workers=s.workers, max_queued=s.max_queued,
            cache=_RefCache(s.cache_bytes, s.tag_ttl), binary_topic=topics.registry_chunk_binary,
        )

    def close(self) -> None:
        for future in self._pulling.values():
            future.cancel()

    async def resolve(self, app_name: str) -> Artifact:
        """ChunkServer's resolver. Concurrent requests for one reference share one pull."""
        pending = self._pulling.get(app_name)
        if pending is not None:
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if pending.cancelled() and task is not None and not task.cancelling():
                    raise ArtifactUnavailable(f"the proxy's pull of {app_name} was interrupted; try again") from None
                raise
        future: asyncio.Future[Artifact] = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._pulling[app_name] = future
        try:
            artifact = await self._pull(app_name)
        except asyncio.CancelledError:
            future.cancel()  # whoever shares this pull must not wait for ever
            raise
        except ArtifactUnavailable as exc:
            self.counters.errors += 1
            future.set_exception(exc)
            raise
        except Exception as exc:
            # Anything else is a bug or an oras-py surprise: still answer the proplet.
            self.counters.errors += 1
            log.exception("pulling %s failed", app_name)
            error = ArtifactUnavailable(f"the proxy failed to pull {app_name} ({type(exc).__name__}: {exc})")
            future.set_exception(error)
            raise error from exc
        else:
            future.set_result(artifact)
            return artifact
        finally:
            del self._pulling[app_name]

    async def _pull(self, app_name: str) -> Artifact:
        started = time.perf_counter()
        ref = self.puller.parse(app_name)
        deadline = self.puller.deadline()  # for the manifests and the layer together
        layer = await asyncio.to_thread(self.puller.resolve, ref, deadline)
        digest = str(layer["digest"])
        cached = self._blobs.get(digest)
        if cached is not None:
            self.counters.cache_hits += 1
            return cached
        data = await asyncio.to_thread(self.puller.pull, ref, layer, deadline)
        if not digest.startswith("sha256:"):
            # Chunks announce the sha256 the proplet verifies, whatever the registry's algorithm.
            digest = protocol.sha256_digest(data)
        artifact = Artifact(data, digest)
        self._blobs.put(digest, artifact)
        self.counters.pulls += 1
        log.info("pulled %s (%s, %d bytes) in %.0f ms", ref, digest[:19], len(data),
                 (time.perf_counter() - started) * 1000)
        return artifact


class OciProxy:
    """`propeller proxy`: answers registry requests for OCI references on a connection of its own.
    An async context manager that runs headless: `__aenter__` connects and starts serving,
    `__aexit__` stops; `wait_closed()` runs until `request_shutdown()` or a fatal error."""

    def __init__(self, settings: ProxySettings | None = None, *, puller: RegistryPuller | None = None) -> None:
        self.settings = settings or ProxySettings()
        self.topics = Topics(self.settings.tenant_id, self.settings.channel_id)
        self.artifacts = OciArtifacts(self.settings, puller=puller)
        self.puller = self.artifacts.puller
        self.counters = self.artifacts.counters
        self.bus: MqttBus | None = None
        self.chunks: ChunkServer | None = None
        self.health_url: str | None = None
        self._loops: list[asyncio.Task[Any]] = []
        self._health: asyncio.Server | None = None
        self._shutdown = asyncio.Event()

    async def __aenter__(self) -> OciProxy:
        try:
            await self._start()
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop()

    async def _start(self) -> None:
        s = self.settings
        conn = s.mqtt_connection(parse_broker_url(s.mqtt_address or "mqtt://localhost:1883"), s.entity_id,
                                 s.api_key, clean_session=True)
        # No Last Will on the proplet alive topic: upstream's proxy registers itself as a phantom
        # proplet that way (defect 9).
        self.bus = MqttBus(conn, subscriptions=[self.topics.registry_request], on_message=self._on_message,
                           name="proxy")
        self.chunks = self.artifacts.chunk_server(self.bus, self.topics)
        self._spawn(self.bus.run(), "proxy-mqtt")
        self._spawn(self.chunks.run(), "proxy-chunks")
        if s.http_port is not None:
            self._health = await asyncio.start_server(self._serve_health, s.http_host, s.http_port)
            port = self._health.sockets[0].getsockname()[1]
            self.health_url = f"http://{s.http_host}:{port}/health"
        log.info("proxy serving %s on %s (chunks of %d bytes)%s", self.topics.registry_request,
                 conn.address.url, s.chunk_size, f", health at {self.health_url}" if self.health_url else "")

    async def _stop(self) -> None:
        if self._health is not None:
            self._health.close()
            self._health = None
        if self.bus is not None:
            await self.bus.close()
        await cancel_and_wait(self._loops, owner="proxy")
        self._loops.clear()
        self.artifacts.close()
        self._shutdown.set()

    def request_shutdown(self) -> None:
        self._shutdown.set()

    async def wait_closed(self) -> None:
        await self._shutdown.wait()

    async def wait_connected(self, timeout: float | None = None) -> None:
        assert self.bus is not None, "enter the proxy first (async with OciProxy(...))"
        await self.bus.wait_connected(timeout)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        task.add_done_callback(self._loop_ended)
        self._loops.append(task)

    def _loop_ended(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("proxy loop %s failed; stopping the proxy", task.get_name(), exc_info=exc)
            self._shutdown.set()

    accepts = staticmethod(OciArtifacts.accepts)

    async def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            request = protocol.decode_registry_request(payload, topic)
        except InvalidMessage as exc:
            self.counters.invalid += 1
            log.warning("dropped a registry request: %s", exc)
            return
        self.counters.requests += 1
        assert self.chunks is not None
        if not self.chunks.submit(request):
            self.counters.ignored += 1

    async def _serve_health(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request_line = await reader.readline()  # bounded by the stream's 64 KiB limit
                while (await reader.readline()).strip():
                    pass
            parts = request_line.split()
            if len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] == b"/health":
                connected = self.bus is not None and self.bus.connected.is_set()
                status, body = b"200 OK", orjson.dumps(
                    {"status": "ok", "service": "proxy", "mqtt": "connected" if connected else "disconnected"})
            else:
                status, body = b"404 Not Found", b'{"error":"not found: try GET /health"}'
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def run_proxy(settings: ProxySettings | None = None) -> None:
    """Run a proxy until cancelled or a background loop fails: for a task group in another
    program. (A manager hosts the proxy on its own connection instead: MANAGER_OCI_PROXY.)"""
    async with OciProxy(settings) as proxy:
        await proxy.wait_closed()
