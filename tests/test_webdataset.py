"""Webdataset inputs without silent loss (issue 30): webdataset's own grouping, sample for sample (shards written
by the `webdataset` package), sidecars never dropped, json fields beside the job's columns, img2dataset's
layouts (a folder of shards, the `files` layout), text from shards and lists, and no 0-row part files."""

import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pe_jax.data import samples, sources
from pe_jax.embed import embed, read_embeddings
from pe_jax.embed import parts as embed_parts


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _write(path, samples_):
    """A shard written by webdataset's own TarWriter (fields in its sorted order, no encoding)."""
    with wds.TarWriter(str(path), encoder=False) as sink:
        for s in samples_:
            sink.write({k: v.encode() if isinstance(v, str) else v for k, v in s.items()} | {"__key__": s["__key__"]})
    return str(path)


def _raw(path, members):
    """A shard of (name, bytes) members exactly as given (duplicates, names webdataset's writer would not make)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _webdataset(shard):
    return list(wds.WebDataset(shard, shardshuffle=False, empty_check=False))


SAMPLES = [
    {"__key__": "a", "jpg": _jpeg(0), "txt": "a cat", "json": '{"url": "http://x/a", "width": 40}'},
    {"__key__": "dir/photo", "v2.jpg": _jpeg(1), "txt": "dotted name"},  # dir/photo.v2.jpg
    {"__key__": "b", "PNG": _jpeg(2), "cls": "3"},  # an upper-case extension
    {"__key__": "c.d/e", "jpeg": _jpeg(3)},  # a dot in the directory part
    {"__key__": "t", "txt": "a caption without an image"},
    {"__key__": "two", "jpg": _jpeg(4), "seg.png": _jpeg(5), "npy": b"\x93NUMPY"},  # a second image, a field
    {"__key__": "a", "cls": "7"},  # key a again, not adjacent: webdataset yields a second sample
]


def test_grouping_equals_webdataset_sample_for_sample(tmp_path):
    shard = _write(tmp_path / "s.tar", SAMPLES)
    theirs, ours = _webdataset(shard), sources.list_tar(shard)
    assert [s["__key__"] for s in theirs] == [it.key for it in ours] == [s["__key__"] for s in SAMPLES]
    for s, it in zip(theirs, ours, strict=True):
        fields = sorted(k for k in s if not k.startswith("__"))
        image = samples.image_field(fields)
        if it.error:  # a sample webdataset yields that pe-jax can embed no image of: a failure row
            assert image is None or it.key == "a", it.error
            continue
        assert it.source.lower() == f"{shard}::{it.key}.{image}".lower()  # the member (b.PNG: field png)
        with open(shard, "rb") as f:  # the byte range is the image webdataset yields
            f.seek(it.location.offset)
            assert f.read(it.location.size) == s[image]
        assert it.text == (s["txt"].decode() if "txt" in s else None)
        assert it.label == (s["cls"].decode() if "cls" in s else None)
    by_key = {it.key: it for it in ours if not it.error}
    assert by_key["dir/photo"].text == "dotted name" and by_key["b"].label == "3" and "c.d/e" in by_key
    assert by_key["a"].extra == {"url": "http://x/a", "width": 40}
    assert by_key["two"].extra == {"other_members": ["two.npy", "two.seg.png"]}  # named, not dropped
    errors = {it.key: it.error for it in ours if it.error}
    assert errors["t"].startswith("no image member; its fields: txt")
    assert "not adjacent" in errors["a"] and ours[0].error is None  # the first "a" is embedded


def test_duplicate_members_and_names_without_a_sample(tmp_path):
    """A field twice: webdataset raises, pe-jax records that sample and goes on; a name without an extension:
    webdataset skips it silently, pe-jax records it; webdataset's __meta__ names are no sample's for both."""
    shard = _raw(tmp_path / "d.tar", [("x.jpg", _jpeg(0)), ("x.txt", b"one"), ("x.jpg", _jpeg(1)),
                                      ("__index__", b"meta"), ("README", b"hello"), ("y.jpg", _jpeg(2))])
    with pytest.raises(ValueError, match="duplicate file name"):
        _webdataset(shard)
    ours = sources.list_tar(shard)
    # README is no sample's member (it does not end sample x for webdataset either): recorded as it is met
    assert [(it.key, it.error is None) for it in ours] == [("README", False), ("x", False), ("y", True)]
    assert "without an extension" in ours[0].error and "field 'jpg' twice" in ours[1].error
    assert [s["__key__"] for s in _webdataset(_raw(tmp_path / "e.tar", [("README", b"x"), ("y.jpg", b"y")]))] == ["y"]


def test_json_fields_named_like_the_job_columns_keep_both_values(tmp_path):
    shard = _write(tmp_path / "j.tar", [{"__key__": "k1", "jpg": _jpeg(0), "txt": "the caption", "cls": "dog",
                                         "json": json.dumps({"key": 5, "source": "web", "caption": "json caption",
                                                             "label": "json label", "text": "t", "extra": 1,
                                                             "json_key": "k2", "url": "u"})}])
    it, = sources.list_tar(shard)
    assert (it.key, it.text, it.label) == ("k1", "the caption", "dog")
    assert it.extra == {"json_json_key": 5, "json_source": "web", "json_caption": "json caption",
                        "json_label": "json label", "json_text": "t", "json_extra": 1, "json_key": "k2",
                        "url": "u"}  # the json's own json_key keeps its name; its key goes one prefix further


def test_a_folder_of_shards_and_text_from_shards_and_lists(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    _write(folder / "00000.tar", SAMPLES[:2])
    _write(folder / "00001.tar", SAMPLES[2:3])
    (folder / "00000.parquet").write_bytes(b"img2dataset's record")
    (folder / "00000_stats.json").write_text("{}")
    listing = embed_parts.list_parts(str(folder), "image", part_size=10)
    assert listing.shards == [str(folder / "00000.tar"), str(folder / "00001.tar")] and listing.sidecars
    assert "a folder of 2 tar shards" in listing.note and "2 other files there are not inputs" in listing.note
    import fsspec

    memory = fsspec.filesystem("memory")  # an object-store folder of shards: listed in one call
    for name in ("00000.tar", "00001.tar", "00000_stats.json"):
        memory.pipe(f"/h1shards/{name}", (folder / name).read_bytes())
    memory.mkdir("/h1shards/sub")
    remote = embed_parts.list_parts("memory://h1shards", "image", part_size=10)
    assert remote.shards == ["memory://h1shards/00000.tar", "memory://h1shards/00001.tar"]
    assert "1 other files there are not inputs (.json)" in remote.note
    assert [it.key for it in remote.first] == ["a", "dir/photo"]
    memory.rm("/h1shards", recursive=True)
    texts = embed_parts.list_parts(str(folder), "text", part_size=10)
    items = [it for _, part in texts.parts() for it in part()]
    assert [(it.key, it.text, it.error is None) for it in items] == [
        ("a", "a cat", True), ("dir/photo", "dotted name", True), ("b", None, False)]
    assert items[0].source == f"{folder / '00000.tar'}::a.txt" and "no .txt member" in items[2].error
    # An image list (path, caption; img2dataset's parquet) read as texts: the image job's keys, row order.
    table = pa.table({"path": ["x/1.jpg", "x/2.jpg", "x/3.jpg"], "caption": ["one", None, "three"], "w": [1, 2, 3]})
    pq.write_table(table, tmp_path / "list.parquet")
    texts = embed_parts.list_parts(str(tmp_path / "list.parquet"), "text", part_size=2)
    items = [it for _, part in texts.parts() for it in part()]
    assert texts.inputs == 3 and [(it.key, it.text) for it in items] == [("x/1.jpg", "one"), ("x/2.jpg", None),
                                                                       ("x/3.jpg", "three")]
    assert "row 2: the caption is null" in items[1].error and items[0].extra == {"path": "x/1.jpg", "w": 1}
    pq.write_table(pa.table({"path": ["a.jpg"]}), tmp_path / "nocap.parquet")
    with pytest.raises(ValueError, match=r"nocap\.parquet, row 1: the row has no 'text' \(nor 'caption'\)"):
        list(embed_parts.list_parts(str(tmp_path / "nocap.parquet"), "text", part_size=2).first)


def _files_layout(root):
    """img2dataset's `files` output: images with .txt and .json beside them, its records beside the folder."""
    (root / "00000").mkdir(parents=True)
    for i in range(3):
        (root / "00000" / f"00000000{i}.jpg").write_bytes(_jpeg(i))
        (root / "00000" / f"00000000{i}.txt").write_text(f"caption {i}")
        (root / "00000" / f"00000000{i}.json").write_text(json.dumps({"url": f"http://x/{i}", "key": f"00000000{i}",
                                                                     "status": "success"}))
    (root / "00000.parquet").write_bytes(b"records")
    (root / "00000_stats.json").write_text("{}")
    return root


