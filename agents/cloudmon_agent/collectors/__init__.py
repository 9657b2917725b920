"""Collectors: small pluggable samplers, each filling one field of the report.

A collector is any object with the :class:`Collector` shape.  The agent calls
:meth:`Collector.prime` once, then :meth:`Collector.collect` once per cycle
from its one sampling thread, and puts the result in the report field named by
:attr:`Collector.field`.  VM, container and GPU collectors (later) plug in the
same way; each owns its own counters.
"""

from __future__ import annotations

from typing import Protocol

from cloudmon_agent.collectors.host import HostCollector


class Collector(Protocol):
    """One sampler of one part of the node."""

    #: The :class:`~cloudmon_agent.schema.Report` field this collector fills.
    field: str

    def prime(self) -> None:
        """Take first readings of stateful counters (rates need two samples)."""

    def collect(self) -> object:
        """One sample: the value of ``Report.<field>``."""

    def close(self) -> None:
        """Release files, handles and connections."""


def default_collectors() -> list[Collector]:
    """The collectors a plain agent runs."""
    return [HostCollector()]


__all__ = ["Collector", "HostCollector", "default_collectors"]
