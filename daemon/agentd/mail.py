"""Outgoing mail. `ctx.mail.send(...)` checks the message and enqueues the durable task
`agentd.send_mail`, which delivers it over SMTP (aiosmtplib) with the queue's retries.

A send from a task is a child task with an idempotency key numbered per task, so a
retried agent gets its earlier send back instead of mailing twice. The Message-ID is made
from the mail task's id: should a delivery succeed but its result be lost (a crash between
the SMTP server's 250 and the commit), the repeat carries the same Message-ID, which mail
systems use to drop duplicates.
"""

from __future__ import annotations

import email.utils
from collections.abc import Mapping, Sequence
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any

import aiosmtplib

from agentd.config import MailConfig
from agentd.errors import Fail, InvalidTaskError
from agentd.specs import check_mail_subject, mail_recipients
from agentd.taskdef import TaskDef, TaskRegistry
from agentd.taskqueue import Enqueue, TaskRecord

if TYPE_CHECKING:
    from agentd.context import Context

SEND_MAIL_TASK = "agentd.send_mail"

class MailUnavailableError(Fail):
    """No mail server is configured (`[mail] host` is empty)."""


class Mailer:
    """The configured SMTP server, and the task that delivers through it."""

    def __init__(self, config: MailConfig, password: str) -> None:
        self.config = config
        self._password = password

    def reconfigure(self, config: MailConfig, password: str) -> None:
        """Use `config` and `password` from the next delivery on (a reload)."""
        self.config, self._password = config, password

    @property
    def enabled(self) -> bool:
        return bool(self.config.host)

    def register(self, registry: TaskRegistry, queue: str) -> None:
        """Add the `agentd.send_mail` task (retried like any task; 5xx answers fail it)."""
        registry.add(TaskDef(name=SEND_MAIL_TASK, fn=self._deliver_task, queue=queue, max_attempts=5))

    async def _deliver_task(self, ctx: Context, to: list[str], subject: str, text: str,
                            html: str | None = None) -> dict[str, Any]:
        args = message_args(to, subject, text, html)  # submitted by hand it may be unchecked
        sent = await self.deliver(args, f"task-{ctx.task.id}")
        if sent["try_later"]:
            # Refused for now ("451 try later") while the others took it: only they are tried
            # again, as a child of this send, so nobody gets the mail twice.
            retry = await ctx.submit(SEND_MAIL_TASK, {**args, "to": sent["try_later"]},
                                     idempotency_key=f"{ctx.task.id}:try-later")
            sent["retry_task_id"] = retry.id
        return sent

    async def deliver(self, args: Mapping[str, Any], mail_id: str) -> dict[str, Any]:
        """Send one message now; return its Message-ID, its recipients, those refused for
        good (`refused`, 5xx) and those refused for now (`try_later`, 4xx).

        Raises:
            MailUnavailableError: mail is not configured.
            Fail: the server refused for good (a 5xx answer: bad recipient, bad login).
            aiosmtplib.SMTPException, OSError: anything worth another attempt.
        """
        if not self.enabled:
            raise MailUnavailableError("mail is off: set [mail] host in agentd.toml")
        message = self.build(args, mail_id)
        security = self.config.security
        try:
            refused, _ = await aiosmtplib.send(
                message, hostname=self.config.host, port=self.config.port,
                username=self.config.user or None, password=self._password or None,
                use_tls=security == "tls", start_tls=security == "starttls",
                timeout=self.config.timeout)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            if all(refusal.code >= 500 for refusal in exc.recipients):
                raise Fail(f"every recipient was refused: {exc}") from exc
            raise  # a 4xx among them ("try later"): another attempt may get through
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code >= 500:
                raise Fail(f"the mail server refused the message: {exc.code} {exc.message}") from exc
            raise
        return {"message_id": message["Message-ID"], "to": args["to"],
                "refused": sorted(a for a, answer in refused.items() if answer.code >= 500),
                "try_later": sorted(a for a, answer in refused.items() if answer.code < 500)}

    def build(self, args: Mapping[str, Any], mail_id: str) -> EmailMessage:
        """The message for `args` (from `message_args`); its Message-ID depends only on
        `mail_id`, so every attempt sends the same message."""
        message = EmailMessage()
        message["From"] = self.config.sender
        message["To"] = ", ".join(args["to"])
        message["Subject"] = args["subject"]
        message["Date"] = email.utils.formatdate(localtime=False)
        domain = self.config.sender.rpartition("@")[2] or "agentd.invalid"
        message["Message-ID"] = f"<agentd-{mail_id}@{domain}>"
        message.set_content(args["text"])
        if args.get("html"):
            message.add_alternative(args["html"], subtype="html")
        return message


class MailSender:
    """`ctx.mail` (in tasks) and `PluginContext.mail` (in handlers): sends as durable tasks."""

    def __init__(self, mailer: Mailer, enqueue: Enqueue) -> None:
        self._mailer = mailer
        self._enqueue = enqueue

    @property
    def enabled(self) -> bool:
        """Whether `[mail]` names a server; without one, `send` raises MailUnavailableError."""
        return self._mailer.enabled

    async def send(self, to: str | Sequence[str], subject: str, text: str, html: str | None = None,
                   *, idempotency_key: str | None = None) -> TaskRecord:
        """Check the message and enqueue its delivery; return the `agentd.send_mail` task.

        In a task, the key defaults to one numbered per task, so a retried task does not
        send again; pass your own to deduplicate across tasks (e.g. a digest's range).

        Raises:
            MailUnavailableError: mail is not configured.
            InvalidTaskError: (a ValueError) an address, the subject or the body is malformed.
        """
        if not self.enabled:
            raise MailUnavailableError("mail is off: set [mail] host in agentd.toml")
        return await self._enqueue(SEND_MAIL_TASK, message_args(to, subject, text, html), idempotency_key)

    def check(self, to: str | Sequence[str], subject: str = "", text: str = "",
              html: str | None = None) -> None:
        """Raise InvalidTaskError (a ValueError) for what `send` would refuse, sending
        nothing: a task finds a bad address before the work whose result it would mail."""
        message_args(to, subject, text, html)


def message_args(to: str | Sequence[str], subject: str, text: str, html: str | None) -> dict[str, Any]:
    """The `agentd.send_mail` arguments, checked.

    Raises:
        InvalidTaskError: (a ValueError) naming the field that is wrong; raised in a task it
            fails the task at once, since no retry can fix it.
    """
    recipients = mail_recipients(to)
    check_mail_subject(subject)
    if not isinstance(text, str):
        raise InvalidTaskError("text must be a string")
    if html is not None and not isinstance(html, str):
        raise InvalidTaskError("html must be a string")
    return {"to": recipients, "subject": subject, "text": text, "html": html}
