"""Every async test runs on asyncio, asyncio+uvloop and trio."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

_HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None

BACKENDS = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(
        ("asyncio", {"use_uvloop": True}),
        id="uvloop",
        marks=pytest.mark.skipif(not _HAVE_UVLOOP, reason="uvloop is not installed"),
    ),
    pytest.param(("trio", {}), id="trio"),
]


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


@pytest.fixture
def backend_name(anyio_backend: Any) -> str:
    """'asyncio' or 'trio' (uvloop counts as asyncio)."""
    return str(anyio_backend[0])
