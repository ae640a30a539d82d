"""The MQTT bus: one client factory, a reconnecting connection, a publish window, a traffic tap.

Shared by the manager, the proxy and the proplet. Upstream's worst defect is a manager that stops
listening after a broker blip because it never re-subscribes; here every (re)connect subscribes
again before anything else happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import aiomqtt
import paho.mqtt.client as mqtt
from paho.mqtt.matcher import MQTTMatcher

from core.events import Fanout
from core.lifecycle import cancel_and_wait

log = logging.getLogger(__name__)
# paho's packet trace. aiomqtt's default logger is pinned at WARNING; this one follows the
# process's log level, so `--log-level debug` shows every packet (never payloads or passwords).
PACKET_LOG = logging.getLogger("core.mqtt.packets")
# The loop running in this thread, or None (asyncio's own fast check, used on every publish).
_running_loop = asyncio._get_running_loop

# Without TCP_NODELAY on both ends a QoS 1 round trip costs ~88 ms instead of ~1 ms.
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]

_TLS_SCHEMES = {"mqtts", "ssl", "tls"}
_PLAIN_SCHEMES = {"mqtt", "tcp"}


class BrokerUnavailable(ConnectionError):
    """The broker could not be reached in time. The message says where and what to do."""


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Accept mqtt://, tcp://, mqtts://, ssl://, tls://, host:port, [v6]:port and a bare host."""
    text = url.strip()
    if not text:
        raise ValueError("the broker address is empty")
    if "://" not in text:
        text = "mqtt://" + text
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in _TLS_SCHEMES | _PLAIN_SCHEMES:
        raise ValueError(
            f"unsupported broker scheme '{scheme}' in {url!r}: use mqtt://, tcp://, mqtts://, ssl:// or tls://"
        )
    tls = scheme in _TLS_SCHEMES
    if not parts.hostname:
        raise ValueError(f"no host in broker address {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"invalid port in broker address {url!r}") from None
    return BrokerAddress(parts.hostname, port or (8883 if tls else 1883), tls)


@dataclass(frozen=True, slots=True)
class MqttConnection:
    """Everything needed to open one client connection."""

    address: BrokerAddress
    client_id: str
    username: str | None = None
    password: str | None = None
    keepalive: int = 30
    qos: int = 1
    # False keeps the broker-side session (subscriptions and queued QoS 1 messages) across drops.
    clean_session: bool = True
    timeout: float = 30.0
    tls_ca_cert: str | None = None
    tls_client_cert: str | None = None
    tls_client_key: str | None = None
    tls_insecure: bool = False
    # The setting that names the broker (PROPLET_MQTT_ADDRESS...), for errors that tell what to change.
    address_setting: str = ""


class MqttClientOptions:
    """`mqtt_connection()` for a settings class with the `mqtt_*` fields (the manager's and proxy's
    pydantic settings, the proplet's msgspec ones): one place that turns settings into a connection."""

    __slots__ = ()

    def mqtt_connection(self, address: BrokerAddress, client_id: str, password: str = "", *,
                        clean_session: bool) -> MqttConnection:
        """The MqttConnection these settings describe, for `client_id` (also the username)."""
        s: Any = self
        # The proplet's msgspec settings name their prefix ENV_PREFIX, pydantic's keep it in model_config.
        prefix = getattr(s, "ENV_PREFIX", "") or getattr(s, "model_config", {}).get("env_prefix", "")
        return MqttConnection(
            address=address, client_id=client_id, username=client_id, password=password or None,
            keepalive=s.mqtt_keep_alive, qos=s.mqtt_qos, clean_session=clean_session,
            timeout=s.mqtt_timeout, tls_ca_cert=s.mqtt_tls_ca_cert,
            tls_client_cert=s.mqtt_tls_client_cert, tls_client_key=s.mqtt_tls_client_key,
            tls_insecure=s.mqtt_tls_insecure_skip_verify,
            address_setting=f"{prefix}MQTT_ADDRESS",
        )


class CycleFreeMatcher(MQTTMatcher):
    """paho's matcher of per-filter callbacks, without garbage when none is registered.

    paho looks every incoming message up in this matcher, and its `iter_match` builds a closure that
    refers to itself: a reference cycle per message that only the cyclic collector frees. At 2,000
    messages/s that is ~12,000 objects a second for the collector, whose full passes stop every
    thread of the process (the console's and its hosted core's). aiomqtt registers no per-filter
    callbacks, so the tree is empty and there is nothing to match."""

    def iter_match(self, topic: str):  # type: ignore[no-untyped-def]
        if not self._root._children:
            return iter(())
        return super().iter_match(topic)


def make_client(
    conn: MqttConnection,
    *,
    will: aiomqtt.Will | None = None,
    max_concurrent_outgoing_calls: int | None = None,
) -> aiomqtt.Client:
    """The one place an MQTT client is built: TCP_NODELAY, keep-alive, identity, TLS, Last Will."""
    tls_params = None
    tls_context = None
    if conn.address.tls:
        if (conn.tls_client_cert and not conn.tls_client_key) or (conn.tls_client_key and not conn.tls_client_cert):
            raise ValueError("mutual TLS needs both a client certificate and its key")
        tls_context = ssl.create_default_context(cafile=conn.tls_ca_cert)
        if conn.tls_client_cert:
            tls_context.load_cert_chain(conn.tls_client_cert, conn.tls_client_key)
        if conn.tls_insecure:
            tls_context.check_hostname = False
            tls_context.verify_mode = ssl.CERT_NONE
    client = aiomqtt.Client(
        conn.address.host,
        conn.address.port,
        identifier=conn.client_id,
        username=conn.username or None,
        password=conn.password or None,
        keepalive=conn.keepalive,
        clean_session=conn.clean_session,
        protocol=aiomqtt.ProtocolVersion.V311,
        will=will,
        timeout=conn.timeout,
        tls_context=tls_context,
        tls_params=tls_params,
        tls_insecure=conn.tls_insecure if conn.address.tls else None,
        socket_options=NODELAY,
        max_concurrent_outgoing_calls=max_concurrent_outgoing_calls,
        logger=PACKET_LOG,
    )
    # aiomqtt builds its paho client in __init__ and keeps it for its lifetime (aiomqtt is pinned).
    client._client._on_message_filtered = CycleFreeMatcher()
    reader = BufferedReceive(client)
    client._client.on_socket_register_write = _WriteAtOnce(client, reader)
    return client


class BufferedReceive:
    """paho reads a packet off the socket in three or more `recv()` calls (its type, each byte of
    its length, then its body): a system call each, each giving up the GIL and waiting to win it
    back (from the console's thread, when it hosts the core). Under a fleet's chatter that was
    ~8,000 calls a second. Here one `recv()` of up to 64 KiB fills a buffer that paho's small reads
    are served from; a large body is still read straight from the socket.

    Pacing stays paho's: it reads one packet per readiness of the socket, and the loop then runs
    whoever consumes the messages; reading a whole buffer at once instead would outrun them and
    grow aiomqtt's (unbounded) queue under a flood. So each `loop_read` takes at most
    PACKETS_PER_TURN more packets, only from what is buffered, and since bytes already taken off
    the socket no longer wake the loop, a packet left in the buffer gets a turn of its own
    (`call_soon`).
    """

    SIZE = 65536
    # `received` takes DRAIN_BATCH (32) messages per turn; the socket's readiness and the turn of
    # its own each read at most 9, so reading keeps behind it (a flood measured with 16: 2,000
    # messages queued after 3 s; with 8: 9, and twice paho's own throughput).
    PACKETS_PER_TURN = 8
    __slots__ = ("_aio", "_data", "_draining", "_loop_read", "_paho", "_pos", "_scheduled", "_sock", "reading",
                 "socket_reads")

    def __init__(self, aio: aiomqtt.Client) -> None:
        paho_client = aio._client
        self._aio = aio
        self._paho = paho_client
        self._sock: Any = None
        self._data = b""
        self._pos = 0
        self._draining = False  # taking more packets: from the buffer only, never the socket
        self._scheduled = False
        self.reading = False  # in loop_read: what paho queues meanwhile (acknowledgements) waits for its end
        self.socket_reads = 0  # recv() calls made, for tests
        self._loop_read = paho_client.loop_read
        paho_client._sock_recv = self.recv  # type: ignore[method-assign]
        paho_client.loop_read = self.loop_read  # type: ignore[method-assign]

    def recv(self, bufsize: int) -> bytes:
        sock = self._paho._sock
        if sock is None:
            raise ConnectionError("self._sock is None")
        if sock is not self._sock:  # a new connection: what was left of the old one does not count
            self._sock, self._data, self._pos = sock, b"", 0
        data, pos = self._data, self._pos
        if pos < len(data):
            chunk = data[pos:pos + bufsize]
            self._pos = pos + len(chunk)
            return chunk
        if self._draining:
            raise BlockingIOError  # the rest of the packet comes with the socket's next readiness
        self.socket_reads += 1
        try:
            if bufsize >= self.SIZE:
                return sock.recv(bufsize)
            data = sock.recv(self.SIZE)
        except ssl.SSLWantReadError as err:  # as paho's own _sock_recv translates them
            raise BlockingIOError() from err
        except ssl.SSLWantWriteError as err:
            self._paho._call_socket_register_write()
            raise BlockingIOError() from err
        if len(data) <= bufsize:
            self._data, self._pos = b"", 0
            return data
        self._data, self._pos = data, bufsize
        return data[:bufsize]

    def buffered(self) -> int:
        return len(self._data) - self._pos if self._paho._sock is self._sock else 0

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        self.reading = True
        try:
            rc = self._loop_read(max_packets)
            self._draining = True
            for _ in range(self.PACKETS_PER_TURN):
                if rc != mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS or not self.buffered():
                    break
                rc = self._loop_read(1)
        finally:
            self._draining = False
            self.reading = False
        if rc == mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS and self.buffered() and not self._scheduled:
            self._scheduled = True
            self._aio._loop.call_soon(self._next_turn)
        return rc

    def _next_turn(self) -> None:
        self._scheduled = False
        if not self.buffered():
            return  # taken meanwhile by a readiness of the socket, or the connection is gone
        try:
            self.loop_read()
        except Exception as exc:  # as aiomqtt's reader does: a broken connection ends the client
            if not self._aio._disconnected.done():
                self._aio._disconnected.set_exception(exc)


class _WriteAtOnce:
    """Writes a message out at once instead of two turns of the loop later.

    paho asks the event loop to watch its socket for writability whenever it queues a packet, and
    aiomqtt answers with `call_soon_threadsafe(add_writer)`: a wake-up write to the loop's self-pipe,
    a turn to register the socket with epoll, a turn to learn it is writable (it nearly always is),
    then the send, then a second epoll call to unregister it. Each message out paid that, and a warm
    task crosses the network twice. Here paho writes at once, as paho itself does when it runs its
    own loop: outside its callbacks at once, inside one at the end of the current turn, and so too
    while paho reads (the acknowledgements of what it reads then leave together, see
    join_quiet_packets). Only a send that did not take everything (a full socket buffer)
    falls back to aiomqtt's writability watch. Called from another thread (paho's CONNECT, sent
    from aiomqtt's connecting thread) it defers to aiomqtt as before."""

    __slots__ = ("_aio", "_loop", "_reader", "_scheduled")

    def __init__(self, aio: aiomqtt.Client, reader: BufferedReceive) -> None:
        self._aio = aio
        self._loop = aio._loop
        self._reader = reader
        self._scheduled = False

    def __call__(self, paho_client: Any, userdata: Any, sock: Any) -> None:
        if _running_loop() is not self._loop:
            self._aio._on_socket_register_write(paho_client, userdata, sock)
        elif not paho_client._in_callback_mutex.locked() and not self._reader.reading:
            self._write(paho_client, userdata, sock)
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._write, paho_client, userdata, sock)

    def _write(self, paho_client: Any, userdata: Any, sock: Any) -> None:
        self._scheduled = False
        if paho_client._sock is not sock:
            return  # the connection closed meanwhile; a new one registers its own socket
        try:
            join_quiet_packets(paho_client._out_packet)
            paho_client.loop_write()
        except Exception as exc:  # a broken pipe: as aiomqtt's own writer does, end the connection
            if not self._aio._disconnected.done():
                self._aio._disconnected.set_exception(exc)
            return
        if paho_client._registered_write and paho_client._sock is sock:
            # The socket took part of it: let the loop say when it can take the rest.
            self._aio._on_socket_register_write(paho_client, userdata, sock)


