"""Zero-shot classification as the reference evaluation does it.

Each prompt embedding is L2-normalized, the prompts of a class are averaged and the mean renormalized;
images are classified by 100 x cosine similarity. Ships the 80 OpenAI ImageNet templates and 1000
class names (OpenAI CLIP, MIT license).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from importlib import resources

import jax
import numpy as np

LOGIT_SCALE = 100.0


@functools.cache
def _imagenet() -> dict:
    return json.loads(resources.files("pe_jax").joinpath("assets/imagenet_zeroshot.json").read_text("utf-8"))


def imagenet_templates() -> list[str]:
    """The 80 OpenAI ImageNet prompt templates, `{}` standing for the class name."""
    return list(_imagenet()["templates"])


def imagenet_classnames() -> list[str]:
    return list(_imagenet()["classnames"])


def _normalize(x, axis=-1):
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def build_classifier(model, tokenizer: Callable[[list[str]], np.ndarray], classnames: Sequence[str],
                     templates: Sequence[str] = ("a photo of a {}.",), *, batch_size: int = 256) -> np.ndarray:
    """Class embeddings [num_classes, embed_dim], float32, unit norm."""
    if len(classnames) == 0:
        raise ValueError("zero-shot classification needs at least one class name")
    if len(templates) == 0 or any("{}" not in t for t in templates):
        raise ValueError("every template needs a '{}' placeholder for the class name")
    prompts = [t.format(c) for c in classnames for t in templates]
    encode = jax.jit(lambda m, t: m.encode_text(t, normalize=True))
    tokens = tokenizer(prompts)
    chunks = []
    for start in range(0, len(tokens), batch_size):
        chunk = tokens[start:start + batch_size]
        pad = batch_size - len(chunk) if len(tokens) > batch_size else 0  # one compiled shape
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        chunks.append(np.asarray(encode(model, chunk))[: len(chunk) - pad])
    per_prompt = np.concatenate(chunks).reshape(len(classnames), len(templates), -1)
    return _normalize(per_prompt.mean(axis=1)).astype(np.float32)


def classify(image_features: np.ndarray, classifier: np.ndarray) -> np.ndarray:
    """Logits [N, num_classes] = 100 x cosine similarity (features normalized here)."""
    return LOGIT_SCALE * _normalize(np.asarray(image_features, np.float32)) @ classifier.T


def accuracy_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """top-1, top-5 (None below 5 classes, as the reference) and mean per-class recall (balanced accuracy:
    classes with no samples are left out of the mean)."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        raise ValueError("no labelled images to evaluate")
    ranked = np.argsort(-logits, axis=1, kind="stable")
    top1 = ranked[:, 0] == labels
    top5 = float((ranked[:, :5] == labels[:, None]).any(axis=1).mean()) if num_classes >= 5 else None
    recalls = [top1[labels == c].mean() for c in range(num_classes) if np.any(labels == c)]
    return {"top1": float(top1.mean()), "top5": top5, "mean_per_class_recall": float(np.mean(recalls)),
            "num_images": int(len(labels))}


def labelled_images(data: str) -> tuple[list[str], list[int], list[str]]:
    """(paths, labels, classnames) from an image folder with one sub-folder per class, or a CSV of path,label.

    Class names are the sorted folder names (or labels) with underscores as spaces; CSV paths are relative
    to the CSV's folder.
    """
    import csv
    import os

    if os.path.isdir(data):
        classes = sorted(d for d in os.listdir(data) if os.path.isdir(os.path.join(data, d)))
        paths, labels = [], []
        for label, name in enumerate(classes):
            for root, _, files in sorted(os.walk(os.path.join(data, name))):
                for f in sorted(files):
                    paths.append(os.path.join(root, f))
                    labels.append(label)
    elif os.path.isfile(data):
        with open(data, newline="") as f:
            rows = [r for r in csv.reader(f) if r]
        if rows and rows[0][:2] == ["path", "label"]:
            rows = rows[1:]
        if any(len(r) < 2 for r in rows):
            raise ValueError(f"{data}: every CSV row needs path,label")
        classes = sorted({r[1] for r in rows})
        index = {c: i for i, c in enumerate(classes)}
        base = os.path.dirname(os.path.abspath(data))
        paths = [os.path.join(base, r[0]) for r in rows]
        labels = [index[r[1]] for r in rows]
    else:
        raise FileNotFoundError(f"no image folder or CSV at {data}")
    if not classes:
        raise ValueError(f"{data}: no classes found (expected one sub-folder per class, or a CSV of path,label)")
    if not paths:
        raise ValueError(f"{data}: no images found")
    return paths, labels, [c.replace("_", " ") for c in classes]


def evaluate(model, data: str, *, templates: Sequence[str] | None = None, batch_size: int = 32,
             progress: bool = True) -> dict:
    """Zero-shot accuracy of a CLIP model on an image folder or CSV; unreadable images are skipped and listed."""
    from tqdm import tqdm

    from pe_jax.transforms import get_image_transform, get_text_tokenizer, load_images

    paths, labels, classnames = labelled_images(data)
    tokenizer = get_text_tokenizer(model.config.text.context_length)
    classifier = build_classifier(model, tokenizer, classnames, templates or imagenet_templates())
    transform = get_image_transform(model.config.vision.image_size)
    encode = jax.jit(lambda m, x: m.encode_image(x, normalize=True))
    features, kept, failures = [], [], []
    with tqdm(total=len(paths), desc="zero-shot", unit="img", disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            batch, skipped = load_images(paths[start:start + batch_size], transform, on_error="skip")
            skipped_idx = {i for i, _, _ in skipped}
            failures += [{"path": src, "error": err} for _, src, err in skipped]
            kept += [start + i for i in range(len(paths[start:start + batch_size])) if i not in skipped_idx]
            if len(batch):
                pad = batch_size - len(batch)  # one compiled shape for every batch
                padded = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)]) if pad else batch
                features.append(np.asarray(encode(model, padded))[: len(batch)])
            bar.update(min(batch_size, len(paths) - start))
    if not features:
        raise ValueError(f"{data}: none of the {len(paths)} images could be read")
    logits = classify(np.concatenate(features), classifier)
    metrics = accuracy_metrics(logits, np.asarray(labels)[kept], len(classnames))
    return {**metrics, "num_classes": len(classnames), "num_failed": len(failures), "failures": failures}
