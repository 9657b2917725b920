"""The small interface every instance provider implements.

Providers are synchronous and do blocking I/O (libvirt calls, subprocesses):
callers run them in worker threads, never on the asyncio loop or the GUI
thread.  Every call is time-limited by the provider itself and raises
:class:`ProviderError` with a message an operator can act on.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import msgspec


class ProviderError(Exception):
    """A provider could not do what was asked; the text says why and what to fix."""


class InstanceState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    STOPPED = "stopped"
    #: The provider no longer knows the instance (deleted outside cloudmon).
    MISSING = "missing"


class LaunchRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What to start: one instance of a group, built from its launch template."""

    group: str
    #: Unique name the instance gets (also its VM name where there is a VM).
    name: str
    vcpus: int = 1
    memory_mib: int = 512
    #: Image or template to build from (provider-specific: base image path,
    #: template domain XML path, AMI-like id for the command provider).
    image: str = ""
    #: Host chosen by placement, or ``None`` to let the provider choose.
    host: str | None = None
    #: Free-form provider parameters from the launch template.
    params: dict[str, Any] = msgspec.field(default_factory=dict)


class InstanceInfo(msgspec.Struct, frozen=True, kw_only=True):
    """An instance as its provider sees it."""

    id: str
    group: str
    state: InstanceState
    host: str | None = None
    #: Node id of the agent that reports this instance's telemetry, when known
    #: (a VM's guest agent, a simulated node); telemetry is matched on it.
    node_id: str | None = None
    created: float = 0.0


@runtime_checkable
class Provider(Protocol):
    """Creates, inspects and deletes instances.  Idempotent where it can be."""

    name: str

    def create(self, request: LaunchRequest) -> InstanceInfo:
        """Start one instance; returns once the provider has it (it may still boot)."""

    def delete(self, instance_id: str) -> None:
        """Stop and remove an instance; deleting a missing one is not an error."""

    def describe(self, instance_ids: list[str]) -> dict[str, InstanceInfo]:
        """Current state of the given instances (missing ones as ``MISSING``)."""

    def hosts(self) -> Mapping[str, Mapping[str, float]]:
        """Hosts this provider may place on, with capacity/usage figures
        (``vcpus``, ``vcpus_used``, ``memory_mib``, ``memory_mib_used``); may be empty."""

    def close(self) -> None:
        """Release connections and child processes.  Idempotent."""
