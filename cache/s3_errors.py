"""What an S3 failure means: whether another try can help, and what to tell the user.

botocore's errors, read by their type and the server's error code: :func:`transient` (a broken
connection, a timeout, a short read, a 5xx or 429 answer) is worth another try, after
:func:`back_off`, up to :func:`retries` times; :func:`missing` and :func:`changed` are answers
about the object; :func:`explain` says what a failure was and what to do, and
:func:`setting_hint` which AWS setting to fix when no client can be made. Standard library
only: the worker's S3 store imports it.
"""

from __future__ import annotations

import time

from envmgr.cache.store import StoreError
from envmgr.knobs import env_int

__all__ = [
    "ShortReadError",
    "back_off",
    "changed",
    "error_code",
    "explain",
    "is_botocore",
    "missing",
    "retries",
    "setting_hint",
    "transient",
]

#: botocore errors that no retry can fix (configuration, not the network).
_NEVER_TRANSIENT = frozenset(
    {"NoCredentialsError", "PartialCredentialsError", "NoRegionError", "ParamValidationError",
     "InvalidRegionError", "UnknownServiceError", "ProfileNotFound", "EndpointResolutionError"}
)  # fmt: skip


class ShortReadError(Exception):
    """The server ended the body early: retried like a broken stream."""


def error_code(exc: Exception, default: str) -> str:
    """The S3 error code of a botocore error (*default* when the server never answered)."""
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", default))


def is_botocore(exc: Exception) -> bool:
    """A botocore or boto3 error (its name says what failed: EndpointConnectionError, ...)."""
    return type(exc).__module__.split(".")[0] in ("botocore", "boto3", "s3transfer")


def transient(exc: Exception) -> bool:
    """A broken connection, a timeout, a short read or a 5xx/429 answer: worth another
    try. Any other answer from the server (403, 404, 400, …) is not, nor a client that
    could not be made."""
    if isinstance(exc, StoreError) or type(exc).__name__ in _NEVER_TRANSIENT:
        return False  # trying again cannot help: say so at once
    response = getattr(exc, "response", None)
    if not response:
        return True
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return status >= 500 or status == 429


def changed(exc: Exception) -> bool:
    """The object is no longer the one a read began with (its ETag no longer matches)."""
    return error_code(exc, "") in ("PreconditionFailed", "412")


def missing(exc: Exception) -> bool:
    """The object (or the bucket's key) is not there."""
    return error_code(exc, "") in ("NoSuchKey", "404", "NotFound")


def explain(exc: Exception) -> tuple[str, str | None]:
    """What *exc* (a failed request) was, and what to do about it when that is known."""
    code = error_code(exc, type(exc).__name__)
    cause = code
    hint = None
    if getattr(exc, "response", None) is None and not is_botocore(exc):
        # Not an answer of the server: a response cut short or garbled on the way
        # (boto3 then fails reading a field it expects, e.g. KeyError 'UploadId').
        text = " ".join(str(exc).split())[:120]
        cause = f"a cut or malformed response ({type(exc).__name__}{': ' if text else ''}{text})"
        hint = "the connection to the S3 endpoint broke mid-answer; check the network"
    if code in (
        "AccessDenied",
        "403",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "NoCredentialsError",
    ):
        hint = "check the credentials and their permissions on this bucket"
    elif code in ("NoSuchBucket",):
        hint = "create the bucket or fix the store URL"
    elif code in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError"):
        hint = "the S3 endpoint did not answer; check AWS_ENDPOINT_URL and the network"
    elif code == "EndpointResolutionError":  # botocore's words say which setting
        cause = f"{code}: {' '.join(str(exc).split())[:200]}"
        hint = setting_hint(exc)
    return cause, hint


def setting_hint(exc: Exception) -> str:
    """What to fix when botocore cannot make a client out of the AWS settings."""
    name = type(exc).__name__
    if name == "ProfileNotFound":
        return "AWS_PROFILE names a profile that is not in the AWS config; fix or unset it"
    if name in ("InvalidRegionError", "NoRegionError"):
        return "set AWS_REGION (or AWS_DEFAULT_REGION) to a region name such as us-east-1"
    if "endpoint" in str(exc).lower():
        return (
            "AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3, or endpoint_url in the AWS config) "
            "must be a URL such as http://host:9000"
        )
    return "check the AWS settings: AWS_PROFILE, AWS_REGION, AWS_ENDPOINT_URL, ~/.aws/config"


def back_off(attempt: int) -> None:
    """The pause before try *attempt* (1, 2, …) of a read or HEAD: 0.5 s doubling, at most 4 s."""
    time.sleep(min(4.0, 0.25 * 2**attempt))


def retries() -> int:
    """``ENVMGR_S3_RETRIES``: further tries of a read or HEAD that broke, 0 to 100 (default
    5). :class:`~envmgr.cache.s3.S3Store` reads it when made, so a bad value stops a command
    at its start, not at its first broken read."""
    return env_int("ENVMGR_S3_RETRIES", 5, low=0, high=100)