def test_img2dataset_files_layout_is_samples(tmp_path):
    root = _files_layout(tmp_path / "files")
    (root / "00000" / "lone.png").write_bytes(_jpeg(9))
    listing = embed_parts.list_parts(str(root), "image", part_size=2)
    items = [it for _, part in listing.parts() for it in part()]
    assert listing.inputs == 4 and listing.sidecars
    assert [it.key for it in items] == ["00000/000000000", "00000/000000001", "00000/000000002", "00000/lone"]
    assert items[1].source == str(root / "00000" / "000000001.jpg") and items[1].text == "caption 1"
    assert items[1].extra == {"url": "http://x/1", "json_key": "000000001", "status": "success"}
    assert all(it.error is None for it in items)
    texts = [it.text for _, part in embed_parts.list_parts(str(root), "text", 10).parts() for it in part()]
    assert texts == ["caption 0", "caption 1", "caption 2", None]


def test_files_layout_job_rows(tiny_clip, tmp_path):
    """An img2dataset `files` folder embeds one row per image, its sidecars as columns (the schema has caption
    and label), nothing failed: no sidecar counted as a failed image, no extension in the keys."""
    root = _files_layout(tmp_path / "files")
    summary = _embed(tiny_clip, root, tmp_path / "out", part_size=2)
    _, rows = read_embeddings(str(tmp_path / "out"))
    assert (summary["embedded"], summary["failed"], summary["parts"]) == (3, 0, 2)
    assert [(r["key"], r["caption"], r["url"], r["json_key"]) for r in rows] == [
        (f"00000/00000000{i}", f"caption {i}", f"http://x/{i}", f"00000000{i}") for i in range(3)]
    assert set(rows[0]) == {"key", "source", "caption", "label", "json_key", "status", "url", "extra"}


