"""Pushing a module to an OCI registry (`propeller push`), laid out as the proxy pulls it.

The artifact is the CNCF wasm OCI artifact layout (what `oras push … app.wasm:application/wasm`
and wkg make, and what upstream's proxy and ours pull): one `application/wasm` layer holding the
module as it is, a config of media type `application/vnd.wasm.config.v0+json` saying
`architecture: wasm`, `os: wasip1` (a core module) or `wasip2` (a component), and the layer's
digest. Debian 12 packages no oras CLI, so without this an operator had no way to put a module
where a proplet could fetch it by reference.

oras-py does the registry protocol (blob uploads, manifest, credentials from ~/.docker/config.json
and token challenges) through the proxy's registry client, which has a timeout on every request
and none of oras-py's retries (3 s, 5 s, 11 s, ... before a refused connection surfaces).
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.chunks import ArtifactUnavailable
from proplet.proxy import make_registry_client, parse_oci_ref, speaks_plain_http, tls_reason
from proplet.runtime.api import ModuleError, wasm_kind

WASM_LAYER_MEDIA_TYPE = "application/wasm"
WASM_CONFIG_MEDIA_TYPE = "application/vnd.wasm.config.v0+json"
TITLE_ANNOTATION = "org.opencontainers.image.title"
CREATED_ANNOTATION = "org.opencontainers.image.created"
# The OCI distribution specification's names: a registry refuses others, some without saying why.
_REPOSITORY = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*")
_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")


class PushError(Exception):
    """The registry did not take the module; the message says why and what to change."""


class NotAModule(ValueError):
    """The bytes are not a module a proplet could run."""


class BadReference(ValueError):
    """The reference is not one a module can be pushed to."""


@dataclass(frozen=True, slots=True)
class Pushed:
    reference: str  # registry/repository:tag, as pushed
    pinned: str  # registry/repository@<manifest digest>: this very artifact, whatever the tag becomes
    manifest_digest: str
    module_digest: str  # sha256 of the module's bytes: a task's wasm_digest (`--digest`)
    size: int
    kind: str  # "core module" or "component"
    exports: tuple[str, ...] = ()  # a core module's exported functions: what a task's name may call
    annotations: dict[str, str] = field(default_factory=dict)


def inspect_module(data: bytes) -> tuple[str, tuple[str, ...]]:
    """('component', ()) or ('core module', its exported functions); NotAModule for anything else,
    or a core module wasmtime does not compile (pushing it would only move the failure to every
    proplet that fetches it)."""
    try:
        kind = wasm_kind(data)  # the proplet's own reading of the header
    except ModuleError:
        raise NotAModule("it is not a WebAssembly module (it does not start with \\0asm)") from None
    if kind == "component":
        return "component", ()
    import wasmtime

    try:
        module = wasmtime.Module(wasmtime.Engine(), data)
    except wasmtime.WasmtimeError as exc:
        reason = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise NotAModule(f"wasmtime rejects it: {reason[-1] if reason else exc}") from None
    return "core module", tuple(e.name for e in module.exports if isinstance(e.type, wasmtime.FuncType))


def wasm_config(module_digest: str, kind: str, created: str) -> dict[str, Any]:
    """The artifact's config, as the wasm OCI artifact layout describes it."""
    return {"created": created, "architecture": "wasm", "os": "wasip2" if kind == "component" else "wasip1",
            "layerDigests": [module_digest]}


