"""The Ray engine (pe_jax.embed.ray_engine) on a local two-CPU Ray cluster: the local engine's rows (and
--tile-features' tiles files) exactly, an actor SIGKILLed mid-job without a row lost or duplicated, and a rerun
of a finished job that does nothing."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pe_jax
from pe_jax.embed import read_embeddings, read_tile_features, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    import ray

    # The actors compute as this process does (the conftest's float32 matmuls), so rows compare exactly.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"JAX_DEFAULT_MATMUL_PRECISION": "highest"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tiny_clip, tmp_path_factory):
    """Eight 12-image tar shards (one undecodable member in shard 2) and a folder of 30 images."""
    root = tmp_path_factory.mktemp("ray")
    pe_jax.save(tiny_clip, root / "ckpt", preset="PE-Core-T16-384")
    rng = np.random.default_rng(0)

    def png():
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(buffer, "PNG")
        return buffer.getvalue()

    (root / "shards").mkdir()
    for s in range(8):
        with tarfile.open(root / "shards" / f"{s:03d}.tar", "w") as tar:
            members = [(f"s{s}-{i:02d}.png", png()) for i in range(12)]
            if s == 2:
                members.insert(3, ("bad.png", b"not a png"))
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    for i in range(30):
        (root / "images" / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / "images" / f"c{i % 3}" / f"{i:02d}.png").write_bytes(png())
    return root


def _same(a, b):
    ea, ra = read_embeddings(str(a))
    eb, rb = read_embeddings(str(b))
    assert ra == rb and len({r["key"] for r in ra}) == len(ra)
    np.testing.assert_array_equal(ea, eb)
    assert (a / "failures.jsonl").read_text() == (b / "failures.jsonl").read_text()


def test_ray_rows_equal_the_local_engine_and_a_rerun_does_nothing(cluster, data, tmp_path, monkeypatch):
    ckpt, shards = str(data / "ckpt"), str(data / "shards" / "{000..007}.tar")
    local = run(shards, str(tmp_path / "local"), checkpoint=ckpt, batch_size=4, progress=False)
    ray = run(shards, str(tmp_path / "ray"), checkpoint=ckpt, engine="ray", actors=2, batch_size=4, progress=False)
    assert local["embedded"] == ray["embedded"] == 96 and ray["failed"] == 1 and ray["complete"]
    _same(tmp_path / "local", tmp_path / "ray")
    again = run(shards, str(tmp_path / "ray"), checkpoint=ckpt, engine="ray", actors=2, batch_size=4, progress=False)
    assert again["complete"] and again["this_run"]["embedded"] == 0 and again["embedded"] == 96
    # a folder: its parts' items travel to the actors. The folder and the checkpoint are named relative to the
    # driver's folder, not the one the cluster's workers started in (every item failed in the actors, "0
    # embedded", and a relative checkpoint raised there). Tiled (--tiles --tile-features, sharing this run rather
    # than starting actors of its own), the driver writes the tiles files byte for byte as the local engine.
    monkeypatch.chdir(data)
    tiled = dict(checkpoint="ckpt", part_size=7, tiles=2, tile_features=True, progress=False)
    run("images", str(tmp_path / "f_local"), **tiled)
    folder = run("images", str(tmp_path / "f_ray"), engine="ray", actors=1, **tiled)
    assert folder["complete"] and folder["embedded"] == 30 and folder["failed"] == 0 and folder["parts"] == 5
    _same(tmp_path / "f_local", tmp_path / "f_ray")
    assert read_embeddings(str(tmp_path / "f_ray"))[1][0]["source"] == "images/c0/00.png"
    assert read_tile_features(str(tmp_path / "f_ray")).shape[:2] == (30, 2)
    for name in (f"{kind}/part-{n:05d}.{ext}" for n in range(5) for kind, ext in [("tiles", "npy"),
                                                                                ("failures", "checksums.json")]):
        assert (tmp_path / "f_ray" / name).read_bytes() == (tmp_path / "f_local" / name).read_bytes(), name
    record = json.loads((tmp_path / "f_ray" / "failures" / "part-00004.checksums.json").read_text())
    assert (record["job"], record["part"]) == (json.loads((tmp_path / "f_ray" / "manifest.json").read_text())["job"], 4)
    with pytest.raises(ValueError, match="other settings"):  # the manifest is checked as by the local engine
        run(shards, str(tmp_path / "ray"), checkpoint=ckpt, engine="ray", dtype="float32", progress=False)


def _embedder_pids() -> list[int]:
    """The actors' processes, by the title Ray gives them (`ray::MapWorker(MapBatches(PartEmbedder))...`; the
    state API that lists actors needs the dashboard, which the test cluster does not run)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read()
        except OSError:
            continue
        if title.startswith(b"ray::") and b"PartEmbedder" in title:
            pids.append(int(pid))
    return sorted(pids)


