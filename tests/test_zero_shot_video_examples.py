"""Zero-shot classification, video frames and the examples, on a generated tiny checkpoint."""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import av
import jax
import numpy as np
import pytest
from PIL import Image

import pe_jax
from pe_jax.evals import zero_shot
from pe_jax.preprocess import get_image_transform, get_text_tokenizer
from pe_jax.preprocess.video import frame_indices, load_frames

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def tiny(tiny_clip, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    pe_jax.save(tiny_clip, d / "ckpt", preset="PE-Core-T16-384")
    return tiny_clip, d / "ckpt"


def _image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name, color in [("red_thing", (200, 20, 20)), ("blue_thing", (20, 20, 200))]:
        (root / name).mkdir(parents=True)
        for i in range(3):
            pixels = np.clip(np.array(color) + rng.integers(-20, 20, (40, 50, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    (root / "red_thing" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "blue_thing" / "empty.png").write_bytes(b"")
    return root


def test_classifier_matches_numpy(tiny):
    model, _ = tiny
    tok = get_text_tokenizer(32)
    classes, templates = ["cat", "dog", "red car"], ["a photo of a {}.", "a drawing of a {}."]
    ours = zero_shot.build_classifier(model, tok, classes, templates, batch_size=4)
    emb = np.asarray(model.encode_text(tok([t.format(c) for c in classes for t in templates])))
    emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    mean = emb.reshape(3, 2, -1).mean(1)
    np.testing.assert_allclose(ours, mean / np.linalg.norm(mean, axis=-1, keepdims=True), atol=1e-6)
    feats = np.random.default_rng(0).standard_normal((4, ours.shape[1])).astype(np.float32)
    expected = 100 * (feats / np.linalg.norm(feats, axis=-1, keepdims=True)) @ ours.T
    np.testing.assert_allclose(zero_shot.classify(feats, ours), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="at least one class name"):
        zero_shot.build_classifier(model, tok, [], templates)
    assert len(zero_shot.imagenet_templates()) == 80 and len(zero_shot.imagenet_classnames()) == 1000


def test_accuracy_metrics_by_hand():
    logits = np.array([[3, 2, 1], [1, 3, 2], [3, 1, 2], [1, 2, 3]], np.float32)
    labels = np.array([0, 2, 1, 2])
    m = zero_shot.accuracy_metrics(logits, labels, 3)
    assert m["top1"] == 0.5  # rows 0 and 3
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert m["top5"] is None  # fewer than 5 classes, as the reference
    logits5 = np.eye(6, dtype=np.float32)[[1, 2, 3, 4, 5, 0]]
    # row i ranks column i+1 first, then the tied zeros by index: rows 4 and 5 miss their label in the top 5
    assert zero_shot.accuracy_metrics(logits5, np.arange(6), 6)["top5"] == pytest.approx(4 / 6)


@pytest.mark.slow
def test_eval_zeroshot_cli_end_to_end(tiny, tmp_path, capsys):
    from pe_jax.cli import main

    _, ckpt = tiny
    data = _image_folder(tmp_path / "data")
    out = subprocess.run([sys.executable, "-m", "pe_jax.cli", "eval", "zeroshot", "--checkpoint", str(ckpt),
                          "--data", str(data), "--templates", "simple", "--batch-size", "4", "--output",
                          str(tmp_path / "m.json"), "--quiet"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "top-1:" in out.stdout and "2 unreadable" in out.stdout
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["num_images"] == 6 and metrics["num_classes"] == 2 and metrics["num_failed"] == 2
    assert 0.0 <= metrics["top1"] <= 1.0 and metrics["top5"] is None
    assert sorted(Path(f["path"]).name for f in metrics["failures"]) == ["corrupt.jpg", "empty.png"]
    # The error path in-process (a subprocess costs seconds of imports; the success path above is one).
    capsys.readouterr()
    assert main(["eval", "zeroshot", "--checkpoint", str(ckpt), "--data", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "no image folder or CSV" in err and "Traceback" not in err


def _write_video(path: Path, n: int = 20, size: int = 48):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(n):
            frame = np.full((size, size, 3), i * 12, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_frames_are_sampled_as_the_reference(tmp_path):
    assert frame_indices(20, 8) == [int(i * 19 / 7) for i in range(8)]
    assert frame_indices(20, 1) == [10]
    _write_video(tmp_path / "v.mp4")
    frames = load_frames(tmp_path / "v.mp4", 8, image_size=32)
    assert frames.shape == (8, 32, 32, 3) and frames.dtype == np.float32
    brightness = frames.mean(axis=(1, 2, 3))
    expected = np.array([i * 12 for i in frame_indices(20, 8)]) / 255 * 2 - 1
    np.testing.assert_allclose(brightness, expected, atol=0.05)  # lossy codec: close, in order
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="cannot decode video"):
        load_frames(tmp_path / "bad.mp4")
    with pytest.raises(FileNotFoundError):
        load_frames(tmp_path / "missing.mp4")


def _run_example(name, *args):
    return runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="not_main")["main"](list(args))


@pytest.mark.slow
def test_examples_run_on_a_tiny_checkpoint(tiny, tmp_path, capsys):
    model, ckpt = tiny
    data = _image_folder(tmp_path / "photos")
    image = data / "red_thing" / "0.png"
    probs = _run_example("zero_shot", "--checkpoint", str(ckpt), "--image", str(image))
    assert probs.shape == (3,) and abs(float(probs.sum()) - 1) < 1e-5
    x = get_image_transform(32)(Image.open(image))[None]
    tokens = get_text_tokenizer(32)(["a diagram", "a dog", "a cat"])
    img, txt, scale = jax.jit(lambda m, x, t: m(x, t))(model, x, tokens)
    np.testing.assert_allclose(probs, np.asarray(jax.nn.softmax(scale * img @ txt.T)[0]), atol=1e-5)
    _write_video(tmp_path / "v.mp4")
    vprobs = _run_example("video", "--checkpoint", str(ckpt), "--video", str(tmp_path / "v.mp4"), "--frames", "4",
                          "--captions", "a dark clip", "a bright clip")
    assert vprobs.shape == (2,)
    top, scores = _run_example("retrieval", "--checkpoint", str(ckpt), "--images", str(data), "--query",
                               "a red thing", "--top", "3", "--batch-size", "4")
    assert len(top) == 3 and all(Path(p).suffix == ".png" for p in top) and np.all(np.diff(scores) <= 0)
    assert "skipped" in capsys.readouterr().out
