"""Module names from before the rooms still import, warn once, and forward every name to its new home."""

import importlib
import sys

import pytest

from pe_jax.deprecated import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_name_warns_and_forwards(old):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match="moved to"):
        alias = importlib.import_module(old)
    targets = [importlib.import_module(t) for t in MOVED[old]]
    public = [n for t in targets for n in vars(t) if not n.startswith("_") and callable(getattr(t, n))]
    assert public, f"{old}'s new home exports nothing"
    for name in public:
        assert getattr(alias, name) is next(getattr(t, name) for t in targets if hasattr(t, name))
    with pytest.raises(AttributeError, match="has no attribute"):
        alias.no_such_name  # noqa: B018


def test_old_names_of_the_embedding_job_keep_their_functions():
    for old in ("pe_jax.embed_output", "pe_jax.jobs", "pe_jax.sources"):
        sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning):
        from pe_jax.embed_output import read_embeddings  # noqa: F401
        from pe_jax.jobs import atomic_write, folder_lock  # noqa: F401
        from pe_jax.sources import tar_shards  # noqa: F401
    import pe_jax.embed

    assert pe_jax.embed.read_embeddings is read_embeddings
