"""The clip-retrieval drop-in: image and text in one pass, clip-retrieval's layout read by embedding-reader,
faiss indexes and `pe-jax search` from a text or image query."""

import io
import json
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import pe_jax
from pe_jax.embed import embed, read_embeddings
from pe_jax.embed import output as embed_output


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def data(tiny_clip, tmp_path_factory):
    """Three img2dataset-style shards (KEY.jpg + KEY.txt + KEY.json with url): 6, 6 and 5 samples, one image of
    the second shard undecodable; and the same images as files, for queries and a list input."""
    root = tmp_path_factory.mktemp("clip_retrieval")
    pe_jax.save(tiny_clip, root / "ckpt", preset="PE-Core-T16-384")
    rng = np.random.default_rng(0)
    (root / "shards").mkdir()
    (root / "files").mkdir()
    for s, size in enumerate((6, 6, 5)):
        with tarfile.open(root / "shards" / f"{s:03d}.tar", "w") as tar:
            for i in range(size):
                key = f"{s}{i:03d}"
                colour = rng.integers(0, 255, 3)  # distinct images: each query's own row is clearly first
                pixels = np.clip(colour + rng.integers(-40, 40, (48, 48, 3)), 0, 255).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, "JPEG")
                (root / "files" / f"{key}.jpg").write_bytes(buffer.getvalue())
                _add(tar, f"{key}.jpg", buffer.getvalue() if (s, i) != (1, 2) else b"not a jpeg")
                _add(tar, f"{key}.txt", f"a photo number {key}{' again' * i}".encode())
                _add(tar, f"{key}.json", json.dumps({"url": f"http://example.com/{key}.jpg", "width": 48}).encode())
    return tiny_clip, root, str(root / "shards" / "{000..002}.tar")


def _job(model, src, out, **kw):
    return embed(model, str(src), str(out), batch_size=4, progress=False, **kw)


@pytest.mark.slow
def test_one_pass_equals_an_image_job_and_a_text_job(data, tmp_path):
    """`--modality image,text`: the image rows equal an image job's and the text rows a text job's, exactly,
    row-aligned with one metadata table; a sample without a caption is a recorded failure, not a lost row."""
    model, root, shards = data
    both = _job(model, shards, tmp_path / "both", modality="image,text")
    assert both["embedded"] == 16 and both["failed"] == 1 and both["complete"]
    images, rows = read_embeddings(str(tmp_path / "both"))
    texts, text_rows = read_embeddings(str(tmp_path / "both"), "text")
    assert rows == text_rows and images.shape == texts.shape == (16, 512)
    assert sorted(os.listdir(tmp_path / "both" / "text_embeddings")) == [f"part-0000{i}.npy" for i in range(3)]

    _job(model, shards, tmp_path / "image")
    image_only, image_rows = read_embeddings(str(tmp_path / "image"))
    manifest = json.loads((tmp_path / "image" / "manifest.json").read_text())
    del manifest["settings"]["layout"]  # a job written before layouts existed is the pe-jax layout's
    (tmp_path / "image" / "manifest.json").write_text(json.dumps(manifest))
    assert _job(model, shards, tmp_path / "image")["this_run"]["embedded"] == 0
    with pytest.raises(ValueError, match=r"other settings \(layout\)"):
        _job(model, shards, tmp_path / "image", layout="clip-retrieval")
    assert image_rows == rows
    np.testing.assert_array_equal(image_only, images)
    with open(tmp_path / "captions.jsonl", "w") as f:  # the same captions, as a text job's input
        f.writelines(json.dumps({"key": r["key"], "text": r["caption"]}) + "\n" for r in rows)
    _job(model, tmp_path / "captions.jsonl", tmp_path / "text", modality="text")
    text_only, _ = read_embeddings(str(tmp_path / "text"))
    np.testing.assert_array_equal(text_only, texts)

    # a list with a caption column; a row without one fails with a reason, the others embed
    files = sorted((root / "files").glob("*.jpg"))[:5]
    with open(tmp_path / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps({"path": str(p), **({"caption": f"c {p.stem}"} if i != 3 else {})}) + "\n"
                     for i, p in enumerate(files))
    summary = _job(model, tmp_path / "pairs.jsonl", tmp_path / "pairs", modality="image,text")
    assert summary["embedded"] == 4 and summary["failed"] == 1
    failure = json.loads((tmp_path / "pairs" / "failures.jsonl").read_text())
    assert failure["key"] == str(files[3]) and "no caption" in failure["error"]
    _, pair_rows = read_embeddings(str(tmp_path / "pairs"), "text")
    assert [r["caption"] for r in pair_rows] == [f"c {p.stem}" for i, p in enumerate(files) if i != 3]