def _link(name, target, kind):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _sparse(name, data, hole):
    """A GNU sparse member (`tar --sparse`): `hole` zero bytes, then `data`; only `data` is stored. Python's
    tarfile writes no sparse member: a plain GNU header is patched (type S, one map entry, the real size)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[156:157] = b"S"
    header[386:410] = f"{hole:011o}\0{len(data):011o}\0".encode()
    header[483:495] = f"{hole + len(data):011o}\0".encode()
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\0 ".encode()
    return bytes(header) + data + b"\0" * (-len(data) % 512)


def test_links_devices_and_sparse_members_are_failure_rows(tmp_path):
    """Issue 33: hard links, symlinks and other non-regular members (webdataset skips them) are failure rows
    naming them; a GNU sparse image (webdataset expands it; its bytes are not one range) is a failure row, not
    embedded from the wrong bytes; a folder member is nothing; `./a.jpg` keeps webdataset's key `./a`; and
    every member is accounted for: embedded, a sidecar or other member of an embedded sample, or a failure."""
    fifo = tarfile.TarInfo("f.jpg")
    fifo.type = tarfile.FIFOTYPE
    folder = tarfile.TarInfo("./")
    folder.type = tarfile.DIRTYPE
    with tarfile.open(tmp_path / "odd.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in [("a.jpg", _jpeg(0)), ("a.txt", b"cap")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        tar.addfile(_link("a.png", "a.jpg", tarfile.SYMTYPE))  # inside sample a: webdataset skips it, a goes on
        for info in [_link("b.jpg", "a.jpg", tarfile.LNKTYPE), _link("c.jpg", "a.jpg", tarfile.SYMTYPE), fifo,
                     folder]:
            tar.addfile(info)
        sparse = _sparse("s.jpg", _jpeg(1), 4096)
        tar.fileobj.write(sparse)
        tar.offset += len(sparse)
        for name, data in [("./d.jpg", _jpeg(2)), ("./d.txt", b"dotted")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shard = str(tmp_path / "odd.tar")
    theirs = {s["__key__"]: s for s in _webdataset(shard)}
    assert sorted(theirs) == ["./d", "a", "s"] and theirs["s"]["jpg"] == b"\0" * 4096 + _jpeg(1)
    ours = sources.list_tar(shard)
    errors = {it.key: it.error for it in ours if it.error}
    embedded = {it.key: it for it in ours if not it.error}
    assert sorted(embedded) == ["./d", "a"] and embedded["./d"].text == "dotted" and embedded["a"].text == "cap"
    assert errors["a"] == "a.png: a symbolic link to a.jpg; links are not followed (webdataset skips them)"
    assert errors["b"] == "b.jpg: a hard link to a.jpg; links are not followed (webdataset skips them)"
    assert "c.jpg: a symbolic link" in errors["c"] and errors["f"] == "f.jpg: a FIFO member, not a regular file"
    assert errors["s"] == (f"{shard}::s.jpg: a sparse member (GNU tar --sparse), its bytes not stored in one "
                           "piece: not read (unpack and re-tar it without --sparse)")
    named = {it.source.rsplit("::", 1)[-1] for it in ours} | {f"{it.key}.{f}" for it in embedded.values()
                                                             for f in it.sidecars}
    named |= {e.split(":")[0] for e in errors.values()}
    with tarfile.open(shard) as tar:
        assert {m.name for m in tar if not m.isdir()} <= named  # nothing vanished unseen


def test_a_second_image_and_a_repeated_member_are_never_lost(tmp_path):
    """Issue 33: `a.jpg` + `a.png` (webdataset yields both fields): `a.jpg` embedded, `a.png` named in
    `other_members`; a member twice (webdataset raises): the sample is one failure row naming the second, its
    first member the row's source."""
    shard = _raw(tmp_path / "two.tar", [("a.jpg", _jpeg(0)), ("a.png", _jpeg(1)), ("b.jpg", _jpeg(2)),
                                        ("b.jpg", _jpeg(3)), ("c.jpg", _jpeg(4))])
    first, = _webdataset(_raw(tmp_path / "one.tar", [("a.jpg", _jpeg(0)), ("a.png", _jpeg(1))]))
    assert sorted(k for k in first if not k.startswith("__")) == ["jpg", "png"]
    a, b, c = sources.list_tar(shard)
    assert (a.source, a.error, a.extra) == (f"{shard}::a.jpg", None, {"other_members": ["a.png"]})
    assert (b.source, b.error) == (f"{shard}::b.jpg", "b.jpg: field 'jpg' twice in sample 'b' (webdataset raises "
                                                      "on a duplicate file name)")
    assert c.error is None


