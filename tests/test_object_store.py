"""Object stores (pe_jax.storage) against a real S3 server on localhost (moto's), through s3fs: checkpoints
converted and loaded from s3://, embedding jobs from s3:// inputs into an s3:// output that survive SIGKILL with
no temporary object left, folders and lists in the bucket, and the faults; gs:// (gcsfs) faults against local
endpoints that never answer, refuse, or answer GCS's JSON API with 404 / 403."""

import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image
from safetensors.numpy import save_file

import pe_jax
from pe_jax.checkpoints.verify import content_hash
from pe_jax.data.sources import iter_folder, list_labelled
from pe_jax.embed import embed, read_embeddings
from pe_jax.pretrained import load_model

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free port, named by AWS_ENDPOINT_URL for this process and the CLIs it starts; the
    s3fs filesystem with the bucket `bucket`."""
    import s3fs

    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            assert time.time() < deadline and server.poll() is None, "moto_server did not start"
            time.sleep(0.1)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]}, use_listings_cache=False)
    fs.mkdir("bucket")
    try:
        yield fs
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        server.kill()
        server.wait()


@pytest.fixture(scope="module")
def ckpt(tiny_clip, tmp_path_factory):
    path = tmp_path_factory.mktemp("s3ckpt") / "ckpt"
    pe_jax.save(tiny_clip, path, preset="PE-Core-T16-384")
    return path


def _png(rng, size=48) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _tar(members) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _cli(*args):
    return subprocess.Popen([sys.executable, "-m", "pe_jax.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _params(model) -> dict:
    return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_checkpoints_convert_and_load_from_s3(s3, ckpt, tmp_path):
    """`pe-jax convert s3://...safetensors`, `load_model(s3://pe_jax checkpoint)` and `from_config(checkpoint=
    s3://...)` give the weights the local files give; the content hash is the local file's."""
    tower = pe_jax.VisionTransformer.from_config("PE-Core-T16-384", seed=5)  # full size: convert infers it
    rng = np.random.default_rng(0)
    state = {k: (v + rng.standard_normal(v.shape).astype(v.dtype) * 0.05).astype(v.dtype)
             for k, v in pe_jax.torch_state_dict(tower, "timm").items()}  # every tensor non-trivial...
    state["head.bias"] = np.zeros_like(state["head.bias"])  # ...but timm's projection bias, zero by definition
    save_file(state, str(tmp_path / "model.safetensors"))
    s3.put(str(tmp_path / "model.safetensors"), "bucket/torch/model.safetensors")
    s3.put(str(ckpt), "bucket/ckpt", recursive=True)
    os.environ["PE_JAX_CACHE"] = str(tmp_path / "cache")
    try:
        proc = _cli("convert", "s3://bucket/torch/model.safetensors", tmp_path / "from_s3", "--quiet")
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        local = load_model(tmp_path / "from_s3")
        direct = pe_jax.VisionTransformer.from_config("PE-Core-T16-384", checkpoint=str(tmp_path / "model.safetensors"))
        remote = pe_jax.VisionTransformer.from_config("PE-Core-T16-384", checkpoint="s3://bucket/torch/model.safetensors")
        a, b, c = _params(local), _params(direct), _params(remote)
        assert a.keys() == b.keys() == c.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
            np.testing.assert_array_equal(c[k], b[k])
        assert content_hash("s3://bucket/torch/model.safetensors") == content_hash(str(tmp_path / "model.safetensors"))
        in_bucket, on_disk = _params(load_model("s3://bucket/ckpt")), _params(load_model(ckpt))
        assert in_bucket.keys() == on_disk.keys()
        for k, v in in_bucket.items():
            np.testing.assert_array_equal(v, on_disk[k])
        cached = list((tmp_path / "cache").rglob("*"))
        assert cached and not [p for p in cached if ".pe_jax-tmp-" in p.name]  # downloads renamed into place
    finally:
        del os.environ["PE_JAX_CACHE"]


def _shards(s3, rng) -> str:
    """Four 24-image shards in the bucket; shard 1 holds an undecodable member."""
    for s in range(4):
        members = [(f"s{s}-{i:03d}.png", _png(rng)) for i in range(24)]
        if s == 1:
            members.insert(7, ("broken.jpg", b"\xff\xd8 not a jpeg"))
        s3.pipe_file(f"bucket/shards/{s:03d}.tar", _tar(members))
    return "s3://bucket/shards/{000..003}.tar"


