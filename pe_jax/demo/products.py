"""A synthetic instance-retrieval set: many "products", each a fixed composite of two or three coloured shapes
(one of them striped or not), photographed under changes of pose (rotation), scale, position, background and
lighting. Training and held-out products are disjoint, so held-out retrieval (each view queries the other
views of all held-out products) measures whether an encoder learned what makes a product itself, not the
training classes.

Written as class-per-folder trees (`train/<product>/<view>.png`, `heldout/<product>/<view>.png`), what
`task="retrieval"` and `pe-jax eval retrieval` read.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, ImageDraw

from pe_jax.demo.shapes import COLOURS, SHAPES, background, draw_shape

PART_SHAPES = tuple(s for s in SHAPES if s != "ring")  # a ring's outline vanishes at small part sizes


def products(count: int, rng: np.random.Generator) -> list[dict]:
    """`count` distinct product designs: parts (shape, colour, offset angle and distance, radius), stripes."""
    seen, out = set(), []
    while len(out) < count:
        n_parts = int(rng.integers(2, 4))
        parts = []
        for k in range(n_parts):
            parts.append({"shape": PART_SHAPES[rng.integers(len(PART_SHAPES))],
                          "colour": list(COLOURS)[rng.integers(len(COLOURS))],
                          "angle": 0.0 if k == 0 else float(rng.choice(np.arange(8)) * np.pi / 4),
                          "distance": 0.0 if k == 0 else 0.24,
                          "radius": 0.2 if k == 0 else 0.11})
        design = {"parts": parts, "stripes": bool(rng.random() < 0.5)}
        key = json.dumps(design, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(design)
    return out


def view(design: dict, rng: np.random.Generator, image_size: int = 64) -> Image.Image:
    """One photograph of a product: turned up to +-25 degrees, scaled 0.8-1.15, moved, relit."""
    n = image_size
    img = background(rng, n)
    canvas = ImageDraw.Draw(img)
    turn, scale = rng.uniform(-0.44, 0.44), rng.uniform(0.8, 1.15)
    cx, cy = n / 2 + rng.uniform(-0.06, 0.06, 2) * n
    light = rng.uniform(0.8, 1.2)
    for k, part in enumerate(design["parts"]):
        a, d = part["angle"] + turn, part["distance"] * scale * n
        x, y, r = cx + d * np.cos(a), cy + d * np.sin(a), part["radius"] * scale * n
        fill = tuple(int(np.clip(v * light + rng.uniform(-12, 12), 0, 255)) for v in COLOURS[part["colour"]])
        draw_shape(canvas, part["shape"], x, y, r, turn, fill)
        if k == 0 and design["stripes"]:  # dark bands across the main part, turning with it
            for t in np.linspace(-0.8, 0.8, 4):
                ox, oy = t * r * np.cos(turn), t * r * np.sin(turn)
                dx, dy = -r * np.sin(turn), r * np.cos(turn)
                canvas.line([(x + ox - dx, y + oy - dy), (x + ox + dx, y + oy + dy)], fill=(30, 30, 30),
                            width=max(1, round(0.08 * r)))
    return img


def generate(out_dir: str, *, train_products: int = 240, heldout_products: int = 80, views: int = 8,
             image_size: int = 64, seed: int = 0, progress: bool = False) -> dict:
    """Writes train/ and heldout/ (disjoint products, `views` images each) and dataset.json; returns its dict.
    `progress`: a bar of the images drawn, shown before the first."""
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    designs = products(train_products + heldout_products, rng)
    split = {"train": designs[:train_products], "heldout": designs[train_products:]}
    with tqdm(total=len(designs) * views, desc="products data", unit="image", disable=not progress) as bar:
        for name, group in split.items():
            for i, design in enumerate(group):
                folder = os.path.join(out_dir, name, f"{name}-{i:04d}")
                os.makedirs(folder, exist_ok=True)
                for v in range(views):
                    view(design, rng, image_size).save(os.path.join(folder, f"{v}.png"))
                    bar.update()
    info = {"train": os.path.join(out_dir, "train"), "heldout": os.path.join(out_dir, "heldout"), "views": views,
            "image_size": image_size, "designs": split}
    with open(os.path.join(out_dir, "dataset.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info
