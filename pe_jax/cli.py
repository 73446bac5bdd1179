"""The `pe-jax` command. Each subcommand parses its arguments and calls the Python API that does the job."""

from __future__ import annotations

import argparse
import gc
import os
import sys


def _convert(args):
    from pe_jax.convert.convert import convert_checkpoint

    meta = convert_checkpoint(args.src, args.dst, model=args.model, dtype=args.dtype, force=args.force,
                              progress=not args.quiet)
    print(f"wrote {args.dst}: {meta['preset']} ({meta['source_format']}, {meta['dtype']}) from {meta['source_file']}")


def _export(args):
    from pe_jax.convert.convert import export_checkpoint

    keys = export_checkpoint(args.ckpt, args.out, format=args.format, force=args.force)
    print(f"wrote {args.out}: {len(keys)} tensors in {args.format} naming")


def _plan(args):
    import math

    fresh = "jax" not in sys.modules  # then no backend has started: fake devices can still be made
    import jax

    from pe_jax.sharding import parse_mesh

    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    sizes = parse_mesh(args.mesh)
    if any(v < 1 for v in sizes.values()):
        raise ValueError("plan needs explicit mesh sizes (no -1): it builds that many fake devices")
    devices = math.prod(sizes.values())
    if fresh:  # fake CPU devices shaped like the target mesh (XLA reads the flag when its backend starts)
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}"
        jax.config.update("jax_platforms", "cpu")

    from pe_jax.memory_plan import plan

    if jax.device_count() != devices:
        raise ValueError(f"mesh {args.mesh} needs {devices} devices; this process has {jax.device_count()}")
    result = plan(args.model, args.mesh, args.batch, strategy=args.strategy, dtype=args.dtype, remat=args.remat,
                  train=args.train, image_size=args.image_size)
    print(result.report())


def _finetune(args, config=None):
    from pe_jax.train.config import apply_overrides, load_config
    from pe_jax.train.loop import finetune

    cfg, module = load_config(config or args.config)
    cfg = apply_overrides(cfg, args.set or [])
    if hasattr(module, "prepare"):  # a recipe that makes its own data (the shapes demo)
        cfg = module.prepare(cfg, args.workdir)
    summary = finetune(cfg, args.workdir, progress=not args.quiet)
    print(f"step {summary['step']}/{summary['steps']}: loss {summary.get('loss', float('nan')):.4f}, "
          f"{summary['skipped_samples']} samples skipped" + (f"; weights in {summary['model']}" if "model" in summary
                                                             else " (not finished: rerun to resume)"))
    return summary


def _demo(args):
    from pe_jax.demo import open_clip_check

    summary = _finetune(args, config="demo_shapes")
    if not args.open_clip:
        print("open_clip check: skipped (--no-open-clip)")
    elif not open_clip_check.available():
        print("open_clip check: skipped (torch, timm and open_clip are not installed; pip install -e \".[test]\")")
    else:
        agree, total = open_clip_check.open_clip_agreement(args.workdir)
        print(f"open_clip (the same weights in open_clip naming): same prediction on {agree}/{total} held-out images")
    print(f"zero-shot top-1: {100 * summary['eval_top1']:.1f}%")


def _eval_zeroshot(args):
    import json

    from pe_jax import distributed
    from pe_jax.evals.zero_shot import evaluate, imagenet_templates
    from pe_jax.pretrained import load_model

    if not os.path.exists(args.data):
        raise FileNotFoundError(f"no image folder or CSV at {args.data}")
    distributed.initialize()
    model = load_model(args.checkpoint, model=args.model)
    if not hasattr(model, "text"):
        raise ValueError(f"{args.checkpoint} holds a vision tower alone; zero-shot needs a PE-Core CLIP")
    templates = imagenet_templates() if args.templates == "imagenet" else ["a photo of a {}."]
    result = evaluate(model, args.data, templates=templates, batch_size=args.batch_size, progress=not args.quiet)
    print(f"zero-shot on {args.data}: {result['num_images']} images, {result['num_classes']} classes, "
          f"{result['num_failed']} unreadable (skipped)")
    top5 = "n/a (< 5 classes)" if result["top5"] is None else f"{100 * result['top5']:.2f}%"
    print(f"top-1: {100 * result['top1']:.2f}%  top-5: {top5}  "
          f"mean per-class recall: {100 * result['mean_per_class_recall']:.2f}%")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


