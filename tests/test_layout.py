"""The house rules of the library, checked on its source: no import cycles, the library never imports its
conversion tool (only the CLI calls it), no module uses another's private names, modules and functions
stay small, and no block of lines is written twice."""

import ast
import collections
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The checkout is the installed layout: every module lives where it imports from.
PACKAGES = {"pe_jax": ROOT / "pe_jax"}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# Functions allowed to be longer, each with the reason the README's Layout section gives.
LONG_FUNCTIONS = {}


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()
LIBRARY = MODULES  # the conversion tool and the recipes keep the same house rules


def _imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import statement, at any depth."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names = [a.name for a in node.names]
            # `from pkg import sub` imports the submodule pkg.sub
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
            out += [(s, [], node.lineno) for s in subs]
            rest = [n for n in names if f"{base}.{n}" not in MODULES]
            if rest or not subs:
                out.append((base, rest, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    graph = collections.defaultdict(set)
    for module, path in MODULES.items():
        for target, _, _ in _imports(module, path):
            if target in MODULES and target != module:
                graph[module].add(target)
    return graph


def test_the_library_has_no_import_cycle():
    graph, state, stack, cycles = _graph(), {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_only_the_cli_imports_the_conversion_tool():
    offenders = [f"{m}:{line} imports {t}" for m, p in LIBRARY.items() for t, _, line in _imports(m, p)
                 if t.startswith("pe_jax.convert") and m != "pe_jax.cli" and not m.startswith("pe_jax.convert")]
    assert not offenders, offenders


def test_no_module_uses_another_modules_private_names():
    offenders = []
    for module, path in MODULES.items():
        for target, names, line in _imports(module, path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != module:
                offenders.append(f"{module}:{line} imports {private} from {target}")
            if any(part.startswith("_") and not part.startswith("__") for part in target.split(".")):
                offenders.append(f"{module}:{line} imports the private module {target}")
    assert not offenders, "\n".join(offenders)


def test_modules_and_functions_stay_small():
    long_modules = [f"{m}: {n} lines" for m, p in LIBRARY.items()
                    if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    long_functions = []
    for module, path in LIBRARY.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and f"{module}.{node.name}" not in LONG_FUNCTIONS:
                    long_functions.append(f"{module}.{node.name}: {n} lines")
    assert not long_modules and not long_functions, long_modules + long_functions


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the lines that carry code: no blanks, comments or imports."""
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        if text and not text.startswith(("#", "import ", "from ")):
            out.append((i, text))
    return out


@pytest.mark.parametrize("window", [6])
def test_no_block_of_lines_is_written_twice(window):
    seen, repeats = {}, []
    for module, path in LIBRARY.items():
        lines = _code_lines(path)
        for k in range(len(lines) - window + 1):
            block = tuple(t for _, t in lines[k:k + window])
            if sum(len(t) for t in block) < 120:  # short generic lines (closing brackets, returns) are not code
                continue
            if block in seen:
                first_module, first_k, first_line = seen[block]
                if first_module != module or k - first_k >= window:  # not the same lines seen again
                    repeats.append(f"{module}:{lines[k][0]} repeats {first_module}:{first_line}")
            else:
                seen[block] = (module, k, lines[k][0])
    assert not repeats, "\n".join(repeats)


def test_every_package_folder_is_installed():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(["pe_jax", *p.parent.relative_to(ROOT / "pe_jax").parts])
               for p in (ROOT / "pe_jax").rglob("__init__.py")}
    assert folders - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


# The rooms of the library and the rooms each may import: dependencies point down this table, never back up.
# "base" (config, errors, sharding rules, distributed) is the floor every room stands on.
BASE = {"pe_jax", "pe_jax.config", "pe_jax.sharding", "pe_jax.distributed", "pe_jax.deprecated", "pe_jax.errors"}
MODEL = {"pe_jax.layers", "pe_jax.attention", "pe_jax.modeling", "pe_jax.features", "pe_jax.batching",
         "pe_jax.pretrained"}
PLAN = {"pe_jax.targets", "pe_jax.memory_plan"}
ALLOWED = {
    "base": set(),
    "storage": set(),
    "checkpoints": {"base", "storage"},
    "model": {"base", "storage", "checkpoints"},
    "preprocess": {"storage"},
    "data": {"storage", "preprocess"},
    "evals": {"base", "model", "storage", "data", "preprocess"},
    "train": {"base", "model", "storage", "checkpoints", "data", "preprocess", "evals"},
    "plan": {"base", "model", "train"},
    "embed": {"base", "model", "storage", "checkpoints", "data", "preprocess"},
    "demo": {"base", "model", "storage", "checkpoints", "data", "preprocess", "evals", "train"},
    "configs": {"train", "demo"},
    "convert": {"base", "model", "storage", "checkpoints"},
    "cli": {"base", "model", "plan", "storage", "checkpoints", "data", "preprocess", "evals", "train", "embed",
            "demo", "configs", "convert"},
}


def _room(module: str) -> str:
    if module in BASE:
        return "base"
    if module in MODEL:
        return "model"
    if module in PLAN:
        return "plan"
    if module in ("pe_jax.cli", "pe_jax.cli_args"):
        return "cli"
    return module.split(".")[1]


def test_every_module_has_a_room():
    assert {_room(m) for m in MODULES} <= set(ALLOWED), {m: _room(m) for m in MODULES if _room(m) not in ALLOWED}


def test_the_room_table_has_no_cycle():
    order = []
    while len(order) < len(ALLOWED):
        ready = [r for r in ALLOWED if r not in order and ALLOWED[r] <= set(order)]
        assert ready, f"the rooms {sorted(set(ALLOWED) - set(order))} depend on each other"
        order += ready


def test_rooms_import_only_down_the_table():
    climbs = [f"{m} ({_room(m)}) imports {t} ({_room(t)})" for m, targets in _graph().items() for t in targets
              if _room(t) != _room(m) and _room(t) not in ALLOWED[_room(m)] | {"base"}]
    assert not climbs, "\n".join(sorted(climbs))


STORAGE = ROOT / "pe_jax" / "storage"
RENAMES = {"os": {"replace", "rename", "renames", "link"}, "shutil": {"move"}}


def _renames_into_place(path: Path) -> list[str]:
    """Every rename-into-place in `path`: os.replace/rename/renames/link, shutil.move, any `.rename(`, and a
    pathlib `.replace(` (one positional argument: str.replace takes two) in a module that imports pathlib."""
    text = path.read_text()
    pathlib = "pathlib" in text
    out = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and node.module in RENAMES:
            out += [f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{a.name}" for a in node.names
                    if a.name in RENAMES[node.module]]
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        func, name = node.func, node.func.attr
        owner = func.value.id if isinstance(func.value, ast.Name) else None
        if name in RENAMES.get(owner, ()) or name == "rename" \
                or (name == "replace" and pathlib and len(node.args) == 1 and not node.keywords):
            out.append(f"{path.relative_to(ROOT)}:{node.lineno} calls {owner or '...'}.{name}")
    return out


def test_renames_into_place_live_only_in_the_bytes_room():
    """"Write beside, then rename" is written once (pe_jax.storage.atomic): a crash-safety fix is made there."""
    offenders = [o for p in sorted((ROOT / "pe_jax").rglob("*.py")) if STORAGE not in p.parents
                 for o in _renames_into_place(p)]
    assert not offenders, "rename into place outside pe_jax/storage/ (use pe_jax.storage.atomic):\n" + \
        "\n".join(offenders)
    assert _renames_into_place(STORAGE / "atomic.py"), "the check no longer sees the renames it looks for"


ONE_DEFINITION = ("atomic_write", "write_bytes", "write_text", "write_json", "sweep_temporaries", "read_bytes",
                  "check_regular_file", "temporary_name")
THIN_SWEEPS = ("sweep_stale", "sweep_job")  # the converter's and the embedding job's: uses of the one sweeper


def _called(node: ast.AST) -> set[str]:
    return {n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", "")
            for n in ast.walk(node) if isinstance(n, ast.Call)}


def test_one_definition_of_each_storage_function():
    """One atomic write, one write_json, one sweeper, one read_bytes, one check_regular_file: each defined once,
    in pe_jax/storage/ (a former name elsewhere is an alias, `name = ...`, not a second definition); the
    converter's and the embedding job's sweeps are uses of the one sweeper."""
    defined, thick = collections.defaultdict(list), []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if node.name in ONE_DEFINITION:
                defined[node.name].append(f"{module}:{node.lineno}")
            elif node.name in THIN_SWEEPS and "sweep_temporaries" not in _called(node):
                thick.append(f"{module}:{node.lineno} {node.name} sweeps without storage.atomic.sweep_temporaries")
    twice = {n: where for n, where in defined.items() if len(where) != 1 or not where[0].startswith("pe_jax.storage")}
    assert not twice and not thick, (twice, thick)
    assert set(defined) == set(ONE_DEFINITION), set(ONE_DEFINITION) - set(defined)
