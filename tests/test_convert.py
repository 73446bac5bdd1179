"""pe-jax convert / export: real files written by the PyTorch peers, round trips, and every bad input."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peers import compare, make_open_clip, make_timm, numpy_state_dict, run_torch
from safetensors.numpy import load_file, save_file

import pe_jax
from pe_jax.checkpoints.params import CheckpointMismatchError
from pe_jax.convert.convert import convert_checkpoint, export_checkpoint

PRESET = "PE-Core-T16-384"  # full size (69.5 M parameters), so the preset is inferred from real shapes


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoint files in every published format, with the peers that wrote them."""
    d = tmp_path_factory.mktemp("ckpts")
    clip = make_open_clip(PRESET, seed=3)
    oc = numpy_state_dict(clip)
    save_file(oc, str(d / "open_clip_model.safetensors"))
    timm_model = make_timm(PRESET, seed=4)
    save_file(numpy_state_dict(timm_model), str(d / "model.safetensors"))
    original = pe_jax.torch_state_dict(pe_jax.CLIP.from_config(PRESET, checkpoint=oc), "original")
    torch.save({"state_dict": {f"module.{k}": torch.from_numpy(v) for k, v in original.items()}}, d / "PE.pt")
    save_file(original, str(d / "original.safetensors"))
    return {"dir": d, "clip": clip, "timm": timm_model, "original": original, "open_clip": oc}


def _no_partials(folder: Path):
    return [p.name for p in folder.iterdir()
            if any(s in p.name for s in (".partial", ".old", ".kept", "-lock", ".pe_jax-tmp-", ".pe_jax-kept-"))]


