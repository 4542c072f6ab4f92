"""Deadlines and cancellation through the router (in-process cluster, real gRPC and HTTP): a request
past its deadline or whose client went away ends, and its work on the worker is aborted and its
blocks are freed."""
from __future__ import annotations

import json
import socket
import urllib.parse

import grpc
import pytest

from tests.controlplane.test_http_frontend import post
from tests.controlplane.test_router import prompt_ids, stub_for, token_prompt, wait_until

LONG = {"prompt": prompt_ids(3, 20), "max_tokens": 480, "temperature": 0.0, "ignore_eos": True}
"""A completion that takes far longer than the deadlines below (480 tokens of the tiny model)."""


def used_blocks(cluster) -> int:
    return sum(w.engine.engine.block_manager.num_blocks - w.engine.engine.block_manager.num_free_blocks
               for w in cluster.workers)


def num_aborted(cluster) -> int:
    return sum(int(w.metrics.requests.labels("abort")._value.get()) for w in cluster.workers)


def assert_work_cancelled(cluster) -> None:
    wait_until(lambda: cluster.num_worker_requests() == 0 and used_blocks(cluster) == 0)
    assert num_aborted(cluster) == 1


def test_http_request_past_the_default_deadline_is_a_504_and_its_work_is_cancelled(make_cluster):
    c = make_cluster()
    router = c.add_router("round_robin", router_config={"request_timeout_s": 0.3})
    resp = post(router, "/v1/completions", LONG)
    assert resp.status_code == 504, resp.text
    error = resp.json()["error"]
    assert error["type"] == "timeout_error" and "deadline" in error["message"]
    assert_work_cancelled(c)
    assert router.router.metrics.requests.labels("deadline")._value.get() == 1


def test_grpc_caller_deadline_reaches_the_worker(make_cluster):
    c = make_cluster()
    router = c.add_router("round_robin")
    with pytest.raises(grpc.RpcError) as exc:
        list(stub_for(router).Generate(token_prompt(prompt_ids(3, 20), max_tokens=480), timeout=0.3))
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_work_cancelled(c)


def test_non_streaming_http_client_disconnect_cancels_the_work(make_cluster):
    c = make_cluster()
    router = c.add_router("round_robin")
    url = urllib.parse.urlsplit(router.http_url)
    body = json.dumps(LONG).encode()
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        wait_until(lambda: c.num_worker_requests() == 1)
    assert_work_cancelled(c)


def test_grpc_client_cancel_mid_stream_cancels_the_work(make_cluster):
    c = make_cluster()
    router = c.add_router("round_robin")
    call = stub_for(router).Generate(token_prompt(prompt_ids(3, 20), max_tokens=480), timeout=60)
    assert next(call).token_ids
    call.cancel()
    assert_work_cancelled(c)


def test_a_request_queued_past_the_stall_timeout_is_served_not_failed(make_cluster, monkeypatch):
    """A request waiting behind a long one (one running request per worker) hears nothing but its
    worker's heartbeats for longer than the router's stall timeout: it is served, in full, and the
    worker's breaker stays closed. Before heartbeats such a wait failed it as stalled (HTTP 503)."""
    import threading

    from controlplane import router_config

    monkeypatch.setattr(router_config, "WAITING_HEARTBEAT_S", 0.02)  # lets the router take a short stall timeout
    c = make_cluster(num_workers=1, max_num_seqs=1)
    c.workers[0].service.heartbeat_s = 0.02
    router = c.add_router("round_robin", router_config={"stall_timeout_s": 0.2})
    long = dict(LONG, max_tokens=480)
    results = {}
    first = threading.Thread(target=lambda: results.setdefault("long", post(router, "/v1/completions", long)))
    first.start()
    wait_until(lambda: c.num_worker_requests() == 1)
    queued = post(router, "/v1/completions", {**LONG, "max_tokens": 8})
    first.join()
    assert results["long"].status_code == 200 and queued.status_code == 200, queued.text
    assert queued.json()["usage"]["completion_tokens"] == 8
    assert results["long"].json()["usage"]["completion_tokens"] == 480
    assert router.router.metrics.requests.labels("no_worker")._value.get() == 0
