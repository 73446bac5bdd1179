"""What a finetuning step is made of: the tasks (contrastive CLIP, classification), their losses, the optimizer
(AdamW or LAMB, clipping, decay mask, layer-wise learning-rate decay) and the sharded, jitted train step.

`pe_jax.finetune` runs these in a loop; `pe-jax plan --train` compiles the same step from abstract shapes.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pe_jax import sharding as sh
from pe_jax.config import Execution
from pe_jax.modeling import CLIP, Dense, VisionTransformer, _param

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
            raise ValueError(f"unknown contrastive loss {loss!r}: use 'softmax' or 'sigmoid'")
        self.clip = clip
        self.loss_type = loss
        self.logit_bias = _param(jnp.asarray(-10.0, jnp.float32), ()) if loss == "sigmoid" else None

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

    Features: the tower's pooled, projected embedding; or, with `layer_idx` (or a tower without pooling),
    the mean of the patch tokens after block `layer_idx`.
    """

    def __init__(self, encoder: VisionTransformer, num_classes: int, *, head: str = "linear",
                 layer_idx: int | None = None, rngs: nnx.Rngs):
        if head not in ("linear", "mlp"):
            raise ValueError(f"unknown head {head!r}: use 'linear' or 'mlp'")
        if num_classes < 2:
            raise ValueError(f"classification needs at least 2 classes, got {num_classes}")
        cfg = encoder.config
        self.encoder = encoder
        self.layer_idx = layer_idx
        self.use_tokens = layer_idx is not None or cfg.pool_type == "none"
        dim = cfg.width if self.use_tokens else cfg.embed_dim
        head_cfg = Execution(dtype="float32", param_dtype="float32")
        self.hidden = (Dense((dim,), (dim,), ("embed", "mlp"), head_cfg, rngs=rngs) if head == "mlp" else None)
        self.out = Dense((dim,), (num_classes,), ("embed", None), head_cfg, rngs=rngs)
        # A zero output layer starts from uniform predictions, so finetuning does not begin with a random kick.
        self.out.kernel[...] = jnp.zeros_like(self.out.kernel[...])

    def features(self, images):
        if self.use_tokens:
            idx = -1 if self.layer_idx is None else self.layer_idx
            return self.encoder.forward_features(images, layer_idx=idx, strip_cls_token=True).mean(axis=1)
        return self.encoder(images)

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


def trainable_filter(freeze: str = "none"):
    """Which parameters train: `none` (all), `text` or `vision` (that CLIP tower frozen, e.g. locked-text
    tuning), `encoder` (a classifier's vision tower frozen: a linear probe)."""
    frozen = {"none": None, "text": "text", "vision": "visual", "encoder": "encoder"}
    if freeze not in frozen:
        raise ValueError(f"unknown freeze {freeze!r}: use one of {sorted(frozen)}")
    if frozen[freeze] is None:
        return nnx.Param
    return nnx.All(nnx.Param, nnx.Not(nnx.PathContains(frozen[freeze])))


# ---------------------------------------------------------------------------------------------------- optimizer


def _path_name(path) -> str:
    return ".".join(str(getattr(k, "key", k)) for k in path)


def decay_mask(params) -> object:
    """Weight decay on matrices only: no decay on norms, biases, embeddings, probe, logit scale."""
    def keep(path, leaf):
        name = _path_name(path)
        no_decay = ("embedding", "probe", "logit_scale", "logit_bias", "bias", "ln_", "layernorm", "ls_")
        return leaf.ndim >= 2 and not any(n in name for n in no_decay)

    return jax.tree_util.tree_map_with_path(keep, params)


# Parameters below the first block: they take the smallest layer-wise learning rate.
_EMBEDDING = re.compile(r"(^|\.)(conv1|class_embedding|positional_embedding|ln_pre|token_embedding)(\.|$)")


