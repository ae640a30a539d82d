"""`propeller push`: a module pushed to a real docker-registry in the wasm OCI layout, read back as
the proxy reads it; credentials, refusals and unreachable registries; the command's output and exit
codes."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core.chunks import ArtifactUnavailable
from propeller.oci import WASM_CONFIG_MEDIA_TYPE, BadReference, NotAModule, PushError, push_module
from proplet.proxy import RegistryPuller
from tests.conftest import unique
from tests.registry import DockerRegistry, running_registry
from tests.services import free_port, need
from tests.tls import non_loopback_address, self_signed
from tests.wasmfixtures import wasm, wasm_path

pytestmark = pytest.mark.timeout(120)

PROPELLER = [sys.executable, "-m", "propeller"]


def manifest(registry: DockerRegistry, repository: str, reference: str) -> httpx.Response:
    return httpx.get(f"{registry.url}/v2/{repository}/manifests/{reference}",
                     headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})


def pulled(registry: DockerRegistry, reference: str) -> bytes:
    puller = RegistryPuller()
    ref = puller.parse(reference)
    deadline = puller.deadline()
    return puller.pull(ref, puller.resolve(ref, deadline), deadline)


def test_a_core_module_is_pushed_in_the_wasm_oci_layout_and_reads_back_by_tag_and_digest(
        registry: DockerRegistry) -> None:
    repo = unique("wasm/add")
    data = wasm("add")
    pushed = push_module(data, "add.wasm", f"{registry.host}/{repo}:v1",
                         annotations={"org.opencontainers.image.version": "1.0"})
    module_digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert (pushed.reference, pushed.module_digest, pushed.size) == (f"{registry.host}/{repo}:v1", module_digest,
                                                                     len(data))
    assert (pushed.kind, pushed.exports) == ("core module", ("add",))
    answer = manifest(registry, repo, "v1")
    assert answer.status_code == 200
    assert answer.headers["Docker-Content-Digest"] == pushed.manifest_digest
    assert pushed.pinned == f"{registry.host}/{repo}@{pushed.manifest_digest}"
    body = answer.json()
    assert body["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    [layer] = body["layers"]
    assert (layer["mediaType"], layer["digest"], layer["size"]) == ("application/wasm", module_digest, len(data))
    assert layer["annotations"] == {"org.opencontainers.image.title": "add.wasm"}
    assert body["annotations"]["org.opencontainers.image.title"] == "add.wasm"
    assert body["annotations"]["org.opencontainers.image.version"] == "1.0"
    assert body["annotations"]["org.opencontainers.image.created"].endswith("Z")
    assert body["config"]["mediaType"] == WASM_CONFIG_MEDIA_TYPE
    config = httpx.get(f"{registry.url}/v2/{repo}/blobs/{body['config']['digest']}").json()
    assert (config["architecture"], config["os"], config["layerDigests"]) == ("wasm", "wasip1", [module_digest])
    # The proxy's own puller reads back the very bytes, by the tag and by the pinned reference.
    assert pulled(registry, pushed.reference) == data
    assert pulled(registry, pushed.pinned) == data


def test_a_component_is_pushed_as_wasip2(registry: DockerRegistry) -> None:
    repo = unique("wasm/greeter")
    data = wasm("greeter-component")
    pushed = push_module(data, "greeter.wasm", f"{registry.host}/{repo}")  # no tag: latest, as oras and docker
    assert (pushed.kind, pushed.exports, pushed.reference) == ("component", (), f"{registry.host}/{repo}:latest")
    config_digest = manifest(registry, repo, "latest").json()["config"]["digest"]
    assert httpx.get(f"{registry.url}/v2/{repo}/blobs/{config_digest}").json()["os"] == "wasip2"
    assert pulled(registry, pushed.reference) == data


def test_what_is_not_a_module_or_not_a_name_to_push_to_is_refused_before_the_registry_is_asked(
        registry: DockerRegistry) -> None:
    repo = unique("wasm/refused")
    with pytest.raises(NotAModule, match="does not start with"):
        push_module(b"#!/bin/sh\necho hi\n", "x.wasm", f"{registry.host}/{repo}:v1")
    with pytest.raises(NotAModule, match="wasmtime rejects it"):
        push_module(b"\0asm\1\0\0\0\1\2", "x.wasm", f"{registry.host}/{repo}:v1")
    with pytest.raises(BadReference, match="not a valid name"):
        push_module(wasm("add"), "add.wasm", f"{registry.host}/Wasm/Add:v1")
    with pytest.raises(BadReference, match="names a digest"):
        push_module(wasm("add"), "add.wasm", f"{registry.host}/{repo}@sha256:" + "0" * 64)
    assert manifest(registry, repo, "v1").status_code == 404


def test_credentials_given_refused_or_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.docker/config.json but the one written below
    with running_registry(tmp_path / "registry", credentials=("alice", "s3cret")) as registry:
        target = f"{registry.host}/wasm/private:v1"
        with pytest.raises(PushError, match=r"requires credentials to push .* \(HTTP 401\); give --username"):
            push_module(wasm("add"), "add.wasm", target)
        with pytest.raises(PushError, match=r"refused the credentials .* \(HTTP 401\)"):
            push_module(wasm("add"), "add.wasm", target, username="alice", password="wrong")
        pushed = push_module(wasm("add"), "add.wasm", target, username="alice", password="s3cret")
        auth = {"Authorization": "Basic " + base64.b64encode(b"alice:s3cret").decode()}
        answer = httpx.get(f"{registry.url}/v2/wasm/private/manifests/v1", headers={
            **auth, "Accept": "application/vnd.oci.image.manifest.v1+json"})
        assert answer.headers["Docker-Content-Digest"] == pushed.manifest_digest
        # As `docker login` leaves them: used when none are given, and given ones win over them.
        docker = tmp_path / "home" / ".docker"
        docker.mkdir(parents=True)
        (docker / "config.json").write_text(json.dumps(
            {"auths": {registry.host: {"auth": base64.b64encode(b"alice:s3cret").decode()}}}))
        assert push_module(wasm("hello"), "hello.wasm", target).module_digest.startswith("sha256:")
        with pytest.raises(PushError, match="refused the credentials"):
            push_module(wasm("add"), "add.wasm", target, username="alice", password="wrong")


def test_an_unreachable_registry_is_named_at_once_not_after_oras_retries() -> None:
    port = free_port()  # nothing listens there
    began = time.monotonic()
    refused = rf"cannot reach the registry at http://127.0.0.1:{port} \(connection refused\)"
    with pytest.raises(PushError, match=refused):
        push_module(wasm("add"), "add.wasm", f"127.0.0.1:{port}/wasm/add:v1")
    # oras-py's own client retries a refused connection for 3 + 5 + 11 + ... seconds.
    assert time.monotonic() - began < 2.5


def run(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PROPELLER, "push", *args], capture_output=True, text=True, timeout=60, input=input,
                          env=env)


def test_the_command_prints_what_to_run_and_exits_by_outcome(registry: DockerRegistry, tmp_path: Path) -> None:
    repo = unique("wasm/cli")
    # WebAssembly text is compiled first, as `tasks create --wasm` does, and pushed as <stem>.wasm.
    wat = tmp_path / "adder.wat"
    wat.write_text('(module (func (export "add") (param i32 i32) (result i32) local.get 0 local.get 1 i32.add))')
    out = run(str(wat), f"{registry.host}/{repo}:v1")
    assert out.returncode == 0, out.stderr
    binary = __import__("wasmtime").wat2wasm(wat.read_text())
    digest = "sha256:" + hashlib.sha256(binary).hexdigest()
    assert f"pushed   {registry.host}/{repo}:v1 (core module, {len(binary)} bytes)" in out.stdout
    assert f"module   {digest}" in out.stdout
    assert f"run it:  propeller tasks create add --wasm {registry.host}/{repo}:v1 --digest {digest}" in out.stdout
    title = manifest(registry, repo, "v1").json()["layers"][0]["annotations"]["org.opencontainers.image.title"]
    assert title == "adder.wasm"

    as_json = run(str(wasm_path("numeric")), f"{registry.host}/{repo}:v2", "--json", "-a", "team=edge")
    assert as_json.returncode == 0, as_json.stderr
    pushed = json.loads(as_json.stdout)
    assert pushed["reference"] == f"{registry.host}/{repo}:v2" and "add64" in pushed["exports"]
    assert pushed["annotations"]["team"] == "edge"
    assert pushed["pinned"] == f"{registry.host}/{repo}@{pushed['manifest_digest']}"

    not_wasm = run(str(tmp_path / "adder.wat"), f"{registry.host}/{repo}:v3", "-a", "novalue")
    assert not_wasm.returncode == 2 and "KEY=VALUE" in not_wasm.stderr
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    refused = run(str(text), f"{registry.host}/{repo}:v3")
    assert refused.returncode == 2 and "is not a WebAssembly module" in refused.stderr
    bad_name = run(str(wasm_path("add")), f"{registry.host}/{repo.upper()}:v3")
    assert bad_name.returncode == 2 and "not a valid name to push to" in bad_name.stderr
    down = run(str(wasm_path("add")), f"127.0.0.1:{free_port()}/{repo}:v3")
    assert down.returncode == 1 and "cannot reach the registry" in down.stderr and "Traceback" not in down.stderr
    assert manifest(registry, repo, "v3").status_code == 404


def test_the_password_comes_from_stdin_or_the_environment(tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    with running_registry(tmp_path / "registry", credentials=("alice", "s3cret")) as registry:
        target = f"{registry.host}/wasm/private:v1"
        missing = run(str(wasm_path("add")), target, env=env)
        assert missing.returncode == 1 and "requires credentials" in missing.stderr
        by_stdin = run(str(wasm_path("add")), target, "-u", "alice", "--password-stdin", input="s3cret\n", env=env)
        assert by_stdin.returncode == 0, by_stdin.stderr
        by_env = run(str(wasm_path("add")), target, "-u", "alice",
                     env={**env, "PROPELLER_REGISTRY_PASSWORD": "s3cret"})
        assert by_env.returncode == 0, by_env.stderr
        wrong = run(str(wasm_path("add")), target, env={**env, "PROPELLER_REGISTRY_USERNAME": "alice",
                                                        "PROPELLER_REGISTRY_PASSWORD": "nope"})
        assert wrong.returncode == 1 and "refused the credentials" in wrong.stderr
        lonely = run(str(wasm_path("add")), target, "--password-stdin", input="s3cret\n", env=env)
        assert lonely.returncode == 2 and "--password-stdin goes with --username" in lonely.stderr


@pytest.fixture
def tls_registry(tmp_path: Path) -> Iterator[DockerRegistry]:
    """A registry serving HTTPS with its own CA, on this machine's non-loopback address (one on a
    loopback address is spoken to over plain HTTP)."""
    address = non_loopback_address()
    need(address is not None, "a non-loopback IPv4 address", "run the tests on a machine with a network interface")
    assert address is not None
    cert, key = self_signed(tmp_path / "tls", address)
    with running_registry(tmp_path / "registry", address=address, tls=(cert, key)) as registry:
        yield registry


def test_a_registry_with_a_private_ca_is_trusted_with_ca_cert(tls_registry: DockerRegistry) -> None:
    assert tls_registry.tls is not None
    ca = str(tls_registry.tls[0])
    target = f"{tls_registry.host}/wasm/private-ca:v1"
    with pytest.raises(PushError, match=r"TLS with the registry at https://.* failed \(.*certificate.*\); if its "
                                        r"certificate comes from a private CA, give that CA's PEM file with --ca-cert"):
        push_module(wasm("add"), "add.wasm", target)
    pushed = push_module(wasm("add"), "add.wasm", target, ca_cert=ca)
    puller = RegistryPuller(registry_url=tls_registry.host, ca_cert=ca)
    ref = puller.parse(pushed.pinned)
    deadline = puller.deadline()
    assert puller.pull(ref, puller.resolve(ref, deadline), deadline) == wasm("add")
    by_env = run(str(wasm_path("add")), f"{tls_registry.host}/wasm/private-ca:v2",
                 env={**os.environ, "PROPELLER_REGISTRY_CA_CERT": ca})
    assert by_env.returncode == 0, by_env.stderr
    untrusted = run(str(wasm_path("add")), f"{tls_registry.host}/wasm/private-ca:v3")
    assert untrusted.returncode == 1 and "--ca-cert" in untrusted.stderr and "Traceback" not in untrusted.stderr


def test_a_loopback_registry_serving_tls_is_spoken_to_over_https_when_its_ca_is_given(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path / "tls", "127.0.0.1")
    with running_registry(tmp_path / "registry", tls=(cert, key)) as registry:
        target = f"{registry.host}/wasm/local-tls:v1"
        with pytest.raises(PushError, match=r"refused .* \(HTTP 400\): Client sent an HTTP request to an HTTPS server"):
            push_module(wasm("add"), "add.wasm", target)  # loopback: plain HTTP by default
        pushed = push_module(wasm("add"), "add.wasm", target, ca_cert=str(cert))
        trusting = RegistryPuller(registry_url=registry.host, ca_cert=str(cert))
        ref = trusting.parse(pushed.pinned)
        deadline = trusting.deadline()
        assert trusting.pull(ref, trusting.resolve(ref, deadline), deadline) == wasm("add")
        # https:// in PROXY_REGISTRY_URL says TLS too; without the CA the certificate is not trusted.
        with pytest.raises(ArtifactUnavailable, match=r"TLS with the registry at https://127.0.0.1:\d+ failed "
                                                      r"\(self-signed certificate\)"):
            RegistryPuller(registry_url=f"https://{registry.host}").resolve(ref, deadline)
