"""Identifier bounds (kvweave/limits.py) and the SDK's checks of them before a request is sent."""
from __future__ import annotations

import pytest

import kvweave
from kvweave.client_types import build_request
from kvweave.errors import InvalidRequestError
from kvweave.limits import MAX_ID_CHARS, check_id


def test_identifiers_up_to_the_limit_of_printable_characters_pass():
    for value in ("", "acme", "tenant with spaces", "é" * MAX_ID_CHARS):
        assert check_id("tenant", value) == value


@pytest.mark.parametrize("value, problem", [
    ("x" * (MAX_ID_CHARS + 1), "at most 256"),
    ("a\nb", "printable characters only"),
    ("tab\there", "printable characters only"),
    ("\x00", "printable characters only"),
    ("\ud800", "printable characters only"),  # a lone surrogate
    (42, "must be a string"),
])
def test_bad_identifiers_name_the_field_and_do_not_echo_the_value(value, problem):
    with pytest.raises(InvalidRequestError) as info:
        check_id("session_id", value)
    message = str(info.value)
    assert message.startswith("'session_id'") and problem in message
    assert not isinstance(value, str) or value not in message or value == ""


def test_required_identifiers_must_be_given():
    for value in (None, ""):
        with pytest.raises(InvalidRequestError):
            check_id("tenant", value, required=True)


@pytest.mark.parametrize("field", ["tenant", "session_id", "request_id"])
def test_sdk_refuses_bad_identifiers_before_sending(field):
    fields = {"session_id": None, "tenant": None, "request_id": None} | {field: "x" * 300}
    with pytest.raises(kvweave.InvalidRequest) as info:
        build_request(prompt="hi", messages=None, token_ids=None, segments=None, sampling={}, model=None, **fields)
    assert f"'{field}'" in info.value.message and "x" * 300 not in info.value.message
