"""Checkpoint integrity: checksums written by pe_jax.save and the converter, verified on every load, `pe-jax
verify`, and each storage fault ending in one line that names the parameter and the file. Torch-free."""

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import pe_jax
from pe_jax.checkpoints.naming import slot_shape, slots
from pe_jax.checkpoints.params import param_shapes
from pe_jax.checkpoints.verify import CheckpointIntegrityError, content_hash, verify
from pe_jax.cli import main
from pe_jax.convert.convert import convert_checkpoint

PRESET = "PE-Core-T16-384"  # the converter matches full presets: a random full-size T/16 (280 MB)


def _random_original(path: Path, preset: str = PRESET):
    """A random original-naming safetensors file of `preset`, made with numpy."""
    model = nnx.eval_shape(lambda: pe_jax.CLIP(pe_jax.clip_config(preset), rngs=nnx.Rngs(0)))
    shapes = param_shapes(model)
    rng = np.random.default_rng(0)
    save_file({s.torch_key: rng.standard_normal(s.transform.torch_shape(slot_shape(shapes[s.path].shape, s.index)),
                                                dtype=np.float32)
               for s in slots(model.config, "original", shapes)}, str(path))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_clip):
    d = tmp_path_factory.mktemp("verify")
    pe_jax.save(tiny_clip, d / "saved", preset=PRESET)
    _random_original(d / "original.safetensors")
    meta = convert_checkpoint(str(d / "original.safetensors"), str(d / "converted"), progress=False,
                              source_sha256=True)
    (d / "images").mkdir()
    return {"dir": d, "saved": d / "saved", "converted": d / "converted", "meta": meta}


def _state_files(ckpt: Path) -> list[Path]:
    return sorted(f for f in (ckpt / "state").rglob("*") if f.is_file())


def _snapshot(ckpt: Path) -> dict:
    return {str(f.relative_to(ckpt)): hashlib.sha256(f.read_bytes()).hexdigest() for f in ckpt.rglob("*")
            if f.is_file()}


@pytest.mark.parametrize("which", ["saved", "converted"])
def test_checksums_are_written_and_name_the_content(ckpts, which):
    ckpt = ckpts[which]
    table = json.loads((ckpt / "checksums.json").read_text())
    meta = json.loads((ckpt / "pe_jax.json").read_text())
    files = {str(f.relative_to(ckpt)) for f in _state_files(ckpt)}
    assert set(table["files"]) == files and table["algorithm"] == "xxh3_64"
    assert all(n.endswith(("/.zarray", "_METADATA")) or "/" in n for n in files)
    report = verify(ckpt)
    assert report.ok and report.verified, report.summary()
    assert meta["content_hash"] == table["content_hash"] == report.content_hash == content_hash(ckpt)
    assert report.content_hash.startswith("sha256:")
    # the converter's checksums came from the slabs it wrote, never read back: they are the files' own
    import xxhash

    for rel, (size, checksum) in table["files"].items():
        data = (ckpt / rel).read_bytes()
        assert (len(data), xxhash.xxh3_64_hexdigest(data)) == (size, checksum), rel


def test_checkpoint_with_crc32_checksums_still_verifies(ckpts, tmp_path):
    """Checkpoints written before the switch to xxh3_64 record crc32: they verify, and damage is found."""
    import zlib

    from pe_jax.checkpoints.verify import content_hash_of

    ckpt = tmp_path / "crc32"
    shutil.copytree(ckpts["saved"], ckpt)
    table = json.loads((ckpt / "checksums.json").read_text())
    files = {rel: [size, f"{zlib.crc32((ckpt / rel).read_bytes()):08x}"] for rel, (size, _) in table["files"].items()}
    digest = content_hash_of(files)
    (ckpt / "checksums.json").write_text(json.dumps({"format": 1, "algorithm": "crc32", "content_hash": digest,
                                                     "files": files}))
    _edit_json(ckpt / "pe_jax.json", lambda m: m.update(content_hash=digest))
    report = verify(ckpt)
    assert report.ok and report.verified and report.content_hash == digest == content_hash(ckpt), report.summary()
    _flip(ckpt / CHUNK, 5)
    with pytest.raises(CheckpointIntegrityError, match=r"visual.conv1.kernel.*checksum mismatch: crc32"):
        pe_jax.load_model(ckpt)
    _edit_json(ckpt / "checksums.json", lambda t: t.update(algorithm="md4"))
    assert "not a table of xxh3_64 or crc32 checksums" in verify(ckpt).summary()


