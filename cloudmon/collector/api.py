"""The collector's HTTP API in one table: routes, wire shapes and the OpenAPI document.

:data:`ROUTES` is the single source of truth: the server registers exactly these
routes (by handler name) and :func:`openapi_document` describes exactly these,
so the published document cannot drift from what is served.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

import cloudmon
from cloudmon.client import NodeDetail, NodesResponse
from cloudmon.collector.commands import CommandView, SubmitCommand
from cloudmon.store.base import SeriesResult
from cloudmon_agent.schema import ACTIONS, SUPPORTED_VERSIONS, IngestResponse, Report

API_PREFIX: Final = "/api/v1"
#: Most reports one ingest request may carry (agents replaying their spool batch them).
MAX_BATCH: Final = 1000
#: Most points one series request may ask for (``(end - start) / step``).
MAX_SERIES_POINTS: Final = 100_000
#: Most metrics one series request may name.
MAX_SERIES_METRICS: Final = 256
#: Default steps tried in order; the first that keeps a range at or under
#: :data:`TARGET_SERIES_POINTS` points wins (1 h at 1 s, 2 days at 1 min, ...).
DEFAULT_STEPS: Final[tuple[int, ...]] = (1, 60, 3600, 86400)
TARGET_SERIES_POINTS: Final = 3600


class ErrorResponse(msgspec.Struct, frozen=True):
    """Every error answer: ``{"error": "what went wrong and how to fix it"}``."""

    error: str


class HealthResponse(msgspec.Struct, frozen=True):
    """``GET /healthz``: the collector is listening and serving."""

    status: str
    version: str


class SampleEvent(msgspec.Struct, frozen=True):
    """Data of the ``sample`` stream event: one report of the watched node, flattened."""

    node_id: str
    ts: float
    values: dict[str, float]


class StatusResponse(msgspec.Struct, frozen=True):
    """``GET /api/v1/status``: health and counters of the collector."""

    version: str
    #: When this collector started (epoch seconds).
    started: float
    uptime_s: float
    #: ``host:port`` it listens on.
    listen: str
    loopback: bool
    #: Store URL with any password removed.
    store: str
    nodes: int
    online: int
    #: Reports accepted since start (a batch counts each report).
    reports_accepted: int
    #: Rejected ingest requests by reason (a rejected batch counts once).
    reports_rejected: dict[str, int]
    #: Samples waiting for the store writer (including a batch being retried).
    write_queue: int
    write_queue_max: int
    #: Samples accepted but then lost (the store refused them for good, or shutdown
    #: could not flush them to an unavailable store).
    dropped: int
    store_errors: int
    last_store_error: str | None
    #: True while the store is failing (writes are kept and retried).
    degraded: bool
    samples_written: int
    stream_clients: int
    #: Stream events dropped because a client read too slowly.
    stream_dropped: int


@dataclass(frozen=True, slots=True)
class Param:
    """One query or path parameter of a route."""

    name: str
    where: str  # "query" or "path"
    schema: dict[str, Any]
    description: str
    required: bool = False
    repeatable: bool = False


@dataclass(frozen=True, slots=True)
class Route:
    """One API route: what the server registers and the OpenAPI document describes."""

    method: str
    path: str
    #: Name of the ``Collector`` method that handles it.
    handler: str
    summary: str
    description: str = ""
    auth: bool = True
    params: tuple[Param, ...] = ()
    #: JSON schema of the request body (``None``: no body).
    body: dict[str, Any] | None = None
    #: ``status -> (description, media type, schema)`` for the success answers.
    ok: dict[int, tuple[str, str, dict[str, Any]]] = field(default_factory=dict)
    #: ``status -> description`` of the error answers (all ``ErrorResponse``).
    errors: dict[int, str] = field(default_factory=dict)


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


_JSON: Final = "application/json"
_OBJECT: Final[dict[str, Any]] = {"type": "object"}
_GROUP: Final = Param("name", "path", {"type": "string"}, "Group name", required=True)
_PLAN: Final = Param("plan_id", "path", {"type": "string"}, "Plan id", required=True)
_SUPPORTED = ", ".join(str(v) for v in SUPPORTED_VERSIONS)

ROUTES: Final[tuple[Route, ...]] = (
    Route(
        "GET",
        "/healthz",
        "handle_healthz",
        "Readiness probe",
        "Answers 200 once the collector listens. Needs no token.",
        auth=False,
        ok={200: ("Serving", _JSON, _ref("HealthResponse"))},
    ),
    Route(
        "POST",
        f"{API_PREFIX}/ingest",
        "handle_ingest",
        "Push agent reports",
        "One report object, or a JSON array of 1 to "
        f"{MAX_BATCH} reports (spool replay). A batch is all-or-nothing: if any "
        "element is invalid nothing is stored and the error names the element's index "
        f"and field. Supported schema versions: {_SUPPORTED}.",
        body={
            "oneOf": [
                _ref("Report"),
                {"type": "array", "items": _ref("Report"), "minItems": 1, "maxItems": MAX_BATCH},
            ]
        },
        ok={200: ("Reports accepted", _JSON, _ref("IngestResponse"))},
        errors={
            400: "Malformed JSON, invalid field (named), unsupported schema version or bad batch size",
            413: "Body larger than max_body_bytes",
            415: "Content-Type is not application/json",
            503: "Write queue full, or the shared queue (--queue) unavailable or over queue_max_entries: nothing accepted, retry after Retry-After seconds",
        },
    ),
    Route(
        "GET",
        f"{API_PREFIX}/nodes",
        "handle_nodes",
        "Every node with status and headline values",
        "Nodes are never removed; silent ones are 'unreachable' after node_timeout seconds.",
        ok={200: ("All nodes", _JSON, _ref("NodesResponse"))},
    ),
    Route(
        "GET",
        f"{API_PREFIX}/nodes/{{node_id}}",
        "handle_node",
        "One node: all latest values and metric names",
        params=(Param("node_id", "path", {"type": "string"}, "Node id", required=True),),
        ok={200: ("The node", _JSON, _ref("NodeDetail"))},
        errors={404: "Unknown node", 503: "Store unavailable"},
    ),
    Route(
        "GET",
        f"{API_PREFIX}/series",
        "handle_series",
        "Aggregates (avg/min/max) of metrics of one node per step",
        "Buckets are step seconds wide from start. Without step, the first of "
        f"{', '.join(str(s) for s in DEFAULT_STEPS)} seconds that keeps the range at or under "
        f"{TARGET_SERIES_POINTS} points is used. At most {MAX_SERIES_POINTS} points and "
        f"{MAX_SERIES_METRICS} metrics per request.",
        params=(
            Param("node", "query", {"type": "string"}, "Node id", required=True),
            Param(
                "metric",
                "query",
                {"type": "string"},
                "Metric name (repeat for several)",
                required=True,
                repeatable=True,
            ),
            Param("start", "query", {"type": "number"}, "Range start, epoch seconds (default end - 3600)"),
            Param("end", "query", {"type": "number"}, "Range end, epoch seconds (default now)"),
            Param("step", "query", {"type": "number", "exclusiveMinimum": 0}, "Bucket width in seconds"),
        ),
        ok={200: ("The series", _JSON, _ref("SeriesResult"))},
        errors={
            400: "A parameter is missing or invalid (named)",
            404: "Unknown node",
            503: "Store unavailable",
        },
    ),
    Route(
        "GET",
        f"{API_PREFIX}/stream",
        "handle_stream",
        "Live Server-Sent Events",
        "`event: nodes` (NodesResponse) at once and then every second; with node=ID also "
        "`event: sample` (SampleEvent) for every report of that node. Comment lines keep "
        "idle connections open. A client too slow to read loses the oldest events.",
        params=(Param("node", "query", {"type": "string"}, "Also stream every sample of this node"),),
        ok={200: ("Event stream", "text/event-stream", {"type": "string"})},
    ),
    Route(
        "GET",
        f"{API_PREFIX}/status",
        "handle_status",
        "Collector health and counters",
        ok={200: ("Status", _JSON, _ref("StatusResponse"))},
    ),
    # -- commands for agents (cloudmon.collector.commands) --
    Route(
        "POST",
        f"{API_PREFIX}/nodes/{{node_id}}/commands",
        "handle_submit_command",
        "Queue a command for a node's agent",
        f"Actions: {', '.join(ACTIONS)}; parameters are checked per action. The command rides back "
        "on the answer to the node's next report; the agent runs it only if its allow_actions "
        "lists the action, at most once, and reports progress and the result in later reports. "
        "Poll GET /api/v1/commands/{id}. A command not picked up or finished by timeout_s expires; "
        "nothing is retried.",
        params=(Param("node_id", "path", {"type": "string"}, "Node id", required=True),),
        body=_ref("SubmitCommand"),
        ok={202: ("Queued", _JSON, _ref("CommandView"))},
        errors={
            400: "Unknown action, invalid parameters (named) or too many commands waiting",
            404: "Unknown node",
        },
    ),
    Route(
        "GET",
        f"{API_PREFIX}/commands/{{command_id}}",
        "handle_command",
        "A command's state (queued, sent, done, expired), progress and result",
        params=(Param("command_id", "path", {"type": "string"}, "Command id", required=True),),
        ok={200: ("The command", _JSON, _ref("CommandView"))},
        errors={404: "Unknown command (finished ones are kept for an hour)"},
    ),
    # -- control loops (cloudmon.control.plane): auto-scaling, load balancers, rebalancing --
    Route(
        "GET",
        f"{API_PREFIX}/groups",
        "handle_groups",
        "Auto-scaling groups with their instances and metric",
        ok={200: ("All groups", _JSON, _OBJECT)},
        errors={503: "Store unavailable"},
    ),
    Route(
        "PUT",
        f"{API_PREFIX}/groups/{{name}}",
        "handle_put_group",
        "Create or replace an auto-scaling group",
        "The body is the group spec (the fields of one [[group]] table of 'cloudmon apply'). "
        "Min/max/desired changes take effect at the next reconcile.",
        params=(_GROUP,),
        body=_OBJECT,
        ok={200: ("The group", _JSON, _OBJECT)},
        errors={400: "Invalid spec (the field is named)", 503: "Store unavailable"},
    ),
    Route(
        "DELETE",
        f"{API_PREFIX}/groups/{{name}}",
        "handle_delete_group",
        "Delete an auto-scaling group",
        "Refused while it has instances unless force=true, which terminates them (drained first); "
        "the group disappears when the last one is gone.",
        params=(
            _GROUP,
            Param("force", "query", {"type": "boolean"}, "Terminate its instances"),
        ),
        ok={200: ("deleted: true when gone now, false when terminating", _JSON, _OBJECT)},
        errors={400: "The group still has instances", 404: "Unknown group", 503: "Store unavailable"},
    ),
    Route(
        "GET",
        f"{API_PREFIX}/groups/{{name}}/activity",
        "handle_group_activity",
        "A group's activity history, newest first",
        "Every decision and every decision not to act, with its reason and numbers.",
        params=(
            _GROUP,
            Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000}, "At most (100)"),
        ),
        ok={200: ("Events", _JSON, _OBJECT)},
        errors={404: "Unknown group", 503: "Store unavailable"},
    ),
    Route(
        "GET",
        f"{API_PREFIX}/service-groups",
        "handle_service_groups",
        "Load-balanced service groups with the weights last set",
        ok={200: ("All service groups", _JSON, _OBJECT)},
        errors={503: "Store unavailable"},
    ),
    Route(
        "PUT",
        f"{API_PREFIX}/service-groups/{{name}}",
        "handle_put_service_group",
        "Create or replace a service group (HAProxy backend, members, algorithm, deregistration delay)",
        params=(Param("name", "path", {"type": "string"}, "Service group name", required=True),),
        body=_OBJECT,
        ok={200: ("The service group", _JSON, _OBJECT)},
        errors={400: "Invalid service group (the field is named)", 503: "Store unavailable"},
    ),
    Route(
        "GET",
        f"{API_PREFIX}/balance",
        "handle_balance",
        "Rebalancing: settings, imbalance over the last hour, host loads, current plan, execution",
        ok={200: ("Balance state", _JSON, _OBJECT)},
        errors={503: "Store unavailable"},
    ),
    Route(
        "GET",
        f"{API_PREFIX}/balance/snapshot",
        "handle_snapshot",
        "The live cluster as a snapshot (hosts, VMs with p95 CPU demand, rules, settings)",
        "Save it and run 'cloudmon plan --snapshot FILE' for what-if plans (format: README, "
        "Cluster snapshots).",
        ok={200: ("The snapshot", _JSON, _OBJECT)},
        errors={400: "An invalid rule or VM document (named)", 503: "Store unavailable"},
    ),
    Route(
        "PUT",
        f"{API_PREFIX}/balance/settings",
        "handle_balance_settings",
        "Change rebalancing settings (threshold 1-5, automation manual/partial/full, mode balance/consolidate)",
        body=_OBJECT,
        ok={200: ("The settings", _JSON, _OBJECT)},
        errors={400: "Invalid setting (named)", 503: "Store unavailable"},
    ),
    Route(
        "POST",
        f"{API_PREFIX}/balance/plan",
        "handle_compute_plan",
        "Compute a rebalancing plan now from the live cluster (what-if: nothing runs until approved)",
        body=_OBJECT,
        ok={200: ("The plan", _JSON, _OBJECT)},
        errors={400: "Invalid settings, no hosts, or a plan is running", 503: "Store unavailable"},
    ),
    Route(
        "POST",
        f"{API_PREFIX}/balance/plan/{{plan_id}}/approve",
        "handle_approve_plan",
        "Approve a proposed plan: its moves run one by one, each verified",
        params=(_PLAN,),
        ok={200: ("The plan", _JSON, _OBJECT)},
        errors={400: "Not a proposed plan, or another plan is running", 404: "Unknown plan"},
    ),
    Route(
        "POST",
        f"{API_PREFIX}/balance/plan/{{plan_id}}/reject",
        "handle_reject_plan",
        "Reject a proposed plan",
        params=(_PLAN,),
        ok={200: ("The plan", _JSON, _OBJECT)},
        errors={400: "Not a proposed plan", 404: "Unknown plan"},
    ),
    Route(
        "GET",
        f"{API_PREFIX}/rules",
        "handle_rules",
        "Placement rules: affinity, anti_affinity, must/should (not) run on",
        ok={200: ("All rules", _JSON, _OBJECT)},
        errors={503: "Store unavailable"},
    ),
    Route(
        "PUT",
        f"{API_PREFIX}/rules/{{name}}",
        "handle_put_rule",
        "Create or replace a placement rule ({kind, vms, hosts})",
        params=(Param("name", "path", {"type": "string"}, "Rule name", required=True),),
        body=_OBJECT,
        ok={200: ("The rule", _JSON, _OBJECT)},
        errors={400: "Invalid rule (the field is named)", 503: "Store unavailable"},
    ),
    Route(
        "DELETE",
        f"{API_PREFIX}/rules/{{name}}",
        "handle_delete_rule",
        "Delete a placement rule",
        params=(Param("name", "path", {"type": "string"}, "Rule name", required=True),),
        ok={200: ("deleted: true", _JSON, _OBJECT)},
        errors={404: "Unknown rule", 503: "Store unavailable"},
    ),
    Route(
        "PUT",
        f"{API_PREFIX}/hosts/{{node_id}}/maintenance",
        "handle_maintenance",
        "Put a host into maintenance (its VMs are evacuated by mandatory moves) or take it out",
        'Body: {"maintenance": true|false}. Under partial or full automation the evacuation runs '
        "by itself; under manual it is recommended.",
        params=(Param("node_id", "path", {"type": "string"}, "Host (node id)", required=True),),
        body=_OBJECT,
        ok={200: ("The host's maintenance state", _JSON, _OBJECT)},
        errors={400: "Bad body", 404: "Unknown host", 503: "Store unavailable"},
    ),
    Route(
        "GET",
        f"{API_PREFIX}/events",
        "handle_events",
        "The event log: every decision and action with its reason (time travel over decisions)",
        params=(
            Param("start", "query", {"type": "number"}, "Range start, epoch seconds (default end - 3600)"),
            Param("end", "query", {"type": "number"}, "Range end, epoch seconds (default now)"),
            Param("kind", "query", {"type": "string"}, "Only kinds starting with this (e.g. autoscale.)"),
            Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 10000}, "Newest N (1000)"),
        ),
        ok={200: ("Events, oldest first", _JSON, _OBJECT)},
        errors={400: "A parameter is invalid (named)", 503: "Store unavailable"},
    ),
    Route(
        "GET",
        f"{API_PREFIX}/openapi.json",
        "handle_openapi",
        "This document",
        ok={200: ("OpenAPI 3.1 document", _JSON, {"type": "object"})},
    ),
)

_COMPONENT_TYPES: Final = (
    Report,
    IngestResponse,
    NodesResponse,
    NodeDetail,
    SeriesResult,
    SampleEvent,
    StatusResponse,
    ErrorResponse,
    HealthResponse,
    SubmitCommand,
    CommandView,
)


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": route.handler.removeprefix("handle_"),
        "summary": route.summary,
    }
    if route.description:
        op["description"] = route.description
    if route.params:
        params = []
        for p in route.params:
            schema = {"type": "array", "items": p.schema} if p.repeatable else p.schema
            entry: dict[str, Any] = {
                "name": p.name,
                "in": p.where,
                "required": p.required,
                "description": p.description,
                "schema": schema,
            }
            if p.repeatable:
                entry.update(style="form", explode=True)
            params.append(entry)
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {"required": True, "content": {_JSON: {"schema": route.body}}}
    responses: dict[str, Any] = {
        str(status): {"description": desc, "content": {media: {"schema": schema}}}
        for status, (desc, media, schema) in route.ok.items()
    }
    errors = dict(route.errors)
    if route.auth:
        errors.setdefault(401, "Missing or wrong bearer token")
        op["security"] = [{"bearer": []}]
    else:
        op["security"] = []
    for status, desc in sorted(errors.items()):
        responses[str(status)] = {"description": desc, "content": {_JSON: {"schema": _ref("ErrorResponse")}}}
    op["responses"] = responses
    return op


def _schema_hook(t: Any) -> dict[str, Any]:
    # ``NodeSummary.info`` is ``dict[str, object]``: any JSON value (an empty
    # schema would mean the same but msgspec refuses empty hook results).
    if t is object:
        return {"description": "Any JSON value"}
    raise NotImplementedError(f"no JSON schema for {t!r}")


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route in :data:`ROUTES`."""
    _, components = msgspec.json.schema_components(
        _COMPONENT_TYPES, schema_hook=_schema_hook, ref_template="#/components/schemas/{name}"
    )
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "cloudmon collector API",
            "version": cloudmon.__version__,
            "description": "Agents push reports; consoles read nodes, series and live streams. "
            "Every /api/v1 route needs 'Authorization: Bearer TOKEN'.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
