"""What a URL is to pe-jax, and the fsspec filesystem behind one: the lowest floor of the bytes room (the
package's paths-and-URLs calls and the atomic writes both stand on it).

Every filesystem opened here waits at most `net_timeout()` seconds for a connection or for the next bytes of an
answer (`PE_JAX_NET_TIMEOUT`, default 30) and retries a bounded number of times: a server that accepts and never
answers, or an unresponsive S3 or GCS endpoint, is one line naming the URL (`network_faults`), not a wait of
minutes. gs:// uses gcsfs's credentials as they are (`token="anon"` where `STORAGE_EMULATOR_HOST`, gcsfs's own
emulator variable, names a test server) and its JSON API (`pe_jax.storage.gcs`).
"""

from __future__ import annotations

import errno
import functools
import os
import re

from pe_jax.errors import MissingDependency, PeJaxError, UsageError, install_hint

CLOUD_HINT = install_hint("cloud", "fsspec s3fs gcsfs aiohttp")

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*://")
S3_TRIES = (1, 3)  # botocore's attempts per request, s3fs's tries of a timed-out one: at most 3 waits a request
NETWORK_MODULES = ("aiohttp", "botocore", "aiobotocore", "urllib3", "requests", "s3fs", "fsspec", "gcsfs", "google")
GS = ("gs://", "gcs://")


class NetworkError(PeJaxError, OSError):
    """A URL whose server could not be reached, did not answer in time, or refused the request: one line."""

    def __str__(self):
        return self.args[1] if len(self.args) > 1 else super().__str__()


def is_url(path) -> bool:
    """An fsspec URL (s3://, gs://, https://, memory://...); `file://` and `hf://` (pe_jax.checkpoints) are not."""
    return isinstance(path, str) and bool(_URL.match(path)) and not path.startswith(("file://", "hf://"))


def net_timeout() -> float:
    """Seconds a network request waits to connect, or for the next bytes of an answer (`PE_JAX_NET_TIMEOUT`)."""
    text = os.environ.get("PE_JAX_NET_TIMEOUT", "30")
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UsageError(f"PE_JAX_NET_TIMEOUT must be a number of seconds > 0, got {text!r}")
    return value


def _options(url: str) -> dict:
    """The timeouts and retries of `url`'s filesystem (an unbounded wait is each backend's default)."""
    timeout = net_timeout()
    if url.startswith(("s3://", "s3a://")):
        options = {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout,
                                     "retries": {"max_attempts": S3_TRIES[0], "mode": "standard"}}}
        if os.environ.get("AWS_ENDPOINT_URL"):
            options["client_kwargs"] = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
        return options
    if url.startswith(("http://", "https://")):
        return {"client_kwargs": {"timeout": _client_timeout(timeout)}}
    if url.startswith(GS):
        options = {"requests_timeout": _client_timeout(timeout)}  # gcsfs passes it to each aiohttp request
        if os.environ.get("STORAGE_EMULATOR_HOST", "default") != "default":  # gcsfs's emulator: no credentials
            options["token"] = "anon"
        return options
    return {}


def _client_timeout(timeout: float):
    import aiohttp

    # no total limit (a large download may take long); each connect and each read waits at most `timeout`
    return aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)


def filesystem(url: str):
    """(fsspec filesystem, path within it) for `url`, with timeouts and bounded retries (see the module).

    Args:
        url: an fsspec URL (s3://bucket/key, https://host/file, memory://x).

    Example:
        >>> fs, path = filesystem("memory://pe-jax-doc/a.txt")
        >>> path
        '/pe-jax-doc/a.txt'
    """
    try:
        import fsspec
    except ImportError:
        raise MissingDependency(f"{url}: object-store URLs need fsspec and its backends: {CLOUD_HINT}") from None
    try:
        if url.startswith(GS):
            from pe_jax.storage.gcs import BoundedGCSFileSystem

            fs = BoundedGCSFileSystem(use_listings_cache=False, **_options(url))
            path = fs._strip_protocol(url)
        else:
            fs, path = fsspec.core.url_to_fs(url, use_listings_cache=False, **_options(url))
    except ImportError as e:  # the backend (s3fs, gcsfs, aiohttp) is missing
        raise MissingDependency(f"{url}: {e}; {CLOUD_HINT}") from None
    if url.startswith(("s3://", "s3a://")):
        fs.retries = S3_TRIES[1]  # s3fs's own retry loop over botocore's (default 5)
    return fs, path


def network_error(url: str, e: BaseException) -> NetworkError | None:
    """`e`, raised while reaching `url`, as one line naming the URL; None when it is no network fault (a missing
    object stays a FileNotFoundError, anything else propagates as it was).

    Args:
        url: the URL being read or written.
        e: what the filesystem raised.

    Example:
        >>> str(network_error("s3://b/k", PermissionError(13, "Forbidden")))
        's3://b/k: access denied (Forbidden): check the credentials and the bucket policy'
    """
    if isinstance(e, PeJaxError | FileNotFoundError):
        return None
    lines = str(e).splitlines()
    gcs_forbidden = type(e) is OSError and lines[:1] and lines[0].startswith("Forbidden: ")  # "...PATH\nWHY"
    if isinstance(e, PermissionError) or gcs_forbidden:
        reason = (lines[1] if gcs_forbidden and len(lines) > 1 else e.strerror or str(e)) or "Forbidden"
        return NetworkError(errno.EACCES, f"{url}: access denied ({reason}): check the credentials and the bucket "
                                          "policy", url)
    if isinstance(e, TimeoutError) or "Timeout" in type(e).__name__:
        return NetworkError(errno.ETIMEDOUT, f"{url}: no answer within {net_timeout():g} s (after bounded retries); "
                                             "the server or the network is down (PE_JAX_NET_TIMEOUT sets the wait)",
                            url)
    if isinstance(e, ConnectionError) or type(e).__module__.split(".")[0] in NETWORK_MODULES:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return NetworkError(errno.ECONNREFUSED if isinstance(e, ConnectionRefusedError) else errno.EIO,
                            f"{url}: cannot reach the server ({reason})", url)
    return None


def network_faults(fn):
    """Decorates a storage call whose first argument is a path or URL: a network fault on a URL becomes one
    `NetworkError` naming it (`network_error`); local paths and other errors pass through unchanged.

    Args:
        fn: the call.

    Example:
        >>> @network_faults
        ... def size(url): ...
    """
    @functools.wraps(fn)
    def call(path, *args, **kwargs):
        try:
            return fn(path, *args, **kwargs)
        except Exception as e:
            error = network_error(path, e) if is_url(path) else None
            if error is None:
                raise
            raise error from e
    return call
