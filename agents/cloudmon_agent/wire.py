"""Record types, JSON encoding and validating decoding: msgspec, or the agent's own stand-in.

The schema (:mod:`cloudmon_agent.schema`) and the agent's record types are
declared once, against this module.  It binds, once per process, when first
imported:

- **msgspec** in the collector, the console and the tests (every program
  but the agent command): fast, and what the collector's decoding, OpenAPI
  schema and stores are built on;
- **lite** (:mod:`cloudmon_agent._lite`, the standard library only) in the
  ``cloudmon-agent`` command, which sets :data:`cloudmon_agent.WIRE` first.
  That keeps msgspec's ≈3 MiB out of a process that runs on every node all
  day; it encodes a report a second and validates the collector's answers and
  commands just as strictly.  ``CLOUDMON_AGENT_WIRE=msgspec`` makes the agent
  command use msgspec instead.

Both produce the same JSON for the same values and accept the same messages
(``tests/unit/agent/test_wire.py`` checks them against each other).  Code that
needs msgspec-only features (JSON Schema, msgpack) imports msgspec itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

import cloudmon_agent

T = TypeVar("T")


def _pick() -> str:
    if cloudmon_agent.WIRE in ("lite", "msgspec"):
        return cloudmon_agent.WIRE
    try:
        import msgspec  # noqa: F401
    except ImportError:
        return "lite"
    return "msgspec"


#: "msgspec" or "lite": what this process bound.
BACKEND: Final = _pick()

if not TYPE_CHECKING and BACKEND == "lite":  # type checking sees msgspec's stubs only
    from cloudmon_agent._lite import (
        UNSET,
        DecodeError,
        Meta,
        MsgspecError,
        Struct,
        UnsetType,
        ValidationError,
        asdict,
        convert,
        decode,
        encode,
        field,
        force_setattr,
        replace,
        to_builtins,
    )

    def decoder(type):
        return lambda data: decode(data, type=type)

else:
    import msgspec
    from msgspec import (
        UNSET,
        DecodeError,
        Meta,
        MsgspecError,
        Struct,
        UnsetType,
        ValidationError,
        convert,
        field,
        to_builtins,
    )
    from msgspec.structs import asdict, force_setattr, replace

    encode: Callable[[Any], bytes] = msgspec.json.Encoder().encode
    decode = msgspec.json.decode

    def decoder(type: type[T]) -> Callable[[bytes | bytearray | memoryview | str], T]:
        """A decode-and-validate function for one type (built once: msgspec compiles it)."""
        return msgspec.json.Decoder(type).decode


def decode_any(data: bytes | bytearray | memoryview | str) -> Any:
    """JSON into builtins, unchecked."""
    return decode(data)


__all__ = [
    "BACKEND",
    "UNSET",
    "DecodeError",
    "Meta",
    "MsgspecError",
    "Struct",
    "UnsetType",
    "ValidationError",
    "asdict",
    "convert",
    "decode",
    "decode_any",
    "decoder",
    "encode",
    "field",
    "force_setattr",
    "replace",
    "to_builtins",
]
