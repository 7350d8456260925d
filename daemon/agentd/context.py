"""`Context`: what a running task receives as `ctx`: who it is, a logger, its plugin's
configuration, progress and other events (`progress`, `publish`, `token`), durable children
(`call`, `gather`, `submit`), memoized steps, durable waits (`sleep`, `sleep_until`,
`wait_for`, `ask`: see waits.py), and the daemon's services: memory, mail, outgoing
webhooks and the LLM (typed by the Protocols of protocols.py)."""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

import structlog

from agentd import protocols as api
from agentd.errors import TaskFailedError, WaitTimeoutError, describe
from agentd.events import Event, TopicPattern, check_event_data, check_publishable
from agentd.llm import TaskLlm
from agentd.log import get_logger
from agentd.mail import MailSender
from agentd.taskdef import encode_json
from agentd.taskqueue import LATEST_RUN_AT, TaskQueue, TaskRecord
from agentd.waits import Suspend, WaitRequest, Waits
from agentd.webhooks import WebhookSender

if TYPE_CHECKING:
    from agentd.services import Services
    from agentd.worker import Slots

_INFINITE = float("inf")
# The most failures `gather` names besides the one it raises (it counts them all).
_OTHERS_LOGGED = 10


class TaskInfo(NamedTuple):
    """Who the running task is."""

    id: int
    name: str
    attempt: int
    max_attempts: int
    queue: str
    parent_id: int | None
    correlation_id: str


