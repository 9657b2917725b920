"""Declarative groups: ``cloudmon apply FILE`` reads TOML or JSON and puts each group.

File shape (TOML; JSON is the same tree, ``{"group": [...]}`` or a bare list)::

    [[group]]
    name = "web"
    min_size = 1
    max_size = 8
    desired = 2
    [group.template]
    provider = "libvirt"
    image = "/var/lib/cloudmon/base.qcow2"
    [[group.policies]]
    type = "target_tracking"        # or "step"
    name = "cpu50"
    target = 50
    [[group.scheduled]]
    name = "weekday-morning"
    cron = "0 8 * * mon-fri"
    min_size = 3

Every error names the file, the group and the field.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import msgspec

from cloudmon.autoscale.model import GroupSpec, SpecError, spec_from_doc


class ApplyError(ValueError):
    """A declarative file that cannot be applied; the text names file, group and field."""


def parse_text(text: str, fmt: str, source: str = "<text>") -> list[GroupSpec]:
    """Decode groups from TOML (``fmt="toml"``) or JSON (``fmt="json"``) text."""
    try:
        data: object = tomllib.loads(text) if fmt == "toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ApplyError(f"{source}: not valid {fmt.upper()}: {exc}") from None
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"group"})
        if unknown:
            raise ApplyError(
                f"{source}: unknown top-level key(s) {', '.join(unknown)}; groups go in [[group]] tables"
            )
        data = data.get("group", [])
    if not isinstance(data, list):
        raise ApplyError(f"{source}: 'group' must be a list of tables ([[group]] in TOML)")
    specs: list[GroupSpec] = []
    seen: set[str] = set()
    for i, doc in enumerate(data, 1):
        label = f"group #{i}"
        if isinstance(doc, dict) and isinstance(doc.get("name"), str):
            label = f"group {doc['name']!r} (#{i})"
        if not isinstance(doc, dict):
            raise ApplyError(f"{source}: {label}: must be a table of settings, got {type(doc).__name__}")
        try:
            spec = spec_from_doc(doc)
        except SpecError as exc:
            # msgspec says "... - at `$.template.vcpus`"; show the field path without the "$.".
            msg = str(exc).replace("`$.", "`").replace("`$`", "the group")
            raise ApplyError(f"{source}: {label}: {msg}") from None
        if spec.name in seen:
            raise ApplyError(
                f"{source}: {label}: a group named {spec.name!r} appears twice; names must be unique"
            )
        seen.add(spec.name)
        specs.append(spec)
    return specs


def load_file(path: str | Path) -> list[GroupSpec]:
    """Read groups from a ``.toml`` or ``.json`` file (:class:`ApplyError` on any problem)."""
    p = Path(path)
    ext = p.suffix.lower()
    if ext not in (".toml", ".json"):
        raise ApplyError(f"{p}: unknown file type {ext or '(none)'}; use a .toml or .json file")
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ApplyError(f"{p}: cannot read it: {exc.strerror or exc}") from None
    return parse_text(text, ext[1:], str(p))


def apply_specs(
    specs: Sequence[GroupSpec],
    *,
    existing: Mapping[str, GroupSpec],
    put: Callable[[GroupSpec], object],
    delete: Callable[[str], object] | None = None,
    prune: bool = False,
    dry_run: bool = False,
) -> list[str]:
    """Put every spec that differs from ``existing``; with ``prune``, delete groups absent
    from ``specs``.  Returns one summary line per group ("created web", ...).

    ``put``/``delete`` are e.g. :meth:`AutoscaleService.put_group` and
    ``lambda n: service.delete_group(n, force=True)``, or HTTP calls; ``dry_run``
    only reports what would change.
    """
    if prune and delete is None:
        raise ApplyError("prune needs a delete function")
    lines: list[str] = []
    wanted = {s.name for s in specs}
    for spec in specs:
        old = existing.get(spec.name)
        if old is not None and msgspec.to_builtins(old) == msgspec.to_builtins(spec):
            lines.append(f"unchanged {spec.name}")
            continue
        if not dry_run:
            put(spec)
        verb = "created" if old is None else "updated"
        lines.append(f"{'would be ' if dry_run else ''}{verb} {spec.name}")
    if prune and delete is not None:
        for name in sorted(set(existing) - wanted):
            if not dry_run:
                delete(name)
            lines.append(f"{'would be ' if dry_run else ''}deleted {name}")
    return lines
