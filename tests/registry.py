"""A real OCI registry for tests: Debian's docker-registry on a free loopback port, storage in a
temporary directory, and pushes with oras-py exactly as a user would push a wasm module.

With CI=true a missing docker-registry fails the test; locally it skips with how to install it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.services import free_port, need, stop_process

WASM_CONFIG_MEDIA_TYPE = "application/vnd.wasm.config.v0+json"


@dataclass
class DockerRegistry:
    workdir: Path
    port: int = field(default_factory=free_port)
    # (user, password): the registry requires HTTP basic auth (htpasswd), and pushes send it.
    credentials: tuple[str, str] | None = None
    # Where it listens; (certificate, key): it serves HTTPS with them (the certificate is its CA).
    address: str = "127.0.0.1"
    tls: tuple[Path, Path] | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def start(self) -> None:
        binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
        need(os.path.exists(binary), "docker-registry", "install it with `apt-get install docker-registry`")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.yml"
        auth = ""
        if self.credentials is not None:
            htpasswd = self.workdir / "htpasswd"
            htpasswd.write_text(f"{self.credentials[0]}:{bcrypt_hash(self.credentials[1])}\n")
            auth = f"auth:\n  htpasswd: {{realm: propeller-test, path: {htpasswd}}}\n"
        tls = f"  tls: {{certificate: {self.tls[0]}, key: {self.tls[1]}}}\n" if self.tls else ""
        config.write_text(
            "version: 0.1\n"
            "log: {level: warn, fields: {service: registry}}\n"
            f"storage:\n  filesystem: {{rootdirectory: {self.workdir / 'data'}}}\n  delete: {{enabled: true}}\n"
            f"http:\n  addr: {self.host}\n{tls}{auth}"
        )
        log = (self.workdir / "registry.log").open("wb")
        self.process = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        context = ssl.create_default_context(cafile=str(self.tls[0])) if self.tls else None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=1, context=context):
                    return
            except urllib.error.HTTPError:
                return  # it answers (401 when it requires credentials)
            except OSError:
                pass
            time.sleep(0.05)
        text = self.log_text()
        self.stop()
        raise RuntimeError(f"docker-registry did not start on {self.host}: {text[-2000:]}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def log_text(self) -> str:
        path = self.workdir / "registry.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def push(self, repository: str, tag: str, data: bytes, *, media_type: str = "application/wasm",
             filename: str = "module.wasm") -> str:
        """Push `data` as a one-layer wasm artifact; returns the manifest digest ("sha256:…")."""
        import oras.client

        staging = self.workdir / "staging" / uuid.uuid4().hex
        staging.mkdir(parents=True)
        module = staging / filename
        module.write_bytes(data)
        config = staging / "config.json"
        config.write_text("{}")
        if self.credentials is None:
            client = oras.client.OrasClient(hostname=self.host, insecure=True)
        else:
            client = oras.client.OrasClient(hostname=self.host, insecure=True, auth_backend="basic")
            client.auth.set_basic_auth(*self.credentials)
        response = client.push(
            target=f"{self.host}/{repository}:{tag}",
            files=[f"{module}:{media_type}"],
            manifest_config=f"{config}:{WASM_CONFIG_MEDIA_TYPE}",
            manifest_annotations={"org.opencontainers.image.title": filename},
            disable_path_validation=True,
            quiet=True,
        )
        shutil.rmtree(staging, ignore_errors=True)
        digest = response.headers.get("Docker-Content-Digest", "")
        assert digest.startswith("sha256:"), f"no manifest digest in the push response: {response.headers}"
        return digest

    def ref(self, repository: str, tag_or_digest: str) -> str:
        sep = "@" if tag_or_digest.startswith("sha256:") else ":"
        return f"{self.host}/{repository}{sep}{tag_or_digest}"


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash for htpasswd (docker-registry accepts no other) from libxcrypt via `crypt`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import crypt
        except ImportError:
            crypt = None  # type: ignore[assignment]
    method = getattr(crypt, "METHOD_BLOWFISH", None) if crypt is not None else None
    need(method is not None and method in crypt.methods, "bcrypt password hashing (the crypt module with libxcrypt)",
         "run the tests on Python <= 3.12 on a system whose libcrypt supports bcrypt")
    # The lowest cost (2^4 rounds): the registry checks the hash on every request.
    return crypt.crypt(password, crypt.mksalt(method, rounds=16))


@contextlib.contextmanager
def running_registry(workdir: Path, **kwargs: object) -> Iterator[DockerRegistry]:
    registry = DockerRegistry(workdir, **kwargs)  # type: ignore[arg-type]
    registry.start()
    try:
        yield registry
    finally:
        registry.stop()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerRegistry]:
    """One docker-registry for the session; tests isolate by repository name."""
    with running_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg
