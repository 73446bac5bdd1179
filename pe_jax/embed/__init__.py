"""The embedding job: a folder of inputs (tar shards, images, lists, texts) to embeddings on disk, resumable.

- `job`: the entry points (`run` picks the engine, `embed` runs one with a model in hand);
- `options`: the job's options (`EmbedOptions`), checked once;
- `parts`: the input listing cut into parts, pinned in the manifest;
- `pipeline`: decoding ahead, batching, encoding;
- `output`: the parts' files, the manifest and reading them back (`read_embeddings`);
- `layout`: clip-retrieval's output layout;
- `ray_engine`: the same job on a Ray cluster;
- `search`: a faiss index over a finished job, and queries against it.

Example:
    >>> from pe_jax.embed import read_embeddings, run  # doctest: +SKIP
    >>> run("shards/{00000..00009}.tar", "emb/", checkpoint="ckpt/")  # doctest: +SKIP
    >>> vectors, rows = read_embeddings("emb/")  # doctest: +SKIP
"""

from pe_jax.embed.job import (
           ENGINES,
           EmbedOptions,
           Settings,
           check_sizes,
           decode_ahead,
           embed,
           item_loader,
           list_parts,
           read_embeddings,
           run,
)

__all__ = ["ENGINES", "EmbedOptions", "Settings", "check_sizes", "decode_ahead", "embed", "item_loader", "list_parts",
           "read_embeddings", "run"]
