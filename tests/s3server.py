"""A real S3-compatible server for tests: moto in server mode on 127.0.0.1.

`from tests.s3server import s3_endpoint` makes the fixture available to a test module.
The server starts once per process (a few hundred ms) and its state is reset for
every test; the fixture points the standard AWS environment at it, so code under test
(and subprocesses such as Ray workers started during the test) needs no options.
"""

import atexit
import socket
import urllib.request
from collections.abc import Iterator

import pytest
from moto.server import ThreadedMotoServer

_server: ThreadedMotoServer | None = None
_endpoint: str | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server() -> str:
    """Start (once) and return the endpoint URL of the shared moto server."""
    global _server, _endpoint
    if _server is None:
        port = _free_port()
        _server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        _server.start()
        _endpoint = f"http://127.0.0.1:{port}"
        atexit.register(_server.stop)
    assert _endpoint is not None
    return _endpoint


def reset_server() -> None:
    req = urllib.request.Request(start_server() + "/moto-api/reset", method="POST")
    urllib.request.urlopen(req, timeout=10).read()


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Endpoint URL of an empty S3 server, with dummy credentials and the endpoint set in the environment."""
    endpoint = start_server()
    reset_server()
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    yield endpoint