# Packets up to this size are joined by join_quiet_packets; a larger one (a module chunk) is sent
# as it is rather than copied.
JOIN_MAX_BYTES = 4096


def join_quiet_packets(out: deque[Any]) -> None:
    """Runs of small queued packets that need nothing done once written leave in one `send()`.

    paho writes each queued packet with a `send()` of its own (a system call that gives up the GIL,
    and on loopback runs the receiver's side too). Acknowledgements pile up while paho reads: one per
    QoS 1 message received, several per readiness of the socket now that reads are buffered. paho
    does something after writing only a QoS 0 PUBLISH (its on_publish) and a DISCONNECT; any other
    packet not yet started (an acknowledgement, a QoS 1 or 2 PUBLISH, which completes on its
    PUBACK, a SUBSCRIBE, a ping) is joined with its neighbours into one packet of paho's own shape,
    in order. `out` is paho's `_out_packet` (paho is pinned)."""
    if len(out) < 2:
        return
    joined: deque[Any] = deque()
    run: list[Any] = []

    def close_run() -> None:
        if len(run) == 1:
            joined.append(run[0])
        elif run:
            data = b"".join(packet["packet"] for packet in run)
            joined.append({"command": mqtt.PUBACK, "mid": 0, "qos": 1, "pos": 0, "to_process": len(data),
                           "packet": data, "info": None})
        run.clear()

    for packet in out:
        command = packet["command"] & 0xF0
        if (packet["pos"] == 0 and packet["to_process"] <= JOIN_MAX_BYTES and command != mqtt.DISCONNECT
                and not (command == mqtt.PUBLISH and packet["qos"] == 0)):
            run.append(packet)
            if sum(p["to_process"] for p in run) >= 16 * JOIN_MAX_BYTES:
                close_run()  # one send() of about 64 KiB at most
        else:
            close_run()
            joined.append(packet)
    close_run()
    if len(joined) < len(out):
        out.clear()
        out.extend(joined)


