"""http(s) image URLs, fetched by a real router (`--allow-image-urls`) from a real HTTP server on
127.0.0.1, for a real worker serving the tiny Idefics3 model: a fetched image is the same image as
its data URL (same tokens, same output, a prefix-cache hit), and every way a fetch can go wrong is a
400 naming the reason, never a 5xx and never a hung request."""
from __future__ import annotations

import http.server
import threading
import time

import pytest

from tests.controlplane.test_http_frontend import assert_openai_error, post
from tests.controlplane.test_vlm_http import body, vlm_cluster  # noqa: F401 (the module's cluster fixture)
from tests.vlm_models import make_png

MAX_BYTES = 8192
IMAGE = make_png(30, 30, seed=5)


class _Images(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        try:
            self._answer()
        except (BrokenPipeError, ConnectionResetError):  # the router hung up (too large, too slow)
            pass

    def _answer(self) -> None:
        if self.path == "/img.png":
            self._send(200, IMAGE)
        elif self.path == "/big.png":  # no Content-Length: the router must cut it off as it reads
            self.send_response(200)
            self.end_headers()
            for _ in range(4):
                self.wfile.write(b"\0" * MAX_BYTES)
        elif self.path == "/slow.png":
            time.sleep(3)
            self._send(200, IMAGE)
        elif self.path == "/moved.png":
            self.send_response(302)
            self.send_header("Location", "/img.png")
            self.end_headers()
        elif self.path == "/text":
            self._send(200, b"not an image")
        else:
            self._send(404, b"")

    def _send(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def image_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def router(vlm_cluster):
    return vlm_cluster.add_router(router_config={"allow_image_urls": True, "max_image_bytes": MAX_BYTES,
                                             "image_url_timeout_s": 1.0})


def url_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_a_fetched_image_is_the_same_image_as_its_data_url(router, image_server):
    inline = post(router, "/v1/chat/completions", body("Describe ", IMAGE, " now.", max_tokens=4))
    fetched = post(router, "/v1/chat/completions", body("Describe ", url_part(image_server + "/img.png"), " now.",
                                                        max_tokens=4))
    assert inline.status_code == fetched.status_code == 200, fetched.text
    assert fetched.json()["choices"][0]["message"]["content"] == inline.json()["choices"][0]["message"]["content"]
    usage = fetched.json()["usage"]
    assert usage["prompt_tokens"] == inline.json()["usage"]["prompt_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0  # the same image: the same placeholder ids
    tokens = post(router, "/tokenize", {"messages": body(url_part(image_server + "/img.png"))["messages"]})
    assert tokens.status_code == 200 and tokens.json()["count"] > 0


@pytest.mark.parametrize("path, message", [
    ("/big.png", f"larger than the {MAX_BYTES} bytes allowed"),
    ("/slow.png", "took longer than 1 s"),
    ("/moved.png", "a redirect (not followed)"),
    ("/missing.png", "gave HTTP 404"),
    ("/text", "not an image of a supported format"),
], ids=["too-large", "too-slow", "redirect", "404", "not-an-image"])
def test_every_failed_fetch_is_a_400(router, image_server, path, message):
    resp = post(router, "/v1/chat/completions", body("Describe ", url_part(image_server + path)))
    assert_openai_error(resp, 400, message)


def test_unreachable_hosts_and_other_domains_are_400s(vlm_cluster, router, image_server):
    dead = "http://127.0.0.1:9/img.png"  # the discard port: nothing listens
    assert_openai_error(post(router, "/v1/chat/completions", body("See ", url_part(dead))), 400, "cannot fetch")
    only = vlm_cluster.add_router(router_config={"allow_image_urls": True, "image_url_domains": "images.example.com"})
    resp = post(only, "/v1/chat/completions", body("See ", url_part(image_server + "/img.png")))
    assert_openai_error(resp, 400, "image URLs from 127.0.0.1 are not allowed")


def test_image_urls_are_refused_unless_allowed(vlm_cluster, image_server):
    default = vlm_cluster.add_router()
    resp = post(default, "/v1/chat/completions", body("See ", url_part(image_server + "/img.png")))
    assert_openai_error(resp, 400, "http(s) image URLs are disabled")
