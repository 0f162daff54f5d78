"""A real redis-server for the tests: started on a free loopback port with no
persistence, stopped at the end of the session.

Where the binary is missing the Redis tests are skipped with that reason,
except under CI (the CI environment variable set), where they fail: CI
installs redis-server, and a skipped suite there would hide a broken setup.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

BINARY = "redis-server"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def redis_server() -> Iterator[int]:
    """Run redis-server on a free loopback port; yield the port."""
    binary = shutil.which(BINARY)
    if binary is None:
        message = f"{BINARY} is not installed (Debian: apt-get install -y redis-server)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must install it", pytrace=False)
        pytest.skip(message)
    with tempfile.TemporaryDirectory(prefix="corral-redis-") as workdir:
        port = free_port()
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", workdir, "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 10
            while True:  # until it accepts connections
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{BINARY} did not start on port {port}") from None
                    time.sleep(0.02)
            yield port
        finally:
            process.terminate()
            process.wait(timeout=10)
