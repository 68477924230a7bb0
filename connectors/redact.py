"""Strip secrets from text before it is logged, raised or stored in a row.

Error messages routinely embed DSNs and URLs (psycopg, botocore, urllib); redacting
at the point where we build a message is the only place we can be sure of it.
"""

import re

_MASK = "***"

# scheme://user:password@host -> scheme://user:***@host; greedy up to the last '@' of the authority,
# so an unencoded '@' inside the password is masked too
_URL_PASSWORD = re.compile(r"(?P<pre>[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]*:)(?P<secret>[^\s/]+)(?=@)")
# key=value secrets in DSNs, query strings, env-style and JSON-ish text
_KV_SECRET = re.compile(
    r"(?P<pre>\b(?:password|passwd|pwd|secret|token|aws_secret_access_key|aws_session_token|secret_access_key"
    r"|session_token|SecretAccessKey|SessionToken|X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token"
    r"|sig|signature)[\"']?\s*[=:]\s*[\"']?)(?P<secret>[^\s&\"',;}]+)",
    re.IGNORECASE,
)
# AWS access key ids (long-term AKIA, temporary ASIA, ...)
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|APKA|AROA|ASCA)[A-Z0-9]{16}\b")
# AWS secret access keys: 40 chars of base64 alphabet with mixed case (hex digests are not mixed case)
_AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+=])(?=[A-Za-z0-9/+]*[a-z])(?=[A-Za-z0-9/+]*[A-Z])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")


def redact(text: object) -> str:
    """Return `text` as a string with URL passwords, key=value secrets and AWS keys masked."""
    s = str(text)
    s = _URL_PASSWORD.sub(lambda m: m.group("pre") + _MASK, s)
    s = _KV_SECRET.sub(lambda m: m.group("pre") + _MASK, s)
    s = _AWS_KEY_ID.sub(_MASK, s)
    s = _AWS_SECRET.sub(_MASK, s)
    return s
