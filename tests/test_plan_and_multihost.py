"""The memory planner (full G/14, compile only) and a two-process job joined by jax.distributed."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from pe_jax import distributed
from pe_jax.checkpoints.orbax import save
from pe_jax.memory_plan import plan


@pytest.mark.slow
def test_g14_forward_plan_fsdp_bf16_batch_64():
    p = plan("PE-Core-G14-448", "fsdp=8", 64, dtype="bfloat16")
    # 2.42 B bf16 parameters split 8 ways: ~0.56 GiB of arguments per device
    assert 0.5 < p.argument_gib < 0.7
    assert 1.0 < p.peak_gib < 16
    assert 4.0e12 < p.flops_per_example < 4.4e12  # ~4.2 TFLOP per 448px image + 72-token text
    lines = p.report().splitlines()
    assert f"peak per device: {p.peak_gib:.2f} GiB" in lines
    assert lines[-1].startswith("compiler: XLA:CPU on fake devices, an estimate")  # no --target: says so


@pytest.mark.slow
def test_g14_train_step_plan_fits_a_v5e_chip():
    p = plan("PE-Core-G14-448", "fsdp=8", 64, dtype="bfloat16", remat="nothing_saveable", train=True)
    # fp32 weights + AdamW moments (12 B/param) over 8 devices, donated: outputs alias the arguments
    assert 3.2 < p.argument_gib < 3.6 and p.alias_gib > 3.2
    assert p.peak_gib <= 14.0
    assert p.report().splitlines()[0].endswith("global batch: 64")


@pytest.mark.slow
def test_plan_cli(tmp_path, capsys):
    from pe_jax.cli import main

    env = dict(os.environ, XLA_FLAGS="")  # the command makes its own fake devices
    out = subprocess.run([sys.executable, "-m", "pe_jax.cli", "plan", "--model", "PE-Core-B16-224", "--mesh",
                          "fsdp=4,model=2", "--batch", "6", "--strategy", "fsdp_tp", "--image-size", "64"],
                         capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-2].startswith("peak per device: ") and lines[-2].endswith(" GiB")
    assert "XLA:CPU" in lines[-1]
    # The refusal in-process: it comes before any device is made (a subprocess would add seconds of imports).
    capsys.readouterr()
    assert main(["plan", "--model", "PE-Core-B16-224", "--mesh", "fsdp=2,data=-1", "--batch", "6"]) == 2
    err = capsys.readouterr().err
    assert "explicit mesh sizes" in err and "Traceback" not in err


def test_distributed_initialize_is_a_noop_for_one_process(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "PE_JAX_DISTRIBUTED"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize() is False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multihost
def test_two_processes_match_one(tiny_clip, tmp_path):
    save(tiny_clip, tmp_path / "ckpt", preset="PE-Core-T16-384")
    images = np.random.default_rng(0).standard_normal((11, 32, 32, 3)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    expected = np.asarray(jax.jit(lambda m, x: m.encode_image(x))(tiny_clip, images))
    worker = Path(__file__).with_name("multihost_worker.py")
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(worker), port, str(i), str(tmp_path / "ckpt"),
                               str(tmp_path / "images.npy"), str(tmp_path / "out.npy")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(__import__("importlib").util.find_spec("libtpu") is not None, reason="libtpu is installed here")
def test_plan_target_without_libtpu_says_what_to_install(capsys):
    from pe_jax.cli import main

    assert main(["plan", "--model", "PE-Core-T16-384", "--target", "v5e-4", "--batch", "8"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "jax[tpu]"' in err and "v5e-4" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_targets_table():
    from pe_jax.targets import TARGETS, get_target

    assert {"v4-8", "v5e-1", "v5e-4", "v5e-8", "v5p-8", "v5p-16", "v5p-64", "v6e-1", "v6e-4", "v6e-8", "v6e-16",
            "h100", "h100-8", "h200", "h200-8"} <= set(TARGETS)
    assert get_target("v5p-8").chips == 4 and get_target("v5e-8").chips == 8  # v5p names count TensorCores
    two = get_target("v5e-8", slices=2)
    assert two.devices_total == 16 and "x 2 slices" in two.describe()
    assert get_target("h100", hbm_gib=1.5).hbm_bytes == 1.5 * 2**30
    with pytest.raises(ValueError, match="unknown target 'v9'"):
        get_target("v9")


@pytest.mark.parametrize("mesh", ["data=100000", "data=4096"])
def test_plan_refuses_a_mesh_larger_than_the_fake_devices_it_can_make(mesh, capsys):
    """`plan --mesh data=100000` grew past 2.9 GB ignoring Ctrl-C, data=4096 ended in XLA:CPU's traceback: both are
    refused in one line before any device is made, naming the devices needed and suggesting --target."""
    from pe_jax.cli import main

    assert main(["plan", "--model", "PE-Core-B16-224", "--mesh", mesh, "--batch", "8"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"needs {mesh.split('=')[1]} devices" in err and "at most 2048 fake CPU devices" in err and "--target" in err
