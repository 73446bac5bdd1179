"""Every program pe-jax runs at scale, compiled ahead of time by the real TPU (libtpu) and GPU (CUDA plugin)
compilers for compile-only devices on this CPU host: small shapes here, full sizes in benchmarks/bench_tpu_plan.py.

Run with the compilers installed (`pip install "jax[tpu]" "jax[cuda12]"`, as .ci/run does in its newest-jax
environment) and `JAX_PLATFORMS=cpu pytest -m aot`; without them each test is skipped saying which is missing.
"""

import dataclasses
import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from pe_jax import sharding as sh
from pe_jax.config import clip_config, vision_config
from pe_jax.features import features, layer_features
from pe_jax.memory_plan import max_batch, plan, vision_flops
from pe_jax.modeling import CLIP, VisionTransformer
from pe_jax.targets import get_target, make_mesh
from pe_jax.train.step import abstract_train_state, make_train_step
from pe_jax.train.tasks import Classifier, ContrastiveTask

pytestmark = pytest.mark.aot
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # two xdist workers may each load libtpu

HAS_TPU = importlib.util.find_spec("libtpu") is not None
HAS_CUDA = importlib.util.find_spec("jax_cuda12_plugin") is not None
needs_tpu = pytest.mark.skipif(not HAS_TPU, reason='libtpu not installed (pip install "jax[tpu]")')
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason='CUDA plugin not installed (pip install "jax[cuda12]")')
TPUS = ["v5e-4", "v5p-8"]  # two generations, 2x2 chips each

@pytest.fixture(autouse=True)
def _no_persistent_cache():
    """Compile-only executables cannot be stored in or read back from the suite's persistent compilation cache
    (every read warned); these compiles skip it."""
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", True)


# Small programs: T/16-shaped towers, two layers, 64 px images (16 patches + class token), 16-token text.
TINY = dict(layers=2, image_size=64, dtype="bfloat16")
TINY_CLIP = dict(vision_layers=2, text_layers=2, vision_image_size=64, text_context_length=16, dtype="bfloat16")


def _compile(fn, args, mesh):
    with jax.set_mesh(mesh), jax.default_matmul_precision("default"):  # conftest's "highest" is for CPU parity
        return jax.jit(fn).lower(*args).compile()


def _images(mesh, batch=8, size=64):
    return jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32, sharding=sh.batch_sharding(mesh, 4))


def _tower(attention="splash", preset="PE-Core-T16-384", **overrides):
    cfg = vision_config(preset, **{**TINY, "attention": attention, **overrides})
    return nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)))


def _forward(model, mesh, strategy, call):
    graphdef, params = sh.abstract_sharded(model, mesh, strategy)
    return lambda p, *xs: call(nnx.merge(graphdef, p), *xs), params


@needs_tpu
@pytest.mark.parametrize("name", TPUS)
@pytest.mark.parametrize("strategy, axes", [("fsdp", "fsdp=4"), ("dp", "data=4"), ("fsdp_tp", "fsdp=2,model=2")])
def test_vision_tower_forward_compiles_for_tpu(name, strategy, axes):
    mesh = make_mesh(get_target(name), axes)
    fn, params = _forward(_tower(), mesh, strategy, lambda m, x: m(x))
    compiled = _compile(fn, (params, _images(mesh)), mesh)
    mem = compiled.memory_analysis()
    assert mem.argument_size_in_bytes > 0 and mem.output_size_in_bytes > 0
    assert "tpu_custom_call" in compiled.as_text()  # splash is the Mosaic kernel, run per shard