def test_content_hash_of_a_pytorch_file_is_the_sha256_of_its_bytes(ckpts):
    src = ckpts["dir"] / "original.safetensors"
    digest = content_hash(src)
    assert digest == "sha256:" + hashlib.sha256(src.read_bytes()).hexdigest()
    assert digest == "sha256:" + ckpts["meta"]["source_sha256"]


@pytest.mark.parametrize("which,flips", [("saved", 100), pytest.param("converted", 60, marks=pytest.mark.slow)])
def test_every_sampled_byte_flip_is_detected(ckpts, which, flips):
    """Half the positions uniform over all bytes of state/, half in a file chosen uniformly (so the small
    .zarray and _METADATA files are hit too); each flipped, verified, restored."""
    ckpt = ckpts[which]
    files = _state_files(ckpt)
    sizes = np.array([f.stat().st_size for f in files])
    rng = np.random.default_rng(len(which))
    picks = list(rng.choice(len(files), flips // 2, p=sizes / sizes.sum())) + list(rng.integers(0, len(files),
                                                                                                flips - flips // 2))
    hit = set()
    for i in picks:
        file = files[i]
        pos = int(rng.integers(0, sizes[i]))
        with open(file, "r+b") as f:
            f.seek(pos)
            old = f.read(1)
            f.seek(pos)
            f.write(bytes([old[0] ^ int(rng.integers(1, 256))]))
        try:
            report = verify(ckpt)
        finally:
            with open(file, "r+b") as f:
                f.seek(pos)
                f.write(old)
        rel = str(file.relative_to(ckpt))
        assert not report.ok and rel in [p.file for p in report.problems], (rel, pos, report.summary())
        hit.add(rel)
    assert len(hit) > len(files) // 3
    assert verify(ckpt).ok


def _flip(file: Path, pos: int = 0):
    data = bytearray(file.read_bytes())
    data[pos] ^= 0x40
    file.write_bytes(bytes(data))


def _edit_json(file: Path, edit):
    obj = json.loads(file.read_text())
    edit(obj)
    file.write_text(json.dumps(obj))


CHUNK = "state/visual.conv1.kernel/0.0.0.0"  # the patch embedding: one chunk
FAULTS = {
    "deleted chunk": (lambda c: (c / CHUNK).unlink(), "visual.conv1.kernel"),
    "empty chunk": (lambda c: (c / CHUNK).write_bytes(b""), "empty"),
    "truncated chunk": (lambda c: os.truncate(c / CHUNK, (c / CHUNK).stat().st_size - 3), "truncated"),
    "extended chunk": (lambda c: (c / CHUNK).open("ab").write(b"\0"), "extended"),
    "flipped byte": (lambda c: _flip(c / CHUNK, 77), "checksum mismatch"),
    "zarray shape": (lambda c: _edit_json(c / "state/visual.conv1.kernel/.zarray",
                                          lambda z: z.update(shape=[1, *z["shape"][1:]])), ".zarray"),
    "zarray dtype": (lambda c: _edit_json(c / "state/visual.conv1.kernel/.zarray",
                                          lambda z: z.update(dtype="<f2")), ".zarray"),
    "checksums.json not JSON": (lambda c: (c / "checksums.json").write_text('{"files": '), "checksums.json"),
    "checksums.json edited": (lambda c: _edit_json(c / "checksums.json",
                                                   lambda t: t["files"][CHUNK].__setitem__(1, "00000000")),
                              "checksums.json"),
    "no config": (lambda c: _edit_json(c / "pe_jax.json", lambda m: m.pop("config")), "no usable model config"),
    "unknown type": (lambda c: _edit_json(c / "pe_jax.json", lambda m: m["config"].update(type="Nope")), "'Nope'"),
}


def _cli_lines(capfd, argv) -> tuple[int, list[str]]:
    rc = main(argv)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "Event loop is closed" not in out + err, out + err
    return rc, err.strip().splitlines()


@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_fault_is_one_line_from_every_loading_command(ckpts, tmp_path, capfd, fault):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ckpts["saved"], ckpt)
    damage, says = FAULTS[fault]
    damage(ckpt)
    images = str(ckpts["dir"] / "images")
    for argv in (["embed", "--checkpoint", str(ckpt), "--input", images, "--output", str(tmp_path / "out"), "--quiet"],
                 ["eval", "zeroshot", "--checkpoint", str(ckpt), "--data", images, "--quiet"],
                 ["export", str(ckpt), str(tmp_path / "out.safetensors")]):
        rc, lines = _cli_lines(capfd, argv)
        assert rc == 2 and len(lines) == 1 and says in lines[0], (argv[0], lines)
        if fault not in ("no config", "unknown type", "checksums.json not JSON"):
            assert str(ckpt) in lines[0] and ("state/visual.conv1.kernel" in lines[0] or "checksums.json" in lines[0])
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "out").exists()
    if fault not in ("no config", "unknown type"):
        with pytest.raises(CheckpointIntegrityError, match="damaged"):
            pe_jax.load_model(ckpt)


