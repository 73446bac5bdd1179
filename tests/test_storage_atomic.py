"""pe_jax.storage.atomic, the one "write beside, then rename": a write is whole or absent, a failed write
leaves nothing, a folder appears complete, and the one sweeper removes only pe-jax's own temporaries of
processes that no longer run on this host."""

import json
import os
import socket
import subprocess

import pytest

from pe_jax.storage import atomic
from pe_jax.storage.atomic import (
    TMP_MARK,
    atomic_file,
    atomic_folder,
    atomic_write,
    rename_noreplace,
    replace_checked,
    sweep_temporaries,
    temporary_name,
    temporary_owner,
    write_bytes,
    write_json,
    write_text,
)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _temporaries(folder) -> list[str]:
    return [n for n in os.listdir(folder) if TMP_MARK in n]


def test_local_writes_land_whole(tmp_path):
    path = tmp_path / "a.bin"
    atomic_write(str(path), lambda f: f.write(b"one"))
    write_bytes(str(path), b"two")  # replaces
    assert path.read_bytes() == b"two"
    write_text(str(tmp_path / "t.txt"), "caf\udce9")  # a surrogate-escaped file-name byte is written back as is
    assert (tmp_path / "t.txt").read_bytes() == b"caf\xe9"
    data = write_json(str(tmp_path / "j.json"), {"a": [1, 2]}, indent=1)
    assert (tmp_path / "j.json").read_bytes() == data and json.loads(data) == {"a": [1, 2]}
    assert _temporaries(tmp_path) == []


def test_a_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def fails(f):
        f.write(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_write(str(path), fails)
    with pytest.raises(atomic.StorageError, match=f"^cannot write {tmp_path / 'no' / 'x'}: "):
        write_bytes(str(tmp_path / "no" / "x"), b"x")  # one line naming the file
    assert path.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["a.bin"]


def test_a_link_at_the_final_name_is_replaced_not_followed(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("the user's file")
    os.symlink(target, tmp_path / "out.json")
    write_json(str(tmp_path / "out.json"), {})
    assert target.read_text() == "the user's file" and not (tmp_path / "out.json").is_symlink()


def test_folder_appears_complete_or_not_at_all(tmp_path):
    dst = tmp_path / "data"
    with atomic_folder(str(dst)) as tmp:
        assert TMP_MARK in os.path.basename(tmp) and os.path.dirname(tmp) == str(tmp_path)
        (open(os.path.join(tmp, "f.txt"), "w")).close()
        assert not dst.exists()
    assert os.listdir(dst) == ["f.txt"] and _temporaries(tmp_path) == []

    with pytest.raises(RuntimeError), atomic_folder(str(tmp_path / "failed")) as tmp:
        os.mkdir(os.path.join(tmp, "sub"))
        raise RuntimeError("interrupted")
    assert sorted(os.listdir(tmp_path)) == ["data"]

    with pytest.raises(FileExistsError), atomic_folder(str(dst)) as tmp:  # appeared meanwhile: never replaced
        pass
    assert os.listdir(dst) == ["f.txt"] and _temporaries(tmp_path) == []


def test_a_file_for_writers_that_take_a_name(tmp_path):
    with atomic_file(str(tmp_path / "index.bin")) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"index")
    assert (tmp_path / "index.bin").read_bytes() == b"index" and _temporaries(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False])  # False: the portable fallback (no renameat2 flags)
def test_replace_checked_never_replaces_what_changed(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "renameat2", lambda src, dst, flags: False)
    dst, new = tmp_path / "dst", tmp_path / "new"
    for folder, text in ((dst, "old"), (new, "new")):
        folder.mkdir()
        (folder / "f").write_text(text)
    with pytest.raises(FileExistsError, match="became the user's"):
        replace_checked(str(new), str(dst), lambda old: "the user's")
    assert (dst / "f").read_text() == "old" and (new / "f").read_text() == "new"
    replace_checked(str(new), str(dst), lambda old: None)
    assert (dst / "f").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["dst"]
    (tmp_path / "x").write_text("x")
    with pytest.raises(FileExistsError):
        rename_noreplace(str(tmp_path / "x"), str(dst))


