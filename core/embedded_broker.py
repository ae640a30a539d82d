"""The in-process broker (amqtt, MQTT 3.1.1) for a bare machine with no broker.

Used only when no broker address is configured and nothing listens on localhost:1883. It is meant
for trying Propeller out and for a single gateway box; a fleet should run Mosquitto.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import weakref
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import ListenerConfig
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

log = logging.getLogger(__name__)


class OpenAuth(BaseAuthPlugin):
    """Accept every client, and mark only clients without a username as anonymous.

    amqtt keeps offline messages only for non-anonymous sessions, and its stock anonymous plugin
    marks every session anonymous, which would lose the manager's and proplets' queued messages
    across a reconnect.
    """

    async def authenticate(self, *, session: Session) -> bool:
        session.is_anonymous = not session.username
        # amqtt reads the socket with a timeout of the client's keep-alive, which is too early to
        # drop a client (it pings only after a keep-alive without sending); MQTT gives it 1.5 times
        # (MQTT-3.1.2-24). Runs once per CONNECT, before the session's reader starts.
        if session.keep_alive > 0:
            session.keep_alive = -(-session.keep_alive * 3 // 2)
        return True


def _drop_silent_client(self: BrokerProtocolHandler) -> None:
    """Close the connection of a client silent for 1.5 x its keep-alive, as abnormal: its Last Will
    goes out. amqtt's handler ignores the read timeout, so a frozen or cut-off proplet kept its
    connection and the manager learnt of it only from missed heartbeats (3 x their interval)."""
    waiter = self._disconnect_waiter
    if waiter is not None and not waiter.done():
        log.info("dropping MQTT client %s: nothing received for 1.5 x its keep-alive",
                 self.session.client_id if self.session else "?")
        waiter.set_result(None)  # what amqtt does on a protocol violation (handle_connect)


# Only the in-process broker uses amqtt's broker handler; our clients are aiomqtt's.
BrokerProtocolHandler.handle_read_timeout = _drop_silent_client  # type: ignore[method-assign]


NOTHING, MQTT_BROKER, NOT_MQTT = "nothing", "an MQTT broker", "not an MQTT broker"


def what_listens(host: str, port: int, timeout: float = 1.0) -> str:
    """NOTHING, MQTT_BROKER or NOT_MQTT: whether an MQTT 3.1.1 CONNECT sent to host:port gets a CONNACK.

    Any CONNACK counts, a refusal too (a broker that wants a password is still the broker). A
    listener that answers otherwise, closes, or stays silent for `timeout` is something else, which
    the manager could neither use as its broker nor replace with its in-process one."""
    try:
        conn = socket.create_connection((host, port), timeout=min(timeout, 0.3))
    except OSError:
        return NOTHING
    client_id = f"propeller-probe-{os.getpid()}".encode()
    # CONNECT: protocol name MQTT, level 4 (3.1.1), clean session, keep-alive 5 s, the client id.
    body = b"\x00\x04MQTT\x04\x02\x00\x05" + len(client_id).to_bytes(2, "big") + client_id
    with conn:
        try:
            conn.settimeout(timeout)
            conn.sendall(bytes([0x10, len(body)]) + body)
            answer = conn.recv(4)
            if answer[:1] == b"\x20":
                conn.sendall(b"\xe0\x00")  # DISCONNECT: a clean goodbye, no Last Will, no log noise
                return MQTT_BROKER
        except OSError:
            pass
    return NOT_MQTT


def port_taken_message(port: int) -> str:
    """Why the manager with no broker configured cannot start when NOT_MQTT holds its broker port."""
    return (f"Something that is not an MQTT broker listens on 127.0.0.1:{port} (it did not answer an MQTT "
            "CONNECT), so the manager can neither use it as its broker nor start its in-process broker there. "
            "Stop that program, or set MANAGER_MQTT_ADDRESS to your broker (mqtt://host:port), or "
            "MANAGER_DEFAULT_BROKER_PORT to a free port for the in-process broker; proplets look for the broker "
            f"on localhost:1883, so then start them with PROPLET_MQTT_ADDRESS=mqtt://127.0.0.1:<that port>.")


class _Broker(Broker):
    """amqtt's broker, with a session taken over by a new connection left to that connection.

    A client that reconnects with clean_session off while the broker still holds its old connection
    (a proplet back from a power cut or a cut link before its keep-alive ran out) shares one Session
    object with it. amqtt closes the old connection, whose clean-up then marks that shared session
    disconnected and publishes its Last Will: the new connection stayed deaf (its messages were queued
    as if it were away) and the manager read 'offline'. The old connection's clean-up now only stops
    it. Overrides private methods of amqtt 0.12.1 (pinned in pyproject.toml).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._taken_over: weakref.WeakSet[BrokerProtocolHandler] = weakref.WeakSet()

    async def _authenticate(self, session: Session, listener: ListenerConfig) -> bool:
        # Runs for each CONNECT just before amqtt's take-over: note the connection it replaces.
        current = self._sessions.get(session.client_id) if session.client_id else None
        if current is not None and current[0] is session and session.transitions.is_connected():
            self._taken_over.add(current[1])
        return await super()._authenticate(session, listener)

    async def _handle_disconnect(self, client_session: Session, handler: BrokerProtocolHandler,
                                 disconnect_waiter: asyncio.Future[Any]) -> None:
        if handler in self._taken_over:
            await self._stop_handler(handler)
            return
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)


def _quiet_probes(record: logging.LogRecord) -> bool:
    return "No data to decode MQTT packet fixed header" not in record.getMessage()


class EmbeddedBroker:
    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port
        self._broker: _Broker | None = None

    async def start(self) -> None:
        if self.port == 0:
            with socket.socket() as s:
                s.bind((self.host, 0))
                self.port = s.getsockname()[1]
        config: dict[str, Any] = {
            # amqtt's default listener is 0.0.0.0:1883; never expose the fallback broker.
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {f"{__name__}.OpenAuth": {}},
        }
        # amqtt logs every connection at INFO; keep the operator's log readable.
        logging.getLogger("amqtt").setLevel(logging.WARNING)
        # A connection closed before its CONNECT (a port check: a health probe, a scanner, a manager
        # older than what_listens) is no fault of the broker; amqtt logs each as an ERROR and a WARNING.
        logging.getLogger("amqtt.broker").addFilter(_quiet_probes)
        logging.getLogger("transitions").setLevel(logging.WARNING)
        self._broker = _Broker(config)
        await self._broker.start()
        log.info("started the in-process MQTT broker on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._broker is not None:
            try:
                async with asyncio.timeout(5):
                    await self._broker.shutdown()
            except Exception:
                log.exception("the in-process broker did not shut down cleanly")
            self._broker = None