def test_sidecar_json_with_huge_integers_or_deep_nesting_is_kept_as_text(tmp_path):
    """Issue 33: a JSON integer beyond 64 bits (no parquet column holds it) is kept as its text; JSON nested
    deeper than Python's parser goes is kept whole as the `json` column: no traceback, nothing dropped."""
    deep = '{"a": ' + "[" * 100000 + "]" * 100000 + "}"
    shard = _raw(tmp_path / "j.tar", [("a.jpg", _jpeg(0)), ("a.json", b'{"n": 123456789012345678901234567890, '
                                                                      b'"m": -5, "o": {"p": 99999999999999999999}}'),
                                      ("b.jpg", _jpeg(1)), ("b.json", deep.encode())])
    a, b = sources.list_tar(shard)
    assert a.extra == {"n": "123456789012345678901234567890", "m": -5, "o": '{"p": "99999999999999999999"}'}
    assert (b.error, b.extra) == (None, {"json": deep})


def test_compressed_shards_are_refused_in_one_line(tmp_path):
    """Issue 33: every image of a `.tar.gz` "failed" (its byte ranges are the uncompressed stream's): a
    compressed shard pattern is refused at once, and a compressed file named `.tar` is one failure row."""
    import gzip

    plain = _raw(tmp_path / "p.tar", [("a.jpg", _jpeg(0))])
    (tmp_path / "g.tar.gz").write_bytes(gzip.compress((tmp_path / "p.tar").read_bytes()))
    for pattern in ("g.tar.gz", "{0..1}.tgz", "x.tar.zst"):
        with pytest.raises(ValueError, match=r"compressed tar shards are not supported; pe-jax reads each member "
                                             r"by byte range: decompress them"):
            sources.classify(str(tmp_path / pattern))
    (tmp_path / "g.tar").write_bytes(gzip.compress((tmp_path / "p.tar").read_bytes()))
    it, = sources.list_tar(str(tmp_path / "g.tar"))
    assert (it.key, it.source) == (str(tmp_path / "g.tar"),) * 2
    assert it.error == f"{tmp_path / 'g.tar'}: a gzip-compressed file, not an uncompressed tar shard (decompress it)"
    assert sources.list_tar(plain)[0].error is None


