"""The splash (Pallas TPU) attention backend, checked against the XLA path in Pallas interpret mode on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pe_jax.attention import dot_product_attention, resolve_implementation, splash_attention

jax.config.update("jax_default_matmul_precision", "highest")  # conftest sets it too; parity needs true float32


def _qkv(b, tq, tk, h, d, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.key(tq * 1000 + tk + d), 3)
    return (
        jax.random.normal(kq, (b, tq, h, d), dtype),
        jax.random.normal(kk, (b, tk, h, d), dtype),
        jax.random.normal(kv, (b, tk, h, d), dtype),
    )


@pytest.mark.parametrize(
    "b, tq, tk, h, d, causal",
    [
        (2, 197, 197, 12, 64, False),  # ViT-B/16 at 224 with a class token: padded to 256, keys masked
        (1, 256, 256, 4, 96, False),  # no class token, exact multiple of the block: no padding at all
        (2, 72, 72, 20, 64, True),  # text tower, causal
        (2, 1, 197, 8, 192, False),  # attention-pooling head: 1 query padded to a full block
    ],
)
def test_splash_matches_xla(b, tq, tk, h, d, causal):
    q, k, v = _qkv(b, tq, tk, h, d)
    out = splash_attention(q, k, v, is_causal=causal, interpret=True)
    ref = dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
    assert out.shape == ref.shape and out.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=2e-5)


@pytest.mark.slow
def test_splash_bfloat16_and_grad():
    q, k, v = _qkv(1, 72, 72, 2, 64)
    out = splash_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), is_causal=True, interpret=True)
    ref = dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), rtol=0, atol=3e-2)
    # Padded query rows see real keys, so no NaN leaks into gradients through the sliced-off rows.
    g = jax.grad(lambda q: splash_attention(q, k, v, is_causal=True, interpret=True).sum())(q)
    g_ref = jax.grad(lambda q: dot_product_attention(q, k, v, is_causal=True).sum())(q)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=0, atol=2e-5)


def test_resolve_implementation(monkeypatch):
    assert jax.default_backend() == "cpu"
    assert resolve_implementation("auto", jnp.float32, 64) == "xla"
    assert resolve_implementation("auto", jnp.bfloat16, 64) == "xla"
    assert resolve_implementation("splash", jnp.float32, 64) == "splash"
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert resolve_implementation("auto", jnp.bfloat16, 192) == "splash"


def test_unknown_implementation_raises():
    q, k, v = _qkv(1, 4, 4, 1, 8)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        dot_product_attention(q, k, v, implementation="flash")


def test_splash_exports_for_tpu():
    """The real (non-interpreted) kernel lowers to a Mosaic custom call for TPU from this CPU host."""
    q, k, v = _qkv(2, 197, 197, 12, 64, jnp.bfloat16)
    fn = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, implementation="splash"))
    exported = jax.export.export(fn, platforms=["tpu"])(q, k, v)
    assert exported.out_avals[0].shape == q.shape
    assert "tpu_custom_call" in exported.mlir_module()


def test_splash_under_a_mesh_runs_per_shard_and_matches_xla():
    """On a mesh, splash runs inside shard_map (a Mosaic kernel cannot be partitioned by XLA): batch over the
    data axes, heads over `model`; the result is the unsharded one."""
    from pe_jax import sharding

    mesh = sharding.make_mesh("data=2,model=2", devices=jax.devices()[:4])
    q, k, v = _qkv(2, 16, 16, 4, 8)
    assert sharding.activation_spec(mesh, ("batch", None, "heads", None), q.shape) == jax.sharding.PartitionSpec(
        "data", None, "model", None)
    assert sharding.activation_spec(mesh, ("batch", "heads"), (3, 3)) == jax.sharding.PartitionSpec(None, None)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda q, k, v: splash_attention(q, k, v, is_causal=True, interpret=True))(q, k, v)
    ref = dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=2e-5)


def test_auto_resolves_for_the_platform_being_compiled_for():
    from pe_jax.attention import compiling_for

    with compiling_for("tpu"):
        assert resolve_implementation("auto", jnp.float32, 64) == "splash"
    with compiling_for("gpu"):
        assert resolve_implementation("auto", jnp.bfloat16, 96) == "cudnn"
        assert resolve_implementation("auto", jnp.bfloat16, 192) == "xla"  # G/14's pooling head: too wide
        assert resolve_implementation("auto", jnp.float32, 64) == "xla"
    assert resolve_implementation("auto", jnp.bfloat16, 64) == "xla"  # back on this CPU
