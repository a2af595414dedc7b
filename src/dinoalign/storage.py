"""S3-compatible storage settings in one place.

Every client that touches object storage (boto3, fsspec/s3fs, pyarrow's S3 filesystem
used by Ray Data and Ray Train, MLflow, the DVC remote) is configured from the same
environment variables: ``AWS_ENDPOINT_URL`` (or ``DINOALIGN_S3_ENDPOINT``),
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``. Credentials
are never read from params.yaml and never logged.
"""

from __future__ import annotations

import dataclasses
import os
from typing import IO, Any

import fsspec


@dataclasses.dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None
    access_key: str | None
    secret_key: str | None
    region: str

    def __repr__(self) -> str:  # never print secrets
        return f"S3Settings(endpoint_url={self.endpoint_url!r}, region={self.region!r})"


def s3_settings() -> S3Settings:
    return S3Settings(
        endpoint_url=os.environ.get("DINOALIGN_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL"),
        access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    )


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def fs_for(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for a local path, ``file://``, ``s3://`` or ``http(s)://`` URI."""
    if uri.startswith("s3://"):
        s = s3_settings()
        fs = fsspec.filesystem(
            "s3",
            key=s.access_key,
            secret=s.secret_key,
            endpoint_url=s.endpoint_url,
            client_kwargs={"region_name": s.region},
            skip_instance_cache=False,
        )
        return fs, uri[len("s3://") :]
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def open_uri(uri: str, mode: str = "rb") -> IO[Any]:
    fs, path = fs_for(uri)
    return fs.open(path, mode)


def read_bytes(uri: str) -> bytes:
    with open_uri(uri, "rb") as f:
        return f.read()


def boto3_client(service: str = "s3") -> Any:
    import boto3

    s = s3_settings()
    return boto3.client(
        service,
        endpoint_url=s.endpoint_url,
        aws_access_key_id=s.access_key,
        aws_secret_access_key=s.secret_key,
        region_name=s.region,
    )


def pyarrow_fs(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path) for Ray Data / Ray Train / parquet I/O."""
    import pyarrow.fs as pafs

    if uri.startswith("s3://"):
        s = s3_settings()
        endpoint = s.endpoint_url or None
        scheme = "https"
        if endpoint and "://" in endpoint:
            scheme, endpoint = endpoint.split("://", 1)
        fs = pafs.S3FileSystem(
            access_key=s.access_key,
            secret_key=s.secret_key,
            endpoint_override=endpoint,
            scheme=scheme,
            region=s.region,
        )
        return fs, uri[len("s3://") :]
    return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))
