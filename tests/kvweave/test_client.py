"""The SDK against a real cluster (Redis, 2 tiny workers, the router over real sockets), plus its retry
and deadline behaviour against a target that is not listening and a scripted gRPC server."""
from __future__ import annotations

import asyncio
import datetime
from concurrent import futures

import grpc
import pytest

import kvweave
from controlplane.cluster import LocalCluster
from controlplane.procs import free_port
from kvweave import client as client_module
from kvweave.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from kvweave.sampling_params import SamplingParams

ENGINE_ARGS = {"dtype": "float32", "num_blocks": 128, "num_threads": 1}
PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Hello world!"}]


@pytest.fixture(scope="module")
def cluster(tiny_hf_model):
    with LocalCluster(workers=2, model=str(tiny_hf_model), engine_args=ENGINE_ARGS, startup_timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    with kvweave.Client(cluster.grpc_target, timeout=60) as c:
        yield c


def reference(engine_factory, prompt, max_tokens: int):
    (out,) = engine_factory().generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    return out


def test_generate_streams_deltas_equal_to_the_engine(client, cluster, tiny_engine_factory) -> None:
    deltas = list(client.generate(PROMPT, max_tokens=6, temperature=0, ignore_eos=True))
    assert all(isinstance(d, kvweave.GenerateDelta) for d in deltas)
    assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
    last = deltas[-1]
    assert last.finish_reason == "length"
    assert last.worker_id in cluster.worker_ids
    token_ids = [t for d in deltas for t in d.token_ids]
    expected = reference(tiny_engine_factory, PROMPT, 6)
    assert token_ids == expected.token_ids
    assert "".join(d.text for d in deltas) == expected.text
    assert last.usage.completion_tokens == 6 and last.usage.prompt_tokens == expected.num_prompt_tokens


def test_complete_and_chat_return_whole_completions(client, tiny_engine_factory) -> None:
    completion = client.complete(PROMPT, max_tokens=5, temperature=0, ignore_eos=True)
    assert isinstance(completion, kvweave.Completion)
    assert completion.token_ids == reference(tiny_engine_factory, PROMPT, 5).token_ids
    assert completion.finish_reason == "length" and completion.usage.completion_tokens == 5
    reply = client.chat(MESSAGES, max_tokens=4, temperature=0, ignore_eos=True)
    expected = reference(tiny_engine_factory, {"messages": MESSAGES}, 4)
    assert (reply.token_ids, reply.text) == (expected.token_ids, expected.text)


def test_token_ids_prompt_and_list_models(client) -> None:
    by_text = client.complete(PROMPT, max_tokens=3, temperature=0, ignore_eos=True)
    by_ids = client.generate(token_ids=[5, 6, 7, 8], max_tokens=3, temperature=0, ignore_eos=True)
    assert sum(len(d.token_ids) for d in by_ids) == 3 and len(by_text.token_ids) == 3
    models = client.list_models()
    assert len(models) == 1 and models[0].num_workers == 2


def test_async_client_streams_and_completes(cluster, tiny_engine_factory) -> None:
    async def main():
        async with kvweave.AsyncClient(cluster.grpc_target, timeout=60) as client:
            deltas = [d async for d in client.generate(PROMPT, max_tokens=4, temperature=0, ignore_eos=True)]
            reply = await client.chat(MESSAGES, max_tokens=4, temperature=0, ignore_eos=True)
            return deltas, reply

    deltas, reply = asyncio.run(main())
    assert [t for d in deltas for t in d.token_ids] == reference(tiny_engine_factory, PROMPT, 4).token_ids
    assert reply.token_ids == reference(tiny_engine_factory, {"messages": MESSAGES}, 4).token_ids


def test_invalid_argument_maps_to_invalid_request(client) -> None:
    with pytest.raises(kvweave.InvalidRequest) as err:
        client.complete(PROMPT, max_tokens=4, temperature=-1.0)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature" in err.value.message
    assert client.complete(PROMPT, max_tokens=2).finish_reason in ("length", "stop")  # still serving


def test_prompt_forms_are_checked_before_any_call() -> None:
    with kvweave.Client(f"127.0.0.1:{free_port()}") as client:
        with pytest.raises(kvweave.InvalidRequest, match="exactly one"):
            client.generate()
        with pytest.raises(kvweave.InvalidRequest, match="exactly one"):
            client.generate("text", messages=MESSAGES)


def test_deadline_maps_to_timeout(client) -> None:
    # ~500 tokens take seconds on the tiny model; the deadline is a fraction of that.
    with pytest.raises(kvweave.Timeout) as err:
        client.complete(PROMPT, max_tokens=480, ignore_eos=True, timeout=0.2)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_abort_stops_a_running_request(client) -> None:
    stream = client.generate(PROMPT, max_tokens=480, ignore_eos=True, request_id="sdk-abort-1")
    first = next(stream)
    assert first.request_id == "sdk-abort-1"
    assert client.abort("sdk-abort-1") is True
    rest = list(stream)
    assert rest and rest[-1].finish_reason == "abort"
    assert client.abort("sdk-abort-1") is False


# ---------------------------------------------------------------------------------------------
# Retries
# ---------------------------------------------------------------------------------------------

def test_unavailable_is_retried_with_exponential_backoff_then_raised(monkeypatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", sleeps.append)
    with kvweave.Client(f"127.0.0.1:{free_port()}", max_retries=3, backoff=0.05) as client:
        with pytest.raises(kvweave.Unavailable) as err:
            client.complete(PROMPT)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert sleeps == [0.05, 0.1, 0.2]
        sleeps.clear()
        with pytest.raises(kvweave.Unavailable):
            client.list_models()
        assert sleeps == [0.05, 0.1, 0.2]


def test_async_unavailable_is_retried_then_raised(monkeypatch) -> None:
    sleeps: list[float] = []

    async def record(delay: float) -> None:
        sleeps.append(delay)

    monkeypatch.setattr(client_module.asyncio, "sleep", record)

    async def main():
        async with kvweave.AsyncClient(f"127.0.0.1:{free_port()}", max_retries=2, backoff=0.05) as client:
            await client.complete(PROMPT)

    with pytest.raises(kvweave.Unavailable):
        asyncio.run(main())
    assert sleeps == [0.05, 0.1]


class ScriptedInference(inference_pb2_grpc.InferenceServicer):
    """Fails the first `num_failures` calls with `code`; after that streams two deltas, or one delta
    and then UNAVAILABLE when `fail_mid_stream`."""

    def __init__(self, num_failures: int, fail_mid_stream: bool = False,
                 code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self.num_failures, self.fail_mid_stream, self.code, self.num_calls = num_failures, fail_mid_stream, code, 0

    def Generate(self, request, context):
        self.num_calls += 1
        if self.num_calls <= self.num_failures:
            context.abort(self.code, f"scripted {self.code.name}")
        yield inference_pb2.GenerateResponse(request_id="r1", text="Hel", token_ids=[1], worker_id="w")
        if self.fail_mid_stream:
            context.abort(grpc.StatusCode.UNAVAILABLE, "worker lost after the first token")
        yield inference_pb2.GenerateResponse(request_id="r1", text="lo", token_ids=[2], finished=True,
                                             finish_reason=common_pb2.FINISH_REASON_STOP, worker_id="w",
                                             usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=2))


@pytest.fixture
def scripted_server():
    servers = []

    def start(servicer: ScriptedInference) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(2))
        inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0)


