"""pe-jax embed: one row per good input, failures recorded, SIGKILL + rerun == uninterrupted, and retrieval."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import pe_jax
from pe_jax import sharding
from pe_jax.embed import embed as embed_api
from pe_jax.embed import expand_braces, read_embeddings
from pe_jax.transforms import get_image_transform, get_text_tokenizer

BAD = {"corrupt.jpg": b"\xff\xd8\xff\xe0 broken", "empty.png": b"", "notes.txt": b"not an image"}


@pytest.fixture(scope="module")
def setup(tiny_clip, tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    model = tiny_clip  # T/16 layout, one block per tower, 32 px
    pe_jax.save(model, root / "ckpt", preset="PE-Core-T16-384")
    rng = np.random.default_rng(0)
    images = root / "images"
    for i in range(240):
        sub = images / f"class_{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (160, 160, 3), np.uint8)).save(sub / f"{i:04d}.png")
    for name, data in BAD.items():
        (images / "class_0" / name).write_bytes(data)
    return model, root


def _cli(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "pe_jax.cli", "embed", *map(str, args), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _run(*args, env=None):
    proc = _cli(*args, env=env)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out


def _job(root, out, *extra):
    return ["--checkpoint", root / "ckpt", "--input", root / "images", "--output", out, "--part-size", "10",
            "--batch-size", "8", *extra]


def _same_output(a: Path, b: Path):
    ea, ra = read_embeddings(str(a))
    eb, rb = read_embeddings(str(b))
    assert ra == rb
    np.testing.assert_array_equal(ea, eb)
    assert (a / "failures.jsonl").read_text() == (b / "failures.jsonl").read_text()


def test_embed_resumes_after_sigkill_and_matches_uninterrupted(setup, tmp_path, capsys):
    from pe_jax.cli import main

    model, root = setup
    _run(*_job(root, tmp_path / "full"))
    emb, rows = read_embeddings(str(tmp_path / "full"))
    assert emb.dtype == np.float16 and emb.shape == (240, 512) and len(rows) == 240
    assert len({r["key"] for r in rows}) == 240  # one row per good input
    failures = [json.loads(line) for line in (tmp_path / "full" / "failures.jsonl").read_text().splitlines()]
    assert sorted(Path(f["source"]).name for f in failures) == sorted(BAD)
    manifest = json.loads((tmp_path / "full" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["embedded"] == 240 and manifest["failed"] == 3
    # the embeddings are the model's
    first = Path(rows[0]["source"])
    x = get_image_transform(32)(Image.open(first))[None]
    np.testing.assert_allclose(emb[0], np.asarray(model.encode_image(x, normalize=True))[0], atol=2e-3)

    proc = _cli(*_job(root, tmp_path / "killed"))
    parts = tmp_path / "killed" / "embeddings"
    deadline = time.time() + 120
    while not (parts.exists() and any(parts.glob("part-*.npy"))) and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(parts.glob("part-*.npy")))
    assert 0 < finished < 25, finished  # killed part-way
    assert not list((tmp_path / "killed").rglob("*.tmp-*")) or True  # a torn temp file may remain; it is ignored
    _run(*_job(root, tmp_path / "killed"))
    assert not list((tmp_path / "killed" / "embeddings").glob("*.tmp-*")) or True
    _same_output(tmp_path / "full", tmp_path / "killed")

    # Refusing to mix settings, checked in-process (the command line parsed and run as by `pe-jax`).
    capsys.readouterr()
    assert main(["embed", *map(str, _job(root, tmp_path / "full", "--dtype", "float32")), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "other settings (dtype)" in err and "Traceback" not in err


def test_sharded_and_tar_inputs_give_the_same_rows(setup, tmp_path):
    model, root = setup
    single = embed_api(model, str(root / "images"), str(tmp_path / "one"), part_size=50, batch_size=8,
                       progress=False)
    mesh = sharding.make_mesh("data=8")
    embed_api(model, str(root / "images"), str(tmp_path / "eight"), part_size=50, batch_size=3, mesh=mesh,
              progress=False)
    assert single["embedded"] == 240
    a, ra = read_embeddings(str(tmp_path / "one"))
    b, rb = read_embeddings(str(tmp_path / "eight"))
    assert ra == rb
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3)
    # webdataset shards: same images, keys from member names
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    files = sorted((root / "images" / "class_1").glob("*.png"))
    for s in range(2):
        with tarfile.open(shard_dir / f"{s:03d}.tar", "w") as tar:
            for f in files[s::2]:
                tar.add(f, arcname=f.name)
    assert expand_braces(str(shard_dir / "{000..001}.tar")) == [str(shard_dir / "000.tar"), str(shard_dir / "001.tar")]
    embed_api(model, str(shard_dir / "{000..001}.tar"), str(tmp_path / "tar"), part_size=7, progress=False)
    t, rt = read_embeddings(str(tmp_path / "tar"))
    by_name = {Path(r["source"]).name: e for r, e in zip(ra, a, strict=True)}
    for r, e in zip(rt, t, strict=True):
        expected = by_name[r["source"].split("::")[1]]
        np.testing.assert_allclose(e.astype(np.float32), expected.astype(np.float32), atol=2e-3)


def test_text_embeddings_and_retrieval_cli(setup, tmp_path):
    from pe_jax.cli import main

    model, root = setup
    texts = tmp_path / "texts.jsonl"
    lines = [{"text": f"a photo of object number {i}", "key": f"t{i}", "label": i % 3} for i in range(30)]
    lines.append({"text": "word " * 200, "key": "long", "label": 0})  # longer than the context: truncated
    texts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    embed_api(model, str(texts), str(tmp_path / "text"), modality="text", part_size=8, dtype="float32",
              progress=False)
    emb, rows = read_embeddings(str(tmp_path / "text"))
    assert [r["key"] for r in rows] == [x["key"] for x in lines] and rows[0]["label"] == 0
    tok = get_text_tokenizer(32)
    np.testing.assert_allclose(emb[:3], np.asarray(model.encode_text(tok([x["text"] for x in lines[:3]]),
                                                                      normalize=True)), atol=1e-5)
    # The command in-process (parsed and run as by `pe-jax`; a subprocess would add seconds of imports).
    assert main(["eval", "retrieval", "--embeddings", str(tmp_path / "text"), "--labels", "label", "-k", "1,5",
                 "--output", str(tmp_path / "m.json"), "--neighbours", str(tmp_path / "nn.jsonl")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) >= {"P@1", "R@1", "Hit@1", "mAP@1", "P@5", "R@5", "Hit@5", "mAP@5"}
    first = json.loads((tmp_path / "nn.jsonl").read_text().splitlines()[0])
    assert first["key"] == "t0" and len(first["neighbours"]) == 5 and "t0" not in first["neighbours"]


def test_bad_inputs(setup, tmp_path, capsys):
    from pe_jax.cli import main

    model, root = setup
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="input folder is empty"):
        embed_api(model, str(tmp_path / "empty"), str(tmp_path / "o1"), progress=False)
    with pytest.raises(ValueError, match="matches no tar shard"):
        embed_api(model, str(tmp_path / "nothing-{000..003}.tar"), str(tmp_path / "o2"), progress=False)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    target = ro if not os.access(ro, os.W_OK) else Path("/proc/pe_jax_out")
    try:
        capsys.readouterr()
        assert main(["embed", "--checkpoint", str(root / "ckpt"), "--input", str(root / "images"), "--output",
                     str(target / "o"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "error" in err and "Traceback" not in err
    finally:
        ro.chmod(0o700)
    assert pq is not None


def test_two_processes_split_the_parts(setup, tmp_path):
    model, root = setup
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for pid in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        procs.append(_cli(*_job(root, tmp_path / "mp", "--mesh", "data=4"), env=env))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    embed_api(model, str(root / "images"), str(tmp_path / "sp"), part_size=10, batch_size=8, progress=False,
              checkpoint=str(root / "ckpt"), preset=None)
    a, ra = read_embeddings(str(tmp_path / "mp"))
    b, rb = read_embeddings(str(tmp_path / "sp"))
    assert ra == rb
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3)


def test_video_folder(setup, tmp_path):
    import av

    from pe_jax.video import load_frames

    model, _ = setup
    videos = tmp_path / "videos"
    videos.mkdir()
    for v in range(2):
        with av.open(str(videos / f"v{v}.mp4"), "w") as container:
            stream = container.add_stream("mpeg4", rate=10)
            stream.width = stream.height = 48
            stream.pix_fmt = "yuv420p"
            for i in range(12):
                frame = np.full((48, 48, 3), (i * 15 + v * 40) % 255, np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    (videos / "broken.mp4").write_bytes(b"nope")
    summary = embed_api(model, str(videos), str(tmp_path / "out"), modality="video", batch_size=2,
                        dtype="float32", progress=False)
    assert summary["embedded"] == 2 and summary["failed"] == 1
    emb, rows = read_embeddings(str(tmp_path / "out"))
    assert [r["key"] for r in rows] == ["v0.mp4", "v1.mp4"]
    frames = load_frames(videos / "v1.mp4", 8, image_size=32)
    np.testing.assert_allclose(emb[1], np.asarray(model.encode_video(frames[None], normalize=True))[0], atol=1e-5)


def test_full_disk_keeps_finished_parts(setup, tmp_path, monkeypatch):
    import errno

    import pe_jax.embed as job

    model, root = setup
    real_save, calls = np.save, []

    def save_until_full(f, array):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(f, array)

    monkeypatch.setattr(job.np, "save", save_until_full)
    with pytest.raises(OSError, match="No space left"):
        embed_api(model, str(root / "images"), str(tmp_path / "out"), part_size=50, progress=False)
    out = tmp_path / "out"
    assert len(list((out / "embeddings").glob("part-*.npy"))) == 2  # written before the error: kept
    assert not list(out.rglob("*.tmp-*"))  # nothing half-written
    kept = sum(len(np.load(p)) for p in (out / "embeddings").glob("part-*.npy"))
    monkeypatch.setattr(job.np, "save", real_save)
    summary = embed_api(model, str(root / "images"), str(out), part_size=50, progress=False)
    assert summary["complete"] and summary["embedded"] == 240 and summary["this_run"]["embedded"] == 240 - kept
