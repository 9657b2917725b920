"""Fan-out of live events to Server-Sent-Events clients, bounded per client.

Everything here runs on the collector's asyncio loop.  Each client owns a
bounded queue of encoded ``sample`` events (the oldest is dropped and counted
when a client reads too slowly) and one slot for the newest ``nodes`` snapshot
(a snapshot replaces an unsent older one: only the latest matters), so a stalled
client costs at most one snapshot plus ``max_samples`` events of memory.
"""

from __future__ import annotations

import asyncio
from collections import deque


def sse_event(event: str, data: bytes) -> bytes:
    """One SSE frame; ``data`` is compact JSON (no newlines)."""
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


class StreamClient:
    """One connected stream: what is waiting to be sent to it."""

    __slots__ = ("dropped", "node_id", "nodes_frame", "samples", "wakeup")

    def __init__(self, node_id: str | None, max_samples: int) -> None:
        self.node_id = node_id
        self.samples: deque[bytes] = deque(maxlen=max_samples)
        self.nodes_frame: bytes | None = None
        self.dropped = 0
        self.wakeup = asyncio.Event()

    def take(self) -> bytes:
        """Everything pending as one chunk, oldest first (the snapshot last: it is newest)."""
        parts = list(self.samples)
        self.samples.clear()
        if self.nodes_frame is not None:
            parts.append(self.nodes_frame)
            self.nodes_frame = None
        self.wakeup.clear()
        return b"".join(parts)


class StreamHub:
    """The set of connected stream clients and what they subscribed to."""

    def __init__(self, max_samples: int = 1000) -> None:
        self._max_samples = max_samples
        self._clients: set[StreamClient] = set()
        self._by_node: dict[str, set[StreamClient]] = {}
        self.closed = False
        #: Events dropped for slow clients, over all clients ever connected.
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._clients)

    def watched(self, node_id: str) -> bool:
        """Whether any client wants ``node_id``'s samples (checked on the ingest path)."""
        return node_id in self._by_node

    def subscribe(self, node_id: str | None) -> StreamClient:
        """Register a client; ``node_id`` also subscribes it to that node's samples."""
        client = StreamClient(node_id, self._max_samples)
        self._clients.add(client)
        if node_id is not None:
            self._by_node.setdefault(node_id, set()).add(client)
        return client

    def unsubscribe(self, client: StreamClient) -> None:
        """Forget a client (idempotent)."""
        self._clients.discard(client)
        if client.node_id is not None:
            subs = self._by_node.get(client.node_id)
            if subs is not None:
                subs.discard(client)
                if not subs:
                    del self._by_node[client.node_id]

    def publish_nodes(self, frame: bytes) -> None:
        """Give every client the newest ``nodes`` snapshot (replacing an unsent one)."""
        for client in self._clients:
            if client.nodes_frame is not None:
                client.dropped += 1
                self.dropped += 1
            client.nodes_frame = frame
            client.wakeup.set()

    def publish_sample(self, node_id: str, frame: bytes) -> None:
        """Queue a ``sample`` frame for the clients watching ``node_id``."""
        for client in self._by_node.get(node_id, ()):
            if len(client.samples) == client.samples.maxlen:
                client.dropped += 1
                self.dropped += 1
            client.samples.append(frame)
            client.wakeup.set()

    def close(self) -> None:
        """End every stream: clients wake up, see ``closed`` and finish their response."""
        self.closed = True
        for client in self._clients:
            client.wakeup.set()
