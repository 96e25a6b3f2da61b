"""Fixtures shared by the integration tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from devstack.dev_certs import ensure_dev_certs


@pytest.fixture(scope="session")
def certs() -> Iterator[Path]:
    """Provide a development CA and a server certificate for localhost, made once per run."""
    folder = Path(tempfile.mkdtemp(prefix="pb-certs-", dir="/tmp"))
    try:
        ensure_dev_certs(folder)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def base() -> Iterator[Path]:
    """Provide a fresh folder with a short path, because ipc:// paths are limited in length."""
    folder = Path(tempfile.mkdtemp(prefix="pb-", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    """Provide a ZeroMQ context that is destroyed, with linger 0, after the test."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)