def layer_decay(decay: float) -> optax.GradientTransformation:
    """Layer-wise learning-rate decay (BEiT): block i of a tower with L blocks is scaled by decay^(L - i),
    the embeddings by decay^(L + 1), everything above the blocks (norms, pooling, heads) by 1.

    Blocks are stacked on a leading `layers` axis, so a stacked update is scaled by a vector along it.
    """
    def scales(updates):
        towers = {}  # tower prefix -> number of blocks
        for path, leaf in jax.tree_util.tree_leaves_with_path(updates):
            name = _path_name(path)
            if ".transformer.resblocks." in f".{name}":
                towers[name.split("transformer.resblocks")[0]] = leaf.shape[0]

        def scale(path, leaf):
            name = _path_name(path)
            for prefix, n in towers.items():
                if name.startswith(prefix) and "transformer.resblocks" in name:
                    s = decay ** (n - jnp.arange(n, dtype=jnp.float32))
                    return s.reshape((n,) + (1,) * (leaf.ndim - 1))
                if name.startswith(prefix) and _EMBEDDING.search(name[len(prefix):]):
                    return jnp.float32(decay ** (n + 1))
            return jnp.float32(1.0)

        return jax.tree_util.tree_map_with_path(scale, updates)

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: (u * s).astype(u.dtype), updates, scales(updates)), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(learning_rate=1e-5, weight_decay: float = 0.05, clip_norm: float | None = 1.0, *,
                   optimizer: str = "adamw", b1: float = 0.9, b2: float = 0.999, layer_decay_rate: float | None = None):
    """Gradient clipping, AdamW or LAMB (decoupled weight decay on matrices only), then layer-wise decay.

    `learning_rate` is a float or an optax schedule.
    """
    makers = {"adamw": optax.adamw, "lamb": optax.lamb}
    if optimizer not in makers:
        raise ValueError(f"unknown optimizer {optimizer!r}: use one of {sorted(makers)}")
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(makers[optimizer](learning_rate, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask))
    if layer_decay_rate is not None and layer_decay_rate != 1.0:
        parts.append(layer_decay(layer_decay_rate))
    return optax.chain(*parts)


def warmup_cosine(peak: float, steps: int, warmup_steps: int = 0, end_fraction: float = 0.0):
    """Linear warmup from 0 to `peak`, then cosine decay to `end_fraction * peak` at `steps`."""
    if warmup_steps >= steps:
        return optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, steps, end_value=peak * end_fraction)


# ---------------------------------------------------------------------------------------------------- the step


def abstract_train_state(abstract_task, mesh, strategy: str, tx=None, trainable=nnx.Param):
    """(graphdef, abstract state) of (task, optimizer), every leaf with its mesh sharding."""
    tx = tx or make_optimizer()
    graphdef, _ = nnx.split(abstract_task)

    def init():
        task = nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nnx.state(abstract_task)))
        return task, nnx.Optimizer(task, tx, wrt=trainable)

    return sh.abstract_sharded(nnx.eval_shape(init), mesh, strategy)


def init_train_state(task, tx, trainable=nnx.Param, mesh=None, strategy: str = "fsdp"):
    """(graphdef, state) of (task, optimizer) for a concrete task; optimizer state sharded like the parameters."""
    make = lambda t: nnx.state((t, nnx.Optimizer(t, tx, wrt=trainable)))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: (task, nnx.Optimizer(task, tx, wrt=trainable))))
    out = sh.state_shardings(abstract, mesh, strategy) if mesh is not None else None
    return graphdef, jax.jit(make, out_shardings=out)(task)


def make_train_step(graphdef, *, trainable=nnx.Param, mesh=None, strategy: str = "fsdp", accum_steps: int = 1):
    """step(state, batch) -> (state, metrics) for the (task, optimizer) state of `graphdef`.

    The loss is the task's `loss(batch)`. With `accum_steps` > 1 the batch is split into that many
    micro-batches (rows i, i + k, ... so each device keeps its share) whose gradients are averaged: one
    optimizer update, the activation memory of a micro-batch. Gradients are constrained to the parameters'
    shardings, so GSPMD reduce-scatters them instead of leaving them replicated. Frozen parameters get no
    gradient at all.
    """
    def constrain(grads):
        if mesh is None:
            return grads
        return jax.tree.map(lambda g: g.replace(jax.lax.with_sharding_constraint(
            g.get_value(), sh.variable_sharding(g, mesh, strategy))), grads,
            is_leaf=lambda x: isinstance(x, nnx.Variable))

    def step(state, batch):
        task, optimizer = nnx.merge(graphdef, state)
        grad_fn = nnx.value_and_grad(lambda task, micro: task.loss(micro), argnums=nnx.DiffState(0, trainable),
                                     has_aux=True)
        if accum_steps == 1:
            (loss, aux), grads = grad_fn(task, batch)
        else:
            micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
                                 .swapaxes(0, 1), batch)

            task_def, task_state = nnx.split(task)

            def body(carry, mb):  # the task rides in the carry: nnx wants its variables at the body's trace level
                total, state = carry
                (loss, aux), grads = grad_fn(nnx.merge(task_def, state), mb)
                return (jax.tree.map(jnp.add, total, (loss, aux, grads)), state), None

            (loss, aux), grads = jax.eval_shape(grad_fn, task, jax.tree.map(lambda x: x[0], micro))
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss, aux, grads))
            ((loss, aux, grads), _), _ = jax.lax.scan(body, (zeros, task_state), micro)
            loss, aux, grads = jax.tree.map(lambda x: x / accum_steps, (loss, aux, grads))
        optimizer.update(task, constrain(grads))
        return nnx.state((task, optimizer)), {"loss": loss, **aux}

    return step
