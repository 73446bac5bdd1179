"""Finetuning tasks and their losses: contrastive CLIP (softmax or SigLIP), classification heads and metric
learning for retrieval, plus which parameters train (`trainable_filter`).

`pe_jax.train.step` differentiates a task's `loss(batch)`; `pe_jax.train.loop` runs it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pe_jax.config import Execution
from pe_jax.errors import UsageError
from pe_jax.features import feature_dim, features, resolve_pooling
from pe_jax.layers import Dense, param
from pe_jax.modeling import CLIP, VisionTransformer
from pe_jax.train import metric_losses
from pe_jax.train.config import METRIC_LOSSES

# ---------------------------------------------------------------------------------------------------- losses


def clip_loss(image_features, text_features, logit_scale):
    """Symmetric softmax contrastive loss, logit scale clamped to 100 as the CLIP family does.

    Under `jit` the features are global arrays: every example is contrasted with the whole global batch,
    whatever the mesh (XLA gathers the features across the data axes).
    """
    scale = jnp.minimum(jnp.exp(logit_scale), 100.0)
    logits = scale * image_features @ text_features.T
    labels = jnp.arange(logits.shape[0])
    return (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()) / 2


def siglip_loss(image_features, text_features, logit_scale, logit_bias):
    """Pairwise sigmoid loss (SigLIP): each pair is a binary problem, summed over pairs, mean over images."""
    logits = jnp.minimum(jnp.exp(logit_scale), 100.0) * image_features @ text_features.T + logit_bias
    signs = 2 * jnp.eye(logits.shape[0]) - 1
    return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / logits.shape[0]


# ---------------------------------------------------------------------------------------------------- tasks


class ContrastiveTask(nnx.Module):
    """A PE-Core CLIP trained on image-text pairs; `loss` "softmax" (CLIP) or "sigmoid" (SigLIP, which adds a
    learned logit bias, initialized at -10 as SigLIP does)."""

    def __init__(self, clip: CLIP, loss: str = "softmax"):
        if loss not in ("softmax", "sigmoid"):
            raise UsageError(f"unknown contrastive loss {loss!r}: use 'softmax' or 'sigmoid'")
        self.clip = clip
        self.loss_type = loss
        self.logit_bias = param(jnp.asarray(-10.0, jnp.float32), ()) if loss == "sigmoid" else None

    def loss(self, batch):
        img = self.clip.encode_image(batch["image"], normalize=True)
        txt = self.clip.encode_text(batch["tokens"], normalize=True)
        scale = self.clip.logit_scale[...]
        if self.loss_type == "sigmoid":
            return siglip_loss(img, txt, scale, self.logit_bias[...]), {}
        return clip_loss(img, txt, scale), {}

    @property
    def model(self) -> CLIP:
        return self.clip


class Classifier(nnx.Module):
    """A vision tower and a head: linear, or an MLP with one hidden layer.

    Features: `pe_jax.features.features(encoder, images, layer_idx, pooling)`: by default the tower's pooled,
    projected embedding, or the mean of the patch tokens for an intermediate layer or a tower without a head.
    """

    def __init__(self, encoder: VisionTransformer, num_classes: int, *, head: str = "linear",
                 layer_idx: int | None = None, pooling: str | None = None, rngs: nnx.Rngs):
        if head not in ("linear", "mlp"):
            raise UsageError(f"unknown head {head!r}: use 'linear' or 'mlp'")
        if num_classes < 2:
            raise UsageError(f"classification needs at least 2 classes, got {num_classes}")
        self.encoder = encoder
        self.layer_idx = layer_idx
        self.pooling = resolve_pooling(encoder, layer_idx, pooling)
        dim = feature_dim(encoder, layer_idx, self.pooling)
        head_cfg = Execution(dtype="float32", param_dtype="float32")
        self.hidden = (Dense((dim,), (dim,), ("embed", "mlp"), head_cfg, rngs=rngs) if head == "mlp" else None)
        self.out = Dense((dim,), (num_classes,), ("embed", None), head_cfg, rngs=rngs)
        # A zero output layer starts from uniform predictions, so finetuning does not begin with a random kick.
        self.out.kernel[...] = jnp.zeros_like(self.out.kernel[...])

    def features(self, images):
        return features(self.encoder, images, layer_idx=self.layer_idx, pooling=self.pooling)

    def __call__(self, images):
        x = self.features(images).astype(jnp.float32)
        if self.hidden is not None:
            x = jax.nn.gelu(self.hidden(x), approximate=False)
        return self.out(x)

    def loss(self, batch):
        logits = self(batch["image"])
        labels = batch["label"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}

    @property
    def model(self) -> VisionTransformer:
        return self.encoder


class RetrievalTask(nnx.Module):
    """A vision tower trained for instance retrieval: a metric-learning loss (`pe_jax.train.metric_losses`) on
    unit-norm features of the head, or of block `layer_idx` with `pooling`, which are then what retrieval uses.
    "arcface" / "cosface" learn one centre per training class; "supcon" and "multi_similarity" compare the
    batch's images with each other (the class-balanced P x K batches give every image K - 1 positives)."""

    def __init__(self, encoder: VisionTransformer, num_classes: int, *, loss: str = "supcon",
                 layer_idx: int | None = None, pooling: str | None = None, rngs: nnx.Rngs):
        if loss not in METRIC_LOSSES:
            raise UsageError(f"unknown metric loss {loss!r}: one of {METRIC_LOSSES}")
        self.encoder, self.layer_idx, self.loss_type = encoder, layer_idx, loss
        self.pooling = resolve_pooling(encoder, layer_idx, pooling)
        dim = feature_dim(encoder, layer_idx, self.pooling)
        centres = jax.random.normal(rngs.params(), (num_classes, dim), jnp.float32)
        self.class_weights = param(centres, (None, "embed")) if loss in ("arcface", "cosface") else None

    def features(self, images):
        return features(self.encoder, images, layer_idx=self.layer_idx, pooling=self.pooling, normalize=True)

    def loss(self, batch):
        emb, labels = self.features(batch["image"]), batch["label"]
        if self.loss_type == "supcon":
            return metric_losses.supervised_contrastive(emb, labels), {}
        if self.loss_type == "multi_similarity":
            return metric_losses.multi_similarity(emb, labels), {}
        return metric_losses.normalized_softmax(emb, labels, self.class_weights[...], kind=self.loss_type), {}

    @property
    def model(self) -> VisionTransformer:
        return self.encoder


def trainable_filter(freeze: str = "none"):
    """Which parameters train: `none` (all), `text` or `vision` (that CLIP tower frozen, e.g. locked-text
    tuning), `encoder` (a classifier's vision tower frozen: a linear probe)."""
    frozen = {"none": None, "text": "text", "vision": "visual", "encoder": "encoder"}
    if freeze not in frozen:
        raise UsageError(f"unknown freeze {freeze!r}: use one of {sorted(frozen)}")
    if frozen[freeze] is None:
        return nnx.Param
    return nnx.All(nnx.Param, nnx.Not(nnx.PathContains(frozen[freeze])))
