"""The demo command as a newcomer meets it: its help, its optional open_clip check decided before training, and
the libraries' log messages kept out of the terminal unless --verbose."""

import importlib
import logging
import types
import warnings

import pytest

from pe_jax import cli
from pe_jax.cli_args import build_parser
from pe_jax.demo import open_clip_check, shapes


def test_demo_help_reads_right():
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["demo"].format_help().split())
    assert "--no-open-clip skip checking the weights in open_clip" in text
    assert "(default: True)" not in text and "--verbose" in text
    assert build_parser().parse_args(["demo", "--no-open-clip"]).skip_open_clip is True
    assert build_parser().parse_args(["demo"]).skip_open_clip is False


def _demo_without_training(monkeypatch, events):
    def finetune(args, config=None):
        events.append("train")
        return {"eval_top1": 0.975}

    monkeypatch.setattr(cli, "_finetune", finetune)
    monkeypatch.setattr(open_clip_check, "open_clip_agreement", lambda workdir: events.append("check") or (3, 3))


def test_demo_skips_a_broken_torch_before_training(monkeypatch, capsys, tmp_path):
    """torch found on the path but failing to import (a broken install): one line says the check is skipped, the
    probe runs before training, and the demo ends well (exit 0), never 'torch is not installed' after the run."""
    events = []
    _demo_without_training(monkeypatch, events)
    real = importlib.import_module

    def broken(name, *args):
        if name == "torch":
            events.append("probe")
            raise OSError("libtorch_cpu.so: cannot open shared object file")
        return real(name, *args)

    monkeypatch.setattr(open_clip_check, "available", lambda: True)
    monkeypatch.setattr(open_clip_check, "importlib", types.SimpleNamespace(import_module=broken,
                                                                            util=importlib.util))
    assert cli.main(["demo", "--workdir", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert events == ["probe", "train"], events
    assert out[-2].startswith("open_clip check: skipped (torch is installed but does not import: OSError: libtorch")
    assert out[-1] == "zero-shot top-1: 97.5%"


def test_demo_runs_the_check_when_it_can(monkeypatch, capsys, tmp_path):
    events = []
    _demo_without_training(monkeypatch, events)
    monkeypatch.setattr(open_clip_check, "unavailable", lambda: events.append("probe"))
    assert cli.main(["demo", "--workdir", str(tmp_path), "--quiet"]) == 0
    assert events == ["probe", "train", "check"]
    assert "same prediction on 3/3" in capsys.readouterr().out
    events.clear()
    assert cli.main(["demo", "--workdir", str(tmp_path), "--quiet", "--no-open-clip"]) == 0
    assert events == ["train"] and "open_clip check: skipped (--no-open-clip)" in capsys.readouterr().out


class _FirstImage(Exception):
    pass


@pytest.mark.parametrize("quiet", [False, True])
def test_the_demo_shows_its_data_making_before_the_first_image(monkeypatch, capsys, tmp_path, quiet):
    """Making the shapes data takes ~20 s: the demo's lines and a bar of the images (0 of 6320) are out before the
    first image is drawn (the demo stops there); --quiet leaves the bar out."""
    seen = []

    def first_image(*args, **kwargs):
        seen.append(capsys.readouterr())
        raise _FirstImage

    monkeypatch.setattr(shapes, "draw", first_image)
    with pytest.raises(_FirstImage):
        cli.main(["demo", "--workdir", str(tmp_path), "--no-open-clip", *["--quiet"] * quiet])
    out, err = seen[0]
    assert out.startswith("pe-jax demo: a small CLIP") and "preparing the recipe's data" in out, out
    assert ("shapes data:   0%" in err and "0/6320" in err) != quiet, err


def test_third_party_logs_hidden_unless_verbose(monkeypatch, caplog, tmp_path):
    """Orbax's notices (through absl), other libraries' warnings and jax's fork warning stay out of a command's
    output; pe_jax's own warnings and every library's errors stay; --verbose shows everything; the process's
    logging is as it was after the command."""
    from absl import logging as absl_logging

    def command(args):
        absl_logging.warning("Skipping merge of OCDBT checkpoints: No per-process OCDBT checkpoint subdirs found")
        logging.getLogger("orbax.checkpoint").warning("a library notice")
        logging.getLogger("orbax.checkpoint").error("a library error")
        logging.getLogger("pe_jax.checkpoints.verify").warning("our own warning")
        warnings.warn("os.fork() was called. os.fork() is incompatible with multithreaded code", RuntimeWarning,
                      stacklevel=2)

    monkeypatch.setitem(cli.COMMANDS, "verify", command)
    levels = logging.getLogger().level, absl_logging.get_verbosity()
    caplog.set_level(logging.DEBUG, logger="pe_jax")
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        assert cli.main(["verify", str(tmp_path)]) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert "a library error" in messages and "our own warning" in messages, messages
    assert not any("OCDBT" in m or "notice" in m for m in messages) and not shown, (messages, shown)
    assert (logging.getLogger().level, absl_logging.get_verbosity()) == levels

    caplog.clear()
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        assert cli.main(["verify", str(tmp_path), "--verbose"]) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("OCDBT" in m for m in messages) and "a library notice" in messages and len(shown) == 1, messages


def test_a_users_recipe_whose_prepare_takes_no_progress_still_runs(monkeypatch, tmp_path):
    """`prepare(cfg, workdir)`, the hook's shape before the demo's data got a bar, keeps working: the command
    line passes `progress` only to a prepare that takes it."""
    recipe = tmp_path / "mine.py"
    recipe.write_text("import os\nfrom pe_jax.configs.demo_shapes import get_config\n\n"
                      "def prepare(cfg, workdir):\n    os.makedirs(workdir)\n    return cfg\n")
    # stop before training, once the recipe's data is prepared and the inputs are checked
    monkeypatch.setattr(cli, "check_inputs", lambda *a: (_ for _ in ()).throw(_FirstImage()))
    with pytest.raises(_FirstImage):
        cli.main(["finetune", "--config", str(recipe), "--workdir", str(tmp_path / "w"), "--quiet"])
    assert (tmp_path / "w").is_dir()
