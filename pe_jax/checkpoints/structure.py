"""The structure a pe_jax checkpoint must have, checked without reading its weights: `pe_jax.json`'s params
against `state/`'s zarr arrays (each `.zarray`'s dtype and shape, each uncompressed chunk's size). Used by
`pe_jax.checkpoints.verify`."""

from __future__ import annotations

import dataclasses
import json
import math
import os

from pe_jax.errors import PeJaxError

METADATA_FILE = "pe_jax.json"
STATE_DIR = "state"


class CheckpointIntegrityError(PeJaxError, ValueError):
    """A checkpoint's files are not what was written: corrupt, missing, truncated, extended or edited."""


@dataclasses.dataclass(frozen=True)
class Problem:
    file: str  # relative to the checkpoint
    what: str

    @property
    def param(self) -> str | None:
        parts = self.file.split("/")
        return parts[1] if len(parts) == 3 and parts[0] == STATE_DIR else None

    def __str__(self):
        return (f"parameter {self.param}, file {self.file}: " if self.param else f"{self.file}: ") + self.what


def read_json(ckpt: str, rel: str):
    from pe_jax.storage.files import read_capped

    try:  # capped, regular files only: a FIFO or /dev/zero named checksums.json is refused, not read forever
        return json.loads(read_capped(os.path.join(ckpt, rel)))
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointIntegrityError(Problem(rel, f"unreadable ({e})")) from None


def normal_dtype(name: str) -> str:
    import numpy as np

    return name if name == "bfloat16" else np.dtype(name).name


def zarray_problems(ckpt: str, key: str, shape, dtype, disk: dict[str, int]) -> list[Problem]:
    """Problems of one parameter's zarr array against pe_jax.json's [shape, dtype]: its .zarray, and (for
    uncompressed chunks) each chunk file present with the size its shape gives."""
    import itertools

    import numpy as np

    rel = f"{STATE_DIR}/{key}/.zarray"
    if rel not in disk:
        return [Problem(rel, "missing")]
    try:
        want = (normal_dtype(dtype), tuple(shape))
        zarray = read_json(ckpt, rel)
        found = (normal_dtype(zarray["dtype"]), tuple(zarray["shape"]))
        chunks, sep = tuple(zarray["chunks"]), zarray.get("dimension_separator") or "."
        itemsize = 2 if found[0] == "bfloat16" else np.dtype(found[0]).itemsize
    except (CheckpointIntegrityError, KeyError, TypeError, ValueError) as e:
        return [Problem(rel, f"not a valid .zarray ({e})")]
    if found != want:
        return [Problem(rel, f"holds {found[0]} {found[1]}, {METADATA_FILE} says {want[0]} {want[1]}")]
    if len(chunks) != len(found[1]) or zarray.get("compressor") is not None:
        return []
    problems = []
    for grid in itertools.product(*(range(-(-n // max(c, 1))) for n, c in zip(found[1], chunks, strict=True))):
        chunk = f"{STATE_DIR}/{key}/{sep.join(map(str, grid)) or '0'}"
        if chunk not in disk:
            problems.append(Problem(chunk, "missing"))
        elif disk[chunk] != math.prod(chunks) * itemsize:
            problems.append(Problem(chunk, size_change(disk[chunk], math.prod(chunks) * itemsize)))
    return problems


def size_change(found: int, expected: int) -> str:
    kind = "empty" if found == 0 else "truncated" if found < expected else "extended"
    return f"{kind}: {found} bytes, expected {expected}"


def structure_problems(ckpt: str, meta: dict, disk: dict[str, int]) -> list[Problem]:
    params = meta.get("params")
    if not isinstance(params, dict) or not params:
        return [Problem(METADATA_FILE, "lists no params")]
    if f"{STATE_DIR}/_METADATA" not in disk:
        return [Problem(f"{STATE_DIR}/_METADATA", "missing")]
    orbax_meta = read_json(ckpt, f"{STATE_DIR}/_METADATA")
    if not isinstance(orbax_meta, dict) or orbax_meta.get("use_ocdbt"):
        return []  # one OCDBT store rather than a folder per parameter: only the checksums apply
    problems = []
    for key, spec in sorted(params.items()):
        try:
            shape, dtype = spec
        except (TypeError, ValueError):
            problems.append(Problem(METADATA_FILE, f"params[{key!r}] is not [shape, dtype]"))
            continue
        problems += zarray_problems(ckpt, key, shape, dtype, disk)
    folders = {rel.split("/")[1] for rel in disk if rel.count("/") == 2}
    problems += [Problem(f"{STATE_DIR}/{k}", f"not a parameter {METADATA_FILE} lists")
                 for k in sorted(folders - set(params))]
    return problems
