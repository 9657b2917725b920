"""The agent's typed configuration, where it comes from, and the node's identity.

Sources, later wins:

1. built-in defaults;
2. a TOML file: ``--config FILE``, else ``/etc/cloudmon/agent.toml`` if it
   exists, else ``$XDG_CONFIG_HOME/cloudmon/agent.toml`` (``~/.config/...``)
   if it exists.  Keys are the field names below, at the top level::

       collector = "https://collector.example:8470"
       token = "..."          # keep the file mode 0600
       interval = 1.0

3. environment: ``CLOUDMON_COLLECTOR``, ``CLOUDMON_TOKEN``,
   ``CLOUDMON_INTERVAL``, ``CLOUDMON_NODE_ID``, ``CLOUDMON_NODE_NAME``,
   ``CLOUDMON_STATE_DIR``, ``CLOUDMON_TIMEOUT``, ``CLOUDMON_LOG_LEVEL``,
   ``CLOUDMON_SPOOL_MAX_BYTES``, ``CLOUDMON_RETRY_MAX``, and for the
   collectors ``CLOUDMON_LIBVIRT_URI``, ``CLOUDMON_TOP_N``,
   ``CLOUDMON_PROCESSES_EVERY``, ``CLOUDMON_CONTAINERS``, ``CLOUDMON_GPUS``,
   ``CLOUDMON_BUDGET_MS``, and for actions ``CLOUDMON_ALLOW_ACTIONS``
   (comma-separated) and ``CLOUDMON_MIGRATE_URI`` (an empty variable counts as unset, so
   ``CLOUDMON_LIBVIRT_URI=none`` turns VMs off; booleans take
   1/0, true/false, yes/no, on/off);
4. command-line flags.

Every error names the setting and where its bad value came from.

Node identity: an explicit ``node_id`` wins; otherwise an id
``<sanitized-hostname>-<8 hex>`` is generated once and kept in
``<state_dir>/node-id``, so a node keeps its id across restarts and two agents
with different state directories on one machine are two nodes.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from cloudmon_agent.wire import Struct, field, force_setattr

log = logging.getLogger(__name__)

ENV_PREFIX: Final = "CLOUDMON_"
SYSTEM_CONFIG_FILE: Final = Path("/etc/cloudmon/agent.toml")
NODE_ID_FILE: Final = "node-id"
#: Same pattern as ``schema.NodeId``.
NODE_ID_RE: Final = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MAX_INTERVAL: Final = 3600.0  # schema.Report.interval's bound
#: Default size bound of the on-disk spool (reports kept while the collector is away):
#: at ≈3 kB a report and one report a second, ≈6 hours.
DEFAULT_SPOOL_MAX_BYTES: Final = 64 << 20
MIN_SPOOL_MAX_BYTES: Final = 64 << 10


class ConfigError(ValueError):
    """The configuration is invalid; the text names the setting and how to fix it."""


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$STATE_DIRECTORY`` (systemd ``StateDirectory=``), else ``$XDG_STATE_HOME/cloudmon-agent``."""
    env = os.environ if environ is None else environ
    if env.get("STATE_DIRECTORY"):
        # systemd passes a colon-separated list when several are configured.
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    base = env.get("XDG_STATE_HOME") or os.path.join(
        env.get("HOME") or os.path.expanduser("~"), ".local", "state"
    )
    return Path(base) / "cloudmon-agent"


