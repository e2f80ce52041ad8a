"""A real S3 API on 127.0.0.1 for the storage tests: moto's server in a thread of this process
(its own HTTP server; the client side is the real s3fs / botocore over TCP, nothing patched),
a fresh bucket per test, and the environment that points every client at it (subprocesses and
dask workers inherit it)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

_buckets = itertools.count()


@pytest.fixture(scope="session")
def s3_server():
    """The moto S3 server's endpoint URL (a free port on 127.0.0.1), for the whole session."""
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def s3_environment(endpoint: str, cache_dir: Path) -> dict:
    """What a process needs to reach the moto server: credentials the usual way (AWS_* variables),
    the endpoint through teranprep's storage options, no instance-metadata lookups."""
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "TERANPREP_STORAGE_OPTIONS": json.dumps({"endpoint_url": endpoint}),
            "TERANPREP_CACHE_DIR": str(cache_dir)}


@pytest.fixture
def s3(s3_server, tmp_path, monkeypatch):
    """A fresh, empty bucket on the moto server; this process's environment points at it.
    Returns an object with `.url(path)`, `.fs` (an s3fs filesystem), `.endpoint` and `.env`."""
    import s3fs
    env = s3_environment(s3_server, tmp_path / "cache")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TERANPREP_CACHE_GB", "20")  # restored (removed) after the test
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_server,
                           skip_instance_cache=True, use_listings_cache=False)
    bucket = f"prep-test-{next(_buckets)}-{tmp_path.name.lower().replace('_', '-')[:30]}"
    fs.mkdir(bucket)
    from teranprep.manifests import remote
    remote._localized.clear()  # a mirror's freshness memo must not cross tests
    return Bucket(bucket, fs, s3_server, env)


class Bucket:
    def __init__(self, name, fs, endpoint, env):
        self.name, self.fs, self.endpoint, self.env = name, fs, endpoint, env

    def url(self, path: str = "") -> str:
        return f"s3://{self.name}/{path}".rstrip("/") if path else f"s3://{self.name}"

    def upload(self, local: Path, prefix: str) -> str:
        """Every file under `local` to s3://bucket/prefix/..., same relative names; its URL."""
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                self.fs.put_file(str(path), f"{self.name}/{prefix}/{path.relative_to(local).as_posix()}")
        return self.url(prefix)

    def names(self, prefix: str) -> list:
        """Relative names under the prefix, listed only: safe while a run is replacing objects
        (reading each one, as objects() does, can meet a key deleted between list and get)."""
        self.fs.invalidate_cache()
        base = f"{self.name}/{prefix}".rstrip("/") + "/"
        return [p[len(base):] for p in sorted(self.fs.find(base)) if not p.endswith(".prep-lock.json")]

    def objects(self, prefix: str) -> dict:
        """{relative name: bytes} of every object under the prefix (the lock object left out)."""
        self.fs.invalidate_cache()
        base = f"{self.name}/{prefix}".rstrip("/") + "/"
        return {p[len(base):]: self.fs.cat_file(p) for p in sorted(self.fs.find(base))
                if not p.endswith(".prep-lock.json")}
