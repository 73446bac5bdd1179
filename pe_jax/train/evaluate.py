"""Held-out evaluation during finetuning: zero-shot accuracy for a CLIP (`pe_jax.evals.zero_shot`), the
head's accuracy for a classifier, leave-one-out retrieval (`pe_jax.evals.retrieval`: mAP@10, P@1, R@1, P@5)
over held-out classes for a retrieval run. The images are decoded once; the jitted encoders compile once per
shape."""

from __future__ import annotations

import numpy as np

from pe_jax.batching import run_batched
from pe_jax.data.sources import label_indices, list_labelled
from pe_jax.errors import InputError
from pe_jax.evals import retrieval, zero_shot
from pe_jax.preprocess import get_image_transform, get_text_tokenizer, load_images
from pe_jax.train.metric_losses import supervised_contrastive


def _classify(task, images):
    return task(images)


def _retrieval_features(task, images):
    return task.features(images)


def _encode_image(model, images):
    return model.encode_image(images, normalize=True)


def decode_labelled(src: str, image_size: int, *, max_images: int | None = None, classnames=None):
    """(images [N, H, W, 3], labels [N], class names, failures) of a labelled folder or CSV, decoded once.

    `classnames` sets the classes to choose from (labels are looked up by name; more classes than the data
    holds make the task harder, e.g. held-out combinations among all of them).
    """
    items, found = list_labelled(src)
    classnames = list(classnames) if classnames else found
    try:
        labels = label_indices(items, classnames)
    except ValueError as e:
        raise InputError(f"{src}: {e}") from None
    if max_images is not None and len(items) > max_images:  # an even spread, not the first classes only
        keep = np.linspace(0, len(items) - 1, max_images).round().astype(int)
        items, labels = [items[i] for i in keep], [labels[i] for i in keep]
    images, failures = load_images([it.source for it in items], get_image_transform(image_size), on_error="skip")
    bad = {i for i, _, _ in failures}
    labels = np.asarray([y for i, y in enumerate(labels) if i not in bad], np.int32)
    if len(labels) == 0:
        raise InputError(f"{src}: none of the {len(items)} evaluation images could be read")
    return images, labels, classnames, [{"path": s, "error": e} for _, s, e in failures]


class Evaluator:
    """`evaluator(task)` -> {eval_top1, eval_top5, eval_mean_per_class_recall, eval_images}, or for retrieval
    {eval_mAP@10, eval_P@1, eval_R@1, eval_P@5, eval_loss, eval_images}: each held-out image queries all the
    others; eval_loss is their supervised contrastive loss."""

    def __init__(self, cfg, image_size: int, context_length: int | None, mesh=None):
        self.cfg, self.mesh = cfg, mesh
        self.images, self.labels, self.classnames, self.failures = decode_labelled(
            cfg.data.eval, image_size, max_images=cfg.data.eval_max_images, classnames=cfg.data.eval_classes)
        self.templates = cfg.data.eval_templates
        self.tokenizer = get_text_tokenizer(context_length) if context_length else None
        self.batch_size = min(64, max(8, cfg.batch_size))

    def prompt_tokens(self) -> np.ndarray:
        return self.tokenizer(zero_shot.prompts(self.classnames, self.templates))

    def logits(self, task) -> np.ndarray:
        """[images, classes]: zero-shot (100 x cosine to the template-averaged class embeddings) or the head's."""
        if self.cfg.task != "contrastive":
            return run_batched(_classify, task, self.images, batch_size=self.batch_size, mesh=self.mesh)
        classifier = zero_shot.build_classifier(task.model, self.tokenizer, self.classnames, self.templates,
                                                mesh=self.mesh)
        features = run_batched(_encode_image, task.model, self.images, batch_size=self.batch_size, mesh=self.mesh)
        return zero_shot.classify(features, classifier)

    def __call__(self, task) -> dict:
        if self.cfg.task == "retrieval":
            feats = run_batched(_retrieval_features, task, self.images, batch_size=self.batch_size, mesh=self.mesh)
            feats = np.asarray(feats, np.float32)
            m, _ = retrieval.evaluate(feats, self.labels, ks=(1, 5, 10))
            # The held-out loss: supervised contrastive over all held-out images (any metric loss trained;
            # held-out classes have no ArcFace centres).
            loss = float(supervised_contrastive(feats, self.labels))
            return {"eval_mAP@10": m["mAP@10"], "eval_P@1": m["P@1"], "eval_R@1": m["R@1"], "eval_P@5": m["P@5"],
                    "eval_loss": loss, "eval_images": len(self.labels)}
        m = zero_shot.accuracy_metrics(np.asarray(self.logits(task), np.float32), self.labels, len(self.classnames))
        return {"eval_top1": m["top1"], "eval_top5": m["top5"],
                "eval_mean_per_class_recall": m["mean_per_class_recall"], "eval_images": m["num_images"]}
