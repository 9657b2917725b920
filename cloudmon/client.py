"""A small synchronous client of the collector's HTTP API.

Used by the console's worker threads and by the CLI and tests; never call it
from the GUI thread.  One ``ApiClient`` keeps one keep-alive connection and is
not thread-safe: give each worker thread its own.

The API (served by :mod:`cloudmon.collector`, documented at
``GET /api/v1/openapi.json``)::

    POST /api/v1/ingest                 agent reports (one object or a JSON array)
    GET  /api/v1/nodes                  every node with status and headline values
    GET  /api/v1/nodes/{node_id}        one node: all latest values and metric names
    GET  /api/v1/series?node=&metric=&start=&end=&step=   avg/min/max per step
    GET  /api/v1/stream[?node=ID]       Server-Sent Events: "nodes" every second,
                                        "sample" for each report of node ID
    GET  /api/v1/status                 collector health and counters
    GET  /api/v1/groups                 auto-scaling groups with instances and metric
    GET  /api/v1/groups/{name}/activity?limit=N   the group's decisions, newest first
    PUT  /api/v1/groups/{name}          create or replace a group (body: its spec)
    DELETE /api/v1/groups/{name}[?force=true]     delete a group
    GET  /api/v1/balance                rebalancing settings, imbalance, plan, execution
    PUT  /api/v1/balance/settings       save rebalancing settings
    POST /api/v1/balance/plan           compute a plan (body: settings)
    POST /api/v1/balance/plan/{id}/approve|reject
    GET  /healthz                       readiness (no token)

Every ``/api/v1`` call needs ``Authorization: Bearer TOKEN``.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import msgspec

from cloudmon.model.cluster import NodeSummary
from cloudmon.store.base import SeriesResult


class ApiError(Exception):
    """The collector answered with an error status; ``status`` is the HTTP code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class CollectorUnreachable(ApiError):
    """No answer from the collector (refused, reset, timed out)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(0, f"cannot reach the collector at {url}: {reason}")


class NodesResponse(msgspec.Struct, frozen=True):
    now: float
    node_timeout: float
    nodes: list[NodeSummary]


class NodeDetail(msgspec.Struct, frozen=True):
    node: NodeSummary
    latest: dict[str, float]
    metrics: list[str]


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One Server-Sent Event: ``event`` is its type, ``data`` the decoded JSON."""

    event: str
    data: Any


