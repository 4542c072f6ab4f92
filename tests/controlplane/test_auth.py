"""Client authentication at the router (controlplane/auth.py): API keys from a file, reloaded without
a restart; the tenant and cache namespace come from the key (another tenant's cached tokens stay
invisible over HTTP and gRPC); per-key rate limits; identifier bounds; TLS and mutual TLS with the
SDK and the `openai` client. Real Redis, real workers, real routers on loopback sockets."""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import kvweave
from controlplane.auth import ApiKeys, ApiKeysFileError, RateLimiter, Tenant, parse_api_keys
from controlplane.errors import RateLimitedError
from controlplane.router_main import ServeOptions
from kvweave.limits import MAX_ID_CHARS
from kvweave.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from tests.controlplane.test_router import prompt_ids, token_prompt, wait_indexed
from tests.tls_certs import write_tls_files

KEYS = {
    "keys": [
        {"key": "sk-alpha", "tenant": "alpha"},
        {"key_sha256": hashlib.sha256(b"sk-beta").hexdigest(), "tenant": "beta"},
        {"key": "sk-gamma", "tenant": "gamma", "namespace": "alpha"},  # shares alpha's KV
        {"key": "sk-rpm", "tenant": "rpm", "requests_per_minute": 2},
        {"key": "sk-tpm", "tenant": "tpm", "tokens_per_minute": 50},
    ]
}


def write_keys(path, doc) -> str:
    path.write_text(json.dumps(doc))
    return str(path)


@pytest.fixture(scope="module")
def keyed(cluster, tmp_path_factory):
    """A router that requires the keys of KEYS."""
    path = write_keys(tmp_path_factory.mktemp("keys") / "keys.json", KEYS)
    return cluster.add_router("prefix_aware", serve_options={"api_keys_file": path})


