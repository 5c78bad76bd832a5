"""A real S3-compatible server (moto's server mode) on 127.0.0.1 for tests, and fsspec options for it."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3(bucket: str = "test-bucket") -> Iterator[str]:
    """Start moto on 127.0.0.1, create ``bucket``, point every S3 client (s3fs, boto3, pyarrow) at it through
    environment variables, and yield the endpoint URL. Everything is undone on exit."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,  # read by botocore (s3fs) for every client
        "AWS_ENDPOINT_URL_S3": endpoint,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        yield endpoint
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
