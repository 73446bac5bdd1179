"""The `pe-jax` command line: every subcommand's arguments, help (with defaults) and the name of the function
in `pe_jax.cli` that runs it (`args.run`); and the checks of the arguments that need neither jax nor a model
(`check_args`), run before a command starts so that a typo fails in one line within a second."""

from __future__ import annotations

import argparse

from pe_jax import storage
from pe_jax.config import AttentionImpl, RematPolicy, parse_mesh, vision_config
from pe_jax.embed.layout import LAYOUTS, MODALITIES
from pe_jax.embed.options import DTYPES, ENGINES
from pe_jax.errors import NotFound, UsageError, check_positive
from pe_jax.targets import TARGETS

# Choices whose constants live in modules that load jax or numpy (or in the conversion tool, which only
# pe_jax.cli imports): written here so that `pe-jax --help` starts in a blink; tests/test_cli.py holds them equal
# to the library's (sharding.STRATEGIES, features.POOLINGS, evals.retrieval.NORMALIZATIONS,
# checkpoints.naming.NAMINGS and convert.graph_export's).
STRATEGIES = ("dp", "fsdp", "fsdp_tp")
POOLINGS = ("attn", "mean", "cls")
NORMALIZATIONS = ("min_k_nrel", "nrel", "hits")
GRAPH_TOWERS = ("vision", "text", "both")
EXPORT_FORMATS = ("original", "timm", "open_clip", "perception_lm", "pe_video", "pe_audio_video", "pe_av", "onnx",
                  "stablehlo")


