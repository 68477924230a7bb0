"""connectors.redact and the row schema."""

import pytest

from connectors.redact import redact
from connectors.rows import ROW_ARROW_SCHEMA, OutputRow


@pytest.mark.parametrize(
    "text, secret",
    [
        ("postgresql://bob:hunter2@db:5432/x", "hunter2"),
        ("cannot connect to postgresql://bob:p@ss@w0rd@db/x: refused", "p@ss@w0rd"),
        ("host=db user=bob password=hunter2 dbname=x", "hunter2"),
        ("https://b.s3.amazonaws.com/k.png?X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F2024&X-Amz-Signature=abc123", "abc123"),
        ("key AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
        ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI"),
        ("secret wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY in text", "wJalrXUtnFEMI"),
        ('{"SecretAccessKey": "abcDEF123"}', "abcDEF123"),
    ],
)
def test_redact_removes_secrets(text, secret):
    out = redact(text)
    assert secret not in out and "***" in out


@pytest.mark.parametrize(
    "text",
    ["s3://bucket/a/b.pdf", "postgresql://bob@db/x", "sqlite:////abs/path.db", "/data/x.png: file is empty",
     "0123456789abcdef0123456789abcdef:3", "a" * 40, "/in/scan_0001.tif#row=7"],
)
def test_redact_keeps_harmless_text(text):
    assert redact(text) == text


def test_row_schema_matches_model():
    assert ROW_ARROW_SCHEMA.names == list(OutputRow.model_fields)
    r = OutputRow(id="x:img", source="s", status="ok", model="m", prompt="p", config_hash="h", job="catalog")
    assert r.created_at.endswith("+00:00") and r.page is None
    with pytest.raises(ValueError):
        OutputRow(id="x", source="s", status="ok", model="m", prompt="p", config_hash="h", job="digitize", created_at="yesterday")


def test_nan_from_pandas_batches_means_missing():
    r = OutputRow(id="x:1", source="s", status="error", error="e", model="m", prompt="p", config_hash="h",
                  job="digitize", page=float("nan"), decode_ms=float("nan"))
    assert r.page is None and r.decode_ms is None
