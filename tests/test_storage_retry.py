"""Storage errors: ``io.retrying`` retries transient errors only, within bounds, then raises an error
naming the URI; in the stages a failed write is that image's ``write`` error row. Checked with a flaky
in-memory file system and with a real S3 server (moto) cut off in the middle of a run."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from pipeline_data import Stages, make_assets, write_images

from pipeline import io as storage
from pipeline.io import RetryPolicy, StorageError, is_transient, read_bytes, retrying, write_bytes_atomic

pytestmark = pytest.mark.timeout(300)
QUICK = RetryPolicy(attempts=4, first_delay=0.01, max_delay=0.05, deadline=30.0)
NAMES = ["rgba.png", "grey.png"]


class FlakyFS(MemoryFileSystem):
    """An in-memory store (``flaky://``) whose next ``failures`` reads/writes fail with a connection
    reset (-1: all of them), or with ``PermissionError`` when ``denied``."""

    protocol = "flaky"
    store: dict = {}  # noqa: RUF012 (fsspec's layout: the class holds the files)
    pseudo_dirs = [""]  # noqa: RUF012
    failures = 0
    denied = False
    calls = 0

    @classmethod
    def reset(cls, failures: int = 0, denied: bool = False) -> None:
        cls.failures, cls.denied, cls.calls = failures, denied, 0

    def _trouble(self) -> None:
        FlakyFS.calls += 1
        if FlakyFS.denied:
            raise PermissionError(errno.EACCES, "access denied by the test store")
        if FlakyFS.failures:
            FlakyFS.failures -= FlakyFS.failures > 0
            raise ConnectionResetError(errno.ECONNRESET, "connection reset by the test store")

    def _open(self, path, mode="rb", *args, **kwargs):  # every read and write (pipe_file too) opens
        self._trouble()
        return super()._open(path, mode, *args, **kwargs)


fsspec.register_implementation("flaky", FlakyFS, clobber=True)


def _stored(uri: str) -> bytes:
    return FlakyFS.store[FlakyFS._strip_protocol(uri)].getvalue()


def test_transient_errors_are_told_from_permanent_ones() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": code},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    wrapped = OSError(errno.EIO, "s3fs re-raised it")
    wrapped.__cause__ = client_error("InternalError", 500)
    transient = [ConnectionResetError(), TimeoutError(), OSError(errno.EBUSY, "busy"), wrapped,
                 EndpointConnectionError(endpoint_url="http://x"), ReadTimeoutError(endpoint_url="http://x"),
                 client_error("SlowDown", 503), client_error("ThrottlingException", 400),
                 client_error("TooManyRequests", 429)]
    permanent = [FileNotFoundError("x"), PermissionError("x"), IsADirectoryError("x"), ValueError("bad"),
                 client_error("NoSuchKey", 404), client_error("InvalidKey", 400),
                 client_error("AccessDenied", 403), OSError(errno.ENOSPC, "disk full"),
                 StorageError("already retried")]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)


def test_retrying_backs_off_and_gives_up_with_the_uri() -> None:
    calls, sleeps = [], []

    def flaky(n: int):
        def action() -> str:
            calls.append(1)
            if len(calls) <= n:
                raise ConnectionResetError("reset")
            return "done"
        return action

    policy = RetryPolicy(attempts=5, first_delay=1.0, max_delay=3.0, deadline=100.0)
    assert retrying(flaky(3), what="writing s3://b/x.png", policy=policy, sleep=sleeps.append) == "done"
    assert len(calls) == 4 and len(sleeps) == 3
    for got, base in zip(sleeps, [1.0, 2.0, 3.0], strict=True):  # doubling, capped, 25% jitter at most
        assert base <= got <= 1.25 * base
    calls.clear()
    with pytest.raises(StorageError, match=r"^writing s3://b/x.png failed after 5 attempts in .* s: "
                                           r"ConnectionResetError: reset$"):
        retrying(flaky(99), what="writing s3://b/x.png", policy=policy, sleep=lambda s: None)
    assert len(calls) == 5
    calls.clear()
    with pytest.raises(StorageError, match="after 1 attempts"):  # no new try past the deadline
        retrying(flaky(99), what="reading x", policy=RetryPolicy(deadline=0.0), sleep=lambda s: None)

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("s3://b/none.png")

    calls.clear()
    with pytest.raises(FileNotFoundError):  # permanent: raised at once, unchanged
        retrying(missing, what="reading s3://b/none.png", policy=policy, sleep=sleeps.append)
    assert len(calls) == 1


def test_reads_and_writes_ride_out_a_flaky_store(monkeypatch) -> None:
    monkeypatch.setattr(storage, "RETRY", QUICK)
    FlakyFS.reset(failures=2)
    write_bytes_atomic("flaky://bucket/a.png", b"image", {})
    assert FlakyFS.calls == 3 and _stored("flaky://bucket/a.png") == b"image"
    FlakyFS.reset(failures=3)
    assert read_bytes("flaky://bucket/a.png", {}) == b"image" and FlakyFS.calls == 4
    FlakyFS.reset(failures=-1)
    with pytest.raises(StorageError, match=r"^writing flaky://bucket/b.png failed after 4 attempts"):
        write_bytes_atomic("flaky://bucket/b.png", b"image", {})
    FlakyFS.reset(denied=True)
    with pytest.raises(PermissionError):
        write_bytes_atomic("flaky://bucket/b.png", b"image", {})
    assert FlakyFS.calls == 1  # not retried


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("storage")
    write_images(root / "all")
    (root / "in").mkdir()
    for name in NAMES:
        (root / "in" / name).write_bytes((root / "all" / name).read_bytes())
    weights, rtm = make_assets(root, root / "in", NAMES)
    return SimpleNamespace(root=root, inputs=root / "in", weights=weights, rtm=rtm)


def test_a_failed_write_is_the_images_error_row(assets, monkeypatch) -> None:
    monkeypatch.setattr(storage, "RETRY", QUICK)
    stages = Stages(weights=assets.weights, rtm=assets.rtm, seed=0)
    sources = [str(assets.inputs / n) for n in NAMES]
    FlakyFS.reset(failures=2)  # two failed PUTs, then fine: both images are written
    rows = stages.run(sources, str(assets.inputs), "flaky://out")
    assert [r["status"] for r in rows] == ["ok", "ok"] and FlakyFS.calls == 4
    assert {r["output"] for r in rows} == {"flaky://out/rgba.png", "flaky://out/grey.png"}
    FlakyFS.store.clear()
    FlakyFS.reset(failures=-1)  # the store is gone: error rows, not a crashed stage
    rows = stages.run(sources, str(assets.inputs), "flaky://out")
    assert [r["status"] for r in rows] == ["error", "error"] and FlakyFS.calls == 2 * QUICK.attempts
    for row, name in zip(rows, NAMES, strict=True):
        expected = f"write: StorageError: writing flaky://out/{name} failed after 4 attempts"
        assert row["error"].startswith(expected)
        assert row["output"] == "" and row["bytes_out"] == 0 and "\n" not in row["error"]
    assert not FlakyFS.store
    FlakyFS.reset(denied=True)
    (row,) = stages.run(sources[:1], str(assets.inputs), "flaky://out")
    assert row["error"] == ("write: flaky://out/rgba.png: PermissionError: [Errno 13] access denied by "
                            "the test store")


def test_an_s3_outage_in_the_middle_of_a_run(assets, monkeypatch) -> None:
    """A real S3 server (moto) behind a proxy: the reads succeed, then the connection is cut before the
    outputs are written: every image gets a ``write`` error row naming its output, nothing raises. A
    write that starts during the outage and outlasts it succeeds. After it, the same run writes all."""
    import boto3
    from s3util import Outage, moto_s3

    policy = RetryPolicy(attempts=8, first_delay=0.2, max_delay=0.5, deadline=30)
    monkeypatch.setattr(storage, "RETRY", policy)
    with moto_s3("outage-bucket") as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint)
        for name in NAMES:
            s3.put_object(Bucket="outage-bucket", Key=f"lr/{name}", Body=(assets.inputs / name).read_bytes())
        proxy = Outage(int(endpoint.rsplit(":", 1)[1]))
        options = {"endpoint_url": proxy.endpoint, "key": "testing", "secret": "testing",
                   "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5}}
        stages = Stages(weights=assets.weights, rtm=assets.rtm, seed=0, storage_options=options)
        sources = [f"s3://outage-bucket/lr/{n}" for n in NAMES]
        start = time.monotonic()
        lr, sr = "s3://outage-bucket/lr", "s3://outage-bucket/sr"
        rows = stages.run(sources, lr, sr, before_assemble=proxy.cut)
        assert [r["status"] for r in rows] == ["error", "error"]
        for row, name in zip(rows, NAMES, strict=True):
            assert row["bytes_in"] > 0  # read before the outage
            assert row["error"].startswith(f"write: StorageError: writing {sr}/{name} failed after 8 ")
        assert time.monotonic() - start < 120

        timer = threading.Timer(1.0, proxy.restore)  # the outage ends while the write is retrying
        timer.start()
        write_bytes_atomic("s3://outage-bucket/sr/during.bin", b"made it", options)
        timer.join()
        assert s3.get_object(Bucket="outage-bucket", Key="sr/during.bin")["Body"].read() == b"made it"

        rows = stages.run(sources, lr, sr)
        assert [r["status"] for r in rows] == ["ok", "ok"]
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="outage-bucket", Prefix="sr/")["Contents"]}
        assert {f"sr/{n}" for n in NAMES} <= keys
        proxy.cut()


def test_a_read_error_names_the_source(assets, tmp_path: Path) -> None:
    stages = Stages(weights=assets.weights, rtm=assets.rtm, seed=0)
    gone = str(assets.inputs / "gone.png")
    (row,) = stages.run([gone], str(assets.inputs), str(tmp_path))
    assert row["status"] == "error" and row["error"].startswith("read: ") and gone in row["error"]
