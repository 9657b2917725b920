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
from typing import TYPE_CHECKING, Any, TypeVar

import cloudmon_agent

T = TypeVar("T")

if TYPE_CHECKING:
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
    )
    from msgspec import to_builtins as to_builtins
    from msgspec.structs import asdict, force_setattr, replace

    BACKEND: str

    def encode(obj: Any) -> bytes: ...

    def decode(data: bytes | bytearray | memoryview | str, *, type: type[T]) -> T: ...

    def decode_any(data: bytes | bytearray | memoryview | str) -> Any: ...

    def decoder(type: type[T]) -> Callable[[bytes | bytearray | memoryview | str], T]: ...

else:

    def _pick() -> str:
        if cloudmon_agent.WIRE in ("lite", "msgspec"):
            return cloudmon_agent.WIRE
        try:
            import msgspec  # noqa: F401
        except ImportError:
            return "lite"
        return "msgspec"

    BACKEND = _pick()

    if BACKEND == "lite":
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

        def decode_any(data):
            return decode(data)

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

        encode = msgspec.json.Encoder().encode
        decode = msgspec.json.decode
        decode_any = msgspec.json.decode

        def decoder(type):
            return msgspec.json.Decoder(type).decode


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
