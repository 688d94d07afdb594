"""A real S3 endpoint for tests: moto's server on 127.0.0.1, one per test session.

Use the ``moto_s3`` fixture by importing it into a ``conftest.py``::

    from tests.fixtures_moto import moto_s3  # noqa: F401

When moto cannot start the fixture skips, unless ``CAIRN_REQUIRE_MOTO=1`` is set (as in
CI), in which case it fails.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import pytest

from backends.s3 import S3Backend

REGION = "us-east-1"
ACCESS_KEY = "cairn-test"
SECRET_KEY = "cairn-test-secret"
START_TIMEOUT = 30.0


@dataclass(frozen=True)
class MotoS3:
    """Where the moto server listens, and helpers to manage its buckets."""

    endpoint_url: str
    region: str = REGION
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY

    @functools.cached_property
    def client(self) -> Any:
        """A boto3 S3 client (path-style) for test setup and inspection, made once."""
        import boto3  # type: ignore[import-untyped]
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}),
        )

    def new_bucket(self, prefix: str = "cairn") -> str:
        """Create a bucket with a unique name and return the name."""
        name = f"{prefix}-{uuid.uuid4().hex[:16]}"
        self.client.create_bucket(Bucket=name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Empty and delete ``name``, ignoring a bucket that is already gone."""
        s3 = self.client
        with contextlib.suppress(s3.exceptions.NoSuchBucket):
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
                for obj in page.get("Contents", []):
                    s3.delete_object(Bucket=name, Key=obj["Key"])
            s3.delete_bucket(Bucket=name)

    def keys(self, bucket: str) -> list[str]:
        """Every raw key in ``bucket`` (prefix included)."""
        s3 = self.client
        found: list[str] = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            found.extend(obj["Key"] for obj in page.get("Contents", []))
        return found

    @contextlib.contextmanager
    def require_auth(self) -> Iterator[None]:
        """Make moto check request signatures (IAM) inside the block.

        Affects the whole server, so only use it in tests that run alone on it.
        """
        self._set_auth_count("0")
        try:
            yield
        finally:
            self._set_auth_count("inf")

    def _set_auth_count(self, value: str) -> None:
        request = urllib.request.Request(
            f"{self.endpoint_url}/moto-api/reset-auth",
            data=value.encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},  # a form type would hide the body
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            resp.read()


def moto_unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it when ``CAIRN_REQUIRE_MOTO=1``."""
    if os.environ.get("CAIRN_REQUIRE_MOTO") == "1":
        pytest.fail(f"moto server required (CAIRN_REQUIRE_MOTO=1) but {reason}")
    pytest.skip(f"moto server unavailable: {reason}")


@contextlib.contextmanager
def run_moto_server() -> Iterator[MotoS3]:
    """Start moto's threaded server on a free 127.0.0.1 port; stop it on exit."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        moto_unavailable(f"moto[server] is not installed ({exc})")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    # ThreadedMotoServer.start() waits forever if binding fails; bound the wait.
    errors: list[BaseException] = []

    def start() -> None:
        try:
            server.start()
        except BaseException as exc:
            errors.append(exc)

    starter = threading.Thread(target=start, name="moto-start", daemon=True)
    starter.start()
    starter.join(START_TIMEOUT)
    if starter.is_alive() or errors:
        moto_unavailable(f"it did not start within {START_TIMEOUT}s ({errors or 'timeout'})")
    host, port = server.get_host_and_port()
    try:
        yield MotoS3(endpoint_url=f"http://{host}:{port}")
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """A moto S3 server shared by the whole session."""
    with run_moto_server() as moto:
        yield moto


def make_s3_backend(
    moto: MotoS3, bucket: str, *, prefix: str = "", name: str = "s3", **overrides: object
) -> S3Backend:
    """An ``S3Backend`` on the moto server; keyword ``overrides`` replace any argument."""
    args: dict[str, object] = {
        "endpoint_url": moto.endpoint_url,
        "region": moto.region,
        "bucket": bucket,
        "prefix": prefix,
        "access_key": moto.access_key,
        "secret_key": moto.secret_key,
        "path_style": True,
        "connect_timeout": 2,
        "read_timeout": 10,
    }
    args.update(overrides)
    return S3Backend(name, **args)  # type: ignore[arg-type]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of the call)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