def default_config_file(environ: Mapping[str, str] | None = None) -> Path | None:
    """The first existing default config file, or None."""
    env = os.environ if environ is None else environ
    if SYSTEM_CONFIG_FILE.is_file():
        return SYSTEM_CONFIG_FILE
    base = env.get("XDG_CONFIG_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".config")
    user = Path(base) / "cloudmon" / "agent.toml"
    return user if user.is_file() else None


def _check_url(v: str) -> str:
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must look like http://HOST:PORT or https://HOST:PORT, got {v!r}")
    try:
        _ = parts.port  # parsing it validates it
    except ValueError:
        raise ValueError(f"has an invalid port: {v!r}") from None
    if parts.query or parts.fragment:
        raise ValueError(f"must not have a query or fragment: {v!r}")
    return v.rstrip("/")


def _check_token(v: str) -> str:
    # A header value: visible ASCII only (http.client would refuse the rest
    # later, with a message that could echo the token).
    if not v or any(not (33 <= ord(c) <= 126) for c in v):
        raise ValueError("must be non-empty visible ASCII without spaces")
    return v


def _check_interval(v: float) -> float:
    if not 0 < v <= MAX_INTERVAL:
        raise ValueError(f"must be > 0 and <= {MAX_INTERVAL:g} seconds, got {v:g}")
    return v


def _check_timeout(v: float) -> float:
    if not 0 < v <= 600:
        raise ValueError(f"must be > 0 and <= 600 seconds, got {v:g}")
    return v


def _check_node_id(v: str) -> str:
    if not NODE_ID_RE.match(v):
        raise ValueError(f"must be 1-128 characters of A-Z a-z 0-9 . _ : @ -, got {v!r}")
    return v


def _check_spool_max_bytes(v: int) -> int:
    if not MIN_SPOOL_MAX_BYTES <= v <= 1 << 40:
        raise ValueError(f"must be >= {MIN_SPOOL_MAX_BYTES} bytes (64 KiB) and <= 1 TiB, got {v}")
    return v


def _check_retry_max(v: float) -> float:
    if not 0.05 <= v <= 3600:
        raise ValueError(f"must be >= 0.05 and <= 3600 seconds, got {v:g}")
    return v


_URI_RE: Final = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S*$")
#: ``libvirt_uri`` values that mean "no VMs" (besides the empty string).
_URI_OFF: Final = ("none", "off")


def _check_libvirt_uri(v: str) -> str:
    if v.strip().lower() in ("", *_URI_OFF):
        return ""
    if not _URI_RE.match(v):
        raise ValueError(
            f"must be a libvirt URI like qemu:///system, or empty (or none) for no VMs, got {v!r}"
        )
    return v


def _check_top_n(v: int) -> int:
    if not 0 <= v <= 100:
        raise ValueError(f"must be 0 (no process scan) to 100, got {v}")
    return v


def _check_processes_every(v: float) -> float:
    if not 0 <= v <= 3600:
        raise ValueError(f"must be >= 0 and <= 3600 seconds, got {v:g}")
    return v


def _check_budget_ms(v: float) -> float:
    if not 0 <= v <= 10_000:
        raise ValueError(f"must be 0 (no budget) to 10000 ms, got {v:g}")
    return v


#: Actions an agent can be allowed to run (``schema.ACTIONS``; kept here so config needs no schema).
KNOWN_ACTIONS: Final = ("vm.create", "vm.start", "vm.stop", "vm.delete", "vm.migrate", "vm.state")


def _check_allow_actions(v: object) -> tuple[str, ...]:
    if not isinstance(v, (tuple, list)) or not all(isinstance(a, str) for a in v):
        raise ValueError(f"must be a list of action names, got {v!r}")
    names = tuple(dict.fromkeys(a.strip() for a in v if a.strip()))
    unknown = [a for a in names if a not in KNOWN_ACTIONS]
    if unknown:
        raise ValueError(f"unknown action(s) {', '.join(unknown)}; known: {', '.join(KNOWN_ACTIONS)}")
    return names


def _check_image_dirs(v: object) -> tuple[str, ...]:
    if not isinstance(v, (tuple, list)) or not all(isinstance(d, str) for d in v):
        raise ValueError(f"must be a list of directories, got {v!r}")
    dirs = tuple(dict.fromkeys(d.strip() for d in v if d.strip()))
    relative = [d for d in dirs if not d.startswith("/")]
    if relative:
        raise ValueError(f"must be absolute paths, got {', '.join(relative)}")
    return dirs


def _check_migrate_uri(v: str) -> str:
    if not v.strip():
        return ""
    if not _URI_RE.match(v):
        raise ValueError(
            f"must be the libvirt URI other hosts reach this one at, like qemu+tcp://10.0.0.7/system, got {v!r}"
        )
    return v


def _check_bool(v: bool) -> bool:
    if not isinstance(v, bool):
        # ValueError like every check: __post_init__ turns it into a ConfigError naming the setting.
        raise ValueError(f"must be true or false, got {v!r}")  # noqa: TRY004
    return v


def _check_name(v: str) -> str:
    if not v.strip() or len(v) > 255:
        raise ValueError(f"must be 1-255 characters, got {v!r}")
    return v


def _check_log_level(v: str) -> str:
    up = v.upper()
    if up not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, got {v!r}")
    return up


class AgentConfig(Struct, frozen=True, kw_only=True):
    """Everything the agent needs to run.  Validated on construction."""

    #: Collector base URL (``http://HOST:PORT``); reports go to ``<url>/api/v1/ingest``.
    collector: str | None = None
    #: Bearer token the collector expects (never logged).
    token: str | None = None
    #: Seconds between samples.
    interval: float = 1.0
    #: Node id; empty means generated once and kept in ``state_dir/node-id``.
    node_id: str | None = None
    #: Display name of the node (sent as ``node.hostname``).
    name: str = field(default_factory=socket.gethostname)
    #: Where the agent keeps its state (node id, and the spool in ``spool/``).  A
    #: str is accepted and stored as a Path.
    state_dir: Path | str = field(default_factory=default_state_dir)
    #: Seconds to wait for the collector (connect and each response).
    timeout: float = 5.0
    #: Python logging level name.
    log_level: str = "INFO"
    #: Most bytes the on-disk spool may take; when full the oldest reports are dropped.
    spool_max_bytes: int = DEFAULT_SPOOL_MAX_BYTES
    #: Longest wait between two tries while the collector is away (seconds; the
    #: wait doubles from 1 s up to this).  Lower notices a returning collector sooner.
    retry_max: float = 30.0
    #: libvirt URI the VM collector connects to; empty turns VMs off (so does a
    #: missing libvirt-python).  ``test:///default`` is libvirt's fake host.
    libvirt_uri: str = "qemu:///system"
    #: Processes in each top-N list (by CPU, by memory); 0 turns the process scan off.
    top_n: int = 5
    #: Seconds between process scans (the report carries the last lists and their age).
    processes_every: float = 5.0
    #: Report containers, services and VM scopes from cgroups.
    containers: bool = True
    #: Report NVIDIA GPUs (through NVML, when the driver is there).
    gpus: bool = True
    #: CPU budget of the collectors per cycle in ms: over it, the most expensive
    #: one runs less often and the report says so.  0 turns the budget off.
    budget_ms: float = 1.0
    #: Actions the collector may have this agent run (``vm.create``, ``vm.start``,
    #: ``vm.stop``, ``vm.delete``, ``vm.migrate``, ``vm.state``); empty refuses every
    #: command.  A list in TOML, comma-separated in the environment and on the command line.
    allow_actions: tuple[str, ...] = ()
    #: The libvirt URI other hosts use to reach this host's libvirtd (advertised in
    #: every report; live migrations to this host go there), e.g. ``qemu+tcp://10.0.0.7/system``.
    migrate_uri: str = ""
    #: Directories ``vm.create`` may take images, templates, kernels and overlays from
    #: (absolute paths); empty: ``vm.create`` refuses any file path.
    image_dirs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.state_dir, Path):
            force_setattr(self, "state_dir", Path(self.state_dir))
        for name, check in _CHECKS.items():
            value = getattr(self, name)
            if value is None:
                continue
            try:
                checked = check(value)
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from None
            if checked != value:
                force_setattr(self, name, checked)

    @property
    def state_path(self) -> Path:
        """``state_dir`` as a Path (it always is one after construction)."""
        return Path(self.state_dir)

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with the token masked (for logs and --print)."""
        out = {f: getattr(self, f) for f in self.__struct_fields__}
        out["state_dir"] = str(self.state_dir)
        if out["token"]:
            out["token"] = "***"
        return out


_CHECKS: Final[dict[str, Callable[[Any], Any]]] = {
    "collector": _check_url,
    "token": _check_token,
    "interval": _check_interval,
    "timeout": _check_timeout,
    "node_id": _check_node_id,
    "name": _check_name,
    "log_level": _check_log_level,
    "spool_max_bytes": _check_spool_max_bytes,
    "retry_max": _check_retry_max,
    "libvirt_uri": _check_libvirt_uri,
    "top_n": _check_top_n,
    "processes_every": _check_processes_every,
    "containers": _check_bool,
    "gpus": _check_bool,
    "budget_ms": _check_budget_ms,
    "allow_actions": _check_allow_actions,
    "migrate_uri": _check_migrate_uri,
    "image_dirs": _check_image_dirs,
}


class _Size(int):
    """Type marker of byte sizes (``67108864`` or ``64MiB``) in :data:`SETTINGS`."""


class _Names(tuple[str, ...]):
    """Type marker of name lists (a TOML list, or ``a,b,c``) in :data:`SETTINGS`."""


#: setting -> (type, environment variable)
SETTINGS: Final[dict[str, tuple[type, str]]] = {
    "collector": (str, "CLOUDMON_COLLECTOR"),
    "token": (str, "CLOUDMON_TOKEN"),
    "interval": (float, "CLOUDMON_INTERVAL"),
    "node_id": (str, "CLOUDMON_NODE_ID"),
    "name": (str, "CLOUDMON_NODE_NAME"),
    "state_dir": (Path, "CLOUDMON_STATE_DIR"),
    "timeout": (float, "CLOUDMON_TIMEOUT"),
    "log_level": (str, "CLOUDMON_LOG_LEVEL"),
    "spool_max_bytes": (_Size, "CLOUDMON_SPOOL_MAX_BYTES"),
    "retry_max": (float, "CLOUDMON_RETRY_MAX"),
    "libvirt_uri": (str, "CLOUDMON_LIBVIRT_URI"),
    "top_n": (int, "CLOUDMON_TOP_N"),
    "processes_every": (float, "CLOUDMON_PROCESSES_EVERY"),
    "containers": (bool, "CLOUDMON_CONTAINERS"),
    "gpus": (bool, "CLOUDMON_GPUS"),
    "budget_ms": (float, "CLOUDMON_BUDGET_MS"),
    "allow_actions": (_Names, "CLOUDMON_ALLOW_ACTIONS"),
    "migrate_uri": (str, "CLOUDMON_MIGRATE_URI"),
    "image_dirs": (_Names, "CLOUDMON_IMAGE_DIRS"),
}

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def _convert(kind: type, value: object) -> Any:
    """``value`` as ``kind``; TypeError if it has the wrong type, ValueError if it does not parse."""
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError
        return float(value)
    if kind is _Size:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TypeError
        return _parse_size(value)
    if kind is _Names:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise TypeError
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TypeError
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"expected a whole number, got {value!r}") from None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, str):
            raise ValueError(f"expected true or false (1/0, yes/no, on/off), got {value!r}")
        raise TypeError
    if kind is Path:
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            raise TypeError
        return Path(os.path.expanduser(str(value)))
    if not isinstance(value, str):
        raise TypeError
    return value


_SIZE_RE: Final = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def _parse_size(value: int | str) -> int:
    """``67108864``, ``"64MiB"``, ``"64M"`` or ``"512KiB"`` as bytes (binary units)."""
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(value)
    if m is None:
        raise ValueError(f"expected a size in bytes like 67108864 or 64MiB, got {value!r}")
    unit = (m.group(2) or "B")[0].upper()
    return int(m.group(1)) << {"B": 0, "K": 10, "M": 20, "G": 30, "T": 40}[unit]


def _coerce(name: str, value: object, where: str) -> Any:
    """Convert one raw value to the setting's type, or raise naming setting and source."""
    kind = SETTINGS[name][0]
    try:
        value = _convert(kind, value)
        check = _CHECKS.get(name)
        if check is not None:
            value = check(value)
    except (TypeError, ValueError) as exc:
        kind_name = {_Size: "int", _Names: "list of names"}.get(kind, kind.__name__)
        detail = str(exc) if isinstance(exc, ValueError) and str(exc) else f"expected a {kind_name}"
        if "could not convert" in detail:
            detail = f"expected a number, got {value!r}"
        raise ConfigError(f"{name} (from {where}): {detail}") from None
    return value


