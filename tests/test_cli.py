"""What a new user meets in the command line: help with defaults and every option explained, the version,
and one-line errors for the common mistakes (no traceback)."""

import argparse
import contextlib
import functools
import http.server
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from pe_jax import __version__
from pe_jax.cli import build_parser, main


def _subparsers(parser):
    for action in parser._actions:  # argparse keeps its sub-commands here
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def _every_command(parser=None, prefix=()):
    parser = parser or build_parser()
    found = False
    for name, sub in _subparsers(parser):
        found = True
        yield from _every_command(sub, (*prefix, name))
    if not found:
        yield prefix, parser


def test_every_option_has_help_and_defaults_are_shown():
    commands = dict(_every_command())
    assert {c[0] for c in commands} >= {"convert", "export", "finetune", "demo", "plan", "eval", "embed"}
    assert ("eval", "retrieval") in commands and ("eval", "zeroshot") in commands
    for name, parser in commands.items():
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{' '.join(name)} {action.option_strings[0]} has no help"
    embed_help = commands[("embed",)].format_help()
    assert "(default: 32)" in embed_help and "(default: float16)" in embed_help


def test_top_level_help_version_and_recipes(capsys):
    top = build_parser().format_help()
    assert "retrieval" in top and "zeroshot" in top
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"pe-jax {__version__}"
    finetune_help = dict(_every_command())[("finetune",)].format_help()
    for recipe in ("classification", "clip_contrastive", "demo_shapes", "linear_probe"):
        assert recipe in finetune_help


