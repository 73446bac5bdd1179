"""The README's Python examples run as written."""

import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _run_block(section: str) -> dict:
    code = re.search(r"```python\n(.*?)```", README.split(section, 1)[1], re.S).group(1)
    scope: dict = {}
    exec(compile(code, f"README.md ({section})", "exec"), scope)
    return scope


@pytest.mark.slow
def test_readme_usage_example_runs():
    scope = _run_block("## Usage")
    assert scope["image_features"].shape == (2, 512)
    assert scope["tokens_8"].shape == (1, 1024, 192) and len(scope["layers"]) == 3
    assert scope["pooled"].shape == (1, 192)
    assert scope["model"].config == scope["pe_jax"].clip_config("PE-Core-T16-384")  # saved and loaded back


def test_readme_inputs_example_runs():
    scope = _run_block("## Inputs")
    assert scope["tokens"].shape == (3, 32) and scope["image"].shape == (224, 224, 3)
    assert scope["batch"].shape == (1, 224, 224, 3) and len(scope["failures"]) == 1
