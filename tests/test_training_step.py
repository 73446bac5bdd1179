"""The finetuning step (also behind `pe-jax plan --train`): it learns, sharded equals single-device, gradient
accumulation equals the full batch, frozen towers stay put, layer-wise decay scales by depth."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import pe_jax
from pe_jax import sharding
from pe_jax.train.optim import layer_decay, make_optimizer
from pe_jax.train.step import init_train_state, make_train_step
from pe_jax.train.tasks import Classifier, ContrastiveTask, siglip_loss, trainable_filter

# Narrow towers keep compile and optimizer time small; widths stay divisible by the 8-device meshes.
SMALL = dict(seed=4, vision_layers=1, text_layers=1, vision_image_size=32, vision_width=64, vision_heads=2,
             vision_mlp_dim=128, vision_output_dim=64, text_width=64, text_heads=2, text_mlp_dim=128,
             text_output_dim=64)


def _batch():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((8, 32, 32, 3)).astype(np.float32)
    tokens = np.zeros((8, 32), np.int32)
    tokens[:, 0], tokens[:, 1:4], tokens[:, 4] = 49406, rng.integers(1, 4000, (8, 3)), 49407
    return images, tokens


def _state(model, mesh=None, strategy="fsdp", tx=None, **task):
    return init_train_state(ContrastiveTask(model, **task), tx or make_optimizer(learning_rate=1e-3),
                            mesh=mesh, strategy=strategy)


MESHES = {"fsdp": "fsdp=8", "fsdp_tp": "fsdp=4,model=2"}
# SGD with momentum: parameters move by lr x gradient on the first step (Adam's ~lr x sign(g) would amplify
# float-rounding differences of near-zero gradients), and its state mirrors the parameters.
SGD = optax.sgd(0.5, momentum=0.9)


@pytest.fixture(scope="module")
def small():
    """One randomly initialized SMALL CLIP for the whole module (a random init is a multi-second compile on
    CPU); every test builds its own train state from it and never changes it."""
    return pe_jax.CLIP.from_config("PE-Core-T16-384", **SMALL)


@pytest.fixture(scope="module")
def single_device_step(small):
    """The reference for the sharded steps: one SGD step on one device, computed once for both meshes."""
    images, tokens = _batch()
    graphdef, state = _state(small, tx=SGD)
    new_state, metrics = jax.jit(make_train_step(graphdef))(state, {"image": images, "tokens": tokens})
    return jax.tree.map(np.asarray, jax.tree.leaves(new_state)), np.asarray(metrics["loss"])


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "fsdp_tp"])
def test_sharded_step_equals_single_device_and_optimizer_state_is_sharded(small, single_device_step, strategy):
    expected, loss = single_device_step
    images, tokens = _batch()
    mesh = sharding.make_mesh(MESHES[strategy])
    # The same weights placed by the strategy's rules (a directly sharded random init equals the unsharded one:
    # test_sharding), so only the step itself is compiled here.
    graphdef, state = _state(small, mesh, strategy, SGD)
    step = jax.jit(make_train_step(graphdef, mesh=mesh, strategy=strategy), donate_argnums=0)
    with jax.set_mesh(mesh):
        x = jax.device_put(images, sharding.batch_sharding(mesh, 4))
        t = jax.device_put(tokens, sharding.batch_sharding(mesh, 2))
        new_s, metrics = step(state, {"image": x, "tokens": t})
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    for a, b in zip(expected, jax.tree.leaves(new_s), strict=True):
        np.testing.assert_allclose(np.asarray(b), a, rtol=1e-5, atol=1e-5)
    task, opt = nnx.merge(graphdef, new_s)
    kernel = task.clip.visual.transformer.resblocks.mlp.c_fc.kernel
    trace = opt.opt_state[0].trace["clip"]["visual"]["transformer"]["resblocks"]["mlp"]["c_fc"]["kernel"]
    expected_spec = {"fsdp": (None, None, "fsdp"), "fsdp_tp": (None, "fsdp", "model")}[strategy]  # largest: mlp
    assert (trace.get_value().sharding.spec == kernel.get_value().sharding.spec
            == jax.sharding.PartitionSpec(*expected_spec))


@pytest.mark.slow
def test_gradient_accumulation_equals_the_full_batch(small):
    images, _ = _batch()
    labels = np.arange(8, dtype=np.int32) % 3
    task = Classifier(small.visual, 3, head="mlp", rngs=nnx.Rngs(0))
    task.out.kernel[...] = 0.1 * jax.random.normal(jax.random.key(0), task.out.kernel.shape)
    results = []
    for k in (1, 4):
        graphdef, state = init_train_state(task, optax.sgd(0.5))
        step = jax.jit(make_train_step(graphdef, accum_steps=k))
        new_state, metrics = step(state, {"image": images, "label": labels})
        results.append((metrics, jax.tree.leaves(new_state)))
    np.testing.assert_allclose(results[1][0]["loss"], results[0][0]["loss"], rtol=1e-6)
    np.testing.assert_allclose(results[1][0]["accuracy"], results[0][0]["accuracy"])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_frozen_text_tower_does_not_move_and_has_no_optimizer_state(small):
    images, tokens = _batch()
    model = small
    before = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    trainable = trainable_filter("text")
    graphdef, state = init_train_state(ContrastiveTask(model), make_optimizer(1e-2), trainable)
    new_state, _ = jax.jit(make_train_step(graphdef, trainable=trainable))(state, {"image": images, "tokens": tokens})
    task, opt = nnx.merge(graphdef, new_state)
    after = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(task.clip, nnx.Param))}
    moved = {p[0] for p in before if not np.array_equal(before[p], after[p])}
    assert moved == {"visual", "logit_scale"}
    assert "text" not in opt.opt_state[1][0].mu["clip"] and "visual" in opt.opt_state[1][0].mu["clip"]


def test_layer_decay_scales_blocks_by_depth():
    updates = {"visual": {"transformer": {"resblocks": {"mlp": {"kernel": np.ones((3, 2, 2), np.float32)}}},
                          "conv1": {"kernel": np.ones((2,), np.float32)},
                          "proj": np.ones((2, 2), np.float32)}}
    out, _ = layer_decay(0.5).update(updates, None)
    stacked = np.asarray(out["visual"]["transformer"]["resblocks"]["mlp"]["kernel"])[:, 0, 0]
    np.testing.assert_allclose(stacked, [0.125, 0.25, 0.5])  # block i of 3: 0.5 ** (3 - i)
    np.testing.assert_allclose(out["visual"]["conv1"]["kernel"], 0.0625)  # embeddings: 0.5 ** 4
    np.testing.assert_allclose(out["visual"]["proj"], 1.0)


def test_siglip_loss_matches_its_definition():
    rng = np.random.default_rng(0)
    img, txt = rng.standard_normal((2, 5, 8))
    img, txt = img / np.linalg.norm(img, axis=1, keepdims=True), txt / np.linalg.norm(txt, axis=1, keepdims=True)
    logits = np.exp(2.3) * img @ txt.T - 4.0
    signs = 2 * np.eye(5) - 1
    expected = np.sum(np.log1p(np.exp(-signs * logits))) / 5
    np.testing.assert_allclose(siglip_loss(img, txt, 2.3, -4.0), expected, rtol=1e-5)


@pytest.mark.slow
def test_siglip_task_learns_with_lamb(small):
    images, tokens = _batch()
    graphdef, state = init_train_state(ContrastiveTask(small, loss="sigmoid"), make_optimizer(1e-2, optimizer="lamb"))
    step = jax.jit(make_train_step(graphdef))
    losses = []
    for _ in range(4):
        state, metrics = step(state, {"image": images, "tokens": tokens})
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0], losses
