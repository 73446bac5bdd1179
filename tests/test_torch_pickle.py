"""The torch-free checkpoint reader against torch.load itself (torch is a test-only dependency)."""

import gc
import mmap
import os
import pickle
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pe_jax.checkpoints.torch_pickle import UnsafePickleError, load_torch_file


def _bytes(a) -> bytes:
    """Raw little-endian bytes of a torch tensor or numpy array, for bit-exact comparison."""
    if isinstance(a, torch.Tensor):
        return a.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()


def _assert_same(ours: dict, ref: dict) -> None:
    assert sorted(ours) == sorted(ref)
    for k, t in ref.items():
        a = ours[k]
        assert a.shape == tuple(t.shape), k
        assert a.dtype.name == str(t.dtype).removeprefix("torch."), k
        assert _bytes(a) == _bytes(t), k


def _save(obj, path) -> str:
    torch.save(obj, path)
    return str(path)


def _rewrite(src: str, dst, replace: dict, compression: int = zipfile.ZIP_STORED) -> str:
    """A copy of the zip `src` with members replaced by new bytes (or dropped when None)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for name in zin.namelist():
            data = replace.get(name, zin.read(name))
            if data is not None:
                zout.writestr(name, data)
    return str(dst)


@pytest.fixture
def base_file(tmp_path) -> str:  # its archive folder is named after the file: "base/"
    return _save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, tmp_path / "base.pt")


def test_dtypes_and_shapes_match_torch_load(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {
        "f32": torch.randn(3, 4, generator=g),
        "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "f64": torch.randn(2, generator=g).double(),
        "i64": torch.arange(-3, 4),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "scalar_bool": torch.tensor(True),
        "empty": torch.zeros(0, 4),
        "transposed": torch.randn(3, 5, generator=g).t(),  # non-contiguous view saved as is
        "every_other": torch.arange(20.0)[::2],
        "expanded": torch.randn(3, 1, generator=g).expand(3, 4),  # stride 0
        "param": torch.nn.Parameter(torch.randn(4, generator=g)),
        "f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),  # _rebuild_tensor_v3 + UntypedStorage
        "u16": torch.tensor([0, 65535], dtype=torch.uint16),
    }
    path = _save(sd, tmp_path / "sd.pt")
    ours = load_torch_file(path)
    _assert_same(ours, torch.load(path, weights_only=True))
    t = sd["transposed"]
    assert ours["transposed"].strides == tuple(s * 4 for s in t.stride())  # a strided view, not a copy
    assert ours["expanded"].strides[1] == 0
    assert not ours["f32"].flags.writeable


def test_module_state_dict(tmp_path):  # an OrderedDict with a _metadata attribute, as model.state_dict() gives
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    path = _save(model.state_dict(), tmp_path / "m.pt")
    _assert_same(load_torch_file(path), torch.load(path, weights_only=True))


def test_shared_storage(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    sd = {"a": base[2:5], "b": base[4:10].view(2, 3), "c": base}
    path = _save(sd, tmp_path / "shared.pt")
    assert sum(n.startswith("shared/data/") for n in zipfile.ZipFile(path).namelist()) == 1
    ours = load_torch_file(path)
    _assert_same(ours, torch.load(path, weights_only=True))
    addr = {k: v.__array_interface__["data"][0] for k, v in ours.items()}
    assert (addr["a"] - addr["c"], addr["b"] - addr["c"]) == (8, 16)  # views into one storage
    assert np.shares_memory(ours["a"], ours["b"])


@pytest.mark.parametrize("wrap", ["state_dict", "weights"])
def test_containers_and_prefixes(tmp_path, wrap):
    inner = {"module.x": torch.ones(2), "module.y.module.z": torch.zeros(3), "plain": torch.full((1,), 7.0)}
    path = _save({wrap: inner, "step": 1234, "name": "run"}, tmp_path / "c.pt")
    ours = load_torch_file(path)
    ref = {k.removeprefix("module."): v for k, v in torch.load(path, weights_only=True)[wrap].items()}
    assert sorted(ours) == ["plain", "x", "y.module.z"]  # only the leading prefix goes
    _assert_same(ours, ref)


def test_non_tensor_leaves_are_dropped(tmp_path):
    path = _save({"w": torch.ones(2), "step": 5, "lr": 0.1, "nested": {"b": torch.ones(1)}, "s": "x"},
                 tmp_path / "leaves.pt")
    assert list(load_torch_file(path)) == ["w"]


def test_big_endian_byteorder_record(tmp_path, base_file):
    with zipfile.ZipFile(base_file) as z:
        data = np.frombuffer(z.read("base/data/0"), "<f4").astype(">f4").tobytes()
    path = _rewrite(base_file, tmp_path / "be.pt", {"base/byteorder": b"big", "base/data/0": data})
    out = load_torch_file(path)["w"]
    assert out.dtype == np.dtype(">f4")
    np.testing.assert_array_equal(out, np.arange(6, dtype=np.float32).reshape(2, 3))


class _Evil:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("attack", ["os.system", "eval", "subprocess.call", "subprocess.Popen", "torch.save"])
def test_malicious_pickle_runs_nothing(tmp_path, base_file, attack, protocol):
    marker = tmp_path / "pwned"
    payload = {
        "os.system": _Evil(os.system, f"touch {marker}"),
        "eval": _Evil(eval, f"open({str(marker)!r}, 'w')"),
        "subprocess.call": _Evil(subprocess.call, ["touch", str(marker)]),
        "subprocess.Popen": _Evil(subprocess.Popen, ["touch", str(marker)]),
        "torch.save": None,  # torch.save of an otherwise valid checkpoint with a payload after a real tensor
    }[attack]
    path = str(tmp_path / "evil.pt")
    if payload is None:
        torch.save({"w": torch.ones(1), "x": _Evil(os.system, f"touch {marker}")}, path)
    else:
        _rewrite(base_file, path, {"base/data.pkl": pickle.dumps(payload, protocol=protocol)})
    # Protocol 2 spells some modules the Python 2 way (__builtin__, commands), as the unpickler sees them.
    expected = {"eval": "builtins.eval", "subprocess.call": "subprocess.call",
                "subprocess.Popen": "subprocess.Popen"}.get(attack, f"{os.system.__module__}.system")
    match = f"refusing to load global {expected if protocol == 4 or attack == 'os.system' else ''}"
    with pytest.raises(UnsafePickleError, match=match.replace(".", r"\.")) as e:
        load_torch_file(path)
    assert path in str(e.value) and isinstance(e.value, ValueError)
    assert not marker.exists()


@pytest.mark.parametrize("raw", [
    b"\x80\x02ctorch\nFloatStorage\n)R.",  # allowed globals resolve to inert tokens, not callables
    b"\x80\x02ccollections\nOrderedDict\n}X\x01\x00\x00\x00aK\x01sb.",  # BUILD on an allowed class
    b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(X\x01\x00\x00\x00aK\x00)))NtR.",  # a str for a storage
])
def test_abusing_allowed_globals_is_an_error(tmp_path, base_file, raw):
    path = _rewrite(base_file, tmp_path / "abuse.pt", {"base/data.pkl": raw})
    with pytest.raises(ValueError, match="abuse.pt"):
        load_torch_file(path)


def test_out_of_bounds_tensor_is_refused(tmp_path, base_file):
    raw = torch.load(base_file, weights_only=True)  # 6 floats; claim 7 via a forged stride
    with zipfile.ZipFile(base_file) as z:
        pkl = z.read("base/data.pkl")
    forged = pkl.replace(b"K\x03K\x01\x86", b"K\x04K\x01\x86")  # stride (3, 1) -> (4, 1)
    assert forged != pkl and raw["w"].stride() == (3, 1)
    path = _rewrite(base_file, tmp_path / "oob.pt", {"base/data.pkl": forged})
    with pytest.raises(ValueError, match="overruns"):
        load_torch_file(path)


def test_legacy_format_is_refused(tmp_path):
    path = str(tmp_path / "legacy.pt")
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="legacy torch format is unsupported; re-save it with torch.save"):
        load_torch_file(path)


@pytest.mark.parametrize("kind", ["random", "text", "empty", "pickle", "truncated", "no_data_pkl"])
def test_not_a_checkpoint(tmp_path, base_file, kind):
    path = tmp_path / f"bad_{kind}.pt"
    blob = open(base_file, "rb").read()
    if kind == "no_data_pkl":
        _rewrite(base_file, path, {"base/data.pkl": None})
    else:
        path.write_bytes({"random": np.random.default_rng(0).bytes(4096), "text": b"hello, world\n" * 10,
                          "empty": b"", "pickle": pickle.dumps({"w": [1.0, 2.0]}),
                          "truncated": blob[: len(blob) // 2]}[kind])
    with pytest.raises(ValueError, match=f"bad_{kind}.pt: not a torch checkpoint"):
        load_torch_file(path)


def test_missing_and_compressed_storage(tmp_path, base_file):
    with pytest.raises(ValueError, match="data/0 is missing"):
        load_torch_file(_rewrite(base_file, tmp_path / "missing.pt", {"base/data/0": None}))
    with pytest.raises(ValueError, match="base/data/0 is compressed"):
        load_torch_file(_rewrite(base_file, tmp_path / "deflated.pt", {}, zipfile.ZIP_DEFLATED))
    with pytest.raises(ValueError, match="does not fit"):  # a record shorter than the storage it claims
        load_torch_file(_rewrite(base_file, tmp_path / "short.pt", {"base/data/0": b"\0" * 20}))


def _with_deflated_bomb(src: str, dst, member: str, head: bytes, mib: int) -> str:
    """A copy of `src` whose `member` is `head` then `mib` MiB of zeros, deflated (~1000x smaller in the file)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            if name != member:
                zout.writestr(name, zin.read(name))
        info = zipfile.ZipInfo(member)
        info.compress_type = zipfile.ZIP_DEFLATED
        with zout.open(info, "w") as w:
            w.write(head)
            for _ in range(mib):
                w.write(bytes(2**20))
    return str(dst)


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.mark.parametrize("member,limit", [("base/data.pkl", "64 MiB"), ("base/byteorder", "4 KiB")])
def test_deflated_zip_bomb_is_refused_unread(tmp_path, base_file, member, limit):
    """torch never compresses, but a zip may: a member read whole is bounded before it is inflated."""
    with zipfile.ZipFile(base_file) as z:
        head = z.read(member)  # still a valid checkpoint up to the padding: the unpickler stops at STOP
    path = _with_deflated_bomb(base_file, tmp_path / "bomb.pt", member, head, 80)
    assert os.path.getsize(path) < 2**20
    gc.collect()
    before = _rss_anon_bytes()
    with pytest.raises(ValueError, match=f"{member} is {80 * 2**20 + len(head)} bytes uncompressed") as e:
        load_torch_file(path)
    assert path in str(e.value) and f"more than the {limit}" in str(e.value)
    assert _rss_anon_bytes() - before < 20e6