def test_clip_retrieval_layout_is_read_by_embedding_reader(data, tmp_path):
    """clip-retrieval's names and columns; embedding-reader's parquet_npy reader gives each row its own metadata;
    its npy reader reads text_emb/; a rerun does nothing."""
    from embedding_reader import EmbeddingReader

    model, root, shards = data
    out = tmp_path / "cr"
    _job(model, shards, out, modality="image,text", layout="clip-retrieval")
    listing = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs
                     if not d.endswith(("locks", "failures")))
    assert listing == ["failures.jsonl", *(f"img_emb/img_emb_{i}.npy" for i in range(3)), "job.lock", "manifest.json",
                       *(f"metadata/metadata_{i}.parquet" for i in range(3)),
                       *(f"text_emb/text_emb_{i}.npy" for i in range(3))]
    table = pq.read_table(out / "metadata" / "metadata_1.parquet")
    assert table.column_names == ["image_path", "caption", "label", "url", "width", "extra"]
    assert table.column("image_path").to_pylist() == ["1000", "1001", "1003", "1004", "1005"]  # 1002 failed
    assert table.slice(0, 1).to_pylist()[0] == {"image_path": "1000", "caption": "a photo number 1000", "label": None,
                                                 "url": "http://example.com/1000.jpg", "width": 48, "extra": None}
    images, rows = read_embeddings(str(out))
    reference, reference_rows = read_embeddings(str(_pe_jax_job(model, shards, tmp_path)))
    np.testing.assert_array_equal(images, reference)
    assert [r["image_path"] for r in rows] == [r["key"] for r in reference_rows]

    reader = EmbeddingReader(str(out / "img_emb"), file_format="parquet_npy", metadata_folder=str(out / "metadata"),
                             meta_columns=["image_path", "caption", "url"])
    assert reader.count == 16
    got, meta = [], []
    for batch, ids in reader(batch_size=5, show_progress=False):
        got.append(batch)
        meta += ids.to_dict("records")
    np.testing.assert_array_equal(np.concatenate(got), images)
    assert [m["image_path"] for m in meta] == [r["image_path"] for r in rows]
    assert [m["caption"] for m in meta] == [r["caption"] for r in rows]
    text_reader = EmbeddingReader(str(out / "text_emb"), file_format="npy")
    texts = np.concatenate([b for b, _ in text_reader(batch_size=16, show_progress=False)])
    np.testing.assert_array_equal(texts, read_embeddings(str(out), "text")[0])
    again = _job(model, shards, out, modality="image,text", layout="clip-retrieval")
    assert again["this_run"]["embedded"] == 0 and again["complete"]

    _job(model, shards, tmp_path / "texts", modality="text", layout="clip-retrieval")  # captions alone
    assert sorted(os.listdir(tmp_path / "texts" / "text_emb")) == [f"text_emb_{i}.npy" for i in range(3)]
    assert not (tmp_path / "texts" / "img_emb").exists()
    caption_rows = pq.read_table(tmp_path / "texts" / "metadata" / "metadata_0.parquet").to_pylist()
    assert [r["caption"] for r in caption_rows] == [f"a photo number 000{i}{' again' * i}" for i in range(6)]
    np.testing.assert_array_equal(read_embeddings(str(tmp_path / "texts"))[0][:6], texts[:6])


def _pe_jax_job(model, shards, tmp_path):
    _job(model, shards, tmp_path / "pe", modality="image,text")
    return tmp_path / "pe"


def test_two_tower_part_is_done_only_when_both_files_exist(data, tmp_path, monkeypatch):
    """A job that dies between a part's text and image files (the image file is the marker, written last)
    leaves that part unfinished; the rerun rewrites it and equals an uninterrupted run."""
    model, _, shards = data
    _job(model, shards, tmp_path / "full", modality="image,text", layout="clip-retrieval")
    real, writes = embed_output.write_file, []

    def dying(path, payload):
        writes.append(os.path.basename(path))
        if os.path.basename(path) == "img_emb_1.npy":
            raise OSError(28, "No space left on device")
        real(path, payload)

    monkeypatch.setattr(embed_output, "write_file", dying)
    with pytest.raises(OSError):
        _job(model, shards, tmp_path / "cut", modality="image,text", layout="clip-retrieval")
    monkeypatch.setattr(embed_output, "write_file", real)
    assert writes.index("text_emb_1.npy") < writes.index("img_emb_1.npy")  # the marker last
    assert (tmp_path / "cut" / "text_emb" / "text_emb_1.npy").exists()
    files = embed_output.part_files(str(tmp_path / "cut"), None, 3)
    assert [files.done(n) for n in range(3)] == [True, False, False]
    summary = _job(model, shards, tmp_path / "cut", modality="image,text", layout="clip-retrieval")
    assert summary["this_run"]["embedded"] == 10 and summary["complete"]
    for tower in ("image", "text"):
        a, ra = read_embeddings(str(tmp_path / "full"), tower)
        b, rb = read_embeddings(str(tmp_path / "cut"), tower)
        np.testing.assert_array_equal(a, b)
        assert ra == rb


