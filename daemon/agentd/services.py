"""What the daemon lends to running tasks (`ctx`) and plugin handlers: memory, mail,
outgoing webhooks and the LLM. One object, made by the daemon and shared by the worker
pool and the plugin manager; memory is filled in once it opens (after plugin startup)."""

from __future__ import annotations

from dataclasses import dataclass

from agentd.config import Config
from agentd.llm import LlmClient
from agentd.mail import Mailer
from agentd.memory import MemoryStore
from agentd.webhooks import WebhookPoster


@dataclass(slots=True)
class Services:
    """The daemon's outward-facing parts, as tasks and handlers reach them."""

    mailer: Mailer
    webhooks: WebhookPoster
    llm: LlmClient
    memory: MemoryStore | None = None

    @classmethod
    def from_config(cls, config: Config) -> Services:
        """Build them with the secrets `load_config` read.

        Raises:
            ConfigError: the `[webhooks]` secret is a `whsec_` secret that is not base64.
        """
        return cls(
            mailer=Mailer(config.mail, config.secrets.mail_password),
            webhooks=WebhookPoster.from_config(config),
            llm=LlmClient(config.llm, config.secrets.llm_key),
        )

    def reconfigure(self, config: Config) -> None:
        """Take `[mail]`, `[webhooks]` and `[llm]`, with their secrets, from `config` (a
        reload): the next delivery or request uses them, one under way finishes as it began.

        Raises:
            ValueError: the `[webhooks]` secret is a `whsec_` secret that is not base64
                (checked first: then nothing changed).
        """
        self.webhooks.reconfigure(config.webhooks, config.secrets.webhooks_secret)
        self.mailer.reconfigure(config.mail, config.secrets.mail_password)
        self.llm.reconfigure(config.llm, config.secrets.llm_key)

    async def close(self) -> None:
        """Close the HTTP sessions of the LLM and webhook clients."""
        await self.llm.close()
        await self.webhooks.close()
