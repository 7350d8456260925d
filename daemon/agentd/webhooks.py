"""Outgoing webhooks. `ctx.webhook.post(url, json)` enqueues the durable task
`agentd.post_webhook`, which POSTs the JSON body with the queue's retries.

Each request carries `X-Agentd-Signature: sha256=<hex>`, the HMAC-SHA256 of the exact body
bytes under `[webhooks] secret` (the scheme inbound `/hooks/<name>` checks, so two agentd
daemons can talk to each other), and `X-Agentd-Delivery: <task id>` / `Idempotency-Key`,
the same on every attempt, for receivers to drop repeats. 2xx is delivered; 408, 425,
429 and 5xx are retried (after `Retry-After` seconds when the receiver says); any other
answer fails the task.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp

from agentd.config import WebhooksConfig
from agentd.errors import Fail, InvalidTaskError, Retry
from agentd.taskdef import TaskDef, TaskRegistry
from agentd.taskqueue import Enqueue, TaskRecord

if TYPE_CHECKING:
    from agentd.context import Context

POST_WEBHOOK_TASK = "agentd.post_webhook"
SIGNATURE_HEADER = "X-Agentd-Signature"
DELIVERY_HEADER = "X-Agentd-Delivery"
_RETRY_STATUSES = frozenset({408, 425, 429})

def sign(secret: bytes, body: bytes) -> str:
    """The signature header's value for `body`: `sha256=<hex HMAC-SHA256>`."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class WebhookPoster:
    """Delivers webhooks: the `agentd.post_webhook` task and its HTTP session."""

    def __init__(self, config: WebhooksConfig, secret: str) -> None:
        self.config = config
        self._secret = secret.encode()
        self._session: aiohttp.ClientSession | None = None

    def register(self, registry: TaskRegistry, queue: str) -> None:
        registry.add(TaskDef(name=POST_WEBHOOK_TASK, fn=self._deliver_task, queue=queue, max_attempts=8))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _deliver_task(self, ctx: Context, url: str, body: Any) -> dict[str, Any]:
        check_url(url)  # submitted by hand it may be unchecked
        return await self.deliver(url, body, ctx.task.id)

    async def deliver(self, url: str, body: Any, delivery_id: int) -> dict[str, Any]:
        """POST `body` as JSON to `url` once; return the receiver's status.

        Raises:
            Retry: 408/425/429 and 5xx (after Retry-After when given, else the backoff).
            Fail: another 4xx, or a 3xx: the receiver will not take it.
            aiohttp.ClientError, TimeoutError: worth another attempt.
        """
        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        headers = {"Content-Type": "application/json", DELIVERY_HEADER: str(delivery_id),
                   "Idempotency-Key": f"agentd-webhook-{delivery_id}",
                   "User-Agent": "agentd-webhook"}
        if self._secret:
            headers[SIGNATURE_HEADER] = sign(self._secret, payload)
        async with self._client().post(url, data=payload, headers=headers, allow_redirects=False) as response:
            status = response.status
            if 200 <= status < 300:
                return {"status": status, "url": url}
            detail = f"{url} answered {status}: {(await response.text())[:300]}"
            if status in _RETRY_STATUSES or status >= 500:
                raise Retry.after(response.headers.get("Retry-After"), detail)
            raise Fail(detail)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.timeout))
        return self._session


class WebhookSender:
    """`ctx.webhook` (in tasks) and `PluginContext.webhook` (in handlers)."""

    def __init__(self, enqueue: Enqueue) -> None:
        self._enqueue = enqueue

    async def post(self, url: str, json: Any, *, idempotency_key: str | None = None) -> TaskRecord:
        """Check the URL and the body and enqueue the delivery; return its task.

        In a task, the key defaults to one numbered per task, so a retried task does not
        post again.

        Raises:
            InvalidTaskError: (a ValueError) the URL is not http(s) or the body is not JSON.
        """
        check_url(url)
        return await self._enqueue(POST_WEBHOOK_TASK, {"url": url, "body": json}, idempotency_key)


def check_url(url: str) -> None:
    """Raise InvalidTaskError (a ValueError: in a task it fails the task at once) unless
    `url` is an absolute http(s) URL."""
    try:
        parts = urlsplit(url) if isinstance(url, str) else None
        usable = (parts is not None and parts.scheme in ("http", "https") and bool(parts.hostname)
                  and (parts.port is None or parts.port > 0))
    except ValueError:  # a malformed IPv6 host, a port out of range: no use retrying either
        usable = False
    if not usable:
        raise InvalidTaskError(f"url: expected an absolute http:// or https:// URL, got {url!r}")
