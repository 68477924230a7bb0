"""S3 access shared by sources and sinks: one place that turns options into clients.

Credentials come from the options when given, else from the standard AWS chain
(env, shared config, instance role). They are `SecretStr` so they never show up in
reprs, logs or error messages.
"""

import os
from functools import lru_cache

import boto3
import pyarrow.fs as pafs
from botocore.config import Config
from pydantic import BaseModel, ConfigDict, SecretStr


class S3Options(BaseModel):
    model_config = ConfigDict(frozen=True)

    endpoint_url: str | None = None
    region: str | None = None
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_session_token: SecretStr | None = None


def split_s3_url(url: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url}")
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"s3 URL has no bucket: {url}")
    return bucket, key


def _endpoint(opts: S3Options) -> str | None:
    return opts.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _secret(v: SecretStr | None) -> str | None:
    return v.get_secret_value() if v is not None else None


def s3_client(opts: S3Options | None = None):
    """A boto3 S3 client; cached per options and endpoint because client creation costs ~50 ms."""
    opts = opts or S3Options()
    return _cached_client(opts, _endpoint(opts))


@lru_cache(maxsize=16)
def _cached_client(opts: S3Options, endpoint: str | None):
    session = boto3.session.Session(
        aws_access_key_id=_secret(opts.aws_access_key_id),
        aws_secret_access_key=_secret(opts.aws_secret_access_key),
        aws_session_token=_secret(opts.aws_session_token),
        region_name=opts.region,
    )
    return session.client("s3", endpoint_url=endpoint, config=Config(retries={"mode": "standard", "max_attempts": 5}))


def arrow_s3_fs(opts: S3Options | None = None) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem (random access, so Parquet can be streamed row group by row group)."""
    opts = opts or S3Options()
    endpoint = _endpoint(opts)
    kwargs: dict = {}
    if endpoint:
        scheme, _, rest = endpoint.partition("://")
        kwargs.update(endpoint_override=rest or scheme, scheme=scheme if rest else "https")
    region = opts.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    elif endpoint:
        kwargs["region"] = "us-east-1"  # custom endpoints (MinIO, moto) ignore it, but pyarrow would probe AWS
    if opts.aws_access_key_id is not None:
        kwargs.update(
            access_key=_secret(opts.aws_access_key_id),
            secret_key=_secret(opts.aws_secret_access_key),
            session_token=_secret(opts.aws_session_token),
        )
    return pafs.S3FileSystem(**kwargs)
