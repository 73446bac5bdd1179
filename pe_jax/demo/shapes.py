"""A synthetic image-text dataset that proves learning offline: coloured shapes on varied backgrounds,
captioned "a small red triangle". Sixteen colour x shape combinations are held out: no training caption
names one of them (their images appear only with captions naming one attribute, "a red shape" or "a small
circle"). Each colour is held out with two shapes and each shape with at least two colours, so zero-shot
classification among the held-out combinations (chance 1/16) needs both the colour and the shape: it
measures whether the model composes "red" and "circle" into a caption it never read.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (40, 70, 230), "yellow": (240, 215, 20),
           "purple": (140, 40, 190), "orange": (250, 130, 0), "cyan": (0, 200, 210), "pink": (245, 100, 180)}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
SIZES = {"small": (0.2, 0.23), "large": (0.33, 0.37)}  # radius as a fraction of the image side
CAPTIONS = ("a {size} {colour} {shape}", "a {colour} {shape} that is {size}", "a picture of a {size} {colour} {shape}",
            "a {size} {shape} in {colour}")
# Captions naming one attribute: the only ones the held-out combinations get.
COLOUR_CAPTIONS = ("a {colour} shape", "something {colour}", "a {size} {colour} thing")
SHAPE_CAPTIONS = ("a {size} {shape}", "a {shape}", "a {shape} of some colour")
EVAL_TEMPLATES = ("a small {}", "a large {}")


def held_out() -> list[tuple[str, str]]:
    """Two shapes per colour, spread so every shape is held out with 2 or 3 colours and seen with the rest."""
    return [(c, SHAPES[(2 * i + j) % len(SHAPES)]) for i, c in enumerate(COLOURS) for j in range(2)]


def classnames() -> list[str]:
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        k, radii = 4, [r * 1.1] * 4
        angle += np.pi / 4
    elif shape == "triangle":
        k, radii = 3, [r * 1.2] * 3
    elif shape == "star":
        k, radii = 10, [r * 1.2 if i % 2 == 0 else r * 0.5 for i in range(10)]
    else:  # cross: a plus sign as a 12-gon
        w = r * 0.38
        pts = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w),
               (-w, r)]
        c, s = np.cos(angle), np.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    angles = [angle + 2 * np.pi * i / k - np.pi / 2 for i in range(k)]
    return [(cx + rad * np.cos(a), cy + rad * np.sin(a)) for a, rad in zip(angles, radii, strict=True)]


def background(rng: np.random.Generator, n: int) -> Image.Image:
    """A low-saturation n x n background: a tint, a gradient along one axis, pixel noise."""
    base = rng.uniform(40, 215) + rng.uniform(-20, 20, 3)
    gradient = np.linspace(-1, 1, n)[:, None, None] * rng.uniform(-30, 30, 3)
    if rng.random() < 0.5:
        gradient = gradient.transpose(1, 0, 2)
    return Image.fromarray(np.clip(base + gradient + rng.normal(0, 8, (n, n, 3)), 0, 255).astype(np.uint8))


def draw_shape(canvas: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, fill):
    """A filled shape of radius ~r centred at (cx, cy), turned by `angle` radians (a ring is an outline)."""
    if shape == "circle":
        canvas.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        canvas.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, round(0.35 * r)))
    else:
        canvas.polygon(_polygon(shape, cx, cy, r, angle), fill=fill)


def draw(colour: str, shape: str, size: str, rng: np.random.Generator, image_size: int = 64) -> Image.Image:
    """One image: a shape of that colour and size on a low-saturation background with a gradient and noise."""
    n = image_size
    img = background(rng, n)
    r = rng.uniform(*SIZES[size]) * n
    # Centred and upright: a small ViT trained from scratch for minutes learns a silhouette far faster when
    # it need not also find it anywhere in the image at any angle (measured: 34% vs 90%+ shape accuracy).
    cx, cy = n / 2 + rng.uniform(-0.03, 0.03, 2) * n
    fill = tuple(int(np.clip(v + rng.uniform(-20, 20), 0, 255)) for v in COLOURS[colour])
    draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, rng.uniform(-0.05, 0.05), fill)
    return img


def caption(colour: str, shape: str, size: str, rng: np.random.Generator, held_out: bool) -> str:
    """Both attributes for a seen combination; one of them, at random, for a held-out one."""
    if held_out:
        templates = COLOUR_CAPTIONS if rng.random() < 0.5 else SHAPE_CAPTIONS
    else:
        templates = CAPTIONS
    return templates[rng.integers(len(templates))].format(size=size, colour=colour, shape=shape)


def generate(out_dir: str, *, train_size: int = 6000, eval_per_class: int = 20, image_size: int = 64,
             seed: int = 0, progress: bool = False) -> dict:
    """Writes train/ + train.jsonl (every combination; no caption names a held-out one) and eval/ + eval.csv
    (fresh images of the held-out combinations, labelled "colour shape"). Returns the paths and classes.
    `progress`: a bar of the images drawn, shown before the first (the default size takes ~20 s)."""
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    unseen = set(held_out())
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    os.makedirs(os.path.join(out_dir, "train"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "eval"), exist_ok=True)
    total = train_size + len(unseen) * eval_per_class
    with tqdm(total=total, desc="shapes data", unit="image", disable=not progress) as bar, \
            open(os.path.join(out_dir, "train.jsonl"), "w") as f:
        for i in range(train_size):
            colour, shape = combos[rng.integers(len(combos))]
            size = ("small", "large")[rng.integers(2)]
            name = f"train/{i:06d}.png"
            draw(colour, shape, size, rng, image_size).save(os.path.join(out_dir, name))
            text = caption(colour, shape, size, rng, (colour, shape) in unseen)
            f.write(json.dumps({"image": name, "caption": text}) + "\n")
            bar.update()
        _write_eval(out_dir, sorted(unseen), eval_per_class, image_size, rng, bar)
    info = {"train": os.path.join(out_dir, "train.jsonl"), "eval": os.path.join(out_dir, "eval.csv"),
            "classes": classnames(), "held_out": [f"{c} {s}" for c, s in sorted(unseen)]}
    with open(os.path.join(out_dir, "dataset.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def _write_eval(out_dir: str, unseen: list, per_class: int, image_size: int, rng: np.random.Generator, bar):
    """eval/ and eval.csv: `per_class` fresh images of each held-out combination."""
    with open(os.path.join(out_dir, "eval.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        for colour, shape in unseen:
            for j in range(per_class):
                size = ("small", "large")[j % 2]
                name = f"eval/{colour}_{shape}_{j:03d}.png"
                draw(colour, shape, size, rng, image_size).save(os.path.join(out_dir, name))
                writer.writerow([name, f"{colour} {shape}"])
                bar.update()