def test_an_actor_killed_mid_job_loses_and_duplicates_nothing(cluster, data, tmp_path):
    """SIGKILL one actor once the first part is written: Ray restarts it and retries its parts; the driver
    writes each part once, so the output equals the uninterrupted local one."""
    ckpt, shards = str(data / "ckpt"), str(data / "shards" / "{000..007}.tar")
    run(shards, str(tmp_path / "local"), checkpoint=ckpt, batch_size=2, progress=False)
    out, killed, done = tmp_path / "ray", [], threading.Event()

    def kill_one():
        while not done.is_set() and not list((out / "embeddings").glob("part-*.npy")):
            time.sleep(0.005)
        pids = _embedder_pids()
        if pids and not done.is_set():
            os.kill(pids[0], signal.SIGKILL)
            killed.append((pids[0], len(list((out / "embeddings").glob("part-*.npy")))))

    killer = threading.Thread(target=kill_one)
    killer.start()
    try:
        summary = run(shards, str(out), checkpoint=ckpt, engine="ray", actors=2, batch_size=2, progress=False)
    finally:
        done.set()
        killer.join()
    assert killed and killed[0][1] < 8, killed  # killed while parts were still to come
    assert summary["complete"] and summary["embedded"] == 96 and summary["this_run"]["embedded"] == 96
    _same(tmp_path / "local", out)


def test_readme_engine_commands_run_as_written(cluster, data, tmp_path):
    """The README's block of engine commands (one host, two jax.distributed processes, Ray with its own local
    cluster) runs verbatim in a folder with ckpt/ and shards/, and the three outputs hold the same rows."""
    from doc_blocks import block as doc_block

    block = doc_block("## Engines and object stores", "bash")  # docs/embedding.md
    (tmp_path / "ckpt").symlink_to(data / "ckpt")
    (tmp_path / "shards").symlink_to(data / "shards")
    env = {**os.environ, "RAY_ADDRESS": "", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one summary line per process: one host, the two jax.distributed processes, the Ray driver
    assert proc.stdout.count("96 embedded, 1 failed (see failures.jsonl), 8/8 parts") == 4, proc.stdout
    rows, first = None, None
    for out in ("emb", "emb_spmd", "emb_ray"):
        embeddings, records = read_embeddings(str(tmp_path / out))
        assert rows is None or records == rows
        rows = records
        first = embeddings if first is None else first
        np.testing.assert_allclose(embeddings.astype(np.float32), first.astype(np.float32), atol=2e-3)


def test_cli_engine_ray_argument_errors(data, tmp_path, monkeypatch, capsys):
    """Ray flags without --engine ray, --mesh with it and --actors 0 are refused in one line, before any work."""
    from pe_jax.cli import main

    monkeypatch.setenv("RAY_ADDRESS", "")
    base = ["embed", "--checkpoint", str(data / "ckpt"), "--input", str(data / "shards" / "{000..001}.tar"),
            "--quiet", "--batch-size", "4", "--output", str(tmp_path / "bad")]
    for extra, message in [(["--actors", "2"], "apply to --engine ray"),
                           (["--engine", "ray", "--mesh", "data=2"], "--mesh applies to --engine local"),
                           (["--engine", "ray", "--actors", "0"], "--actors must be >= 1")]:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "bad").exists()


def test_ray_one_pass_image_text_in_clip_retrieval_layout(cluster, data, tmp_path):
    """--modality image,text --layout clip-retrieval on the Ray engine: the local engine's files and rows."""
    import json

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"path": str(p), "caption": f"picture {p.stem}"}) + "\n"
                             for p in sorted((data / "images").rglob("*.png"))))
    options = dict(checkpoint=str(data / "ckpt"), modality="image,text", layout="clip-retrieval", part_size=8,
                   batch_size=4, progress=False)
    run(str(pairs), str(tmp_path / "local"), **options)
    summary = run(str(pairs), str(tmp_path / "ray"), engine="ray", actors=2, **options)
    assert summary["complete"] and summary["embedded"] == 30
    assert sorted(os.listdir(tmp_path / "ray" / "text_emb")) == [f"text_emb_{i}.npy" for i in range(4)]
    for tower in ("image", "text"):
        ea, ra = read_embeddings(str(tmp_path / "local"), tower)
        eb, rb = read_embeddings(str(tmp_path / "ray"), tower)
        assert ra == rb and [r["caption"] for r in rb][:1] == ["picture 00"]
        np.testing.assert_array_equal(ea, eb)


