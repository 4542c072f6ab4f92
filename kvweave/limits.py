"""Input limits: what one request may carry, checked where it enters and before any costly work.

A prompt's size is bounded before it is tokenized: tokenizing costs time in proportion to the text
(a 3.9 MB prompt took 4.3 s of router CPU before the context check refused it), and no text longer
than `max_model_len * MAX_BYTES_PER_TOKEN` UTF-8 bytes can fit the context: real text averages 3 to
5 bytes per token, and even runs of whitespace or repeated symbols stay far below 64. The same bound
applies to the sum of a chat's message contents and of a prompt's segments, and a prompt may not have
more messages, segments or token ids than the context has tokens (each takes at least one). Ids that
name a request, a session, a tenant or an OpenAI `user` are at most MAX_ID_CHARS printable characters
(the router keeps state per id), and a chat message's role
is one of CHAT_ROLES.

These are torch-free checks in the shared bottom layer: the router's frontends, the worker's
service, the engine and the SDK all apply them.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvweave.errors import InvalidRequestError

MAX_BYTES_PER_TOKEN = 64
"""Generous bound on the UTF-8 bytes one token of text stands for (real text: 3 to 5)."""
MAX_ID_CHARS = 256
"""Longest request id, session id or tenant name."""
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
"""The roles a chat message may have (OpenAI's; the chat templates we load render each of them)."""


def max_prompt_bytes(max_model_len: int) -> int:
    """The most UTF-8 bytes of prompt text a model with this context length accepts."""
    return max_model_len * MAX_BYTES_PER_TOKEN


def check_prompt_size(max_model_len: int, prompt: Any = None, messages: Any = None, segments: Any = None) -> None:
    """InvalidRequestError when the prompt cannot fit `max_model_len` tokens whatever its tokenization:
    its text (a string prompt, the message contents, the segment texts) is over `max_prompt_bytes`,
    or it has more token ids, messages or segments than the context has tokens. Malformed values are
    left to the validation that follows (they count as empty here)."""
    limit = max_prompt_bytes(max_model_len)
    if isinstance(prompt, str):
        _check_bytes("prompt", _utf8_len(prompt, limit), limit, max_model_len)
    elif isinstance(prompt, (list, tuple)) and len(prompt) > max_model_len:
        raise InvalidRequestError(f"prompt has {len(prompt)} token ids, more than the context length {max_model_len}",
                                  "prompt")
    if isinstance(messages, (list, tuple)):
        _check_count("messages", len(messages), max_model_len)
        total = sum(_utf8_len(text, limit) for m in messages for text in _message_texts(m))
        _check_bytes("messages", total, limit, max_model_len)
    if isinstance(segments, (list, tuple)):
        _check_count("segments", len(segments), max_model_len)
        total = sum(_utf8_len(s[0], limit) for s in segments if isinstance(s, (list, tuple)) and s
                    and isinstance(s[0], str))
        _check_bytes("segments", total, limit, max_model_len)


def check_id(name: str, value: Any, required: bool = False) -> str:
    """`value` when it is a string of at most MAX_ID_CHARS printable characters (empty allowed unless
    `required`); else InvalidRequestError naming `name` (the value is never echoed). Printable only:
    no control characters, newlines or tabs, which would also forge log lines."""
    if value is None and required:
        raise InvalidRequestError(f"'{name}' is required", name)
    if not isinstance(value, str):
        raise InvalidRequestError(f"'{name}' must be a string, got {type(value).__name__}", name)
    if required and not value:
        raise InvalidRequestError(f"'{name}' must not be empty", name)
    if len(value) > MAX_ID_CHARS:
        raise InvalidRequestError(f"'{name}' has {len(value)} characters; at most {MAX_ID_CHARS} are allowed", name)
    if not value.isprintable():
        raise InvalidRequestError(f"'{name}' must hold printable characters only", name)
    return value


def check_role(role: Any, i: int) -> None:
    """InvalidRequestError naming `messages[i].role` unless `role` is one of CHAT_ROLES."""
    if not isinstance(role, str) or role not in CHAT_ROLES:
        got = f"{role[:32]!r}" if isinstance(role, str) else type(role).__name__
        raise InvalidRequestError(f"messages[{i}]['role'] must be one of {', '.join(CHAT_ROLES)}; got {got}",
                                  f"messages[{i}].role")


def _message_texts(message: Any) -> Sequence[str]:
    if not isinstance(message, dict):
        return ()
    content = message.get("content")
    if isinstance(content, str):
        return (content,)
    if isinstance(content, list):
        return [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return ()


def _utf8_len(text: str, limit: int) -> int:
    """UTF-8 length of `text`, computed only when it could matter (a character takes 1 to 4 bytes)."""
    if len(text) > limit or 4 * len(text) <= limit:
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def _check_bytes(what: str, num_bytes: int, limit: int, max_model_len: int) -> None:
    if num_bytes > limit:
        raise InvalidRequestError(
            f"{what}: the prompt text is {num_bytes} bytes, more than the {limit} that can fit the context length "
            f"{max_model_len} (at most {MAX_BYTES_PER_TOKEN} bytes per token)", what)


def _check_count(what: str, n: int, max_model_len: int) -> None:
    if n > max_model_len:
        raise InvalidRequestError(f"the prompt has {n} {what}, more than the context length {max_model_len}", what)
