"""The in-process broker (amqtt, MQTT 3.1.1) for a bare machine with no broker.

Used only when no broker address is configured and nothing listens on localhost:1883. It is meant
for trying Propeller out and for a single gateway box; a fleet should run Mosquitto.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from amqtt.broker import Broker
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
        return True


def port_is_listening(host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class EmbeddedBroker:
    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port
        self._broker: Broker | None = None

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
        logging.getLogger("transitions").setLevel(logging.WARNING)
        self._broker = Broker(config)
        await self._broker.start()
        log.info("started the in-process MQTT broker on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._broker is not None:
            try:
                await asyncio.wait_for(self._broker.shutdown(), 5)
            except Exception:
                log.exception("the in-process broker did not shut down cleanly")
            self._broker = None