OUTPUT_OBJECT = re.compile(r"(manifest\.json|failures\.jsonl|(embeddings/part-\d{5}\.npy)|"
                           r"(metadata/part-\d{5}\.parquet)|(failures/part-\d{5}\.(jsonl|checksums\.json)))")


def test_embed_s3_shards_into_s3_survives_sigkill(s3, ckpt, tmp_path):
    """s3:// shards into an s3:// output: SIGKILL after the first part, rerun: one row per good input, equal to
    the local engine's rows from the same shards; the bucket holds only finished objects."""
    shards = _shards(s3, np.random.default_rng(1))
    job = ["embed", "--checkpoint", ckpt, "--input", shards, "--batch-size", "4", "--quiet"]
    proc = _cli(*job, "--output", "s3://bucket/emb")
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not s3.exists("bucket/emb/embeddings/part-00000.npy"):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    finished = len(s3.glob("bucket/emb/embeddings/part-*.npy"))
    assert 0 < finished < 4, (finished, err[-2000:])  # killed part-way
    proc = _cli(*job, "--output", "s3://bucket/emb")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "96 embedded, 1 failed" in out
    local = embed(load_model(ckpt), shards, str(tmp_path / "local"), batch_size=4, progress=False)
    assert local["embedded"] == 96
    a, rows_a = read_embeddings("s3://bucket/emb")
    b, rows_b = read_embeddings(str(tmp_path / "local"))
    assert rows_a == rows_b and len({r["key"] for r in rows_a}) == 96
    np.testing.assert_array_equal(a, b)
    assert s3.cat_file("bucket/emb/failures.jsonl") == (tmp_path / "local" / "failures.jsonl").read_bytes()
    names = [p[len("bucket/emb/"):] for p in s3.find("bucket/emb")]
    assert names and all(OUTPUT_OBJECT.fullmatch(n) for n in names), names  # no temporary object
    assert len(names) == 2 + 4 * 4  # a part: embeddings, metadata, failures, checksums
    again = embed(load_model(ckpt), shards, "s3://bucket/emb", batch_size=4, progress=False,
                  checkpoint=str(ckpt), preset="PE-Core-T16-384")
    assert again["complete"] and again["this_run"]["embedded"] == 0  # finished parts are skipped


def test_s3_folders_lists_and_labelled_data(s3, tiny_clip, tmp_path):
    """A folder in the bucket lists as the same folder on disk does (order, keys, hidden objects skipped); a
    list file's relative paths are relative to it; class folders label finetuning data."""
    rng = np.random.default_rng(2)
    local = tmp_path / "images"
    for i in range(12):
        rel = f"{['cat', 'dog_big'][i % 2]}/{i:02d}.png"
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(_png(rng, 32))
        s3.pipe_file(f"bucket/images/{rel}", (local / rel).read_bytes())
    s3.pipe_file("bucket/images/.hidden/x.png", b"x")
    s3.pipe_file("bucket/list.jsonl", b"".join(b'{"path": "images/%s", "k": %d}\n' % (p.relative_to(local).as_posix()
                                                                                        .encode(), n)
                                               for n, p in enumerate(sorted(local.rglob("*.png")))))
    remote_items = list(iter_folder("s3://bucket/images"))
    assert [it.key for it in remote_items] == [it.key for it in iter_folder(str(local))]
    assert remote_items[0].source == "s3://bucket/images/cat/00.png"
    items, classes = list_labelled("s3://bucket/images")
    assert classes == ["cat", "dog big"] == list_labelled(str(local))[1] and len(items) == 12
    folder = embed(tiny_clip, "s3://bucket/images", str(tmp_path / "f"), part_size=5, progress=False)
    listed = embed(tiny_clip, "s3://bucket/list.jsonl", str(tmp_path / "l"), part_size=5, progress=False)
    disk = embed(tiny_clip, str(local), str(tmp_path / "d"), part_size=5, progress=False)
    assert folder["embedded"] == listed["embedded"] == disk["embedded"] == 12
    ef, _ = read_embeddings(str(tmp_path / "f"))
    el, rows = read_embeddings(str(tmp_path / "l"))
    ed, _ = read_embeddings(str(tmp_path / "d"))
    np.testing.assert_array_equal(ef, ed)
    np.testing.assert_array_equal(el, ed)
    assert rows[6]["source"] == "s3://bucket/images/dog_big/01.png" and rows[6]["k"] == 6