def test_the_sweeper_removes_only_dead_own_temporaries(tmp_path):
    host, dead = socket.gethostname(), _dead_pid()
    ours = temporary_name(str(tmp_path / "live.npy"))
    assert temporary_owner(os.path.basename(ours)) == (os.getpid(), host)
    swept = [tmp_path / f"a.npy.pe_jax-tmp-{dead}-0a1b2c3d@{host}", tmp_path / f"dir.pe_jax-tmp-{dead}-0a1b2c3d@{host}"]
    kept = [tmp_path / f"draft.tmp-{dead}",  # not pe-jax's name: a user's
            tmp_path / f"b.npy.pe_jax-tmp-{dead}-0a1b2c3d@another-host",  # a peer's on another machine
            tmp_path / "c.pe_jax-tmp-shared",  # several processes' (no pid): its writer removes it
            tmp_path / "notes.txt"]
    swept[0].write_text("x")
    (swept[1] / "sub").mkdir(parents=True)
    for p in kept:
        p.write_text("x")
    open(ours, "w").close()  # a live process's (this one)
    link = tmp_path / f"l.pe_jax-tmp-{dead}-0a1b2c3d@{host}"
    os.symlink(tmp_path / "notes.txt", link)  # pe-jax makes no links: not ours
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        alive = tmp_path / f"d.pe_jax-tmp-{sleeper.pid}-0a1b2c3d@{host}"
        alive.write_text("x")
        assert sweep_temporaries(str(tmp_path), of=str(tmp_path / "a.npy")) == [str(swept[0])]  # only a.npy's
        assert sorted(sweep_temporaries(str(tmp_path))) == [str(swept[1])]
        assert alive.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert all(p.exists() for p in kept) and os.path.exists(ours) and link.is_symlink()
    assert sweep_temporaries(str(tmp_path / "missing")) == [] and sweep_temporaries("memory://x") == []


def test_a_guard_keeps_what_another_writer_claims(tmp_path):
    import contextlib

    dead = _dead_pid()
    claimed = tmp_path / f"out.pe_jax-tmp-{dead}-0a1b2c3d@{socket.gethostname()}"
    claimed.mkdir()
    seen = []

    @contextlib.contextmanager
    def guard(target):
        seen.append(target)
        yield False

    assert sweep_temporaries(str(tmp_path), guard=guard) == [] and claimed.is_dir()
    assert seen == [str(tmp_path / "out")]


def test_a_url_is_one_put():
    fsspec = pytest.importorskip("fsspec")
    url = f"memory://pe-jax-atomic-{os.getpid()}/x.json"
    write_json(url, {"a": 1})
    fs = fsspec.filesystem("memory")
    path = url.split("://", 1)[1]
    assert json.loads(fs.cat_file(path)) == {"a": 1}

    def fails(f):
        f.write(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write(url + ".2", fails)
    assert not fs.exists(path + ".2")  # nothing was sent
    fs.rm(path)


def test_former_names_still_work():
    """The duplicates became uses of the one definition; their public names stay, as aliases."""
    from pe_jax import storage
    from pe_jax.checkpoints import orbax, readers
    from pe_jax.convert import outputs
    from pe_jax.embed import output
    from pe_jax.preprocess import image
    from pe_jax.train import workdir

    assert orbax.write_json is workdir.write_json is write_json and storage.write_bytes is write_bytes
    assert output.sweep_temporaries is output.sweep_job and outputs.sweep_temporaries is sweep_temporaries
    assert readers.check_regular_file is readers.check_checkpoint_file
    assert image.read_bytes is image.read_image_bytes
    assert outputs.rename_noreplace is rename_noreplace and outputs.renameat2 is atomic.renameat2
