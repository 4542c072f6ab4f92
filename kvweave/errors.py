"""The one error type every process shares: invalid input.

`InvalidRequestError` lives in the bottom layer because the router, the engine and the worker all
raise it for the same thing (a bad prompt, bad sampling parameters, bad segments), so the same
exception means 400 / INVALID_ARGUMENT whichever process found the problem. It is a ValueError so
that code validating plain values can raise it where a ValueError is expected.
"""
from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request's input or parameters are invalid; the message names the problem."""

    def __init__(self, message: str = "", param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        """The offending field, OpenAI style ("max_tokens", "messages[2].role"), where one is known."""
