"""What the backends read from a finished request's usage: the SDK's `Usage` (gRPC) and an OpenAI
usage object with kvweave's block (HTTP), prefill/decode disaggregation included."""
from __future__ import annotations

from kvweave.client_types import Usage
from loadgen.backends import apply_usage, apply_usage_json
from loadgen.records import RequestRecord


def test_grpc_usage() -> None:
    record = RequestRecord(prompt_tokens=3, output_tokens=2, worker_id="d1")
    apply_usage(record, Usage(prompt_tokens=40, completion_tokens=8, cached_tokens=16, chunk_reused_tokens=4,
                              recomputed_tokens=1, disaggregation="remote", prefill_worker_id="p0"))
    assert (record.prompt_tokens, record.output_tokens, record.cached_tokens, record.chunk_reused_tokens,
            record.recomputed_tokens) == (40, 8, 16, 4, 1)
    assert (record.disaggregation, record.prefill_worker_id, record.worker_id) == ("remote", "p0", "d1")
    apply_usage(record, Usage(prompt_tokens=40, completion_tokens=8, disaggregation="short"))
    assert (record.disaggregation, record.prefill_worker_id) == ("short", "")


def test_http_usage() -> None:
    record = RequestRecord(prompt_tokens=3, output_tokens=2)
    apply_usage_json(record, {"prompt_tokens": 40, "completion_tokens": 8,
                              "prompt_tokens_details": {"cached_tokens": 16},
                              "kvweave": {"chunk_reused_tokens": 4, "recomputed_tokens": 1, "worker_id": "d1",
                                          "disaggregation": "remote", "prefill_worker_id": "p0"}})
    assert (record.prompt_tokens, record.output_tokens, record.cached_tokens, record.chunk_reused_tokens,
            record.recomputed_tokens) == (40, 8, 16, 4, 1)
    assert (record.disaggregation, record.prefill_worker_id, record.worker_id) == ("remote", "p0", "d1")
    plain = RequestRecord(prompt_tokens=3, output_tokens=2)  # a server without kvweave's block (vLLM, SGLang)
    apply_usage_json(plain, {"prompt_tokens": 5})
    assert (plain.prompt_tokens, plain.output_tokens, plain.disaggregation, plain.prefill_worker_id,
            plain.worker_id) == (5, 2, "", "", None)