# Messages handled back to back before the loop gets a turn (when a backlog is drained without waiting).
DRAIN_BATCH = 32


# Put in aiomqtt's incoming queue when the connection is lost, to wake the wait in `received`. The
# queue is unbounded (max_queued_incoming_messages is never set: it would drop commands), so it fits.
_DISCONNECTED: Any = object()


def _loss_seen(disconnected: asyncio.Future[None]) -> None:
    """Marks a lost connection's error as taken. The bus learns of the loss from aiomqtt's MqttError
    or from received(); a loss while it was subscribing or closing (aiomqtt's __aexit__ returns at
    once from a connection already lost), or while it was connecting (aiomqtt's __aenter__ replaces
    a future already done), left the error untaken, and asyncio logged "Future exception was never
    retrieved" when the future was collected, in whatever the process did then."""
    if not disconnected.cancelled():
        disconnected.exception()


async def received(client: aiomqtt.Client) -> AsyncIterator[aiomqtt.Message]:
    """`client.messages`, without a task and an `asyncio.wait` per message.

    aiomqtt's iterator creates a task and waits on it and the disconnect future for every message:
    a fifth of the manager's loop under a flood, and three turns of the loop before an idle proplet
    sees a start. Messages are taken from aiomqtt's queue directly instead (aiomqtt is pinned
    exactly; `_queue` is its incoming-message queue), and a lost connection puts a marker behind
    what had arrived, which ends the iteration with aiomqtt's MqttError once those are taken."""
    queue = client._queue
    disconnected = client._disconnected
    disconnected.add_done_callback(lambda _: queue.put_nowait(_DISCONNECTED))
    in_a_row = 0
    while True:
        try:
            message = queue.get_nowait()
        except asyncio.QueueEmpty:
            in_a_row = 0
            message = await queue.get()
        else:
            in_a_row += 1
            if in_a_row == DRAIN_BATCH:
                in_a_row = 0
                await asyncio.sleep(0)  # a backlog must not starve dispatch, the writer, the API
        if message is _DISCONNECTED:
            if disconnected.done():
                raise aiomqtt.MqttError("Disconnected during message iteration") from (
                    None if disconnected.cancelled() else disconnected.exception())
            continue  # left by an earlier connection of the same client
        yield message


