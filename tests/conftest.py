"""Fixtures shared by test files: a local S3-compatible server on loopback."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from featstore.store import spec


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files holding a `slow` test first (in their own order), then the others: `make test`
    hands whole files to two processes in this order (pytest-xdist's `--dist loadfile
    --no-loadscope-reorder`), so that the long files start early and the short ones fill the end
    instead of one process finishing the GPT-2-dims run alone."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: order kept within each


@dataclass(frozen=True)
class S3:
    endpoint: str
    bucket: str

    @property
    def options(self) -> dict[str, str]:
        return {"endpoint_url": self.endpoint, "key": "test", "secret": "test"}

    def url(self, prefix: str = "store.zarr") -> str:
        return f"s3://{self.bucket}/{prefix}"

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under the bucket (or `prefix` in it)."""
        import s3fs

        fs = s3fs.S3FileSystem(**self.options, skip_instance_cache=True)
        return sorted(k.split("/", 1)[1] for k in fs.find(f"{self.bucket}/{prefix}"))


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server in a thread of this process, on a free loopback port."""
    server_module = pytest.importorskip("moto.server", reason="needs the dev extra: moto, flask")
    pytest.importorskip("s3fs", reason="needs the s3 extra: pip install '.[s3]'")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch) -> S3:
    """A fresh bucket; the environment points featstore (and its subprocesses) at it."""
    import boto3

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"featstore-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    found = S3(s3_endpoint, bucket)
    monkeypatch.setenv(spec.STORAGE_OPTIONS_ENV, json.dumps(found.options))
    return found
