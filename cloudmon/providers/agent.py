"""The libvirt provider that acts through the agent on each host.

Each host's agent executes only typed, allow-listed actions (``vm.create``,
``vm.delete``, ``vm.state``; see :mod:`cloudmon_agent.actions`), sent as
commands on its report answers (:class:`~cloudmon.collector.commands.CommandQueue`).
The collector never needs a route to the host's libvirtd.

Not in :data:`cloudmon.providers.PROVIDERS`: it needs the collector's command
queue, so the composition root builds it.  Options (a launch template's
``provider_options``, all optional):

- ``timeout_s``: seconds one create/delete may take (default 120); ``state_timeout_s``
  for ``vm.state`` (default 30);
- ``overlay_dir``, ``base_format``, ``template_xml``, ``domain_type``, ``network``,
  ``kernel``, ``initrd``, ``cmdline``: defaults of ``vm.create``'s parameters
  (``cloudmon_agent.schema.CreateParams``); a request's ``params`` override them.

``LaunchRequest.image`` is the base image to clone (``base_image``), or a
template domain XML when it ends in ``.xml``.  Instance ids are VM names.
Placement: the request's host, else the host this provider has put the
fewest instances on (spread).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from cloudmon.collector.commands import CommandError, CommandHandle, CommandQueue
from cloudmon.providers.base import InstanceInfo, InstanceState, LaunchRequest, ProviderError

log = logging.getLogger(__name__)

_CREATE_KEYS: Final = (
    "overlay_dir",
    "base_format",
    "template_xml",
    "domain_type",
    "network",
    "kernel",
    "initrd",
    "cmdline",
)
_STATES: Final = {
    "running": InstanceState.RUNNING,
    "blocked": InstanceState.RUNNING,
    "paused": InstanceState.PENDING,
    "pmsuspended": InstanceState.STOPPED,
    "shutdown": InstanceState.STOPPED,
    "shutoff": InstanceState.STOPPED,
    "crashed": InstanceState.STOPPED,
    "missing": InstanceState.MISSING,
}


class AgentProvider:
    """Creates, inspects and deletes VMs through the hosts' agents.  Blocking: use a worker thread.

    ``hosts`` maps host names (what launch templates and placement use) to the
    node ids of their agents.
    """

    name = "agent"

    def __init__(
        self,
        commands: CommandQueue,
        hosts: Mapping[str, str],
        options: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not hosts:
            raise ProviderError("the agent provider needs at least one host (host name -> node id)")
        opts = dict(options or {})
        self._commands = commands
        self._hosts = dict(hosts)
        self._clock = clock
        self.timeout_s = float(opts.pop("timeout_s", 120.0))
        self.state_timeout_s = float(opts.pop("state_timeout_s", 30.0))
        self._defaults: dict[str, Any] = {str(k): opts.pop(k) for k in _CREATE_KEYS if k in opts}
        if opts:
            raise ProviderError(
                f"unknown option(s) for the agent provider: {', '.join(sorted(opts))}; known: "
                f"timeout_s, state_timeout_s, {', '.join(_CREATE_KEYS)}"
            )
        #: instance id -> host, for the instances this provider knows where they are.
        self._where: dict[str, str] = {}

    # -- helpers -----------------------------------------------------------------------

    def _node(self, host: str) -> str:
        node = self._hosts.get(host)
        if node is None:
            raise ProviderError(
                f"unknown host {host!r} for the agent provider; known: {', '.join(self._hosts)}"
            )
        return node

    def _send(self, host: str, action: str, params: dict[str, Any], timeout_s: float) -> CommandHandle:
        try:
            return self._commands.submit(self._node(host), action, params, timeout_s)
        except CommandError as exc:
            raise ProviderError(f"{action} for host {host} refused: {exc}") from None

    @staticmethod
    def _outcome(handle: CommandHandle, host: str, timeout_s: float) -> dict[str, Any]:
        result = handle.wait(timeout_s + 1.0)
        if result is None:
            raise ProviderError(
                f"{handle.action} of {handle.params.get('vm') or handle.params.get('name')} on host {host} "
                f"gave no result within {timeout_s:g} s; is the host's agent reporting?"
            )
        if not result.ok:
            raise ProviderError(f"{handle.action} on host {host} failed: {result.error}")
        return dict(result.detail)

    def _place(self, request: LaunchRequest) -> str:
        if request.host is not None:
            self._node(request.host)
            return request.host
        counts = {h: 0 for h in self._hosts}
        for h in self._where.values():
            if h in counts:
                counts[h] += 1
        return min(counts, key=lambda h: (counts[h], h))

    # -- Provider --------------------------------------------------------------------------

    def create(self, request: LaunchRequest) -> InstanceInfo:
        """``vm.create`` on the chosen host's agent; returns once the VM is defined and started."""
        host = self._place(request)
        params: dict[str, Any] = dict(self._defaults)
        if request.image:
            params["template_xml" if request.image.endswith(".xml") else "base_image"] = request.image
        params.update(request.params)
        params.update(name=request.name, vcpus=request.vcpus, memory_mib=request.memory_mib, start=True)
        params.setdefault("group", request.group)
        handle = self._send(host, "vm.create", params, self.timeout_s)
        detail = self._outcome(handle, host, self.timeout_s)
        self._where[request.name] = host
        state = _STATES.get(str(detail.get("state", "")), InstanceState.PENDING)
        log.info("created %s on host %s through its agent (%s)", request.name, host, state)
        return InstanceInfo(
            id=request.name, group=request.group, state=state, host=host, created=self._clock()
        )

    def delete(self, instance_id: str) -> None:
        """``vm.delete`` on the host that has it (every host is asked when it is not known)."""
        hosts = [self._where[instance_id]] if instance_id in self._where else list(self._hosts)
        handles = [(h, self._send(h, "vm.delete", {"vm": instance_id}, self.timeout_s)) for h in hosts]
        for host, handle in handles:
            self._outcome(handle, host, self.timeout_s)
        self._where.pop(instance_id, None)

    def describe(self, instance_ids: list[str]) -> dict[str, InstanceInfo]:
        """``vm.state`` of each instance, asked of every host at once where it is not known."""
        asks: list[tuple[str, str, CommandHandle]] = []
        for iid in instance_ids:
            hosts = [self._where[iid]] if iid in self._where else list(self._hosts)
            asks += [(iid, h, self._send(h, "vm.state", {"vm": iid}, self.state_timeout_s)) for h in hosts]
        found: dict[str, InstanceInfo] = {}
        for iid, host, handle in asks:
            state = _STATES.get(str(self._outcome(handle, host, self.state_timeout_s).get("state")))
            if state is None or state is InstanceState.MISSING:
                continue
            self._where[iid] = host
            found[iid] = InstanceInfo(id=iid, group="", state=state, host=host)
        out: dict[str, InstanceInfo] = {}
        for iid in instance_ids:
            if iid not in found:
                self._where.pop(iid, None)
            out[iid] = found.get(iid) or InstanceInfo(id=iid, group="", state=InstanceState.MISSING)
        return out

    def hosts(self) -> Mapping[str, Mapping[str, float]]:
        """The hosts it may place on (figures come from telemetry, not from here)."""
        return {h: {} for h in self._hosts}

    def close(self) -> None:
        """Nothing to release: the agents own the libvirt connections."""


__all__ = ["AgentProvider"]
