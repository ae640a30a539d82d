"""MQTT security against a real Mosquitto: TLS with a test CA made with openssl, client
certificates, a password file and the ACL shipped in docs/mosquitto/acl.conf. The manager, the
proxy and a proplet run as processes over mqtts:// with their credentials."""

from __future__ import annotations

import asyncio
import base64
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest

from core.mqtt import MqttConnection, make_client, parse_broker_url
from tests.fleet import PROPELLER, Fleet
from tests.registry import running_registry
from tests.services import Mosquitto, need
from tests.wasmfixtures import wasm
from tests.wire import eventually

pytestmark = pytest.mark.serial

ROOT = Path(__file__).resolve().parents[2]
USERS = {"propeller-manager": "m-secret", "propeller-proxy": "x-secret", "edge-tls": "p-secret",
         "rogue": "r-secret"}


@dataclass
class Pki:
    ca: Path
    certs: dict[str, tuple[Path, Path]]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(directory: Path, names: list[str]) -> Pki:
    need(shutil.which("openssl") is not None, "openssl", "install it with `apt-get install openssl`")
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=propeller test CA", cwd=directory)
    certs = {}
    for name in ["server", *names]:
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={'127.0.0.1' if name == 'server' else name}", cwd=directory)
        ext = directory / f"{name}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1\n" if name == "server" else "extendedKeyUsage=clientAuth\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", ext.name, cwd=directory)
        certs[name] = (directory / f"{name}.pem", directory / f"{name}.key")
    for path in directory.iterdir():
        path.chmod(0o644)  # mosquitto drops to its own user and must read them
    return Pki(directory / "ca.pem", certs)


@pytest.fixture
def secure_fleet(tmp_path: Path) -> Iterator[tuple[Fleet, Pki]]:
    pki = make_pki(tmp_path / "pki", list(USERS))
    passwd = tmp_path / "passwd"
    passwd.touch()
    for user, password in USERS.items():
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True, capture_output=True)
    passwd.chmod(0o644)
    acl = tmp_path / "acl.conf"
    shutil.copy(ROOT / "docs" / "mosquitto" / "acl.conf", acl)
    acl.chmod(0o644)
    server_cert, server_key = pki.certs["server"]
    broker = Mosquitto(tmp_path / "mosquitto", extra_conf="\n".join([
        f"cafile {pki.ca}", f"certfile {server_cert}", f"keyfile {server_key}", "require_certificate true",
        "allow_anonymous false", f"password_file {passwd}", f"acl_file {acl}"]))
    broker.start()
    fleet = Fleet(tmp_path, broker)
    try:
        yield fleet, pki
    finally:
        fleet.stop_all()
        broker.stop()


def tls_env(prefix: str, pki: Pki, name: str, password: str, broker: Mosquitto) -> dict[str, str]:
    cert, key = pki.certs[name]
    return {f"{prefix}_MQTT_ADDRESS": f"mqtts://127.0.0.1:{broker.port}", f"{prefix}_API_KEY": password,
            f"{prefix}_ENTITY_ID": name, f"{prefix}_MQTT_TLS_CA_CERT": str(pki.ca),
            f"{prefix}_MQTT_TLS_CLIENT_CERT": str(cert), f"{prefix}_MQTT_TLS_CLIENT_KEY": str(key)}


def client(broker: Mosquitto, pki: Pki, name: str, password: str | None) -> aiomqtt.Client:
    cert, key = pki.certs[name]
    conn = MqttConnection(parse_broker_url(f"mqtts://127.0.0.1:{broker.port}"), f"{name}-raw", username=name,
                          password=password, tls_ca_cert=str(pki.ca), tls_client_cert=str(cert),
                          tls_client_key=str(key), timeout=5)
    return make_client(conn)