def test_s3_faults_are_one_line(s3, ckpt, tmp_path):
    """A missing shard, a missing checkpoint object and --join on an s3:// output: one line, no traceback."""
    _shards(s3, np.random.default_rng(3))
    for args, message in [
        (["--checkpoint", ckpt, "--input", "s3://bucket/shards/{000..009}.tar"], "shard not found: s3://bucket/shards/004"),
        (["--checkpoint", "s3://bucket/nothing", "--input", "s3://bucket/shards/{000..001}.tar"],
         "checkpoint not found: s3://bucket/nothing"),
        (["--checkpoint", ckpt, "--input", "s3://bucket/shards/{000..001}.tar", "--join"], "no locks"),
    ]:
        proc = _cli("embed", *args, "--output", "s3://bucket/bad", "--quiet")
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2 and message in err and "Traceback" not in err, err
    assert not s3.exists("bucket/bad/embeddings")


def test_a_missing_s3_checkpoint_fails_before_jax_loads(s3, tmp_path):
    """A checkpoint URL is checked (one request, PE_JAX_NET_TIMEOUT) before jax and the model load: one line."""
    script = ("import sys\nfrom pe_jax.cli import main\n"
              f"rc = main(['embed', '--checkpoint', 's3://bucket/no-such-ckpt', '--input', {str(tmp_path)!r}, "
              f"'--output', {str(tmp_path / 'o')!r}])\n"
              "print(rc, 'jax' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert done.stderr.strip() == "pe-jax embed: error: checkpoint not found: s3://bucket/no-such-ckpt"


def test_a_foreign_part_in_an_s3_prefix_is_not_taken_as_finished(s3, tiny_clip, tmp_path):
    """The object-store twin of test_embed's local case: another job's `embeddings/part-00000.npy` and metadata
    already under an s3:// output prefix that has no manifest.json are refused, named and left as they were,
    never counted as this job's finished rows."""
    rng = np.random.default_rng(4)
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.png").write_bytes(_png(rng, 32))
    other = tmp_path / "other"  # a job with other settings: its files are well-formed, its rows not ours
    embed(tiny_clip, str(folder), str(other), part_size=3, normalize=False, progress=False)
    for sub, ext in (("embeddings", "npy"), ("metadata", "parquet")):
        s3.put(str(other / sub / f"part-00000.{ext}"), f"bucket/foreign/{sub}/part-00000.{ext}")
    with pytest.raises(ValueError, match=r"^s3://bucket/foreign holds part files \(s3://bucket/foreign/embeddings/"
                                         r"part-00000.npy\) but no manifest.json"):
        embed(tiny_clip, str(folder), "s3://bucket/foreign", part_size=3, progress=False)
    assert sorted(s3.find("bucket/foreign")) == ["bucket/foreign/embeddings/part-00000.npy",
                                                 "bucket/foreign/metadata/part-00000.parquet"]
    assert s3.cat_file("bucket/foreign/embeddings/part-00000.npy") == (other / "embeddings" / "part-00000.npy"
                                                                       ).read_bytes()


def test_a_part_another_job_wrote_under_an_s3_jobs_manifest_is_not_finished(s3, tiny_clip, tmp_path):
    """The object-store twin of test_embed's case under the job's own manifest.json: another job's part-00000
    put over this job's, with its record (which names the other job) and without one, is listed under
    damaged_parts, the job not complete, and the objects are left as they were."""
    rng = np.random.default_rng(5)
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(_png(rng, 32))
    other = tmp_path / "other"  # a job with other settings
    embed(tiny_clip, str(folder), str(other), part_size=2, normalize=False, progress=False)
    assert embed(tiny_clip, str(folder), "s3://bucket/planted", part_size=2, progress=False)["complete"]
    for name in ("embeddings/part-00000.npy", "metadata/part-00000.parquet", "failures/part-00000.jsonl",
                 "failures/part-00000.checksums.json"):
        s3.put(str(other / name), f"bucket/planted/{name}")
    for why in ("part-00000.checksums.json names another job", "part-00000.checksums.json is missing"):
        summary = embed(tiny_clip, str(folder), "s3://bucket/planted", part_size=2, progress=False)
        assert not summary["complete"] and why in summary["damaged_parts"][0], summary
        s3.rm("bucket/planted/failures/part-00000.checksums.json")
    assert s3.cat_file("bucket/planted/embeddings/part-00000.npy") == (other / "embeddings" / "part-00000.npy"
                                                                       ).read_bytes()


@pytest.fixture
def silent_server():
    """(port, the connections it holds) of a local server that accepts every connection and never answers (a hung
    endpoint)."""
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held = []

    def accept():
        with contextlib.suppress(OSError):
            while True:
                held.append(server.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1], held
    server.close()
    for conn in held:
        conn.close()


@pytest.fixture
def silent_port(silent_server):
    return silent_server[0]


@pytest.fixture
def net_env(monkeypatch):
    monkeypatch.setenv("PE_JAX_NET_TIMEOUT", "0.2")
    credentials = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in credentials.items():
        monkeypatch.setenv(k, v)
    return monkeypatch


def test_a_server_that_never_answers_is_one_line_naming_the_url(silent_port, net_env):
    """A URL that accepts and never answers, and an unresponsive S3 endpoint: a NetworkError naming the URL after
    PE_JAX_NET_TIMEOUT and bounded retries (it waited ~300 s per item, and s3fs forever), not a hang."""
    from pe_jax import storage

    url = f"http://127.0.0.1:{silent_port}/a.png"
    start = time.time()
    with pytest.raises(storage.NetworkError, match=re.escape(f"{url}: no answer within 0.2 s")):
        storage.read_bytes(url)
    assert time.time() - start < 5
    net_env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent_port}")
    for ask in (storage.exists, storage.isdir, storage.isfile):  # s3fs's own isdir/isfile answered "no" instead
        start = time.time()
        with pytest.raises(storage.NetworkError, match=r"^s3://bucket/x: no answer within 0.2 s"):
            ask("s3://bucket/x")
        assert time.time() - start < 8, ask


