"""The part of msgspec the agent uses, on the standard library alone (``cloudmon_agent.wire``'s "lite" side).

msgspec's ``_core`` and the ``datetime``, ``decimal``, ``uuid`` and ``platform``
modules it loads cost the agent about 3 MiB of RSS, a sixth of the whole
process, for encoding one report a second.  The ``cloudmon-agent`` command
therefore binds :mod:`cloudmon_agent.wire` to this module; the collector, the
console and tests keep msgspec (see :mod:`cloudmon_agent.wire`).

What it does, with msgspec's meaning:

- :class:`Struct`: slotted record classes declared like msgspec Structs
  (annotations, defaults, empty ``[]``/``{}`` defaults copied per instance,
  :func:`field` with ``default_factory``, ``kw_only``, ``omit_defaults``,
  ``forbid_unknown_fields``, ``__post_init__``).  ``frozen=True`` is accepted
  but not enforced here: type checking enforces it (the stubs are msgspec's),
  and msgspec enforces it in every other process;
- :func:`encode`: compact JSON through the ``json`` module's C encoder; a
  field set to :data:`UNSET` is left out, as are defaults under ``omit_defaults``;
- :func:`decode` / :func:`convert`: JSON into typed values, *validated*
  against the annotations and their :class:`Meta` constraints (``ge``, ``gt``,
  ``le``, ``lt``, ``min_length``, ``max_length``, ``pattern``), with msgspec's
  error texts (``Expected `int >= 0`, got `-1` - at `$.params.vcpus```).
  Commands from the collector go through this, so an agent without msgspec
  checks them just as strictly.  A type it cannot check raises TypeError when
  first used, never passes unchecked.
"""

from __future__ import annotations

import json
import os
import re
import threading
import typing
from collections.abc import Callable
from typing import Any, Final


class MsgspecError(Exception):
    """Base of the errors below (msgspec's name)."""


class DecodeError(MsgspecError, ValueError):
    """The input is not valid JSON."""


class ValidationError(DecodeError):
    """The input is JSON but does not match the type; the text names where."""


class UnsetType:
    """The type of :data:`UNSET`: a field left out of the encoded message."""

    _instance: UnsetType | None = None

    def __new__(cls) -> UnsetType:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET: Final = UnsetType()


class Meta:
    """Constraints on a value, used as ``Annotated[int, Meta(ge=0)]``."""

    __slots__ = ("_re", "ge", "gt", "le", "lt", "max_length", "min_length", "pattern")

    def __init__(
        self,
        *,
        gt: float | None = None,
        ge: float | None = None,
        lt: float | None = None,
        le: float | None = None,
        min_length: int | None = None,
        max_length: int | None = None,
        pattern: str | None = None,
        **_docs: Any,  # title, description, examples ...: documentation only
    ) -> None:
        self.gt, self.ge, self.lt, self.le = gt, ge, lt, le
        self.min_length, self.max_length, self.pattern = min_length, max_length, pattern
        self._re = re.compile(pattern) if pattern is not None else None


class _Field:
    __slots__ = ("default", "default_factory")

    def __init__(self, default: Any, default_factory: Callable[[], Any] | None) -> None:
        self.default = default
        self.default_factory = default_factory


_NODEFAULT: Final = object()


def field(*, default: Any = _NODEFAULT, default_factory: Callable[[], Any] | None = None) -> Any:
    """A field's default made per instance by ``default_factory`` (msgspec.field)."""
    return _Field(default, default_factory)


def _annotation_is_classvar(ann: Any) -> bool:
    text = ann if isinstance(ann, str) else getattr(ann, "__name__", repr(ann))
    return text.startswith(("ClassVar", "typing.ClassVar", "Final", "typing.Final"))


