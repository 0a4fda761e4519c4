"""Exceptions raised by hermitkit.

Every message names the value at fault and what to do about it. None of them ever
contains an API key: clients build messages from status codes, URLs and provider error
text, never from request headers.
"""

from __future__ import annotations

from datetime import datetime


class HermitkitError(Exception):
    """Base class for errors that hermitkit reports to users."""


class ConfigError(HermitkitError, ValueError):
    """A batch config, params file, protocol file or argument is invalid."""


class ProviderError(HermitkitError):
    """A chat or model-list request failed after the retries allowed for it.

    ``status`` is the HTTP status (``None`` for network errors and timeouts) and
    ``retryable`` tells whether the failure was of a kind that is retried.
    """

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False):
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class BadRequestError(ProviderError):
    """HTTP 400: the provider rejected the request itself. Not retried."""


class AuthenticationError(ProviderError):
    """HTTP 401: the API key is missing or invalid. Stops the whole batch."""


class InsufficientCreditsError(ProviderError):
    """HTTP 402: the account has no credit left. Stops the whole batch."""


class PermissionDeniedError(ProviderError):
    """HTTP 403: the key may not use this model (moderation, region, allow-list)."""


class ContextLengthError(BadRequestError):
    """The conversation no longer fits the model's context window.

    The runner ends the run with status ``context_exhausted``: a result, not a crash.
    """


class BudgetExhaustedError(HermitkitError):
    """The batch's cost budget is spent, so no new request may be sent."""


class StoreError(HermitkitError):
    """The database could not be opened, migrated or written."""


class BatchBusyError(HermitkitError):
    """Another live process holds the batch's lease, so this one must not send its requests.

    ``host``, ``pid`` and ``expires_at`` (UTC) describe the process that holds the lease.
    """

    def __init__(self, message: str, *, host: str | None = None, pid: int | None = None, expires_at: datetime | None = None):
        super().__init__(message)
        self.host = host
        self.pid = pid
        self.expires_at = expires_at