def test_ctrl_c_while_a_url_never_answers_stops_at_once(silent_server, ckpt, tmp_path):
    """Ctrl-C while every decoding thread waits on a URL that accepts and never answers: `pe-jax embed` stops
    within seconds, far below PE_JAX_NET_TIMEOUT (60 s here), in one line. The main thread waited on the hung
    item's result and the thread pool joined its threads at exit: Ctrl-C was honoured only once every read
    had timed out."""
    port, held = silent_server
    urls = tmp_path / "urls.txt"
    urls.write_text("".join(f"http://127.0.0.1:{port}/{i}.png\n" for i in range(4)))
    proc = subprocess.Popen([sys.executable, "-m", "pe_jax.cli", "embed", "--checkpoint", str(ckpt), "--input",
                             str(urls), "--output", str(tmp_path / "out"), "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PE_JAX_NET_TIMEOUT": "60"})
    deadline = time.time() + 60
    while not held and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)  # until a decoding thread is inside its read
    assert held, proc.communicate()[1]
    time.sleep(0.2)
    start = time.time()
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert time.time() - start < 5 and proc.returncode == 130, (time.time() - start, err)
    assert err.strip().splitlines() == ["pe-jax embed: interrupted; no partial output was left; rerun the same "
                                        "command to resume"], err


def test_a_refused_or_forbidden_s3_endpoint_is_one_line_naming_the_url(net_env, tmp_path, capsys):
    """A refused S3 endpoint was a botocore traceback; a 403 printed "Forbidden" without the URL."""
    import http.server
    import threading

    from pe_jax.cli import main

    closed = _free_port()  # nothing listens there
    net_env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    argv = ["embed", "--checkpoint", "s3://bucket/ckpt", "--input", str(tmp_path), "--output", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "s3://bucket/ckpt: cannot reach the server" in err

    class Forbidden(http.server.BaseHTTPRequestHandler):
        def _deny(self):
            body = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
            self.send_response(403)
            self.send_header("Content-Length", str(len(body)) if self.command != "HEAD" else "0")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_PUT = do_POST = _deny

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forbidden)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        net_env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_port}")
        assert main(argv) == 2
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "s3://bucket/ckpt: access denied" in err, err


def _embed_fails_in_one_line(argv, capsys, within: float) -> str:
    """`pe-jax embed ARGV` ends with exit 2 within `within` s, in one line and no traceback: that line."""
    from pe_jax.cli import main

    start = time.time()
    assert main(["embed", *argv]) == 2
    took, err = time.time() - start, capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and took < within, (took, err)
    return err.strip()