def test_retry_succeeds_when_the_server_recovers(scripted_server) -> None:
    servicer = ScriptedInference(num_failures=2)
    with kvweave.Client(scripted_server(servicer), max_retries=3, backoff=0.01) as client:
        completion = client.complete("hi")
    assert servicer.num_calls == 3
    assert (completion.text, completion.token_ids, completion.finish_reason) == ("Hello", [1, 2], "stop")
    assert completion.usage.total_tokens == 5


@pytest.mark.parametrize("code, error_type", [
    (grpc.StatusCode.INVALID_ARGUMENT, kvweave.InvalidRequest),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, kvweave.Overloaded),
    (grpc.StatusCode.DEADLINE_EXCEEDED, kvweave.Timeout),
    (grpc.StatusCode.INTERNAL, kvweave.KVWeaveError),
])
def test_status_codes_map_to_typed_errors_without_retry(scripted_server, code, error_type) -> None:
    servicer = ScriptedInference(num_failures=1, code=code)
    with kvweave.Client(scripted_server(servicer), max_retries=3, backoff=0.01) as client:
        with pytest.raises(error_type) as err:
            client.complete("hi")
    assert type(err.value) is error_type
    assert (err.value.code, err.value.message, servicer.num_calls) == (code, f"scripted {code.name}", 1)


def test_no_retry_after_the_first_delta(scripted_server) -> None:
    servicer = ScriptedInference(num_failures=0, fail_mid_stream=True)
    with kvweave.Client(scripted_server(servicer), max_retries=3, backoff=0.01) as client:
        stream = client.generate("hi")
        assert next(stream).text == "Hel"
        with pytest.raises(kvweave.Unavailable, match="after the first token"):
            next(stream)
    assert servicer.num_calls == 1


def test_metadata_and_api_key_are_sent(scripted_server) -> None:
    seen = {}

    class Recorder(ScriptedInference):
        def Generate(self, request, context):
            seen.update(context.invocation_metadata())
            yield from super().Generate(request, context)

    target = scripted_server(Recorder(num_failures=0))
    with kvweave.Client(target, metadata={"x-tenant": "acme"}, api_key="sk-test") as client:
        client.complete("hi")
    assert seen["x-tenant"] == "acme" and seen["authorization"] == "Bearer sk-test"


def self_signed_pem() -> tuple[bytes, bytes]:
    """A certificate for localhost and its key, as PEM."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_tls_with_root_certificates_from_a_file(tmp_path) -> None:
    cert, key = self_signed_pem()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    inference_pb2_grpc.add_InferenceServicer_to_server(ScriptedInference(num_failures=0), server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
    server.start()
    try:
        (tmp_path / "ca.pem").write_bytes(cert)
        with kvweave.Client(f"localhost:{port}", root_certificates=str(tmp_path / "ca.pem")) as client:
            assert client.complete("hi").text == "Hello"
        with kvweave.Client(f"localhost:{port}", max_retries=0) as plaintext:
            with pytest.raises(kvweave.Unavailable):
                plaintext.complete("hi")
    finally:
        server.stop(0)