@pytest.mark.parametrize("argv,message", [
    (["eval", "zeroshot", "--checkpoint", "/nonexistent/ckpt", "--data", "."], "checkpoint not found"),
    (["eval", "zeroshot", "--checkpoint", ".", "--data", "/nonexistent/data"], "no image folder or CSV"),
    (["export", "/nonexistent/ckpt", "out.safetensors"], "/nonexistent/ckpt"),
    (["plan", "--model", "PE-Core-B16-224", "--mesh", "fsdp=2", "--batch", "0"], "--batch must be >= 1"),
    (["eval", "retrieval", "--embeddings", ".", "--labels", "x", "-k", "0"], "-k values must be >= 1"),
    (["eval", "retrieval", "--embeddings", ".", "--labels", "x", "-k", "a"], "comma-separated integers"),
])
def test_common_mistakes_are_one_line_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_bug_keeps_its_traceback_a_user_error_is_one_line(capsys, monkeypatch):
    """Only a PeJaxError (or the file system's refusal of a path the user gave) is one line: a TypeError or a
    ValueError from a bug inside a command keeps its traceback; --debug shows a user error's traceback too."""
    import pe_jax
    from pe_jax import cli
    from pe_jax.errors import PeJaxError, UsageError

    assert pe_jax.PeJaxError is PeJaxError and issubclass(UsageError, ValueError)

    def bug(args):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setitem(cli.COMMANDS, "verify", bug)
    with pytest.raises(TypeError, match="unsupported operand"):
        main(["verify", "x"])
    monkeypatch.setitem(cli.COMMANDS, "verify", lambda args: {}["missing key"])
    with pytest.raises(KeyError):
        main(["verify", "x"])

    def mistake(args):
        raise UsageError("--batch-size must be >= 1, got 0")

    monkeypatch.setitem(cli.COMMANDS, "verify", mistake)
    assert main(["verify", "x"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "pe-jax verify: error: --batch-size must be >= 1, got 0"
    assert main(["--debug", "verify", "x"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "in mistake" in err and err.strip().endswith("got 0")


def test_the_file_systems_refusals_are_one_line(capsys, tmp_path, monkeypatch):
    """An OSError the OS raised for a path the user gave (an --output in a missing folder) stays one line, named
    at the command line's boundary; a missing embeddings folder is the library's own NotFound."""
    from pe_jax import cli

    missing = tmp_path / "no-folder" / "metrics.json"
    monkeypatch.setitem(cli.COMMANDS, "verify", lambda args: open(missing, "w"))
    assert main(["verify", "x"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"pe-jax verify: error: cannot use {missing}: No such file or directory", err
    monkeypatch.undo()
    assert main(["eval", "retrieval", "--embeddings", str(tmp_path / "none"), "--labels", "x"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "none" in err, err


def test_choices_are_the_librarys_constants():
    """Every `choices=` of the command line is the library's own constant (those in modules that load jax are
    spelled in pe_jax.cli_args for a fast --help, and held equal here)."""
    import subprocess
    import sys

    from pe_jax import cli_args, config, sharding, targets
    from pe_jax.checkpoints.naming import NAMINGS
    from pe_jax.convert import graph_export
    from pe_jax.embed import layout, options
    from pe_jax.evals import retrieval
    from pe_jax.features import POOLINGS

    assert cli_args.STRATEGIES == sharding.STRATEGIES and cli_args.POOLINGS == POOLINGS
    assert cli_args.NORMALIZATIONS == retrieval.NORMALIZATIONS and cli_args.GRAPH_TOWERS == graph_export.TOWERS
    assert cli_args.EXPORT_FORMATS == (*NAMINGS, *graph_export.GRAPH_FORMATS)
    commands = dict(_every_command())
    choices = {(c, a.dest): tuple(a.choices) for c, p in commands.items() for a in p._actions if a.choices}
    assert choices[("embed",), "modality"] == layout.MODALITIES and choices[("embed",), "layout"] == layout.LAYOUTS
    assert choices[("embed",), "engine"] == options.ENGINES and choices[("embed",), "dtype"] == options.DTYPES
    assert choices[("embed",), "pooling"] == POOLINGS and choices[("plan",), "strategy"] == sharding.STRATEGIES
    assert choices[("plan",), "remat"] == config.RematPolicy.__args__
    assert choices[("plan",), "target"] == tuple(targets.TARGETS)
    assert choices[("export",), "format"] == (*NAMINGS, *graph_export.GRAPH_FORMATS)
    assert choices[("eval", "retrieval"), "normalization"] == retrieval.NORMALIZATIONS
    # the parser alone loads neither jax nor numpy: --help stays fast
    probe = "import sys; from pe_jax.cli_args import build_parser; build_parser(); print('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"


# Bad invocations of each command that must fail in one line before jax loads (a newcomer's typo is answered in
# about a second, not after jax and the model have loaded). {tmp}: a folder holding `imgs/cat/a.png`.
BEFORE_JAX = [
    (["embed", "--checkpoint", "{tmp}/ckpt", "--input", "{tmp}/none", "--output", "{tmp}/o"], "input not found"),
    (["embed", "--checkpoint", "{tmp}/ckpt", "--input", "{tmp}/imgs", "--output", "{tmp}/o"], "checkpoint not found"),
    (["embed", "--checkpoint", "{tmp}/imgs", "--input", "{tmp}/imgs", "--output", "{tmp}/o", "--batch-size", "0"],
     "--batch-size must be >= 1"),
    (["embed", "--checkpoint", "{tmp}/imgs", "--input", "{tmp}/imgs", "--output", "{tmp}/o"],
     "not a pe_jax checkpoint"),
    (["finetune", "--config", "no_such_recipe", "--workdir", "{tmp}/w"], "no shipped config"),
    (["finetune", "--config", "classification", "--workdir", "{tmp}/w", "--set", "optim.learning_rate=abc"],
     "expects float"),
    (["finetune", "--config", "classification", "--workdir", "{tmp}/w", "--set", "data.train={tmp}/none"],
     "input not found"),
    (["finetune", "--config", "classification", "--workdir", "{tmp}/w", "--set", "data.train={tmp}/imgs",
      "--set", "data.eval={tmp}/imgs", "--set", "model.checkpoint={tmp}/ckpt"], "checkpoint not found"),
    (["eval", "zeroshot", "--checkpoint", "{tmp}/ckpt", "--data", "{tmp}/none"], "no image folder or CSV"),
    (["eval", "zeroshot", "--checkpoint", "{tmp}/ckpt", "--data", "{tmp}/imgs"], "checkpoint not found"),
    (["eval", "retrieval", "--embeddings", "{tmp}/none", "--labels", "label"], "not an embedding job"),
    (["eval", "retrieval", "--queries", "{tmp}/imgs", "--checkpoint", "{tmp}/ckpt", "--labels", "label"],
     "checkpoint not found"),
    (["eval", "retrieval", "--queries", "{tmp}/imgs", "--checkpoint", "{tmp}/ckpt", "--labels", "label",
      "--pooling", "max"], "unknown --pooling max"),
    (["convert", "{tmp}/none.safetensors", "{tmp}/dst"], "checkpoint not found"),
    (["export", "{tmp}/ckpt", "{tmp}/out.safetensors"], "checkpoint not found"),
    (["export", "{tmp}/ckpt", "{tmp}/out.onnx", "--format", "onnx", "--dtype", "bfloat16"], "exports float32"),
    (["plan", "--model", "PE-Core-B16-224", "--mesh", "fsdp=2", "--batch", "0"], "--batch must be >= 1"),
    (["plan", "--model", "no-such-preset", "--mesh", "fsdp=2"], "unknown vision preset"),
    (["plan", "--model", "PE-Core-B16-224"], "plan needs --mesh"),
    (["index", "--embeddings", "{tmp}/none", "--output", "{tmp}/idx"], "no manifest.json"),
    (["search", "--index", "{tmp}/none", "--checkpoint", "{tmp}/ckpt", "--text", "a cat"], "no faiss index"),
    # a --mesh's syntax: pure Python (its parser in pe_jax.config), no jax needed
    (["embed", "--checkpoint", "{tmp}/imgs", "--input", "{tmp}/imgs", "--output", "{tmp}/o", "--mesh", "data=x"],
     "bad mesh axis 'data=x'"),
    (["embed", "--checkpoint", "{tmp}/imgs", "--input", "{tmp}/imgs", "--output", "{tmp}/o", "--mesh",
      "data=4,model"], "bad mesh axis 'model'"),
    (["embed", "--checkpoint", "{tmp}/imgs", "--input", "{tmp}/imgs", "--output", "{tmp}/o", "--mesh", "foo=0"],
     "unknown mesh axes ['foo']"),
    (["plan", "--model", "PE-Core-B16-224", "--mesh", "fsdp=0"], "sizes are integers >= 1"),
    (["plan", "--model", "PE-Core-B16-224", "--mesh", "fsdp=2,data=-1"], "explicit mesh sizes"),
    (["finetune", "--config", "classification", "--workdir", "{tmp}/w", "--set", "mesh=fsdp=2,fsdp=4"],
     "axis fsdp given twice"),
]
# A checkpoint URL is checked before jax too (the model loads after jax): {http} is a local web server that answers
# 404, {closed} a port nobody listens on. They need fsspec and aiohttp (the cloud extra).
URL_CASES = [
    (["embed", "--checkpoint", "{http}/ckpt.safetensors", "--input", "{tmp}/imgs", "--output", "{tmp}/o"],
     "checkpoint not found: {http}/ckpt.safetensors"),
    (["eval", "zeroshot", "--checkpoint", "{http}/ckpt", "--data", "{tmp}/imgs"], "checkpoint not found: {http}/ckpt"),
    (["embed", "--checkpoint", "{closed}/ckpt", "--input", "{tmp}/imgs", "--output", "{tmp}/o"],
     "{closed}/ckpt: cannot reach the server"),
]
CLOUD = all(importlib.util.find_spec(m) for m in ("fsspec", "aiohttp"))


@contextlib.contextmanager
def _not_found_server(folder):
    """A web server of the empty `folder` (every path 404), on a free local port; yields its URL."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_bad_invocations_fail_in_one_line_before_jax_loads(tmp_path):
    """One subprocess runs every bad invocation (a process each would cost a second of imports apiece): each
    exits 2 with one line, and jax is still not imported after all of them."""
    from PIL import Image

    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "cat" / "a.png")
    (tmp_path / "web").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed when the block ends: refused
    with _not_found_server(tmp_path / "web") as web:
        names = {"{tmp}": str(tmp_path), "{http}": web, "{closed}": closed}
        fill = lambda text: functools.reduce(lambda t, kv: t.replace(*kv), names.items(), text)
        cases = [([fill(a) for a in argv], fill(message)) for argv, message in BEFORE_JAX + URL_CASES * CLOUD]
        report = _run_before_jax(cases, tmp_path)
    for (argv, message), (rc, err) in zip(cases, report["results"], strict=True):
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, rc, err)
    assert not report["jax"], "a bad invocation imported jax before failing"


def _run_before_jax(cases, cwd) -> dict:
    """Runs `pe_jax.cli.main` on each case in one fresh interpreter: [exit status, stderr] each, and whether jax
    was imported."""
    script = (
        "import contextlib, io, json, sys\n"
        "from pe_jax.cli import main\n"
        "out = []\n"
        f"for argv, _ in {cases!r}:\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):\n"
        "        rc = main(argv)\n"
        "    out.append([rc, err.getvalue()])\n"
        "print(json.dumps({'results': out, 'jax': 'jax' in sys.modules}))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env=dict(os.environ, PE_JAX_NET_TIMEOUT="5"))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_demo_speaks_within_a_second(tmp_path):
    """`pe-jax demo` prints what it does before probing torch and making its data (tens of seconds)."""
    proc = subprocess.Popen([sys.executable, "-m", "pe_jax.cli", "demo", "--workdir", str(tmp_path / "d"),
                             "--no-open-clip"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        start = time.monotonic()
        first = proc.stdout.readline()
        elapsed = time.monotonic() - start
    finally:
        proc.kill()
        proc.wait()
    assert first.startswith("pe-jax demo: a small CLIP trained on synthetic shapes"), first
    assert elapsed < 5, f"first line after {elapsed:.1f} s"  # ~0.5 s on an idle CPU; margin for a loaded one


def test_a_backend_that_cannot_start_is_one_line(monkeypatch, capsys):
    """JAX_PLATFORMS=tpu on a host without a TPU ended in jax's traceback: one line naming the variable."""
    import jax

    def no_tpu(*args, **kwargs):
        raise RuntimeError("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so: libtpu.so: cannot "
                           "open shared object file: No such file or directory (set JAX_PLATFORMS='' to "
                           "automatically choose an available backend)")

    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    monkeypatch.setattr(jax, "device_count", no_tpu)
    assert main(["plan", "--model", "PE-Core-B16-224", "--mesh", "fsdp=2", "--batch", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pe-jax plan: error: JAX_PLATFORMS=tpu: Unable to initialize backend 'tpu'"), err
    assert len(err.strip().splitlines()) == 1
