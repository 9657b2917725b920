"""The collector service: HTTP API for agents and consoles, store writer, live streams.

``Collector`` runs on a caller's asyncio loop, ``CollectorThread`` on its own
loop in a background thread (embedding), ``run_headless`` as a service
(``cloudmon collector``).  The routes are listed once in
:mod:`cloudmon.collector.api` and published at ``GET /api/v1/openapi.json``.
"""

from cloudmon.collector.api import ROUTES, openapi_document
from cloudmon.collector.cli import run_headless
from cloudmon.collector.server import Collector, CollectorError, CollectorThread, ListenError
from cloudmon.store import redact_url

__all__ = [
    "ROUTES",
    "Collector",
    "CollectorError",
    "CollectorThread",
    "ListenError",
    "openapi_document",
    "redact_url",
    "run_headless",
]