def _embed(args):
    import json

    from pe_jax import distributed, sharding
    from pe_jax.embed import embed
    from pe_jax.pretrained import load_model, preset_of
    from pe_jax.sources import is_tar_pattern, tar_shards

    if is_tar_pattern(args.input) and not os.path.isdir(args.input):
        tar_shards(args.input)  # every shard exists: checked before the model loads
    elif not os.path.exists(args.input):
        raise FileNotFoundError(f"input not found: {args.input}")
    distributed.initialize()
    import jax

    mesh = sharding.make_mesh(args.mesh, devices=jax.local_devices()) if args.mesh else None
    model = load_model(args.checkpoint, model=args.model, mesh=mesh)
    summary = embed(model, args.input, args.output, modality=args.modality, batch_size=args.batch_size,
                    part_size=args.part_size, dtype=args.dtype, normalize=not args.no_normalize,
                    layer_idx=args.layer_idx, pooling=args.pooling, mesh=mesh,
                    preset=preset_of(args.checkpoint, args.model), checkpoint=args.checkpoint,
                    workers=args.workers, progress=not args.quiet)
    run = summary["this_run"]
    failed = f"{summary['failed']} failed (see failures.jsonl)" if summary["failed"] else "0 failed"
    print(f"{summary['embedded']} embedded, {failed}, {summary['parts_finished']}/{summary['parts']} parts; "
          f"this run: {run['embedded']} items in {run['seconds']:.1f} s ({run['items_per_second']} items/s)")
    if not summary["complete"]:
        print(json.dumps(summary))


def _eval_retrieval(args):
    import json

    import numpy as np

    from pe_jax.embed import read_embeddings
    from pe_jax.evals.retrieval import evaluate

    try:
        ks = [int(k) for k in args.k.split(",")]
    except ValueError:
        raise ValueError(f"-k takes comma-separated integers, got {args.k!r}") from None
    if any(k < 1 for k in ks):
        raise ValueError(f"-k values must be >= 1, got {args.k}")
    queries, rows = read_embeddings(args.embeddings)
    labels = _column(rows, args.labels, args.embeddings)
    gallery = gallery_labels = None
    if args.gallery:
        gallery, grows = read_embeddings(args.gallery)
        gallery_labels = _column(grows, args.labels, args.gallery)
    metrics, neighbours = evaluate(queries.astype(np.float32), labels, ks, gallery=gallery,
                                   gallery_labels=gallery_labels, normalization=args.normalization)
    print("| metric | " + " | ".join(f"@{k}" for k in ks) + " |")
    print("|---|" + "---|" * len(ks))
    for name in ("P", "R", "Hit", "mAP"):
        print(f"| {name} | " + " | ".join(f"{metrics[f'{name}@{k}']:.4f}" for k in ks) + " |")
    print(f"{metrics['queries']} queries ({metrics['queries_without_relevant']} without a relevant item, left out)")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(metrics, f, indent=1)
    if args.neighbours:
        keys = [r["key"] for r in (grows if args.gallery else rows)]
        with open(args.neighbours, "w") as f:
            for row, idx in zip(rows, neighbours, strict=True):
                f.write(json.dumps({"key": row["key"], "neighbours": [keys[i] for i in idx]}) + "\n")


def _column(rows, name, where):
    if rows and name not in rows[0]:
        raise ValueError(f"{where}: metadata has no column {name!r}; columns: {sorted(rows[0])}")
    return [r[name] for r in rows]


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


def _add(sub, name: str, help: str, run, description: str | None = None) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=description or help, formatter_class=_Help)
    p.set_defaults(run=run)
    return p


def _quiet(p):
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _checkpoint(p, required: bool = True):
    p.add_argument("--checkpoint", required=required,
                   help="a pe_jax checkpoint directory, or a PyTorch file (.pt, .safetensors, index.json, hf://)")
    p.add_argument("--model", help="preset name: needed for a PyTorch file; for a pe_jax checkpoint it must "
                   "agree with the checkpoint's config")


