"""Live state of every node the collector has heard from.

The model is plain data updated by the collector's ingest path (one writer,
the asyncio loop) and read by the API.  Nodes are never removed when they stop
reporting: after ``node_timeout`` seconds of silence they become
``UNREACHABLE`` and keep their last values.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

import msgspec

# The few headline numbers the overview shows for every node.
SUMMARY_METRICS: tuple[str, ...] = (
    "cpu.percent",
    "mem.percent",
    "net.rx_bps",
    "net.tx_bps",
    "load.1",
)


#: Store document kind of nodes gone for good (terminated instances): their history
#: stays, but a restarted collector does not list them again.
RETIRED_DOC: Final = "retired_node"


class NodeStatus(enum.StrEnum):
    ONLINE = "online"
    UNREACHABLE = "unreachable"


@dataclass(slots=True)
class NodeState:
    """What the collector knows about one node right now."""

    node_id: str
    hostname: str
    first_seen: float
    last_seen: float
    last_ts: float
    interval: float
    info: dict[str, object] = field(default_factory=dict)
    latest: Mapping[str, float] = field(default_factory=dict)
    reports: int = 0

    def status(self, now: float, timeout: float) -> NodeStatus:
        return NodeStatus.ONLINE if now - self.last_seen <= timeout else NodeStatus.UNREACHABLE


class NodeSummary(msgspec.Struct, frozen=True):
    """One node's row in the overview (the wire shape of ``GET /api/v1/nodes``)."""

    node_id: str
    hostname: str
    status: str
    last_seen: float
    last_ts: float
    interval: float
    info: dict[str, object]
    values: dict[str, float]


Listener = Callable[[NodeState], None]


class ClusterModel:
    """Nodes keyed by id, with a tiny observer hook for status changes."""

    def __init__(self, node_timeout: float = 5.0) -> None:
        if node_timeout <= 0:
            raise ValueError("node_timeout must be > 0 seconds")
        self.node_timeout = node_timeout
        self._nodes: dict[str, NodeState] = {}
        self._listeners: list[Listener] = []

    def __len__(self) -> int:
        return len(self._nodes)

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(node)`` after every update of a node."""
        self._listeners.append(listener)

    def update(
        self,
        node_id: str,
        hostname: str,
        ts: float,
        interval: float,
        values: Mapping[str, float],
        info: dict[str, object],
        now: float,
    ) -> NodeState:
        """Record a report from ``node_id`` received at ``now``."""
        node = self._nodes.get(node_id)
        if node is None:
            node = NodeState(node_id, hostname, now, now, ts, interval, info, values, 0)
            self._nodes[node_id] = node
        else:
            node.hostname = hostname
            node.last_seen = now
            # A late (replayed) report must not roll the live values back in time.
            if ts >= node.last_ts:
                node.last_ts = ts
                node.latest = values
            node.interval = interval
            node.info = info
        node.reports += 1
        for listener in self._listeners:
            listener(node)
        return node

    def restore(self, node: NodeState) -> None:
        """Add a node known from the store (e.g. after a restart), without values."""
        self._nodes.setdefault(node.node_id, node)

    def forget(self, node_id: str) -> bool:
        """Drop a node that is gone for good (a terminated instance); its history stays in
        the store.  A node that reports again comes back.  Call it on the model's writer."""
        return self._nodes.pop(node_id, None) is not None

    def get(self, node_id: str) -> NodeState | None:
        return self._nodes.get(node_id)

    def nodes(self) -> list[NodeState]:
        return list(self._nodes.values())

    def summary(self, node: NodeState, now: float) -> NodeSummary:
        return NodeSummary(
            node_id=node.node_id,
            hostname=node.hostname,
            status=node.status(now, self.node_timeout).value,
            last_seen=node.last_seen,
            last_ts=node.last_ts,
            interval=node.interval,
            info=node.info,
            values={k: node.latest[k] for k in SUMMARY_METRICS if k in node.latest},
        )

    def summaries(self, now: float) -> list[NodeSummary]:
        return [self.summary(n, now) for n in self._nodes.values()]