@typing.dataclass_transform(field_specifiers=(field,))
class _StructMeta(type):
    """Builds each Struct class: slots, ``__init__`` and the JSON hook, generated once per class."""

    def __new__(
        mcs,
        name: str,
        bases: tuple[type, ...],
        ns: dict[str, Any],
        *,
        frozen: bool | None = None,
        kw_only: bool | None = None,
        omit_defaults: bool | None = None,
        forbid_unknown_fields: bool | None = None,
        **_other: Any,  # array_like, tag ...: not used by the agent
    ) -> _StructMeta:
        if _other:
            raise TypeError(f"lite Struct does not support {', '.join(_other)}")
        parent_fields: list[str] = []
        defaults: dict[str, Any] = {}
        config: dict[str, bool] = {}
        for base in reversed(bases):
            for f in getattr(base, "__struct_fields__", ()):
                if f not in parent_fields:
                    parent_fields.append(f)
            defaults.update(getattr(base, "__struct_defaults_map__", {}))
            config.update(getattr(base, "__struct_options__", {}))
        own: list[str] = []
        for f, ann in ns.get("__annotations__", {}).items():
            if f.startswith("__") or _annotation_is_classvar(ann):
                continue
            if f in ns:
                defaults[f] = ns.pop(f)
            if f not in parent_fields:
                own.append(f)
        for key, value in (
            ("frozen", frozen),
            ("kw_only", kw_only),
            ("omit_defaults", omit_defaults),
            ("forbid_unknown_fields", forbid_unknown_fields),
        ):
            if value is not None:
                config[key] = value
        ns["__slots__"] = tuple(own)
        cls = super().__new__(mcs, name, bases, ns)
        fields = tuple(parent_fields + own)
        cls.__struct_fields__ = fields  # type: ignore[attr-defined]
        cls.__struct_defaults_map__ = defaults  # type: ignore[attr-defined]
        cls.__struct_options__ = config  # type: ignore[attr-defined]
        if fields or name != "Struct":
            _build(cls, fields, defaults, config)
        return cls


def _build(cls: Any, fields: tuple[str, ...], defaults: dict[str, Any], config: dict[str, bool]) -> None:
    kw_only = config.get("kw_only", False)
    env: dict[str, Any] = {"_NODEFAULT": _NODEFAULT, "_UNSET": UNSET}
    params: list[str] = []
    body: list[str] = []
    seen_default = False
    for f in fields:
        d = defaults.get(f, _NODEFAULT)
        if isinstance(d, _Field):
            if d.default_factory is not None:
                env[f"_fac_{f}"] = d.default_factory
                params.append(f"{f}=_NODEFAULT")
                body.append(f" self.{f} = _fac_{f}() if {f} is _NODEFAULT else {f}")
                seen_default = True
                continue
            d = d.default
            defaults[f] = d
        if d is _NODEFAULT:
            if seen_default and not kw_only:
                raise TypeError(f"Required field '{f}' cannot follow optional fields")
            params.append(f)
            body.append(f" self.{f} = {f}")
            continue
        seen_default = True
        if type(d) in (list, dict, set, bytearray):
            if d:
                raise TypeError(
                    f"mutable default for field '{f}' must be empty, or use field(default_factory=...)"
                )
            env[f"_fac_{f}"] = type(d)
            params.append(f"{f}=_NODEFAULT")
            body.append(f" self.{f} = _fac_{f}() if {f} is _NODEFAULT else {f}")
        else:
            env[f"_d_{f}"] = d
            params.append(f"{f}=_d_{f}")
            body.append(f" self.{f} = {f}")
    if hasattr(cls, "__post_init__"):
        body.append(" self.__post_init__()")
    sig = ("*, " if kw_only and params else "") + ", ".join(params)
    src = f"def __init__(self{', ' if sig else ''}{sig}):\n" + ("\n".join(body) or " pass") + "\n"
    # The JSON hook: a dict of the fields, leaving out UNSET (and defaults under omit_defaults).
    items = []
    conditional = []
    omit = config.get("omit_defaults", False)
    for f in fields:
        d = defaults.get(f, _NODEFAULT)
        if d is UNSET:
            conditional.append(f" if self.{f} is not _UNSET: d['{f}'] = self.{f}")
        elif omit and d is not _NODEFAULT:
            cmp = f"self.{f} != _e_{f}" if not isinstance(d, _Field) else "True"
            env[f"_e_{f}"] = d
            conditional.append(f" if {cmp}: d['{f}'] = self.{f}")
        else:
            items.append(f"'{f}': self.{f}")
    src += "def _lite_dict(self):\n d = {" + ", ".join(items) + "}\n"
    src += "".join(c + "\n" for c in conditional) + " return d\n"
    src += "def _lite_tuple(self):\n return (" + "".join(f"self.{f}, " for f in fields) + ")\n"
    exec(compile(src, f"<lite Struct {cls.__qualname__}>", "exec"), env)
    cls.__init__ = env["__init__"]
    cls._lite_dict = env["_lite_dict"]
    cls._lite_tuple = env["_lite_tuple"]
    setattr(cls, "__match_args__", fields)  # noqa: B010 - mypy refuses the plain assignment
    if not config.get("frozen", False):
        cls.__hash__ = None


