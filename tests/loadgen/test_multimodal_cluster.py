"""`kvweave loadgen --workload multimodal` against a real cluster serving a tiny Idefics3 model (Redis,
one worker, a router serving gRPC and OpenAI HTTP): over both backends every request succeeds and
the result gives latency per class and counts the images the workload sent."""
from __future__ import annotations

import json

import pytest

from cli.main import main
from loadgen_helpers import workload_sessions
from tests.loadgen.conftest import LoadgenCluster

WORKLOAD = ["--workload", "multimodal", "--num-images", "3", "--images-per-request", "1:2", "--image-size",
            "24x16:64x48", "--text-share", "0.25", "--output-len", "3", "--seed", "7"]
N = 8


@pytest.fixture(scope="module")
def vlm_cluster(redis_server, tiny_vlm_model):
    cluster = LoadgenCluster(redis_server.url, tiny_vlm_model, num_workers=1).start()  # the worker is routable
    yield cluster
    cluster.stop()


@pytest.mark.parametrize("backend", ["grpc", "openai"])
def test_multimodal_run_reports_classes_and_images(vlm_cluster, tmp_path, backend) -> None:
    url = vlm_cluster.grpc_target if backend == "grpc" else vlm_cluster.http_url
    out = tmp_path / "result.json"
    rc = main(["loadgen", "--no-progress", "--json", str(out), "--backend", backend, "--url", url,
               "--num-requests", str(N), "--max-concurrency", "1", *WORKLOAD])
    result = json.loads(out.read_text())
    assert rc == 0 and (result["completed"], result["failed"]) == (N, 0), result["errors"]
    sessions = workload_sessions(*WORKLOAD, n=N)
    classes = [s.tags["class"] for s in sessions]
    assert set(result["latency_by_class"]) == set(classes) == {"text", "image_first", "image_repeat"}
    assert {c: g["completed"] for c, g in result["latency_by_class"].items()} == {c: classes.count(c) for c in classes}
    images = [i for s in sessions for i in s.tags["images"]]
    assert (result["images_sent"], result["distinct_images"]) == (len(images), len(set(images)))
    assert result["total_output_tokens"] == 3 * N
