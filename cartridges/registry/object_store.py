"""Create an object only if none exists, in one step, on the stores that can: what makes a version
number on an object store belong to one publisher.

A local folder has rename(2) for this (see `atomic`). Object stores have no folder rename, but S3
(`If-None-Match: *`, which s3fs sends for `mode="create"`) and GCS (generation precondition 0,
gcsfs's `mode="create"`) refuse to write a key that exists, atomically on the server, whoever
writes it. fsspec's generic `mode="create"` checks then writes, which two processes can interleave,
so a store not known to do it on the server is refused with a clear error instead.
"""

from __future__ import annotations

import socket
import threading

import fsspec

from cartridges.errors import CartridgeError

CONDITIONAL_WRITE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs"})
_IN_PROCESS = threading.Lock()  # memory:// lives in one process: a lock there is enough


def open_store(url: str, what: str):
    """(filesystem, root path) of a folder or fsspec URL; a missing client package or an unknown scheme
    is one line naming `what` (the registry, the runs root) and the fix."""
    try:
        # No listings cache: a long-running reader (the server, the scheduler) must see what other
        # processes write, and a publisher the version numbers others took.
        return fsspec.core.url_to_fs(url, use_listings_cache=False)
    except ImportError as exc:  # fsspec names the package: "Install s3fs to access S3"
        raise CartridgeError(f"{what} {url}: {exc} (pip install it, or use a local folder)") from None
    except ValueError as exc:
        scheme = url.partition("://")[0]
        raise CartridgeError(
            f"{what} {url}: unknown storage scheme {scheme + '://'!r} ({exc}); use a folder or an fsspec URL such as s3://bucket/folder"
        ) from None


def storage_problem(exc: BaseException) -> str | None:
    """One line for a failure to reach or use a store (nothing listening, no credentials, access denied),
    looking through the exceptions it was raised from; None when `exc` is not one (a bug keeps its traceback)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        kinds = {cls.__name__ for cls in type(exc).__mro__}
        said = " ".join(str(exc).split())[:200]
        if kinds & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}:
            return (
                f"no credentials for the object store ({said}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE), or use a local folder"
            )
        if kinds & {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError"}:
            return f"cannot reach the object store ({said}): check AWS_ENDPOINT_URL and that the store is up"
        if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror)):
            return f"cannot connect ({exc.strerror or said}): check the address (a store's URL, RAY_ADDRESS) and that its server is up"
        if isinstance(exc, PermissionError):
            return f"permission denied ({said}): check the credentials or the folder's permissions"
        exc = exc.__cause__ or exc.__context__
    return None


def protocols(fs) -> set[str]:
    return set(fs.protocol) if isinstance(fs.protocol, (tuple, list)) else {fs.protocol}


def require_conditional_writes(fs, url: str, what: str) -> None:
    """Raise unless `fs` creates objects exclusively (checked before anything is uploaded)."""
    if protocols(fs) & (CONDITIONAL_WRITE_PROTOCOLS | {"memory"}):
        return
    scheme = sorted(protocols(fs))[0]
    raise CartridgeError(
        f"cannot {what} in {url}: {scheme}:// offers no conditional writes (S3 If-None-Match, GCS generation "
        "preconditions), so two publishers could take the same version; use s3://, gs:// or a local folder"
    )


def require_bucket(fs, root: str, url: str, what: str) -> None:
    """Writing never creates a bucket (s3fs's `makedirs` would): a mistyped bucket name is one line, not
    a new bucket holding what was meant for another."""
    if not protocols(fs) & CONDITIONAL_WRITE_PROTOCOLS:
        return
    bucket = root.strip("/").split("/", 1)[0]
    if not fs.exists(bucket):
        raise CartridgeError(
            f"{what} {url}: bucket {bucket!r} does not exist (or this account cannot see it); "
            "create it first (e.g. `aws s3 mb s3://" + bucket + "`) or fix the URL"
        )


def create_exclusively(fs, path: str, data: bytes) -> bool:
    """Write `data` at `path` unless an object is there already; True when this call created it."""
    if protocols(fs) & CONDITIONAL_WRITE_PROTOCOLS:
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:  # s3fs and gcsfs turn the store's 412 Precondition Failed into this
            return False
        return True
    with _IN_PROCESS:
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return True
