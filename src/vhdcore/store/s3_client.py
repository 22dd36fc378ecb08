"""Talking to S3, shared by the S3 store (:mod:`vhdcore.store.s3`) and the
repository's S3 backend (:mod:`vhdcore.repo.backend.s3`): the boto3 client
(path-style addressing, checksums only where required -- S3-compatible servers
reject the newer CRC trailers -- and no retries of its own: :mod:`vhdcore.store.retry`
retries), the error codes and which of them are transient, and the ETag of a
multipart object."""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from ..errors import StoreError
from .retry import is_transient_status

__all__ = ["new_s3_client", "s3_error_code", "is_transient_s3", "multipart_etag"]

AUTH_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
    "InvalidClientTokenId",
    "AuthorizationHeaderMalformed",
}
NOT_FOUND_CODES = {"NoSuchBucket", "NoSuchKey", "NoSuchUpload", "404", "NotFound"}
TRANSIENT_CODES = {
    "SlowDown",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeTooSkewed",
}


def new_s3_client(endpoint_url: str | None, env: Mapping[str, str], *, missing: str,
                  access_key: str | None = None, secret_key: str | None = None,
                  region: str | None = None, timeout: float = 60.0,
                  max_connections: int = 16) -> tuple[Any, str | None]:
    """A boto3 S3 client and the endpoint it talks to (``endpoint_url``, else
    ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, else AWS: None).  Without
    boto3, :class:`StoreError` with the message ``missing``."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise StoreError(missing) from exc
    endpoint = (endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
                or None)
    config = Config(
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"max_attempts": 1, "mode": "standard"},
        connect_timeout=min(timeout, 20.0),
        read_timeout=timeout,
        max_pool_connections=max_connections,
    )
    session = boto3.session.Session(
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region or env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1",
    )
    return session.client("s3", endpoint_url=endpoint, config=config), endpoint


def s3_error_code(exc: BaseException) -> tuple[str, int | None]:
    """The S3 error code and HTTP status of a botocore ``ClientError`` (``""``/None
    when it has none)."""
    response = getattr(exc, "response", None) or {}
    code = str((response.get("Error") or {}).get("Code", ""))
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return code, status


def is_transient_s3(exc: BaseException) -> bool:
    """Whether a failed S3 call is worth retrying: a throttling or server error
    code or status, or a dropped connection (not a certificate failure)."""
    from botocore.exceptions import (
        ClientError,
        ConnectionError as BotoConnectionError,
        HTTPClientError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    if isinstance(exc, ClientError):
        code, status = s3_error_code(exc)
        return code in TRANSIENT_CODES or is_transient_status(status)
    if isinstance(exc, (BotoConnectionError, HTTPClientError, ReadTimeoutError, ResponseStreamingError)):
        return "certificate verify" not in str(exc)
    return isinstance(exc, (ConnectionError, TimeoutError))


def multipart_etag(part_etags: list[str]) -> str:
    """The ETag S3 gives an object completed from parts with these MD5s (hex),
    in order: the MD5 of their binary digests, then ``-`` and their count."""
    joined = b"".join(bytes.fromhex(e) for e in part_etags)
    return f"{hashlib.md5(joined, usedforsecurity=False).hexdigest()}-{len(part_etags)}"
