"""A real redis-server for tests and benchmarks: started on a free loopback port
with no persistence, stopped afterwards.

The pytest fixture (conftest.py) skips the Redis tests where the binary is
missing, with that reason, except under CI (the CI environment variable set),
where they fail: CI installs redis-server, and a skip there would hide a broken
setup.
"""

from __future__ import annotations

import gc
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

BINARY = "redis-server"

# coredis (6.9) leaves a connection's memory streams unclosed when a command
# is cancelled or fails while the connection is being set up (seen when a
# flush is cancelled mid-XACK, and against a refused or silent server); their
# ResourceWarnings are expected in the Redis tests, and only there.
COREDIS_LEAK = "ignore:Unclosed <MemoryObject:ResourceWarning"
INSTALL_HINT = f"{BINARY} is not installed (Debian: apt-get install -y redis-server)"


class RedisMissing(RuntimeError):
    """The redis-server binary is not on PATH."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def redis_server() -> Iterator[int]:
    """Run redis-server on a free loopback port; yield the port.

    :raises RedisMissing: the binary is not installed.
    """
    binary = shutil.which(BINARY)
    if binary is None:
        raise RedisMissing(INSTALL_HINT)
    with tempfile.TemporaryDirectory(prefix="corral-redis-") as workdir:
        port = free_port()
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", workdir],
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


def collect_coredis_leaks() -> None:
    """Run the garbage collector with coredis's leak (see COREDIS_LEAK) expected.

    Call it once nothing holds the clients any more, not inside the code that
    used them: a running frame keeps its clients, and an exception caught there
    (or logged, while pytest keeps the test's log records) keeps the frames of
    its traceback. What they leaked would be collected later, in whichever test
    (or at the exit of pytest) the next collection runs, outside this filter.
    The ``coredis_leaks`` fixture (conftest.py) calls it in its teardown. Only
    this filter is applied: any other warning comes out as usual.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(*COREDIS_LEAK.split(":")[:2], ResourceWarning)
        gc.collect()