async def test_tls_passwords_and_acl(secure_fleet: tuple[Fleet, Pki], tmp_path: Path) -> None:
    fleet, pki = secure_fleet
    broker = fleet.broker
    with running_registry(tmp_path / "registry") as registry:
        manager_env = tls_env("MANAGER", pki, "propeller-manager", USERS["propeller-manager"], broker)
        manager_env.pop("MANAGER_MQTT_ADDRESS")
        await asyncio.to_thread(fleet.start_manager, MANAGER_MQTT_ADDRESS=f"mqtts://127.0.0.1:{broker.port}",
                                **manager_env)
        fleet.spawn("proplet", [*PROPELLER, "proplet"], {
            **tls_env("PROPLET", pki, "edge-tls", USERS["edge-tls"], broker), "PROPLET_TENANT_ID": fleet.domain,
            "PROPLET_STATE_DIR": str(tmp_path / "edge"), "PROPLET_CACHE_DIR": str(tmp_path / "edge-cache")})
        fleet.spawn("proxy", [*PROPELLER, "proxy"], {
            **tls_env("PROXY", pki, "propeller-proxy", USERS["propeller-proxy"], broker),
            "PROXY_TENANT_ID": fleet.domain, "PROXY_REGISTRY_URL": registry.host})
        registry.push("wasm/secure", "v1", wasm("add"))
        async with httpx.AsyncClient(base_url=fleet.api, timeout=30) as api:
            await eventually(lambda: _online(api, "edge-tls"), 30, interval=0.1)
            inline = await _run(api, {"name": "add", "file": base64.b64encode(wasm("add")).decode(), "inputs": [1, 2]})
            oci = await _run(api, {"name": "add", "image_url": registry.ref("wasm/secure", "v1"), "inputs": [3, 4]})
            assert (inline["results"], oci["results"]) == ("3", "7"), (inline, oci, fleet.logs())

            # The ACL: an authenticated proplet cannot publish a start; other proplets never see it.
            prefix = f"m/{fleet.domain}/c/default/"
            async with client(broker, pki, "rogue", USERS["rogue"]) as rogue, \
                    client(broker, pki, "edge-tls", USERS["edge-tls"]) as listener:
                await listener.subscribe(prefix + "control/manager/start", qos=1)
                await rogue.publish(prefix + "control/manager/start", b'{"id":"forged","name":"x","image_url":"y"}',
                                    qos=1)
                await rogue.publish(prefix + "control/proplet/alive", b'{"proplet_id":"rogue","status":"alive"}',
                                    qos=1)
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(1.5):
                        async for _ in listener.messages:
                            break
                # ... while its proplet-side messages go through.
                await eventually(lambda: _known(api, "rogue"), 10, interval=0.1)
                # A training update goes to the manager only under the sender's own id.
                await rogue.publish("fl/rounds/r1/updates/edge-tls", b'{"update":{"w":[6]}}', qos=1)
                await rogue.publish("fl/rounds/r1/updates/rogue", b'{"update":{"w":[1]}}', qos=1)
                await eventually(lambda: _updates_received(api, 1), 10, interval=0.1)
                await asyncio.sleep(0.5)
                assert await _updates_received(api, 1), "the update under another proplet's id got through"

    # A wrong password and a missing client certificate are refused, with a log line that says so.
    with pytest.raises(aiomqtt.MqttError):
        async with client(broker, pki, "rogue", "wrong-password"):
            pass
    cert_less = MqttConnection(parse_broker_url(f"mqtts://127.0.0.1:{broker.port}"), "no-cert", username="rogue",
                               password=USERS["rogue"], tls_ca_cert=str(pki.ca), timeout=5)
    with pytest.raises(aiomqtt.MqttError):
        async with make_client(cert_less):
            pass
    fleet.spawn("bad-proplet", [*PROPELLER, "proplet"], {
        **tls_env("PROPLET", pki, "edge-tls", "not-the-password", broker), "PROPLET_TENANT_ID": fleet.domain,
        "PROPLET_STATE_DIR": str(tmp_path / "bad"), "PROPLET_CACHE_DIR": str(tmp_path / "bad-cache")})
    await eventually(lambda: "refused the credentials" in fleet.log_path("bad-proplet").read_text(), 15)
    print("\nSECURITY mqtts: TLS + client certs + passwords + ACL; inline and OCI tasks ran; forged start "
          "dropped by the ACL; wrong password and missing certificate refused")


async def _online(api: httpx.AsyncClient, pid: str) -> bool:
    body = (await api.get("/proplets", params={"status": "active"})).json()
    return any(p["id"] == pid for p in body["proplets"])


async def _updates_received(api: httpx.AsyncClient, count: int) -> bool:
    text = (await api.get("/metrics")).text
    return f'manager_mqtt_messages_received_total{{topic="fl/rounds/updates"}} {float(count)}' in text


async def _known(api: httpx.AsyncClient, pid: str) -> bool:
    return (await api.get(f"/proplets/{pid}")).status_code == 200


async def _run(api: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    tid = (await api.post("/tasks", json=body)).json()["id"]
    await api.post(f"/tasks/{tid}/start")

    async def done() -> Any:
        task = (await api.get(f"/tasks/{tid}")).json()
        return task if task["state_name"] in ("completed", "failed") else None

    return await eventually(done, 30, interval=0.05)