def test_unreadable_shards_are_failure_rows(tmp_path):
    """Issue 33: a 0-byte shard, a shard that is no tar, a truncated one (its members before the damage kept)
    and a FIFO (refused unopened: opening one waits for a writer forever) are each a failure row."""
    (tmp_path / "zero.tar").write_bytes(b"")
    (tmp_path / "text.tar").write_bytes(b"not a tar" * 100)
    data = (tmp_path / _raw(tmp_path / "full.tar", [("a.jpg", _jpeg(0)), ("b.jpg", _jpeg(1))])).read_bytes()
    b_header = 512 + -(-len(_jpeg(0)) // 512) * 512
    (tmp_path / "cut.tar").write_bytes(data[:b_header + 100])  # b's header cut short: tarfile ends quietly there
    (tmp_path / "short.tar").write_bytes(data[:b_header - 600])  # a's bytes cut short: tarfile raises
    os.mkfifo(tmp_path / "fifo.tar")
    for name, error in [("zero", "0 bytes: an empty file, not a tar shard"),
                        ("text", "not a readable tar shard (ReadError: invalid header)"),
                        ("fifo", "is a FIFO (named pipe), not a regular file; only regular files are read as "
                                 "tar shards")]:
        it, = sources.list_tar(str(tmp_path / f"{name}.tar"))
        assert (it.key, it.error) == (str(tmp_path / f"{name}.tar"), f"{tmp_path / name}.tar: {error}")
    for name, damage in [("cut", f"(a damaged header at byte {b_header})"),
                         ("short", "(ReadError: unexpected end of data)")]:
        a, rest = sources.list_tar(str(tmp_path / f"{name}.tar"))  # the members before the damage are kept
        assert (a.key, a.error, rest.key) == ("a", None, str(tmp_path / f"{name}.tar"))
        assert rest.error == f"{tmp_path / name}.tar: not a readable tar shard after 1 members {damage}; the rest " \
                             "of it is not read"
    theirs = _webdataset(str(tmp_path / "cut.tar"))  # webdataset: one sample, the damage unsaid
    assert [s["__key__"] for s in theirs] == ["a"]


# ------------------------------------------------------------------------------------------------ jobs


def _embed(model, src, out, **kw):
    return embed(model, str(src), str(out), batch_size=4, progress=False, **kw)


def _failures(out):
    return [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]


def test_captions_and_labels_kept_when_the_first_shard_has_none(tiny_clip, tmp_path):
    """Loss 1: the first shard's images all fail (img2dataset when its downloads failed): the next shard's
    captions and labels are columns all the same."""
    _raw(tmp_path / "000.tar", [(f"bad{i}.jpg", b"\xff\xd8 broken") for i in range(3)])
    _write(tmp_path / "001.tar", [{"__key__": f"s{i}", "jpg": _jpeg(i), "txt": f"caption {i}", "cls": str(i)}
                                  for i in range(3)])
    summary = _embed(tiny_clip, tmp_path / "{000..001}.tar", tmp_path / "out")
    _, rows = read_embeddings(str(tmp_path / "out"))
    assert (summary["embedded"], summary["failed"]) == (3, 3)
    assert [(r["key"], r["caption"], r["label"], r["extra"]) for r in rows] == [
        (f"s{i}", f"caption {i}", str(i), None) for i in range(3)]


def test_json_fields_do_not_overwrite_the_job_columns(tiny_clip, tmp_path):
    """Loss 2: a json `key` (not even a string), `source`, `caption`, `label` keep their values as json_NAME."""
    _write(tmp_path / "s.tar", [{"__key__": "k1", "jpg": _jpeg(0), "txt": "real caption",
                                 "json": json.dumps({"key": 17, "source": "web", "caption": "alt", "label": 1})}])
    _embed(tiny_clip, tmp_path / "s.tar", tmp_path / "out")
    row, = read_embeddings(str(tmp_path / "out"))[1]
    assert row["key"] == "k1" and row["source"] == f"{tmp_path / 's.tar'}::k1.jpg" and row["caption"] == "real caption"
    assert (row["json_key"], row["json_source"], row["json_caption"], row["json_label"]) == (17, "web", "alt", 1)


def test_dotted_member_names_are_embedded_and_misgrouped_samples_recorded(tiny_clip, tmp_path):
    """Loss 3: `photo.v2.jpg` is sample `photo` (as webdataset yields it), embedded; the non-adjacent second
    `a` and the image-less `t` are failure rows, so every sample webdataset yields is accounted for."""
    shard = _write(tmp_path / "s.tar", SAMPLES)
    summary = _embed(tiny_clip, shard, tmp_path / "out")
    _, rows = read_embeddings(str(tmp_path / "out"))
    assert [r["key"] for r in rows] == ["a", "dir/photo", "b", "c.d/e", "two"]
    assert summary["embedded"] + summary["failed"] == len(_webdataset(shard)) == 7
    assert {f["key"]: f["error"].split(";")[0] for f in _failures(tmp_path / "out")} == {
        "t": "no image member", "a": "key 'a' again after other samples: its members are not adjacent (webdataset "
                                     "would yield a second sample of the same key)"}


def test_input_errors_name_the_file(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"a red dog\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"bad\.txt: not UTF-8 text \(invalid start byte at byte \d+\)"):
        embed_parts.list_parts(str(tmp_path / "bad.txt"), "text", part_size=10)
    (tmp_path / "bad.csv").write_bytes(b"path,caption\na.jpg,\xff\n")
    with pytest.raises(ValueError, match=r"bad\.csv: not UTF-8 text"):
        embed_parts.list_parts(str(tmp_path / "bad.csv"), "image", part_size=10)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    for modality in ("image", "text"):
        with pytest.raises(ValueError, match=r"bad\.parquet: not a readable parquet file"):
            embed_parts.list_parts(str(tmp_path / "bad.parquet"), modality, part_size=10)
    shard = _raw(tmp_path / "big.tar", [("a.jpg", _jpeg(0)), ("a.txt", b"x" * (samples.MAX_SIDECAR_BYTES + 1)),
                                        ("b.jpg", _jpeg(1))])
    a, b = sources.list_tar(shard)  # one sample's oversized sidecar is its failure, not the shard's
    assert a.error == f"{shard}::a.txt: {samples.MAX_SIDECAR_BYTES + 1} bytes is too large for a sidecar"
    assert b.error is None


@pytest.mark.slow
def test_cli_shard_folder_and_text_from_shards(tiny_clip, tmp_path, capsys):
    """`--input shards/` is taken as shards (said in the output); `--modality text` reads their captions."""
    import pe_jax
    from pe_jax.cli import main

    pe_jax.save(tiny_clip, tmp_path / "ckpt", preset="PE-Core-T16-384")
    (tmp_path / "shards").mkdir()
    _write(tmp_path / "shards" / "00000.tar", SAMPLES[:2])
    _write(tmp_path / "shards" / "00001.tar", SAMPLES[2:4])
    (tmp_path / "shards" / "00000_stats.json").write_text("{}")
    for modality in ("image", "text"):
        out = tmp_path / modality
        assert main(["embed", "--checkpoint", str(tmp_path / "ckpt"), "--input", str(tmp_path / "shards"),
                     "--output", str(out), "--modality", modality, "--batch-size", "4", "--quiet"]) in (0, None)
        printed = capsys.readouterr().out
        assert "a folder of 2 tar shards, embedded as webdataset shards; 1 other files there are not inputs" \
               in printed
        rows = read_embeddings(str(out))[1]
        if modality == "image":
            assert [r["key"] for r in rows] == ["a", "dir/photo", "b", "c.d/e"] and "4 embedded, 0 failed" in printed
        else:
            assert [(r["key"], r["text"]) for r in rows] == [("a", "a cat"), ("dir/photo", "dotted name")]
            assert [f["key"] for f in _failures(out)] == ["b", "c.d/e"]  # no .txt: failure rows


def test_empty_shards_write_no_files_and_resume_knows_them(tiny_clip, tmp_path):
    """An empty shard and a shard whose every image fails write no 0-row .npy/.parquet (embedding-reader's
    parquet_npy reader would pair every later file with the wrong metadata): a marker and the manifest's
    `empty_parts` instead; a rerun skips them; read_embeddings and embedding-reader read the rest row-aligned."""
    from embedding_reader import EmbeddingReader

    _raw(tmp_path / "000.tar", [])
    _write(tmp_path / "001.tar", [{"__key__": f"s{i}", "jpg": _jpeg(i), "txt": f"c{i}"} for i in range(3)])
    _raw(tmp_path / "002.tar", [("bad.jpg", b"\xff\xd8 broken")])
    _write(tmp_path / "003.tar", [{"__key__": "t0", "jpg": _jpeg(7), "txt": "last"}])
    out = tmp_path / "out"
    summary = _embed(tiny_clip, tmp_path / "{000..003}.tar", out)
    assert summary["complete"] and summary["empty_parts"] == [0, 2]
    assert (summary["embedded"], summary["failed"]) == (4, 1)
    assert sorted(p.name for p in (out / "embeddings").iterdir()) == ["part-00001.npy", "part-00003.npy"]
    assert sorted(p.name for p in (out / "metadata").iterdir()) == ["part-00001.parquet", "part-00003.parquet"]
    assert json.loads((out / "manifest.json").read_text())["empty_parts"] == [0, 2]
    again = _embed(tiny_clip, tmp_path / "{000..003}.tar", out)
    assert again["complete"] and again["this_run"]["embedded"] == again["this_run"]["failed"] == 0
    emb, rows = read_embeddings(str(out))
    assert [r["key"] for r in rows] == ["s0", "s1", "s2", "t0"] and emb.shape[0] == 4
    reader = EmbeddingReader(str(out / "embeddings"), file_format="parquet_npy", metadata_folder=str(out / "metadata"),
                             meta_columns=["key", "caption"])
    got, meta = [], []
    for batch, ids in reader(batch_size=3, show_progress=False):
        got.append(batch)
        meta += ids.to_dict("records")
    np.testing.assert_array_equal(np.concatenate(got), emb)
    assert [(m["key"], m["caption"]) for m in meta] == [(r["key"], r["caption"]) for r in rows]
    nothing = _embed(tiny_clip, tmp_path / "000.tar", tmp_path / "none")  # every part empty
    assert nothing["complete"] and nothing["embedded"] == 0
    assert read_embeddings(str(tmp_path / "none"))[0].shape == (0, 0)


@pytest.mark.slow
def test_ray_actor_reads_text_from_its_shard(tiny_clip, tmp_path):
    """The Ray engine's actor indexes its own shard (pe_jax.embed.ray_engine.PartEmbedder.embed_part, run here in
    this process, no cluster): with --modality text it embeds the `.txt` of each sample, as the local job does."""
    import pe_jax
    from pe_jax.embed.output import Settings
    from pe_jax.embed.ray_engine import PartEmbedder

    pe_jax.save(tiny_clip, tmp_path / "ckpt", preset="PE-Core-T16-384")
    shard = _write(tmp_path / "s.tar", SAMPLES[:3])
    local = tmp_path / "local"
    _embed(tiny_clip, shard, local, modality="text")
    settings = Settings(**json.loads((local / "manifest.json").read_text())["settings"])
    actor = PartEmbedder(pe_jax.resolve_model(str(tmp_path / "ckpt")), False, settings, dict(
        batch_size=4, normalize=True, layer_idx=None, pooling=None, workers=1, num_frames=8), 0)
    embeddings, items, failures = actor.embed_part(0, shard)
    local_embeddings, rows = read_embeddings(str(local))
    assert [it.text for it in items] == [r["text"] for r in rows] == ["a cat", "dotted name"]
    assert [f["key"] for f in failures] == ["b"] and "no .txt member" in failures[0]["error"]
    np.testing.assert_allclose(embeddings.astype(np.float32), local_embeddings.astype(np.float32), atol=1e-3)


def test_a_broken_shard_or_sidecar_is_a_failure_row_and_the_job_goes_on(tiny_clip, tmp_path):
    """Issue 33: a 0-byte shard (first or later) and an oversized sidecar stopped the whole job on every
    rerun; a json integer beyond 64 bits stopped the metadata write. Now each is a failure row (the integer
    kept as text) and a rerun finds the job complete."""
    (tmp_path / "000.tar").write_bytes(b"")
    _raw(tmp_path / "001.tar", [("a.jpg", _jpeg(0)), ("a.json", b'{"n": 123456789012345678901234567890}'),
                                ("b.jpg", _jpeg(1)), ("b.txt", b"x" * (samples.MAX_SIDECAR_BYTES + 1))])
    (tmp_path / "002.tar").write_bytes(b"")
    for _ in range(2):
        summary = _embed(tiny_clip, tmp_path / "{000..002}.tar", tmp_path / "out")
        assert summary["complete"] and (summary["embedded"], summary["failed"]) == (1, 3)
    assert summary["this_run"]["embedded"] == summary["this_run"]["failed"] == 0
    row, = read_embeddings(str(tmp_path / "out"))[1]
    assert (row["key"], json.loads(row["extra"])) == ("a", {"n": "123456789012345678901234567890"})
    assert sorted(f["error"].split(": ", 1)[1] for f in _failures(tmp_path / "out")) == [
        "0 bytes: an empty file, not a tar shard"] * 2 + [f"{samples.MAX_SIDECAR_BYTES + 1} bytes is too large for a "
                                                          "sidecar"]
