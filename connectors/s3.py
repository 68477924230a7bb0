"""S3 access shared by sources and sinks: one place that turns options into clients.

Credentials come from the options when given, else from the standard AWS chain
(env, shared config, instance role). They are `SecretStr` so they never show up in
reprs, logs or error messages.
"""

import logging
import os
import random
import time
from collections.abc import Callable
from functools import lru_cache
from typing import TypeVar

import boto3
import pyarrow.fs as pafs
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
from botocore.exceptions import ConnectionError as BotoConnectionError
from pydantic import BaseModel, ConfigDict, SecretStr
from urllib3.exceptions import HTTPError as URLLib3Error

from connectors.redact import redact

log = logging.getLogger(__name__)
T = TypeVar("T")

# A whole read (request + body) is retried this often: botocore retries requests, not a body that breaks
# after the headers (truncated, reset), and pyarrow/our code would otherwise see half an object.
READ_ATTEMPTS = 6
_BACKOFF_S = 0.2  # doubled per attempt, with jitter: 0.2, 0.4, ... 3.2 s, about 6 s in all


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


def is_transient(e: BaseException) -> bool:
    """A failure a second try may not see: the connection or the body broke, or S3 said 5xx / slow down."""
    if isinstance(e, ClientError):
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or e.response.get("Error", {}).get("Code") in ("SlowDown", "Throttling", "RequestTimeout")
    # Connection, timeout and broken-body errors; not NoCredentialsError, ParamValidationError and the like.
    return isinstance(e, (HTTPClientError, BotoConnectionError, IncompleteReadError, URLLib3Error, ConnectionError,
                          TimeoutError))


def with_retries(what: str, fn: Callable[[], T], *, attempts: int = READ_ATTEMPTS) -> T:
    """`fn()`, called again with backoff while it fails transiently; the last failure is raised as it is."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - filtered by is_transient, re-raised otherwise
            if attempt == attempts or not is_transient(e):
                raise
            delay = _BACKOFF_S * 2 ** (attempt - 1) * (0.5 + random.random())
            log.warning("%s", redact(f"{what}: attempt {attempt}/{attempts} failed ({type(e).__name__}: {e});"
                                     f" retrying in {delay:.1f}s"))
            time.sleep(delay)
    raise AssertionError("unreachable")


class ObjectTooBig(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def get_object_bytes(client, bucket: str, key: str, *, max_bytes: int | None = None) -> bytes:
    """The whole object, re-requested while its body breaks; `ObjectTooBig` before reading past `max_bytes`.

    The length is checked here because botocore checks it only for unbounded reads.
    """

    def once() -> bytes:
        obj = client.get_object(Bucket=bucket, Key=key)
        size = obj["ContentLength"]
        if max_bytes is not None and size > max_bytes:
            obj["Body"].close()
            raise ObjectTooBig(size)
        with obj["Body"] as body:
            data = body.read()
        if len(data) != size:
            raise URLLib3Error(f"body ended after {len(data)} of {size} bytes")
        return data

    return with_retries(f"s3://{bucket}/{key}", once)
