"""pe_jax checkpoint -> a traced program: ONNX (jax2onnx) or StableHLO (`jax.export`), one per tower, weights inside.

Both trace the tower as a function of its input alone, with a symbolic batch dimension, in float32 (a bfloat16
checkpoint is exported as float32: onnxruntime's CPU kernels have no bfloat16 Einsum), then verify what they wrote:
the written file runs on random input at two batch sizes (onnxruntime, or `jax.export.deserialize`) and its output
is compared with pe_jax's. The model's state is merged inside the traced function (`nnx.merge(..., copy=True)`):
its weights become the program's constants, and the live model is never mutated by a tracer.

ONNX needs `pip install -e '.[onnx]'` (in the pe-jax checkout) or, keeping pe-jax's own pins (jax2onnx declares
orbax-checkpoint<0.11.37): `pip install --no-deps jax2onnx==0.17.1 onnx onnx-ir onnxruntime`.
"""

from __future__ import annotations

import functools
import json
import os
import time

import numpy as np

from pe_jax.errors import AlreadyExists, MissingDependency, NotFound, UsageError
from pe_jax.storage.atomic import atomic_folder, rename_into_place

GRAPH_FORMATS = ("onnx", "stablehlo")
TOWERS = ("vision", "text", "both")
SPECS_FILE = "specs.json"  # beside the StableHLO artifacts: each tower's file, input and output specs
ARTIFACT_SUFFIX = ".jax_export"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # jax.export's lowering platforms
VERIFY_BATCHES = (1, 3)  # two batch sizes: the dynamic batch dimension is exercised by the check
_ONNX_INSTALL = "pip install --no-deps jax2onnx==0.17.1 onnx onnx-ir onnxruntime"


def _float32(model):
    """(the model in float32 with XLA attention and no remat, what it was stored in): every tracer and
    onnxruntime take it; bfloat16 weights widen exactly."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pe_jax.config import override

    cfg = model.config
    towers = [cfg.vision, cfg.text] if hasattr(cfg, "text") else [cfg]
    stored = (sorted({t.param_dtype for t in towers}), sorted({t.dtype for t in towers}))
    cfg32 = override(cfg, dtype="float32", param_dtype="float32", attention="xla", remat_policy="none")
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: type(model)(cfg32, rngs=nnx.Rngs(0))))
    state = jax.tree.map(lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                         nnx.state(model))
    return nnx.merge(graphdef, state), stored


class TowerProgram:
    """One tower as a pure function of its input, with the input's spec and a random-input maker."""

    def __init__(self, name: str, module, image_size: int | None = None):
        from flax import nnx

        self.name, self.module = name, module
        self.graphdef, self.state = nnx.split(module)
        self._reference = None  # jitted on first use: see `reference`
        cfg = module.config
        if name == "vision":
            self.input_name, self.dtype = "images", np.float32
            self.shape = (image_size, image_size, 3)
            self.output_name = "embedding" if cfg.pool_type != "none" else "tokens"
        else:
            self.input_name, self.dtype = "tokens", np.int32
            self.shape, self.vocab = (cfg.context_length,), cfg.vocab_size
            self.output_name = "embedding"

    def __call__(self, x):
        from flax import nnx

        return nnx.merge(self.graphdef, self.state, copy=True)(x)

    def example(self, batch: int, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        if self.name == "vision":
            return rng.uniform(-1, 1, (batch, *self.shape)).astype(np.float32)
        return rng.integers(1, self.vocab, (batch, *self.shape)).astype(np.int32)

    def spec(self, batch_name: str = "b"):
        import jax

        (b,) = jax.export.symbolic_shape(batch_name)
        return jax.ShapeDtypeStruct((b, *self.shape), self.dtype)

    def reference(self, x) -> np.ndarray:
        """pe_jax's output, the weights passed as arguments: jitting `self` would close over them, and XLA then
        compiles them in as literals (a 1.4 GB text tower took ~10x its size in RSS and ~75 s per batch size)."""
        import jax
        from flax import nnx

        if self._reference is None:
            graphdef = self.graphdef
            self._reference = jax.jit(lambda state, x: nnx.merge(graphdef, state, copy=True)(x))
        return np.asarray(self._reference(self.state, x))


def _programs(model, tower: str | None, image_size: int | None, ckpt: str) -> list[TowerProgram]:
    is_clip = hasattr(model, "text")
    tower = tower or ("both" if is_clip else "vision")
    if tower not in TOWERS:
        raise UsageError(f"unknown --tower {tower!r}; use one of {', '.join(TOWERS)}")
    if tower != "vision" and not is_clip:
        raise UsageError(f"{ckpt} holds a vision tower alone: --tower {tower} needs a PE-Core CLIP checkpoint")
    visual = model.visual if is_clip else model
    size = image_size or visual.config.image_size
    if size < 1 or size % visual.config.patch_size:
        raise UsageError(f"--image-size {image_size} must be a positive multiple of the patch size "
                         f"{visual.config.patch_size}")
    names = ["vision", "text"] if tower == "both" else [tower]
    return [TowerProgram(n, visual if n == "vision" else model.text, size) for n in names]


def _max_difference(run, program: TowerProgram) -> tuple[float, float]:
    """(max abs, max relative-to-largest) difference of `run(x)` from pe_jax over VERIFY_BATCHES."""
    worst_abs = worst_rel = 0.0
    for batch in VERIFY_BATCHES:
        x = program.example(batch, seed=batch)
        ours, theirs = program.reference(x), np.asarray(run(x))
        if theirs.shape != ours.shape:
            raise RuntimeError(f"the exported {program.name} tower gave shape {theirs.shape}, pe_jax {ours.shape}")
        diff = float(np.max(np.abs(theirs.astype(np.float64) - ours)))
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / max(float(np.max(np.abs(ours))), 1e-30))
    return worst_abs, worst_rel