@needs_tpu
@pytest.mark.parametrize("name", TPUS)
def test_clip_forward_compiles_for_tpu(name):
    mesh = make_mesh(get_target(name), "fsdp=4")
    cfg = clip_config("PE-Core-T16-384", **TINY_CLIP, attention="splash")
    model = nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(0)))
    fn, params = _forward(model, mesh, "fsdp", lambda m, x, t: m(x, t))
    tokens = jax.ShapeDtypeStruct((8, 16), jnp.int32, sharding=sh.batch_sharding(mesh, 2))
    compiled = _compile(fn, (params, _images(mesh), tokens), mesh)
    assert compiled.memory_analysis().argument_size_in_bytes > 0


@needs_tpu
def test_embedding_and_layer_sweep_programs_compile_for_tpu():
    """The embed job's encode batch (a layer's pooled features) and the layer sweep's one multi-layer pass."""
    mesh = make_mesh(get_target("v5e-4"), "data=4")
    model = _tower()
    for call in (lambda m, x: features(m, x, layer_idx=1, pooling="mean", normalize=True),
                 lambda m, x: features(m, x, pooling="attn", normalize=True),
                 lambda m, x: layer_features(m, x, [(0, "cls"), (1, "mean"), (-1, "attn")], normalize=True)):
        fn, params = _forward(model, mesh, "dp", call)
        assert _compile(fn, (params, _images(mesh)), mesh).memory_analysis().output_size_in_bytes > 0


def _train_args(task, mesh, strategy, inputs, **step_options):
    graphdef, state = abstract_train_state(task, mesh, strategy)
    step = make_train_step(graphdef, mesh=mesh, strategy=strategy, **step_options)
    with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
        return jax.jit(step, donate_argnums=0).lower(state, inputs).compile()


@needs_tpu
@pytest.mark.parametrize("name, strategy, axes, loss, accum, remat", [
    ("v5e-4", "fsdp", "fsdp=4", "softmax", 1, "nothing_saveable"),
    ("v5p-8", "fsdp", "fsdp=4", "sigmoid", 2, "dots_saveable"),
    ("v5p-8", "fsdp_tp", "fsdp=2,model=2", "softmax", 1, "full"),
])
def test_contrastive_finetune_step_compiles_for_tpu(name, strategy, axes, loss, accum, remat):
    mesh = make_mesh(get_target(name), axes)
    cfg = clip_config("PE-Core-T16-384", **TINY_CLIP, attention="splash", param_dtype="float32", remat_policy=remat)
    task = nnx.eval_shape(lambda: ContrastiveTask(CLIP(cfg, rngs=nnx.Rngs(0)), loss=loss))
    inputs = {"image": _images(mesh), "tokens": jax.ShapeDtypeStruct((8, 16), jnp.int32,
                                                                    sharding=sh.batch_sharding(mesh, 2))}
    compiled = _train_args(task, mesh, strategy, inputs, accum_steps=accum)
    mem = compiled.memory_analysis()
    assert mem.alias_size_in_bytes > 0  # the donated state is updated in place
    if strategy == "fsdp_tp":  # a 2-D mesh: weights gathered over fsdp, heads / MLP split over model
        hlo = compiled.as_text()
        assert "all-gather" in hlo and ("reduce-scatter" in hlo or "all-reduce" in hlo)


@needs_tpu
def test_classification_finetune_step_compiles_for_tpu():
    mesh = make_mesh(get_target("v5e-4"), "fsdp=2,model=2")
    cfg = vision_config("PE-Core-T16-384", **TINY, attention="splash", param_dtype="float32")
    task = nnx.eval_shape(lambda: Classifier(VisionTransformer(cfg, rngs=nnx.Rngs(0)), 10, rngs=nnx.Rngs(0)))
    inputs = {"image": _images(mesh), "label": jax.ShapeDtypeStruct((8,), jnp.int32,
                                                                   sharding=sh.batch_sharding(mesh, 1))}
    assert _train_args(task, mesh, "fsdp_tp", inputs).memory_analysis().temp_size_in_bytes > 0