def describe_connect_error(address: BrokerAddress, exc: BaseException, address_setting: str = "") -> str:
    """A connection failure in words an operator can act on; `address_setting` names the setting to change."""
    text = str(exc)
    if "refused" in text.lower() or isinstance(exc, ConnectionRefusedError):
        why = "connection refused"
    elif "not authorized" in text.lower() or "code:135" in text or "code:5" in text:
        return (
            f"The MQTT broker at {address.url} refused the credentials ({text}). Check the username "
            "(entity id) and password (API key)."
        )
    elif "certificate" in text.lower() or "ssl" in text.lower():
        return (
            f"TLS with the MQTT broker at {address.url} failed ({text}). Check the CA certificate and "
            "the client certificate settings."
        )
    else:
        why = text or type(exc).__name__
    start = "Start a broker there"
    if address.host in ("localhost", "127.0.0.1") and address.port == 1883:
        start += " (a manager here with no broker configured, `propeller serve` or the console, starts one)"
    return (f"Cannot reach the MQTT broker at {address.url} ({why}). {start}, or set "
            f"{address_setting or 'the broker address setting'} to the URL of a running broker.")


# ---------------------------------------------------------------------------------------------
# traffic tap


Direction = Literal["in", "out"]


@dataclass(frozen=True, slots=True)
class TrafficRecord:
    at: float
    direction: Direction
    topic: str
    size: int
    payload: bytes
    qos: int = 0


