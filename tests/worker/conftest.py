"""Fixtures of the worker tests."""
from __future__ import annotations

import pytest

from worker.engine import LLMEngine


@pytest.fixture
def lively_engine(tiny_model_variant, tiny_engine_factory) -> LLMEngine:
    """A float32 engine on the tiny GQA checkpoint, 4-token blocks."""
    return tiny_engine_factory(tiny_model_variant("gqa"), block_size=4)
