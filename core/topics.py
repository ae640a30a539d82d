"""MQTT topic templates: the only place topics are spelled out.

Every topic lives under upstream's prefix `m/{domain}/c/{channel}/`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Suffixes after the prefix, exactly as upstream uses them.
START = "control/manager/start"
STOP = "control/manager/stop"
INVOKE = "control/manager/invoke"
# Extension: the manager acknowledges a stored result so a proplet can drop it from its outbox.
RESULT_ACK = "control/manager/result_ack"
# Extension: the manager, once subscribed at its start, asks the proplets to announce themselves
# again: those started with it (or before it) announced while nobody listened.
DISCOVER = "control/manager/discover"
CREATE = "control/proplet/create"
ALIVE = "control/proplet/alive"
RESULTS = "control/proplet/results"
INVOKE_RESULTS = "control/proplet/invoke_results"
METRICS = "control/proplet/metrics"
TASK_METRICS = "control/proplet/task_metrics"
# Extension: a proplet tells the manager it started (or refused) a task.
TASK_STATE = "control/proplet/task_state"
REGISTRY_REQUEST = "registry/proplet"
REGISTRY_CHUNK = "registry/server"
# Extension: chunks of raw bytes for requests that ask for them (`encoding: "binary"`). A topic of
# its own, so upstream peers subscribed to registry/server never see a payload they cannot parse.
REGISTRY_CHUNK_BINARY = "registry/server/binary"

# Periodic, and each one superseded by the next: the manager takes them at QoS 0, so it sends no
# acknowledgement per heartbeat (a socket write each, nearly half of what a heartbeat cost it).
# Proplets still publish them at their QoS and the broker acknowledges that. A Last Will, sent on
# the alive topic, is lost only if the manager is itself disconnected then; liveness then notices
# the silence instead.
MANAGER_TELEMETRY = (ALIVE, METRICS, TASK_METRICS)
MANAGER_INBOUND = (
    CREATE, ALIVE, RESULTS, INVOKE_RESULTS, METRICS, TASK_METRICS, TASK_STATE,
)
PROPLET_INBOUND = (START, STOP, INVOKE, RESULT_ACK, DISCOVER, REGISTRY_CHUNK, REGISTRY_CHUNK_BINARY)

# Federated learning. The round start is under the prefix; a proplet's update fallback and the
# next-round notice are not (upstream publishes them bare).
FL_ROUND_START = "fl/rounds/start"
FL_ROUND_NEXT = "fl/rounds/next"
FL_UPDATES_FILTER = "fl/rounds/+/updates/+"
_FL_UPDATE = re.compile(r"^fl/rounds/([^/+#]+)/updates/([^/+#]+)$")


def fl_update_topic(round_id: str, proplet_id: str) -> str:
    """Upstream's fallback topic for a participant's update (no prefix)."""
    return f"fl/rounds/{round_id}/updates/{proplet_id}"


def fl_update_parts(topic: str) -> tuple[str, str] | None:
    """(round id, proplet id) of an update topic, or None."""
    m = _FL_UPDATE.match(topic)
    return (m.group(1), m.group(2)) if m else None


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names for one domain (upstream: tenant) and channel."""

    domain: str
    channel: str

    @property
    def prefix(self) -> str:
        return f"m/{self.domain}/c/{self.channel}/"

    def topic(self, suffix: str) -> str:
        return self.prefix + suffix

    def suffix(self, topic: str) -> str | None:
        """The part after the prefix, or None when the topic is not ours."""
        if topic.startswith(self.prefix):
            return topic[len(self.prefix):]
        return None

    @property
    def start(self) -> str:
        return self.topic(START)

    @property
    def stop(self) -> str:
        return self.topic(STOP)

    @property
    def invoke(self) -> str:
        return self.topic(INVOKE)

    @property
    def result_ack(self) -> str:
        return self.topic(RESULT_ACK)

    @property
    def discover(self) -> str:
        return self.topic(DISCOVER)

    @property
    def create(self) -> str:
        return self.topic(CREATE)

    @property
    def alive(self) -> str:
        return self.topic(ALIVE)

    @property
    def results(self) -> str:
        return self.topic(RESULTS)

    @property
    def invoke_results(self) -> str:
        return self.topic(INVOKE_RESULTS)

    @property
    def metrics(self) -> str:
        return self.topic(METRICS)

    @property
    def task_metrics(self) -> str:
        return self.topic(TASK_METRICS)

    @property
    def task_state(self) -> str:
        return self.topic(TASK_STATE)

    @property
    def registry_request(self) -> str:
        return self.topic(REGISTRY_REQUEST)

    @property
    def registry_chunk(self) -> str:
        return self.topic(REGISTRY_CHUNK)

    @property
    def registry_chunk_binary(self) -> str:
        return self.topic(REGISTRY_CHUNK_BINARY)

    def manager_subscriptions(self) -> list[str]:
        return [self.topic(s) for s in MANAGER_INBOUND]

    def proplet_subscriptions(self) -> list[str]:
        return [self.topic(s) for s in PROPLET_INBOUND]
