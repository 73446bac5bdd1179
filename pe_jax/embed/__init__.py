"""The embedding job: a folder of inputs (tar shards, images, lists, texts) to embeddings on disk, resumable.

- `job`: the entry points (`run` picks the engine, `embed` runs one with a model in hand);
- `options`: the job's options (`EmbedOptions`), checked once;
- `parts`: the input listing cut into parts, pinned in the manifest;
- `pipeline`: decoding ahead, batching, encoding;
- `output`: the parts' files, the manifest and reading them back (`read_embeddings`, `read_tile_features`);
- `layout`: clip-retrieval's output layout;
- `ray_engine`: the same job on a Ray cluster;
- `search`: a faiss index over a finished job, and queries against it.

The names below import on first use (PEP 562): the command line reads `pe_jax.embed.options`' constants for
its choices without loading jax.

Example:
    >>> from pe_jax.embed import read_embeddings, run  # doctest: +SKIP
    >>> run("shards/{00000..00009}.tar", "emb/", checkpoint="ckpt/")  # doctest: +SKIP
    >>> vectors, rows = read_embeddings("emb/")  # doctest: +SKIP
"""

import importlib

__all__ = ["ENGINES", "EmbedOptions", "Settings", "check_sizes", "decode_ahead", "embed", "item_loader", "list_parts",
           "read_embeddings", "read_tile_features", "run"]

# Names whose module loads no jax: reading a job's output, or checking options, starts in a blink.
_JAX_FREE = {"read_embeddings": "output", "read_tile_features": "output", "Settings": "output",
             "EmbedOptions": "options", "ENGINES": "options", "check_sizes": "options"}


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'pe_jax.embed' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pe_jax.embed.{_JAX_FREE.get(name, 'job')}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *__all__])
