"""Instances made by a user's program: for clouds and anything else.

Options (provider ``command``)::

    create = ["/usr/local/bin/mycloud", "create"]    # argv (a list, or a string split like a shell)
    delete = ["/usr/local/bin/mycloud", "delete"]
    describe = ["/usr/local/bin/mycloud", "describe"] # optional
    timeout_s = 60                                    # per run; the whole process group is killed after
    env = {MYCLOUD_REGION = "eu-1"}                   # added to the environment
    cwd = "/var/lib/cloudmon"

What the program gets on stdin (one JSON object) and must print on stdout:

- create: ``{"action": "create", "group", "name", "vcpus", "memory_mib", "image",
  "host", "params"}`` -> the new instance's id on the first line, or a JSON object
  ``{"id": ..., "host": ..., "node_id": ..., "state": ...}``;
- delete: ``{"action": "delete", "id": ...}`` -> exit 0 (also when the instance is
  already gone);
- describe: ``{"action": "describe", "ids": [...]}`` -> a JSON object ``{id: {"state":
  "running|pending|stopped|missing", "host", "node_id", "group"}}``; ids it leaves
  out are missing.  Without a describe program, instances this provider created
  and has not deleted are taken as running.

A non-zero exit, a timeout or unreadable output raises :class:`ProviderError`
with the exit code and the end of stderr, so the group's activity history shows
why.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from cloudmon.providers.base import InstanceInfo, InstanceState, LaunchRequest, ProviderError

log = logging.getLogger(__name__)

#: How much of the program's stderr an error message carries (its end: the reason is usually there).
STDERR_CHARS: Final = 2000
_MAX_STDOUT: Final = 1 << 20


def _argv(options: Mapping[str, Any], key: str, required: bool) -> list[str] | None:
    value = options.get(key)
    if value is None or value == "" or value == []:
        if required:
            raise ProviderError(
                f"the command provider needs a {key} program in its options, e.g. "
                f'{key} = ["/usr/local/bin/mycloud", "{key}"]'
            )
        return None
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ProviderError(f"command provider option {key} must be a list of strings or a string, got {value!r}")


def _tail(text: str) -> str:
    text = text.strip()
    return text if len(text) <= STDERR_CHARS else "..." + text[-STDERR_CHARS:]


class CommandProvider:
    """Runs the configured create/delete/describe programs (see the module doc)."""

    name = "command"

    def __init__(self, options: Mapping[str, Any], clock: Callable[[], float] = time.time) -> None:
        self._create = _argv(options, "create", True)
        self._delete = _argv(options, "delete", True)
        self._describe = _argv(options, "describe", False)
        try:
            self.timeout_s = float(options.get("timeout_s", 60.0))
        except (TypeError, ValueError):
            raise ProviderError(
                f"command provider option timeout_s must be a number, got {options['timeout_s']!r}"
            ) from None
        if self.timeout_s <= 0:
            raise ProviderError(f"command provider option timeout_s must be > 0, got {self.timeout_s:g}")
        env = options.get("env", {})
        if not isinstance(env, Mapping):
            raise ProviderError(f"command provider option env must be a table of strings, got {env!r}")
        self._env = {**os.environ, **{str(k): str(v) for k, v in env.items()}}
        self._cwd = str(options["cwd"]) if options.get("cwd") else None
        self._clock = clock
        self._lock = threading.Lock()
        self._known: dict[str, InstanceInfo] = {}
        self._running: set[subprocess.Popen[bytes]] = set()
        self._closed = False

    def _run(self, argv: list[str], payload: dict[str, Any], what: str) -> str:
        """Run ``argv`` with ``payload`` as JSON on stdin; its stdout, or ProviderError."""
        with self._lock:
            if self._closed:
                raise ProviderError("the command provider is closed")
        data = json.dumps(payload).encode()
        try:
            # Own session: on timeout the whole process group goes, children included.
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._env,
                cwd=self._cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise ProviderError(
                f"command provider: cannot run the {what} program {argv[0]!r}: {exc.strerror}; "
                "fix the path in the provider's options"
            ) from None
        with self._lock:
            self._running.add(proc)
        try:
            try:
                out, err = proc.communicate(data, timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                self._kill_group(proc)
                _out, err = proc.communicate()
                raise ProviderError(
                    f"command provider: the {what} program {shlex.join(argv)} did not finish within "
                    f"{self.timeout_s:g} s (its process group was killed); raise timeout_s or fix the program. "
                    f"stderr: {_tail(err.decode('utf-8', 'replace')) or '(empty)'}"
                ) from None
        finally:
            with self._lock:
                self._running.discard(proc)
        stderr = _tail(err.decode("utf-8", "replace"))
        if proc.returncode != 0:
            how = (
                f"was killed by signal {-proc.returncode}"
                if proc.returncode < 0
                else f"exited with {proc.returncode}"
            )
            raise ProviderError(
                f"command provider: the {what} program {shlex.join(argv)} {how}; stderr: {stderr or '(empty)'}"
            )
        if stderr:
            log.info("command provider: %s program stderr: %s", what, stderr)
        return out[:_MAX_STDOUT].decode("utf-8", "replace")

    @staticmethod
    def _kill_group(proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def create(self, request: LaunchRequest) -> InstanceInfo:
        """Run the create program; the instance id comes from its stdout."""
        assert self._create is not None
        payload = {
            "action": "create",
            "group": request.group,
            "name": request.name,
            "vcpus": request.vcpus,
            "memory_mib": request.memory_mib,
            "image": request.image,
            "host": request.host,
            "params": request.params,
        }
        out = self._run(self._create, payload, "create").strip()
        doc: dict[str, Any]
        if out.startswith("{"):
            try:
                doc = json.loads(out)
            except json.JSONDecodeError as exc:
                raise ProviderError(
                    f"command provider: the create program printed invalid JSON: {exc}"
                ) from None
        else:
            doc = {"id": out.splitlines()[0].strip() if out else ""}
        iid = str(doc.get("id") or "")
        if not iid:
            raise ProviderError(
                "command provider: the create program exited 0 but printed no instance id; it must print "
                'the id (or {"id": ...}) on stdout'
            )
        info = InstanceInfo(
            id=iid,
            group=request.group,
            state=self._state(doc.get("state"), InstanceState.RUNNING),
            host=str(doc["host"]) if doc.get("host") else request.host,
            node_id=str(doc["node_id"]) if doc.get("node_id") else None,
            created=self._clock(),
        )
        with self._lock:
            self._known[iid] = info
        return info

    @staticmethod
    def _state(value: Any, default: InstanceState) -> InstanceState:
        if value is None:
            return default
        try:
            return InstanceState(str(value).lower())
        except ValueError:
            known = ", ".join(s.value for s in InstanceState)
            raise ProviderError(
                f"command provider: unknown instance state {value!r}; use one of {known}"
            ) from None

    def delete(self, instance_id: str) -> None:
        """Run the delete program for ``instance_id`` (it must treat a missing instance as done)."""
        assert self._delete is not None
        self._run(self._delete, {"action": "delete", "id": instance_id}, "delete")
        with self._lock:
            self._known.pop(instance_id, None)

    def describe(self, instance_ids: list[str]) -> dict[str, InstanceInfo]:
        """States from the describe program, or from what this provider created when there is none."""
        with self._lock:
            known = dict(self._known)
        if self._describe is None:
            return {
                i: known.get(i) or InstanceInfo(id=i, group="", state=InstanceState.MISSING)
                for i in instance_ids
            }
        out = self._run(self._describe, {"action": "describe", "ids": list(instance_ids)}, "describe")
        try:
            doc = json.loads(out) if out.strip() else {}
        except json.JSONDecodeError as exc:
            raise ProviderError(
                f"command provider: the describe program printed invalid JSON: {exc}"
            ) from None
        if not isinstance(doc, dict):
            raise ProviderError("command provider: the describe program must print a JSON object {id: {...}}")
        result: dict[str, InstanceInfo] = {}
        for iid in instance_ids:
            entry = doc.get(iid)
            prev = known.get(iid)
            if not isinstance(entry, dict):
                result[iid] = InstanceInfo(
                    id=iid, group=prev.group if prev else "", state=InstanceState.MISSING
                )
                continue
            result[iid] = InstanceInfo(
                id=iid,
                group=str(entry.get("group") or (prev.group if prev else "")),
                state=self._state(entry.get("state"), InstanceState.RUNNING),
                host=str(entry["host"]) if entry.get("host") else (prev.host if prev else None),
                node_id=str(entry["node_id"]) if entry.get("node_id") else (prev.node_id if prev else None),
                created=prev.created if prev else 0.0,
            )
        return result

    def hosts(self) -> Mapping[str, Mapping[str, float]]:
        """The program's hosts are its own business: none."""
        return {}

    def close(self) -> None:
        """Kill the process groups of programs still running (idempotent)."""
        with self._lock:
            self._closed = True
            running = list(self._running)
        for proc in running:
            self._kill_group(proc)