def test_verify_command(ckpts, tmp_path, capfd):
    rc = main(["verify", str(ckpts["converted"])])
    out, _ = capfd.readouterr()
    assert rc == 0 and f"OK {ckpts['meta']['content_hash']}" in out
    rc = main(["verify", str(ckpts["dir"] / "original.safetensors")])
    out, _ = capfd.readouterr()
    assert rc == 0 and f"sha256:{ckpts['meta']['source_sha256']}" in out
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ckpts["saved"], ckpt)
    _flip(ckpt / CHUNK, 5)
    (ckpt / "state/text.ln_final.bias/0").unlink()
    rc = main(["verify", str(ckpt)])
    out, err = capfd.readouterr()
    assert rc == 2 and "FAILED, 2 problems" in err and CHUNK in err and "text.ln_final.bias" in err
    assert len(err.strip().splitlines()) == 3 and "Traceback" not in err  # the summary and one line each
    rc = main(["verify", str(tmp_path / "nothing")])
    assert rc == 2


def test_content_hash_is_reused_only_while_nothing_changed(ckpts, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ckpts["saved"], ckpt)
    pe_jax.load_model(ckpt)  # verifies
    digest = json.loads((ckpt / "pe_jax.json").read_text())["content_hash"]
    assert content_hash(ckpt) == digest
    _flip(ckpt / CHUNK, 9)
    with pytest.raises(CheckpointIntegrityError, match="checksum mismatch"):
        content_hash(ckpt)


def test_verify_needs_no_jax(ckpts):
    code = ("import sys; from pe_jax.cli import main; rc = main(['verify', sys.argv[1]]); "
            "assert rc == 0 and 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)")
    subprocess.run([sys.executable, "-c", code, str(ckpts["converted"])], check=True, capture_output=True)