@pytest.mark.slow
def test_index_and_search_return_the_query_first(data, tmp_path, capsys):
    """`pe-jax index` (faiss index_factory) over a clip-retrieval job, then `pe-jax search --image` returns the
    query's own row first and `--text` a caption's own row first, with keys, scores and captions; the job's
    settings are the query's; other weights and bad arguments are one-line errors."""
    from pe_jax.cli import main
    from pe_jax.embed.search import Searcher, search

    model, root, shards = data
    out = tmp_path / "cr"
    _job(model, shards, out, modality="image,text", layout="clip-retrieval", checkpoint=str(root / "ckpt"),
         preset="PE-Core-T16-384")
    assert main(["index", "--embeddings", str(out), "--output", str(tmp_path / "index")]) == 0
    assert "16 image rows of 512 dims (Flat)" in capsys.readouterr().out
    for key in ("0004", "2001"):
        assert main(["search", "--index", str(tmp_path / "index"), "--checkpoint", str(root / "ckpt"),
                     "--image", str(root / "files" / f"{key}.jpg"), "-k", "3"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 3 and lines[0].split("\t")[2] == key and lines[0].startswith("1\t")
        assert lines[0].split("\t")[3] == f"a photo number {key}{' again' * int(key[1:])}"
    assert main(["index", "--embeddings", str(out), "--output", str(tmp_path / "text_index"), "--tower", "text"]) == 0
    capsys.readouterr()
    searcher = Searcher(str(tmp_path / "text_index"), str(root / "ckpt"))  # the model loaded once, many queries
    hits = searcher(text="a photo number 1004 again again again again", k=2)
    assert hits[0]["key"] == "1004" and hits[0]["score"] > hits[1]["score"]
    assert hits[0]["metadata"]["url"] == "http://example.com/1004.jpg"
    assert [searcher(text=f"a photo number 200{i}{' again' * i}", k=1)[0]["key"] for i in range(5)] == \
           [f"200{i}" for i in range(5)]
    assert search(str(tmp_path / "index"), str(root / "ckpt"), image=str(root / "files" / "1005.jpg"),
                  k=1)[0]["key"] == "1005"

    bad = [(["--image", str(tmp_path / "none.jpg")], "--image"), (["--text", "x", "-k", "0"], "-k must be >= 1"),
           (["--text", "x"], "other weights than the embedding job")]
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["settings"]["weights"] = "sha256:0123"  # as if the job had embedded with other weights
    (out / "manifest.json").write_text(json.dumps(manifest))
    for args, message in bad:
        assert main(["search", "--index", str(tmp_path / "index"), "--checkpoint", str(root / "ckpt"), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["index", "--embeddings", str(tmp_path), "--output", str(tmp_path / "i2")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert main(["index", "--embeddings", str(out), "--output", str(tmp_path / "i3"), "--factory", "Nope"]) == 2
    assert "--factory 'Nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_readme_clip_retrieval_block_runs(data, tmp_path):
    """The README's "Coming from clip-retrieval" commands run as written (each a fresh pe-jax process)."""
    import subprocess
    import sys
    from pathlib import Path

    _, root, _ = data
    from doc_blocks import block as doc_block

    block = doc_block("## Coming from clip-retrieval", "bash")  # docs/embedding.md
    for name in ("ckpt", "shards", "files"):
        (tmp_path / name).symlink_to(root / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # the venv's pe-jax
    proc = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hits = [line.split("\t") for line in proc.stdout.splitlines() if line.count("\t") == 3]
    assert len(hits) == 6 and hits[0][0] == "1" and hits[0][2] == "0004"  # the image query's own row first
    assert "img_emb_0.npy" in proc.stdout and "metadata_2.parquet" in proc.stdout
    assert "16 embedded, 1 failed" in proc.stdout


def test_part_file_names_and_order(tmp_path):
    """clip-retrieval pads part numbers to the digits of the part count (writer.py); parts are read in part
    order, not name order, and files that name no part are not read."""
    from pe_jax.embed.layout import PartFiles

    files = PartFiles(str(tmp_path), "clip-retrieval", "image,text", 100)
    assert files.embeddings(7) == f"{tmp_path}/img_emb/img_emb_007.npy"
    assert files.metadata(7) == f"{tmp_path}/metadata/metadata_007.parquet"
    texts, images = PartFiles(str(tmp_path), "clip-retrieval", "text", 10), PartFiles(str(tmp_path), "clip-retrieval")
    assert texts.embeddings(0) == f"{tmp_path}/text_emb/text_emb_00.npy"
    assert images.embeddings(0) == f"{tmp_path}/img_emb/img_emb_0.npy"
    assert PartFiles(str(tmp_path), modality="image,text").embeddings(2, "text") == \
           f"{tmp_path}/text_embeddings/part-00002.npy"
    (tmp_path / "embeddings").mkdir()
    for name in ("part-100000.npy", "part-99999.npy", "part-00002.npy", "part-old.npy"):
        (tmp_path / "embeddings" / name).touch()
    assert [os.path.basename(p) for p, _ in PartFiles(str(tmp_path)).on_disk()] == \
           ["part-00002.npy", "part-99999.npy", "part-100000.npy"]
    assert PartFiles(str(tmp_path)).on_disk()[2][1] == f"{tmp_path}/metadata/part-100000.parquet"
    with pytest.raises(ValueError, match="unknown layout 'clip'"):
        PartFiles(str(tmp_path), "clip")
    with pytest.raises(ValueError, match="has no text embeddings"):
        PartFiles(str(tmp_path)).embeddings(0, "text")


@pytest.mark.slow
def test_one_pass_job_killed_and_rerun_equals_an_uninterrupted_run(data, tmp_path):
    """SIGKILL part-way through an image,text job in clip-retrieval's layout, then the same command again: both
    towers' rows and the metadata equal an uninterrupted run's, and no temporary is left."""
    import signal
    import subprocess
    import sys
    import time

    model, root, _ = data
    (tmp_path / "shards").mkdir()
    files = sorted((root / "files").glob("*.jpg"))
    for s in range(8):
        with tarfile.open(tmp_path / "shards" / f"{s:02d}.tar", "w") as tar:
            for i in range(30):
                f = files[(s * 30 + i) % len(files)]
                _add(tar, f"{s:02d}{i:03d}.jpg", f.read_bytes())
                _add(tar, f"{s:02d}{i:03d}.txt", f"caption {s} {i} {f.stem}".encode())
    shards = str(tmp_path / "shards" / "{00..07}.tar")

    def command(out):
        return [sys.executable, "-m", "pe_jax.cli", "embed", "--checkpoint", str(root / "ckpt"), "--input", shards,
                "--output", str(out), "--modality", "image,text", "--layout", "clip-retrieval", "--batch-size", "4",
                "--quiet"]

    subprocess.run(command(tmp_path / "full"), check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(command(tmp_path / "killed"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = tmp_path / "killed" / "img_emb" / "img_emb_0.npy"
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    finished = len(list((tmp_path / "killed" / "img_emb").glob("*.npy")))
    assert 0 < finished < 8, finished
    subprocess.run(command(tmp_path / "killed"), check=True, capture_output=True, timeout=600)
    assert not list((tmp_path / "killed").rglob("*pe_jax-tmp*"))
    for tower in ("image", "text"):
        a, ra = read_embeddings(str(tmp_path / "full"), tower)
        b, rb = read_embeddings(str(tmp_path / "killed"), tower)
        assert len(ra) == 240 and ra == rb
        np.testing.assert_array_equal(a, b)


AUTOFAISS_PYTHON = os.environ.get("PE_JAX_AUTOFAISS_PYTHON")  # the python of an environment holding autofaiss


@pytest.mark.autofaiss
@pytest.mark.skipif(not AUTOFAISS_PYTHON, reason="autofaiss needs numpy<2, so it lives in an environment of its "
                    "own: set PE_JAX_AUTOFAISS_PYTHON to its python (.ci/run builds one and runs -m autofaiss)")
def test_autofaiss_indexes_a_clip_retrieval_job_and_search_reads_it(data, tmp_path, capsys):
    """docs/embedding.md's two-environment recipe: autofaiss, in its own environment, indexes a
    `--layout clip-retrieval` job unchanged, and `pe-jax search` over its index returns each query's own row."""
    import subprocess
    from pathlib import Path

    from pe_jax.cli import main

    model, root, shards = data
    out = tmp_path / "cr"
    _job(model, shards, out, modality="image,text", layout="clip-retrieval", checkpoint=str(root / "ckpt"),
         preset="PE-Core-T16-384")
    autofaiss = Path(AUTOFAISS_PYTHON).parent / "autofaiss"
    done = subprocess.run([str(autofaiss), "build_index", "--embeddings", str(out / "img_emb"),
                           "--index_path", str(tmp_path / "af" / "knn.index"), "--index_infos_path",
                           str(tmp_path / "af" / "infos.json"), "--metric_type", "ip"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and (tmp_path / "af" / "knn.index").exists(), done.stderr[-2000:]
    for key in ("0004", "2001", "1005"):
        assert main(["search", "--index", str(tmp_path / "af" / "knn.index"), "--embeddings", str(out),
                     "--checkpoint", str(root / "ckpt"), "--image", str(root / "files" / f"{key}.jpg"), "-k", "3"]) == 0
        first = capsys.readouterr().out.splitlines()[0].split("\t")
        assert first[2] == key, first
