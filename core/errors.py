"""Errors every package raises on purpose and the views answer alike: not found (404), fields refused (422)."""

from __future__ import annotations


class RebillError(Exception):
    """Base of every error Rebill raises on purpose."""


class NotFound(RebillError):
    """The thing does not exist for this agency (other agencies' ids and deleted rows included)."""


class ClientInvalid(RebillError):
    """Fields of a request were refused; ``errors`` maps each refused field to a message (HTTP 422)."""

    def __init__(self, errors: dict[str, str]):
        self.errors = dict(errors)
        super().__init__("; ".join(f"{field}: {message}" for field, message in self.errors.items()))
