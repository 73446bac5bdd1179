"""pe-jax convert / export: real files written by the PyTorch peers, round trips, and every bad input."""

import hashlib
import json
import os
import subprocess
import sys
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
    return [p.name for p in folder.iterdir() if ".partial" in p.name or ".old" in p.name]


def _image(size=384, seed=0):
    return np.random.default_rng(seed).standard_normal((1, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("source", ["open_clip_model.safetensors", "PE.pt", "original.safetensors"])
def test_clip_files_convert_and_match_the_peer(files, tmp_path, source):
    dst = tmp_path / "ckpt"
    meta = convert_checkpoint(str(files["dir"] / source), str(dst), progress=False)
    assert meta["preset"] == PRESET and meta["dtype"] == "float32"
    written = json.loads((dst / "pe_jax.json").read_text())
    assert written["source_file"] == source
    assert written["source_sha256"] == hashlib.sha256((files["dir"] / source).read_bytes()).hexdigest()
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


@pytest.mark.parametrize("fmt", ["original", "timm", "open_clip"])
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
    would cost it ~1.5 s (half an L/14 conversion)."""
    code = ("import sys; from pe_jax.convert.convert import convert_checkpoint; "
            f"convert_checkpoint({str(files['dir'] / 'PE.pt')!r}, {str(tmp_path / 'out')!r}, progress=False); "
            "print(sorted(m for m in ('jax', 'flax', 'orbax', 'torch') if m in sys.modules))")
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