class Context:
    """The running task's handle on the daemon. Created by the worker for each attempt.

    What is public here is what tasks use; the underscored rest is the worker's.
    """

    def __init__(self, record: TaskRecord, queue: TaskQueue, slots: Slots,
                 config: Mapping[str, Any], services: Services, *, waits: Waits,
                 token_budget: int = 0) -> None:
        self._task: TaskInfo | None = None
        self._config = config
        self._services = services
        self._token_budget = token_budget
        self._llm: TaskLlm | None = None
        self._submits: dict[str, int] = {}
        self._log: structlog.stdlib.BoundLogger | None = None
        self._record = record
        self._queue = queue
        self._slots = slots
        self._calls = 0
        self._waits = waits
        self._waits_made = 0  # numbers this attempt's durable waits, in call order
        self._waiting = 0
        self._closed = False
        self._holds_slot = True
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    @property
    def task(self) -> TaskInfo:
        """Who the running task is: id, name, attempt, max_attempts, queue, parent_id,
        correlation_id."""
        if self._task is None:  # built on first use: a no-op task never asks
            record = self._record
            self._task = TaskInfo(record.id, record.name, record.attempts, record.max_attempts,
                                  record.queue, record.parent_id, record.correlation_id)
        return self._task

    @property
    def log(self) -> structlog.stdlib.BoundLogger:
        """A logger bound to this task's id, name and attempt."""
        if self._log is None:  # built on first use: binding costs more than a no-op task
            self._log = get_logger(
                "task", task_id=self.task.id, task=self.task.name, attempt=self.task.attempt)
        return self._log

    @property
    def config(self) -> Mapping[str, Any]:
        """The `[plugins.<name>]` table of the task's plugin (read-only; empty for none)."""
        return self._config

    @property
    def memory(self) -> api.MemoryStore:
        """Short-term sessions (`ctx.memory.session(id)`) and long-term memory
        (`remember`, `recall`, `get`, `update`, `forget`)."""
        if self._services.memory is None:
            raise RuntimeError("memory is not available to this task")
        return self._services.memory

    @property
    def mail(self) -> api.Mail:
        """`await ctx.mail.send(to, subject, text, html=None)`: a durable child task per
        mail, keyed so that a retried task does not send it again."""
        return MailSender(self._services.mailer, self._submit_keyed)

    @property
    def webhook(self) -> api.Webhook:
        """`await ctx.webhook.post(url, json)`: a signed POST as a durable child task,
        keyed so that a retried task does not post it again."""
        return WebhookSender(self._submit_keyed)

    @property
    def llm(self) -> api.Llm:
        """`await ctx.llm.chat(messages, model=, tools=, stream=True)`: tokens stream to the
        task's SSE/WebSocket clients, usage is counted, the token budget enforced."""
        if self._llm is None:
            self._llm = TaskLlm(self._services.llm, self._queue, self._record, self._token_budget,
                                self.token)
        return self._llm

    def progress(self, kind: str, data: Mapping[str, Any] | None = None) -> None:
        """Publish `task.progress` with this kind and data, for the task's stream clients.
        Safe from a sync task's thread.

        Raises:
            TypeError, ValueError: `data` is not a mapping, or nests too deep (as `publish`).
        """
        self._publish_task_event("task.progress", kind=kind, data=check_event_data(data),
                                 attempt=self.task.attempt)

    def publish(self, topic: str, data: Mapping[str, Any] | None = None) -> Event:
        """Publish an event of this task's correlation (not a daemon topic: `task.*`...).
        From a sync task's thread it is published on the loop, and this returns once it is.

        Raises:
            PatternError: (a ValueError) the topic is malformed or reserved.
            TypeError: `data` is not a mapping.
            ValueError: `data` nests more than 32 deep, or contains itself.
        """
        topic, checked = check_publishable(topic), check_event_data(data)
        if threading.get_ident() == self._loop_thread:
            return self._publish(topic, checked)

        # The bus and its subscribers (the event log, handlers, streams) belong to the loop:
        # called from the thread, each failed or ran there unguarded.
        async def on_loop() -> Event:
            return self._publish(topic, checked)

        return asyncio.run_coroutine_threadsafe(on_loop(), self._loop).result()

    def _publish(self, topic: str, data: Mapping[str, Any]) -> Event:
        return self._queue.bus.publish(topic, data, correlation_id=self.task.correlation_id,
                                       causation_id=str(self.task.id))

    def token(self, text: str) -> None:
        """Publish a `task.token` event: text as it is produced, for the task's stream
        clients (`ctx.llm` does this for every streamed token; agents that write their own
        text can stream it the same way). Safe from a sync task's thread."""
        self._publish_task_event("task.token", text=text)

    def _publish_task_event(self, topic: str, **data: Any) -> None:
        # Sync tasks run in a thread; the bus belongs to the loop.
        if threading.get_ident() == self._loop_thread:
            self._queue.publish(topic, self._record, **data)
        else:
            self._loop.call_soon_threadsafe(lambda: self._queue.publish(topic, self._record, **data))

    def call(self, name: str, /, **args: Any) -> Awaitable[Any]:
        """Run task `name` as a durable child and return (an awaitable of) its result.

        The child's idempotency key is `<this task's id>:<call number>`, numbered in the
        order of `call()`s, so a retried parent gets the same children back instead of
        running them again. A child that ends failed, dead or cancelled raises
        TaskFailedError here. While it waits, this task gives its worker slot back.
        """
        self._calls += 1
        key = f"{self.task.id}:{self._calls}"
        return self._call(key, name, args)

    async def _call(self, key: str, name: str, args: dict[str, Any]) -> Any:
        child = await self._queue.enqueue(
            name, args, idempotency_key=key, parent_id=self.task.id,
            correlation_id=self.task.correlation_id, dedupe_window=_INFINITE)
        async with self._slot_given_back():
            final = await self._queue.wait(child.id)
        if final.status != "succeeded":
            raise TaskFailedError(final.id, final.name, final.status, final.error)
        return final.result

    async def submit(self, name: str, args: Mapping[str, Any] | None = None, *,
                     queue: str | None = None, priority: int | None = None,
                     delay: float | None = None, run_at: float | None = None,
                     idempotency_key: str | None = None, max_attempts: int | None = None,
                     timeout: float | None = None) -> api.TaskRecord:
        """Enqueue task `name` as a durable child and return it without waiting.

        Its idempotency key is `<this task's id>:<name>:<n>`, numbered per name in the
        order of `submit()`s and kept for good, so a retried parent gets its earlier
        children back instead of enqueueing them again. An `idempotency_key` of the
        caller's own is kept like any other: `[tasks] idempotency_window`.

        The options are a plugin's `PluginContext.submit`'s, keyword-only; None takes the
        task's declaration, then the `[tasks]` default:

            queue            the queue that runs it (a configured one)
            priority         higher runs first
            delay            seconds from now before it is due (not with run_at)
            run_at           the Unix time it is due (not with delay; default: now)
            idempotency_key  enqueueing the same key returns the same task
            max_attempts     attempts before it is dead
            timeout          seconds an attempt may run

        Raises:
            UnknownTaskError: no task is registered under `name`.
            InvalidTaskError: (a ValueError) an argument or option is wrong; the message
                names it.
        """
        window: float | None = None  # the caller's key: it lasts `[tasks] idempotency_window`
        if idempotency_key is None:
            idempotency_key, window = self._next_submit_key(name), _INFINITE
        return await self._queue.enqueue(
            name, args or {}, queue=queue, priority=priority, delay=delay, run_at=run_at,
            idempotency_key=idempotency_key, max_attempts=max_attempts, timeout=timeout,
            parent_id=self.task.id, correlation_id=self.task.correlation_id, dedupe_window=window)

    def _next_submit_key(self, name: str) -> str:
        """The key of this task's next submit of `name`: `<task id>:<name>:<n>`."""
        self._submits[name] = self._submits.get(name, 0) + 1
        return f"{self.task.id}:{name}:{self._submits[name]}"

    async def _submit_keyed(self, name: str, args: Mapping[str, Any], key: str | None) -> TaskRecord:
        """Enqueue a child under a key made from this task's id (by this task's `n`th
        submit of `name` when `key` is None), kept for good: a retry finds its children."""
        return await self._queue.enqueue(
            name, args, idempotency_key=self._next_submit_key(name) if key is None else key,
            parent_id=self.task.id,
            correlation_id=self.task.correlation_id, dedupe_window=_INFINITE)

    async def gather(self, *calls: Awaitable[Any]) -> list[Any]:
        """Await several `call()`s at once; results in order. If one fails, its failure is
        raised, as `asyncio.gather` raises the first, and the others are no longer awaited
        (the children themselves keep their own lifecycle); the others that had failed too
        are logged, not dropped: one `task.gather_failed_too` line, their `count` and the
        first ten `errors`."""
        futures: list[asyncio.Future[Any]] = []
        try:
            for call in calls:
                futures.append(asyncio.ensure_future(call))
            return list(await asyncio.gather(*futures))
        except BaseException as exc:
            for call in calls[len(futures):]:  # after one that is no awaitable: never started
                if inspect.iscoroutine(call):
                    call.close()
            for future in futures:
                future.cancel()
            others = [describe(outcome)
                      for outcome in await asyncio.gather(*futures, return_exceptions=True)
                      if isinstance(outcome, Exception) and outcome is not exc]
            if others:  # one line per gather, however many of its calls failed together
                self.log.warning("task.gather_failed_too", count=len(others),
                                 errors=others[:_OTHERS_LOGGED])
            if not isinstance(exc, asyncio.CancelledError) and not self._holds_slot and not self._closed:
                # The calls cancelled here took no slot back (they leave as cancelled waits
                # do); the parent goes on, with its slot.
                await self._slots.retake()
                self._holds_slot = True
            raise

    async def step(self, key: str, fn: Callable[[], Any]) -> Any:
        """Run `fn()` (sync or async) once for this task: its JSON result is stored, and a
        retried attempt gets the stored result back instead of running `fn` again.

        Raises:
            ValueError: `key` holds U+0000 (NUL), which PostgreSQL's text cannot, so
                neither store takes it.
        """
        if isinstance(key, str) and "\x00" in key:
            raise ValueError(f"step key {key!r} holds U+0000 (NUL), which the store cannot keep")
        stored = await self._queue.steps.recorded(self.task.id, key)
        if stored is not None:
            return json.loads(stored)
        value = fn()
        if inspect.isawaitable(value):
            value = await value
        encoded = encode_json(value, f"the result of step {key!r}")
        await self._queue.steps.record(self.task.id, key, encoded)
        # What a retry will read back: the JSON round trip (a tuple becomes a list, int keys
        # strings), so that every attempt sees the same value.
        return value if isinstance(value, str | int | bool | None) else json.loads(encoded)

    # -- durable waits (waits.py) -----------------------------------------------------------

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` durably: the attempt ends, and the task waits (state `waiting`, no
        worker slot, lease or coroutine) until the time comes; then it runs again from the
        top, and this returns at once. A restart in between changes nothing.

        Raises:
            ValueError: `seconds` is no finite number.
        """
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds):
            raise ValueError(f"seconds must be a finite number, got {seconds!r}")
        await self.sleep_until(time.time() + max(0.0, seconds))

    async def sleep_until(self, when: float) -> None:
        """Wait durably until the Unix time `when` (as `sleep`); a time past returns at once
        the first time too.

        Raises:
            ValueError: `when` is no Unix time before 2100-01-01.
        """
        wake_at = _unix_time("when", when)
        seq = self._next_wait()
        stored = await self._waits.store.recorded(self.task.id, seq)
        if stored is not None and stored.resolved:
            return
        if stored is None and wake_at <= time.time():
            return  # nothing to wait for: not written, and every replay comes here too
        raise Suspend(stored.request if stored is not None else WaitRequest(seq, "sleep", wake_at))

    async def wait_for(self, pattern: str, match: Mapping[str, Any] | None = None, *,
                       timeout: float | None = None) -> Event:
        """Wait durably (as `sleep`) for an event whose topic matches `pattern` (`*` one
        segment, `**` any number) and whose data has every field of `match` with its value,
        published from anywhere: the API, a plugin, an inbound webhook, another task. An
        event published after this is called is not missed, even before the task's
        `waiting` state is written. Returns the event.

        Raises:
            WaitTimeoutError: (a TimeoutError) no such event came within `timeout` s.
            PatternError: `pattern` is malformed.
            ValueError: `match` or `timeout` is wrong; the message names it.
        """
        topic = TopicPattern.parse(pattern).text
        fields = dict(check_event_data(match))
        encode_json(fields, "match")
        seq = self._next_wait()
        request = WaitRequest(seq, "event", self._timeout_at(timeout), topic, fields or None)
        # Indexed before anything is awaited: an event published from now on is caught.
        self._waits.expect(self.task.id, request)
        stored = await self._waits.store.recorded(self.task.id, seq)
        if stored is not None and stored.resolved:
            self._waits.forget(self.task.id, seq)
            if stored.timed_out or stored.outcome is None:
                raise WaitTimeoutError(seq, f"no event matching {stored.request.topic!r} came")
            return Event(**json.loads(stored.outcome))
        if stored is not None:  # asked before (its task requeued by hand): as it was asked
            request = stored.request
            self._waits.expect(self.task.id, request)
        raise Suspend(request)

    async def ask(self, prompt: str, data: Mapping[str, Any] | None = None, *,
                  timeout: float | None = None) -> Any:
        """Ask a person and wait durably (as `sleep`) for the answer: the question is listed
        (`GET /v1/approvals`, the task's `waiting_for`), published as `task.waiting`, and
        answered with `POST /v1/tasks/{id}/answer` (or `agentd tasks answer ID ANSWER`).
        Returns the answer (any JSON value); each question is answered once.

        Raises:
            WaitTimeoutError: (a TimeoutError) nobody answered within `timeout` s.
            ValueError: `prompt`, `data` or `timeout` is wrong; the message names it.
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        if "\x00" in prompt:  # PostgreSQL's text cannot keep it: neither store takes it
            raise ValueError(f"prompt {prompt!r} holds U+0000 (NUL), which the store cannot keep")
        shown = dict(check_event_data(data))
        encode_json(shown, "the data of a question")
        wake_at = self._timeout_at(timeout)
        seq = self._next_wait()
        stored = await self._waits.store.recorded(self.task.id, seq)
        if stored is not None and stored.resolved:
            if stored.timed_out or stored.outcome is None:
                raise WaitTimeoutError(seq, f"nobody answered {stored.request.prompt!r}")
            return json.loads(stored.outcome)
        raise Suspend(stored.request if stored is not None else WaitRequest(
            seq, "ask", wake_at, prompt=prompt, data=shown))

    def _next_wait(self) -> int:
        self._waits_made += 1
        return self._waits_made

    @staticmethod
    def _timeout_at(timeout: float | None) -> float | None:
        """When a wait of `timeout` s asked now times out (None: never)."""
        if timeout is None:
            return None
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        return _unix_time("timeout", time.time() + timeout)

    def _close(self) -> None:
        """Called by the worker when the attempt is over: orphaned waits take no slot back."""
        self._closed = True

    @asynccontextmanager
    async def _slot_given_back(self) -> AsyncIterator[None]:
        self._waiting += 1
        if self._waiting == 1 and self._holds_slot:
            self._holds_slot = False
            self._slots.release()
        cancelled = False
        try:
            yield
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            self._waiting -= 1
            if self._waiting == 0 and not self._holds_slot and not self._closed:
                if cancelled:
                    # The task is being cancelled or timed out: waiting for a slot here
                    # would hold that up until some other task ends. A task that catches
                    # it and goes on runs without one until its next call.
                    self._holds_slot = self._slots.take_if_free()
                else:
                    await self._slots.retake()
                    self._holds_slot = True


def _unix_time(name: str, when: object) -> float:
    """`when` as a wake time, or ValueError naming `name`."""
    if isinstance(when, bool) or not isinstance(when, int | float) or not 0 <= when <= LATEST_RUN_AT:
        raise ValueError(f"{name} must be a Unix time before 2100-01-01, got {when!r}")
    return float(when)
