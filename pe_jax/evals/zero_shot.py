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

import numpy as np

from pe_jax.batching import apply_batches, round_batch_size, run_batched
from pe_jax.errors import UsageError
from pe_jax.layers import l2_normalize

LOGIT_SCALE = 100.0


@functools.cache
def _imagenet() -> dict:
    return json.loads(resources.files("pe_jax").joinpath("assets/imagenet_zeroshot.json").read_text("utf-8"))


def imagenet_templates() -> list[str]:
    """The 80 OpenAI ImageNet prompt templates, `{}` standing for the class name."""
    return list(_imagenet()["templates"])


def imagenet_classnames() -> list[str]:
    return list(_imagenet()["classnames"])


def _encode_text(model, tokens):
    return model.encode_text(tokens, normalize=True)


def _encode_image(model, images):
    return model.encode_image(images, normalize=True)


def prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every class name, class-major."""
    if len(classnames) == 0:
        raise UsageError("zero-shot classification needs at least one class name")
    if len(templates) == 0 or any("{}" not in t for t in templates):
        raise UsageError("every template needs a '{}' placeholder for the class name")
    return [t.format(c) for c in classnames for t in templates]


def average_templates(prompt_features: np.ndarray, num_classes: int) -> np.ndarray:
    """Class embeddings from per-prompt text features (class-major): normalized, averaged, renormalized."""
    per_prompt = np.asarray(l2_normalize(prompt_features)).reshape(num_classes, -1, prompt_features.shape[-1])
    return np.asarray(l2_normalize(per_prompt.mean(axis=1)))


def build_classifier(model, tokenizer: Callable[[list[str]], np.ndarray], classnames: Sequence[str],
                     templates: Sequence[str] = ("a photo of a {}.",), *, batch_size: int = 256,
                     mesh=None) -> np.ndarray:
    """Class embeddings [num_classes, embed_dim], float32, unit norm."""
    tokens = tokenizer(prompts(classnames, templates))
    features = run_batched(_encode_text, model, tokens, batch_size=min(batch_size, len(tokens)), mesh=mesh)
    return average_templates(features, len(classnames))


def classify(image_features: np.ndarray, classifier: np.ndarray) -> np.ndarray:
    """Logits [N, num_classes] = 100 x cosine similarity (features normalized here)."""
    return LOGIT_SCALE * np.asarray(l2_normalize(image_features)) @ classifier.T


def accuracy_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """top-1, top-5 (None below 5 classes, as the reference) and mean per-class recall (balanced accuracy:
    classes with no samples are left out of the mean)."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        raise UsageError("no labelled images to evaluate")
    ranked = np.argsort(-logits, axis=1, kind="stable")
    top1 = ranked[:, 0] == labels
    top5 = float((ranked[:, :5] == labels[:, None]).any(axis=1).mean()) if num_classes >= 5 else None
    recalls = [top1[labels == c].mean() for c in range(num_classes) if np.any(labels == c)]
    return {"top1": float(top1.mean()), "top5": top5, "mean_per_class_recall": float(np.mean(recalls)),
            "num_images": int(len(labels))}


def evaluate(model, data: str, *, templates: Sequence[str] | None = None, batch_size: int = 32,
             progress: bool = True, mesh=None) -> dict:
    """Zero-shot accuracy of a CLIP model on an image folder or CSV; unreadable images are skipped and listed."""
    from tqdm import tqdm

    from pe_jax.data.sources import label_indices, list_labelled
    from pe_jax.preprocess import get_image_transform, get_text_tokenizer, image_batches

    items, classnames = list_labelled(data)
    labels = np.asarray(label_indices(items, classnames))
    classifier = build_classifier(model, get_text_tokenizer(model.config.text.context_length), classnames,
                                  templates or imagenet_templates(), mesh=mesh)
    transform = get_image_transform(model.config.vision.image_size)
    size = round_batch_size(batch_size, mesh)
    kept, failures = [], []

    def decoded():
        for images, indices in image_batches([it.source for it in items], transform, size, failures):
            kept.extend(indices)
            yield images

    with tqdm(total=len(items), desc="zero-shot", unit="img", disable=not progress) as bar:
        features = list(apply_batches(_encode_image, model, decoded(), batch_size=size, mesh=mesh,
                                      progress=bar.update))
    if not features:
        raise UsageError(f"{data}: none of the {len(items)} images could be read")
    metrics = accuracy_metrics(classify(np.concatenate(features), classifier), labels[kept], len(classnames))
    return {**metrics, "num_classes": len(classnames), "num_failed": len(failures), "failures": failures}
