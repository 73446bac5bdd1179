"""What a URL is to pe-jax, and the fsspec filesystem behind one: the lowest floor of the bytes room (the
package's paths-and-URLs calls and the atomic writes both stand on it)."""

from __future__ import annotations

import os
import re

from pe_jax.errors import MissingDependency, install_hint

CLOUD_HINT = install_hint("cloud", "fsspec s3fs gcsfs aiohttp")

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*://")


def is_url(path) -> bool:
    """An fsspec URL (s3://, gs://, https://, memory://...); `file://` and `hf://` (pe_jax.checkpoints) are not."""
    return isinstance(path, str) and bool(_URL.match(path)) and not path.startswith(("file://", "hf://"))


def filesystem(url: str):
    """(fsspec filesystem, path within it) for `url`."""
    try:
        import fsspec
    except ImportError:
        raise MissingDependency(f"{url}: object-store URLs need fsspec and its backends: {CLOUD_HINT}") from None
    options = {}
    if url.startswith(("s3://", "s3a://")) and os.environ.get("AWS_ENDPOINT_URL"):
        options["client_kwargs"] = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    try:
        fs, path = fsspec.core.url_to_fs(url, use_listings_cache=False, **options)
    except ImportError as e:  # the backend (s3fs, gcsfs, aiohttp) is missing
        raise MissingDependency(f"{url}: {e}; {CLOUD_HINT}") from None
    return fs, path
