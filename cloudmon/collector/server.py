"""The collector: an aiohttp server that validates agent reports, keeps the live
cluster model, feeds the store writer and serves the read API and live streams.

Threads: the asyncio loop (HTTP, model, streams; nothing blocking runs on it),
one store-writer thread (:mod:`cloudmon.collector.writer`) and a small pool of
reader threads for store queries.  :class:`CollectorThread` runs the whole thing
on its own loop in a background thread for embedding (desktop app, tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Final

import msgspec
from aiohttp import web

import cloudmon
from cloudmon.client import NodeDetail, NodesResponse
from cloudmon.collector.api import (
    API_PREFIX,
    DEFAULT_STEPS,
    MAX_BATCH,
    MAX_SERIES_METRICS,
    MAX_SERIES_POINTS,
    ROUTES,
    TARGET_SERIES_POINTS,
    ErrorResponse,
    HealthResponse,
    SampleEvent,
    StatusResponse,
    openapi_document,
)
from cloudmon.collector.commands import CommandError, CommandQueue, SubmitCommand
from cloudmon.collector.stream import StreamHub, sse_event
from cloudmon.collector.writer import StoreWriter
from cloudmon.config import Config, ConfigError
from cloudmon.model.cluster import RETIRED_DOC, SUMMARY_METRICS, ClusterModel, NodeState, NodeStatus
from cloudmon.store import redact_url
from cloudmon.store.base import NodeRecord, Sample, StoreError, StoreUnavailable, TelemetryStore
from cloudmon_agent.schema import Command, IngestResponse, Report, SchemaError, decode_report, flatten

if TYPE_CHECKING:
    # The shared queue needs redis-py, an optional extra: imported only when configured.
    from cloudmon.collector.queue import SharedQueue
    from cloudmon.control.plane import ControlPlane
    from cloudmon.providers.base import Provider

log = logging.getLogger(__name__)

INGEST_PATH: Final = f"{API_PREFIX}/ingest"
#: Seconds between ``nodes`` stream events and between keep-alive comments on a stream.
NODES_EVENT_INTERVAL: Final = 1.0
STREAM_HEARTBEAT: Final = 15.0
#: ``sample`` events a slow stream client may have waiting before the oldest is dropped.
STREAM_MAX_SAMPLES: Final = 1000
#: Reports stamped later than this (year 10000) are refused: the schema only asks
#: ``ts > 0`` and a store cannot keep such a time.
MAX_TS: Final = 253_402_300_800.0
#: Seconds an agent is told to wait when the write queue is full.
RETRY_AFTER_S: Final = 2
_JSON: Final = "application/json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class CollectorError(Exception):
    """The collector could not start (e.g. the port is in use); the text says how to fix it."""


class ListenError(CollectorError, OSError):
    """The collector could not bind its address (an ``OSError`` too; ``errno`` is kept)."""


class _Rejected(Exception):
    """An ingest request that is refused whole: ``reason`` is the status counter key."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _schema_reason(message: str) -> str:
    # decode_report's messages start with a fixed phrase per kind of failure.
    if message.startswith("malformed JSON"):
        return "malformed"
    if message.startswith("unsupported schema version"):
        return "unsupported_version"
    return "invalid"


def _default_step(span: float) -> float:
    for step in DEFAULT_STEPS:
        if span / step <= TARGET_SERIES_POINTS:
            return float(step)
    return float(math.ceil(span / TARGET_SERIES_POINTS))


def _check(report: Report) -> Report:
    """What the collector needs beyond the wire schema."""
    if report.ts >= MAX_TS:
        raise SchemaError(f"invalid report: ts {report.ts} is after the year 9999 - at `$.ts`")
    return report


def _node_info(report: Report) -> dict[str, object]:
    n = report.node
    info: dict[str, object] = {"os": n.os, "cpu_count": n.cpu_count, "agent_version": n.agent_version}
    if n.migrate_uri:
        info["migrate_uri"] = n.migrate_uri
    stopped = {vm.name: vm.state for vm in report.vms if vm.state not in ("running", "blocked")}
    if stopped:
        # Flattened values carry no VM state: the planner needs it to leave out stopped
        # VMs and a live migration's paused copy (cloudmon.rebalance.live).
        info["vms_not_running"] = stopped
    # Flattened values carry no GPU model or owner either: the console's GPU table shows them.
    names = {str(g.index): g.name for g in report.gpus if g.name}
    if names:
        info["gpu_names"] = names
    owners = {str(g.index): g.vm for g in report.gpus if g.vm}
    if owners:
        info["gpu_vms"] = owners
    return info


