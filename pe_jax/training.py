"""The finetuning step: contrastive (CLIP) loss, AdamW with fp32 master weights, sharded by the same rules
as the parameters. Used by `pe-jax plan --train` to size a job before it runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pe_jax import sharding as sh


def decay_mask(params) -> object:
    """Weight decay on matrices only: no decay on norms, biases, embeddings, probe, logit scale."""
    def keep(path, leaf):
        name = ".".join(str(getattr(k, "key", k)) for k in path)
        no_decay = ("embedding", "probe", "logit_scale", "bias", "ln_", "layernorm", "ls_")
        return leaf.ndim >= 2 and not any(n in name for n in no_decay)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(learning_rate=1e-5, weight_decay: float = 0.05, clip_norm: float = 1.0):
    return optax.chain(optax.clip_by_global_norm(clip_norm),
                       optax.adamw(learning_rate, weight_decay=weight_decay, mask=decay_mask))


def clip_loss(image_features, text_features, logit_scale):
    """Symmetric softmax contrastive loss, logit scale clamped to 100 as the CLIP family does."""
    scale = jnp.minimum(jnp.exp(logit_scale), 100.0)
    logits = scale * image_features @ text_features.T
    labels = jnp.arange(logits.shape[0])
    return (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()) / 2


def abstract_train_state(abstract_model, mesh, strategy: str, tx=None):
    """(graphdef, abstract state) of (model, optimizer), every leaf with its mesh sharding."""
    tx = tx or make_optimizer()
    graphdef, _ = nnx.split(abstract_model)

    def init():
        model = nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nnx.state(abstract_model)))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    return sh.abstract_sharded(nnx.eval_shape(init), mesh, strategy)


def make_train_step(graphdef, is_clip: bool, mesh=None, strategy: str = "fsdp"):
    """step(state, images[, tokens]) -> (state, loss) for the (model, optimizer) state of `graphdef`.

    Gradients are constrained to the parameters' shardings, so GSPMD reduce-scatters them instead of
    leaving them replicated.
    """
    def constrain(grads):
        if mesh is None:
            return grads
        return jax.tree.map(lambda g: g.replace(jax.lax.with_sharding_constraint(
            g.get_value(), sh.variable_sharding(g, mesh, strategy))), grads,
            is_leaf=lambda x: isinstance(x, nnx.Variable))

    def step(state, images, tokens=None):
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(model):
            if is_clip:
                img, txt, _ = model(images, tokens)
                return clip_loss(img, txt, model.logit_scale[...])
            return jnp.mean(jnp.square(model(images).astype(jnp.float32)))

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, constrain(grads))
        return nnx.state((model, optimizer)), loss

    return step
