"""Talking to Swift, shared by the Swift store (:mod:`vhdcore.store.swift`) and the
repository's Swift backend (:mod:`vhdcore.repo.backend.swift`): the credentials
(:func:`swift_auth_options`), the one container listing loop (:func:`iter_listing`)
and the reset of a failed connection (:func:`drop_connection`).

Credentials, first match wins:

1. options ``auth_url``/``user``/``key`` (with ``auth_version``,
   ``tenant_name``, ``os_options``), and/or ``storage_url`` + ``auth_token``;
2. ``OS_STORAGE_URL`` + ``OS_AUTH_TOKEN`` (a token you already have) --
   combined with the settings below, if present, to re-authenticate;
3. ``ST_AUTH``/``ST_USER``/``ST_KEY`` (v1 auth, ``ST_AUTH_VERSION``), e.g.
   tempauth or Rackspace's ``.../v1.0`` identity endpoint;
4. ``OS_AUTH_URL``/``OS_USERNAME``/``OS_PASSWORD`` with ``OS_PROJECT_NAME``
   (or ``OS_TENANT_NAME``), ``OS_*_DOMAIN_NAME``, ``OS_REGION_NAME``... for
   Keystone v2/v3 (``OS_IDENTITY_API_VERSION``; needs python-keystoneclient).
"""
from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ..errors import StoreAuthError
from .base import GiB, SegmentLimits

__all__ = ["swift_auth_options", "iter_listing", "drop_connection", "LISTING_PAGE",
           "DEFAULT_SWIFT_LIMITS", "limits_from_info", "swift_time"]

#: Swift's defaults, used when ``GET /info`` does not answer
DEFAULT_SWIFT_LIMITS = SegmentLimits(1, 5 * GiB, 1000)
_DEFAULT_MAX_MANIFEST_SIZE = 8 * 1024 * 1024


