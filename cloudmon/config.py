"""One typed configuration schema for the collector and the console.

Sources, later wins: built-in defaults, the TOML file
(``$XDG_CONFIG_HOME/cloudmon/cloudmon.toml`` or ``--config FILE``),
``CLOUDMON_*`` environment variables (``CLOUDMON_LISTEN_PORT=9000``), then
command-line flags.  Every field documents itself below; ``cloudmon
--print-config`` shows the result.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import msgspec
import platformdirs

from cloudmon.store.base import TierSpec

CONFIG_VERSION: Final = 1
APP_NAME: Final = "cloudmon"
ENV_PREFIX: Final = "CLOUDMON_"


class ConfigError(ValueError):
    """The configuration is invalid; the text says which setting and how to fix it."""


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    config_version: int = CONFIG_VERSION
    #: Address the collector listens on.  Anything but loopback requires ``token``.
    listen_host: str = "127.0.0.1"
    #: TCP port of the collector's HTTP API (0 picks a free port).
    listen_port: int = 8470
    #: Bearer token agents and remote consoles must send.  Generated and kept in
    #: the data directory (mode 0600) when not set.
    token: str | None = None
    #: Telemetry store URL; empty means the embedded store in the data directory.
    store: str = ""
    #: Seconds without a report after which a node is shown unreachable.
    node_timeout: float = 5.0
    #: Largest accepted request body in bytes (larger: 413).
    max_body_bytes: int = 1 << 20
    #: Retention of the raw (1 s), 1 min and 1 h tiers, in hours.
    retention_raw_hours: float = 24.0
    retention_1m_hours: float = 30 * 24.0
    retention_1h_hours: float = 365 * 24.0
    #: Reports buffered for the store before new ones are dropped (and counted).
    write_queue_max: int = 50_000
    #: Directory for the embedded store, token and local agent state.
    data_dir: str = ""
    #: Shared ingest queue (``redis://HOST:PORT/DB``) for several collectors on one
    #: store; empty (the default) writes straight to the store.  See
    #: :mod:`cloudmon.collector.queue`.
    queue: str = ""
    #: Seconds a queued report may stay unacknowledged by a collector before
    #: another collector takes it over (that one is presumed dead).
    queue_claim_timeout: float = 30.0
    #: Most reports the shared queue may hold unstored (the store is down or slow);
    #: beyond it agents get 503 and keep reports in their spools.  Size Redis for it
    #: (about 2 kB per report).
    queue_max_entries: int = 1_000_000
    #: Run the control loops (auto-scaling, load-balancer weights, rebalancing) in
    #: this collector.  Where several collectors share one store, exactly one of
    #: them should (the others set ``control = false``).
    control: bool = True
    #: Seconds between two rounds of the control loops.
    control_tick_s: float = 2.0
    #: Seconds between two measurements of the cluster's imbalance (the Balance page's chart).
    balance_every_s: float = 10.0
    #: Seconds between two rebalancing recommendations (run by themselves under
    #: partial/full automation).
    plan_every_s: float = 60.0
    #: Programs auto-scaling groups may run through the ``command`` provider (exact
    #: paths as the group names them).  Empty: the command provider is refused.
    command_allow: list[str] = []

    def __post_init__(self) -> None:
        if not 0 <= self.listen_port <= 65535:
            raise ConfigError(f"listen_port={self.listen_port} is not a TCP port (0-65535)")
        if self.node_timeout <= 0:
            raise ConfigError("node_timeout must be > 0 seconds")
        if self.max_body_bytes < 1024:
            raise ConfigError("max_body_bytes must be at least 1024")
        if self.queue and not self.queue.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"queue={self.queue!r} must be a Redis URL (redis://HOST:PORT/DB) or empty")
        if not 0.1 <= self.control_tick_s <= 3600:
            raise ConfigError("control_tick_s must be 0.1..3600 seconds")
        if not 0.1 <= self.balance_every_s <= 3600 or not 1 <= self.plan_every_s <= 86400:
            raise ConfigError("balance_every_s must be 0.1..3600 and plan_every_s 1..86400 seconds")
        if self.queue_claim_timeout <= 0:
            raise ConfigError("queue_claim_timeout must be > 0 seconds")
        if self.queue_max_entries < 1:
            raise ConfigError("queue_max_entries must be at least 1")

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir) if self.data_dir else Path(platformdirs.user_data_dir(APP_NAME))

    @property
    def store_url(self) -> str:
        return self.store or f"sqlite:///{self.data_path / 'telemetry.db'}"

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.listen_host)

    def tiers(self) -> tuple[TierSpec, ...]:
        """The store tiers (1 s raw, 1 min, 1 h) with the configured retention."""
        return (
            TierSpec("raw", 1, int(self.retention_raw_hours * 3600)),
            TierSpec("1m", 60, int(self.retention_1m_hours * 3600)),
            TierSpec("1h", 3600, int(self.retention_1h_hours * 3600)),
        )


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_config_file() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME)) / "cloudmon.toml"


_LIST_FIELDS: Final = frozenset({"command_allow"})


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in Config.__struct_fields__:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None:
            # List settings (command_allow) come as comma-separated values.
            out[name] = [v.strip() for v in raw.split(",") if v.strip()] if name in _LIST_FIELDS else raw
    return out


def load_config(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the effective configuration (see the module docstring for the order)."""
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    file = path if path is not None else default_config_file()
    if file.exists():
        try:
            merged.update(tomllib.loads(file.read_text(encoding="utf-8")))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {file}: {exc}") from None
    elif path is not None:
        raise ConfigError(f"config file {file} does not exist")
    merged.update(_from_env(environ))
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        # strict=False lets environment strings convert to ints/floats.
        return msgspec.convert(merged, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc} (from {file}, {ENV_PREFIX}* or flags)") from None


def ensure_token(config: Config) -> str:
    """The configured token, or the one kept in the data directory (created once)."""
    if config.token:
        return config.token
    path = config.data_path / "token"
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        token = ""
    if not token:
        path.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(24)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(token + "\n")
    return token
