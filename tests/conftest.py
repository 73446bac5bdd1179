import os

# Eight fake CPU devices for the sharding tests; must be set before jax is imported. The tests' programs are
# tiny, so LLVM's optimization passes cost more than they save (compile time is most of the suite's time);
# the numbers are the same programs' numbers, which the parity tests hold to their tolerances.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 " + FAST_COMPILE)
# One persistent compilation cache for the whole run, this process and the CLI / multi-process jobs it starts:
# most tests compile the same tiny programs again (a re-traced nnx.jit, each subprocess), and compiling is most
# of their time on CPU. Fresh per run (nothing stale), removed at the end; cached programs are the same programs.
_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    _CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="pe-jax-tests-xla-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

# The tests run on CPU even where the TPU or CUDA compilers are installed (tests/test_aot.py compiles for their
# compile-only devices, which needs exactly this).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Interleaved sharded programs deadlock XLA:CPU's collectives on 2 cores when dispatched asynchronously.
jax.config.update("jax_cpu_enable_async_dispatch", False)
# Parity is measured in true float32, not XLA:CPU's default reduced-precision matmuls.
jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    if _CACHE is not None:
        import shutil

        shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_clip():
    """A small random CLIP (T/16 layout, one block per tower, 32 px) shared by the tests that need some model
    rather than a particular one: a random init costs a multi-second XLA compile on CPU. Never modified."""
    import pe_jax

    return pe_jax.CLIP.from_config("PE-Core-T16-384", seed=1, vision_layers=1, text_layers=1, vision_image_size=32)


# Test modules that import a PyTorch peer (torch, timm, open_clip) at module level: they need the test extras
# (CI installs them: a missing peer is an import error, never a skip). The torch-free run on the newest jax
# (.ci/run, PE_JAX_TESTS_WITHOUT_PEERS=1) leaves them out and deselects the other `peers` tests.
PEER_MODULES = ("test_convert.py", "test_image_transform.py", "test_parity_clip.py", "test_parity_vision.py",
                "test_tokenizer.py", "test_torch_pickle.py", "test_weights.py", "test_tiling.py",
                "test_embedded_towers.py")
# Test modules that need other test extras (Ray, the moto S3 server, onnxruntime, webdataset, faiss and
# embedding-reader) are left out of that run too.
EXTRA_MODULES = ("test_object_store.py", "test_ray_engine.py", "test_export.py", "test_webdataset.py",
                 "test_clip_retrieval.py")
collect_ignore = list(PEER_MODULES + EXTRA_MODULES) if os.environ.get("PE_JAX_TESTS_WITHOUT_PEERS") == "1" else []


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in PEER_MODULES:
            item.add_marker(pytest.mark.peers)
