"""The finetuning step behind `pe-jax plan --train`: it learns, and sharded equals single-device."""

import jax
import numpy as np
import optax
from flax import nnx

import pe_jax
from pe_jax import sharding
from pe_jax.training import make_optimizer, make_train_step

SMALL = dict(seed=4, vision_layers=1, text_layers=1, vision_image_size=32)


def _batch():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((8, 32, 32, 3)).astype(np.float32)
    tokens = np.zeros((8, 32), np.int32)
    tokens[:, 0], tokens[:, 1:4], tokens[:, 4] = 49406, rng.integers(1, 4000, (8, 3)), 49407
    return images, tokens


def _state(model, mesh=None, strategy="fsdp", tx=None):
    tx = tx or make_optimizer(learning_rate=1e-3)
    if mesh is None:
        graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
        return graphdef, state
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: (model, nnx.Optimizer(model, tx, wrt=nnx.Param))))
    out = sharding.state_shardings(abstract, mesh, strategy)
    state = jax.jit(lambda m: nnx.state((m, nnx.Optimizer(m, tx, wrt=nnx.Param))), out_shardings=out)(model)
    return graphdef, state


def test_loss_falls():
    images, tokens = _batch()
    graphdef, state = _state(pe_jax.CLIP.from_config("PE-Core-T16-384", **SMALL))
    step = jax.jit(make_train_step(graphdef, is_clip=True))
    losses = []
    for _ in range(5):
        state, loss = step(state, images, tokens)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses


def _sharded_step(tx, images, tokens):
    mesh = sharding.make_mesh("fsdp=4,model=2")
    model = pe_jax.CLIP.from_config("PE-Core-T16-384", mesh=mesh, strategy="fsdp_tp", **SMALL)
    graphdef, state = _state(model, mesh, "fsdp_tp", tx)
    step = jax.jit(make_train_step(graphdef, is_clip=True, mesh=mesh, strategy="fsdp_tp"), donate_argnums=0)
    with jax.set_mesh(mesh):
        x = jax.device_put(images, sharding.batch_sharding(mesh, 4))
        t = jax.device_put(tokens, sharding.batch_sharding(mesh, 2))
        new_state, loss = step(state, x, t)
    return graphdef, new_state, loss


def test_sharded_step_equals_single_device():
    # SGD, so parameters move by lr x gradient: Adam's first step is ~lr x sign(g), which amplifies
    # float-rounding differences of near-zero gradients into visible ones.
    images, tokens = _batch()
    sgd = optax.sgd(0.5)
    graphdef, state = _state(pe_jax.CLIP.from_config("PE-Core-T16-384", **SMALL), tx=sgd)
    new_state, loss = jax.jit(make_train_step(graphdef, is_clip=True))(state, images, tokens)
    _, new_s, loss_s = _sharded_step(sgd, images, tokens)
    np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(new_s), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


def test_optimizer_state_is_sharded_like_the_parameters():
    images, tokens = _batch()
    graphdef_s, new_s, _ = _sharded_step(make_optimizer(1e-3), images, tokens)
    model_s, opt = nnx.merge(graphdef_s, new_s)
    kernel = model_s.visual.transformer.resblocks.mlp.c_fc.kernel
    mu = opt.opt_state[1][0].mu["visual"]["transformer"]["resblocks"]["mlp"]["c_fc"]["kernel"]
    assert mu.get_value().sharding.spec == kernel.get_value().sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", "model")
