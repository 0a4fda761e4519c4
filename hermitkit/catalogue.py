"""The model catalogue: what an endpoint (and the local provider) can run."""

from __future__ import annotations

from hermitkit.client import ModelInfo
from hermitkit.config import EndpointConfig
from hermitkit.providers import ProviderSet


async def list_all_models(base_url: str | None = None, *, api_key_env: str | None = None) -> list[ModelInfo]:
    """List the endpoint's models, plus local GGUF models when the local extra is installed."""
    endpoint = EndpointConfig(base_url=base_url, api_key_env=api_key_env) if base_url else EndpointConfig(api_key_env=api_key_env)
    providers = ProviderSet(endpoint, models=["endpoint"])
    async with providers:
        assert providers.client is not None
        infos = await providers.client.list_models()

    try:
        from hermitkit.local import local_models_available
    except ImportError:
        return infos
    return infos + local_models_available()