def test_actors_work_in_the_drivers_folder(data, tmp_path, monkeypatch):
    """Actors do not share the driver's working folder: a relative --input made every item fail there (and the
    job count as complete), a relative --checkpoint raised. The driver hands them its folder; a relative
    checkpoint then loads in an actor started elsewhere, and rows keep the paths as given."""
    import pe_jax.embed.ray_engine as ray_engine

    seen = {}
    def drive(ray, listing, out, settings, actor, *args):
        seen.update(actor)
        return {"embedded": 0, "failed": 0}

    monkeypatch.setattr(ray_engine, "_drive", drive)
    monkeypatch.setattr(ray_engine, "connect", lambda address: None)
    monkeypatch.chdir(data)
    run("shards", str(tmp_path / "out"), checkpoint="ckpt", engine="ray", progress=False)
    assert seen["cwd"] == str(data) and seen["resolved"].source == "ckpt"
    monkeypatch.chdir(tmp_path)  # an actor's own folder
    actor = ray_engine.PartEmbedder(**seen)
    assert os.getcwd() == str(data) and actor.model is not None
    with pytest.raises(ValueError, match="cannot work in the driver's folder /no/such"):
        ray_engine.PartEmbedder(**{**seen, "cwd": "/no/such"})


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_cluster_is_one_line_not_retried_forever(tmp_path, monkeypatch):
    """`--engine ray` without an address connected to the cluster the last `ray start` recorded and, that cluster
    dead, retried without end: nothing answering there is one line (ray.init is not reached)."""
    import ray

    import pe_jax.embed.ray_engine as ray_engine

    def init(**kwargs):
        raise AssertionError("ray.init would retry a dead cluster")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    port = _closed_port()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}\n")
    with pytest.raises(ValueError, match=f"no Ray cluster answers at 127.0.0.1:{port} \\(the cluster the last `ray "
                                         "start` recorded; .*pass --ray-address local"):
        ray_engine.connect(None)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(ValueError, match=f"answers at 127.0.0.1:{port} \\(RAY_ADDRESS=127.0.0.1:{port};"):
        ray_engine.connect("auto")


def test_actor_restarts_are_bounded_and_the_end_is_one_line(data, tmp_path, monkeypatch):
    """Ray Data restarts a dead actor (one killed for memory) forever by default: pe-jax bounds its restarts and
    task retries, and a job stopped by them is one line saying how to resume."""
    import types

    import ray.exceptions

    import pe_jax.embed.ray_engine as ray_engine
    from pe_jax.cli import main

    seen = {}

    class Pipeline:
        def map_batches(self, fn, **kwargs):
            seen.update(kwargs)
            return self

        def iter_batches(self, **kwargs):
            raise ray.exceptions.ActorDiedError()

    context = types.SimpleNamespace(enable_progress_bars=True)
    fake = types.SimpleNamespace(
        exceptions=ray.exceptions, cluster_resources=lambda: {"CPU": 2}, nodes=lambda: [{"Alive": True}],
        data=types.SimpleNamespace(DataContext=types.SimpleNamespace(get_current=lambda: context),
                                   from_items=lambda items, **kwargs: Pipeline(), ActorPoolStrategy=lambda size: size))
    monkeypatch.setattr(ray_engine, "connect", lambda address: fake)
    with pytest.raises(ray_engine.RayJobError, match=r"^the Ray job stopped after 0 parts: ActorDiedError: .*at most "
                                                     r"3 times.*rerun to resume"):
        run(str(data / "shards" / "{000..001}.tar"), str(tmp_path / "out"), checkpoint=str(data / "ckpt"),
            engine="ray", progress=False)
    assert seen["max_restarts"] == seen["max_task_retries"] == ray_engine.MAX_RESTARTS == 3
    assert main(["embed", "--checkpoint", str(data / "ckpt"), "--input", str(data / "shards" / "000.tar"),
                 "--output", str(tmp_path / "cli"), "--engine", "ray", "--quiet"]) == 2