@pytest.mark.slow
def test_verify_reads_only_even_when_killed(ckpts, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ckpts["converted"], ckpt)
    before = _snapshot(ckpt)
    assert verify(ckpt).ok and _snapshot(ckpt) == before
    for delay in (0.3, 0.8):
        proc = subprocess.Popen([sys.executable, "-m", "pe_jax.cli", "verify", str(ckpt)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _snapshot(ckpt) == before
    assert verify(ckpt).ok


def test_checkpoint_without_checksums_loads_with_a_warning(ckpts, tmp_path, caplog, tiny_clip):
    ckpt = tmp_path / "old"
    shutil.copytree(ckpts["saved"], ckpt)
    (ckpt / "checksums.json").unlink()
    _edit_json(ckpt / "pe_jax.json", lambda m: m.pop("content_hash"))
    with caplog.at_level(logging.WARNING, logger="pe_jax"):
        model = pe_jax.load_model(ckpt)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "pe_jax"]
    assert len(warnings) == 1 and "not verified" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    np.testing.assert_array_equal(np.asarray(model.logit_scale[...]), np.asarray(tiny_clip.logit_scale[...]))
    report = verify(ckpt)
    assert report.ok and not report.verified and report.content_hash == content_hash(ckpt)
    assert report.content_hash == json.loads((ckpts["saved"] / "pe_jax.json").read_text())["content_hash"]
    os.truncate(ckpt / CHUNK, 8)  # the structure is still checked: a clean error, not Orbax's
    with pytest.raises(CheckpointIntegrityError, match=r"visual.conv1.kernel.*truncated"):
        pe_jax.load_model(ckpt)


def test_verify_false_skips(ckpts, tmp_path, monkeypatch, capfd):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ckpts["saved"], ckpt)
    _flip(ckpt / "state/logit_scale/0", 3)  # a wrong value Orbax reads without complaint
    with pytest.raises(CheckpointIntegrityError, match=r"logit_scale, file state/logit_scale/0: checksum"):
        pe_jax.load_model(ckpt)
    assert pe_jax.load_model(ckpt, verify=False) is not None
    cfg = dict(vision_layers=1, text_layers=1, vision_image_size=32)
    with pytest.raises(CheckpointIntegrityError):
        pe_jax.CLIP.from_config(PRESET, checkpoint=ckpt, **cfg)
    pe_jax.CLIP.from_config(PRESET, checkpoint=ckpt, verify=False, **cfg)
    assert main(["export", str(ckpt), str(tmp_path / "a.safetensors")]) == 2
    assert main(["export", str(ckpt), str(tmp_path / "a.safetensors"), "--no-verify"]) == 0
    monkeypatch.setenv("PE_JAX_VERIFY", "0")
    assert pe_jax.load_model(ckpt) is not None
    capfd.readouterr()


def test_no_verify_also_spares_embed_the_hashing(ckpts, tmp_path, capfd):
    """--no-verify (or PE_JAX_VERIFY=0) did not stop `embed` from hashing the weights for its manifest and
    refusing a damaged checkpoint; now a load without verification names the weights by the hash checksums.json
    records, and nothing is hashed."""
    from PIL import Image

    from pe_jax.checkpoints.verify import content_hash

    ckpt = tmp_path / "ckpt"
    shutil.copytree(ckpts["saved"], ckpt)
    recorded = json.loads((ckpt / "checksums.json").read_text())["content_hash"]
    _flip(ckpt / "state/logit_scale/0", 3)
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "images" / "a.png")
    embed = ["embed", "--checkpoint", str(ckpt), "--input", str(tmp_path / "images"), "--quiet"]
    assert main([*embed, "--output", str(tmp_path / "verified")]) == 2
    assert "checksum" in capfd.readouterr().err
    assert main([*embed, "--output", str(tmp_path / "trusted"), "--no-verify"]) == 0, capfd.readouterr().err
    manifest = json.loads((tmp_path / "trusted" / "manifest.json").read_text())
    assert manifest["settings"]["weights"] == recorded == content_hash(ckpt)  # remembered, not hashed


def test_a_checkpoint_replaced_while_loading_is_refused(ckpts, tmp_path, monkeypatch):
    """A load racing a `convert --force` into the same path recorded one checkpoint's hash with the other's
    weights; now the files read must be the files verified (same sizes, times, inodes), else one error."""
    import pe_jax.checkpoints.orbax as orbax

    ckpt = tmp_path / "ckpt"
    shutil.copytree(ckpts["saved"], ckpt)
    real = orbax.checkpointer

    class Racing:
        def restore(self, *args, **kwargs):
            victim = ckpt / "state/logit_scale/0"
            shutil.copy(victim, tmp_path / "new")
            os.replace(tmp_path / "new", victim)  # the same bytes under a new inode: another writer's file
            return real().restore(*args, **kwargs)

    monkeypatch.setattr(orbax, "checkpointer", Racing)
    for checked in (True, False):
        with pytest.raises(CheckpointIntegrityError, match=f"^{ckpt} changed while it was being loaded"):
            pe_jax.load_model(ckpt, verify=checked)
    monkeypatch.setattr(orbax, "checkpointer", real)
    assert pe_jax.load_model(ckpt) is not None


