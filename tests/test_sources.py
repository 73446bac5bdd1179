"""sources.iter_folder: a lazy walk that lists exactly what a sorted full listing would, one folder at a time."""

import os

import pytest

from pe_jax.data import sources
from pe_jax.embed import parts as embed_parts


def _tree(root):
    for rel in ["z.jpg", "a.jpg", "a-b.jpg", "a/b.jpg", "a/x.jpg", "a/x.png", "a/deeper/c.jpg", "b/.hidden.jpg",
                ".git/config", "m/n/o/p.jpg", "noext"]:
        os.makedirs(os.path.dirname(root / rel), exist_ok=True)
        (root / rel).write_bytes(b"x")
    (root / "link").symlink_to(root / "m", target_is_directory=True)  # not followed, as os.walk does
    (root / "linked.jpg").symlink_to(root / "z.jpg")  # a file link is an input


def test_order_and_keys_match_a_sorted_full_listing(tmp_path):
    _tree(tmp_path)
    items = list(sources.iter_folder(str(tmp_path)))
    rel = [os.path.relpath(it.source, tmp_path) for it in items]
    assert rel == sorted(rel)  # the order of the full paths, sorted (a folder "a" sorts as "a/")
    assert rel == ["a-b.jpg", "a.jpg", "a/b.jpg", "a/deeper/c.jpg", "a/x.jpg", "a/x.png", "linked.jpg",
                   "m/n/o/p.jpg", "noext", "z.jpg"]
    # keys drop the extension unless two files of one folder share a stem
    assert [it.key for it in items] == ["a-b", "a", "a/b", "a/deeper/c", "a/x.jpg", "a/x.png", "linked", "m/n/o/p",
                                        "noext", "z"]
    assert sources.list_folder(str(tmp_path)) == items


def test_the_walk_is_lazy_and_parts_hold_one_part(tmp_path):
    for sub in range(3):
        for i in range(4):
            os.makedirs(tmp_path / f"{sub}", exist_ok=True)
            (tmp_path / f"{sub}" / f"{i}.jpg").write_bytes(b"x")
    walk = sources.iter_folder(str(tmp_path))
    assert next(walk).key == "0/0"
    (tmp_path / "2" / "9.jpg").write_bytes(b"x")  # a folder not reached yet is listed when the walk gets there
    assert [it.key for it in walk][-1] == "2/9"

    listing = embed_parts.list_parts(str(tmp_path), "image", part_size=5)
    assert (listing.count, listing.inputs, [it.key for it in listing.first]) == (3, 13, ["0/0", "0/1", "0/2", "0/3",
                                                                                          "1/0"])
    parts = [(n, [it.key for it in items()]) for n, items in listing.parts()]
    assert [len(keys) for _, keys in parts] == [5, 5, 3] and parts[2][1][-1] == "2/9"

    (tmp_path / "1" / "extra.jpg").write_bytes(b"x")  # the folder changed after it was counted
    with pytest.raises(ValueError, match="the input changed while the job ran"):
        list(listing.parts())


def test_unreadable_or_empty_folders_are_errors(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="the input folder is empty"):
        embed_parts.list_parts(str(tmp_path / "empty"), "image", part_size=5)
    (tmp_path / "full" / "locked").mkdir(parents=True)
    (tmp_path / "full" / "a.jpg").write_bytes(b"x")
    scandir = os.scandir

    def refuse(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)  # as root, chmod would not stop the walk
    with pytest.raises(ValueError, match=r"locked: cannot list the input folder \(Permission denied\)"):
        sources.list_folder(str(tmp_path / "full"))


def test_a_csv_with_a_byte_order_mark_reads_its_path_column(tmp_path):
    """A spreadsheet's "UTF-8 CSV" starts with a BOM: its list "needed a 'path' column" (`\\ufeffpath`)."""
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "list.csv").write_bytes("\ufeffpath,caption\na.png,a red square\n".encode())
    items = sources.list_pairs(str(tmp_path / "list.csv"))
    assert [(os.path.basename(it.source), it.text) for it in items] == [("a.png", "a red square")]


