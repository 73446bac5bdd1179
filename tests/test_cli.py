"""What a new user meets in the command line: help with defaults and every option explained, the version,
and one-line errors for the common mistakes (no traceback)."""

import argparse

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