def test_a_damaged_cached_copy_says_how_to_fetch_it_again(ckpts, tmp_path, monkeypatch):
    """A corrupted download in $PE_JAX_CACHE was never fetched again and nothing said why; the error says."""
    from pe_jax.checkpoints.verify import content_hash

    monkeypatch.setenv("PE_JAX_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "cache" / "0123abcd" / "ckpt"
    shutil.copytree(ckpts["saved"], copy)
    _flip(copy / "state/logit_scale/0", 3)
    with pytest.raises(CheckpointIntegrityError, match=f"delete {copy} \\(under \\$PE_JAX_CACHE\\) and it is fetched"):
        content_hash(copy)


def test_a_fifo_or_endless_checksums_file_is_refused_not_read(ckpts, tmp_path):
    """checksums.json as a FIFO hung verification; as /dev/zero it was read until MemoryError."""
    from pe_jax.checkpoints.verify import verify

    for name, make in (("fifo", os.mkfifo), ("zero", lambda p: os.symlink("/dev/zero", p))):
        ckpt = tmp_path / name
        shutil.copytree(ckpts["saved"], ckpt)
        (ckpt / "checksums.json").unlink()
        make(ckpt / "checksums.json")
        report = verify(ckpt)
        assert not report.ok and "checksums.json: unreadable" in str(report.problems[0]), report.problems
        assert ("FIFO" if name == "fifo" else "character device") in str(report.problems[0])


@pytest.fixture
def unblock_fifos(tmp_path):
    """Opens every FIFO under tmp_path for writing after 5 s, so a read that blocks on one ends (and the test fails)
    instead of hanging the suite."""
    import threading

    done = threading.Event()

    def unblock():
        if done.wait(5):
            return
        for fifo in (p for p in tmp_path.rglob("*") if p.is_fifo()):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # no reader there
                pass

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    yield
    done.set()
    thread.join()


def test_a_fifo_as_any_metadata_file_is_refused_not_opened(ckpts, tmp_path, unblock_fifos):
    """pe_jax.json, a `.zarray` (with verification off: Orbax opened it) and an embedding folder's manifest.json
    (read by build_index) and a tar shard as FIFOs blocked forever: each is refused in one line naming the file."""
    from pe_jax.data.sources import list_tar
    from pe_jax.embed.search import build_index
    from pe_jax.pretrained import load_model

    ckpt = tmp_path / "meta"
    shutil.copytree(ckpts["saved"], ckpt)
    (ckpt / "pe_jax.json").unlink()
    os.mkfifo(ckpt / "pe_jax.json")
    with pytest.raises(ValueError, match=r"pe_jax.json: is a FIFO \(named pipe\), not a regular file"):
        load_model(ckpt)

    ckpt = tmp_path / "zarray"
    shutil.copytree(ckpts["saved"], ckpt)
    zarray = next((ckpt / "state").rglob(".zarray"))
    zarray.unlink()
    os.mkfifo(zarray)
    with pytest.raises(CheckpointIntegrityError, match=r"\.zarray: is a FIFO \(named pipe\), not a regular file"):
        load_model(ckpt, verify=False)

    os.mkfifo(tmp_path / "000.tar")
    (item,) = list_tar(str(tmp_path / "000.tar"))  # the shard's failure row: the job goes on
    assert re.search(r"000.tar: is a FIFO \(named pipe\), not a regular file", item.error), item.error

    (tmp_path / "emb").mkdir()
    os.mkfifo(tmp_path / "emb" / "manifest.json")
    with pytest.raises(ValueError, match=r"manifest.json: is a FIFO \(named pipe\), not a regular file"):
        build_index(str(tmp_path / "emb"), str(tmp_path / "index"))
