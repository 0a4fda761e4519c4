"""Routing of model ids to the place that serves them.

``local/...`` ids run in-process through llama.cpp; every other id goes to the batch's
endpoint: OpenRouter by default, any OpenAI-compatible base URL, or hermitkit's offline
demo server (``endpoint: demo``), which is started on 127.0.0.1 for as long as the
provider set is open.
"""

from __future__ import annotations

import difflib
import logging
import os
from typing import Any

from hermitkit.client import OPENROUTER_BASE_URL, ChatProvider, ModelInfo, OpenAICompatibleClient
from hermitkit.config import EndpointConfig
from hermitkit.errors import ConfigError
from hermitkit.local import is_local_model

log = logging.getLogger("hermitkit.providers")


class ProviderSet:
    """The chat providers one batch needs, opened together and closed together.

    ``max_connections`` caps the HTTP connections to the endpoint; more concurrent
    requests than that wait for a free connection instead of failing.
    """

    def __init__(self, endpoint: EndpointConfig, *, models: list[str], max_connections: int = 64):
        self.endpoint = endpoint
        self.models = models
        self.max_connections = max_connections
        self.demo_server: Any = None
        self.client: OpenAICompatibleClient | None = None
        self.local: ChatProvider | None = None
        self.base_url = endpoint.base_url
        self._serves_demo_models = False

    async def __aenter__(self) -> ProviderSet:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self) -> None:
        if self.endpoint.is_demo:
            from hermitkit.demo import DemoServer

            self.demo_server = DemoServer().start()
            self.base_url = self.demo_server.base_url

        if any(not is_local_model(model) for model in self.models):
            key_env = self.endpoint.api_key_env
            if key_env and not os.environ.get(key_env):
                log.warning("api_key_env names %s, but that environment variable is not set: requests to %s go without a key.", key_env, self.base_url)
            self.client = OpenAICompatibleClient(
                self.base_url,
                api_key_env=self.endpoint.api_key_env,
                timeout_s=self.endpoint.timeout_s,
                max_retries=self.endpoint.max_retries,
                backoff_base_s=self.endpoint.backoff_base_s,
                backoff_max_s=self.endpoint.backoff_max_s,
                max_connections=self.max_connections,
            )

        local_models = [model for model in self.models if is_local_model(model)]
        if local_models:
            from hermitkit.local import LocalProvider

            self.local = LocalProvider(local_models)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        if self.local is not None:
            await self.local.aclose()
        if self.demo_server is not None:
            self.demo_server.stop()

    @property
    def is_demo(self) -> bool:
        """Whether the batch uses scripted demo models, on ``endpoint: demo`` or a standalone demo server."""
        return self.endpoint.is_demo or self._serves_demo_models

    def for_model(self, model: str) -> ChatProvider:
        if is_local_model(model):
            if self.local is None:
                raise ConfigError(f"Model {model!r} is a local model but the provider set was opened without it.")
            return self.local
        if self.client is None:
            raise ConfigError(f"Model {model!r} needs the endpoint {self.base_url}, which was not opened.")
        return self.client

    def require_key(self) -> None:
        """Fail before any request when the endpoint needs a key that is not set."""
        if self.client is not None:
            self.client.require_key()

    async def catalogue(self) -> dict[str, ModelInfo]:
        """Look up every model of the batch, raising ConfigError for unknown ids."""
        found: dict[str, ModelInfo] = {}

        if self.client is not None:
            listed = {info.id: info for info in await self.client.list_models()}
            for model in self.models:
                if is_local_model(model):
                    continue
                if model not in listed:
                    close = difflib.get_close_matches(model, list(listed), n=3, cutoff=0.5)
                    hint = f" Did you mean {', '.join(close)}?" if close else ""
                    endpoint = self.endpoint.base_url
                    option = "" if endpoint == OPENROUTER_BASE_URL else f" --endpoint {endpoint}"
                    raise ConfigError(
                        f"Model {model!r} is not in the model list of {endpoint}.{hint} "
                        f"Run `hermitkit models{option} --search TEXT` to find the exact id."
                    )
                found[model] = listed[model]

        if self.local is not None:
            for info in await self.local.list_models():
                if info.id in self.models:
                    found[info.id] = info

        self._serves_demo_models = any(info.is_demo for info in found.values())
        missing = [model for model in self.models if model not in found]
        if missing:
            raise ConfigError(f"Model(s) not found: {', '.join(missing)}. Run `hermitkit models` to list the available ids.")
        return found
