"""The one registry of our Lua scripts: each built once per client, one call path.

Every change of a record is one script of `api/protocol/lua/` (`api.protocol.scripts`
loads their text).  `Scripts.of(client)` holds them all for one client, built once
(as dramatiq's Redis broker does), and each is a named wrapper taking keyword
arguments, one per KEYS and ARGV entry, so no caller counts positions:

    scripts = Scripts.of(client)
    scripts.task_seal(record=keys.task_record(task_id))          # one call
    scripts.task_read.queue(pipe, record=..., lease=...)          # into a pipeline

Both go EVALSHA, and a server without the script cached (a new primary after a
failover or a restart) gets its body by EVAL: `LuaScript` for a call, `pipelined`
(`api.replication`) for a pipeline, given the registry as the scripts it may
resend.  Nothing else in `api` or `workers` sends EVAL, EVALSHA or registers a
script (the architecture test says so).

The asyncio producer (`api.aio_store`) has the same registry on a ``redis.asyncio``
client, `AsyncScripts.of(client)`: the same lines, names and NOSCRIPT answer, awaited
(``await scripts.task_read(record=..., lease=...)``).

**Adding a script** is a file and one line: write ``api/protocol/lua/<name>.lua``
(its first lines say ``-- KEYS:`` and ``-- ARGV:``), and add to `Scripts`

    <name> = Lua(keys=("record", "channel"), args=("now", "?host", "*fields"))

naming its KEYS then its ARGV in order.  ``?name`` is an optional trailing entry
(left out, or None, ends the list there: the scripts test ``if KEYS[n]``); ``*name``
is a last entry that takes a sequence, spread in place (field/value pairs, a
variable number of keys).  A wrapper refuses an unknown or a missing name
(TypeError), so a caller cannot shift the arguments of a script it does not know;
the architecture test checks every call site's names against the line, and
``tests/unit/test_script_registry.py`` that every script file has its line.  A
library (a file other scripts name in ``-- uses: <name>``) gets no line.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from hashlib import sha1
from typing import Any, overload

import redis
import redis.asyncio as aioredis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from api.protocol import scripts as lua

log = logging.getLogger(__name__)


class LuaScript(Script):  # type: ignore[misc]
    """A script by its body that a server without it in its cache runs by body (EVAL).

    redis-py's own answer to NOSCRIPT (SCRIPT LOAD, then EVALSHA again) is two
    commands that a client following a failover can send to two different servers;
    the second then fails with NOSCRIPT too.  EVAL carries the script with the call.
    """

    def __call__(self, keys: Sequence[Any] | None = None, args: Iterable[Any] | None = None,
                 client: Any = None) -> Any:
        client = self.registered_client if client is None else client
        arguments = (*(keys or ()), *(args or ()))
        numkeys = len(keys or ())
        try:
            return client.evalsha(self.sha, numkeys, *arguments)
        except NoScriptError:
            log.info("Redis did not have a script cached (a new primary?): sending its body")
            return client.eval(self.script, numkeys, *arguments)


def register_script(client: redis.Redis, script: str) -> LuaScript:
    """A script given by its text (tests, benchmarks); ours are `Scripts`'."""
    return LuaScript(client, script)


class WholeScripts:
    """A pipeline whose EVALSHA of a known script is sent as EVAL of its body."""

    def __init__(self, pipe: Any, scripts: Iterable[Any]) -> None:
        self._pipe = pipe
        self._bodies = {script.sha: script.script for script in scripts}

    def evalsha(self, sha: str, numkeys: int, *arguments: Any) -> Any:
        body = self._bodies.get(sha)
        if body is None:
            return self._pipe.evalsha(sha, numkeys, *arguments)
        return self._pipe.eval(body, numkeys, *arguments)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)


