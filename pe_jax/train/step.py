"""The sharded, jitted finetuning step over a (task, optimizer) state, with gradient accumulation; and the
train state, built concrete or abstract (`pe-jax plan --train` compiles the same step from shapes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pe_jax import sharding as sh
from pe_jax.train.optim import make_optimizer


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