def test_an_unresponsive_gcs_endpoint_is_one_line_naming_the_url(silent_port, net_env, tmp_path, capsys):
    """The gs:// twin of the S3 case: gcsfs retried 6 times with backoff to 32 s and set no socket timeout, so a
    GCS endpoint that accepts and never answers hung. Now each try waits PE_JAX_NET_TIMEOUT, 3 tries (gcsfs's
    backoff between them: 3-5 s), then one line naming the URL. STORAGE_EMULATOR_HOST (gcsfs's own variable)
    names the endpoint, with no credentials."""
    pytest.importorskip("gcsfs")
    net_env.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{silent_port}")
    err = _embed_fails_in_one_line(["--checkpoint", "gs://bucket/ckpt", "--input", str(tmp_path), "--output",
                                    str(tmp_path / "o")], capsys, within=9)
    assert "gs://bucket/ckpt: no answer within 0.2 s (after bounded retries)" in err


def test_a_refused_gcs_endpoint_is_one_line_naming_the_url(net_env, tmp_path, capsys):
    """A gs:// input whose endpoint refuses connections: one line naming the URL after 3 tries, no traceback
    (gcsfs logged one per request it gave up on)."""
    pytest.importorskip("gcsfs")
    net_env.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    err = _embed_fails_in_one_line(["--checkpoint", str(tmp_path), "--input", "gs://bucket/shards/{000..001}.tar",
                                    "--output", str(tmp_path / "o")], capsys, within=9)
    assert "gs://bucket/shards/{000..001}.tar: cannot reach the server (Cannot connect to host 127.0.0.1" in err


def test_a_missing_or_forbidden_gcs_object_is_one_line_naming_the_url(net_env, tmp_path, capsys):
    """A server answering GCS's JSON API with 404: "not found" naming the gs:// URL; with 403 (gcsfs raises a
    two-line OSError "Forbidden: b/bucket/o\nwhy"): access denied naming the URL and why, no traceback."""
    pytest.importorskip("gcsfs")
    import http.server
    import json
    import threading

    class Answer(http.server.BaseHTTPRequestHandler):
        status = 404

        def _answer(self):
            body = json.dumps({"error": {"code": self.status, "message": f"status {self.status}"}}).encode()
            try:
                self.send_response(self.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # gcsfs may hang up once it has read the status
                pass

        do_GET = do_POST = do_PUT = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    net_env.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.server_port}")
    checkpoint = ["--checkpoint", "gs://bucket/ckpt", "--input", str(tmp_path), "--output", str(tmp_path / "o")]
    shards = ["--checkpoint", str(tmp_path), "--input", "gs://bucket/shards/{000..001}.tar", "--output",
              str(tmp_path / "o")]
    try:
        assert _embed_fails_in_one_line(checkpoint, capsys, 5).endswith("checkpoint not found: gs://bucket/ckpt")
        assert "the pattern matches no tar shard (gs://bucket/shards/000.tar not found)" in _embed_fails_in_one_line(
            shards, capsys, 5)
        Answer.status = 403
        denied = _embed_fails_in_one_line(checkpoint, capsys, 5)
        assert "gs://bucket/ckpt: access denied (status 403): check the credentials" in denied
        assert "gs://bucket/shards/{000..001}.tar: access denied (status 403)" in _embed_fails_in_one_line(
            shards, capsys, 5)
    finally:
        server.shutdown()
        server.server_close()


def test_a_corrupted_cached_copy_says_to_clear_the_cache(s3, ckpt, tmp_path, monkeypatch):
    """A damaged cached copy of a remote checkpoint names the cache and says it is fetched again once removed."""
    from pe_jax.checkpoints.verify import CheckpointIntegrityError

    monkeypatch.setenv("PE_JAX_CACHE", str(tmp_path / "cache"))
    s3.put(str(ckpt), "bucket/cached-ckpt", recursive=True)
    load_model("s3://bucket/cached-ckpt")
    chunk = max((p for p in (tmp_path / "cache").rglob("state/**/*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(CheckpointIntegrityError, match=r"downloaded copy of a remote checkpoint.*fetched again"):
        load_model("s3://bucket/cached-ckpt")