def _image(size=384, seed=0):
    return np.random.default_rng(seed).standard_normal((1, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("source", ["open_clip_model.safetensors", "PE.pt", "original.safetensors"])
def test_clip_files_convert_and_match_the_peer(files, tmp_path, source):
    dst = tmp_path / "ckpt"
    hashed = source != "PE.pt"  # the source's sha256 is opt-in
    meta = convert_checkpoint(str(files["dir"] / source), str(dst), progress=False, source_sha256=hashed)
    assert meta["preset"] == PRESET and meta["dtype"] == "float32"
    written = json.loads((dst / "pe_jax.json").read_text())
    assert written["source_file"] == source
    assert written["source_bytes"] == (files["dir"] / source).stat().st_size
    assert written["source_sha256"] == (hashlib.sha256((files["dir"] / source).read_bytes()).hexdigest()
                                        if hashed else None)
    assert written["source_format"].endswith("open_clip" if "open_clip" in source else "original")
    model = pe_jax.CLIP.from_config(PRESET, checkpoint=dst)
    x = _image()
    with torch.inference_mode():
        theirs = files["clip"].encode_image(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    max_abs, rel = compare(model.encode_image(x), theirs)
    assert max_abs <= 1e-4 and rel <= 1e-5
    assert not _no_partials(tmp_path)


def test_timm_file_converts_to_a_vision_tower(files, tmp_path):
    dst = tmp_path / "vit"
    assert convert_checkpoint(str(files["dir"] / "model.safetensors"), str(dst), progress=False)["preset"] == PRESET
    meta = json.loads((dst / "pe_jax.json").read_text())
    assert meta["config"]["type"] == "VisionConfig"
    model = pe_jax.VisionTransformer.from_config(PRESET, checkpoint=dst)
    x = _image(seed=1)
    max_abs, rel = compare(model(x), run_torch(files["timm"], x))
    assert max_abs <= 1e-4 and rel <= 1e-5


@pytest.mark.parametrize("fmt", ["original", "timm", pytest.param("open_clip", marks=pytest.mark.slow)])
def test_round_trip_is_bit_exact(files, tmp_path, fmt):
    src = {"original": "original.safetensors", "timm": "model.safetensors",
           "open_clip": "open_clip_model.safetensors"}[fmt]
    convert_checkpoint(str(files["dir"] / src), str(tmp_path / "ckpt"), progress=False)
    export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "back.safetensors"), format=fmt)
    back, before = load_file(str(tmp_path / "back.safetensors")), load_file(str(files["dir"] / src))
    assert sorted(back) == sorted(before)
    for k in before:
        assert back[k].dtype == before[k].dtype and back[k].shape == before[k].shape, k
        np.testing.assert_array_equal(back[k], before[k], err_msg=k)


def test_bfloat16_conversion(files, tmp_path):
    convert_checkpoint(str(files["dir"] / "model.safetensors"), str(tmp_path / "bf16"), dtype="bfloat16",
                       progress=False)
    model = pe_jax.VisionTransformer.from_config(PRESET, checkpoint=tmp_path / "bf16", param_dtype="bfloat16")
    assert model.conv1.kernel.dtype == np.dtype("bfloat16")
    x = _image(seed=2)
    _, rel = compare(np.asarray(model(x), np.float32), run_torch(files["timm"], x))
    assert rel < 2e-2


@pytest.mark.parametrize("fmt,half", [("original", "bfloat16"), ("timm", "bfloat16"), ("timm", "float16"),
                                      pytest.param("open_clip", "bfloat16", marks=pytest.mark.slow)])
def test_half_files_convert_in_float32_and_bfloat16_and_back(files, tmp_path, fmt, half):
    """A bf16 (PerceptionLM's dtype) or fp16 file converts without --dtype; export writes it back bit for bit."""
    import ml_dtypes

    src = {"original": "original.safetensors", "timm": "model.safetensors",
           "open_clip": "open_clip_model.safetensors"}[fmt]
    half = np.dtype(ml_dtypes.bfloat16 if half == "bfloat16" else half)
    bf16 = {k: v.astype(half) for k, v in load_file(str(files["dir"] / src)).items()}  # bf16 or fp16
    save_file(bf16, str(tmp_path / "bf16.safetensors"))
    for dtype in ("float32", "bfloat16") if half.name == "bfloat16" else ("float32",):  # fp16 -> bf16 rounds
        meta = convert_checkpoint(str(tmp_path / "bf16.safetensors"), str(tmp_path / dtype), dtype=dtype,
                                  progress=False)
        assert meta["preset"] == PRESET and meta["dtype"] == dtype
        for out_dtype, want in ((half.name, half), (None, np.dtype(dtype))):
            out = tmp_path / f"{dtype}-{out_dtype}.safetensors"
            export_checkpoint(str(tmp_path / dtype), str(out), format=fmt, dtype=out_dtype)
            back = load_file(str(out))
            assert sorted(back) == sorted(bf16)
            for k, v in bf16.items():
                # by default, the checkpoint's dtype (pe_jax keeps the 0-d logit_scale in float32)
                assert back[k].dtype == (np.float32 if k == "logit_scale" and not out_dtype else want), k
                np.testing.assert_array_equal(back[k].astype(np.float32), v.astype(np.float32), err_msg=k)


@pytest.mark.parametrize("source,dtype", [("original.safetensors", "float32"), ("model.safetensors", "bfloat16")])
def test_files_are_what_orbax_writes(files, tmp_path, source, dtype):
    """The converter writes zarr chunks itself; they and the metadata must be Orbax's own bytes."""
    from pe_jax.checkpoints.orbax import restore_params, write_state
    from pe_jax.checkpoints.params import flat_params
    from pe_jax.pretrained import model_from_metadata

    meta = convert_checkpoint(str(files["dir"] / source), str(tmp_path / "ckpt"), dtype=dtype, progress=False)
    params = flat_params(restore_params(model_from_metadata(meta), tmp_path / "ckpt"))
    write_state(tmp_path / "orbax", {p: np.asarray(a) for p, a in params.items()})
    ours, theirs = tmp_path / "ckpt" / "state", tmp_path / "orbax"
    names = sorted(str(f.relative_to(theirs)) for f in theirs.rglob("*") if f.is_file())
    assert names == sorted(str(f.relative_to(ours)) for f in ours.rglob("*") if f.is_file())
    assert any(n.endswith("token_embedding/1.0") for n in names) == (source == "original.safetensors")
    for name in names:
        a, b = (ours / name).read_bytes(), (theirs / name).read_bytes()
        if name == "_CHECKPOINT_METADATA":  # timestamps differ
            a, b = ({k: v for k, v in json.loads(x).items() if "timestamp" not in k} for x in (a, b))
        elif name == "commit_success.txt":  # names the directory written
            a, b = a.rsplit(b" to ", 1)[0], b.rsplit(b" to ", 1)[0]
        assert a == b, name


def test_chunk_shape_is_orbax_choice():
    from flax import nnx
    from orbax.checkpoint._src.arrays.subchunking import choose_chunk_shape

    from pe_jax.checkpoints.orbax import CHUNK_BYTES, chunk_shape
    from pe_jax.checkpoints.params import param_shapes

    big = nnx.eval_shape(lambda: pe_jax.CLIP(pe_jax.clip_config("PE-Core-G14-448"), rngs=nnx.Rngs(0)))
    shapes = [s.shape for s in param_shapes(big).values()] + [(), (7,), (49408, 1280), (50, 8191, 3), (1 << 25,)]
    for shape in shapes:
        for dtype in (np.dtype(np.float32), np.dtype(jnp.bfloat16)):
            assert chunk_shape(shape, dtype) == tuple(choose_chunk_shape(shape, shape, dtype, CHUNK_BYTES)), shape


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_blocked_transposed_copy_is_exact(dtype):
    from pe_jax.convert.convert import STAGE_ROWS, _copy

    torch_weight = np.random.default_rng(0).standard_normal((STAGE_ROWS + 77, 3 * 45), dtype=np.float32)
    piece = torch_weight.T.reshape(135, 1, STAGE_ROWS + 77)[5:, :, 3:]  # a transposed view, odd sizes
    out = np.zeros((2, 130, 1, STAGE_ROWS + 74), dtype)
    _copy(out[1], piece)
    np.testing.assert_array_equal(out[1], piece.astype(dtype))
    assert not out[0].any()


def test_sharded_safetensors_index(files, tmp_path):
    sd = files["open_clip"]
    keys = sorted(sd)
    half = len(keys) // 2
    save_file({k: sd[k] for k in keys[:half]}, str(tmp_path / "a.safetensors"))
    save_file({k: sd[k] for k in keys[half:]}, str(tmp_path / "b.safetensors"))
    index = {"weight_map": {k: ("a.safetensors" if i < half else "b.safetensors") for i, k in enumerate(keys)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    meta = convert_checkpoint(str(tmp_path / "model.safetensors.index.json"), str(tmp_path / "ckpt"), progress=False)
    assert meta["preset"] == PRESET and "sharded" in meta["source_format"]


def test_hf_reference_uses_the_hub_download(files, tmp_path, monkeypatch):
    import huggingface_hub
    asked = []

    def fake_download(repo_id, filename, **kwargs):  # never the network in tests
        asked.append((repo_id, filename))
        if filename != "model.safetensors":
            raise FileNotFoundError(filename)
        return str(files["dir"] / "model.safetensors")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    meta = convert_checkpoint("hf://timm/vit_pe_core_tiny_patch16_384.fb", str(tmp_path / "ckpt"), progress=False)
    assert meta["preset"] == PRESET and meta["source"].startswith("hf://")
    assert asked == [("timm/vit_pe_core_tiny_patch16_384.fb", "open_clip_model.safetensors"),
                     ("timm/vit_pe_core_tiny_patch16_384.fb", "model.safetensors")]


# -------------------------------------------------------------------------------------------- bad inputs


def _cli(*args, cwd, timeout=None):
    return subprocess.run([sys.executable, "-m", "pe_jax.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_cli_runs_from_any_directory_and_refuses_existing_dst(files, tmp_path):
    src = str(files["dir"] / "model.safetensors")
    ok = _cli("convert", src, "out", "--quiet", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "PE-Core-T16-384" in ok.stdout and (tmp_path / "out" / "pe_jax.json").exists()
    again = _cli("convert", src, "out", cwd=tmp_path)
    assert again.returncode == 2 and "exists; pass --force" in again.stderr and "Traceback" not in again.stderr
    forced = _cli("convert", src, "out", "--force", "--quiet", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    exported = _cli("export", "out", "timm.safetensors", "--format", "timm", cwd=tmp_path)
    assert exported.returncode == 0 and (tmp_path / "timm.safetensors").exists()
    assert not _no_partials(tmp_path)


def test_conversion_runs_without_jax(files, tmp_path):
    """Conversion plans from the preset shape table and writes Orbax's files itself: importing jax and flax
    would cost it ~1.5 s (half an L/14 conversion), ml_dtypes (needed for bfloat16 only) ~1 s."""
    code = ("import sys; from pe_jax.convert.convert import convert_checkpoint; "
            f"convert_checkpoint({str(files['dir'] / 'PE.pt')!r}, {str(tmp_path / 'out')!r}, progress=False); "
            "print(sorted(m for m in ('jax', 'flax', 'orbax', 'torch', 'ml_dtypes') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert pe_jax.load_model(str(tmp_path / "out")).config == pe_jax.clip_config(PRESET)


def test_preset_shape_table_is_what_the_models_build(tmp_path):
    from pe_jax.convert.convert import PRESET_SHAPES, write_preset_shapes

    write_preset_shapes(str(tmp_path / "shapes.json"))
    fresh, shipped = json.loads((tmp_path / "shapes.json").read_text()), json.loads(Path(PRESET_SHAPES).read_text())
    assert set(fresh["clip"]) == set(pe_jax.available_configs("clip"))
    assert fresh == shipped, "stale: python -c 'from pe_jax.convert.convert import write_preset_shapes as w; w()'"


def test_cli_help_lists_subcommands(tmp_path):
    out = _cli("--help", cwd=tmp_path)
    assert out.returncode == 0 and "convert" in out.stdout and "export" in out.stdout


def _expect_failure(tmp_path, src, match, **kwargs):
    with pytest.raises((ValueError, OSError)) as info:
        convert_checkpoint(str(src), str(tmp_path / "dst"), progress=False, **kwargs)
    assert match in str(info.value), str(info.value)
    assert not (tmp_path / "dst").exists() and not _no_partials(tmp_path)
    return str(info.value)


def test_truncated_safetensors(files, tmp_path):
    data = (files["dir"] / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    _expect_failure(tmp_path, tmp_path / "cut.safetensors", "not a readable safetensors file")


def test_header_that_lies_about_sizes(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}}).encode()
    (tmp_path / "lie.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    _expect_failure(tmp_path, tmp_path / "lie.safetensors", "not a readable safetensors file")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    _expect_failure(tmp_path, tmp_path / "notes.txt", "not a checkpoint")
    save_file({"foo.weight": np.zeros(3, np.float32)}, str(tmp_path / "other.safetensors"))
    _expect_failure(tmp_path, tmp_path / "other.safetensors", "not a Perception Encoder state dict")
    _expect_failure(tmp_path, tmp_path / "missing.safetensors", "checkpoint not found")


def test_missing_extra_and_mismatched_keys_are_listed(files, tmp_path):
    sd = dict(load_file(str(files["dir"] / "model.safetensors")))
    del sd["blocks.3.mlp.fc1.bias"]
    sd["blocks.3.extra"] = np.zeros(2, np.float32)
    sd["norm.weight"] = np.zeros(7, np.float32)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    msg = _expect_failure(tmp_path, tmp_path / "bad.safetensors", "missing keys (1)", model=PRESET)
    assert "blocks.3.mlp.fc1.bias" in msg and "unexpected keys (1)" in msg and "blocks.3.extra" in msg
    assert "norm.weight: expected shape (192,), got (7,)" in msg
    # without --model no preset fits, and the closest one is named with its differences
    _expect_failure(tmp_path, tmp_path / "bad.safetensors", "no vision preset matches these tensor shapes")


def test_wrong_model_names_the_shapes(files, tmp_path):
    msg = _expect_failure(tmp_path, files["dir"] / "model.safetensors", "does not fit --model PE-Core-B16-224",
                          model="PE-Core-B16-224")
    assert "patch_embed.proj.weight: expected shape (768, 3, 16, 16), got (192, 3, 16, 16)" in msg
    _expect_failure(tmp_path, files["dir"] / "model.safetensors", "is not a vision preset", model="PE-Core-X")


def test_unwritable_destination(files, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    # root ignores permission bits; /proc refuses new entries to everyone
    target = locked if not os.access(locked, os.W_OK) else Path("/proc")
    try:
        with pytest.raises(PermissionError, match=f"cannot write to {target}"):
            convert_checkpoint(str(files["dir"] / "model.safetensors"), str(target / "dst"), progress=False)
    finally:
        locked.chmod(0o700)
    with pytest.raises(FileNotFoundError, match="output folder"):
        convert_checkpoint(str(files["dir"] / "model.safetensors"), str(tmp_path / "no" / "dst"), progress=False)


@pytest.mark.parametrize("where", ["write_state_chunks", "_copy"])  # before writing, or mid-write on a thread
def test_interrupt_leaves_no_partial_output(files, tmp_path, monkeypatch, where):
    import pe_jax.convert.convert as conv

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, where, interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(str(files["dir"] / "model.safetensors"), str(tmp_path / "dst"), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_for_another_preset_is_refused(files, tmp_path):
    convert_checkpoint(str(files["dir"] / "model.safetensors"), str(tmp_path / "vit"), progress=False)
    with pytest.raises(CheckpointMismatchError, match="conv1.kernel: model expects"):
        pe_jax.VisionTransformer.from_config("PE-Core-S16-384", checkpoint=tmp_path / "vit")


def _index(folder: Path, weight_map) -> Path:
    path = folder / "model.safetensors.index.json"
    path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.mark.parametrize("weight_map", [["a.safetensors"], None, {"w": 3}, {"w": ["a.safetensors"]}, "a", {}])
def test_index_without_a_weight_map_of_names(tmp_path, weight_map):
    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "a.safetensors"))
    index = _index(tmp_path, weight_map)
    if weight_map is None:  # no weight_map at all
        index.write_text(json.dumps({"metadata": {}}))
    msg = _expect_failure(tmp_path, index, "weight_map")
    assert str(index) in msg and "\n" not in msg


@pytest.mark.parametrize("body", ["[1, 2]", "{not json", "\"weight_map\""])
def test_index_that_is_not_a_json_object(tmp_path, body):
    (tmp_path / "model.safetensors.index.json").write_text(body)
    _expect_failure(tmp_path, tmp_path / "model.safetensors.index.json", "not a safetensors index")


def test_index_errors_are_one_line_from_the_cli(tmp_path):
    index = _index(tmp_path, ["a.safetensors", "b.safetensors"])
    out = _cli("convert", str(index), "out", cwd=tmp_path, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1 and str(index) in out.stderr and "weight_map" in out.stderr


@pytest.mark.parametrize("name", ["../../etc/shadow", "/etc/shadow", "sub/../../outside.safetensors",
                                  "../outside.safetensors"])
def test_index_naming_a_shard_outside_its_folder(tmp_path, monkeypatch, name):
    import pe_jax.checkpoints.readers as readers

    folder = tmp_path / "repo"
    folder.mkdir()
    save_file({"w": np.zeros(2, np.float32)}, str(folder / "a.safetensors"))
    save_file({"v": np.zeros(2, np.float32)}, str(tmp_path / "outside.safetensors"))
    opened = []
    monkeypatch.setattr(readers, "SafetensorsDict", lambda path: opened.append(path))
    index = _index(folder, {"w": "a.safetensors", "v": name})
    msg = _expect_failure(tmp_path, index, "outside the index's folder")
    assert str(index) in msg and name in msg
    assert opened == []  # refused before any shard is opened


def test_index_shards_in_a_subfolder_are_allowed(files, tmp_path):
    (tmp_path / "shards").mkdir()
    save_file(files["open_clip"], str(tmp_path / "shards" / "all.safetensors"))
    index = _index(tmp_path, dict.fromkeys(files["open_clip"], "./shards/all.safetensors"))
    assert convert_checkpoint(str(index), str(tmp_path / "ckpt"), progress=False)["preset"] == PRESET


def test_index_shards_linked_from_the_hub_cache_are_allowed(tmp_path):
    """The names are checked, not where they resolve: the Hugging Face cache links shards to ../../blobs/."""
    from pe_jax.checkpoints.readers import open_state_dict

    snapshot, blobs = tmp_path / "snapshots" / "abc", tmp_path / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    save_file({"w": np.arange(3, dtype=np.float32)}, str(blobs / "0123"))
    (snapshot / "a.safetensors").symlink_to("../../blobs/0123")
    sd = open_state_dict(_index(snapshot, {"w": "a.safetensors"}))
    np.testing.assert_array_equal(sd["w"], np.arange(3, dtype=np.float32))


@pytest.mark.parametrize("kind", ["fifo", "dev_urandom", "fifo_shard", "fifo_pt"])
def test_sources_that_are_not_regular_files_are_refused_at_once(tmp_path, kind):
    """Reading a FIFO blocks forever and a device never ends: both are refused before they are opened. The CLI
    runs in a subprocess with a timeout so a regression fails rather than hangs the suite."""
    if kind == "dev_urandom":
        src = "/dev/urandom"
    elif kind == "fifo_shard":
        save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "a.safetensors"))
        os.mkfifo(tmp_path / "b.safetensors")
        src = str(_index(tmp_path, {"w": "a.safetensors", "v": "b.safetensors"}))
    else:
        src = str(tmp_path / ("model.safetensors" if kind == "fifo" else "model.pt"))
        os.mkfifo(src)
    out = _cli("convert", src, "out", cwd=tmp_path, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1 and "not a regular file" in out.stderr, out.stderr
    assert ("b.safetensors" if kind == "fifo_shard" else src) in out.stderr
    assert not (tmp_path / "out").exists()


def test_directories_are_refused(tmp_path):
    (tmp_path / "folder").mkdir()
    _expect_failure(tmp_path, tmp_path / "folder", "is a directory")
    with pytest.raises(ValueError, match="is a directory"):  # loading: a folder without pe_jax.json
        pe_jax.VisionTransformer.from_config(PRESET, checkpoint=tmp_path / "folder")
    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "a.safetensors"))
    (tmp_path / "sub.safetensors").mkdir()
    index = _index(tmp_path, {"w": "a.safetensors", "v": "sub.safetensors"})
    assert "sub.safetensors" in _expect_failure(tmp_path, index, "is a directory")


# ------------------------------------------------- outputs: what --force may replace, races, killed runs


def _main(capsys, *args):
    """pe_jax.cli.main in-process: (return code, stderr); an error must be one line, never a traceback."""
    from pe_jax.cli import main

    rc = main(list(args))
    err = capsys.readouterr().err
    if rc:
        assert rc == 2 and "Traceback" not in err and err.count("\n") == 1, err
    return rc, err


def _tree(path: Path) -> dict:
    """What a path holds, to compare before and after: {relative name: bytes or None for a folder}."""
    if not path.is_dir() or path.is_symlink():
        return {".": os.readlink(path) if path.is_symlink() else path.read_bytes()}
    return {str(p.relative_to(path)): None if p.is_dir() else p.read_bytes() for p in sorted(path.rglob("*"))}


def _make(path: Path, kind: str):
    if kind == "project":
        path.mkdir()
        (path / "notes.txt").write_text("mine")
        (path / "src").mkdir()
        (path / "src" / "main.py").write_text("print(1)")
    elif kind == "file":
        path.write_text("important")
    elif kind == "empty":
        path.mkdir()
    elif kind == "checkpoint_and_notes":  # a checkpoint with something of the user's in it
        for name in ("state", "pe_jax.json", "notes.txt"):
            (path / name).mkdir(parents=True) if name == "state" else (path / name).write_text("{}")
    elif kind == "symlink":
        (path.parent / "elsewhere").mkdir()
        path.symlink_to(path.parent / "elsewhere")


@pytest.mark.parametrize("dst", ["", "  "])
def test_empty_output_path_is_an_error(files, tmp_path, monkeypatch, capsys, dst):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine")
    rc, err = _main(capsys, "convert", str(files["dir"] / "model.safetensors"), dst, "--force", "--quiet")
    assert rc == 2 and "empty" in err and "unset shell variable" in err
    rc, err = _main(capsys, "export", str(tmp_path), dst, "--force")
    assert rc == 2 and "empty" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("kind", ["project", "file", "checkpoint_and_notes", "symlink"])
@pytest.mark.parametrize("force", [False, True])
def test_force_never_replaces_what_conversion_did_not_write(files, tmp_path, capsys, kind, force):
    dst = tmp_path / "dst"
    _make(dst, kind)
    before = _tree(dst)
    rc, err = _main(capsys, "convert", str(files["dir"] / "model.safetensors"), str(dst), "--quiet",
                    *(["--force"] if force else []))
    assert rc == 2 and str(dst) in err and "--force replaces only an empty directory or a pe_jax checkpoint" in err
    if kind in ("project", "checkpoint_and_notes"):  # what would have been deleted is named
        assert "notes.txt" in err
    assert _tree(dst) == before and not _no_partials(tmp_path)


def test_force_replaces_an_empty_directory_or_a_checkpoint(files, tmp_path, capsys):
    from pe_jax.checkpoints.verify import CHECKSUMS_FILE
    from pe_jax.convert.outputs import CHECKPOINT_EXTRAS

    assert CHECKPOINT_EXTRAS == {CHECKSUMS_FILE}  # what pe_jax itself writes beside pe_jax.json and state/
    src, dst = str(files["dir"] / "model.safetensors"), tmp_path / "dst"
    dst.mkdir()
    rc, err = _main(capsys, "convert", src, str(dst), "--quiet")
    assert rc == 2 and "exists; pass --force" in err
    assert _main(capsys, "convert", src, str(dst), "--quiet", "--force")[0] == 0
    assert _main(capsys, "convert", src, str(dst), "--quiet", "--force")[0] == 0  # its own output: replaced
    assert {p.name for p in dst.iterdir()} == {"pe_jax.json", "state", CHECKSUMS_FILE}
    assert not _no_partials(tmp_path)


def test_force_replaces_a_checkpoint_only_as_its_checksums_record_it(files, tmp_path, capsys):
    """Names prove nothing: a checkpoint with a user's file in state/, a pe_jax.json of `{}`, a checksums.json
    that is not pe_jax's, or none at all is refused in one line naming what does not fit, and left as it is."""
    import shutil

    from pe_jax.checkpoints.verify import CHECKSUMS_FILE

    src, good = str(files["dir"] / "model.safetensors"), tmp_path / "good"
    assert _main(capsys, "convert", src, str(good), "--quiet")[0] == 0
    param = sorted(p for p in (good / "state").iterdir() if p.is_dir())[0]
    faults = {"user file in state": (lambda d: (d / "state" / "my-notes.txt").write_text("mine"),
                                     "holding state/my-notes.txt, which its checksums.json does not list"),
              "metadata {}": (lambda d: (d / "pe_jax.json").write_text("{}"), "pe_jax.json does not name the content"),
              "checksums {}": (lambda d: (d / CHECKSUMS_FILE).write_text("{}"), "checksums.json: corrupt"),
              "no checksums": (lambda d: (d / CHECKSUMS_FILE).unlink(), "no checksums.json"),
              "chunk removed": (lambda d: shutil.rmtree(d / "state" / param.name), "is missing")}
    for name, (damage, message) in faults.items():
        dst = tmp_path / name.replace(" ", "-")
        shutil.copytree(good, dst)
        damage(dst)
        before = _tree(dst)
        rc, err = _main(capsys, "convert", src, str(dst), "--quiet", "--force")
        assert rc == 2 and message in err and str(dst) in err, (name, err)
        assert _tree(dst) == before, name
    assert not _no_partials(tmp_path)


def test_the_output_lock_is_never_written_through_a_link(files, tmp_path, capsys):
    target = tmp_path / "precious.txt"
    target.write_text("the user's file")
    os.symlink(target, tmp_path / ".dst.pe_jax-lock")
    rc, err = _main(capsys, "convert", str(files["dir"] / "model.safetensors"), str(tmp_path / "dst"), "--quiet")
    assert rc == 2 and f"cannot use the lock file {tmp_path / '.dst.pe_jax-lock'}: it is a symbolic link" in err
    assert target.read_text() == "the user's file" and not (tmp_path / "dst").exists()


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_clip, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    pe_jax.save(tiny_clip, path)
    return path


@pytest.mark.parametrize("kind", ["project", "file", "empty", "symlink"])
def test_export_force_replaces_only_a_safetensors_file(tmp_path, capsys, kind):
    out = tmp_path / "out.safetensors"
    _make(out, kind)
    before = _tree(out)
    ckpt = tmp_path / "ckpt"  # passes the command line's early check; the output is refused before it is read
    ckpt.mkdir()
    (ckpt / "pe_jax.json").write_text("{}")
    rc, err = _main(capsys, "export", str(ckpt), str(out), "--force")
    assert rc == 2 and str(out) in err and "--force replaces only a safetensors file" in err, err
    assert _tree(out) == before and not _no_partials(tmp_path)


def test_export_replaces_a_safetensors_file_with_force(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(out))
    rc, err = _main(capsys, "export", str(tiny_ckpt), str(out))
    assert rc == 2 and "exists; pass --force" in err
    assert _main(capsys, "export", str(tiny_ckpt), str(out), "--force")[0] == 0
    assert "visual.conv1.weight" in load_file(str(out)) and not _no_partials(tmp_path)


def test_export_onto_a_full_disk(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """The Rust writer raises SafetensorError ("... (os error 28)"), not OSError: one line, no partial file, and a
    file being replaced with --force stays as it was."""
    import safetensors.numpy
    from safetensors import SafetensorError

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 1000)  # what got written before the disk filled
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
    old = tmp_path / "old.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(old))
    before = old.read_bytes()
    for out, extra in ((tmp_path / "new.safetensors", []), (old, ["--force"])):
        rc, err = _main(capsys, "export", str(tiny_ckpt), str(out), *extra)
        assert rc == 2 and f"cannot write {out}: No space left on device" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.safetensors"] and old.read_bytes() == before


@pytest.mark.parametrize("force", [False, True])
def test_export_output_created_meanwhile_is_not_replaced(tiny_ckpt, tmp_path, monkeypatch, capsys, force):
    import safetensors.numpy

    out, real = tmp_path / "out.safetensors", safetensors.numpy.save_file

    def slow_save(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        out.write_text("written by someone else meanwhile")

    monkeypatch.setattr(safetensors.numpy, "save_file", slow_save)
    rc, err = _main(capsys, "export", str(tiny_ckpt), str(out), *(["--force"] if force else []))
    assert rc == 2 and str(out) in err and ("not a safetensors file" in err), err
    assert out.read_text() == "written by someone else meanwhile" and not _no_partials(tmp_path)


@pytest.mark.parametrize("renameat2", [True, False])  # False: the portable fallback (no renameat2 flags)
@pytest.mark.parametrize("kind,force,ok", [("empty", False, False), ("project", False, False), ("file", False, False),
                                           ("empty", True, True), ("project", True, False), ("file", True, False)])
def test_dst_created_during_the_conversion(files, tmp_path, monkeypatch, capsys, renameat2, kind, force, ok):
    """DST is checked again at the final rename, which cannot clobber what appeared meanwhile."""
    import pe_jax.convert.convert as conv
    import pe_jax.storage.atomic as atomic

    dst, real = tmp_path / "dst", conv.write_state_chunks
    if not renameat2:
        monkeypatch.setattr(atomic, "renameat2", lambda src, dst, flags: False)

    def then_someone_creates_dst(*args, **kwargs):
        written = real(*args, **kwargs)
        _make(dst, kind)
        return written

    monkeypatch.setattr(conv, "write_state_chunks", then_someone_creates_dst)
    rc, err = _main(capsys, "convert", str(files["dir"] / "model.safetensors"), str(dst), "--quiet",
                    *(["--force"] if force else []))
    if ok:
        assert rc == 0 and (dst / "pe_jax.json").is_file()
    else:
        assert rc == 2 and str(dst) in err and ("created while writing" in err or "is now" in err), err
        _make(tmp_path / "expected", kind)
        assert _tree(dst) == _tree(tmp_path / "expected")
    assert not _no_partials(tmp_path)


def test_a_locked_dst_is_refused_naming_the_holder(files, tmp_path, capsys):
    from pe_jax.convert.outputs import locked

    with locked(str(tmp_path / "dst")):
        rc, err = _main(capsys, "convert", str(files["dir"] / "model.safetensors"), str(tmp_path / "dst"), "--quiet")
    assert rc == 2 and f"(pid {os.getpid()}) is writing {tmp_path / 'dst'}" in err
    assert not (tmp_path / "dst").exists() and not _no_partials(tmp_path)


_SLOW_CONVERT = ("import sys, time; import pe_jax.convert.convert as c; w = c.write_state_chunks; "
                 "c.write_state_chunks = lambda *a, **k: (w(*a, **k), time.sleep({sleep}))[0]; "
                 "from pe_jax.cli import main; sys.exit(main(sys.argv[1:]))")


@pytest.mark.slow
def test_two_conversions_into_one_dst_one_wins(files, tmp_path):
    args = ["convert", str(files["dir"] / "model.safetensors"), "dst", "--quiet"]
    procs = [subprocess.Popen([sys.executable, "-c", _SLOW_CONVERT.format(sleep=1), *args], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((p.wait(timeout=120), p.stderr.read()) for p in procs)
    assert [rc for rc, _ in results] == [0, 2], results
    err = results[1][1]
    assert err.count("\n") == 1 and "Traceback" not in err and ("is writing" in err or "exists" in err), err
    assert (tmp_path / "dst" / "pe_jax.json").is_file() and not _no_partials(tmp_path)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_stale_partial_outputs_are_swept(files, tmp_path, capsys):
    """Partial outputs of runs that died are removed by the next run into the same folder; a live run's stay."""
    import socket

    dead, host = _dead_pid(), socket.gethostname()
    stale = [tmp_path / f"dst.pe_jax-tmp-{dead}-abcd1234@{host}", tmp_path / f"other.pe_jax-tmp-{dead}-0a1b2c3d@{host}",
             tmp_path / f"back.safetensors.pe_jax-tmp-{dead}-00000000@{host}"]
    for path in stale[:2]:
        (path / "state").mkdir(parents=True)
    stale[2].write_bytes(b"\0" * 100)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f"live.pe_jax-tmp-{sleeper.pid}-abcd1234@{host}"
        elsewhere = tmp_path / f"far.pe_jax-tmp-{dead}-abcd1234@another-host"  # another machine's: never touched
        elsewhere.mkdir()
        mine = tmp_path / ".notes.partial"  # not named like ours: never touched
        live.mkdir()
        mine.write_text("mine")
        rc, _ = _main(capsys, "convert", str(files["dir"] / "model.safetensors"), str(tmp_path / "dst"), "--quiet")
        assert rc == 0
        assert not any(p.exists() for p in stale) and live.is_dir() and elsewhere.is_dir()
        assert mine.read_text() == "mine"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".notes.partial", live.name, elsewhere.name, "dst"])


@pytest.mark.slow
def test_a_killed_conversion_is_swept_by_the_next(files, tmp_path, capsys):
    args = ["convert", str(files["dir"] / "model.safetensors"), "dst", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CONVERT.format(sleep=60), *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):  # until its staging folder holds the written state
            partial = [p for p in tmp_path.glob("dst.pe_jax-tmp-*") if (p / "state" / "_METADATA").exists()]
            if partial or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert partial, "the conversion never got to write its state"
    finally:
        proc.kill()  # SIGKILL: nothing of its own cleans up
        proc.wait()
    assert partial[0].is_dir()
    assert _main(capsys, "convert", str(files["dir"] / "model.safetensors"), str(tmp_path / "dst"), "--quiet")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_export_of_a_classification_finetune_carries_its_classifier(tiny_clip, tmp_path, capsys, caplog):
    """The trained classifier (head.npz) was silently dropped on export (and timm's head.* is the CLIP
    projection, so it cannot go there): now it is written beside in torch's Linear keys, said in one line."""
    from safetensors import safe_open

    ckpt = tmp_path / "model"
    pe_jax.save(tiny_clip.visual, ckpt)
    rng = np.random.default_rng(0)
    dim = tiny_clip.visual.config.output_dim
    head = {"hidden.kernel": rng.normal(size=(dim, dim)).astype(np.float32), "hidden.bias": rng.normal(size=dim),
            "out.kernel": rng.normal(size=(dim, 3)).astype(np.float32), "out.bias": rng.normal(size=3)}
    np.savez(ckpt / "head.npz", **head)
    (ckpt / "classes.json").write_text(json.dumps({"classnames": ["red", "green", "blue"], "head": "mlp",
                                                   "layer_idx": None, "pooling": "attn"}))
    rc, err = _main(capsys, "export", str(ckpt), str(tmp_path / "tower.safetensors"), "--format", "timm")
    said = [r.getMessage() for r in caplog.records if "trained classifier" in r.getMessage()]
    assert rc == 0 and len(said) == 1 and "(mlp head, 3 classes)" in said[0], (err, said)
    assert "\n" not in said[0] and said[0].endswith("class names, layer and pooling in its metadata)")
    side = load_file(tmp_path / "tower.classifier.safetensors")
    np.testing.assert_array_equal(side["2.weight"], head["out.kernel"].T)
    np.testing.assert_array_equal(side["0.bias"], head["hidden.bias"])
    assert sorted(side) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    with safe_open(tmp_path / "tower.classifier.safetensors", "np") as f:
        assert json.loads(f.metadata()["classnames"]) == ["red", "green", "blue"]


def _tiny_timm_tower(seed: int = 0) -> dict:
    """A one-block T16 vision tower in timm naming, built from the preset shape table (no model, no jax)."""
    from pe_jax.checkpoints.naming import slot_shape, slots
    from pe_jax.config import vision_config
    from pe_jax.convert.convert import preset_shapes

    table = preset_shapes("vision", PRESET)
    shapes = {p: ((1, *s.shape[1:]) if "resblocks" in p else s.shape) for p, s in table.items()}
    rng, out = np.random.default_rng(seed), {}
    for s in slots(vision_config(PRESET, layers=1), "timm", shapes):
        a = (0.02 * rng.standard_normal(slot_shape(shapes[s.path], s.index))).astype(np.float32)
        out[s.torch_key] = np.ascontiguousarray(s.transform.to_torch(a))
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_non_finite_weights_are_refused_unless_allowed(tmp_path, capsys, caplog, dtype):
    """NaN/Inf weights converted, verified and loaded with no word: conversion refuses them in one line naming
    the tensors (nothing written); --allow-non-finite converts them, recorded in pe_jax.json, and then
    `pe-jax verify` names them and every load warns."""
    import logging

    from pe_jax.checkpoints.orbax import warn_non_finite
    from pe_jax.checkpoints.verify import verify
    from pe_jax.pretrained import resolve_model

    sd = _tiny_timm_tower()
    sd["blocks.0.mlp.fc1.weight"][3, 5] = np.nan
    sd["pos_embed"][0, 0, 1] = -np.inf
    save_file(sd, str(tmp_path / "bad.safetensors"))
    code, err = _main(capsys, "convert", str(tmp_path / "bad.safetensors"), str(tmp_path / "out"), "--dtype", dtype)
    assert code == 2 and err.count("\n") == 1, err
    assert "2 tensors hold NaN or Inf (blocks.0.mlp.fc1.weight, pos_embed)" in err and "--allow-non-finite" in err
    assert not (tmp_path / "out").exists() and not _no_partials(tmp_path)

    with caplog.at_level(logging.WARNING):
        meta = convert_checkpoint(str(tmp_path / "bad.safetensors"), str(tmp_path / "out"), dtype=dtype,
                                  progress=False, allow_non_finite=True)
    assert sorted(meta["non_finite"]) == ["positional_embedding",
                                          "transformer.resblocks.mlp.c_fc.kernel"], meta["non_finite"]
    assert any("hold NaN or Inf" in r.getMessage() for r in caplog.records)
    assert "holds NaN or Inf in positional_embedding" in verify(tmp_path / "out").summary()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pe_jax"):
        if dtype == "float32":  # the load itself (once): restore_params warns
            resolve_model(str(tmp_path / "out")).load()
        else:
            assert len(warn_non_finite(str(tmp_path / "out"), meta)) == 2
    assert "holds NaN or Inf in 2 parameters" in caplog.text and "--allow-non-finite" in caplog.text

    save_file(_tiny_timm_tower(), str(tmp_path / "good.safetensors"))
    meta = convert_checkpoint(str(tmp_path / "good.safetensors"), str(tmp_path / "good"), dtype=dtype, progress=False)
    assert meta["non_finite"] == []