_encoder: Final = msgspec.json.Encoder()
_raw_list_decoder: Final = msgspec.json.Decoder(list[msgspec.Raw])
_ACCEPTED_ONE: Final = _encoder.encode(IngestResponse(accepted=1))


def _json(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type=_JSON)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    resp = web.Response(
        body=_encoder.encode(ErrorResponse(message)), status=status, content_type=_JSON, headers=headers
    )
    return resp


class Collector:
    """The collector service on the running asyncio loop.

    ``await start()`` binds (``listen_port`` 0 picks a free port; see ``.url`` and
    ``.port``) and ``await close()`` stops the server, ends streams, flushes the
    writer and joins its threads.  The store is the caller's: it is not closed here.
    ``commands`` (default: a new one) holds the commands for agents; they ride
    back on ingest answers (``.commands``).
    """

    def __init__(
        self,
        config: Config,
        store: TelemetryStore,
        token: str,
        clock: Callable[[], float] = time.time,
        commands: CommandQueue | None = None,
        providers: Mapping[str, Provider] | None = None,
    ) -> None:
        if not token:
            where = "" if config.is_loopback else f" (it listens on non-loopback {config.listen_host})"
            raise ConfigError(
                f"the collector needs a bearer token{where}: set token in the config file or the "
                "CLOUDMON_TOKEN environment variable (or pass --token)"
            )
        self._config = config
        self._store = store
        self._token = token.encode("utf-8")
        self._clock = clock
        self.model = ClusterModel(config.node_timeout)
        self.commands = commands if commands is not None else CommandQueue(clock)
        #: The control loops (auto-scaling, load balancers, rebalancing), from ``start()``
        #: when ``config.control``; ``providers`` are pre-built instance providers by name
        #: (``cloudmon demo`` hands in its simulated one).
        self.control: ControlPlane | None = None
        self._providers = dict(providers or {})
        self._control_pool: ThreadPoolExecutor | None = None
        self._writer = StoreWriter(store, config.write_queue_max, clock)
        self._hub = StreamHub(STREAM_MAX_SAMPLES)
        # Off by default: only with a queue URL do reports go through Redis (see queue.py).
        self._queue: SharedQueue | None = None
        if config.queue:
            from cloudmon.collector.queue import SharedQueue

            self._queue = SharedQueue(
                config.queue,
                store,
                self.model,
                self._hub,
                claim_timeout=config.queue_claim_timeout,
                max_pending=config.write_queue_max,
                max_entries=config.queue_max_entries,
                clock=clock,
            )
        self._readers: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._openapi = _encoder.encode(openapi_document())
        self._max_body = config.max_body_bytes
        self._started_wall = 0.0
        self._started_mono = 0.0
        self._port = 0
        self._closed = False
        self._accepted = 0
        self._rejected: dict[str, int] = {}

    # -- lifecycle ---------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound TCP port (after ``start()``)."""
        return self._port

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` of the API (after ``start()``)."""
        host = self._bind_host()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self._port}"

    @property
    def app(self) -> web.Application:
        """The aiohttp application (after ``start()``), e.g. to list its routes."""
        if self._runner is None:
            raise RuntimeError("the collector has not been started")
        return self._runner.app

    def _bind_host(self) -> str:
        # "localhost" may resolve to both ::1 and 127.0.0.1, and with port 0 each
        # would get a different port: bind the one address clients will use.
        host = self._config.listen_host
        return "127.0.0.1" if host == "localhost" else host

    async def start(self) -> None:
        """Restore known nodes from the store, start the writer and listen."""
        if self._runner is not None or self._closed:
            raise RuntimeError("Collector.start() may be called once")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cloudmon-reader")
        await self._restore_nodes(loop)
        self._writer.start()
        if self._queue is not None:
            await self._queue.start()
        app = web.Application(middlewares=[self._middleware], client_max_size=self._max_body)
        for route in ROUTES:
            app.router.add_route(route.method, route.path, getattr(self, route.handler))
        # No access log: it would cost a line per agent report on the hot path.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        host, port = self._bind_host(), self._config.listen_port
        site = web.TCPSite(self._runner, host, port, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            await self.close()
            reason = exc.strerror or str(exc)
            error = ListenError(
                f"cannot listen on {host}:{port}: {reason}; choose another port (--listen HOST:PORT "
                "or listen_port) or stop the process that uses it"
            )
            error.errno = exc.errno
            raise error from None
        self._port = int(self._runner.addresses[0][1])
        self._started_wall = time.time()
        self._started_mono = time.monotonic()
        self._ticker = asyncio.create_task(self._tick_nodes(), name="cloudmon-stream-ticker")
        if self._config.control:
            from cloudmon.control.plane import ControlPlane

            self._control_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cloudmon-control-api")
            self.control = ControlPlane(
                self._store,
                self.model,
                self.commands,
                clock=self._clock,
                tick_s=self._config.control_tick_s,
                balance_every_s=self._config.balance_every_s,
                plan_every_s=self._config.plan_every_s,
                providers=self._providers,
                forget_node=self._forget_soon,
                command_allow=tuple(self._config.command_allow),
            )
            self.control.start()
        log.info("collector listening on %s (store %s)", self.url, redact_url(self._config.store_url))

    def _forget_soon(self, node_id: str) -> None:
        """Drop a node from the live model, on the event loop (the model's only writer)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.model.forget, node_id)

    async def _restore_nodes(self, loop: asyncio.AbstractEventLoop) -> None:
        # A restarted collector lists every node it ever saw; each one's status
        # follows its last report before the restart (soon unreachable if silent).
        def known() -> list[NodeRecord]:
            # Terminated instances (cloudmon.control.plane) stay in the history, not the list.
            retired = self._store.list_documents(RETIRED_DOC)
            return [r for r in self._store.nodes() if r.node_id not in retired]

        try:
            records = await loop.run_in_executor(self._readers, known)
        except StoreError as exc:
            log.warning("cannot read the node inventory from the store: %s", exc)
            self._writer.note_error(exc)
            return
        for rec in records:
            self.model.restore(
                NodeState(
                    node_id=rec.node_id,
                    hostname=rec.hostname,
                    first_seen=rec.first_seen,
                    last_seen=rec.last_seen,
                    last_ts=rec.last_seen,
                    interval=1.0,
                    info=dict(rec.info),
                )
            )
        if records:
            log.info("restored %d known nodes from the store", len(records))

    async def close(self, flush_timeout: float = 10.0) -> None:
        """Stop listening, end streams, write what is queued and join all threads.  Idempotent.

        An unavailable store is retried for up to ``flush_timeout`` seconds; what is
        still queued then is counted as dropped and logged.
        """
        if self._closed:
            return
        self._closed = True
        self._hub.close()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self._runner is not None:
            await self._runner.cleanup()
        if self._queue is not None:
            await self._queue.close()
        loop = asyncio.get_running_loop()
        if self._control_pool is not None:
            self._control_pool.shutdown(wait=False, cancel_futures=True)
            await loop.run_in_executor(None, self._control_pool.shutdown, True)
        if self.control is not None:
            # Joins its loop and any plan execution (stopped after the move in flight).
            await loop.run_in_executor(None, self.control.close)
        if self._readers is not None:
            # The writer's final flush blocks: keep it off the loop.
            await loop.run_in_executor(self._readers, self._writer.close, flush_timeout)
            self._readers.shutdown(wait=True)
        else:
            self._writer.close(flush_timeout)
        log.info("collector stopped")

    # -- middleware: auth and JSON errors -------------------------------------------

    def _auth_error(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization")
        if not header:
            return "missing bearer token: send the header 'Authorization: Bearer TOKEN'"
        scheme, _, credential = header.partition(" ")
        # surrogatepass: any header text encodes, so odd input is just a wrong token.
        given = credential.strip().encode("utf-8", "surrogatepass")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self._token):
            return "wrong bearer token"
        return None

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(API_PREFIX):
            problem = self._auth_error(request)
            if problem is not None:
                if request.path == INGEST_PATH:
                    self._count_rejected("unauthorized")
                return _error(401, problem, {"WWW-Authenticate": 'Bearer realm="cloudmon"'})
        try:
            return await handler(request)
        except web.HTTPException as exc:
            return self._http_exception(request, exc)
        except _Rejected as exc:  # a bad parameter or body outside the ingest path
            return _error(400, exc.message)
        except Exception:
            log.exception("unexpected error serving %s %s", request.method, request.path)
            return _error(500, "internal error in the collector (see its log)")

    @staticmethod
    def _http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
        headers: dict[str, str] = {}
        if exc.status == 405:
            allowed = exc.headers.get("Allow", "")
            headers["Allow"] = allowed
            message = f"method {request.method} is not allowed on {request.path}; use {allowed}"
        elif exc.status == 404:
            message = f"no such endpoint: {request.path} (see {API_PREFIX}/openapi.json)"
        else:
            message = exc.text or exc.reason
        return _error(exc.status, message, headers or None)

    # -- ingest ----------------------------------------------------------------------

    def _count_rejected(self, reason: str) -> None:
        self._rejected[reason] = self._rejected.get(reason, 0) + 1

    def _reject(
        self, status: int, reason: str, message: str, headers: dict[str, str] | None = None
    ) -> web.Response:
        self._count_rejected(reason)
        return _error(status, message, headers)

    def _too_large(self, size: str) -> web.Response:
        resp = self._reject(
            413,
            "too_large",
            f"request body {size} exceeds max_body_bytes={self._max_body}; send fewer reports per request",
        )
        # The unread rest of the body would otherwise have to be drained.
        resp.force_close()
        return resp

    @staticmethod
    def _decode(body: bytes) -> list[Report]:
        head = body[:1]
        if head.isspace():
            head = body.lstrip()[:1]
        if head != b"[":
            try:
                return [_check(decode_report(body))]
            except SchemaError as exc:
                raise _Rejected(_schema_reason(str(exc)), str(exc)) from None
        try:
            raws = _raw_list_decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise _Rejected("malformed", f"malformed JSON: {exc}") from None
        if not 1 <= len(raws) <= MAX_BATCH:
            raise _Rejected("batch_size", f"a batch must hold 1 to {MAX_BATCH} reports, got {len(raws)}")
        reports: list[Report] = []
        for i, raw in enumerate(raws):
            try:
                reports.append(_check(decode_report(raw)))
            except SchemaError as exc:
                raise _Rejected(_schema_reason(str(exc)), f"report [{i}]: {exc}") from None
        return reports

    async def _enqueue(
        self, reports: list[Report], samples: list[Sample], records: list[NodeRecord], new_node: bool
    ) -> web.Response | None:
        """Shared-queue mode: samples go to Redis (stored by whichever collector reads
        them), inventory to the local writer; an error answer when Redis refused."""
        assert self._queue is not None
        from cloudmon.collector.queue import live_report

        live = [
            live_report(r.node_id, r.node.hostname, r.ts, r.interval, dict(s.values), _node_info(r))
            for r, s in zip(reports, samples, strict=True)
        ]
        if not await self._queue.append(samples, live):
            return self._reject(
                503,
                "queue_unavailable",
                "the shared queue cannot take reports now; nothing was accepted, retry later",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        self._writer.offer((), records, new_node)
        return None

    async def handle_ingest(self, request: web.Request) -> web.Response:
        """``POST /api/v1/ingest``: validate whole, queue for the store, update model and streams."""
        if request.content_type != _JSON:
            return self._reject(
                415,
                "unsupported_media_type",
                f"Content-Type must be application/json, got {request.content_type}",
            )
        length = request.content_length
        if length is not None and length > self._max_body:
            return self._too_large(f"of {length} bytes")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._too_large("(chunked)")
        try:
            reports = self._decode(body)
        except _Rejected as exc:
            return self._reject(400, exc.reason, exc.message)

        now = self._clock()
        model = self.model
        samples: list[Sample] = []
        records: list[NodeRecord] = []
        infos: list[dict[str, object]] = []
        new_node = False
        for r in reports:
            samples.append(Sample(r.node_id, r.ts, flatten(r)))
            info = _node_info(r)
            infos.append(info)
            known = model.get(r.node_id)
            if known is None:
                new_node = True
            first_seen = now if known is None else known.first_seen
            records.append(NodeRecord(r.node_id, r.node.hostname, first_seen, now, info))
        if self._queue is not None:
            refused = await self._enqueue(reports, samples, records, new_node)
            if refused is not None:
                return refused
        elif not self._writer.offer(samples, records, new_node):
            return self._reject(
                503,
                "queue_full",
                "the collector's write queue is full; nothing was accepted, retry later",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        hub = self._hub
        for r, sample, info in zip(reports, samples, infos, strict=True):
            known = model.get(r.node_id)
            # Only samples newer than any seen from the node are live: an agent's
            # retry (lost answer) or spool replay is stored once by the store, and
            # must not reach live charts a second time or out of order either.
            live = known is None or r.ts > known.last_ts
            model.update(r.node_id, r.node.hostname, r.ts, r.interval, sample.values, info, now)
            if live and hub.watched(r.node_id):
                event = SampleEvent(r.node_id, r.ts, dict(sample.values))
                hub.publish_sample(r.node_id, sse_event("sample", _encoder.encode(event)))
        n = len(reports)
        self._accepted += n
        commands, acked = self._commands_for(reports)
        if commands or acked:
            return _json(
                _encoder.encode(IngestResponse(accepted=n, commands=commands, acked=acked or msgspec.UNSET))
            )
        return _json(_ACCEPTED_ONE if n == 1 else _encoder.encode(IngestResponse(accepted=n)))

    # -- commands: ride back on ingest answers (cloudmon.collector.commands) ------------

    def _commands_for(self, reports: list[Report]) -> tuple[list[Command], list[str]]:
        """Record the reports' command progress and results; the commands for their nodes."""
        queue = self.commands
        acked: list[str] = []
        nodes: dict[str, None] = {}
        for r in reports:
            nodes[r.node_id] = None
            if r.progress or r.results:
                acked += queue.report(r.node_id, r.progress, r.results)
        commands = [c for node_id in nodes for c in queue.take(node_id)]
        return commands, list(dict.fromkeys(acked))

    async def handle_submit_command(self, request: web.Request) -> web.Response:
        """``POST /api/v1/nodes/{node_id}/commands``: queue a command for the node's agent."""
        node_id = request.match_info["node_id"]
        if self.model.get(node_id) is None:
            return _error(404, f"unknown node {node_id!r}: commands go to nodes whose agent reports here")
        try:
            body = msgspec.json.decode(await request.read(), type=SubmitCommand)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return _error(400, f"invalid command: {exc}")
        try:
            handle = self.commands.submit(node_id, body.action, body.params, body.timeout_s)
        except CommandError as exc:
            return _error(400, str(exc))
        return _json(_encoder.encode(handle.view()), status=202)

    async def handle_command(self, request: web.Request) -> web.Response:
        """``GET /api/v1/commands/{command_id}``: a command's state, progress and result."""
        command_id = request.match_info["command_id"]
        handle = self.commands.get(command_id)
        if handle is None:
            return _error(404, f"unknown command {command_id!r} (finished ones are kept for an hour)")
        return _json(_encoder.encode(handle.view()))

    # -- control loops (cloudmon.control.plane) ------------------------------------------

    async def _control_call(self, fn: Callable[[ControlPlane], Any]) -> web.Response:
        """Run ``fn`` on the control plane in its worker pool; typed errors become 4xx/5xx."""
        from cloudmon.control.plane import ControlError, NotFound

        plane, pool = self.control, self._control_pool
        if plane is None or pool is None:
            return _error(
                404, "this collector runs without control loops (control = false); ask the one that runs them"
            )
        try:
            result = await asyncio.get_running_loop().run_in_executor(pool, fn, plane)
        except NotFound as exc:
            return _error(404, str(exc))
        except ControlError as exc:
            return _error(400, str(exc))
        except StoreError as exc:
            return _error(503, f"store unavailable: {exc}")
        return _json(_encoder.encode(result))

    @staticmethod
    async def _json_body(request: web.Request) -> Any:
        raw = await request.read()
        if not raw:
            return {}
        try:
            return msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise _Rejected("json", f"the body is not valid JSON: {exc}") from None

    async def handle_groups(self, request: web.Request) -> web.Response:
        """``GET /api/v1/groups``."""
        return await self._control_call(lambda c: {"groups": c.groups_view()})

    async def handle_put_group(self, request: web.Request) -> web.Response:
        """``PUT /api/v1/groups/{name}``."""
        name = request.match_info["name"]
        body = await self._json_body(request)
        return await self._control_call(lambda c: {"group": c.put_group(name, body)})

    async def handle_delete_group(self, request: web.Request) -> web.Response:
        """``DELETE /api/v1/groups/{name}``."""
        name = request.match_info["name"]
        force = request.query.get("force", "").lower() in ("1", "true", "yes")
        return await self._control_call(lambda c: {"deleted": c.delete_group(name, force=force)})

    async def handle_group_activity(self, request: web.Request) -> web.Response:
        """``GET /api/v1/groups/{name}/activity``."""
        name = request.match_info["name"]
        limit = int(self._number(request.query, "limit", 100.0))
        if not 1 <= limit <= 1000:
            return _error(400, "query parameter 'limit' must be 1..1000")
        return await self._control_call(lambda c: {"events": c.group_activity(name, limit)})

    async def handle_service_groups(self, request: web.Request) -> web.Response:
        """``GET /api/v1/service-groups``."""
        return await self._control_call(lambda c: {"service_groups": c.service_groups_view()})

    async def handle_put_service_group(self, request: web.Request) -> web.Response:
        """``PUT /api/v1/service-groups/{name}``."""
        name = request.match_info["name"]
        body = await self._json_body(request)
        return await self._control_call(lambda c: {"service_group": c.put_service_group(name, body)})

    async def handle_balance(self, request: web.Request) -> web.Response:
        """``GET /api/v1/balance``."""
        return await self._control_call(lambda c: c.balance_view())

    async def handle_snapshot(self, request: web.Request) -> web.Response:
        """``GET /api/v1/balance/snapshot``."""
        return await self._control_call(lambda c: c.snapshot())

    async def handle_balance_settings(self, request: web.Request) -> web.Response:
        """``PUT /api/v1/balance/settings``."""
        body = await self._json_body(request)
        return await self._control_call(lambda c: {"settings": msgspec.to_builtins(c.put_settings(body))})

    async def handle_compute_plan(self, request: web.Request) -> web.Response:
        """``POST /api/v1/balance/plan``."""
        body = await self._json_body(request)
        return await self._control_call(lambda c: {"plan": c.compute_plan(body)})

    async def handle_approve_plan(self, request: web.Request) -> web.Response:
        """``POST /api/v1/balance/plan/{plan_id}/approve``."""
        plan_id = request.match_info["plan_id"]
        return await self._control_call(lambda c: {"plan": c.approve(plan_id)})

    async def handle_reject_plan(self, request: web.Request) -> web.Response:
        """``POST /api/v1/balance/plan/{plan_id}/reject``."""
        plan_id = request.match_info["plan_id"]
        return await self._control_call(lambda c: {"plan": c.reject(plan_id)})

    async def handle_rules(self, request: web.Request) -> web.Response:
        """``GET /api/v1/rules``."""
        return await self._control_call(lambda c: {"rules": c.rules_view()})

    async def handle_put_rule(self, request: web.Request) -> web.Response:
        """``PUT /api/v1/rules/{name}``."""
        name = request.match_info["name"]
        body = await self._json_body(request)
        return await self._control_call(lambda c: {"rule": c.put_rule(name, body)})

    async def handle_delete_rule(self, request: web.Request) -> web.Response:
        """``DELETE /api/v1/rules/{name}``."""
        name = request.match_info["name"]
        return await self._control_call(lambda c: {"deleted": c.delete_rule(name)})

    async def handle_maintenance(self, request: web.Request) -> web.Response:
        """``PUT /api/v1/hosts/{node_id}/maintenance``."""
        node_id = request.match_info["node_id"]
        body = await self._json_body(request)
        return await self._control_call(lambda c: c.set_maintenance(node_id, body))

    async def handle_events(self, request: web.Request) -> web.Response:
        """``GET /api/v1/events``."""
        q = request.query
        end = self._number(q, "end", self._clock())
        start = self._number(q, "start", end - 3600.0)
        limit = int(self._number(q, "limit", 1000.0))
        kind = q.get("kind", "")
        if not 1 <= limit <= 10_000:
            return _error(400, "query parameter 'limit' must be 1..10000")
        if start >= end:
            return _error(400, "query parameter 'start' must be before 'end'")
        store = self._store

        def read() -> bytes:
            events = store.events(start, end, limit=limit if not kind else 10_000)
            if kind:
                events = [e for e in events if str(e.get("kind", "")).startswith(kind)][-limit:]
            return _encoder.encode({"events": events})

        try:
            body: bytes = await self._in_reader(read)
        except StoreError as exc:
            return _error(503, f"store unavailable: {exc}")
        return _json(body)

    # -- read API --------------------------------------------------------------------------

    async def handle_healthz(self, request: web.Request) -> web.Response:
        """``GET /healthz`` (no token)."""
        return _json(_encoder.encode(HealthResponse("ok", cloudmon.__version__)))

    def _nodes_body(self) -> bytes:
        now = self._clock()
        resp = NodesResponse(now=now, node_timeout=self.model.node_timeout, nodes=self.model.summaries(now))
        return _encoder.encode(resp)

    async def handle_nodes(self, request: web.Request) -> web.Response:
        """``GET /api/v1/nodes``."""
        return _json(self._nodes_body())

    async def _in_reader(self, fn: Callable[[], Any]) -> Any:
        assert self._readers is not None, "started"
        return await asyncio.get_running_loop().run_in_executor(self._readers, fn)

    async def handle_node(self, request: web.Request) -> web.Response:
        """``GET /api/v1/nodes/{node_id}``: latest values from the model, else from the store."""
        node_id = request.match_info["node_id"]
        node = self.model.get(node_id)
        if node is None:
            return _error(404, f"unknown node {node_id!r}")
        now = self._clock()
        summary = self.model.summary(node, now)
        latest = dict(node.latest)
        store = self._store

        def read() -> tuple[list[str], Sample | None]:
            return store.metric_names(node_id), None if latest else store.latest(node_id)

        try:
            names, stored = await self._in_reader(read)
        except StoreError as exc:
            if not latest:
                return _error(503, f"store unavailable: {exc}")
            names, stored = [], None
        if stored is not None:
            latest = dict(stored.values)
            values = {k: latest[k] for k in SUMMARY_METRICS if k in latest}
            summary = msgspec.structs.replace(summary, values=values)
        detail = NodeDetail(node=summary, latest=latest, metrics=sorted(set(names) | set(latest)))
        return _json(_encoder.encode(detail))

    async def handle_series(self, request: web.Request) -> web.Response:
        """``GET /api/v1/series``: validates parameters, then queries the store off the loop."""
        q = request.query
        node_id = q.get("node")
        if not node_id:
            return _error(400, "missing query parameter 'node' (the node id)")
        metrics = q.getall("metric", [])
        if not metrics or not all(metrics):
            return _error(400, "missing query parameter 'metric' (repeat it for several metrics)")
        if len(metrics) > MAX_SERIES_METRICS:
            return _error(400, f"too many 'metric' parameters: {len(metrics)} (at most {MAX_SERIES_METRICS})")
        try:
            end = self._number(q, "end", self._clock())
            start = self._number(q, "start", end - 3600.0)
            step_raw = self._number(q, "step", None)
        except _Rejected as exc:
            return _error(400, exc.message)
        if start >= end:
            return _error(400, f"'start' ({start}) must be before 'end' ({end})")
        if step_raw is not None and step_raw <= 0:
            return _error(400, f"'step' must be > 0 seconds, got {step_raw}")
        step = _default_step(end - start) if step_raw is None else step_raw
        points = (end - start) / step
        if points > MAX_SERIES_POINTS:
            return _error(
                400,
                f"'step' {step} s gives {points:.0f} points over the range; at most "
                f"{MAX_SERIES_POINTS}: use a larger step or a shorter range",
            )
        if self.model.get(node_id) is None:
            return _error(404, f"unknown node {node_id!r}")
        store = self._store

        def read() -> bytes:
            return _encoder.encode(store.series(node_id, metrics, start, end, step))

        try:
            body: bytes = await self._in_reader(read)
        except StoreUnavailable as exc:
            return _error(503, f"store unavailable: {exc}")
        return _json(body)

    @staticmethod
    def _number(q: Any, name: str, default: float | None) -> Any:
        raw = q.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = float(raw)
        except ValueError:
            raise _Rejected("param", f"query parameter '{name}' must be a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise _Rejected("param", f"query parameter '{name}' must be finite, got {raw!r}")
        return value

    async def handle_status(self, request: web.Request) -> web.Response:
        """``GET /api/v1/status``."""
        now = self._clock()
        timeout = self.model.node_timeout
        nodes = self.model.nodes()
        online = sum(1 for n in nodes if n.status(now, timeout) is NodeStatus.ONLINE)
        w = self._writer.stats()
        if self._queue is not None:
            # Queue mode: the consumer writes the samples; fold its state into the writer's.
            q = self._queue.stats()
            w = dataclasses.replace(
                w,
                queued=w.queued + q.queued,
                written=w.written + q.written,
                store_errors=w.store_errors + q.errors,
                last_store_error=q.last_error or w.last_store_error,
                degraded=w.degraded or q.degraded,
            )
        status = StatusResponse(
            version=cloudmon.__version__,
            started=self._started_wall,
            uptime_s=time.monotonic() - self._started_mono,
            listen=f"{self._bind_host()}:{self._port}",
            loopback=self._config.is_loopback,
            store=redact_url(self._config.store_url),
            nodes=len(nodes),
            online=online,
            reports_accepted=self._accepted,
            reports_rejected=dict(self._rejected),
            write_queue=w.queued,
            write_queue_max=w.queue_max,
            dropped=w.dropped,
            store_errors=w.store_errors,
            last_store_error=w.last_store_error,
            degraded=w.degraded,
            samples_written=w.written,
            stream_clients=len(self._hub),
            stream_dropped=self._hub.dropped,
        )
        return _json(_encoder.encode(status))

    async def handle_openapi(self, request: web.Request) -> web.Response:
        """``GET /api/v1/openapi.json``."""
        return _json(self._openapi)

    # -- live stream -------------------------------------------------------------------------

    def _nodes_frame(self) -> bytes:
        return sse_event("nodes", self._nodes_body())

    async def _tick_nodes(self) -> None:
        while True:
            await asyncio.sleep(NODES_EVENT_INTERVAL)
            if len(self._hub):
                self._hub.publish_nodes(self._nodes_frame())

    async def handle_stream(self, request: web.Request) -> web.StreamResponse:
        """``GET /api/v1/stream[?node=ID]``: Server-Sent Events until the client or collector goes."""
        hub = self._hub
        if hub.closed:
            return _error(503, "the collector is shutting down")
        node_id = request.query.get("node") or None
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                # Tell nginx-like proxies not to buffer the stream.
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(request)
        client = hub.subscribe(node_id)
        try:
            await resp.write(self._nodes_frame())
            while not hub.closed:
                try:
                    async with asyncio.timeout(STREAM_HEARTBEAT):
                        await client.wakeup.wait()
                except TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                # After close() this still sends what was pending; the loop then ends.
                chunk = client.take()
                if chunk:
                    await resp.write(chunk)
        except ConnectionError:
            log.debug("stream client went away")
        finally:
            hub.unsubscribe(client)
        return resp


class CollectorThread:
    """A :class:`Collector` on its own asyncio loop in a background thread.

    ``start()`` returns once listening (or raises the startup error, e.g.
    :class:`CollectorError` for a port in use); ``close()`` stops everything
    and joins the threads (idempotent).  The store stays the caller's.
    """

    def __init__(
        self,
        config: Config,
        store: TelemetryStore,
        token: str,
        clock: Callable[[], float] = time.time,
        commands: CommandQueue | None = None,
        providers: Mapping[str, Provider] | None = None,
    ) -> None:
        self.collector = Collector(config, store, token, clock, commands, providers)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._flush_timeout = 10.0

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` of the API (after ``start()``)."""
        return self.collector.url

    @property
    def port(self) -> int:
        return self.collector.port

    def start(self, timeout: float = 30.0) -> None:
        """Start the loop thread and return once the collector listens."""
        if self._thread is not None:
            raise RuntimeError("CollectorThread.start() may be called once")
        self._thread = threading.Thread(target=self._main, name="cloudmon-collector", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.close()
            raise CollectorError(f"the collector did not start within {timeout:.0f} s")
        if self._error is not None:
            self._thread.join()
            raise self._error

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        try:
            await self.collector.start()
        except Exception as exc:  # noqa: BLE001 - start() re-raises it in the caller's thread
            self._error = exc
            await self.collector.close()
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self.collector.close(self._flush_timeout)

    def close(self, flush_timeout: float = 10.0) -> None:
        """Stop the collector and join its threads.  Idempotent.

        ``flush_timeout`` bounds how long queued samples are retried against an
        unavailable store (see :meth:`Collector.close`).
        """
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        self._flush_timeout = flush_timeout
        timeout = flush_timeout + 20.0
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already finished
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)
        if thread.is_alive():
            log.error("collector thread did not stop within %.0f s", timeout)