def _parse(names: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """Each name without its mark, and the mark: "" (required), "?" or "*"."""
    return tuple((name.lstrip("?*"), name[0] if name[0] in "?*" else "") for name in names)


def _entries(names: tuple[tuple[str, str], ...], given: dict[str, Any],
             script: str) -> list[Any]:
    out: list[Any] = []
    for index, (name, mark) in enumerate(names):
        if mark == "*":
            out.extend(given.pop(name, ()))
            continue
        value = given.pop(name, None)
        if value is None:
            if mark != "?":
                raise TypeError(f"{script}: missing argument {name!r}")
            rest = [later for later, _ in names[index + 1:] if given.get(later) is not None]
            if rest:
                raise TypeError(f"{script}: {rest} given without {name!r} before them")
            break
        out.append(value)
    return out


@dataclass
class Lua:
    """One script's signature: the names of its KEYS, then of its ARGV, in order."""

    keys: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        self._keys, self._args = _parse(self.keys), _parse(self.args)

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def arguments(self, given: Mapping[str, Any]) -> tuple[int, list[Any]]:
        """NUMKEYS and the KEYS then ARGV of a call with ``given``."""
        rest = dict(given)
        key_list = _entries(self._keys, rest, self.name)
        arg_list = _entries(self._args, rest, self.name)
        if rest:
            raise TypeError(f"{self.name}: unknown arguments {sorted(rest)}")
        return len(key_list), [*key_list, *arg_list]

    @overload
    def __get__(self, registry: None, owner: type) -> Lua: ...

    @overload
    def __get__(self, registry: Scripts, owner: type) -> BoundScript: ...

    def __get__(self, registry: Scripts | None, owner: type) -> Lua | BoundScript:
        return self if registry is None else registry.bound[self.name]


class BoundScript:
    """One script on one client: call it, or queue it into a pipeline."""

    def __init__(self, client: redis.Redis, spec: Lua) -> None:
        self.spec = spec
        self.runner = LuaScript(client, lua.load(spec.name))
        self.sha: str = self.runner.sha
        self.script: str = self.runner.script

    def __call__(self, **given: Any) -> Any:
        numkeys, arguments = self.spec.arguments(given)
        return self.runner(keys=arguments[:numkeys], args=arguments[numkeys:])

    def queue(self, pipe: Any, **given: Any) -> None:
        """EVALSHA into ``pipe``; run it with `api.replication.pipelined` (or `replicated`)
        given the registry, which resends it whole to a server that lacks it."""
        numkeys, arguments = self.spec.arguments(given)
        pipe.evalsha(self.sha, numkeys, *arguments)


_registries: weakref.WeakKeyDictionary[redis.Redis, Scripts] = weakref.WeakKeyDictionary()


class Scripts:
    """Every script of `api/protocol/lua/` (not the ``-- uses:`` libraries), one line each."""

    # Tasks (`api.protocol.task`): submit, start, run, end.
    task_submit = Lua(keys=("record", "recent", "?host_pending"),
                      args=("now", "ttl", "task_id", "heartbeat", "field_count", "*items"))
    task_start = Lua(keys=("record", "lease", "running", "?host_running", "?deadlines",
                           "?host_pending"),
                     args=("now", "worker", "lease_ms", "task_id", "?node"))
    task_progress = Lua(keys=("record", "channel"), args=("percent",))
    task_renew = Lua(keys=("record", "lease", "?deadlines"),
                     args=("worker", "lease_ms", "task_id"))
    task_seal = Lua(keys=("record",))
    task_finish = Lua(keys=("record", "lease", "running", "channel", "?primary", "?deadlines"),
                      args=("state", "result", "error", "description", "finished", "percent",
                            "retention", "task_id", "only_if_lease_expired", "output",
                            "?grace", "?host_running_prefix"))
    task_cancel = Lua(keys=("record", "channel"),
                      args=("now", "retention", "result", "error", "revoke_queued", "task_id",
                            "?host_pending_prefix"))
    task_withdraw = Lua(keys=("record", "channel"),
                        args=("now", "retention", "result", "error", "description", "task_id",
                              "?host_pending_prefix"))
    task_read = Lua(keys=("record", "lease"))
    task_list = Lua(keys=("recent",),
                    args=("record_prefix", "state", "host", "limit", "horizon"))
    task_log_write = Lua(keys=("record", "channel"), args=("worker", "*lines"))
    task_log_read = Lua(keys=("record", "log"), args=("after", "tail"))
    # Hosts and their workers (`workers.host`).
    hosts_live = Lua(args=("known_hosts", "heartbeat_prefix"))
    host_withdraw = Lua(keys=("heartbeat", "workers"), args=("worker", "now"))
    host_vm_records = Lua(keys=("host_vms",), args=("record_prefix", "*fields"))
    lease_due = Lua(keys=("deadlines",), args=("limit",))
    redis_primary = Lua(keys=("primary",))
    # VMs (`api.protocol.vmstate`) and their moves (`api.protocol.transfer`).
    vm_create = Lua(keys=("record", "names", "?host_vms"), args=("name", "*fields"))
    vm_transition = Lua(keys=("record", "events"),
                        args=("allowed", "state", "now", "max_events", "?host"))
    vm_configure = Lua(keys=("record",), args=("allowed", "*fields"))
    vm_delete = Lua(keys=("record", "names", "events"),
                    args=("name", "now", "max_events", "state", "?host_vms_prefix"))
    vm_records = Lua(keys=("*records",), args=("*fields",))
    vm_move = Lua(keys=("record", "events", "?transfer"),
                  args=("source", "destination", "allowed", "now", "max_events",
                        "?host_vms_prefix"))
    vm_move_abort = Lua(keys=("record", "transfer", "wake"), args=("source",))

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.bound = {spec.name: BoundScript(client, spec) for spec in self.specs()}

    @classmethod
    def specs(cls) -> list[Lua]:
        return [value for value in vars(cls).values() if isinstance(value, Lua)]

    @classmethod
    def of(cls, client: redis.Redis) -> Scripts:
        """The registry of ``client``, built on its first use."""
        registry = _registries.get(client)
        if registry is None:
            registry = _registries[client] = cls(client)
        return registry

    def __iter__(self) -> Iterator[BoundScript]:
        return iter(self.bound.values())


class AsyncBoundScript:
    """`BoundScript` on a ``redis.asyncio`` client: await it, or queue it into a
    pipeline (`api.aio_store.pipelined` resends it whole to a server that lacks it)."""

    def __init__(self, client: aioredis.Redis, spec: Lua) -> None:
        self.client = client
        self.spec = spec
        self.script = lua.load(spec.name)
        self.sha = sha1(self.script.encode("utf-8")).hexdigest()

    async def __call__(self, **given: Any) -> Any:
        numkeys, arguments = self.spec.arguments(given)
        try:
            return await self.client.evalsha(self.sha, numkeys, *arguments)
        except NoScriptError:
            log.info("Redis did not have a script cached (a new primary?): sending its body")
            return await self.client.eval(self.script, numkeys, *arguments)

    def queue(self, pipe: Any, **given: Any) -> None:
        numkeys, arguments = self.spec.arguments(given)
        pipe.evalsha(self.sha, numkeys, *arguments)


_async_registries: weakref.WeakKeyDictionary[aioredis.Redis, AsyncScripts] = \
    weakref.WeakKeyDictionary()


class AsyncScripts:
    """`Scripts`' lines on a ``redis.asyncio`` client: ``scripts.<name>`` is the
    `AsyncBoundScript` of the script `Scripts` names so."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.bound = {spec.name: AsyncBoundScript(client, spec) for spec in Scripts.specs()}

    @classmethod
    def of(cls, client: aioredis.Redis) -> AsyncScripts:
        """The registry of ``client``, built on its first use."""
        registry = _async_registries.get(client)
        if registry is None:
            registry = _async_registries[client] = cls(client)
        return registry

    def __getattr__(self, name: str) -> AsyncBoundScript:
        try:
            return self.__dict__["bound"][name]  # type: ignore[no-any-return]
        except KeyError:
            raise AttributeError(name) from None

    def __iter__(self) -> Iterator[AsyncBoundScript]:
        return iter(self.bound.values())