class TrafficTap(Fanout[TrafficRecord]):
    """Every message in and out, for the console's traffic view and for tests.

    Recording costs nothing while nobody subscribes.
    """

    def record(self, direction: Direction, topic: str, payload: bytes, qos: int = 0) -> None:
        if self._subs:
            self.emit(TrafficRecord(time.time(), direction, topic, len(payload), payload, qos))


# ---------------------------------------------------------------------------------------------
# the bus


MessageHandler = Callable[[str, bytes], Awaitable[None]]


# A connection the broker closes this soon after accepting it, several times in a row, is most likely
# taken over by another client with the same id (the broker closes the older connection of the two).
CLOSED_EARLY_S = 5.0  # beyond the longest backoff, so two clients in a clash never both look settled
CLOSED_EARLY_WARN_AFTER = 3


@dataclass(slots=True)
class BusCounters:
    connects: int = 0
    disconnects: int = 0
    received: int = 0
    published: int = 0
    publish_retries: int = 0
    handler_errors: int = 0
    last_error: str = ""
    connected_since: float | None = None


class MqttBus:
    """A reconnecting MQTT connection that re-subscribes on every connect.

    `run()` is the connection loop; run it in the owner's task group. Messages are handed to
    `on_message` one at a time, in order; a handler error is logged and counted and never ends the
    loop. Publishing waits for a connection, so a message published during a broker outage goes out
    after the reconnect.
    """

    def __init__(
        self,
        conn: MqttConnection,
        *,
        subscriptions: Sequence[str | tuple[str, int]],
        on_message: MessageHandler,
        will: aiomqtt.Will | None = None,
        on_connected: Callable[[], Awaitable[None]] | None = None,
        name: str = "mqtt",
        publish_window: int = 100,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
    ) -> None:
        self.conn = conn
        # A topic alone is taken at the connection's QoS; (topic, qos) takes it at most at that QoS.
        self.subscriptions = [(s, conn.qos) if isinstance(s, str) else (s[0], min(s[1], conn.qos))
                              for s in subscriptions]
        self.on_message = on_message
        self.on_connected = on_connected
        self.name = name
        self.tap = TrafficTap()
        self.counters = BusCounters()
        self.connected = asyncio.Event()
        self._client = make_client(conn, will=will)
        self._live: aiomqtt.Client | None = None
        # The "disconnected" future of aiomqtt's that _loss_seen watches (see _watch_loss).
        self._watched_loss: asyncio.Future[None] | None = None
        self._window = asyncio.Semaphore(publish_window)
        self._background: set[asyncio.Task[None]] = set()
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._closing = False
        self._first_connect = asyncio.get_running_loop().create_future()

    @property
    def address(self) -> BrokerAddress:
        return self.conn.address

    @property
    def closing(self) -> bool:
        return self._closing

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait for the first connection; raise BrokerUnavailable with the reason on timeout."""
        try:
            async with asyncio.timeout(timeout):  # not wait_for, which may drop a cancel (see publish)
                await asyncio.shield(self._first_connect)
        except TimeoutError:
            reason = self.counters.last_error or "no answer"
            raise BrokerUnavailable(reason) from None

    async def run(self) -> None:
        backoff = self._backoff_initial
        # Connections in a row that the broker closed soon after accepting them (see _closed_early).
        closed_early = 0
        while not self._closing:
            connected_at: float | None = None
            self._watch_loss()  # a loss during the connect is set on the future aiomqtt then replaces
            try:
                async with self._client as client:
                    self._watch_loss()
                    if self._closing:
                        # aiomqtt waits for the CONNACK in asyncio.wait_for, which may drop the owner's
                        # cancel (see publish); the owner closes the bus before it cancels this loop.
                        break
                    if self.subscriptions:
                        # Bounded here, not by aiomqtt, for the same reason as publish's PUBACK wait.
                        try:
                            async with asyncio.timeout(self.conn.timeout):
                                await client.subscribe(self.subscriptions, timeout=math.inf)
                        except TimeoutError:
                            raise aiomqtt.MqttError("no SUBACK in time") from None
                    self._live = client
                    self.counters.connects += 1
                    self.counters.connected_since = time.time()
                    self.counters.last_error = ""
                    self.connected.set()
                    if not self._first_connect.done():
                        self._first_connect.set_result(None)
                    log.info("%s: connected to %s, subscribed to %d topics",
                             self.name, self.address.url, len(self.subscriptions))
                    connected_at = time.monotonic()
                    if self.on_connected is not None:
                        await self._guarded(self.on_connected())
                    async for message in received(client):
                        payload = message.payload
                        if not isinstance(payload, bytes):
                            payload = b"" if payload is None else str(payload).encode()
                        topic = message.topic.value
                        self.counters.received += 1
                        self.tap.record("in", topic, payload, message.qos)
                        await self._guarded(self.on_message(topic, payload))
            except aiomqtt.MqttError as exc:
                self.counters.last_error = describe_connect_error(self.address, exc, self.conn.address_setting)
                if self.connected.is_set():
                    self.counters.disconnects += 1
                    if (closed_early >= CLOSED_EARLY_WARN_AFTER and connected_at is not None
                            and time.monotonic() - connected_at < CLOSED_EARLY_S):
                        # Still taken over: each line says why, not only the warning minutes above.
                        log.warning("%s: lost the broker at %s again %.1f s after connecting: another client "
                                    "probably uses the client id %s (see the warning above)", self.name,
                                    self.address.url, time.monotonic() - connected_at, self.conn.client_id)
                    else:
                        log.warning("%s: lost the broker at %s: %s", self.name, self.address.url, exc)
                else:
                    log.warning("%s: %s", self.name, self.counters.last_error)
            finally:
                self._live = None
                self.connected.clear()
                self.counters.connected_since = None
            if self._closing:
                break
            if connected_at is not None:
                if time.monotonic() - connected_at >= CLOSED_EARLY_S:
                    backoff, closed_early = self._backoff_initial, 0
                else:
                    # Backoff keeps growing: reconnecting at once only takes the session back.
                    closed_early += 1
                    if closed_early == CLOSED_EARLY_WARN_AFTER:
                        log.warning(
                            "%s: the broker at %s closed this connection within %.0f s of accepting it %d times "
                            "in a row. Usually another client is connected with the same client id (%s), and "
                            "each connection takes the session from the other: give every manager its own "
                            "MANAGER_ENTITY_ID and every proplet its own PROPLET_ENTITY_ID. Reconnecting every "
                            "%.0f s meanwhile.", self.name, self.address.url, CLOSED_EARLY_S, closed_early,
                            self.conn.client_id, self._backoff_max)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._backoff_max)

    def _watch_loss(self) -> None:
        """_loss_seen on aiomqtt's current "disconnected" future, once: a future stays the same over
        every failed connect while the broker is away, and took one more callback per attempt."""
        disconnected = self._client._disconnected
        if disconnected is not self._watched_loss:
            disconnected.add_done_callback(_loss_seen)
            self._watched_loss = disconnected

    async def _guarded(self, awaitable: Awaitable[None]) -> None:
        try:
            await awaitable
        except asyncio.CancelledError:
            raise
        except Exception:
            self.counters.handler_errors += 1
            log.exception("%s: message handler failed", self.name)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int | None = None,
        retain: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Publish and wait for the broker's acknowledgement (QoS > 0), reconnecting as needed.

        Raises BrokerUnavailable when the broker stays unreachable for `timeout` seconds
        (default: the connection's timeout).
        """
        qos = self.conn.qos if qos is None else qos
        deadline = time.monotonic() + (self.conn.timeout if timeout is None else timeout)
        async with self._window:
            while True:
                client = self._live
                if client is not None:
                    try:
                        # Bounded here, not by aiomqtt: given a timeout, aiomqtt waits for the PUBACK in
                        # asyncio.wait_for, which on Python 3.11 drops a cancel that comes in the turn the
                        # PUBACK is read and returns as if none came (CPython gh-86296). A chunk worker
                        # stopped that way went back to its queue and held the proxy's stop for 10 s.
                        async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                            await client.publish(topic, payload, qos=qos, retain=retain, timeout=math.inf)
                        self.counters.published += 1
                        self.tap.record("out", topic, payload, qos)
                        return
                    except (aiomqtt.MqttError, TimeoutError) as exc:
                        self.counters.publish_retries += 1
                        log.debug("%s: publish to %s failed (%s); retrying", self.name, topic,
                                  str(exc) or "no PUBACK in time")
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closing:
                    raise BrokerUnavailable(
                        self.counters.last_error
                        or f"no acknowledgement from the MQTT broker at {self.address.url} in time"
                    )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):  # not wait_for: see above
                        await self.connected.wait()
                if self._live is client:
                    # Same connection still up after a failed publish: give the loop a moment.
                    await asyncio.sleep(0.01)

    def publish_nowait(self, topic: str, payload: bytes, *, qos: int | None = None) -> bool:
        """Hand a message to the connection without waiting for the broker's acknowledgement.

        For the dispatch hot path: no task, no future, no wait. paho keeps a QoS 1 message until
        the broker acknowledges it and sends it again after a reconnect (the client object lives
        across reconnects), so delivery to the broker is as sure as with `publish` while this
        process lives. Returns False when there is no connection (nothing was queued).
        """
        client = self._live
        if client is None:
            return False
        qos = self.conn.qos if qos is None else qos
        # aiomqtt exposes no non-waiting publish; its paho client is the documented escape hatch
        # (aiomqtt is pinned exactly in pyproject.toml).
        info = client._client.publish(topic, payload, qos)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            return False
        self.counters.published += 1
        self.tap.record("out", topic, payload, qos)
        return True

    def send(self, topic: str, payload: bytes, *, qos: int | None = None) -> None:
        """Publish without waiting, retrying across reconnects until the bus closes.

        Connected, the message goes straight to paho (which keeps it until the broker has it);
        otherwise a task owned by the bus waits for the connection and is cancelled when the
        bus closes.
        """
        if self.publish_nowait(topic, payload, qos=qos):
            return
        task = asyncio.get_running_loop().create_task(self._send_forever(topic, payload, qos))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_forever(self, topic: str, payload: bytes, qos: int | None) -> None:
        while not self._closing:
            try:
                await self.publish(topic, payload, qos=qos)
                return
            except BrokerUnavailable:
                continue
            except Exception:
                log.exception("%s: publish to %s failed", self.name, topic)
                return

    async def close(self) -> None:
        """Stop reconnecting and cancel background sends. The owner cancels `run()`, whose exit
        sends DISCONNECT, so the broker does not publish the Last Will on a clean shutdown."""
        self._closing = True
        await cancel_and_wait(list(self._background), timeout=5, owner=self.name)
