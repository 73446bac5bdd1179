"""Prints the README's parity table: pe_jax vs the PyTorch peers, random non-trivial weights, fp32.

Run from the repo root: python benchmarks/parity_report.py (needs the test extras).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import conftest  # noqa: E402,F401  (matmul precision "highest", as the tests)
import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from peers import compare, make_open_clip, make_timm, numpy_state_dict, run_torch, timm_at_resolution  # noqa: E402
from test_parity_clip import _tokens  # noqa: E402

import pe_jax  # noqa: E402


def row(what, ours, theirs):
    max_abs, rel = compare(ours, theirs)
    print(f"| {what} | {max_abs:.1e} | {rel:.1e} |")


def main():
    print("| comparison (fp32) | max abs diff | relative L2 |")
    print("|---|---|---|")
    for preset, depth in [("PE-Core-T16-384", None), ("PE-Core-B16-224", None), ("PE-Core-L14-336", 2),
                          ("PE-Core-G14-448", 2), ("PE-Lang-G14-448", 2), ("PE-Spatial-B16-512", 2)]:
        kw = {} if depth is None else {"depth": depth}
        peer = make_timm(preset, **kw)
        sd = numpy_state_dict(peer)
        overrides = {} if depth is None else {"layers": depth}
        ours = pe_jax.VisionTransformer.from_config(preset, checkpoint=sd, **overrides)
        s = ours.config.image_size
        x = np.random.default_rng(0).standard_normal((2, s, s, 3)).astype(np.float32)
        method = "forward_features" if ours.config.pool_type == "none" else None
        row(f"{preset} vision{'' if depth is None else f' (depth {depth})'} vs timm @{s}",
            jax.jit(lambda m, x: m(x))(ours, x), run_torch(peer, x, method))
        if preset in ("PE-Core-B16-224", "PE-Core-G14-448"):
            for size in ([(288, 288), (160, 160), (224, 320)] if preset.startswith("PE-Core-B") else [(336, 336)]):
                patched = timm_at_resolution(preset, sd, size, **kw)
                x = np.random.default_rng(1).standard_normal((1, *size, 3)).astype(np.float32)
                row(f"{preset} vision @{size[0]}x{size[1]} vs patched timm", ours(x), run_torch(patched, x))
    for preset, reduced in [("PE-Core-T16-384", {}), ("PE-Core-B16-224", {}),
                            ("PE-Core-G14-448", {"vision_depth": 2, "text_layers": 2})]:
        peer = make_open_clip(preset, seed=1, **reduced)
        over = {"vision_layers": 2, "text_layers": 2} if reduced else {}
        ours = pe_jax.CLIP.from_config(preset, checkpoint=numpy_state_dict(peer), **over)
        s = ours.config.vision.image_size
        x = np.random.default_rng(1).standard_normal((2, s, s, 3)).astype(np.float32)
        tokens = _tokens(preset, ours.config.text.context_length)
        with torch.inference_mode():
            img = peer.encode_image(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
            txt = peer.encode_text(torch.from_numpy(tokens.astype(np.int64))).numpy()
        tag = f"{preset} CLIP{' (depth 2/2)' if reduced else ''} vs open_clip"
        row(f"{tag}: image", ours.encode_image(x), img)
        row(f"{tag}: text ({len(tokens)} sequences)", ours.encode_text(tokens), txt)


if __name__ == "__main__":
    main()