def test_a_byte_order_mark_csv_lists_for_the_embedding_job(tmp_path):
    (tmp_path / "list.csv").write_bytes("\ufeffpath,caption\na.png,red\n".encode())
    listing = embed_parts.list_parts(str(tmp_path / "list.csv"), "image", part_size=5)
    assert [(it.key, it.extra) for it in listing.first] == [("a.png", {"caption": "red"})]


def test_a_lone_carriage_return_is_part_of_its_line(tmp_path):
    """Issue 33: a lone `\\r` split a line when read (universal newlines) but not when counted, so the job
    failed as "the input changed while the job ran" on every run: lines end at `\\n` (or `\\r\\n`) only."""
    (tmp_path / "t.txt").write_bytes(b"one\rtwo\nthree\r\n\nfour")
    (tmp_path / "p.txt").write_bytes(b"a.jpg\rb\n\nc.jpg\r\n")
    (tmp_path / "l.jsonl").write_bytes(b'{"path": "a.jpg",\r"key": "k"}\n\n{"path": "c.jpg"}\r\n')
    (tmp_path / "t.jsonl").write_bytes(b'{"text": "x",\r"key": "k"}\n')
    for name, modality, expected in [("t.txt", "text", ["one\rtwo", "three", "", "four"]),
                                     ("p.txt", "image", ["a.jpg\rb", "c.jpg"]), ("l.jsonl", "image", ["k", "c.jpg"]),
                                     ("t.jsonl", "text", ["x"])]:
        listing = embed_parts.list_parts(str(tmp_path / name), modality, part_size=2)
        items = [it for _, part in listing.parts() for it in part()]
        assert [it.text if modality == "text" else it.key for it in items] == expected, name


def test_csv_fields_over_128_kb_and_huge_or_deep_json_rows(tmp_path):
    """Issue 33: a CSV field over csv's 128 KB default limit, a JSON integer beyond 64 bits (kept as text: no
    parquet column holds it) and a row nested deeper than the parser goes were tracebacks."""
    caption = "long " * 60000
    (tmp_path / "l.csv").write_text(f"path,caption\na.jpg,{caption}\n")
    for modality in ("image", "text"):
        listing = embed_parts.list_parts(str(tmp_path / "l.csv"), modality, part_size=2)
        it, = listing.first
        assert (it.text if modality == "text" else it.extra["caption"]) == caption
    (tmp_path / "big.jsonl").write_text('{"path": "a.jpg", "n": 123456789012345678901234567890, "m": [1, 2]}\n')
    it, = embed_parts.list_parts(str(tmp_path / "big.jsonl"), "image", part_size=2).first
    assert it.extra == {"n": "123456789012345678901234567890", "m": [1, 2]}
    (tmp_path / "deep.jsonl").write_text('{"path": "a.jpg", "n": ' + "[" * 100000 + "]" * 100000 + "}\n")
    with pytest.raises(ValueError, match=r"deep\.jsonl, line 1: not JSON \(nested too deeply"):
        embed_parts.list_parts(str(tmp_path / "deep.jsonl"), "image", part_size=2)


def test_a_fifo_sidecar_in_a_folder_is_its_samples_failure(tmp_path):
    """Only regular files are opened: a FIFO named like a sidecar (`a.txt` beside `a.jpg`) would block."""
    (tmp_path / "a.jpg").write_bytes(b"x")
    os.mkfifo(tmp_path / "a.txt")
    (tmp_path / "b.jpg").write_bytes(b"x")
    a, b = sources.iter_folder(str(tmp_path))
    assert a.error == f"{tmp_path / 'a.txt'}: is a FIFO (named pipe), not a regular file" and b.error is None