def _read_toml(path: Path) -> dict[str, Any]:
    import tomllib  # only when there is a file: keeps a file-less agent's memory down

    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(doc) - set(SETTINGS))
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(SETTINGS)}"
        )
    return {k: _coerce(k, v, str(path)) for k, v in doc.items()}


def load_config(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> AgentConfig:
    """Build the effective configuration: defaults < TOML file < environment < ``overrides``.

    ``config_file`` must exist when given; without it the default files are
    used if present.  ``overrides`` (command-line flags) with value None are
    ignored.  Raises :class:`ConfigError`.
    """
    env = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    path = config_file if config_file is not None else default_config_file(env)
    if path is not None:
        merged.update(_read_toml(path))
    for name, (_, var) in SETTINGS.items():
        raw = env.get(var)
        if raw:
            merged[name] = _coerce(name, raw, f"${var}")
    for name, value in (overrides or {}).items():
        if name not in SETTINGS:
            raise ConfigError(f"unknown setting {name!r}")
        if value is not None:
            merged[name] = _coerce(name, value, f"--{name.replace('_', '-')}")
    if "state_dir" not in merged:
        merged["state_dir"] = default_state_dir(env)
    return AgentConfig(**merged)


def sanitize_hostname(hostname: str) -> str:
    """The hostname reduced to node-id characters (``[A-Za-z0-9._-]``, at most 100)."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", hostname).strip("-.")[:100]
    return clean or "node"


def resolve_node_id(config: AgentConfig) -> str:
    """The configured node id, or the one kept in ``state_dir/node-id`` (created once).

    Creation is atomic (write a temporary file, then hard-link it into place),
    so two agents starting together on one state directory agree on one id.
    """
    if config.node_id:
        return config.node_id
    path = config.state_path / NODE_ID_FILE
    existing = _read_node_id(path)
    if existing is not None:
        return existing
    new_id = f"{sanitize_hostname(socket.gethostname())}-{os.urandom(4).hex()}"
    try:
        config.state_path.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{NODE_ID_FILE}.{os.getpid()}.{os.urandom(4).hex()}")
        tmp.write_text(new_id + "\n", encoding="utf-8")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another agent won the race: use its id
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"state_dir: cannot create {path} ({exc.strerror or exc}); "
            "make the directory writable, choose another with --state-dir, or set --node-id"
        ) from None
    kept = _read_node_id(path)
    if kept is None:  # pragma: no cover - we just wrote it
        raise ConfigError(f"state_dir: {path} vanished right after it was written")
    log.info("new node id %s (kept in %s)", kept, path)
    return kept


def _read_node_id(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None  # not created yet (creating it reports a clear error if it cannot be)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"state_dir: cannot read {path}: {exc}") from None
    if not NODE_ID_RE.match(text):
        raise ConfigError(
            f"state_dir: {path} holds {text[:40]!r}, not a valid node id; fix or delete the file "
            "(a new id is then generated) or set --node-id"
        )
    return text