class Struct(metaclass=_StructMeta):
    """Base class of the record types (msgspec.Struct's lite counterpart)."""

    __slots__ = ()
    __struct_fields__: typing.ClassVar[tuple[str, ...]] = ()

    def _lite_tuple(self) -> tuple[Any, ...]:
        return ()

    def _lite_dict(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        inner = ", ".join(f"{f}={getattr(self, f)!r}" for f in self.__struct_fields__)
        return f"{type(self).__name__}({inner})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._lite_tuple() == other._lite_tuple()

    def __hash__(self) -> int:
        return hash(self._lite_tuple())

    def __copy__(self) -> Struct:
        new: Struct = replace(self)
        return new


def asdict(obj: Struct) -> dict[str, Any]:
    """The fields as a dict (not recursive), like ``msgspec.structs.asdict``."""
    return {f: getattr(obj, f) for f in obj.__struct_fields__}


def replace(obj: Struct, /, **changes: Any) -> Any:
    """A copy with ``changes`` (``msgspec.structs.replace``; ``__post_init__`` is not run)."""
    values = asdict(obj)
    values.update(changes)
    new = object.__new__(type(obj))
    for k, v in values.items():
        setattr(new, k, v)
    return new


def force_setattr(obj: Struct, name: str, value: Any) -> None:
    """Set a field of a frozen struct (for ``__post_init__``; ``msgspec.structs.force_setattr``)."""
    object.__setattr__(obj, name, value)


#: Stands where a cached fragment goes: a JSON string no value holds, "\0<random token><index>\0".
_MARK: Final = "\x00" + os.urandom(8).hex()
_MARK_JSON: Final = json.dumps(_MARK)[:-1]  # '"\u0000<token>': then the index, then _MARK_END
_MARK_END: Final = json.dumps("\x00")[1:]  # '\u0000"'
#: id -> (struct, its JSON) of the cacheable structs of the last encode that had any.
_fragments: dict[int, tuple[Any, str]] = {}


class _EncodeState:
    """What the encode in progress (one at a time: :data:`_encode_lock`) shares with :func:`_default`."""

    def __init__(self) -> None:
        self.levels: list[list[str]] = []  # fragments of each nesting level
        self.seen: dict[int, tuple[Any, str]] = {}
        self.cached: Callable[[int], tuple[Any, str] | None] = _fragments.get


_state: Final = _EncodeState()
_encode_lock: Final = threading.Lock()


def _default(o: Any) -> Any:
    hook = getattr(o, "_lite_dict", None)
    if hook is None:
        if isinstance(o, (set, frozenset)):
            return list(o)
        raise TypeError(f"Encoding objects of type {type(o).__name__} is unsupported")
    st = _state
    if not getattr(o, "__lite_cache__", False):
        d = hook()
        for name in getattr(o, "__lite_cache_lists__", ()):
            v = d.get(name)
            if v:  # a list handed back unchanged (the same object) is spliced in whole
                d[name] = _fragment(st, v, v)
        return d
    return _fragment(st, o, None)


def _fragment(st: _EncodeState, key: Any, value: Any) -> str:
    """The marker of ``key``'s JSON (``value``'s, or its struct's): from the last encode, or made now."""
    hit = st.cached(id(key))
    if hit is not None and hit[0] is key:
        frag = hit[1]
    else:
        frag = _encode_level(key._lite_dict() if value is None else value)
    st.seen[id(key)] = (key, frag)
    frags = st.levels[-1]
    frags.append(frag)
    return f"{_MARK}{len(frags) - 1}\x00"


try:  # the json module's C encoder, made once (JSONEncoder.encode builds one per call)
    from json.encoder import c_make_encoder as _c_make_encoder  # type: ignore[attr-defined]
    from json.encoder import encode_basestring as _encode_basestring
except ImportError:  # pragma: no cover - CPython always has it
    _c_make_encoder = None
if _c_make_encoder is not None:
    _iterencode: Callable[[Any, int], Any] = _c_make_encoder(
        None, _default, _encode_basestring, None, ":", ",", False, False, True
    )
else:  # pragma: no cover
    _py_encoder = json.JSONEncoder(
        separators=(",", ":"), ensure_ascii=False, check_circular=False, default=_default
    )

    def _iterencode(obj: Any, _level: int) -> Any:
        return _py_encoder.iterencode(obj)


def encode(obj: Any) -> bytes:
    """Compact UTF-8 JSON (``msgspec.json.encode``).

    A struct whose class sets ``__lite_cache__ = True`` (or a list field named
    in its class's ``__lite_cache_lists__``) and that is the very object of the
    previous report (a section whose collector did not run this
    cycle hands back its last value) is not encoded again: its JSON from then
    is spliced in.  The report of a node with 10 VMs is ≈8 KB; encoding the VMs
    section costs ≈150 µs here, and the VM collector runs one cycle in 16 under
    the default budget.  Structs are frozen, so an object's JSON cannot change.
    """
    global _fragments
    with _encode_lock:
        st = _state
        st.seen = {}
        st.cached = _fragments.get
        try:
            text = _encode_level(obj)
        finally:
            st.levels.clear()
        if st.seen:
            _fragments = st.seen
    return text.encode()


def _encode_level(obj: Any) -> str:
    levels = _state.levels
    levels.append([])
    try:
        text = "".join(_iterencode(obj, 0))
    finally:
        frags = levels.pop()
    if not frags:
        return text
    # Markers are numbered: the encoder meets them in document order, _default may not.
    parts = text.split(_MARK_JSON)
    out = [parts[0]]
    for part in parts[1:]:
        end = part.index(_MARK_END)
        out += (frags[int(part[:end])], part[end + len(_MARK_END) :])
    return "".join(out)


def to_builtins(obj: Any) -> Any:
    """Structs as dicts, recursively (``msgspec.to_builtins``, for the types the agent sends)."""
    hook = getattr(obj, "_lite_dict", None)
    if hook is not None:
        return {k: to_builtins(v) for k, v in hook().items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_builtins(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_builtins(v) for k, v in obj.items()}
    return obj


def decode(data: bytes | bytearray | memoryview | str, *, type: Any = Any) -> Any:
    """JSON into ``type``, validated (``msgspec.json.decode``)."""
    try:
        obj = json.loads(bytes(data) if isinstance(data, memoryview) else data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DecodeError(f"JSON is malformed: {exc}") from None
    return convert(obj, type) if type is not Any else obj


def convert(obj: Any, type: Any) -> Any:
    """``obj`` (JSON-like builtins) checked against ``type`` and converted (``msgspec.convert``)."""
    try:
        return _checker(type)(obj)
    except _Invalid as exc:
        where = "".join(reversed(exc.path))
        raise ValidationError(exc.message + (f" - at `${where}`" if where else "")) from None


# -- validation ---------------------------------------------------------------------------------


class _Invalid(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.path: list[str] = []


_JSON_NAMES: Final = {int: "int", float: "float", str: "str", bool: "bool", type(None): "null",
                      list: "array", tuple: "array", dict: "object"}  # fmt: skip


def _json_name(value: Any) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


_checkers: dict[Any, Callable[[Any], Any]] = {}


def _checker(tp: Any) -> Callable[[Any], Any]:
    try:
        return _checkers[tp]
    except KeyError:
        pass
    except TypeError:  # unhashable annotation: build it each time (not in the agent's types)
        return _build_checker(tp)
    fn = _build_checker(tp)
    _checkers[tp] = fn
    return fn


def _expected(name: str, value: Any) -> _Invalid:
    return _Invalid(f"Expected `{name}`, got `{_json_name(value)}`")


def _build_checker(tp: Any) -> Callable[[Any], Any]:
    if tp is Any or tp is object:
        return lambda v: v
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _annotated(args[0], [m for m in args[1:] if isinstance(m, Meta)])
    if tp is int:

        def check_int(v: Any) -> Any:
            if type(v) is not int:
                raise _expected("int", v)
            return v

        return check_int
    if tp is float:

        def check_float(v: Any) -> Any:
            if type(v) is float:
                return v
            if type(v) is int:
                return float(v)
            raise _expected("float", v)

        return check_float
    if tp is str or tp is bool:
        name = tp.__name__

        def check_exact(v: Any) -> Any:
            if type(v) is not tp:
                raise _expected(name, v)
            return v

        return check_exact
    if tp is None or tp is type(None):

        def check_none(v: Any) -> Any:
            if v is not None:
                raise _expected("null", v)
            return None

        return check_none
    if isinstance(tp, type) and issubclass(tp, Struct):
        return _struct_checker(tp)
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            raise TypeError(f"lite wire cannot check fixed-length {tp!r}")
        item = _checker(args[0]) if args else _checker(Any)
        make: Callable[[Any], Any] = (origin or tp) if (origin or tp) is not list else list

        def check_array(v: Any) -> Any:
            if type(v) is not list:
                raise _expected("array", v)
            out = []
            for i, x in enumerate(v):
                try:
                    out.append(item(x))
                except _Invalid as exc:
                    exc.path.append(f"[{i}]")
                    raise
            return out if make is list else make(out)

        return check_array
    if origin is dict or tp is dict:
        key = _checker(args[0]) if args else _checker(Any)
        val = _checker(args[1]) if args else _checker(Any)

        def check_object(v: Any) -> Any:
            if type(v) is not dict:
                raise _expected("object", v)
            out = {}
            for k, x in v.items():
                try:
                    out[key(k)] = val(x)
                except _Invalid as exc:
                    exc.path.append(f"[{k!r}]")
                    raise
            return out

        return check_object
    if origin is typing.Literal:
        allowed = frozenset(args)
        shown = " | ".join(repr(a) for a in args)

        def check_literal(v: Any) -> Any:
            if v not in allowed or type(v) is bool:
                raise _Invalid(f"Invalid enum value {v!r} (one of {shown})")
            return v

        return check_literal
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        members = [a for a in args if a is not UnsetType]
        nullable = type(None) in members
        others = [_checker(a) for a in members if a is not type(None)]
        name = " | ".join(_type_name(a) for a in members)

        def check_union(v: Any) -> Any:
            if v is None and nullable:
                return None
            for c in others:
                try:
                    return c(v)
                except _Invalid as exc:
                    if exc.path or len(others) == 1:
                        raise
            raise _expected(name, v)

        return check_union
    raise TypeError(f"lite wire cannot check values of type {tp!r}")


def _type_name(tp: Any) -> str:
    """The JSON name msgspec uses in its messages: ``int``, ``array``, ``object``, ``null`` ..."""
    if typing.get_origin(tp) is typing.Annotated:
        return _type_name(typing.get_args(tp)[0])
    tp = typing.get_origin(tp) or tp
    if isinstance(tp, type) and issubclass(tp, Struct):
        return "object"
    return _JSON_NAMES.get(tp, getattr(tp, "__name__", repr(tp)))


def _annotated(base: Any, metas: list[Meta]) -> Callable[[Any], Any]:
    inner = _checker(base)
    if not metas:
        return inner
    meta = metas[0]
    name = _type_name(base)
    bounds: list[tuple[Any, str, Callable[[Any, Any], bool]]] = [
        (float(getattr(meta, attr)) if base is float else getattr(meta, attr), op, test)
        for attr, op, test in (
            ("ge", ">=", lambda v, b: v >= b),
            ("gt", ">", lambda v, b: v > b),
            ("le", "<=", lambda v, b: v <= b),
            ("lt", "<", lambda v, b: v < b),
        )
        if getattr(meta, attr) is not None
    ]

    def check_meta(v: Any) -> Any:
        v = inner(v)
        if v is None:
            return v
        for bound, op, test in bounds:
            if not test(v, bound):
                raise _Invalid(f"Expected `{name}` {op} {bound}")
        if meta.min_length is not None and len(v) < meta.min_length:
            raise _Invalid(f"Expected `{name}` of length >= {meta.min_length}")
        if meta.max_length is not None and len(v) > meta.max_length:
            raise _Invalid(f"Expected `{name}` of length <= {meta.max_length}")
        if meta._re is not None and meta._re.search(v) is None:
            raise _Invalid(f"Expected `str` matching regex {meta.pattern!r}")
        return v

    return check_meta


def _struct_checker(cls: type[Struct]) -> Callable[[Any], Any]:
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = cls.__struct_fields__
    defaults: dict[str, Any] = getattr(cls, "__struct_defaults_map__", {})
    checks = {f: _checker(hints[f]) for f in fields}
    required = [f for f in fields if f not in defaults]
    forbid = getattr(cls, "__struct_options__", {}).get("forbid_unknown_fields", False)

    def check_struct(v: Any) -> Any:
        if type(v) is not dict:
            raise _expected("object", v)
        for f in required:
            if f not in v:
                raise _Invalid(f"Object missing required field `{f}`")
        kwargs = {}
        for k, x in v.items():
            c = checks.get(k)
            if c is None:
                if forbid:
                    raise _Invalid(f"Object contains unknown field `{k}`")
                continue
            try:
                kwargs[k] = c(x)
            except _Invalid as exc:
                exc.path.append(f".{k}")
                raise
        return cls(**kwargs)

    return check_struct