def http(url: str, method: str = "GET", body=None, key: str | None = None, context=None):
    """(status, JSON body or text, headers) of one request; error statuses are returned."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as resp:
            status, text, hdrs = resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as e:
        status, text, hdrs = e.code, e.read().decode(), dict(e.headers)
    try:
        return status, json.loads(text), hdrs
    except ValueError:
        return status, text, hdrs


def stub(router) -> inference_pb2_grpc.InferenceStub:
    return inference_pb2_grpc.InferenceStub(grpc.insecure_channel(router.grpc_address))


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def grpc_usage(router, key: str, token_ids: list[int], **fields) -> common_pb2.Usage:
    *_, last = stub(router).Generate(token_prompt(token_ids, max_tokens=1, **fields), timeout=60, metadata=auth(key))
    assert last.finished
    return last.usage


def http_usage(router, key: str, token_ids: list[int]) -> dict:
    status, body, _ = http(router.http_url + "/v1/completions", "POST",
                           {"prompt": token_ids, "max_tokens": 1, "temperature": 0}, key)
    assert status == 200, body
    return body["usage"]


def grpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# ------------------------------------------------------------------------------ the keys file

def test_keys_file_entries_map_keys_to_tenants_and_namespaces():
    entries = dict(parse_api_keys(json.dumps(KEYS)))
    by_name = {t.name: t for t in entries.values()}
    assert hashlib.sha256(b"sk-beta").digest() in entries
    assert by_name["alpha"].namespace == "alpha" and by_name["gamma"].namespace == "alpha"
    assert by_name["rpm"].requests_per_minute == 2 and by_name["rpm"].tokens_per_minute is None
    assert by_name["beta"].key_id == hashlib.sha256(b"sk-beta").hexdigest()
    assert parse_api_keys(json.dumps(KEYS["keys"])) == parse_api_keys(json.dumps(KEYS))  # a bare list


@pytest.mark.parametrize("doc, problem", [
    ("{", "not valid JSON"),
    ({"keys": {"key": "x"}}, "expected"),
    ([{"tenant": "a"}], "exactly one of 'key' and 'key_sha256'"),
    ([{"key": "k", "key_sha256": "00" * 32, "tenant": "a"}], "exactly one"),
    ([{"key_sha256": "zz", "tenant": "a"}], "64 hex digits"),
    ([{"key": "k"}], "'tenant' is required"),
    ([{"key": "k", "tenant": "a\nb"}], "printable"),
    ([{"key": "k", "tenant": "a", "requests_per_minute": 0}], "'requests_per_minute' must be a positive number"),
    ([{"key": "k", "tenant": "a", "tokens_per_minute": True}], "'tokens_per_minute' must be a positive number"),
    ([{"key": "k", "tenant": "a", "role": "admin"}], "unknown field(s) role"),
    ([{"key": "k", "tenant": "a"}, {"key": "k", "tenant": "b"}], "the same key appears twice"),
])
def test_bad_keys_files_are_refused_naming_the_problem(doc, problem):
    with pytest.raises(ApiKeysFileError) as info:
        parse_api_keys(doc if isinstance(doc, str) else json.dumps(doc))
    assert problem in str(info.value)


def test_lookup_finds_plain_and_hashed_keys_only(tmp_path):
    keys = ApiKeys(write_keys(tmp_path / "k.json", KEYS))
    assert keys.lookup("sk-alpha").name == "alpha"
    assert keys.lookup("sk-beta").name == "beta"
    assert keys.lookup("sk-alph") is None and keys.lookup("") is None
    assert keys.lookup(hashlib.sha256(b"sk-beta").hexdigest()) is None  # the stored digest is not a key


def test_keys_reload_when_a_secret_volume_swaps_its_symlink_and_a_bad_file_keeps_the_old_keys(tmp_path, caplog):
    # A Kubernetes Secret volume: keys.json -> ..data/keys.json, ..data -> a timestamped folder.
    for name, doc in (("v1", [{"key": "old", "tenant": "a"}]), ("v2", [{"key": "new", "tenant": "a"}])):
        (tmp_path / name).mkdir()
        write_keys(tmp_path / name / "keys.json", doc)
    (tmp_path / "..data").symlink_to("v1")
    (tmp_path / "keys.json").symlink_to("..data/keys.json")
    keys = ApiKeys(str(tmp_path / "keys.json"))
    assert keys.lookup("old") and not keys.lookup("new")
    assert not keys.reload_if_changed()
    (tmp_path / "..data_tmp").symlink_to("v2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")  # the atomic swap the kubelet does
    assert keys.reload_if_changed()
    assert keys.lookup("new") and not keys.lookup("old")
    (tmp_path / "v2" / "keys.json").write_text('{"keys": [{"key": "x"}]}')  # no tenant
    with caplog.at_level(logging.ERROR, logger="controlplane.auth"):
        assert not keys.reload_if_changed()
    assert keys.lookup("new") and "not reloaded" in caplog.text and "'tenant' is required" in caplog.text
    os.remove(tmp_path / "v2" / "keys.json")
    assert not keys.reload_if_changed() and keys.lookup("new")  # a vanished file keeps the keys too


# ------------------------------------------------------------------------------ rate limiter

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_request_bucket_refuses_past_the_limit_and_refills():
    clock, tenant = Clock(), Tenant("t", "t", requests_per_minute=2, key_id="k")
    limiter = RateLimiter(clock)
    limiter.admit(tenant)
    limiter.admit(tenant)
    with pytest.raises(RateLimitedError) as info:
        limiter.admit(tenant)
    assert info.value.retry_after_s == 30  # one request every 30 s
    clock.now += 29
    with pytest.raises(RateLimitedError):
        limiter.admit(tenant)
    clock.now += 1
    limiter.admit(tenant)


def test_token_bucket_is_debited_when_requests_end_and_refuses_while_negative():
    clock, tenant = Clock(), Tenant("t", "t", tokens_per_minute=60, key_id="k")
    limiter = RateLimiter(clock)
    limiter.admit(tenant)
    limiter.admit(tenant)  # nothing charged yet: requests in flight are not refused
    limiter.charge(tenant, 100)  # 60 - 100 = -40 tokens, refilled at 1 per second
    with pytest.raises(RateLimitedError) as info:
        limiter.admit(tenant)
    assert info.value.retry_after_s == 40 and "60 tokens per minute" in str(info.value)
    clock.now += 40
    limiter.admit(tenant)


def test_limiter_keeps_state_only_for_configured_limited_keys():
    limiter = RateLimiter(Clock())
    a, b = Tenant("a", "a", 5, 100, key_id="ka"), Tenant("b", "b", key_id="kb")
    for tenant in (a, b):
        limiter.admit(tenant)
    assert limiter.num_buckets == 2  # a's two buckets; b has no limits
    limiter.retain([b])
    assert limiter.num_buckets == 0


def test_serve_options_check_tls_files():
    with pytest.raises(ValueError, match="both tls_cert_file and tls_key_file"):
        ServeOptions(tls_cert_file="c.pem")
    with pytest.raises(ValueError, match="tls_client_ca_file needs"):
        ServeOptions(tls_client_ca_file="ca.pem")


# ------------------------------------------------------------------------------ HTTP and gRPC

def refused(router, reason: str) -> float:
    return router.router.metrics.registry.get_sample_value("kvweave_router_refused_total", {"reason": reason})


def test_http_needs_a_key_except_health_and_metrics(keyed):
    url = keyed.http_url
    before = refused(keyed, "unauthenticated")
    for path in ("/v1/models", "/metrics/targets"):
        for key in (None, "sk-wrong"):
            status, body, _ = http(url + path, key=key)
            assert status == 401, (path, key)
            assert body["error"]["code"] == "invalid_api_key" and body["error"]["type"] == "invalid_request_error"
            assert "sk-wrong" not in body["error"]["message"]
        assert http(url + path, key="sk-alpha")[0] == 200
    status, body, headers = http(url + "/v1/completions", "POST", {"prompt": "hi", "max_tokens": 1})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert http(url + "/health")[0] == 200 and http(url + "/metrics")[0] == 200
    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    assert refused(keyed, "unauthenticated") - before == 6  # 4 on the two paths, the completion, the client


def test_grpc_needs_a_key_except_health(keyed):
    s = stub(keyed)
    for metadata in ((), auth("sk-wrong"), (("authorization", "sk-alpha"),)):  # the last: no Bearer scheme
        err = grpc_error(lambda: list(s.Generate(token_prompt([5, 6, 7], max_tokens=1), timeout=30, metadata=metadata)))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        err = grpc_error(lambda: s.ListModels(inference_pb2.ListModelsRequest(), timeout=30, metadata=metadata))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert s.ListModels(inference_pb2.ListModelsRequest(), timeout=30, metadata=auth("sk-beta")).models
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(keyed.grpc_address))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_tenant_comes_from_the_key(cluster, keyed):
    prefix = prompt_ids(41, 96)  # 6 full blocks
    err = grpc_error(lambda: grpc_usage(keyed, "sk-beta", prefix + [5], tenant="alpha"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert grpc_usage(keyed, "sk-alpha", prefix + [5], tenant="alpha").prompt_tokens == 97  # its own name is fine
    wait_indexed(cluster, keyed, prefix, _holder(cluster, keyed, prefix, "alpha"), tenant="alpha")
    assert grpc_usage(keyed, "sk-beta", prefix + [6]).cached_tokens == 0
    assert grpc_usage(keyed, "sk-alpha", prefix + [6]).cached_tokens == 96
    assert grpc_usage(keyed, "sk-gamma", prefix + [7]).cached_tokens == 96  # configured to share alpha's


def test_http_tenant_comes_from_the_key(cluster, keyed):
    prefix = prompt_ids(43, 96)
    assert http_usage(keyed, "sk-beta", prefix + [5])["prompt_tokens_details"]["cached_tokens"] == 0
    wait_indexed(cluster, keyed, prefix, _holder(cluster, keyed, prefix, "beta"), tenant="beta")
    # gamma's key names alpha's namespace: neither sees beta's KV, and alpha sees gamma's once indexed
    # (asked before it was indexed, alpha could land on either worker: that is not what is tested)
    assert http_usage(keyed, "sk-gamma", prefix + [6])["prompt_tokens_details"]["cached_tokens"] == 0
    wait_indexed(cluster, keyed, prefix, _holder(cluster, keyed, prefix, "alpha"), tenant="alpha")
    assert http_usage(keyed, "sk-alpha", prefix + [6])["prompt_tokens_details"]["cached_tokens"] == 96
    assert http_usage(keyed, "sk-beta", prefix + [6])["prompt_tokens_details"]["cached_tokens"] == 96


def _holder(cluster, router, token_ids: list[int], namespace: str, timeout: float = 10.0) -> str:
    """The worker whose device tier the KV index says holds the first block of `token_ids` in `namespace`."""
    from kvstore.index import KVIndex
    from kvstore.keys import encode_extra_keys, hash_blocks

    hashes = hash_blocks(token_ids, 16, encode_extra_keys(("tiny-gqa", namespace)))[:1]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = cluster.run(KVIndex(router.router.redis).lookup(hashes, ["w0", "w1"]))
        held = [w for w in ("w0", "w1") if all(found[(w, "device")])]
        if held:
            return held[0]
        time.sleep(0.05)
    raise AssertionError(f"no worker holds the prompt in namespace {namespace!r}")


def test_requests_per_minute_limit_gives_429_with_retry_after(keyed):
    url = keyed.http_url + "/v1/completions"
    body = {"prompt": [5, 6, 7], "max_tokens": 1}
    before = refused(keyed, "rate_limited")
    assert [http(url, "POST", body, "sk-rpm")[0] for _ in range(2)] == [200, 200]
    status, err, headers = http(url, "POST", body, "sk-rpm")
    assert status == 429 and err["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(headers["Retry-After"]) <= 30
    assert http(url, "POST", body, "sk-alpha")[0] == 200  # other keys are not limited by it
    err = grpc_error(lambda: grpc_usage(keyed, "sk-rpm", [5, 6, 7]))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert 1 <= int(dict(err.trailing_metadata())["retry-after"]) <= 30
    assert refused(keyed, "rate_limited") - before == 2


def test_tokens_per_minute_limit_counts_prompt_and_completion(keyed):
    usage = grpc_usage(keyed, "sk-tpm", prompt_ids(45, 60))  # 61 tokens of a 50-token budget
    assert usage.prompt_tokens + usage.completion_tokens == 61
    with pytest.raises(kvweave.Overloaded) as info:
        with kvweave.Client(keyed.grpc_address, api_key="sk-tpm", max_retries=0) as client:
            client.complete(token_ids=[5, 6, 7], max_tokens=1)
    assert 1 <= info.value.retry_after <= 14  # 11 tokens short, at 50 per minute: 13.2 s
    status, body, headers = http(keyed.http_url + "/v1/completions", "POST", {"prompt": [5], "max_tokens": 1}, "sk-tpm")
    assert status == 429 and "50 tokens per minute" in body["error"]["message"] and "Retry-After" in headers


def test_identifiers_are_bounded_and_never_echoed(keyed):
    url = keyed.http_url + "/v1/chat/completions"
    long = "x" * (MAX_ID_CHARS + 1)
    for field, value in (("user", long), ("session_id", long), ("user", "a\nforged log line")):
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, field: value}
        status, err, _ = http(url, "POST", body, "sk-alpha")
        assert status == 400 and err["error"]["param"] == field, err
        assert value not in err["error"]["message"]
    ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "user": "u" * MAX_ID_CHARS}
    assert http(url, "POST", ok, "sk-alpha")[0] == 200
    for field in ("tenant", "session_id", "request_id"):
        err = grpc_error(lambda: grpc_usage(keyed, "sk-alpha", [5, 6], **{field: long}))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and f"'{field}'" in err.details()
        assert long not in err.details()


def test_keys_file_change_takes_effect_without_restart(cluster, tmp_path):
    path = write_keys(tmp_path / "keys.json", [{"key": "sk-one", "tenant": "one"}])
    router = cluster.add_router(serve_options={"api_keys_file": path, "api_keys_reload_s": 0.05})
    models = router.http_url + "/v1/models"
    assert http(models, key="sk-one")[0] == 200 and http(models, key="sk-two")[0] == 401
    write_keys(tmp_path / "new.json", [{"key": "sk-two", "tenant": "two"}])
    os.replace(tmp_path / "new.json", path)
    deadline = time.monotonic() + 10
    while http(models, key="sk-two")[0] != 200:
        assert time.monotonic() < deadline, "the new keys were not loaded"
        time.sleep(0.05)
    assert http(models, key="sk-one")[0] == 401
    (tmp_path / "keys.json").write_text("{not json")
    time.sleep(0.3)  # several polls
    assert http(models, key="sk-two")[0] == 200


# ------------------------------------------------------------------------------ TLS

@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return write_tls_files(tmp_path_factory.mktemp("tls"))


def test_sdk_and_openai_client_over_tls_with_keys(cluster, keyed, certs):
    router = cluster.add_router(serve_options={"api_keys_file": keyed.options.api_keys_file,
                                               "tls_cert_file": str(certs.server_cert),
                                               "tls_key_file": str(certs.server_key)})
    assert router.http_url.startswith("https://")
    with kvweave.Client(router.grpc_address, tls=True, root_certificates=str(certs.ca_cert), api_key="sk-alpha",
                        timeout=60) as client:
        done = client.complete(token_ids=[5, 6, 7], max_tokens=2, temperature=0.0, ignore_eos=True)
        assert done.usage.completion_tokens == 2
    with kvweave.Client(router.grpc_address, root_certificates=certs.ca_cert.read_bytes(), max_retries=0) as client:
        with pytest.raises(kvweave.Unauthenticated):
            client.complete(token_ids=[5, 6, 7], max_tokens=1)
    with kvweave.Client(router.grpc_address, max_retries=0, timeout=10) as plain:  # no TLS: no connection
        with pytest.raises(kvweave.KVWeaveError):
            plain.complete(token_ids=[5, 6, 7], max_tokens=1)
    client = openai.OpenAI(base_url=router.http_url + "/v1", api_key="sk-alpha", max_retries=0,
                           http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(
                               cafile=str(certs.ca_cert))))
    done = client.completions.create(model="tiny-gqa", prompt="Hello", max_tokens=2, temperature=0)
    assert done.usage.completion_tokens == 2
    untrusted = openai.OpenAI(base_url=router.http_url + "/v1", api_key="sk-alpha", max_retries=0)
    with pytest.raises(openai.APIConnectionError):
        untrusted.models.list()


def test_mutual_tls_requires_a_client_certificate(cluster, certs):
    router = cluster.add_router(serve_options={"tls_cert_file": str(certs.server_cert),
                                               "tls_key_file": str(certs.server_key),
                                               "tls_client_ca_file": str(certs.ca_cert)})
    with kvweave.Client(router.grpc_address, root_certificates=str(certs.ca_cert), private_key=str(certs.client_key),
                        certificate_chain=str(certs.client_cert), timeout=60) as client:
        assert client.complete(token_ids=[5, 6, 7], max_tokens=1, temperature=0.0).usage.completion_tokens == 1
    with kvweave.Client(router.grpc_address, root_certificates=str(certs.ca_cert), max_retries=0,
                        timeout=10) as client:
        with pytest.raises(kvweave.KVWeaveError):
            client.complete(token_ids=[5, 6, 7], max_tokens=1)
    with_cert = ssl.create_default_context(cafile=str(certs.ca_cert))
    with_cert.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    assert http(router.http_url + "/health", context=with_cert)[0] == 200
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        http(router.http_url + "/health", context=ssl.create_default_context(cafile=str(certs.ca_cert)))


# ------------------------------------------------------------------------------ load generator

@pytest.mark.parametrize("backend", ["grpc", "openai"])
def test_loadgen_sends_its_api_key(keyed, backend):
    from loadgen.backends import BackendError, make_backend
    from loadgen.types import Turn

    url = keyed.grpc_address if backend == "grpc" else keyed.http_url

    async def run(key: str | None):
        b = make_backend(backend, url, api_key=key)
        try:
            await b.connect()
            return await b.send(Turn(max_tokens=2, token_ids=(5, 6, 7)))
        finally:
            await b.close()

    record = asyncio.run(run("sk-alpha"))
    assert record.error is None and record.output_tokens == 2
    with pytest.raises(BackendError) as info:
        asyncio.run(run(None))
    assert "UNAUTHENTICATED" in str(info.value) or "401" in str(info.value) or "API key" in str(info.value)


# ------------------------------------------------------------------------------ processes

def test_router_without_keys_warns_that_it_is_open(cluster, caplog):
    with caplog.at_level(logging.WARNING, logger="controlplane.router_main"):
        cluster.add_router()
    assert "no API keys file" in caplog.text


def test_router_command_refuses_a_bad_keys_file(tmp_path):
    bad = tmp_path / "keys.json"
    bad.write_text('{"keys": [{"key": "k", "tenant": "t", "requests_per_minute": -1}]}')
    for path, problem in ((bad, "'requests_per_minute' must be a positive number"), (tmp_path / "none", "cannot read")):
        proc = subprocess.run([sys.executable, "-m", "cli", "router", "--api-keys-file", str(path),
                               "--redis-url", "redis://127.0.0.1:1/0"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and problem in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_serve_with_keys_and_tls_reloads_keys_on_sighup(tiny_hf_model, certs, tmp_path):
    from controlplane.cluster import LocalCluster

    keys = write_keys(tmp_path / "keys.json", [{"key": "sk-first", "tenant": "first"}])
    router_args = {"api_keys_file": keys, "api_keys_reload_s": 3600.0, "tls_cert_file": str(certs.server_cert),
                   "tls_key_file": str(certs.server_key)}
    with LocalCluster(workers=1, model=str(tiny_hf_model), engine_args={"dtype": "float32", "num_blocks": 64,
                      "num_threads": 1}, router_args=router_args, startup_timeout=180) as c:
        assert c.http_url.startswith("https://")

        def client(key: str) -> kvweave.Client:
            return kvweave.Client(c.grpc_target, root_certificates=str(certs.ca_cert), api_key=key, max_retries=0,
                                  timeout=60)

        with client("sk-first") as sdk:
            assert sdk.complete(token_ids=[5, 6, 7], max_tokens=1).usage.completion_tokens == 1
        write_keys(tmp_path / "keys.json", [{"key": "sk-second", "tenant": "second"}])
        c.router.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while True:
            try:
                with client("sk-second") as sdk:
                    sdk.list_models()
                break
            except kvweave.Unauthenticated:
                assert time.monotonic() < deadline, "SIGHUP did not reload the keys"
                time.sleep(0.1)
        with client("sk-first") as sdk, pytest.raises(kvweave.Unauthenticated):
            sdk.list_models()
        assert c.router.poll() is None


def test_abort_finds_only_the_callers_own_requests(keyed):
    s = stub(keyed)
    max_len = s.ListModels(inference_pb2.ListModelsRequest(), timeout=30, metadata=auth("sk-alpha")).models[0].max_model_len
    request = token_prompt([5, 6, 7], max_tokens=max_len - 4, request_id="alpha-long")
    stream = s.Generate(request, timeout=120, metadata=auth("sk-alpha"))
    next(stream)  # running
    abort = common_pb2.AbortRequest(request_id="alpha-long")
    assert not s.Abort(abort, timeout=30, metadata=auth("sk-beta")).found
    assert s.Abort(abort, timeout=30, metadata=auth("sk-alpha")).found
    *_, last = stream
    assert last.finish_reason == common_pb2.FINISH_REASON_ABORT


def test_sdk_raises_typed_errors_for_keys_and_tenants(keyed):
    with kvweave.Client(keyed.grpc_address, api_key="sk-beta", max_retries=0, timeout=60) as client:
        with pytest.raises(kvweave.PermissionDenied):
            client.complete(token_ids=[5, 6, 7], max_tokens=1, tenant="alpha")
        assert client.complete(token_ids=[5, 6, 7], max_tokens=1, tenant="beta").usage.completion_tokens == 1
    with kvweave.Client(keyed.grpc_address, api_key="sk-nope", max_retries=0, timeout=60) as client:
        with pytest.raises(kvweave.Unauthenticated):
            client.list_models()
