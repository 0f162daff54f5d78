"""An HTTP API with a published quota, for the rate-limit benchmark and recipe.

A bare ASGI app under uvicorn on loopback. ``GET /items/{n}`` answers
``{"id": n, "square": n * n}``, unless ``--limit`` requests were already
accepted in the last ``--per`` seconds (a sliding log, by the server's clock
at arrival): then ``429 Too Many Requests`` with ``Retry-After: 1`` (whole
seconds, as HTTP servers send it). Rejected requests do not count against
the quota. ``GET /stats`` reports what the server saw since the last
``POST /reset``: requests, 429s, the most requests that arrived in any
``per`` seconds (429s included), and accepted requests per second from the
first to the last accepted one.

    python benchmarks/quota_server.py [--limit 300] [--per 1.0] [--port 0]

prints ``listening on http://127.0.0.1:PORT`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class QuotaApp:
    """The ASGI app: a sliding-log quota and a record of every arrival."""

    def __init__(self, limit: int, per: float) -> None:
        self.limit = limit
        self.per = per
        self.reset()

    def reset(self) -> None:
        self.accepted: deque[float] = deque()  # accepted arrivals in the last `per`
        self.arrivals: list[float] = []
        self.accepted_at: list[float] = []
        self.rejected = 0

    def admit(self, now: float) -> bool:
        self.arrivals.append(now)
        while self.accepted and self.accepted[0] <= now - self.per:
            self.accepted.popleft()
        if len(self.accepted) >= self.limit:
            self.rejected += 1
            return False
        self.accepted.append(now)
        self.accepted_at.append(now)
        return True

    def stats(self) -> dict[str, Any]:
        arrivals, busiest, start = self.arrivals, 0, 0
        for end, at in enumerate(arrivals):  # arrivals are in order: two pointers
            while arrivals[start] <= at - self.per:
                start += 1
            busiest = max(busiest, end - start + 1)
        done = self.accepted_at
        span = done[-1] - done[0] if len(done) > 1 else 0.0
        return {
            "requests": len(arrivals),
            "accepted": len(done),
            "rejected": self.rejected,
            "busiest": busiest,
            "accepted_per_second": (len(done) - 1) / span if span else 0.0,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path.startswith("/items/"):
            if not self.admit(time.monotonic()):
                await respond(send, 429, {"error": "slow down"}, ((b"retry-after", b"1"),))
                return
            n = int(path.rpartition("/")[2])
            await respond(send, 200, {"id": n, "square": n * n})
        elif path == "/stats":
            await respond(send, 200, self.stats())
        elif path == "/reset" and method == "POST":
            self.reset()
            await respond(send, 200, {})
        else:
            await respond(send, 404, {"error": "not found"})


async def respond(
    send: Send, status: int, body: object, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *headers],
        }
    )
    await send({"type": "http.response.body", "body": data})


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--per", type=float, default=1.0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    sock = socket.socket()
    sock.bind(("127.0.0.1", args.port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        QuotaApp(args.limit, args.per), log_level="warning", lifespan="off", access_log=False
    )
    server = uvicorn.Server(config)

    async def serve() -> None:
        import asyncio

        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:  # noqa: ASYNC110 - uvicorn has no event to wait on
            await asyncio.sleep(0.01)
        print(f"listening on http://127.0.0.1:{port}", flush=True)
        await task

    import asyncio

    asyncio.run(serve())
    sys.exit(0)


if __name__ == "__main__":
    main()
