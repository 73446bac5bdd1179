"""The README's and the guides' (docs/*.md) code blocks run as written; every block is run by a test or marked
`not-run` in its fence (tests/doc_blocks.py finds them)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from doc_blocks import ROOT, all_blocks, block, documents, run_python

# (heading, language) of every block a test runs, and the test that runs it
RUN = {
    ("## Usage", "python"): "tests/test_readme.py",
    ("## Inputs", "python"): "tests/test_readme.py",
    ("## Sharded inference", "python"): "tests/test_readme.py",
    ("## Tiling (PE-Lang)", "python"): "tests/test_tiling.py",
    ("## Engines and object stores", "bash"): "tests/test_ray_engine.py",
    ("## Coming from clip-retrieval", "bash"): "tests/test_clip_retrieval.py",
    ("## PerceptionLM", "bash"): "tests/test_embedded_towers.py",
    ("## PE-AV", "bash"): "tests/test_embedded_towers.py",
    ("## Will it fit on my TPU / GPU?", "bash"): "tests/test_aot.py (with libtpu)",
}


def test_every_code_block_runs_in_a_test_or_says_not_run():
    run = {block(heading, language) for heading, language in RUN}
    unaccounted = [f"{doc.relative_to(ROOT)} {heading!r}: ```{language}" for doc, heading, language, options, code
                   in all_blocks() if language in ("python", "bash", "sh") and "not-run" not in options.split()
                   and code not in run]
    assert not unaccounted, "blocks no test runs (run them in a test, or mark the fence not-run): " + \
        "; ".join(unaccounted)
    assert all(language for _, _, language, _, _ in all_blocks()), "a fence names its language (text for output)"


def test_docs_links_resolve():
    """Relative links between the README and the guides name files that exist."""
    import re

    for doc in documents():
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)} links to missing {target}"


@pytest.mark.slow
def test_readme_usage_example_runs():
    scope = run_python("## Usage")
    assert scope["image_features"].shape == (2, 512)
    assert scope["tokens_8"].shape == (1, 1024, 192) and len(scope["layers"]) == 3
    assert scope["pooled"].shape == (1, 192)
    assert scope["model"].config == scope["pe_jax"].clip_config("PE-Core-T16-384")  # saved and loaded back


def test_readme_inputs_example_runs():
    scope = run_python("## Inputs")
    assert scope["tokens"].shape == (3, 32) and scope["image"].shape == (224, 224, 3)
    assert scope["batch"].shape == (1, 224, 224, 3) and len(scope["failures"]) == 1


@pytest.mark.slow
def test_sharded_inference_example_runs():
    scope = run_python("## Sharded inference")
    assert scope["features"].shape == (5, 512)
    assert len(scope["mesh"].devices.flat) == scope["jax"].device_count()


def test_cli_help_runs_from_a_plain_copy_of_the_checkout(tmp_path):
    """`python -m pe_jax.cli --help` from a copy of the checkout that was never pip-installed: the package's
    subpackages (convert, configs) are where the installed package has them. The interpreter is the test's
    (its dependencies installed); -I drops PYTHONPATH and user site-packages, and the copy is put first on
    sys.path, so the editable install of another checkout cannot answer."""
    import shutil

    shutil.copytree(ROOT / "pe_jax", tmp_path / "pe_jax", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import os, runpy, sys; sys.path.insert(0, '.'); sys.argv = ['pe-jax', '--help']; import pe_jax; "
            "assert pe_jax.__file__.startswith(os.getcwd()), pe_jax.__file__; "
            "runpy.run_module('pe_jax.cli', run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage: pe-jax" in out.stdout and "finetune" in out.stdout
    for command in ("finetune", "demo", "convert"):
        sub = subprocess.run([sys.executable, "-I", "-c", code.replace("'--help'", f"'{command}', '--help'")],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert sub.returncode == 0 and f"usage: pe-jax {command}" in sub.stdout, sub.stderr[-2000:]
    assert Path(tmp_path / "pe_jax" / "configs").is_dir()