class ApiClient:
    """Blocking client for one collector.  ``close()`` drops the connection."""

    def __init__(self, url: str, token: str | None, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"collector URL must look like http://HOST:PORT, got {url!r}")
        self.url = url.rstrip("/")
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._token = token
        self._timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connect(self, timeout: float | None) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=timeout)

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        """Send one request on the kept-alive connection; retry once if it went stale."""
        headers = self._headers()
        if body is not None:
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = self._connect(self._timeout)
            try:
                self._conn.request(method, path, body=body, headers=headers)
                resp = self._conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                stale = isinstance(
                    exc, (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)
                )
                if attempt == 1 and stale:
                    continue
                raise CollectorUnreachable(self.url, str(exc) or type(exc).__name__) from None
            if resp.status >= 400:
                raise ApiError(resp.status, _error_text(data))
            return data
        raise AssertionError("unreachable")  # pragma: no cover

    def get(self, path: str, **params: Any) -> bytes:
        query = urlencode([(k, v) for k, vs in params.items() if vs is not None for v in _listify(vs)])
        return self.request("GET", f"{path}?{query}" if query else path)

    def nodes(self) -> NodesResponse:
        return msgspec.json.decode(self.get("/api/v1/nodes"), type=NodesResponse)

    def node(self, node_id: str) -> NodeDetail:
        return msgspec.json.decode(self.get(f"/api/v1/nodes/{node_id}"), type=NodeDetail)

    def series(
        self,
        node_id: str,
        metrics: Sequence[str],
        start: float | None = None,
        end: float | None = None,
        step: float | None = None,
    ) -> SeriesResult:
        raw = self.get("/api/v1/series", node=node_id, metric=list(metrics), start=start, end=end, step=step)
        # msgspec decodes straight into the store's dataclasses: one shape for both.
        return msgspec.json.decode(raw, type=SeriesResult)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = msgspec.json.decode(self.get("/api/v1/status"))
        return result

    # --- auto-scaling groups and rebalancing -------------------------------------
    # These return the collector's JSON documents as plain dicts: the console
    # reads them defensively, so a field added on the server never breaks it.

    def _json(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        raw = self.request(method, path, None if body is None else msgspec.json.encode(body))
        doc = msgspec.json.decode(raw) if raw else {}
        if not isinstance(doc, dict):
            # ValueError, not TypeError: the workers report it as an unexpected answer.
            raise ValueError(  # noqa: TRY004
                f"{method} {path}: expected a JSON object, got {type(doc).__name__}"
            )
        return doc

    def groups(self) -> dict[str, Any]:
        """``GET /groups``: ``{"groups": [group, ...]}``."""
        return self._json("GET", "/api/v1/groups")

    def group_activity(self, name: str, limit: int = 100) -> dict[str, Any]:
        """``GET /groups/{name}/activity``: ``{"events": [...]}``, newest first."""
        return self._json("GET", f"/api/v1/groups/{_seg(name)}/activity?{urlencode({'limit': limit})}")

    def put_group(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        """``PUT /groups/{name}`` with the group's spec: ``{"group": group}``."""
        return self._json("PUT", f"/api/v1/groups/{_seg(name)}", spec)

    def delete_group(self, name: str, force: bool = False) -> dict[str, Any]:
        """``DELETE /groups/{name}``; ``force`` deletes even with running instances."""
        suffix = "?force=true" if force else ""
        return self._json("DELETE", f"/api/v1/groups/{_seg(name)}{suffix}")

    def balance(self) -> dict[str, Any]:
        """``GET /balance``: settings, imbalance history, hosts, plan and execution."""
        return self._json("GET", "/api/v1/balance")

    def put_balance_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        """``PUT /balance/settings``: ``{"settings": settings}`` as saved."""
        return self._json("PUT", "/api/v1/balance/settings", settings)

    def compute_plan(self, settings: dict[str, Any]) -> dict[str, Any]:
        """``POST /balance/plan`` with settings: ``{"plan": plan}``."""
        return self._json("POST", "/api/v1/balance/plan", settings)

    def approve_plan(self, plan_id: str) -> dict[str, Any]:
        """``POST /balance/plan/{id}/approve``: ``{"plan": plan}``."""
        return self._json("POST", f"/api/v1/balance/plan/{_seg(plan_id)}/approve", {})

    def reject_plan(self, plan_id: str) -> dict[str, Any]:
        """``POST /balance/plan/{id}/reject``: ``{"plan": plan}``."""
        return self._json("POST", f"/api/v1/balance/plan/{_seg(plan_id)}/reject", {})

    def stream(self, node_id: str | None = None, timeout: float = 10.0) -> Iterator[StreamEvent]:
        """Yield live events until the connection ends (own connection; close by breaking)."""
        conn = self._connect(timeout)
        path = "/api/v1/stream" + (f"?{urlencode({'node': node_id})}" if node_id else "")
        headers = self._headers()
        headers["Accept"] = "text/event-stream"
        try:
            try:
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                raise CollectorUnreachable(self.url, str(exc) or type(exc).__name__) from None
            if resp.status >= 400:
                raise ApiError(resp.status, _error_text(resp.read()))
            event = "message"
            data_lines: list[str] = []
            while True:
                try:
                    line = resp.readline()
                except (OSError, http.client.HTTPException) as exc:
                    raise CollectorUnreachable(self.url, str(exc) or type(exc).__name__) from None
                if not line:
                    return
                text = line.decode("utf-8").rstrip("\r\n")
                if not text:
                    if data_lines:
                        yield StreamEvent(event, msgspec.json.decode("\n".join(data_lines)))
                    event, data_lines = "message", []
                elif text.startswith(":"):
                    continue
                elif text.startswith("event:"):
                    event = text[6:].strip()
                elif text.startswith("data:"):
                    data_lines.append(text[5:].lstrip())
        finally:
            conn.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _seg(value: str) -> str:
    """One URL path segment: a group named ``a/b`` must not become two segments."""
    return quote(str(value), safe="")


def _listify(v: Any) -> list[Any]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _error_text(data: bytes) -> str:
    try:
        doc = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return data.decode("utf-8", "replace")[:500]
    if isinstance(doc, dict) and "error" in doc:
        return str(doc["error"])
    return str(doc)[:500]
