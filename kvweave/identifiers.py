"""Bounds of the identifiers a request carries (tenant, session id, request id, OpenAI's `user`).

They are checked where they enter (the router's HTTP and gRPC frontends, the SDK), because the
router keeps state per identifier (in-flight ids, per-tenant hash salts): at most
MAX_IDENTIFIER_LENGTH characters, all printable (no control characters, newlines or tabs, which
would also forge log lines). The error names the field and never echoes the value.
"""
from __future__ import annotations

from kvweave.errors import InvalidRequestError

MAX_IDENTIFIER_LENGTH = 256
"""Most characters of a tenant, session id, request id or `user`."""


def check_identifier(name: str, value, required: bool = False) -> str:
    """`value` if it is a valid identifier (empty allowed unless `required`); else
    InvalidRequestError naming `name`."""
    if value is None and required:
        raise InvalidRequestError(f"'{name}' is required")
    if not isinstance(value, str):
        raise InvalidRequestError(f"'{name}' must be a string")
    if required and not value:
        raise InvalidRequestError(f"'{name}' must not be empty")
    if len(value) > MAX_IDENTIFIER_LENGTH:
        raise InvalidRequestError(f"'{name}' is longer than {MAX_IDENTIFIER_LENGTH} characters")
    if not value.isprintable():
        raise InvalidRequestError(f"'{name}' must hold printable characters only")
    return value
