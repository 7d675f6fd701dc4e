"""The machinery every operation shares: start gate, progress, cancel, lease, failure.

An operation is a plain function ``body(run, **kwargs)`` registered with
`operation`.  Its `TaskRun` is the `OperationContext` engines see.  Around the
body the runtime:

1. passes the record's start gate (PENDING -> STARTED, lease taken) or drops the
   message unread;
2. keeps the lease alive from a per-process thread while the body runs;
3. records success, or the failure `failure_of` maps the exception to, as plain
   strings in the record, and publishes ``done``.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import redis
from celery import Task, shared_task
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, AuthorizationError
from redis.retry import Retry

from api import events
from api.enums import VMTaskResult
from api.protocol import hresults, keys, records, tasklog
from api.protocol.lease import Holder
from api.protocol.tasks import TaskSpec
from api.replication import Acknowledgement, replicated
from api.scripts import Scripts
from api.settings import Settings
from workers.engines.context import raise_if_cancelled
from workers.failures import Failure, OperationFailed, OperationTimedOut, classify
from workers.outage import REDIS_AWAY, ride_out

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
# At most this many progress writes per second per task.
PROGRESS_MIN_INTERVAL = 0.2
# Flower learns a task's percentage from a 'task-progress' event (its state then
# reads PROGRESS); a second write per update, so sent at most once a second.
EVENT_MIN_INTERVAL = 1.0
# How stale a cancel check may be: the delay between cancel() and the task noticing.
CANCEL_CHECK_INTERVAL = 0.1
# How long a finishing task keeps retrying its final write while Redis is away.
FINISH_RETRY_SECONDS = 120.0
# Log lines kept in memory while Redis is away (they go with the result), and how
# long after a failed write the next line waits for the result rather than retrying.
LOG_BUFFER_LINES = 200
LOG_RETRY_SECONDS = 1.0


# Redis's refusals of a command by the user's ACL: a NOPERM reply (redis-py's
# NoPermissionError), or, inside a script, Redis 7.0's generic script error.
_ACL_REFUSALS = ("NOPERM", "no permissions to run", "can't run this command")


def is_redis_refusal(exc: BaseException) -> bool:
    """Redis refused a command to this user (its ACL lacks it): not a crash, not
    transient, and no retry helps."""
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return True
    return isinstance(exc, redis.exceptions.ResponseError) and any(
        text in str(exc) for text in _ACL_REFUSALS)


def redis_refusal(exc: BaseException, what: str) -> Failure:
    """Access denied, with Redis's own text (it names the command it refused, except
    inside a script, where Redis 7.0 names only the script).

    UnexpectedError, not ThreadCrashError: the worker did not stop, and the
    deployment's ACL is no expected outcome of an operation; its HRESULT,
    ERROR_ACCESS_DENIED, says what happened."""
    return Failure(VMTaskResult.UnexpectedError, hresults.ACCESS_DENIED,
                   f"{what}: Redis refused a command to the worker's user (its ACL lacks "
                   f"it; see deploy/redis/users.acl.template): {exc}")


def failure_of(exc: BaseException) -> Failure:
    """`classify`, and what only the runtime meets: Celery's soft time limit, Redis's
    ACL refusals and a Redis that stayed away (kept here so that no engine loads
    Celery or redis-py)."""
    if is_redis_refusal(exc):
        return redis_refusal(exc, "The operation stopped")
    if (isinstance(exc, redis.ConnectionError | redis.TimeoutError)
            and not isinstance(exc, AuthenticationError | AuthorizationError)):
        # Redis stayed away longer than the call rode out (`TaskRun.ride_out`).
        return Failure(VMTaskResult.TimeOutError, hresults.TIMEOUT,
                       f"Redis did not answer: {type(exc).__name__}: {exc}")
    if isinstance(exc, SoftTimeLimitExceeded):
        return classify(TimeoutError())
    return classify(exc)


class WorkerRedis:
    """One client per process, with the scripts the worker runs, built lazily after fork."""

    def __init__(self, settings: Settings) -> None:
        endpoint = settings.endpoint
        # With Sentinel the endpoint's own retry spans a failover; a re-sent start or
        # finish is recognised by the worker identity it recorded (`TaskRun.begin`).
        retry = ({} if endpoint.sentinel is not None else
                 {"retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3)})
        self.client = endpoint.client(
            settings.redis_timeout_seconds,
            decode_responses=True,
            socket_keepalive=True,
            health_check_interval=30,
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            **retry,
        )
        self.ack = Acknowledgement(endpoint.wait_replicas, endpoint.wait_ms)
        self.scripts = Scripts.of(self.client)


_process_redis: tuple[int, WorkerRedis] | None = None


def worker_redis(settings: Settings) -> WorkerRedis:
    global _process_redis
    if _process_redis is None or _process_redis[0] != os.getpid():
        _process_redis = (os.getpid(), WorkerRedis(settings))
    return _process_redis[1]


def worker_identity(settings: Settings) -> str:
    """Who holds a lease (`api.protocol.lease`), so a restarted worker can tell its own."""
    return str(Holder.of_this_process(settings.host))


def settings_of(task: Task) -> Settings:
    """The settings the worker's app was built with (`workers.app.create_app`)."""
    settings: Settings = task.app.settings
    return settings