class _Help(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (when it has one), keeps descriptions as written."""

    def _get_help_string(self, action):
        shown = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
        return f"{action.help} (default: {action.default})" if shown else action.help


def _recipes() -> str:
    from importlib import resources

    names = sorted(f.name[:-3] for f in resources.files("pe_jax.configs").iterdir()
                   if f.name.endswith(".py") and not f.name.startswith("_"))
    return ", ".join(names)


def _add(sub, name: str, help: str, run: str, description: str | None = None) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=description or help, formatter_class=_Help)
    p.set_defaults(run=run)
    p.add_argument("--verbose", action="store_true", help="show the libraries' log messages (XLA, Orbax, Ray)")
    return p


def _quiet(p):
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _checkpoint(p, required: bool = True):
    p.add_argument("--checkpoint", required=required,
                   help="a pe_jax checkpoint directory, or a PyTorch file (.pt, .safetensors, index.json, hf://); "
                   "a path or a URL (s3://, gs://, https://)")
    p.add_argument("--model", help="preset name: needed for a PyTorch file; for a pe_jax checkpoint it must "
                   "agree with the checkpoint's config")
    _no_verify(p)


def _no_verify(p):  # args.verify: False, or None (verify unless PE_JAX_VERIFY=0)
    p.add_argument("--no-verify", dest="verify", action="store_const", const=False, default=None,
                   help="trusted storage: skip checking a pe_jax checkpoint's checksums before loading it")


def _conversion_commands(sub):
    p = _add(sub, "convert", "PyTorch checkpoint (.pt, safetensors, hf://) -> pe_jax Orbax checkpoint", "convert")
    p.add_argument("src", help="a .pt / .safetensors / *.safetensors.index.json file or its URL (s3://, gs://, "
                   "https://), or hf://ORG/REPO[:FILE]")
    p.add_argument("dst", help="output checkpoint directory")
    p.add_argument("--model", help="preset name (default: inferred from the tensor shapes)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the stored weights")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--source-sha256", action="store_true",
                   help="also record the source file's sha256 in pe_jax.json (~1.3 GB/s of extra CPU)")
    p.add_argument("--allow-non-finite", action="store_true",
                   help="convert weights holding NaN or Inf (refused by default; recorded, and every load warns)")
    _quiet(p)
    p = _add(sub, "export", "pe_jax checkpoint -> PyTorch safetensors (original, timm or open_clip naming)", "export")
    p.add_argument("ckpt", help="pe_jax checkpoint directory")
    p.add_argument("out", help="output .safetensors file (onnx: a .onnx file; stablehlo: a new folder)")
    p.add_argument("--format", default="original",
                   choices=EXPORT_FORMATS,
                   help="the PyTorch naming to write (timm and the towers inside other models: the vision tower "
                        "alone; perception_lm: model.vision_tower.timm_model.*)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written tensors (default: the checkpoint's)")
    p.add_argument("--tower", choices=GRAPH_TOWERS, help="onnx, stablehlo: the towers to export "
                   "(default: both for a CLIP; onnx writes OUT.vision.onnx and OUT.text.onnx then)")
    p.add_argument("--image-size", type=int, help="onnx, stablehlo: the vision input's side (default: the preset's)")
    p.add_argument("--platforms", help="stablehlo: lowering platforms, e.g. cpu,cuda (default: this machine's)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    _no_verify(p)
    p = _add(sub, "verify", "check a pe_jax checkpoint's files against its checksums (no model is loaded)", "verify")
    p.add_argument("ckpt", help="pe_jax checkpoint directory (a PyTorch file: prints the sha256 of its bytes)")


def _training_commands(sub):
    p = _add(sub, "finetune", "finetune a model from a config recipe; resumes in the same workdir", "finetune",
             description="Finetune a model from a config recipe; rerun the same command to resume.\n\n"
             f"Shipped recipes (--config NAME): {_recipes()}; or a file configs/NAME.py defining get_config().")
    p.add_argument("--config", required=True, help="a config file (configs/NAME.py) or a shipped recipe's name")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and the final model go here")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. optim.learning_rate=1e-4 or model.overrides.vision_layers=2")
    _quiet(p)
    p = _add(sub, "demo", "train a small PE-Core CLIP on synthetic shapes from scratch and test zero-shot on "
             "unseen colour x shape combinations (about 7-8 minutes on 2 CPU cores)", "demo")
    p.add_argument("--workdir", default="pe-jax-demo", help="where the data, checkpoints and model go")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a field of the demo_shapes recipe (pe_jax/configs/demo_shapes.py)")
    p.add_argument("--no-open-clip", dest="skip_open_clip", action="store_true",
                   help="skip checking the weights in open_clip (without this flag the check runs where torch, "
                   "timm and open_clip import)")
    _quiet(p)
    p = _add(sub, "plan", "compile a model for a mesh from abstract shapes and print per-device memory; with "
             "--target, by that TPU's or GPU's own compiler, against its HBM", "plan")
    p.add_argument("--model", required=True, help="preset name, e.g. PE-Core-G14-448")
    p.add_argument("--target", choices=list(TARGETS), metavar="TARGET",
                   help=f"compile for this accelerator slice ({', '.join(TARGETS)}); TPUs need "
                   '`pip install "jax[tpu]"`, GPUs `pip install "jax[cuda12]"`')
    p.add_argument("--slices", type=int, default=1, help="with --target: that many slices (multi-slice)")
    p.add_argument("--hbm-gib", type=float, help="plan against this HBM per chip instead of the target's")
    p.add_argument("--mesh", help="mesh axis sizes, e.g. fsdp=8 or fsdp=4,model=2 (or data=N); "
                   "default with --target: every chip on fsdp")
    p.add_argument("--batch", type=int, default=64, help="global batch size")
    p.add_argument("--max-batch", action="store_true",
                   help="with --target: find the largest global batch that fits (a few compiles)")
    p.add_argument("--attention", default="auto", choices=list(AttentionImpl.__args__),
                   help="attention backend; auto: splash on TPU, cuDNN on GPU, XLA on CPU")
    p.add_argument("--strategy", default="fsdp", choices=STRATEGIES, help="sharding rules")
    p.add_argument("--train", action="store_true", help="compile the finetuning step instead of the forward pass")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--remat", default="nothing_saveable", help="rematerialization policy of the blocks",
                   choices=list(RematPolicy.__args__))
    p.add_argument("--image-size", type=int, default=None, help="input resolution (default: the preset's)")


def _eval_commands(sub):
    p = sub.add_parser("eval", help="evaluations: zeroshot (classification), retrieval (kNN metrics)",
                       formatter_class=_Help)
    evals = p.add_subparsers(dest="evaluation", required=True, metavar="EVALUATION")
    z = _add(evals, "zeroshot", "zero-shot classification accuracy on an image folder or CSV", "eval_zeroshot")
    _checkpoint(z)
    z.add_argument("--data", required=True, help="folder with one sub-folder per class, or a CSV of path,label")
    z.add_argument("--templates", default="imagenet", choices=["imagenet", "simple"],
                   help="the 80 OpenAI ImageNet templates, or 'a photo of a {}.'")
    z.add_argument("--batch-size", type=int, default=32, help="images per device batch")
    z.add_argument("--output", help="write the metrics as JSON here")
    _quiet(z)
    r = _add(evals, "retrieval", "kNN retrieval metrics (P@K, R@K, Hit@K, mAP@K) of embedding jobs, or of "
             "images over several layers and poolings at once", "eval_retrieval")
    source = r.add_mutually_exclusive_group(required=True)
    source.add_argument("--embeddings", help="output folder of pe-jax embed (the queries)")
    source.add_argument("--queries", help="images instead: a folder per class, or a list file with the --labels "
                        "column; every (layer, pooling) pair is evaluated from one pass (needs --checkpoint)")
    r.add_argument("--gallery", help="a separate gallery, of the same kind as the queries (default: leave-one-out)")
    r.add_argument("--checkpoint", help="with --queries: a pe_jax checkpoint or PyTorch file")
    r.add_argument("--model", help="with --queries: preset name (needed for a PyTorch file)")
    r.add_argument("--layers", default="-1", help="with --queries: comma-separated blocks (negative: from the end)")
    r.add_argument("--pooling", default="attn,mean", help="with --queries: comma-separated poolings among attn "
                   "(the model's head, last layer only), mean, cls")
    r.add_argument("--batch-size", type=int, default=32, help="with --queries: images per device batch")
    r.add_argument("--labels", required=True, help="metadata column holding the label")
    r.add_argument("-k", default="1,5,10", help="comma-separated K values")
    r.add_argument("--normalization", default="min_k_nrel", choices=NORMALIZATIONS,
                   help="AP@K denominator: min(K, relevant), relevant, or hits in the top K")
    r.add_argument("--output", help="write the metrics as JSON here")
    r.add_argument("--neighbours", help="write each query's top-K neighbour keys as JSONL here")


def _embed_command(sub):
    p = _add(sub, "embed", "embed a folder, list, tar shards or texts; resumable, parts + manifest", "embed")
    _checkpoint(p)
    p.add_argument("--input", required=True, help="folder, list (txt/csv/jsonl/parquet), 'shards/{000..009}.tar', "
                   "or texts (txt/jsonl/csv) with --modality text; a path or a URL (s3://bucket/shards/{000..009}.tar)")
    p.add_argument("--output", required=True, help="output folder, or an object-store URL (s3://bucket/emb/)")
    p.add_argument("--modality", default="image", choices=MODALITIES, metavar="MODALITY",
                   help="image, text, video, or image,text: each sample's image and caption in one pass (tar shards "
                   "with .txt captions, lists with a caption column), row-aligned")
    p.add_argument("--layout", default="pe-jax", choices=LAYOUTS, help="pe-jax: embeddings/, "
                   "text_embeddings/, metadata/ part-N files; clip-retrieval: img_emb/img_emb_{i}.npy, "
                   "text_emb/text_emb_{i}.npy, metadata/metadata_{i}.parquet (image_path, caption, ...)")
    p.add_argument("--batch-size", type=int, default=32, help="inputs per device batch")
    p.add_argument("--part-size", type=int, default=1000, help="items per output part (tar inputs: one part per shard)")
    p.add_argument("--dtype", default="float16", choices=DTYPES, help="dtype of the stored rows")
    p.add_argument("--no-normalize", action="store_true", help="store raw features instead of unit-norm ones")
    p.add_argument("--layer-idx", type=int, default=None, help="features of this block (negative: from the end) "
                   "instead of the last")
    p.add_argument("--pooling", choices=POOLINGS, default=None,
                   help="attn: the model's head (last layer); mean: mean patch token; cls: class token "
                   "(default: attn where the model has a head and the layer is the last, else mean)")
    p.add_argument("--tiles", type=int, default=0, metavar="N", help="PE-Lang tiling (PerceptionLM's thumbnail + "
                   "up to N tiles of the tower's image size): a row is the thumbnail's feature (default 0: no tiling)")
    p.add_argument("--tile-features", action="store_true", help="with --tiles: also encode the tiles, writing "
                   "tiles/part-N.npy [rows, N, width] (zeros past each grid) and tile_cols/tile_rows metadata columns")
    p.add_argument("--mesh", default=None, help="local mesh, e.g. data=8 (default: one device)")
    p.add_argument("--workers", type=int, default=4, help="decoding threads")
    p.add_argument("--join", action="store_true", help="share the output folder with other --join processes of "
                   "the same job: each takes only parts nobody holds (without it, a busy folder is refused)")
    p.add_argument("--engine", default="local", choices=ENGINES, help="local: this host (or each process "
                   "of a jax.distributed job); ray: actors on a Ray cluster (pip install -e '.[ray]' in the checkout)")
    p.add_argument("--ray-address", default=None, help="the Ray cluster: auto, or ray://HOST:PORT (default: the "
                   "cluster this process is in, else a new local one)")
    p.add_argument("--actors", type=int, default=None, help="Ray actors, each holding the model (default: one per "
                   "node, or per --accelerators-per-actor GPUs)")
    p.add_argument("--accelerators-per-actor", type=int, default=0, help="GPUs (or TPU chips) per Ray actor; 0: CPU")
    _quiet(p)


def _search_commands(sub):
    p = _add(sub, "index", "build a faiss index of an embedding job's rows (pip install -e '.[index]' in the "
             "checkout); large jobs: autofaiss on img_emb/ in its own environment", "index")
    p.add_argument("--embeddings", required=True, help="the embedding job's output folder (either --layout)")
    p.add_argument("--output", required=True, help="the index folder: knn.index and pe_jax_index.json")
    p.add_argument("--tower", choices=["image", "text"], default=None,
                   help="which rows of an image,text job (default: image)")
    p.add_argument("--factory", default="Flat", help="faiss index_factory string: Flat (exact), HNSW32, IVF256,Flat")
    p = _add(sub, "search", "the rows nearest a text or image query, encoded with the job's checkpoint and "
             "settings; prints rank, score, key and caption", "search")
    p.add_argument("--index", required=True, help="a folder made by pe-jax index, or a faiss index file "
                   "(autofaiss's knn.index, then with --embeddings)")
    p.add_argument("--embeddings", default=None, help="the embedding job's folder (default: the one pe-jax index "
                   "recorded)")
    _checkpoint(p)
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a text query")
    query.add_argument("--image", help="an image file as the query")
    p.add_argument("-k", type=int, default=10, help="how many rows")
    p.add_argument("--json", action="store_true", help="one JSON object a hit (with its metadata) instead of a table")


def build_parser() -> argparse.ArgumentParser:
    from pe_jax import __version__

    parser = argparse.ArgumentParser(prog="pe-jax", description="Perception Encoder in JAX: tools.",
                                     formatter_class=_Help)
    parser.add_argument("--version", action="version", version=f"pe-jax {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="on an error the user can fix, print its traceback too (a bug always shows one)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _conversion_commands(sub)
    _training_commands(sub)
    _eval_commands(sub)
    _embed_command(sub)
    _search_commands(sub)
    return parser


# ------------------------------------------------------------------------------- the checks before a command runs


def check_args(args) -> None:
    """The checks of a command's flags, inputs and local checkpoint that need neither jax nor a model, run by
    `pe_jax.cli.main` before the command starts: a typo or a missing path fails in one line within a second,
    not after jax and the model have loaded. Inputs are checked before the checkpoint. What needs jax (a mesh's
    device count) or the model (a CLIP where a vision tower was given) is checked by the command.

    Args:
        args: the parsed command line (`build_parser().parse_args(argv)`).

    Example:
        >>> check_args(build_parser().parse_args(["plan", "--model", "PE-Core-T16-384", "--batch", "0"]))
        Traceback (most recent call last):
        ...
        pe_jax.errors.UsageError: --batch must be >= 1, got 0
    """
    check = _CHECKS.get(args.run)
    if check is not None:
        check(args)


def check_local_checkpoint(path) -> None:
    """A checkpoint checked from this host before jax loads: a local path by `pe_jax.pretrained.check_checkpoint`;
    a URL (s3://, gs://, https://) exists and its server answers, within PE_JAX_NET_TIMEOUT (`storage.exists`;
    fetched later, when the model loads). hf:// is checked where it is fetched."""
    if path is None or str(path).startswith("hf://"):
        return
    if storage.is_url(path):
        if not storage.exists(path):
            raise NotFound(f"checkpoint not found: {path}")
        return
    from pe_jax.pretrained import check_checkpoint

    check_checkpoint(path)


def check_inputs(*sources: str | None) -> None:
    """Each input given exists: a folder, a file, or every shard of a tar pattern (`pe_jax.data.sources.classify`)."""
    from pe_jax.data.sources import classify

    for src in filter(None, sources):
        classify(src)


def integers(text: str, flag: str) -> list[int]:
    """Comma-separated integers of `flag` ("1,5,10")."""
    try:
        return [int(k) for k in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated integers, got {text!r}") from None


def _check_zeroshot(args):
    check_positive(batch_size=args.batch_size)
    if not storage.exists(args.data):
        raise NotFound(f"no image folder or CSV at {args.data}")
    check_local_checkpoint(args.checkpoint)


def _check_retrieval(args):
    if any(k < 1 for k in integers(args.k, "-k")):
        raise UsageError(f"-k values must be >= 1, got {args.k}")
    if args.queries is None:  # embeddings: read (without jax) by the command
        return
    for src in filter(None, (args.queries, args.gallery)):
        if not storage.exists(src):
            raise NotFound(f"no image folder or list at {src}")
    if args.checkpoint is None:
        raise UsageError("retrieval from images (--queries) needs --checkpoint")
    check_positive(batch_size=args.batch_size)
    integers(args.layers, "--layers")
    unknown = sorted(set(args.pooling.split(",")) - set(POOLINGS))
    if unknown:
        raise UsageError(f"unknown --pooling {','.join(unknown)}; use {', '.join(POOLINGS)}")
    check_local_checkpoint(args.checkpoint)


def _check_plan(args):
    check_positive(batch=args.batch)
    vision_config(args.model)  # an unknown preset is refused, naming the presets
    if not args.target and not args.mesh:
        raise UsageError("plan needs --mesh (e.g. fsdp=8), or a --target whose chips it can default to")
    sizes = parse_mesh(args.mesh) if args.mesh else {}
    if not args.target and -1 in sizes.values():
        raise UsageError("plan needs explicit mesh sizes (no -1): it builds that many fake devices")
    if not args.target and args.max_batch:
        raise UsageError("--max-batch needs a --target (whose HBM to fill)")


def _check_export(args):
    if args.format in ("onnx", "stablehlo"):
        if args.dtype not in (None, "float32"):
            raise UsageError(f"--format {args.format} exports float32 (a bfloat16 checkpoint is widened); drop "
                             "--dtype")
    elif args.tower or args.image_size or args.platforms:
        raise UsageError("--tower, --image-size and --platforms apply to --format onnx and stablehlo")
    check_local_checkpoint(args.ckpt)


def _check_embed(args):  # the options, the input and the checkpoint: pe_jax.cli._embed, before jax too
    if args.mesh:
        parse_mesh(args.mesh)


_CHECKS = {"eval_zeroshot": _check_zeroshot, "eval_retrieval": _check_retrieval, "plan": _check_plan,
           "export": _check_export, "embed": _check_embed}
