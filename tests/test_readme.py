"""The README's usage example runs as written."""

import re
from pathlib import Path


def test_readme_usage_example_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    usage = text.split("## Usage", 1)[1]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md (Usage)", "exec"), scope)
    assert scope["image_features"].shape == (2, 512)
    assert scope["tokens_8"].shape == (1, 1024, 192) and len(scope["layers"]) == 3
