"""The finetuning step (also behind `pe-jax plan --train`): it learns, sharded equals single-device, gradient
accumulation equals the full batch, frozen towers stay put, layer-wise decay scales by depth."""

import jax
import numpy as np
import optax
from flax import nnx

import pe_jax
from pe_jax import sharding
from pe_jax.training import ContrastiveTask, init_train_state, make_optimizer, make_train_step

SMALL = dict(seed=4, vision_layers=1, text_layers=1, vision_image_size=32)


def _batch():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((8, 32, 32, 3)).astype(np.float32)
    tokens = np.zeros((8, 32), np.int32)
    tokens[:, 0], tokens[:, 1:4], tokens[:, 4] = 49406, rng.integers(1, 4000, (8, 3)), 49407
    return images, tokens


def _state(model, mesh=None, strategy="fsdp", tx=None, **task):
    return init_train_state(ContrastiveTask(model, **task), tx or make_optimizer(learning_rate=1e-3),
                            mesh=mesh, strategy=strategy)


def test_loss_falls():
    images, tokens = _batch()
    graphdef, state = _state(pe_jax.CLIP.from_config("PE-Core-T16-384", **SMALL))
    step = jax.jit(make_train_step(graphdef))
    losses = []
    for _ in range(5):
        state, metrics = step(state, {"image": images, "tokens": tokens})
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.1, losses


def _sharded_step(tx, images, tokens):
    mesh = sharding.make_mesh("fsdp=4,model=2")
    model = pe_jax.CLIP.from_config("PE-Core-T16-384", mesh=mesh, strategy="fsdp_tp", **SMALL)
    graphdef, state = _state(model, mesh, "fsdp_tp", tx)
    step = jax.jit(make_train_step(graphdef, mesh=mesh, strategy="fsdp_tp"), donate_argnums=0)
    with jax.set_mesh(mesh):
        x = jax.device_put(images, sharding.batch_sharding(mesh, 4))
        t = jax.device_put(tokens, sharding.batch_sharding(mesh, 2))
        new_state, metrics = step(state, {"image": x, "tokens": t})
    return graphdef, new_state, metrics["loss"]


def test_sharded_step_equals_single_device():
    # SGD, so parameters move by lr x gradient: Adam's first step is ~lr x sign(g), which amplifies
    # float-rounding differences of near-zero gradients into visible ones.
    images, tokens = _batch()
    sgd = optax.sgd(0.5)
    graphdef, state = _state(pe_jax.CLIP.from_config("PE-Core-T16-384", **SMALL), tx=sgd)
    new_state, metrics = jax.jit(make_train_step(graphdef))(state, {"image": images, "tokens": tokens})
    loss = metrics["loss"]
    _, new_s, loss_s = _sharded_step(sgd, images, tokens)
    np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(new_s), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


def test_optimizer_state_is_sharded_like_the_parameters():
    images, tokens = _batch()
    graphdef_s, new_s, _ = _sharded_step(make_optimizer(1e-3), images, tokens)
    task, opt = nnx.merge(graphdef_s, new_s)
    kernel = task.clip.visual.transformer.resblocks.mlp.c_fc.kernel
    mu = opt.opt_state[1][0].mu["clip"]["visual"]["transformer"]["resblocks"]["mlp"]["c_fc"]["kernel"]
    assert mu.get_value().sharding.spec == kernel.get_value().sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", "model")