def _conversion_commands(sub):
    p = _add(sub, "convert", "PyTorch checkpoint (.pt, safetensors, hf://) -> pe_jax Orbax checkpoint", _convert)
    p.add_argument("src", help="a .pt / .safetensors / *.safetensors.index.json file, or hf://ORG/REPO[:FILE]")
    p.add_argument("dst", help="output checkpoint directory")
    p.add_argument("--model", help="preset name (default: inferred from the tensor shapes)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the stored weights")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    _quiet(p)
    p = _add(sub, "export", "pe_jax checkpoint -> PyTorch safetensors (original, timm or open_clip naming)", _export)
    p.add_argument("ckpt", help="pe_jax checkpoint directory")
    p.add_argument("out", help="output .safetensors file")
    p.add_argument("--format", default="original", choices=["original", "timm", "open_clip"],
                   help="the PyTorch naming to write (timm: the vision tower alone)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def _training_commands(sub):
    p = _add(sub, "finetune", "finetune a model from a config recipe; resumes in the same workdir", _finetune,
             description="Finetune a model from a config recipe; rerun the same command to resume.\n\n"
             f"Shipped recipes (--config NAME): {_recipes()}; or a file configs/NAME.py defining get_config().")
    p.add_argument("--config", required=True, help="a config file (configs/NAME.py) or a shipped recipe's name")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and the final model go here")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. optim.learning_rate=1e-4 or model.overrides.vision_layers=2")
    _quiet(p)
    p = _add(sub, "demo", "train a small PE-Core CLIP on synthetic shapes from scratch and test zero-shot on "
             "unseen colour x shape combinations (about 8 minutes on 2 CPU cores)", _demo)
    p.add_argument("--workdir", default="pe-jax-demo", help="where the data, checkpoints and model go")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field of configs/demo_shapes.py")
    p.add_argument("--no-open-clip", dest="open_clip", action="store_false",
                   help="skip checking the weights in open_clip (done when torch and open_clip are installed)")
    _quiet(p)
    p = _add(sub, "plan", "compile a model for a mesh from abstract shapes and print per-device memory", _plan)
    p.add_argument("--model", required=True, help="preset name, e.g. PE-Core-G14-448")
    p.add_argument("--mesh", required=True, help="mesh axis sizes, e.g. fsdp=8 or fsdp=4,model=2 (or data=N)")
    p.add_argument("--batch", type=int, required=True, help="global batch size")
    p.add_argument("--strategy", default="fsdp", choices=["dp", "fsdp", "fsdp_tp"], help="sharding rules")
    p.add_argument("--train", action="store_true", help="compile the finetuning step instead of the forward pass")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--remat", default="nothing_saveable", help="rematerialization policy of the blocks",
                   choices=["none", "full", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable"])
    p.add_argument("--image-size", type=int, default=None, help="input resolution (default: the preset's)")


def _eval_commands(sub):
    p = sub.add_parser("eval", help="evaluations: zeroshot (classification), retrieval (kNN metrics)",
                       formatter_class=_Help)
    evals = p.add_subparsers(dest="evaluation", required=True, metavar="EVALUATION")
    z = _add(evals, "zeroshot", "zero-shot classification accuracy on an image folder or CSV", _eval_zeroshot)
    _checkpoint(z)
    z.add_argument("--data", required=True, help="folder with one sub-folder per class, or a CSV of path,label")
    z.add_argument("--templates", default="imagenet", choices=["imagenet", "simple"],
                   help="the 80 OpenAI ImageNet templates, or 'a photo of a {}.'")
    z.add_argument("--batch-size", type=int, default=32, help="images per device batch")
    z.add_argument("--output", help="write the metrics as JSON here")
    _quiet(z)
    r = _add(evals, "retrieval", "kNN retrieval metrics (P@K, R@K, Hit@K, mAP@K) of embedding jobs", _eval_retrieval)
    r.add_argument("--embeddings", required=True, help="output folder of pe-jax embed (the queries)")
    r.add_argument("--gallery", help="another embedding folder as gallery (default: leave-one-out)")
    r.add_argument("--labels", required=True, help="metadata column holding the label")
    r.add_argument("-k", default="1,5,10", help="comma-separated K values")
    r.add_argument("--normalization", default="min_k_nrel", choices=["min_k_nrel", "nrel", "hits"],
                   help="AP@K denominator: min(K, relevant), relevant, or hits in the top K")
    r.add_argument("--output", help="write the metrics as JSON here")
    r.add_argument("--neighbours", help="write each query's top-K neighbour keys as JSONL here")


def _embed_command(sub):
    p = _add(sub, "embed", "embed a folder, list, tar shards or texts; resumable, parts + manifest", _embed)
    _checkpoint(p)
    p.add_argument("--input", required=True, help="folder, list (txt/csv/jsonl/parquet), 'shards/{000..009}.tar', "
                   "or texts (txt/jsonl/csv) with --modality text")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--modality", default="image", choices=["image", "text", "video"], help="what the inputs are")
    p.add_argument("--batch-size", type=int, default=32, help="inputs per device batch")
    p.add_argument("--part-size", type=int, default=1000, help="items per output part (tar inputs: one part per shard)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="dtype of the stored rows")
    p.add_argument("--no-normalize", action="store_true", help="store raw features instead of unit-norm ones")
    p.add_argument("--layer-idx", type=int, default=None, help="features of this block (negative: from the end) "
                   "instead of the last")
    p.add_argument("--pooling", choices=["attn", "mean", "cls"], default=None,
                   help="attn: the model's head (last layer); mean: mean patch token; cls: class token "
                   "(default: attn where the model has a head and the layer is the last, else mean)")
    p.add_argument("--mesh", default=None, help="local mesh, e.g. data=8 (default: one device)")
    p.add_argument("--workers", type=int, default=4, help="decoding threads")
    _quiet(p)


def build_parser() -> argparse.ArgumentParser:
    from pe_jax import __version__

    parser = argparse.ArgumentParser(prog="pe-jax", description="Perception Encoder in JAX: tools.",
                                     formatter_class=_Help)
    parser.add_argument("--version", action="version", version=f"pe-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _conversion_commands(sub)
    _training_commands(sub)
    _eval_commands(sub)
    _embed_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:  # Orbax logs internal notices through absl at WARNING; a command line wants only real problems
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass
    try:
        args.run(args)
    except KeyboardInterrupt:
        print("pe-jax: interrupted; no partial output was left", file=sys.stderr)
        return 130
    except (ValueError, OSError, TypeError) as e:  # user errors: a message, never a traceback
        print(f"pe-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        # The job is done: spare the interpreter's final garbage collection over the ~million objects jax and
        # flax create (atexit handlers and file closing still run): it took 0.4 s of every command's exit.
        gc.freeze()
    return 0


if __name__ == "__main__":
    sys.exit(main())
