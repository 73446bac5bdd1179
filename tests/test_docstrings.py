"""The public API's docstrings: each says its arguments (Args:) and shows an Example, and the examples run
(doctest), so what a reader copies from `help()` works. Examples that need files a user has (a checkpoint, a
video) are marked `# doctest: +SKIP`; the rest build tiny models (one block, 32 px) and run here."""

import doctest
import importlib
import inspect
import tempfile

import pytest

import pe_jax

# The modules of the public API whose examples run (the entry points below live in them).
MODULES = ["pe_jax.errors", "pe_jax.config", "pe_jax.modeling", "pe_jax.pretrained", "pe_jax.features",
           "pe_jax.memory_plan", "pe_jax.checkpoints.naming", "pe_jax.checkpoints.params", "pe_jax.checkpoints.load",
           "pe_jax.checkpoints.orbax", "pe_jax.preprocess.image", "pe_jax.preprocess.tokenizer",
           "pe_jax.preprocess.video", "pe_jax.preprocess.tiling", "pe_jax.embed.options", "pe_jax.embed.job",
           "pe_jax.embed.output", "pe_jax.convert.convert", "pe_jax.convert.graph_export", "pe_jax.train.loop",
           "pe_jax.cli_args"]

# The entry points beyond `pe_jax`'s own exports: module -> names (None: the module's __all__).
ENTRY_POINTS = {
    "pe_jax.embed": ["run", "embed", "read_embeddings"],
    "pe_jax.convert.convert": None,
    "pe_jax.convert.graph_export": ["export_graph"],
    "pe_jax.train.loop": ["finetune"],
    "pe_jax.memory_plan": ["plan"],
    "pe_jax.pretrained": ["resolve_model", "load_model"],
    "pe_jax.features": ["features"],
    "pe_jax.preprocess": None,
}


def _public_api():
    out = [(f"pe_jax.{name}", getattr(pe_jax, name)) for name in pe_jax.__all__]
    for module_name, names in ENTRY_POINTS.items():
        module = importlib.import_module(module_name)
        out += [(f"{module_name}.{name}", getattr(module, name)) for name in names or module.__all__]
    return out


def _takes_arguments(obj) -> bool:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return True
    return any(p.name not in ("self", "cls") for p in signature.parameters.values())


def test_every_public_name_documents_its_arguments_and_shows_an_example():
    missing = []
    for name, obj in _public_api():
        doc = inspect.getdoc(obj) or ""
        if "Example:" not in doc or (_takes_arguments(obj) and "Args:" not in doc):
            missing.append(name)
    assert not missing, f"docstrings without Args: or Example: {missing}"


@pytest.mark.parametrize("module_name", MODULES)
def test_the_examples_run(module_name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the examples' temporary folders
    module = importlib.import_module(module_name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = [t for t in doctest.DocTestFinder().find(module, module_name) if t.examples]
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {module_name} failed (above)"