class TaskRun:
    """One execution of one task; the `OperationContext` handed to engines."""

    def __init__(self, task_id: str, settings: Settings, conn: WorkerRedis,
                 task: Task | None = None, spec: TaskSpec | None = None) -> None:
        self.task_id = task_id
        self.spec = spec
        """The operation it runs; a VM body's state checks take its name from here."""
        self.settings = settings
        self.redis = conn.client
        self._task = task
        self._description: str | None = None
        self._last_event = 0.0
        self._conn = conn
        self._record = keys.task_record(task_id)
        self._channel = keys.task_channel(task_id)
        self._written_percent = 0.0
        self._pending_percent = 0.0
        self._last_write = 0.0
        self._cancel_seen = False
        self._last_cancel_check = 0.0
        # Set by the lease keeper when our lease vanished: the task has been judged
        # crashed, so the body must stop as if cancelled and publish nothing.
        self.lease_lost = threading.Event()
        # Log lines not yet in Redis (`log`), oldest first: (time, text).
        self._log_pending: list[tuple[str, str]] = []
        self._log_lock = threading.Lock()
        self._log_failed_at = -LOG_RETRY_SECONDS

    def log(self, line: str, *, defer: bool = False) -> None:
        """Append ``line`` to the task's log (`api.protocol.tasklog`), time-stamped now,
        clipped and with secret-looking option values redacted.  One round trip; while
        Redis is away the lines wait (the last `LOG_BUFFER_LINES`) and go with the
        next line or the result, as a ``defer``red line does (one about Redis being
        away need not wait for it to time out again).  Never fails the task."""
        entry = (repr(time.time()), tasklog.clip(tasklog.redact(line)))
        with self._log_lock:
            self._log_pending.append(entry)
            del self._log_pending[:-LOG_BUFFER_LINES]
            if defer or time.monotonic() - self._log_failed_at < LOG_RETRY_SECONDS:
                return
            pending = list(self._log_pending)
            try:
                self._conn.scripts.task_log_write(
                    record=self._record, channel=self._channel,
                    worker=worker_identity(self.settings),
                    lines=[item for pair in pending for item in pair])
            except redis.RedisError as exc:
                self._log_failed_at = time.monotonic()
                log.debug("Could not write to the log of %s: %s", self.task_id, exc)
                return
            del self._log_pending[:len(pending)]

    def _log_with(self, pipe: Any) -> int:
        """Queue the lines still waiting into ``pipe`` (before the result); how many."""
        with self._log_lock:
            pending = list(self._log_pending)
        if pending:
            self._conn.scripts.task_log_write.queue(
                pipe, record=self._record, channel=self._channel,
                worker=worker_identity(self.settings),
                lines=[item for pair in pending for item in pair])
        return len(pending)

    def begin(self) -> str:
        """The start gate, acknowledged by a replica before the body may run.

        Across a failover the gate holds because the START write is on a replica
        before the body runs (so a redelivered copy meets STARTED on the promoted
        one), and because a START re-sent to a new primary either passes there
        (the old one took its write with it) or finds our own identity (it had it).
        An unacknowledged start is therefore sent again until a replica has it: the
        primary that took it may be dying, and the body must not run on a start the
        next primary never saw (its record would say PENDING, and the result be lost).
        """
        identity = worker_identity(self.settings)
        lease_key = keys.task_lease(self.task_id)
        node = str(getattr(self._task.request, "hostname", None) or "") if self._task else ""

        def build(pipe: Any) -> None:
            self._conn.scripts.task_start.queue(
                pipe, record=self._record, lease=lease_key, running=keys.RUNNING_TASKS,
                host_running=keys.host_running(self.settings.host),
                deadlines=keys.LEASE_DEADLINES,
                host_pending=keys.host_pending(self.settings.host), now=repr(time.time()),
                worker=identity, lease_ms=int(self.settings.lease_seconds * 1000),
                task_id=self.task_id, node=node)
            pipe.hget(self._record, records.Field.WORKER)

        def attempt() -> tuple[str, bool]:
            (gate, holder), acked = replicated(self.redis, build, self._conn.scripts,
                                               self._conn.ack)
            if gate == records.STARTED and holder == identity:
                gate = records.BEGUN  # our own start, re-sent after a lost reply
            return str(gate), acked

        return self._until_acknowledged("start", attempt, lambda gate: gate == records.BEGUN)

    def refuse(self, failure: Failure) -> bool:
        """End the task with ``failure`` after its start gate failed half-way: the
        record is STARTED by this worker, but the body never ran.  Sent plainly,
        without ROLE and WAIT (what Redis refused may be ROLE).  False, and the
        record left as it is, when it is not ours (PENDING, or another delivery's)
        or Redis refuses this too; a lease the gate took then lapses into
        ThreadCrashError, the only outcome anyone else can judge."""
        try:
            state, holder = self.redis.hmget(self._record, records.Field.STATE,
                                            records.Field.WORKER)
            if state != records.STARTED or holder != worker_identity(self.settings):
                log.error("Task %s could not be recorded as refused: its record is %s",
                          self.task_id, state or "MISSING")
                return False
            outcome = self._conn.scripts.task_finish(**records.finish_arguments(
                self.task_id, state=records.FAILURE, result=int(failure.result),
                error=failure.hresult, description=failure.description,
                finished=repr(time.time()), percent=0,
                retention=int(self.settings.retention_seconds)))
        except redis.RedisError as exc:
            log.error("Task %s could not be recorded as refused: %s", self.task_id, exc)
            return False
        return bool(outcome == "OK")

    def _until_acknowledged(self, what: str, attempt: Callable[[], tuple[str, bool]],
                            counts: Callable[[str], bool]) -> str:
        """``attempt()`` (an idempotent write of ours, and WAIT) until a replica
        acknowledged it, or for the failover time; the outcome of the last try."""
        deadline = time.monotonic() + self.settings.endpoint.failover_seconds
        while True:
            outcome, acked = attempt()
            if acked or not counts(outcome):
                return outcome
            if time.monotonic() > deadline:
                log.warning("No Redis replica acknowledged the %s of %s; going on without",
                            what, self.task_id)
                self.log(f"warning: no Redis replica acknowledged the {what}; going on without")
                return outcome
            log.warning("No Redis replica acknowledged the %s of %s within %d ms; "
                        "sending it again", what, self.task_id, self._conn.ack.wait_ms)
            self.log(f"retry: no Redis replica acknowledged the {what} within "
                     f"{self._conn.ack.wait_ms} ms; sending it again")
            time.sleep(0.2)

    def report_progress(self, percent: float) -> None:
        percent = max(0.0, min(99.0, float(percent)))
        self._pending_percent = max(self._pending_percent, percent)
        now = time.monotonic()
        if int(self._pending_percent) <= int(self._written_percent):
            return
        if now - self._last_write < PROGRESS_MIN_INTERVAL:
            return
        try:
            self._conn.scripts.task_progress(record=self._record, channel=self._channel,
                                             percent=int(self._pending_percent))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # Progress is advisory; the final write carries the latest value.
            log.warning("Could not record progress of %s: %s", self.task_id, exc)
            self.log(f"warning: could not record progress {int(self._pending_percent)}%: {exc}",
                     defer=True)
            return
        self._written_percent = self._pending_percent
        self._last_write = now
        if self._task is not None and now - self._last_event >= EVENT_MIN_INTERVAL:
            self._last_event = now
            try:
                if self._description is None:
                    self._description = str(self.redis.hget(self._record, "description") or "")
                self._task.send_event(events.PROGRESS_EVENT, **events.progress_fields(
                    int(self._written_percent), self._description))
            except Exception as exc:  # noqa: BLE001 - monitoring must never fail a task
                log.debug("Could not send the progress event of %s: %s", self.task_id, exc)

    def cancel_requested(self) -> bool:
        if self._cancel_seen or self.lease_lost.is_set():
            return True
        now = time.monotonic()
        if now - self._last_cancel_check >= CANCEL_CHECK_INTERVAL:
            self._last_cancel_check = now
            try:
                self._cancel_seen = self._conn.client.hget(self._record, "cancel_requested") == "1"
            except (redis.ConnectionError, redis.TimeoutError):
                pass  # the request is durable; we will see it once Redis is back
        return self._cancel_seen

    def ride_out(self, call: Callable[[], T], what: str) -> T:
        """`ride_out` for the body's own Redis calls, e.g. a transfer's coordination:
        a call that meets Redis away is a missing reading, made again until Redis
        answers, for at most the transfer stall bound (``VMTASK_TRANSFER_STALL_SECONDS``)
        and never past a cancel or a lost lease (the pause is `sleep`).  A Redis that
        stays away ends the task TimeOutError."""
        seconds = self.settings.transfer_stall_seconds
        try:
            return ride_out(call, seconds=seconds, what=f"{what} ({self.task_id})",
                            sleep=self.sleep)
        except REDIS_AWAY as exc:
            raise OperationTimedOut(f"Redis did not answer for {seconds:g} s while {what}: "
                                    f"{exc}") from None

    def sleep(self, seconds: float) -> None:
        """Sleep, waking early (and raising `Cancelled`) when a cancel arrives."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            raise_if_cancelled(self)
            time.sleep(min(left, CANCEL_CHECK_INTERVAL))
        raise_if_cancelled(self)

    def finish(self, failure: Failure | None, output: Any = None) -> str:
        """Write the outcome; retried while Redis is away, since losing it loses the task."""
        if failure is None:
            state, result, error, text, percent = records.SUCCESS, VMTaskResult.Success, 0, "", 100
        else:
            state = records.REVOKED if failure.result == VMTaskResult.Cancelled else records.FAILURE
            result, error, text = failure.result, failure.hresult, failure.description
            percent = int(self._pending_percent)
        finished = repr(time.time())

        logged = 0

        def build(pipe: Any) -> None:
            nonlocal logged
            # Lines that waited for Redis go first, in the same round trip: the
            # end line, written by the finish script, stays the last.
            logged = self._log_with(pipe)
            self._conn.scripts.task_finish.queue(pipe, **records.finish_arguments(
                self.task_id, state=state, result=int(result), error=error, description=text,
                finished=finished, percent=percent,
                retention=int(self.settings.retention_seconds),
                output="" if output is None else json.dumps(output)))
            pipe.hmget(self._record, records.Field.WORKER, records.Field.FINISHED)

        identity = worker_identity(self.settings)

        def attempt() -> tuple[str, bool]:
            replies, acked = replicated(
                self.redis, build, self._conn.scripts, self._conn.ack)
            outcome, (holder, at) = replies[logged:]
            with self._log_lock:
                del self._log_pending[:logged]
            if outcome == state and holder == identity and at == finished:
                outcome = "OK"  # our own finish, re-sent after a lost reply
            return str(outcome), acked

        # Sent again until a replica has it: a result only the dying primary took
        # would leave the task STARTED on the next one, to be judged crashed.
        return ride_out(lambda: self._until_acknowledged("result", attempt, lambda o: o == "OK"),
                        seconds=FINISH_RETRY_SECONDS, what=f"finishing {self.task_id}",
                        on_retry=lambda exc: self.log(
                            f"retry: Redis unavailable while recording the result: {exc}",
                            defer=True))

    def announce(self, failure: Failure, trace: str | None = None) -> None:
        """Tell Celery's monitors (Flower) how the task ended, as the record says.

        ``trace`` is the traceback of an unexpected failure; expected ones have none.
        """
        if self._task is None:
            return
        try:
            # Flower's Description column (workers.flower_ext) for a task that ended
            # before any progress event carried it.
            if self._description is None:
                self._description = str(self.redis.hget(self._record, "description") or "")
            if failure.result == VMTaskResult.Cancelled:
                self._task.send_event("task-revoked", terminated=False, signum=None,
                                      expired=False, description=self._description)
            else:
                self._task.send_event("task-failed", description=self._description,
                                      **events.failure_fields(failure.result.name,
                                                              failure.hresult,
                                                              failure.description, trace))
        except Exception as exc:  # noqa: BLE001 - monitoring must never fail a task
            log.debug("Could not announce the end of %s: %s", self.task_id, exc)


class LeaseKeeper:
    """Renews the leases of the tasks running in this process, from one thread."""

    def __init__(self) -> None:
        self._runs: dict[str, TaskRun] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def hold(self, run: TaskRun) -> None:
        with self._lock:
            self._runs[run.task_id] = run
            # A new thread after a fork, and after a thread that died: every lease of
            # this process would otherwise lapse, and its tasks be judged crashed.
            if (self._thread is None or self._pid != os.getpid()
                    or not self._thread.is_alive()):
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._renew_forever, args=(run.settings,), name="vmtask-lease",
                    daemon=True)
                self._thread.start()

    def release(self, run: TaskRun) -> None:
        with self._lock:
            self._runs.pop(run.task_id, None)

    def _renew_forever(self, settings: Settings) -> None:
        # Every run in a process shares the app's settings: those of the first are
        # passed, since by the time this thread runs that task may have ended (a
        # thread that looked for them in `_runs` died there, and no lease of its
        # process was renewed again).
        interval = settings.lease_seconds / 3
        lease_ms = int(settings.lease_seconds * 1000)
        while True:
            time.sleep(interval)
            with self._lock:
                runs = list(self._runs.values())
            for run in runs:
                try:
                    # Also takes back a lease that lapsed while the primary was switching.
                    renewed = run._conn.scripts.task_renew(
                        record=keys.task_record(run.task_id),
                        lease=keys.task_lease(run.task_id), deadlines=keys.LEASE_DEADLINES,
                        worker=worker_identity(settings), lease_ms=lease_ms,
                        task_id=run.task_id)
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    log.warning("Could not renew lease of %s: %s", run.task_id, exc)
                    run.log(f"retry: could not renew the lease: {exc}", defer=True)
                    continue
                except Exception:  # this thread must outlive any one renewal
                    log.exception("Could not renew lease of %s", run.task_id)
                    continue
                if not renewed:
                    log.error("Lease of %s expired: it was judged crashed; stopping it",
                              run.task_id)
                    run.lease_lost.set()


lease_keeper = LeaseKeeper()

Body = Callable[Concatenate[TaskRun, P], Any]


def execute(task: Task, body: Callable[..., Any], kwargs: dict[str, Any],
            spec: TaskSpec | None = None) -> Any:
    task_id = task.request.id
    settings = settings_of(task)
    run = TaskRun(task_id, settings, worker_redis(settings), task, spec)
    try:
        gate = run.begin()
    except redis.ResponseError as exc:
        if not is_redis_refusal(exc):
            raise
        # Not a crash: record what happened, at once, rather than let the lease the
        # gate may already have taken lapse into ThreadCrashError "worker stopped".
        refusal = redis_refusal(exc, "The task never ran")
        log.error("Task %s %s: %s", task.name, task_id, refusal.description)
        if run.refuse(refusal):
            run.announce(refusal)
        raise Ignore() from None
    if gate != records.BEGUN:
        # Running or run elsewhere (a duplicate delivery), cancelled while queued, or
        # no record (forged): never run it, and touch neither record nor lease.
        log.info("Not running %s %s: its record is %s", task.name, task_id, gate)
        if gate == records.REVOKED:
            task.send_event("task-revoked", terminated=False, signum=None, expired=False)
        raise Ignore()
    lease_keeper.hold(run)
    failure: Failure | None = None
    trace: str | None = None
    value: Any = None
    try:
        value = body(run, **kwargs)
    except Exception as exc:
        failure = failure_of(exc)
        # What a composite task did before it failed (`workers.composite`); no other
        # exception's attribute (CalledProcessError has an ``output``) is ever stored.
        value = exc.partial_output if isinstance(exc, OperationFailed) else None
        if failure.result == VMTaskResult.UnexpectedError:
            trace = traceback.format_exc()
            run.log(f"unexpected error: {type(exc).__name__}: {exc}")
            log.exception("Task %s %s failed unexpectedly", task.name, task_id)
        else:
            log.warning("Task %s %s ended %s %s: %s", task.name, task_id, failure.result.name,
                        hresults.format_hresult(failure.hresult), failure.description)
    finally:
        lease_keeper.release(run)
    outcome = run.finish(failure, value)
    if outcome != "OK":
        # Judged crashed meanwhile: the record's FAILURE stands, and its judge sent
        # the event.  Celery must not announce a success the record does not hold.
        log.error("Task %s finished after its record became %s; result dropped",
                  task_id, outcome)
        raise Ignore()
    if failure is None:
        return value
    run.announce(failure, trace)
    # The failure is recorded and announced; Celery's own failure handling would
    # only add a traceback to an expected outcome.
    raise Ignore()


def operation(
    spec: TaskSpec, *, soft_time_limit: float | None = None
) -> Callable[[Callable[..., Any]], Task]:
    """Register ``body(run, **kwargs)`` as the Celery task of ``spec``.

    The body's keyword parameters must be exactly ``spec.params`` (those with a
    default exactly ``spec.optional``): producer and worker cannot drift apart.
    It is a shared task, bound to whichever app the worker builds, so importing an
    operation module never builds an app or reads settings.  Without its own
    ``soft_time_limit`` it gets the app's (``VMTASK_TIME_LIMIT_SECONDS``).

    ``spec.cancelable`` is what the producer records; the body honours it by
    polling ``run.cancel_requested()`` (or through an engine that does).
    """

    def register(body: Callable[..., Any]) -> Task:
        check_signature(spec, body)

        def run_task(self: Task, **kwargs: Any) -> Any:
            return execute(self, body, kwargs, spec)

        run_task.__name__ = body.__name__
        run_task.__doc__ = body.__doc__
        limits: dict[str, float] = {}
        if soft_time_limit is not None:
            # The hard limit kills a body that ignores the soft one; its lease then
            # lapses and it ends ThreadCrashError.
            limits = {"soft_time_limit": soft_time_limit, "time_limit": soft_time_limit + 30}
        task: Task = shared_task(
            name=spec.name,
            bind=True,
            # The task record is the result store; Celery's copy would be a second
            # write per task that nobody reads.  Flower follows task events instead.
            ignore_result=True,
            cancelable=spec.cancelable,
            **limits,
        )(run_task)
        return task

    return register


def check_signature(spec: TaskSpec, body: Callable[..., Any]) -> None:
    """`TypeError` at import when a body's parameters differ from its spec's."""
    parameters = list(inspect.signature(body).parameters.values())[1:]  # after ``run``
    names = tuple(p.name for p in parameters)
    optional = tuple(p.name for p in parameters if p.default is not inspect.Parameter.empty)
    if set(names) != set(spec.params) or set(optional) != set(spec.optional):
        raise TypeError(
            f"{body.__qualname__} takes {names} (defaults: {optional}); "
            f"the spec of {spec.name} says {spec.params} (optional: {spec.optional})"
        )