def _claim_size(path: str, member: str, size: int) -> None:
    """Rewrites the uncompressed size of `member` in the zip's central directory (where zipfile reads it)."""
    blob = bytearray(Path(path).read_bytes())
    at = 0
    while True:
        at = blob.index(b"PK\x01\x02", at)
        name_len = int.from_bytes(blob[at + 28: at + 30], "little")
        if blob[at + 46: at + 46 + name_len] == member.encode():
            blob[at + 24: at + 28] = size.to_bytes(4, "little")
            break
        at += 46
    Path(path).write_bytes(blob)


@pytest.mark.parametrize("member", ["base/data.pkl", "base/byteorder"])
def test_member_that_lies_about_its_size_is_read_no_further(tmp_path, base_file, member):
    """A deflate stream that inflates to 256 MiB under a stated size of a few bytes: read by the stated size,
    never inflated in full (zipfile's read() inflates up to 2 GB at once before cutting to the stated size)."""
    with zipfile.ZipFile(base_file) as z:
        head = z.read(member)
    path = _with_deflated_bomb(base_file, tmp_path / "liar.pt", member, head, 256)
    _claim_size(path, member, len(head))
    gc.collect()
    before = _peak_rss_bytes()
    with pytest.raises(ValueError, match=f"cannot read {member}.*Bad CRC-32") as e:
        load_torch_file(path)
    assert path in str(e.value)
    assert _peak_rss_bytes() - before < 64e6


def _rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def _backed_by_mmap(a: np.ndarray) -> bool:
    while a is not None and not isinstance(a, mmap.mmap):
        a = a.obj if isinstance(a, memoryview) else getattr(a, "base", None)
    return a is not None


def test_large_checkpoint_is_memory_mapped(tmp_path):
    n = 13 * 2**20  # 4 x 52 MB float32 tensors and a bfloat16 one
    path = str(tmp_path / "big.pt")
    torch.save({f"w{i}": torch.full((n // 1024, 1024), float(i)) for i in range(4)} |
               {"h": torch.full((1024, 512), 2.0).bfloat16()}, path)
    assert os.path.getsize(path) > 200e6
    gc.collect()
    before = _rss_anon_bytes()
    sd = load_torch_file(path)
    grown = _rss_anon_bytes() - before
    assert grown < 50e6, f"loading grew anonymous memory by {grown / 1e6:.0f} MB"
    assert len(sd) == 5 and all(_backed_by_mmap(v) for v in sd.values())
    assert sd["w3"][-1, -1] == 3.0 and float(sd["h"][123, 4]) == 2.0