@needs_tpu
def test_xla_attention_compiles_for_tpu_and_matches_analytic_flops():
    """The TPU compiler's FLOPs for a one-layer B/16 equal the analytic count (within 10%): nothing computed
    twice or left unfused by mistake. Its cost analysis counts a scanned loop's body once whatever the depth,
    which is why plans use the analytic count."""
    mesh = make_mesh(get_target("v5e-1"), "data=1")
    flops = {}
    for layers in (1, 2):
        fn, params = _forward(_tower("xla", "PE-Core-B16-224", layers=layers, image_size=224), mesh, "dp",
                              lambda m, x: m(x))
        flops[layers] = _compile(fn, (params, _images(mesh, 2, 224)), mesh).cost_analysis()["flops"]
    assert flops[1] == pytest.approx(2 * vision_flops(vision_config("PE-Core-B16-224", layers=1)), rel=0.10)
    assert flops[2] == pytest.approx(flops[1], rel=0.01)


@needs_tpu
def test_plan_target_fits_and_does_not_fit():
    target = get_target("v5e-4")
    fits = plan("PE-Spatial-T16-512", "fsdp=4", 8, image_size=64, target=target)
    assert fits.fits and fits.attention == "splash" and fits.peak_gib > 0
    assert "fits, " in fits.report() and "roofline estimate" in fits.report()
    tight = dataclasses.replace(target, hbm_gib=fits.peak_gib / 2)
    small = plan("PE-Spatial-T16-512", "fsdp=4", 8, image_size=64, target=tight)
    assert small.fits is False and "does not fit by" in small.report()


@needs_tpu
@pytest.mark.slow
def test_max_batch_is_the_largest_that_fits():
    small, large = (plan("PE-Spatial-T16-512", "data=4", b, image_size=256, target=get_target("v5e-4"),
                         strategy="dp") for b in (8, 32))
    # A made-up HBM that holds a global batch of about 200 (memory grows linearly in the batch here).
    hbm = small.peak_gib + (large.peak_gib - small.peak_gib) / 24 * 192
    target = get_target("v5e-4", hbm_gib=hbm)
    best, plans = max_batch("PE-Spatial-T16-512", "data=4", target=target, start=8, image_size=256, strategy="dp")
    assert 150 < best <= 200 and plans[best].fits and len(plans) <= 6
    bigger = [b for b, p in plans.items() if b > best]
    assert bigger and all(not plans[b].fits for b in bigger)
    assert min(bigger) - best <= max(4, best // 8)  # bracketed to the grid


@needs_cuda
@pytest.mark.parametrize("name", ["h100", "h200-8"])
def test_clip_forward_compiles_for_gpu_with_cudnn_attention(name):
    target = get_target(name)
    result = plan("PE-Core-T16-384", f"fsdp={target.chips}", 8, image_size=64, target=target)
    assert result.attention == "cudnn" and result.fits and result.peak_gib > 0


@needs_cuda
def test_gpu_train_step_compiles():
    result = plan("PE-Core-T16-384", "fsdp=8", 16, image_size=64, target=get_target("h100-8"), train=True)
    assert result.fits and result.alias_gib > 0


@needs_tpu
def test_readme_fit_commands_run_as_written(tmp_path):
    """The quick command of the README's "Will it fit on my TPU / GPU?" block, as a user types it."""
    import subprocess
    import sys

    from doc_blocks import block as doc_block

    block = doc_block("## Will it fit on my TPU / GPU?", "bash")  # docs/sharding-and-planning.md
    quick = [line.split("#")[0].split() for line in block.splitlines() if "--image-size 64" in line]
    assert quick, "the README block lost its quick command"
    for argv in quick:
        assert argv[:2] == ["pe-jax", "plan"]
        out = subprocess.run([sys.executable, "-m", "pe_jax.cli", *argv[1:]], capture_output=True, text=True,
                             cwd=tmp_path, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert out.returncode == 0, out.stderr[-2000:]
        assert "fits, " in out.stdout and "roofline estimate" in out.stdout and "attention: splash" in out.stdout