def _onnx_session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: it warns about every unused initializer jax2onnx leaves
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _write_onnx(program: TowerProgram, path: str, opset: int):
    """Writes `program` to `path` (large weights spill into `path`.data); returns what runs the written file."""
    import logging

    # jax2onnx logs a traceback for each example plugin whose package (equinox, dm_pix) a --no-deps install lacks
    logging.getLogger("jax2onnx.plugins.plugin_system").setLevel(logging.ERROR)
    try:
        from jax2onnx import to_onnx
    except ImportError:
        raise MissingDependency(f"--format onnx needs jax2onnx and onnxruntime: {_ONNX_INSTALL}") from None
    to_onnx(program, [program.spec("B")], model_name=f"pe_jax_{program.name}", opset=opset, return_mode="file",
            output_path=path, input_names=[program.input_name], output_names=[program.output_name])
    session = _onnx_session(path)
    return lambda x: session.run(None, {program.input_name: x})[0]


def _write_stablehlo(program: TowerProgram, path: str, platforms: tuple[str, ...] | None, entry: dict):
    """Writes `program` serialized by `jax.export` to `path` and fills its entry of specs.json; returns what runs
    the written file read back (None when it was lowered for other platforms only)."""
    import jax

    exported = jax.export.export(jax.jit(program), platforms=platforms)(program.spec("b"))
    with open(path, "wb") as f:
        f.write(exported.serialize())
    entry |= {"file": os.path.basename(path), "platforms": list(exported.platforms),
             "inputs": [{"name": program.input_name, "shape": ["b", *program.shape],
                         "dtype": np.dtype(program.dtype).name}],
             "outputs": [{"name": program.output_name, "shape": [str(d) for d in a.shape], "dtype": str(a.dtype)}
                         for a in exported.out_avals]}
    if jax.default_backend() not in exported.platforms:
        return None
    with open(path, "rb") as f:
        return jax.export.deserialize(bytearray(f.read())).call


def _paths(out: str, format: str, names: list[str]) -> dict[str, str]:
    """Where each tower goes: ONNX, one tower: OUT; both: OUT with .vision/.text before its suffix; StableHLO:
    OUT is a folder of TOWER.jax_export files and specs.json."""
    if format == "stablehlo":
        return {n: os.path.join(out, n + ARTIFACT_SUFFIX) for n in names}
    if len(names) == 1:
        return {names[0]: out}
    stem, ext = os.path.splitext(out)
    return {n: f"{stem}.{n}{ext or '.onnx'}" for n in names}


def _check_outputs(targets: list[str], force: bool, format: str):
    """Refuses an existing output unless --force, and --force replaces only what this export writes."""
    for path in targets:
        if not os.path.lexists(path):
            continue
        ours = (os.path.isdir(path) and not os.path.islink(path)
                and set(os.listdir(path)) <= {SPECS_FILE, *(t + ARTIFACT_SUFFIX for t in ("vision", "text"))}
                if format == "stablehlo" else os.path.isfile(path) and not os.path.islink(path)
                and path.endswith(".onnx"))
        if not ours:
            raise AlreadyExists(f"{path} exists and is not a pe-jax {format} export; it is left as it is: "
                                  "choose another output")
        if not force:
            raise AlreadyExists(f"{path} exists; pass --force to replace it")
    parent = os.path.dirname(targets[0])
    if not os.path.isdir(parent):
        raise NotFound(f"output folder {parent} does not exist")


def _commit(staged: str, final: str):
    rename_into_place(staged, final)  # an earlier export, checked by _check_outputs, is replaced
    if os.path.exists(staged + ".data"):  # ONNX weights spilled beside the graph (referenced by file name)
        rename_into_place(staged + ".data", final + ".data")


def _commit_files(paths: dict, stage: str, _out: str):
    for path in paths.values():
        _commit(os.path.join(stage, os.path.basename(path)), path)