def _env(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = env.get(name)
        if value:
            return value
    return None


def _explicit_auth(options: Mapping[str, Any]) -> dict[str, Any]:
    """Connection arguments from the options ``auth_url``/``user``/``key``..."""
    auth_url = options["auth_url"]
    kw: dict[str, Any] = {"authurl": auth_url, "user": options.get("user"),
                          "key": options.get("key")}
    version = options.get("auth_version")
    if version is None:
        version = "3" if "/v3" in auth_url else "2.0" if "/v2" in auth_url else "1.0"
    kw["auth_version"] = str(version)
    if options.get("tenant_name"):
        kw["tenant_name"] = options["tenant_name"]
    if options.get("os_options"):
        kw["os_options"] = dict(options["os_options"])
    return kw


def _v1_env_auth(env: Mapping[str, str]) -> dict[str, Any]:
    """Connection arguments from ``ST_AUTH``/``ST_USER``/``ST_KEY`` (v1 auth)."""
    return {"authurl": env["ST_AUTH"], "user": _env(env, "ST_USER"),
            "key": _env(env, "ST_KEY"),
            "auth_version": _env(env, "ST_AUTH_VERSION") or "1.0"}


def _keystone_env_auth(env: Mapping[str, str]) -> dict[str, Any]:
    """Connection arguments from the ``OS_*`` variables (Keystone v2/v3)."""
    auth_url = env["OS_AUTH_URL"]
    version = _env(env, "OS_IDENTITY_API_VERSION", "OS_AUTH_VERSION")
    if version is None:
        version = "3" if "/v3" in auth_url else "2.0"
    os_options = {
        "tenant_name": _env(env, "OS_PROJECT_NAME", "OS_TENANT_NAME"),
        "project_name": _env(env, "OS_PROJECT_NAME", "OS_TENANT_NAME"),
        "tenant_id": _env(env, "OS_PROJECT_ID", "OS_TENANT_ID"),
        "project_id": _env(env, "OS_PROJECT_ID", "OS_TENANT_ID"),
        "user_domain_name": _env(env, "OS_USER_DOMAIN_NAME"),
        "user_domain_id": _env(env, "OS_USER_DOMAIN_ID"),
        "project_domain_name": _env(env, "OS_PROJECT_DOMAIN_NAME"),
        "project_domain_id": _env(env, "OS_PROJECT_DOMAIN_ID"),
        "region_name": _env(env, "OS_REGION_NAME"),
        "endpoint_type": _env(env, "OS_ENDPOINT_TYPE", "OS_INTERFACE"),
        "service_type": _env(env, "OS_SERVICE_TYPE"),
    }
    return {"authurl": auth_url, "user": _env(env, "OS_USERNAME"),
            "key": _env(env, "OS_PASSWORD"), "auth_version": str(version),
            "os_options": {k: v for k, v in os_options.items() if v}}


def swift_auth_options(options: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """swiftclient ``Connection`` keyword arguments from explicit options or the environment."""
    storage_url = options.get("storage_url") or _env(env, "OS_STORAGE_URL")
    auth_token = options.get("auth_token") or _env(env, "OS_AUTH_TOKEN")
    kw: dict[str, Any] = {}
    if options.get("auth_url"):
        kw = _explicit_auth(options)
    elif _env(env, "ST_AUTH"):
        kw = _v1_env_auth(env)
    elif _env(env, "OS_AUTH_URL"):
        kw = _keystone_env_auth(env)
    if storage_url and auth_token:
        kw.update(preauthurl=storage_url, preauthtoken=auth_token)
    elif "authurl" not in kw:
        raise StoreAuthError(
            "no Swift credentials: pass auth_url/user/key or storage_url/auth_token, or set "
            "ST_AUTH/ST_USER/ST_KEY, OS_AUTH_URL/OS_USERNAME/OS_PASSWORD/OS_PROJECT_NAME, or "
            "OS_STORAGE_URL and OS_AUTH_TOKEN"
        )
    elif not kw.get("user") or not kw.get("key"):
        raise StoreAuthError(f"Swift auth URL {kw['authurl']} given without a user and key")
    for name in ("cacert", "insecure"):
        if options.get(name) is not None:
            kw[name] = options[name]
    return kw


#: objects asked for per page of a container listing
LISTING_PAGE = 10000


def iter_listing(page: Callable[[str], list[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    """Every object of a container listing, a page at a time: ``page(marker)``
    returns the objects after ``marker`` (at most :data:`LISTING_PAGE`), an
    empty list at the end.  The one listing loop of the Swift store and the
    repository's Swift backend."""
    marker = ""
    while True:
        objs = page(marker)
        if not objs:
            return
        yield from objs
        marker = str(objs[-1]["name"])


def drop_connection(local: threading.local) -> None:
    """Close this thread's connection (``local.conn``) after a failed call,
    so that the retry opens a fresh one."""
    conn = getattr(local, "conn", None)
    if conn is not None:
        try:
            conn.close()
        except Exception:
            pass
        conn.http_conn = None


def limits_from_info(info: Mapping[str, Any], segment_path: str) -> SegmentLimits:
    """The segment limits a cluster's ``GET /info`` announces (Swift's defaults
    for what it leaves out); the manifest size caps the segment count, each
    entry being about as long as one for ``segment_path``."""
    limits = DEFAULT_SWIFT_LIMITS
    slo = info.get("slo") or {}
    swift = info.get("swift") or {}
    max_segments = int(slo.get("max_manifest_segments", limits.max_segments))
    max_manifest = int(slo.get("max_manifest_size", _DEFAULT_MAX_MANIFEST_SIZE))
    entry = len(json.dumps({"path": segment_path, "etag": "0" * 32,
                            "size_bytes": 10**12})) + 2
    return SegmentLimits(
        int(slo.get("min_segment_size", limits.min_segment_size)),
        int(swift.get("max_file_size", limits.max_segment_size)),
        min(max_segments, max_manifest // entry),
    )


def swift_time(value: Any) -> float | None:
    """A container listing's ``last_modified`` (ISO 8601, UTC) as POSIX seconds."""
    import datetime

    if not value:
        return None
    try:
        dt = datetime.datetime.fromisoformat(str(value).rstrip("Z"))
    except ValueError:
        return None
    return dt.replace(tzinfo=datetime.timezone.utc).timestamp()
