"""pe-jax embed: one row per good input, failures recorded, SIGKILL + rerun == uninterrupted, and retrieval."""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image

import pe_jax
from pe_jax import sharding
from pe_jax.data.sources import expand_braces
from pe_jax.embed import embed as embed_api
from pe_jax.embed import read_embeddings
from pe_jax.preprocess import get_image_transform, get_text_tokenizer

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


def _shards(root: Path, out: Path) -> str:
    """The 240 images as six 40-sample webdataset shards (two undecodable members in the third) and a seventh
    shard whose every image is corrupt: the brace pattern that names them."""
    import io

    out.mkdir()
    files = sorted((root / "images").rglob("*.png"))
    files = [f for f in files if f.name not in BAD]
    for s in range(7):
        with tarfile.open(out / f"{s:03d}.tar", "w") as tar:
            members = [(f"{f.parent.name}-{f.stem}.png", f.read_bytes()) for f in files[40 * s: 40 * s + 40]]
            if s == 2:
                members[5:5] = [("corrupt.jpg", BAD["corrupt.jpg"]), ("empty.png", b"")]
            if s == 6:
                members = [(f"bad{i}.jpg", BAD["corrupt.jpg"]) for i in range(3)]
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(out / "{000..006}.tar")


@pytest.mark.slow
def test_embed_resumes_after_sigkill_and_matches_uninterrupted(setup, tmp_path, capsys):
    """On tar shards (the folder case: test_one_job_per_folder_join_sigint_and_sigkill): one part per shard, a
    SIGKILL part-way then a rerun gives the uninterrupted run's rows; a shard of failures still has its part."""
    from pe_jax.cli import main

    model, root = setup
    shards = _shards(root, tmp_path / "shards")

    def job(out, *extra):
        return ["--checkpoint", root / "ckpt", "--input", shards, "--output", out, "--batch-size", "8", *extra]

    _run(*job(tmp_path / "full"))
    emb, rows = read_embeddings(str(tmp_path / "full"))
    assert emb.dtype == np.float16 and emb.shape == (240, 512) and len(rows) == 240
    assert len({r["key"] for r in rows}) == 240  # one row per good input
    failures = [json.loads(line) for line in (tmp_path / "full" / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["source"].split("::")[1] for f in failures) == \
           ["bad0.jpg", "bad1.jpg", "bad2.jpg", "corrupt.jpg", "empty.png"]
    manifest = json.loads((tmp_path / "full" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["embedded"] == 240 and manifest["failed"] == 5
    assert manifest["parts_finished"] == 7 and manifest["items"] == 245
    # all failed: no 0-row files, the part is marked done and listed in the manifest
    assert not (tmp_path / "full" / "metadata" / "part-00006.parquet").exists() and manifest["empty_parts"] == [6]
    assert (tmp_path / "full" / "failures" / "part-00006.empty").exists()
    # the embeddings are the model's, in member order
    first = root / "images" / rows[0]["key"].replace("-", "/", 1)
    x = get_image_transform(32)(Image.open(first.with_suffix(".png")))[None]
    np.testing.assert_allclose(emb[0], np.asarray(model.encode_image(x, normalize=True))[0], atol=2e-3)

    proc = _cli(*job(tmp_path / "killed"))
    parts = tmp_path / "killed" / "embeddings"
    deadline = time.time() + 300  # a loaded machine can take minutes to start jax and compile
    while not (parts.exists() and any(parts.glob("part-*.npy"))) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    finished = len(list(parts.glob("part-*.npy")))
    assert 0 < finished < 7, (finished, err[-2000:])  # killed part-way
    _run(*job(tmp_path / "killed"))
    assert not list((tmp_path / "killed").rglob("*.pe_jax-tmp-*"))  # the killed run's torn temporaries are swept
    _same_output(tmp_path / "full", tmp_path / "killed")

    # Refusing to mix settings, checked in-process (the command line parsed and run as by `pe-jax`).
    capsys.readouterr()
    assert main(["embed", *map(str, job(tmp_path / "full", "--dtype", "float32")), "--quiet"]) == 2
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
    expanded = list(expand_braces(str(shard_dir / "{000..001}.tar")))
    assert expanded == [str(shard_dir / "000.tar"), str(shard_dir / "001.tar")]
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
    with pytest.raises(FileNotFoundError, match="matches no tar shard"):
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


@pytest.mark.slow
@pytest.mark.multihost
def test_two_processes_split_the_shards(setup, tmp_path):
    """Two jax.distributed processes x 4 fake devices take the tar shards round-robin: the rows equal one process's,
    and the manifest, written after both finished, is complete."""
    model, root = setup
    import socket

    shards = _shards(root, tmp_path / "shards")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for pid in range(2):
        env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=4"),
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        procs.append(_cli("--checkpoint", root / "ckpt", "--input", shards, "--output", tmp_path / "mp",
                          "--batch-size", "8", "--mesh", "data=4", env=env))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    embed_api(model, shards, str(tmp_path / "sp"), batch_size=8, progress=False, checkpoint=str(root / "ckpt"),
              preset=None)
    a, ra = read_embeddings(str(tmp_path / "mp"))
    b, rb = read_embeddings(str(tmp_path / "sp"))
    assert ra == rb and len(ra) == 240
    manifest = json.loads((tmp_path / "mp" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["embedded"] == 240 and manifest["parts_finished"] == 7
    assert manifest["failed"] == 5 and manifest["items"] == 245
    assert (tmp_path / "mp" / "failures.jsonl").read_text() == (tmp_path / "sp" / "failures.jsonl").read_text()
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3)


@pytest.mark.slow
def test_video_folder(setup, tmp_path):
    import av

    from pe_jax.layers import l2_normalize
    from pe_jax.preprocess.video import load_frames

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
    assert [r["key"] for r in rows] == ["v0", "v1"]
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, rtol=1e-5)  # the manifest says normalized
    frames = load_frames(videos / "v1.mp4", 8, image_size=32)
    expected = l2_normalize(model.encode_video(frames[None], normalize=True))
    np.testing.assert_allclose(emb[1], np.asarray(expected)[0], atol=1e-5)


def test_full_disk_keeps_finished_parts(setup, tmp_path, monkeypatch):
    import errno

    model, root = setup
    real_save, calls = np.save, []

    def save_until_full(f, array):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(f, array)

    monkeypatch.setattr(np, "save", save_until_full)
    with pytest.raises(OSError, match="No space left"):
        embed_api(model, str(root / "images"), str(tmp_path / "out"), part_size=50, progress=False)
    out = tmp_path / "out"
    assert len(list((out / "embeddings").glob("part-*.npy"))) == 2  # written before the error: kept
    assert not list(out.rglob("*.pe_jax-tmp-*"))  # nothing half-written
    kept = sum(len(np.load(p)) for p in (out / "embeddings").glob("part-*.npy"))
    monkeypatch.setattr(np, "save", real_save)
    summary = embed_api(model, str(root / "images"), str(out), part_size=50, progress=False)
    assert summary["complete"] and summary["embedded"] == 240 and summary["this_run"]["embedded"] == 240 - kept


@pytest.mark.slow
def test_layer_features_and_poolings(setup, tmp_path):
    """--layer-idx -1 and intermediate layers with every pooling equal pe_jax.features on the same images, and
    the job's program takes the weights as arguments (not as constants of the program)."""
    from pe_jax.embed.pipeline import _encoder
    from pe_jax.features import features

    model, root = setup
    files = sorted((root / "images" / "class_2").glob("*.png"))[:6]
    x = np.stack([get_image_transform(32)(Image.open(f)) for f in files])
    for layer, pooling in [(-1, None), (-1, "mean"), (0, "cls"), (0, "mean")]:
        out = tmp_path / f"l{layer}{pooling}"
        embed_api(model, str(root / "images" / "class_2"), str(out), layer_idx=layer, pooling=pooling,
                  dtype="float32", batch_size=4, progress=False)
        emb, rows = read_embeddings(str(out))
        assert emb.shape == (60, 512 if pooling is None else 192) and rows[0]["key"] == files[0].stem
        expected = features(model, x, layer_idx=layer, pooling=pooling, normalize=True)
        np.testing.assert_allclose(emb[:6], np.asarray(expected), atol=1e-5)
        manifest = json.loads((out / "manifest.json").read_text())["settings"]
        assert manifest["pooling"] == (pooling or "attn") and manifest["layer_idx"] == layer
    import jax

    hlo = jax.jit(_encoder("image", True, 0, "mean")).lower(model, x).as_text()
    assert len(hlo) < 200_000, len(hlo)  # 2 layers' weights as constants would be megabytes
    two_layers = nnx.eval_shape(lambda: pe_jax.VisionTransformer(
        pe_jax.vision_config("PE-Core-T16-384", layers=2), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="last layer only"):
        embed_api(two_layers, str(root / "images"), str(tmp_path / "bad"), layer_idx=0, pooling="attn",
                  progress=False)


def test_token_towers_embed_pooled_rows(tmp_path):
    """A PE-Spatial tower (no head) writes [N, width] rows pooled by the mean patch token, named in the manifest."""
    tower = pe_jax.VisionTransformer.from_config("PE-Spatial-T16-512", layers=1, image_size=32, width=64, heads=2,
                                                 mlp_dim=128)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        Image.fromarray(np.full((40, 40, 3), i * 40, np.uint8)).save(images / f"{i}.png")
    (images / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden files are not inputs
    summary = embed_api(tower, str(images), str(tmp_path / "out"), dtype="float32", progress=False)
    emb, rows = read_embeddings(str(tmp_path / "out"))
    assert emb.shape == (5, 64) and summary["failed"] == 0 and [r["key"] for r in rows] == list("01234")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["settings"]["pooling"] == "mean"
    with pytest.raises(ValueError, match="pooling head"):
        embed_api(tower, str(images), str(tmp_path / "bad"), pooling="attn", progress=False)


def test_one_metadata_schema_across_parts(setup, tmp_path):
    """Carried columns keep one schema in every part, a column of mixed types included (a part whose items all
    failed writes no metadata file), so the metadata folder reads as one table. The first part fixes the
    schema (parts are listed lazily): a later column it lacks, or a value of another type, lands in `extra`,
    never lost."""
    import pyarrow.dataset as ds

    model, root = setup
    good = sorted((root / "images" / "class_3").glob("*.png"))[:4]
    rows = [{"path": str(p), "label": i, "note": ["x", 1, None, {"a": 1}][i]} for i, p in enumerate(good)]
    rows[2]["label"], rows[3]["late"] = "two", [5]
    rows += [{"path": str(root / "images" / "class_0" / "corrupt.jpg"), "label": 9, "note": "bad"},
             {"path": str(root / "missing.png"), "label": 9, "note": None}]
    listing = tmp_path / "list.jsonl"
    listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    embed_api(model, str(listing), str(tmp_path / "out"), part_size=2, progress=False)
    table = ds.dataset(str(tmp_path / "out" / "metadata"), format="parquet").to_table()
    assert table.num_rows == 4 and table.column_names == ["key", "source", "label", "note", "extra"]
    assert table.column("note").to_pylist() == ["x", "1", None, '{"a": 1}']
    assert table.column("label").to_pylist() == [0, 1, None, 3]
    assert table.column("extra").to_pylist() == [None, None, '{"label": "two"}', '{"late": [5]}']
    assert table.column("key").to_pylist() == [str(p) for p in good]  # list keys: the paths as written
    assert not (tmp_path / "out" / "metadata" / "part-00002.parquet").exists()  # all failed: no 0-row file


def test_cli_messages_keys_and_text_rows(setup, tmp_path, capsys):
    from pe_jax.cli import main

    model, root = setup
    capsys.readouterr()
    # A missing input is reported before anything else, even before a missing checkpoint.
    assert main(["embed", "--checkpoint", str(tmp_path / "nope"), "--input", str(tmp_path / "none"),
                 "--output", str(tmp_path / "o")]) == 2
    assert "input not found" in capsys.readouterr().err
    assert main(["embed", "--checkpoint", str(tmp_path / "nope"), "--input", str(root / "images"),
                 "--output", str(tmp_path / "o")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    # Folder keys and tar keys name the same file alike; the preset comes from the checkpoint's metadata and
    # naming it again on a rerun is the same job.
    folder = tmp_path / "folder"
    folder.mkdir()
    files = sorted((root / "images" / "class_1").glob("*.png"))[:3]
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for f in files:
            (folder / f.name).write_bytes(f.read_bytes())
            tar.add(f, arcname=f.name)
    job = ["embed", "--checkpoint", str(root / "ckpt"), "--output", str(tmp_path / "f"), "--quiet"]
    assert main([*job, "--input", str(folder)]) == 0
    printed = capsys.readouterr().out
    assert "0 failed," in printed and "failures.jsonl" not in printed
    assert json.loads((tmp_path / "f" / "manifest.json").read_text())["settings"]["preset"] == "PE-Core-T16-384"
    # --model must agree with a pe_jax checkpoint (this one is a 1-layer T/16): the fields that differ are named
    assert main([*job, "--input", str(folder), "--model", "PE-Core-T16-384"]) == 2
    assert "vision.layers is 1 in the checkpoint, 12 in the preset" in capsys.readouterr().err
    assert main([*job, "--input", str(folder), "--model", "PE-Core-X"]) == 2
    assert "unknown preset 'PE-Core-X'; available: PE-Core-G14-448" in capsys.readouterr().err
    embed_api(model, str(tmp_path / "s.tar"), str(tmp_path / "t"), progress=False)
    assert [r["key"] for r in read_embeddings(str(tmp_path / "t"))[1]] == [f.stem for f in files]
    assert [r["key"] for r in read_embeddings(str(tmp_path / "f"))[1]] == [f.stem for f in files]
    # Text rows keep their text; a row whose text is not a string is a recorded failure.
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "a red dog", "key": "a"}\n{"text": 5, "key": "b"}\n')
    summary = embed_api(model, str(texts), str(tmp_path / "x"), modality="text", progress=False)
    assert summary["embedded"] == 1 and summary["failed"] == 1
    assert read_embeddings(str(tmp_path / "x"))[1] == [{"key": "a", "source": f"{texts}:1", "text": "a red dog",
                                                          "extra": None}]


# ------------------------------------------------------------------------------------------------ job faults


def _small_folder(root, path, n=6):
    path.mkdir()
    for f in sorted((root / "images" / "class_2").glob("*.png"))[:n]:
        (path / f.name).write_bytes(f.read_bytes())
    return path


def test_listing_output_manifest_and_argument_faults(setup, tmp_path, capsys):
    """A rerun over a changed folder says what changed; an output inside the input, a corrupt or foreign manifest,
    --batch-size 0 and a busy folder are one clear line each."""
    from pe_jax.cli import main
    from pe_jax.storage.locks import FolderBusy, folder_lock

    model, root = setup
    folder = _small_folder(root, tmp_path / "in")
    embed_api(model, str(folder), str(tmp_path / "out"), part_size=4, progress=False)
    (folder / "extra.png").write_bytes((folder / sorted(os.listdir(folder))[0]).read_bytes())
    with pytest.raises(ValueError, match="the input listing changed: 6 items before, 7 now; the folder's files "
                                         "changed since the job started"):
        embed_api(model, str(folder), str(tmp_path / "out"), part_size=4, progress=False)
    with pytest.raises(ValueError, match="is inside the input folder"):
        embed_api(model, str(folder), str(folder / "emb"), progress=False)
    assert not (folder / "emb").exists()
    for text, message in [("{not json", "manifest.json: not a manifest"), ("[]", "not a pe-jax embed manifest")]:
        (tmp_path / "bad").mkdir(exist_ok=True)
        (tmp_path / "bad" / "manifest.json").write_text(text)
        with pytest.raises(ValueError, match=message):
            embed_api(model, str(folder), str(tmp_path / "bad"), progress=False)
    (tmp_path / "busy").mkdir()
    with folder_lock(str(tmp_path / "busy"), "embedding job"), pytest.raises(FolderBusy, match=f"pid {os.getpid()}"):
        embed_api(model, str(folder), str(tmp_path / "busy"), progress=False)
    capsys.readouterr()
    for flag in ("--batch-size", "--part-size"):
        assert main(["embed", "--checkpoint", str(root / "ckpt"), "--input", str(folder), "--output",
                     str(tmp_path / "o"), flag, "0", "--quiet"]) == 2
        assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err


def test_full_disk_names_the_file(setup, tmp_path, monkeypatch):
    import errno

    model, root = setup
    real_save, calls = np.save, []

    def save_until_full(f, array):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(f, array)

    monkeypatch.setattr(np, "save", save_until_full)
    folder = _small_folder(root, tmp_path / "in")
    with pytest.raises(OSError) as e:
        embed_api(model, str(folder), str(tmp_path / "out"), part_size=3, progress=False)
    assert str(e.value) == f"cannot write {tmp_path / 'out' / 'embeddings' / 'part-00001.npy'}: No space left on device"
    assert e.value.errno == errno.ENOSPC and not list((tmp_path / "out").rglob("*.pe_jax-tmp-*"))


def test_fifo_undecodable_names_and_huge_patterns(setup, tmp_path):
    """A FIFO among the inputs, or as a tar shard, is a recorded failure (the job does not hang); a file name
    that is not UTF-8 keeps its row, its bytes escaped; a brace pattern of 100 M shards fails at once at its
    first missing shard."""
    import threading

    from pe_jax.data.sources import tar_shards
    from pe_jax.preprocess.video import load_frames

    model, root = setup
    folder = _small_folder(root, tmp_path / "in", n=2)
    os.mkfifo(folder / "pipe.jpg")
    (folder / os.fsdecode(b"caf\xe9.png")).write_bytes(next(folder.glob("*.png")).read_bytes())
    result = {}
    job = threading.Thread(target=lambda: result.update(embed_api(model, str(folder), str(tmp_path / "out"),
                                                                  progress=False)), daemon=True)
    job.start()
    job.join(120)
    assert not job.is_alive(), "the job hangs on a FIFO"
    assert result["embedded"] == 3 and result["failed"] == 1
    failure = json.loads((tmp_path / "out" / "failures.jsonl").read_text())
    assert failure["key"] == "pipe" and "FIFO" in failure["error"]
    keys = [r["key"] for r in read_embeddings(str(tmp_path / "out"))[1]]
    assert "caf\\xe9" in keys and len(keys) == 3
    with pytest.raises(ValueError, match="FIFO"):
        load_frames(folder / "pipe.jpg", 2, image_size=32)
    os.mkfifo(tmp_path / "pipe.tar")  # a FIFO as a tar shard (issue 33): one failure row, never opened
    job = threading.Thread(target=lambda: result.update(embed_api(model, str(tmp_path / "pipe.tar"),
                                                                  str(tmp_path / "out2"), progress=False)), daemon=True)
    job.start()
    job.join(120)
    assert not job.is_alive(), "the job hangs on a FIFO shard"
    assert (result["embedded"], result["failed"]) == (0, 1)
    assert "pipe.tar: is a FIFO (named pipe), not a regular file" in (tmp_path / "out2" / "failures.jsonl").read_text()
    with tarfile.open(tmp_path / "0.tar", "w"):
        pass
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"shard not found: .*/1\.tar \(the first missing one\)"):
        tar_shards(str(tmp_path / "{0..99999999}.tar"))
    with pytest.raises(FileNotFoundError, match="matches no tar shard"):
        tar_shards(str(tmp_path / "none-{0..99999999}.tar"))
    assert time.perf_counter() - start < 1


def _wait_for_part(proc, out: Path):
    deadline = time.time() + 180
    while not list((out / "embeddings").glob("part-*.npy")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()


@pytest.mark.slow
def test_one_job_per_folder_join_sigint_and_sigkill(setup, tmp_path):
    """A second job into a busy folder is refused naming the holder; two --join processes share it without a part
    done twice; SIGINT exits 130 in one line and SIGKILL releases the lock; every rerun gives the same rows."""
    import re

    model, root = setup
    reference = tmp_path / "reference"
    embed_api(model, str(root / "images"), str(reference), part_size=10, batch_size=8, progress=False)

    first = _cli(*_job(root, tmp_path / "solo"))
    _wait_for_part(first, tmp_path / "solo")
    first.send_signal(signal.SIGSTOP)  # paused mid-job, still holding the lock
    second = _cli(*_job(root, tmp_path / "solo"))
    _, err = second.communicate(timeout=300)
    first.send_signal(signal.SIGCONT)
    assert second.returncode == 2 and f"in use by another embedding job (pid {first.pid} on " in err, err
    assert "--join" in err and "Traceback" not in err
    assert first.communicate(timeout=300)[0] and first.returncode == 0
    _same_output(reference, tmp_path / "solo")

    joined = [_cli(*_job(root, tmp_path / "joined", "--join")) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in joined]
    assert all(p.returncode == 0 for p in joined), outs
    this_run = [int(re.search(r"this run: (\d+) items", out).group(1)) for out, _ in outs]
    assert sum(this_run) == 240, this_run  # every item embedded once, by one of the two
    _same_output(reference, tmp_path / "joined")
    assert json.loads((tmp_path / "joined" / "manifest.json").read_text())["complete"]

    for sig, code in ((signal.SIGINT, 130), (signal.SIGKILL, -9)):
        out = tmp_path / f"stopped-{sig.name}"
        proc = _cli(*_job(root, out))
        _wait_for_part(proc, out)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == code, err
        if sig == signal.SIGINT:
            assert err.strip() == "pe-jax embed: interrupted; no partial output was left; rerun the same command " \
                                  "to resume" and len(list((out / "embeddings").glob("*.npy"))) < 24
        _run(*_job(root, out))  # takes the lock the stopped run held
        _same_output(reference, out)


def test_tar_shards_sidecars_and_shard_size_independence(setup, tmp_path):
    """img2dataset's layout (KEY.jpg + KEY.txt + KEY.json): caption and the json's top-level fields become
    columns (nested as JSON text); the same samples as three shards or one give the same rows and embeddings,
    one part per shard."""
    model, root = setup
    files = sorted((root / "images" / "class_2").glob("*.png"))[:18]

    def add(tar, name, data: bytes):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, __import__("io").BytesIO(data))

    def write(shard, chunk):
        with tarfile.open(shard, "w") as tar:
            for f in chunk:
                add(tar, f"{f.stem}.png", f.read_bytes())
                add(tar, f"{f.stem}.txt", f"a photo {f.stem}".encode())
                add(tar, f"{f.stem}.json", json.dumps({"url": f"http://x/{f.stem}", "width": 160,
                                                       "exif": {"a": 1}}).encode())

    (tmp_path / "three").mkdir()
    for s in range(3):
        write(tmp_path / "three" / f"{s:05d}.tar", files[6 * s: 6 * s + 6])
    write(tmp_path / "one.tar", files)
    embed_api(model, str(tmp_path / "three" / "{00000..00002}.tar"), str(tmp_path / "o3"), batch_size=4,
              progress=False)
    embed_api(model, str(tmp_path / "one.tar"), str(tmp_path / "o1"), batch_size=4, progress=False)
    e3, r3 = read_embeddings(str(tmp_path / "o3"))
    e1, r1 = read_embeddings(str(tmp_path / "o1"))
    assert len(list((tmp_path / "o3" / "embeddings").glob("part-*.npy"))) == 3
    np.testing.assert_array_equal(e3, e1)
    assert [{k: v for k, v in r.items() if k != "source"} for r in r3] == \
           [{k: v for k, v in r.items() if k != "source"} for r in r1]
    assert r1[0] == {"key": files[0].stem, "source": f"{tmp_path / 'one.tar'}::{files[0].stem}.png",
                     "caption": f"a photo {files[0].stem}", "label": None, "exif": '{"a": 1}',
                     "url": f"http://x/{files[0].stem}", "width": 160, "extra": None}  # label: a later shard's .cls
    manifest = json.loads((tmp_path / "o3" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["items"] == 18 and manifest["settings"]["inputs"] is None


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sweep_removes_only_own_dead_temporaries(tmp_path):
    """The sweeper removes pe-jax's temporaries of dead processes on this host in the job's folders, and nothing
    else: not a user's `*.tmp-<pid>`, not a live process's, not a --join peer's on another host, not one
    elsewhere."""
    import socket

    from pe_jax.embed.output import sweep_temporaries

    out, host, dead = tmp_path / "out", socket.gethostname(), _dead_pid()
    (out / "embeddings").mkdir(parents=True)
    (out / "notes").mkdir()
    swept = [out / f"manifest.json.pe_jax-tmp-{dead}-0a1b2c3d@{host}",
             out / "embeddings" / f"part-00000.npy.pe_jax-tmp-{dead}-0a1b2c3d@{host}"]
    kept = [out / f"draft.tmp-{dead}", out / "embeddings" / f"mine.tmp-{dead}",
            out / "embeddings" / f"part-00001.npy.pe_jax-tmp-{dead}-0a1b2c3d@another-host",
            out / "embeddings" / f"part-00002.npy.pe_jax-tmp-{os.getpid()}-0a1b2c3d@{host}",
            out / "notes" / f"x.pe_jax-tmp-{dead}-0a1b2c3d@{host}"]
    for p in swept + kept:
        p.write_text("x")
    sweep_temporaries(str(out))
    assert [p.exists() for p in swept] == [False] * len(swept)
    assert [p.exists() for p in kept] == [True] * len(kept)


def test_locks_and_temporaries_never_write_through_links(tmp_path):
    """A symbolic link planted as job.lock, as the manifest's lock or at a temporary's name is never written
    through: one line naming the file, the link's target untouched; a link at the final name is replaced, not
    followed."""
    from pe_jax.storage.atomic import StorageError, create_new, write_text
    from pe_jax.storage.locks import folder_lock, locked

    target = tmp_path / "precious.txt"
    target.write_text("the user's file")
    out = tmp_path / "out"
    (out / "locks").mkdir(parents=True)
    os.symlink(target, out / "job.lock")
    with pytest.raises(StorageError, match=f"^cannot use the lock file {out / 'job.lock'}: it is a symbolic link"):
        with folder_lock(str(out), "embedding job"):
            pass
    os.symlink(target, out / "locks" / "manifest.lock")
    with pytest.raises(StorageError, match="symbolic link"), locked(str(out / "locks" / "manifest.lock")):
        pass
    os.symlink(target, out / "planted")
    with pytest.raises(FileExistsError):
        create_new(str(out / "planted"))
    os.symlink(target, out / "manifest.json")
    write_text(str(out / "manifest.json"), "{}")
    assert target.read_text() == "the user's file"
    assert not (out / "manifest.json").is_symlink() and (out / "manifest.json").read_text() == "{}"
    os.mkfifo(out / "fifo.lock")
    with pytest.raises(StorageError, match="not a regular file"), locked(str(out / "fifo.lock")):
        pass


def test_outputs_are_trusted_only_when_they_are_the_jobs(setup, tmp_path):
    """A part file with no manifest (a foreign one, or a job whose manifest was lost, rerun with other settings)
    is refused and left as is; a finished part missing its metadata keeps the job from `complete: true` and is
    named; read_embeddings orders parts by number (part-100000 after part-99999) and checks their rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    model, root = setup
    folder = _small_folder(root, tmp_path / "in")
    out = tmp_path / "out"
    assert embed_api(model, str(folder), str(out), part_size=3, progress=False)["complete"]
    (out / "manifest.json").unlink()
    before = (out / "embeddings" / "part-00000.npy").read_bytes()
    with pytest.raises(ValueError, match=r"holds part files \(.*part-00000.npy\) but no manifest.json"):
        embed_api(model, str(folder), str(out), part_size=3, dtype="float32", progress=False)
    assert (out / "embeddings" / "part-00000.npy").read_bytes() == before

    again = tmp_path / "again"
    embed_api(model, str(folder), str(again), part_size=3, progress=False)
    (again / "metadata" / "part-00001.parquet").unlink()
    summary = embed_api(model, str(folder), str(again), part_size=3, progress=False)
    assert not summary["complete"] and summary["parts_finished"] == 1
    assert "part-00001.parquet is missing" in summary["damaged_parts"][1]
    assert not json.loads((again / "manifest.json").read_text())["complete"]

    numbered = tmp_path / "numbered"
    for n, value in ((99999, 1.0), (100000, 2.0)):
        for sub in ("embeddings", "metadata"):
            (numbered / sub).mkdir(parents=True, exist_ok=True)
        np.save(numbered / "embeddings" / f"part-{n}.npy", np.full((1, 4), value, np.float32))
        pq.write_table(pa.table({"key": [str(n)]}), numbered / "metadata" / f"part-{n}.parquet")
    emb, rows = read_embeddings(str(numbered))
    assert emb[:, 0].tolist() == [1.0, 2.0] and [r["key"] for r in rows] == ["99999", "100000"]
    pq.write_table(pa.table({"key": ["a", "b"]}), numbered / "metadata" / "part-100000.parquet")
    with pytest.raises(ValueError, match=r"part-100000.npy has 1 rows but .*part-100000.parquet has 2"):
        read_embeddings(str(numbered))


def test_read_embeddings_checks_the_parts_against_the_manifest(setup, tmp_path):
    """A finished job's folder missing a part's files was read without its rows (only each part's own rows
    were checked); another part file beside the job's was read as one of its parts; a part replaced by one of
    another size went unseen. Each is one error naming the file."""
    import shutil

    model, root = setup
    folder = _small_folder(root, tmp_path / "in")
    out = tmp_path / "out"
    assert embed_api(model, str(folder), str(out), part_size=2, progress=False)["parts"] == 3
    whole, rows = read_embeddings(str(out))
    assert len(rows) == 6
    emb, meta = out / "embeddings", out / "metadata"
    for sub, ext in (("embeddings", "npy"), ("metadata", "parquet")):
        (out / sub / f"part-00001.{ext}").rename(tmp_path / f"kept.{ext}")
    with pytest.raises(ValueError, match=r"embeddings/part-00001.npy is missing \(1 of the 3 parts"):
        read_embeddings(str(out))
    (tmp_path / "kept.npy").rename(emb / "part-00001.npy")
    (tmp_path / "kept.parquet").rename(meta / "part-00001.parquet")
    shutil.copy(emb / "part-00000.npy", emb / "part-00003.npy")
    shutil.copy(meta / "part-00000.parquet", meta / "part-00003.parquet")
    with pytest.raises(ValueError, match=r"embeddings/part-00003.npy is no part of the job: .* counts 3 parts"):
        read_embeddings(str(out))
    (emb / "part-00003.npy").unlink()
    (meta / "part-00003.parquet").unlink()
    np.testing.assert_array_equal(read_embeddings(str(out))[0], whole)
    small = tmp_path / "small"  # a part of one row in place of a part of two, files and checksums agreeing
    embed_api(model, str(_small_folder(root, tmp_path / "one", n=1)), str(small), part_size=2, progress=False)
    for name in ("embeddings/part-00002.npy", "metadata/part-00002.parquet", "failures/part-00002.jsonl"):
        shutil.copy(small / name.replace("00002", "00000"), out / name)
    shutil.copy(small / "failures" / "part-00000.checksums.json", out / "failures" / "part-00002.checksums.json")
    with pytest.raises(ValueError, match=r"part-00002.checksums.json names another job .*move the part's files away"):
        read_embeddings(str(out))  # its record names its own job and part (test_a_part_another_job_wrote_...)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["part_records"], manifest["job"]  # a job from before records named it: the counts still tell
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"its parts hold 5 rows, its manifest.json says 6 were embedded"):
        read_embeddings(str(out))


def _plant(src: Path, dst: Path, n: int, record: bool, m: int | None = None) -> dict[str, bytes]:
    """Copies part `n`'s files (its record too with `record`) from the job folder `src` into `dst` as part `m`;
    returns {name in dst: bytes}."""
    names = ["embeddings/part-{:05d}.npy", "metadata/part-{:05d}.parquet", "failures/part-{:05d}.jsonl",
             *(["failures/part-{:05d}.checksums.json"] if record else [])]
    m = n if m is None else m
    for name in names:
        (dst / name.format(m)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / name.format(n), dst / name.format(m))
    return {name.format(m): (src / name.format(n)).read_bytes() for name in names}


def test_a_part_another_job_wrote_is_not_taken_as_finished(setup, tmp_path):
    """A job killed before its first part (its manifest.json, no parts), then another job's part-00000 copied in
    (files without their record): the rerun skipped it and ended `complete: true` with the foreign rows. A new
    job's manifest says its parts carry records ("part_records"), each naming the job (the sha256 of its
    settings), the part and its rows: a part without one, with another job's, or another part's, and an empty
    part's marker that is not the job's, are listed under damaged_parts (not complete) and refused by
    read_embeddings in one line naming the record; nothing is deleted, and once moved away the part is redone."""
    model, root = setup
    folder, other = _small_folder(root, tmp_path / "in"), tmp_path / "other"
    embed_api(model, str(_small_folder(root, tmp_path / "in2", n=4)), str(other), part_size=2, progress=False)
    out = tmp_path / "out"
    assert embed_api(model, str(folder), str(out), part_size=2, progress=False)["complete"]
    whole = read_embeddings(str(out))[0]
    started = json.loads((out / "manifest.json").read_text())
    for sub in ("embeddings", "metadata", "failures"):  # killed before its first part, as the job's start left it
        shutil.rmtree(out / sub)
    (out / "manifest.json").write_text(json.dumps({**{k: v for k, v in started.items()
                                                      if k in ("settings", "part_records", "job")}, "complete": False}))

    def rerun(planted: dict[str, bytes], why: str):
        summary = embed_api(model, str(folder), str(out), part_size=2, progress=False)
        assert not summary["complete"] and summary["parts_finished"] == 2 and why in summary["damaged_parts"][0]
        with pytest.raises(ValueError, match=r"part-00000\.checksums\.json .*move the part's files away"):
            read_embeddings(str(out))
        assert all((out / name).read_bytes() == data for name, data in planted.items())  # left as it was
        for name in planted:
            (out / name).unlink()

    rerun(_plant(other, out, 0, record=False), "part-00000.checksums.json is missing: the part is not known")
    assert started["part_records"] == 1 and started["job"] != json.loads((other / "manifest.json").read_text())["job"]
    rerun(_plant(other, out, 0, record=True), "part-00000.checksums.json names another job")
    assert embed_api(model, str(folder), str(out), part_size=2, progress=False)["complete"]  # redone
    np.testing.assert_array_equal(read_embeddings(str(out))[0], whole)
    kept = tmp_path / "kept"
    shutil.copytree(out, kept)
    rerun(_plant(kept, out, 1, record=True, m=0), "part-00000.checksums.json is part 1's record")
    (out / "failures" / "part-00000.empty").write_text(json.dumps({"rows": 0, "failures": 0}))  # an older job's
    (out / "failures" / "part-00000.jsonl").write_text("")
    summary = embed_api(model, str(folder), str(out), part_size=2, progress=False)
    assert not summary["complete"] and "part-00000.empty is unreadable" in summary["damaged_parts"][0], summary


def test_a_job_from_before_part_records_resumes_trusting_its_parts(setup, tmp_path):
    """A manifest without "part_records" (a job started before records named it) keeps trusting parts that have
    no record: the rerun redoes only the missing part, completes with an uninterrupted run's rows, and the
    manifest stays as it was (its earlier parts have no record to check)."""
    model, root = setup
    folder, out = _small_folder(root, tmp_path / "in"), tmp_path / "out"
    embed_api(model, str(folder), str(out), part_size=2, progress=False)
    whole = read_embeddings(str(out))[0]
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["part_records"], manifest["job"]
    (out / "manifest.json").write_text(json.dumps({"settings": manifest["settings"], "complete": False}))
    for record in (out / "failures").glob("*.checksums.json"):
        record.unlink()
    for name in ("embeddings/part-00002.npy", "metadata/part-00002.parquet"):
        (out / name).unlink()
    summary = embed_api(model, str(folder), str(out), part_size=2, progress=False)
    assert summary["complete"] and summary["this_run"]["embedded"] == 2 and "damaged_parts" not in summary
    np.testing.assert_array_equal(read_embeddings(str(out))[0], whole)
    assert "part_records" not in json.loads((out / "manifest.json").read_text())


def test_nan_rows_are_failures_and_batches_shrink_to_the_input(setup, tmp_path, monkeypatch):
    """A model whose output is NaN embeds nothing: each row is a failure saying so (they were counted as
    embedded); --batch-size 100000 on 6 images pads batches to the part, not to 100,000 rows."""
    from flax import nnx

    import pe_jax.batching as batching

    model, root = setup
    folder = _small_folder(root, tmp_path / "in")
    real, sizes = batching.apply_batches, []
    monkeypatch.setattr(batching, "apply_batches", lambda *a, **k: sizes.append(k["batch_size"]) or real(*a, **k))
    summary = embed_api(model, str(folder), str(tmp_path / "big"), part_size=4, batch_size=100000, progress=False)
    assert summary["complete"] and summary["embedded"] == 6 and sizes and max(sizes) == 4, sizes

    broken = nnx.clone(model)
    path, param = next((p, v) for p, v in nnx.to_flat_state(nnx.state(broken, nnx.Param)) if "visual" in map(str, p))
    param.set_value(param.get_value() * np.nan)
    summary = embed_api(broken, str(folder), str(tmp_path / "nan"), part_size=4, batch_size=4, progress=False)
    assert summary["complete"] and summary["embedded"] == 0 and summary["failed"] == 6, (path, summary)
    failures = [json.loads(line) for line in (tmp_path / "nan" / "failures.jsonl").read_text().splitlines()]
    assert {f["error"] for f in failures} == {"the model's embedding holds NaN or Inf"}


def test_a_fifo_or_endless_manifest_is_refused_not_read(setup, tmp_path):
    """manifest.json as a FIFO hung the job; as /dev/zero it was read until MemoryError. Now one line each."""
    model, root = setup
    folder = _small_folder(root, tmp_path / "in")
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "manifest.json")
    with pytest.raises(ValueError, match=r"manifest.json: not a manifest \(.*is a FIFO \(named pipe\), not a regular"):
        embed_api(model, str(folder), str(tmp_path / "fifo"), part_size=3, progress=False)
    (tmp_path / "zero").mkdir()
    os.symlink("/dev/zero", tmp_path / "zero" / "manifest.json")
    with pytest.raises(ValueError, match=r"manifest.json: not a manifest \(.*is a character device"):
        embed_api(model, str(folder), str(tmp_path / "zero"), part_size=3, progress=False)


class _Killed(BaseException):
    """A kill in the middle of a job (raised from a write, so nothing after it runs)."""


def test_kill_damage_rerun_never_completes_wrong_and_never_deletes_a_users_file(setup, tmp_path, monkeypatch):
    """Random sequences of (start a job, killed at a random write, delete / truncate / garble one of its files,
    rerun): the rerun is refused in one line, or ends incomplete, or ends `complete: true` with exactly the clean
    run's rows; the user's own files in the output folder are never deleted. A garbled byte may land anywhere
    (a part's rows included: its checksums catch it)."""
    import random

    import pe_jax.embed.output as output

    model, root = setup
    folder = _small_folder(root, tmp_path / "in", n=5)
    job = dict(part_size=2, batch_size=2, progress=False)
    ref_emb, ref_rows = (lambda: (embed_api(model, str(folder), str(tmp_path / "clean"), **job),
                                  read_embeddings(str(tmp_path / "clean")))[1])()
    rng, real_write, dead = random.Random(33), output.write_file, _dead_pid()
    for trial in range(8):
        out = tmp_path / f"t{trial}"
        out.mkdir()
        mine = {out / "mine.txt": "mine", out / f"notes.tmp-{dead}": "x"}
        for p, text in mine.items():
            p.write_text(text)
        calls, kill_at = [], rng.randrange(1, 16)

        def write_then_die(path, data, calls=calls, kill_at=kill_at):
            calls.append(path)
            if len(calls) == kill_at:
                raise _Killed(path)
            return real_write(path, data)

        monkeypatch.setattr(output, "write_file", write_then_die)
        with contextlib.suppress(_Killed):
            embed_api(model, str(folder), str(out), **job)
        monkeypatch.setattr(output, "write_file", real_write)
        files = sorted(p for p in out.rglob("*") if p.is_file() and p not in mine and "locks" not in p.parts)
        if files:
            victim, action = rng.choice(files), rng.choice(["delete", "truncate", "garble"])
            data = victim.read_bytes()
            if action == "delete":
                victim.unlink()
            elif action == "truncate":
                victim.write_bytes(data[: rng.randrange(0, max(1, len(data)))])
            elif victim.suffix in (".json", ".jsonl") or len(data) < 128:
                victim.write_bytes(bytes(rng.randrange(256) for _ in range(max(1, len(data)))))
            else:  # a binary part file: one byte anywhere, header, rows or footer
                at = rng.randrange(0, len(data))
                victim.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:])
        try:
            summary = embed_api(model, str(folder), str(out), **job)
        except (ValueError, OSError) as e:
            assert "\n" not in str(e), e  # refused in one line
            summary = None
        if summary and summary["complete"]:
            emb, rows = read_embeddings(str(out))
            assert rows == ref_rows, (trial, kill_at, files and (victim, action))
            np.testing.assert_array_equal(emb, ref_emb)
        assert all(p.read_text() == text for p, text in mine.items()), trial


def test_a_part_garbled_since_it_was_written_is_caught_by_its_checksums(setup, tmp_path):
    """A byte flipped inside a finished part's rows (same size, header intact) was trusted on resume and read
    back: each part records its files' xxh3 checksums before they are renamed into place; a rerun's summary
    names the part under damaged_parts (not complete), and read_embeddings refuses it in one line."""
    model, root = setup
    folder = _small_folder(root, tmp_path / "in", n=5)
    out = tmp_path / "out"
    assert embed_api(model, str(folder), str(out), part_size=2, progress=False)["complete"]
    assert sorted(p.name for p in (out / "failures").glob("*.checksums.json")) == [
        f"part-0000{n}.checksums.json" for n in range(3)]
    for victim in (out / "embeddings" / "part-00001.npy", out / "metadata" / "part-00002.parquet"):
        before = victim.read_bytes()
        data = bytearray(before)
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
        summary = embed_api(model, str(folder), str(out), part_size=2, progress=False)
        assert not summary["complete"] and "changed since it was written" in str(summary["damaged_parts"]), summary
        with pytest.raises(ValueError, match=rf"{victim.name} changed since it was written.*the part is damaged"):
            read_embeddings(str(out))
        victim.write_bytes(before)  # restored: trusted again
    assert embed_api(model, str(folder), str(out), part_size=2, progress=False)["complete"]


def test_the_weights_binding_covers_what_the_metadata_says_the_model_computes(setup, tmp_path):
    """Editing pe_jax.json (use_rope2d: false) keeps the content hash but changes the embeddings: a rerun into
    the same output is refused, naming model_config (pe_jax.config.config_digest: dtypes too)."""
    import shutil

    from pe_jax.embed import run

    model, root = setup
    folder = _small_folder(root, tmp_path / "in", n=3)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(root / "ckpt", ckpt)
    run(str(folder), str(tmp_path / "out"), checkpoint=str(ckpt), part_size=3, progress=False)
    meta = json.loads((ckpt / "pe_jax.json").read_text())
    meta["config"]["vision"]["use_rope2d"] = False
    (ckpt / "pe_jax.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"holds a job with other settings \(model_config\)"):
        run(str(folder), str(tmp_path / "out"), checkpoint=str(ckpt), part_size=3, progress=False)


def test_a_folder_of_class_folders_records_its_labels(setup, tmp_path):
    """An image folder with one sub-folder per class records each image's class folder in the `label` column
    (so `pe-jax eval retrieval --labels label` works after a folder embed); an image at the top has none, and
    the column is there even when the first part holds no labelled image."""
    from pe_jax.cli import main

    model, _ = setup
    rng = np.random.default_rng(1)
    folder = tmp_path / "classes"
    for rel in ["00-top.png", *(f"{c}/{i}.png" for c in ("cat", "dog_big") for i in range(3))]:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(folder / rel)
    embed_api(model, str(folder), str(tmp_path / "emb"), part_size=2, batch_size=2, progress=False)
    _, rows = read_embeddings(str(tmp_path / "emb"))
    assert [(r["key"], r["label"]) for r in rows] == [("00-top", None)] + [
        (f"{c}/{i}", c) for c in ("cat", "dog_big") for i in range(3)]
    assert main(["eval", "retrieval", "--embeddings", str(tmp_path / "emb"), "--labels", "label", "-k", "1"]) == 0


TILED_JOB = dict(tiles=4, tile_features=True, dtype="float32", batch_size=3, part_size=3)  # two parts of 4 images


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    """A one-block PE-Lang tower at 28 px, four images of other shapes, and their --tiles 4 --tile-features job
    (`TILED_JOB`, run from the command line): (tower, its checkpoint, the images, the job's command, its output)."""
    from pe_jax.cli import main

    root = tmp_path_factory.mktemp("tiled")
    tower = pe_jax.VisionTransformer.from_config("PE-Lang-L14-448", layers=1, image_size=28, width=64, heads=2,
                                                 mlp_dim=128)
    pe_jax.save(tower, root / "ckpt", preset="PE-Lang-L14-448")
    images, rng = root / "images", np.random.default_rng(3)
    images.mkdir()
    for i, hw in enumerate([(40, 90), (90, 40), (20, 20), (60, 61)]):
        Image.fromarray(rng.integers(0, 255, (*hw, 3), np.uint8)).save(images / f"{i}.png")
    job = ["embed", "--checkpoint", str(root / "ckpt"), "--input", str(images), "--dtype", "float32",
           "--batch-size", "3", "--part-size", "3", "--quiet"]
    assert main([*job, "--output", str(root / "out"), "--tiles", "4", "--tile-features"]) == 0
    return tower, root / "ckpt", images, job, root / "out"


def test_tiles_rows_are_the_thumbnails_and_tiles_are_pinned(tiled, tmp_path, capsys):
    """--tiles N: a row is the feature of the PE-Lang thumbnail (pe_jax.preprocess.tiling), --tile-features writes
    each tile's feature padded to N with the grid in the metadata; the manifest pins both, a rerun with another
    --tiles is refused in one line, and --tiles is refused where it does not apply."""
    from pe_jax.cli import main
    from pe_jax.embed import EmbedOptions, read_tile_features
    from pe_jax.errors import UsageError
    from pe_jax.features import features
    from pe_jax.preprocess.tiling import tile_image

    tower, _, images, job, out = tiled
    emb, rows = read_embeddings(str(out))
    tile_rows = read_tile_features(str(out))  # the parts' tiles/part-N.npy in order
    assert emb.shape == (4, 64) and tile_rows.shape == (4, 4, 64)
    np.testing.assert_array_equal(tile_rows[:3], np.load(out / "tiles" / "part-00000.npy"))
    for i, row in enumerate(rows):
        tiling = tile_image(Image.open(images / f"{row['key']}.png"), 28, 4)
        expected = np.asarray(features(tower, tiling.tiles, normalize=True))  # the thumbnail first, then the tiles
        np.testing.assert_allclose(emb[i], expected[0], atol=1e-5)
        used = len(expected) - 1
        assert (row["tile_cols"], row["tile_rows"]) == tiling.grid and used == tiling.grid[0] * tiling.grid[1]
        np.testing.assert_allclose(tile_rows[i, :used], expected[1:], atol=1e-5)
        assert not tile_rows[i, used:].any()
    settings = json.loads((out / "manifest.json").read_text())["settings"]
    assert settings["tiles"] == 4 and settings["tile_features"] and "tiling" in settings["preprocessing"]
    capsys.readouterr()
    assert main([*job, "--output", str(out), "--tiles", "2", "--tile-features"]) == 2
    err = capsys.readouterr().err.strip()
    assert "other settings (preprocessing, tiles)" in err and len(err.splitlines()) == 1, err
    # the thumbnails alone (no tiles encoded) give the same rows
    thumbs = embed_api(tower, str(images), str(tmp_path / "thumbs"), tiles=4, dtype="float32", progress=False)
    assert thumbs["embedded"] == 4 and not (tmp_path / "thumbs" / "tiles").exists()
    np.testing.assert_allclose(read_embeddings(str(tmp_path / "thumbs"))[0], emb, atol=1e-6)
    for bad, message in [(dict(tiles=-1), "--tiles must be >= 0"), (dict(tiles=2, modality="text"), "--modality image"),
                         (dict(tile_features=True), "needs --tiles")]:
        with pytest.raises(UsageError, match=message):
            EmbedOptions(**bad)


def test_a_garbled_tiles_file_is_caught_by_its_parts_checksums(tiled):
    """--tile-features' tiles/part-N.npy is in its part's checksums (recorded before it is written): a byte
    flipped inside its rows makes a rerun's summary name the part under damaged_parts, and read_tile_features
    refuse it in one line; a tiles file deleted is named missing; restored, the job is complete again."""
    from pe_jax.embed import read_tile_features, run

    _, ckpt, images, _, out = tiled
    record = json.loads((out / "failures" / "part-00001.checksums.json").read_text())
    assert "tiles" in record["files"] and record["rows"] == 1
    rerun = lambda: run(str(images), str(out), checkpoint=str(ckpt), progress=False, **TILED_JOB)  # noqa: E731
    victim = out / "tiles" / "part-00001.npy"
    before = victim.read_bytes()
    garbled = bytearray(before)
    garbled[-5] ^= 0x01  # inside the rows: the header and the size are intact
    victim.write_bytes(bytes(garbled))
    summary = rerun()
    assert not summary["complete"] and summary["embedded"] == 3, summary
    assert "part-00001.npy changed since it was written" in summary["damaged_parts"][1], summary
    with pytest.raises(ValueError, match=r"part-00001.npy changed since it was written.*the part is damaged"):
        read_tile_features(str(out))
    victim.unlink()
    assert "tiles/part-00001.npy is missing" in rerun()["damaged_parts"][1]
    victim.write_bytes(before)
    assert rerun()["complete"] and len(read_tile_features(str(out))) == 4


def test_batches_shrink_to_a_tar_shard_and_workers_are_bounded(setup, tmp_path, monkeypatch, capsys):
    """--batch-size 100000 on a tar shard of 6 images padded every batch to 100,000 rows: batches shrink to the
    shard; --workers 1000000000 was a traceback: one line."""
    import io

    import pe_jax.batching as batching
    from pe_jax.cli import main
    from pe_jax.embed.options import EmbedOptions

    model, root = setup
    folder = _small_folder(root, tmp_path / "in")
    with tarfile.open(tmp_path / "000.tar", "w") as tar:
        for f in sorted(folder.iterdir()):
            info = tarfile.TarInfo(f.name)
            info.size = f.stat().st_size
            tar.addfile(info, io.BytesIO(f.read_bytes()))
    real, sizes = batching.apply_batches, []
    monkeypatch.setattr(batching, "apply_batches", lambda *a, **k: sizes.append(k["batch_size"]) or real(*a, **k))
    summary = embed_api(model, str(tmp_path / "000.tar"), str(tmp_path / "out"), batch_size=100000, progress=False)
    assert summary["complete"] and summary["embedded"] == 6 and sizes and max(sizes) == 6, sizes

    with pytest.raises(ValueError, match=r"^--workers must be <= 1024 \(decoding threads\), got 1000000000$"):
        EmbedOptions(workers=10**9)
    argv = ["embed", "--checkpoint", str(root / "ckpt"), "--input", str(folder), "--output", str(tmp_path / "w"),
            "--workers", "1000000000", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--workers must be <= 1024" in err, err


def test_the_listing_pin_sees_an_input_replaced_or_rewritten(setup, tmp_path):
    """A shard replaced with one of the same size and modification time, or an image replaced in a folder, was
    accepted on resume: the pin now holds each local file's size, modification time and inode (a rerun is
    refused saying so). What it cannot see (documented in docs/embedding.md): a file rewritten in place with
    its size and mtime restored."""
    from pe_jax.embed.parts import list_parts

    def pin(src):
        listing = list_parts(str(src), "image", 2)
        return listing.sha256, listing.versions

    def replace(path: Path, data: bytes, *, rename: bool):
        st = path.stat()
        if rename:
            (path.parent / ".new").write_bytes(data)
            os.replace(path.parent / ".new", path)
        else:
            path.write_bytes(data)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the modification time restored

    model, root = setup
    images = _small_folder(root, tmp_path / "images", n=3)
    embed_api(model, str(images), str(tmp_path / "out"), part_size=2, progress=False)
    victim = sorted(images.iterdir())[0]
    data = bytearray(victim.read_bytes())
    data[-20] ^= 1
    replace(victim, bytes(data), rename=True)
    with pytest.raises(ValueError, match="its files were replaced or rewritten since the job started"):
        embed_api(model, str(images), str(tmp_path / "out"), part_size=2, progress=False)

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes(b"x" * 100)
    before = pin(folder)
    replace(folder / "a.png", b"y" * 100, rename=True)  # same size, same mtime, a new inode
    assert pin(folder) != before
    before = pin(folder)
    (folder / "b.png").write_bytes(b"z" * 100)  # rewritten in place: a new mtime
    assert pin(folder) != before
    before = pin(folder)
    replace(folder / "b.png", b"w" * 100, rename=False)  # in place, size and mtime restored: not seen
    assert pin(folder) == before

    shard = tmp_path / "000.tar"
    with tarfile.open(shard, "w") as tar:
        info = tarfile.TarInfo("k.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    before = pin(shard)
    data = bytearray(shard.read_bytes())
    data[512] ^= 1  # the member's first byte
    replace(shard, bytes(data), rename=True)
    assert pin(shard) != before