def export_graph(ckpt: str, out: str, *, format: str = "onnx", tower: str | None = None,
                 image_size: int | None = None, force: bool = False, verify: bool | None = None,
                 platforms: tuple[str, ...] | None = None, opset: int = 23) -> dict:
    """Exports the towers of pe_jax checkpoint `ckpt` as ONNX or StableHLO, float32, dynamic batch, and checks
    each written file against pe_jax on random input (two batch sizes).

    Args:
        ckpt: a pe_jax checkpoint directory (or anything `pe_jax.load_model` reads).
        out: ONNX: the .onnx file (both towers: OUT.vision.onnx and OUT.text.onnx); StableHLO: a new folder.
        format: "onnx" or "stablehlo".
        tower: "vision", "text" or "both" (default: both for a CLIP, vision for a vision tower).
        image_size: the vision input's side (default: the preset's), a multiple of the patch size.
        force: replace an earlier export of the same format at `out`.
        verify: False skips checking the checkpoint's checksums before loading (trusted storage).
        platforms: StableHLO lowering platforms, e.g. ("cpu", "cuda") (default: this machine's).
        opset: ONNX opset.

    Returns:
        {"towers": {name: {"path", "bytes", "export_seconds", "max_abs_diff", "max_rel_diff"}},
        "note": str | None, "seconds": float (loading and checking included)}.

    Example:
        >>> report = export_graph("pe_b16", "pe_b16.onnx", format="onnx", tower="vision")  # doctest: +SKIP
        >>> report["towers"]["vision"]["max_rel_diff"] < 1e-5  # doctest: +SKIP
        True
    """
    from pe_jax.pretrained import resolve_model

    if format not in GRAPH_FORMATS:
        raise UsageError(f"unknown graph format {format!r}; use one of {', '.join(GRAPH_FORMATS)}")
    unknown = sorted(set(platforms or ()) - set(PLATFORMS))
    if unknown:
        raise UsageError(f"unknown --platforms {', '.join(unknown)}; jax.export lowers for {', '.join(PLATFORMS)}")
    if not str(out).strip():
        raise UsageError("the output path OUT is empty: name it explicitly")
    out = os.path.abspath(out)
    if format == "onnx" and not out.endswith(".onnx"):
        raise UsageError(f"OUT {out} must end in .onnx")
    start = time.perf_counter()
    model, stored = _float32(resolve_model(ckpt).load(verify=verify))
    programs = _programs(model, tower, image_size, ckpt)
    paths = _paths(out, format, [p.name for p in programs])
    _check_outputs([out] if format == "stablehlo" else list(paths.values()), force, format)
    with atomic_folder(out, commit=_commit if format == "stablehlo" else functools.partial(_commit_files, paths)) \
            as stage:  # StableHLO: the folder is the output; ONNX: its files are, each renamed into place
        towers = _export_into(stage, programs, paths, format, platforms, opset)
    note = (None if stored == (["float32"], ["float32"]) else f"weights stored in {', '.join(stored[0])}, computed "
            f"in {', '.join(stored[1])}: exported in float32 throughout (onnxruntime's CPU has no bfloat16 Einsum)")
    return {"towers": towers, "note": note, "seconds": time.perf_counter() - start}


def _export_into(stage: str, programs, paths: dict, format: str, platforms, opset: int) -> dict:
    towers, specs = {}, {}
    for program in programs:
        staged = os.path.join(stage, os.path.basename(paths[program.name]))
        start = time.perf_counter()
        if format == "onnx":
            run = _write_onnx(program, staged, opset)
        else:
            specs[program.name] = {}
            run = _write_stablehlo(program, staged, tuple(platforms) if platforms else None, specs[program.name])
        data = staged + ".data"
        tower = towers[program.name] = {"path": paths[program.name], "export_seconds": time.perf_counter() - start,
                                        "bytes": os.path.getsize(staged) + (os.path.getsize(data)
                                                                            if os.path.exists(data) else 0)}
        if run is not None:  # the written file, run on random input against pe_jax
            tower["max_abs_diff"], tower["max_rel_diff"] = _max_difference(run, program)
            if program.name in specs:
                specs[program.name] |= {k: tower[k] for k in ("max_abs_diff", "max_rel_diff")}
    if format == "stablehlo":
        with open(os.path.join(stage, SPECS_FILE), "w") as f:
            json.dump({"format": "jax.export", "towers": specs}, f, indent=1)
    return towers


def describe(report: dict, format: str) -> list[str]:
    """One line per written tower (path, size, the check's max difference), then the dtype note if any."""
    against = "onnxruntime" if format == "onnx" else "jax.export.deserialize"
    lines = []
    for name, t in report["towers"].items():
        check = (f"{against} vs pe_jax at batch {' and '.join(map(str, VERIFY_BATCHES))}: max abs diff "
                 f"{t['max_abs_diff']:.2g} (relative {t['max_rel_diff']:.2g})" if "max_abs_diff" in t
                 else "not run here (another platform)")
        lines.append(f"wrote {t['path']} ({name} tower, {t['bytes'] / 2**20:.1f} MiB); {check}")
    if report["note"]:
        lines.append(f"note: {report['note']}")
    return lines


__all__ = ["GRAPH_FORMATS", "describe", "export_graph"]
