"""Providers carry out actions on the world: create/delete instances, move VMs.

Chosen by name through one explicit registry of lazy ``"module:Class"``
strings (like :data:`cloudmon.store.BACKENDS`), so that a provider's client
library (libvirt, ...) is imported only when it is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Final

from cloudmon.providers.base import (
    InstanceInfo,
    InstanceState,
    LaunchRequest,
    Provider,
    ProviderError,
)

PROVIDERS: Final[dict[str, str]] = {
    "simulated": "cloudmon.providers.simulated:SimulatedProvider",
    "command": "cloudmon.providers.command:CommandProvider",
    "libvirt": "cloudmon.providers.libvirt:LibvirtProvider",
}

__all__ = [
    "PROVIDERS",
    "InstanceInfo",
    "InstanceState",
    "LaunchRequest",
    "Provider",
    "ProviderError",
    "open_provider",
]


def open_provider(name: str, options: Mapping[str, Any]) -> Provider:
    """Build the provider registered as ``name`` from its options (a launch template's)."""
    target = PROVIDERS.get(name)
    if target is None:
        known = ", ".join(sorted(PROVIDERS))
        raise ProviderError(f"unknown provider {name!r}; use one of: {known}")
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    provider: Provider = cls(options)
    return provider
