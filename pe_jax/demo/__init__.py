"""The demos' synthetic data (coloured shapes; products for retrieval), and an optional check of the exported
weights in open_clip."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable


def generate_once(folder: str, generate: Callable[[str], object]) -> str:
    """`generate(tmp)` into `folder` unless it already holds a finished dataset (its dataset.json), written
    beside and renamed into place, so an interrupted generation is never mistaken for a finished one."""
    folder = os.path.abspath(folder)
    if not os.path.exists(os.path.join(folder, "dataset.json")):
        tmp = f"{folder}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        generate(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return folder
