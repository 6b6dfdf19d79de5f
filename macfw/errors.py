"""Errors for values a user configured (Gin bindings)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configurable got a value outside its allowed range; the message names the binding, the value
    received and the range."""
