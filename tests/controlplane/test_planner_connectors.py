"""The planner's connectors (controlplane/planner_connectors.py).

Kubernetes: no real API server can run on these machines (no container runtime, no kubelet), so the
official `kubernetes` client talks to a thin HTTP server on 127.0.0.1 that speaks only the scale
subresource of Deployments (GET and PATCH /apis/apps/v1/namespaces/NS/deployments/NAME/scale, as
an API server answers them: an autoscaling/v1 Scale, a merge patch of spec.replicas, 404 Status for
an unknown Deployment). It records the requests, so the test sees exactly what the client sent.
"""
from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from controlplane.planner_connectors import ConnectorError, KubernetesConnector

SCALE_PATH = re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)/scale$")


class FakeScaleAPI:
    """Deployments' replicas by (namespace, name), served as the scale subresource."""

    def __init__(self, replicas: dict[tuple[str, str], int]) -> None:
        self.replicas = dict(replicas)
        self.requests: list[tuple[str, str, str, object]] = []
        """(method, path, content type, JSON body) of every request."""
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                api.handle(self, None)

            def do_PATCH(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.handle(self, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def handle(self, h: BaseHTTPRequestHandler, body) -> None:
        path = h.path.split("?")[0]
        self.requests.append((h.command, path, h.headers.get("Content-Type", ""), body))
        m = SCALE_PATH.match(path)
        key = m and (m.group(1), m.group(2))
        if key not in self.replicas:
            return self.reply(h, 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                                       "code": 404, "message": f"deployments.apps {path!r} not found"})
        if body is not None:
            self.replicas[key] = body["spec"]["replicas"]
        ns, name = key
        self.reply(h, 200, {"kind": "Scale", "apiVersion": "autoscaling/v1",
                            "metadata": {"name": name, "namespace": ns},
                            "spec": {"replicas": self.replicas[key]},
                            "status": {"replicas": self.replicas[key], "selector": f"app={name}"}})

    @staticmethod
    def reply(h: BaseHTTPRequestHandler, status: int, doc: dict) -> None:
        data = json.dumps(doc).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def __enter__(self) -> "FakeScaleAPI":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def api_client(url: str):
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = url
    return client.ApiClient(configuration)


@pytest.mark.asyncio
async def test_kubernetes_connector_reads_and_patches_the_scale_subresource():
    with FakeScaleAPI({("llm", "demo-kvweave-prefill"): 2, ("llm", "demo-kvweave-decode"): 3}) as api:
        connector = KubernetesConnector("llm", {"prefill": "demo-kvweave-prefill", "decode": "demo-kvweave-decode"},
                                        api_client(api.url))
        try:
            assert connector.roles == ("prefill", "decode")
            assert (await connector.get_replicas("prefill"), await connector.get_replicas("decode")) == (2, 3)
            await connector.set_replicas("decode", 5)
            assert await connector.get_replicas("decode") == 5
            assert api.replicas == {("llm", "demo-kvweave-prefill"): 2, ("llm", "demo-kvweave-decode"): 5}
        finally:
            await connector.close()
    base = "/apis/apps/v1/namespaces/llm/deployments"
    assert [(m, p) for m, p, _, _ in api.requests] == [
        ("GET", f"{base}/demo-kvweave-prefill/scale"), ("GET", f"{base}/demo-kvweave-decode/scale"),
        ("PATCH", f"{base}/demo-kvweave-decode/scale"), ("GET", f"{base}/demo-kvweave-decode/scale")]
    _, _, content_type, body = api.requests[2]
    assert content_type == "application/merge-patch+json" and body == {"spec": {"replicas": 5}}


@pytest.mark.asyncio
async def test_kubernetes_connector_errors_say_what_to_fix():
    with FakeScaleAPI({}) as api:
        connector = KubernetesConnector("llm", {"decode": "missing"}, api_client(api.url))
        with pytest.raises(ConnectorError, match=r"llm/missing: HTTP 404, no such Deployment .*--decode-deployment"):
            await connector.get_replicas("decode")
        await connector.close()
    connector = KubernetesConnector("llm", {"decode": "d"}, api_client(api.url))  # the server is gone
    with pytest.raises(ConnectorError, match="cannot read the decode pool's Deployment llm/d"):
        await connector.get_replicas("decode")
    await connector.close()
    with pytest.raises(ValueError, match="at least one Deployment"):
        KubernetesConnector("llm", {}, None)
