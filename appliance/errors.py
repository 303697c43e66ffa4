"""Errors raised by the appliance. All derive from `AirlockError` (message + hint)."""

from __future__ import annotations

from bundler.errors import AirlockError

__all__ = ["AirlockError", "CatalogError", "ModelNotFoundError"]


class CatalogError(AirlockError):
    """The catalog database cannot be opened, migrated or written."""


class ModelNotFoundError(AirlockError):
    """A base model name or path does not resolve to a local model directory."""
