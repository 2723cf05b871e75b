"""Serve a built-in reward over HTTP for `flow_trl.rewards.RemoteReward` (standard library only).

    python examples/reward_server.py --reward pickscore --port 8000
    flow-trl grpo --reward_funcs http://127.0.0.1:8000/score ...

Run it in the environment (or on the machine) that has the reward model's dependencies and GPU. Protocol:
POST a JSON ``{"prompts": [...], "images": [base64 PNG], "columns": {...}}`` to any path; the answer is
``{"rewards": [...]}``. ``GET /health`` answers ``{"status": "ok", "reward": name}``.
"""

from __future__ import annotations

import argparse
import json
import math
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from flow_trl.rewards import BUILTIN_REWARDS, RewardFunc, compute_rewards, resolve_reward_funcs
from flow_trl.rewards.remote import decode_images


def make_server(reward: RewardFunc, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server scoring requests with ``reward`` (port 0 picks a free port; see ``server.server_address``)."""

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/health":
                self._reply(200, {"status": "ok", "reward": getattr(reward, "name", type(reward).__name__)})
            else:
                self._reply(404, {"error": "POST requests to score; GET /health to check the server."})

        def do_POST(self) -> None:
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                prompts, images = request["prompts"], decode_images(request["images"])
                columns = request.get("columns", {})
            except (ValueError, KeyError, TypeError, OSError) as err:
                self._reply(400, {"error": f"Bad request: {err}"})
                return
            try:
                scores = compute_rewards([reward], prompts, images, columns)[:, 0].tolist()
            except ValueError as err:  # bad input (shape, range, lengths): the client must change the request
                self._reply(400, {"error": str(err)})
                return
            except Exception as err:  # a failure of the reward model itself: the client may retry
                self._reply(500, {"error": f"{type(err).__name__}: {err}"})
                return
            self._reply(200, {"rewards": [None if math.isnan(s) else s for s in scores]})

        def log_message(self, format: str, *args) -> None:  # keep the console for errors
            return

    return ThreadingHTTPServer((host, port), Handler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reward", required=True, help=f"A built-in reward: {', '.join(sorted(BUILTIN_REWARDS))}.")
    parser.add_argument("--host", default="127.0.0.1", help="Interface to listen on (0.0.0.0 for all).")
    parser.add_argument("--port", type=int, default=8000, help="Port to listen on.")
    args = parser.parse_args()
    (reward,) = resolve_reward_funcs([args.reward])
    server = make_server(reward, args.host, args.port)
    print(f"Serving {args.reward!r} on http://{args.host}:{server.server_address[1]}/score")
    server.serve_forever()


if __name__ == "__main__":
    main()
