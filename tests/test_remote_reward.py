"""RemoteReward against real HTTP servers on 127.0.0.1: success, server errors, timeouts, malformed answers."""

import importlib.util
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from flow_trl.rewards import RemoteReward, resolve_reward_funcs
from flow_trl.rewards.remote import decode_images, encode_images


class ScriptedHandler(BaseHTTPRequestHandler):
    """Answers by path: ``/ok`` mean pixel per image, ``/error`` 500, ``/flaky`` 500 twice then ok, ``/slow`` sleeps
    0.5 s, ``/malformed`` non-JSON, ``/short`` one reward too few, ``/reject`` 400, ``/inf`` an infinite reward."""

    hits: dict[str, int] = {}
    requests: list[dict] = []

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(request)
        hits = type(self).hits
        hits[self.path] = hits.get(self.path, 0) + 1
        rewards = decode_images(request["images"]).mean(dim=(1, 2, 3)).tolist()
        if self.path == "/error" or (self.path == "/flaky" and hits[self.path] <= 2):
            self._send(500, b"boom")
        elif self.path == "/slow":
            time.sleep(0.5)
            self._send(200, json.dumps({"rewards": rewards}).encode())
        elif self.path == "/malformed":
            self._send(200, b"<html>not json</html>")
        elif self.path == "/short":
            self._send(200, json.dumps({"rewards": rewards[1:]}).encode())
        elif self.path == "/reject":
            self._send(400, b"images too small")
        elif self.path == "/inf":
            self._send(200, json.dumps({"rewards": [float("inf"), *rewards[1:]]}).encode())  # writes Infinity
        else:
            self._send(200, json.dumps({"rewards": rewards}).encode())

    def log_message(self, format, *args):
        return


def _serve(server: ThreadingHTTPServer):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedHandler)
    yield _serve(server)
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def reset_counters():
    ScriptedHandler.hits.clear()
    ScriptedHandler.requests.clear()


IMAGES = torch.rand(5, 3, 6, 7, generator=torch.Generator().manual_seed(0))
PROMPTS = [f"prompt {i}" for i in range(5)]


def test_images_round_trip_through_png_after_uint8_rounding():
    torch.testing.assert_close(decode_images(encode_images(IMAGES)), (IMAGES * 255).round() / 255)


def test_batches_requests_and_sends_the_named_columns(url):
    reward = RemoteReward(f"{url}/ok", batch_size=2, columns=("objects",))
    rewards = reward(PROMPTS, IMAGES, objects=[[i] for i in range(5)], trainer_state=object(), other=[0] * 5)
    torch.testing.assert_close(rewards, ((IMAGES * 255).round() / 255).mean(dim=(1, 2, 3)))
    assert ScriptedHandler.hits == {"/ok": 3}  # 5 images in chunks of 2
    assert [r["prompts"] for r in ScriptedHandler.requests] == [PROMPTS[0:2], PROMPTS[2:4], PROMPTS[4:]]
    assert [r["columns"] for r in ScriptedHandler.requests] == [
        {"objects": [[0], [1]]},
        {"objects": [[2], [3]]},
        {"objects": [[4]]},
    ]


def test_server_errors_are_retried_a_bounded_number_of_times(url):
    with pytest.raises(RuntimeError, match=r"failed after 3 attempts: HTTP Error 500"):
        RemoteReward(f"{url}/error", max_retries=2, backoff=0.01)(PROMPTS, IMAGES)
    assert ScriptedHandler.hits == {"/error": 3}


def test_transient_errors_recover_with_backoff(url, monkeypatch):
    waits = []
    monkeypatch.setattr("flow_trl.rewards.remote.time.sleep", waits.append)
    rewards = RemoteReward(f"{url}/flaky", max_retries=3, backoff=0.5)(PROMPTS, IMAGES)
    assert rewards.shape == (5,) and ScriptedHandler.hits == {"/flaky": 3}
    assert waits == [0.5, 1.0]  # backoff * 2**attempt before each retry


def test_timeout_fails_without_hanging(url):
    with pytest.raises(RuntimeError, match=r"failed after 2 attempts: .*timed out"):
        RemoteReward(f"{url}/slow", timeout=0.2, max_retries=1, backoff=0.0)(PROMPTS, IMAGES)
    assert ScriptedHandler.hits == {"/slow": 2}  # gave up on each attempt after 0.2 s, then stopped retrying


def test_refused_connection_is_retried_then_reported():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedHandler)
    port = server.server_address[1]
    server.server_close()  # nothing listens on this port now
    with pytest.raises(RuntimeError, match=r"failed after 2 attempts: .*[Rr]efused"):
        RemoteReward(f"http://127.0.0.1:{port}/ok", max_retries=1, backoff=0.0)(PROMPTS, IMAGES)


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("/malformed", "Malformed reward server response"),
        ("/short", "returned 4 rewards for 5 images"),
        ("/inf", "finite numbers or null"),
    ],
)
def test_bad_responses_fail_at_once(url, path, match):
    with pytest.raises(ValueError, match=match):
        RemoteReward(f"{url}{path}", max_retries=3, backoff=10.0, batch_size=8)(PROMPTS, IMAGES)
    assert ScriptedHandler.hits == {path: 1}


def test_client_errors_are_not_retried(url):
    with pytest.raises(RuntimeError, match="rejected the request: HTTP 400 images too small"):
        RemoteReward(f"{url}/reject", max_retries=3, backoff=10.0)(PROMPTS, IMAGES)
    assert ScriptedHandler.hits == {"/reject": 1}


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="must start with http"):
        RemoteReward("127.0.0.1:8000")
    with pytest.raises(ValueError, match="timeout"):
        RemoteReward("http://127.0.0.1:8000", timeout=0)


def _example_server_module():
    path = Path(__file__).parents[1] / "examples" / "reward_server.py"
    spec = importlib.util.spec_from_file_location("reward_server", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_server_serves_a_builtin_reward_by_name():
    example = _example_server_module()
    (local,) = resolve_reward_funcs(["jpeg_incompressibility"])
    server = example.make_server(local, port=0)
    url = _serve(server)
    try:
        (remote,) = resolve_reward_funcs([f"{url}/score"])
        torch.testing.assert_close(remote(PROMPTS, IMAGES), local(PROMPTS, IMAGES))  # PNG is lossless after rounding
        with pytest.raises(RuntimeError, match="HTTP 400.*Got 2 prompts but 5 images"):
            remote._post(json.dumps({"prompts": ["a", "b"], "images": encode_images(IMAGES)}).encode())
    finally:
        server.shutdown()
        server.server_close()