def push_module(data: bytes, filename: str, reference: str, *, insecure: bool = False, username: str = "",
                password: str = "", token: str = "", timeout: float = 30.0, ca_cert: str | None = None,
                annotations: dict[str, str] | None = None) -> Pushed:
    """Push `data` (a module: NotAModule otherwise) as `reference` (registry/repository[:tag],
    `latest` when no tag; BadReference for one that is not a name to push to). Registries on a
    loopback address are spoken to over plain HTTP unless `ca_cert` is given, others over HTTPS
    unless `insecure`, their certificate checked against `ca_cert` (a PEM file) or else the
    system's CAs. Blocks; raises PushError with the reason."""
    import requests

    kind, exports = inspect_module(data)
    if "@" in reference:
        raise BadReference(f"{reference!r} names a digest: push to a tag (registry/repository:tag); the digest "
                           "of what was pushed is printed after")
    try:
        ref = parse_oci_ref(reference, "")
    except ArtifactUnavailable as exc:  # with the proxy's wording of a reference it cannot read
        raise BadReference(str(exc)) from None
    if not _REPOSITORY.fullmatch(ref.repository) or not _TAG.fullmatch(ref.tag):
        raise BadReference(f"{reference!r} is not a valid name to push to: a repository is lower-case letters, "
                           "digits and separators (. _ __ -) in /-separated parts, and a tag at most 128 letters, "
                           "digits, '.', '_' or '-', not starting with '.' or '-' (the OCI distribution rules)")
    plain_http = speaks_plain_http(ref.registry, insecure=insecure, serves_tls=bool(ca_cert))
    url = f"{'http' if plain_http else 'https'}://{ref.registry}"
    client = make_registry_client(ref.registry, plain_http=plain_http, timeout=timeout, ca_cert=ca_cert)
    if username or token:
        # Given credentials win: oras-py otherwise reads ~/.docker/config.json on every push and
        # takes the registry's entry there over them.
        client.auth.load_configs = lambda *args, **kwargs: None
        if username:
            client.auth.set_basic_auth(username, password)
        else:
            client.auth.set_token_auth(token)
    module_digest = "sha256:" + hashlib.sha256(data).hexdigest()
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    manifest_annotations = {TITLE_ANNOTATION: filename, CREATED_ANNOTATION: created, **(annotations or {})}
    target = f"{ref.registry}/{ref.repository}:{ref.tag}"
    with tempfile.TemporaryDirectory(prefix="propeller-push-") as staging:
        # oras-py uploads files: the module under its own name (the layer's title), and the config.
        module_path = Path(staging) / filename
        module_path.write_bytes(data)
        config_path = Path(staging) / "config.json"
        config_path.write_text(json.dumps(wasm_config(module_digest, kind, created)))
        try:
            response = client.push(
                target=target,
                files=[f"{module_path}:{WASM_LAYER_MEDIA_TYPE}"],
                manifest_config=f"{config_path}:{WASM_CONFIG_MEDIA_TYPE}",
                manifest_annotations=manifest_annotations,
                disable_path_validation=True,
                quiet=True,
            )
        except requests.exceptions.SSLError as exc:
            raise PushError(f"TLS with the registry at {url} failed ({tls_reason(exc)}); if its certificate comes "
                            "from a private CA, give that CA's PEM file with --ca-cert; if it speaks plain HTTP, "
                            "add --insecure") from None
        except requests.Timeout:
            raise PushError(f"the registry at {url} did not answer within {timeout:g} s; check that it is "
                            "healthy, or raise --timeout") from None
        except ValueError as exc:
            # oras-py's "Issue with <url>: <reason>" (it only logs the registry's reason), or an
            # answer it expected as JSON (requests' JSONDecodeError is a ValueError too): a refusal.
            if client.last_refusal is not None:
                raise PushError(_refusal(client.last_refusal, url, target, bool(username or token))) from None
            raise PushError(f"the registry at {url} refused {target}: {exc}") from None
        except requests.RequestException as exc:
            reason = "connection refused" if "refused" in str(exc).lower() else type(exc).__name__
            raise PushError(f"cannot reach the registry at {url} ({reason}); check the reference's host "
                            "and port, and that the registry runs") from None
    digest = response.headers.get("Docker-Content-Digest", "")
    if not digest.startswith("sha256:"):
        # Distribution always sends it; a registry that does not is read back instead.
        digest = _manifest_digest(client, url, ref.repository, ref.tag)
    return Pushed(reference=target, pinned=f"{ref.registry}/{ref.repository}@{digest}", manifest_digest=digest,
                  module_digest=module_digest, size=len(data), kind=kind, exports=exports,
                  annotations=manifest_annotations)


def _refusal(response: Any, url: str, target: str, with_credentials: bool) -> str:
    code = response.status_code
    if code in (401, 403):
        if with_credentials:
            return (f"the registry at {url} refused the credentials for {target} (HTTP {code}); check "
                    "--username and the password, or the token")
        return (f"the registry at {url} requires credentials to push {target} (HTTP {code}); give --username "
                "(and the password on stdin with --password-stdin, or in PROPELLER_REGISTRY_PASSWORD), or "
                "log in with docker login")
    messages = []
    try:
        messages = [str(e.get("message") or e.get("code")) for e in response.json().get("errors", [])
                    if isinstance(e, dict)]
    except ValueError:  # not JSON: its text, if short, says why ("Client sent an HTTP request to an HTTPS server.")
        text = response.text.strip()
        messages = [text] if text and len(text) <= 200 and "<" not in text else []
    detail = "; ".join(m for m in messages if m) or response.reason or "no reason given"
    return f"the registry at {url} refused {target} (HTTP {code}): {detail}"


def _manifest_digest(client: Any, url: str, repository: str, tag: str) -> str:
    response = client.do_request(f"{url}/v2/{repository}/manifests/{tag}", "HEAD",
                                 headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    digest = response.headers.get("Docker-Content-Digest", "")
    if response.status_code != 200 or not digest.startswith("sha256:"):
        raise PushError(f"the registry at {url} took {repository}:{tag} but does not say its digest "
                        f"(HTTP {response.status_code})")
    return str(digest)
