"""gs:// through gcsfs, with the storage policy of `pe_jax.storage.urls`: imported only for a gs:// URL (gcsfs is
an optional dependency).

gcsfs's JSON-API filesystem (`gcsfs.core.GCSFileSystem`), not the gRPC one `gcsfs.GCSFileSystem` names by
default (`ExtendedGcsFileSystem`): that one first asks a bucket's storage layout over gRPC, each try waiting 30 s
and retried for 60 s, a wait nothing here can bound. Zonal (Rapid) buckets' gRPC reads are therefore not used.
"""

from __future__ import annotations

import contextvars
import functools
import logging

from gcsfs.core import GCSFileSystem
from gcsfs.retry import retry_request

GCS_TRIES = 3  # tries of a request (gcsfs: 6, with backoff to 32 s): at most 3 waits, as for S3
_OURS = contextvars.ContextVar("pe_jax_gcs_request", default=False)


class _QuietRetries(logging.Filter):
    """Drops gcsfs's traceback-bearing "out of retries" records of pe-jax's own requests: their fault is raised
    and said in one line (`network_faults`); other users' gcsfs requests keep their records."""

    def filter(self, record):
        return not (_OURS.get() and record.funcName == "retry_request")


logging.getLogger("gcsfs").addFilter(_QuietRetries())


def _bounded(method):
    # gcsfs fixes its retries when the class is defined (`@retry_request(retries=6)`): re-wrap the undecorated call
    retried = retry_request(retries=GCS_TRIES)(method.__wrapped__)

    @functools.wraps(method)
    async def call(*args, **kwargs):
        token = _OURS.set(True)
        try:
            return await retried(*args, **kwargs)
        finally:
            _OURS.reset(token)
    return call


class BoundedGCSFileSystem(GCSFileSystem):
    """gcsfs's JSON-API filesystem whose requests are tried at most `GCS_TRIES` times; the timeouts of each try
    come from `requests_timeout` (`pe_jax.storage.urls`).

    Example:
        >>> BoundedGCSFileSystem._strip_protocol("gs://bucket/key")
        'bucket/key'
    """

    _request = _bounded(GCSFileSystem._request)
    _get_file_request = _bounded(GCSFileSystem._get_file_request)
    _get_file_concurrent = _bounded(GCSFileSystem._get_file_concurrent)
