"""Errors of the inference server.

    AirlockError (appliance.errors)
    ├── ServeError        the server cannot start or load a model (CLI: one `error:` line + `hint:`)
    └── ApiKeyError       an API key name is unknown, taken, or already revoked (`airlock keys`)

    RequestRefused        one HTTP request is refused: status, a short machine code, one line for the
                          client, and Retry-After where waiting helps. Never quotes request contents.
"""

from __future__ import annotations

from appliance.errors import AirlockError


class ServeError(AirlockError):
    """The server cannot start, or cannot load the model it was asked to serve."""


class ApiKeyError(AirlockError):
    """An API key cannot be created, found or revoked as asked."""


class RequestRefused(Exception):
    """An HTTP request the server answers with an error status (4xx/5xx) instead of a result."""

    def __init__(self, status: int, code: str, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s
