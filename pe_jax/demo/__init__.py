"""The demos' synthetic data (coloured shapes; products for retrieval), and an optional check of the exported
weights in open_clip."""

from __future__ import annotations

import os
from collections.abc import Callable

from pe_jax.errors import UsageError
from pe_jax.storage.atomic import atomic_folder


def generate_once(folder: str, generate: Callable[[str], object]) -> str:
    """`generate(tmp)` into `folder` unless it already holds a finished dataset (its dataset.json), written
    beside and renamed into place, so an interrupted generation is never mistaken for a finished one."""
    folder = os.path.abspath(folder)
    if not os.path.isfile(os.path.join(folder, "dataset.json")):
        if os.path.lexists(folder):  # a user's file or folder of that name: never removed
            raise UsageError(f"{folder} exists and is not a finished demo dataset (no dataset.json in it); move it "
                             "away or use another --workdir")
        os.makedirs(os.path.dirname(folder), exist_ok=True)  # a new --workdir
        with atomic_folder(folder) as tmp:  # a killed generation's leftover is swept by the next
            os.rmdir(tmp)  # `generate` makes its folder itself (its name is this process's alone)
            generate(tmp)
    return folder
