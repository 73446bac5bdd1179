"""The `pe-jax` command. Each subcommand parses its arguments and calls the Python API that does the job."""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import os
import sys
import traceback
import warnings

from pe_jax.cli_args import build_parser, check_args, check_inputs, check_local_checkpoint, integers
from pe_jax.errors import MissingDependency, PeJaxError, UsageError
from pe_jax.storage.atomic import storage_error


def _convert(args):
    from pe_jax.config import vision_config
    from pe_jax.convert.convert import convert_checkpoint

    meta = convert_checkpoint(args.src, args.dst, model=args.model, dtype=args.dtype, force=args.force,
                              progress=not args.quiet, source_sha256=args.source_sha256,
                              allow_non_finite=args.allow_non_finite)
    cfg, shortened = meta["config"], ""
    if cfg["type"] == "VisionConfig" and cfg["layers"] != vision_config(meta["preset"]).layers:
        shortened = f" with {cfg['layers']} blocks (the file's depth)"
    print(f"wrote {args.dst}: {meta['preset']}{shortened} ({meta['source_format']}, {meta['dtype']}) from "
          f"{meta['source_file']}")
    if meta["unused_tensors"]:  # only a tower was taken from a larger model (PerceptionLM, PE-AV)
        groups = ", ".join(f"{g} ({n})" for g, n in meta["unused_tensors"].items())
        print(f"left out {sum(meta['unused_tensors'].values())} tensors outside the vision tower: {groups}")


def _export_graph(args):
    from pe_jax.convert.graph_export import describe, export_graph

    platforms = tuple(args.platforms.split(",")) if args.platforms else None
    report = export_graph(args.ckpt, args.out, format=args.format, tower=args.tower, image_size=args.image_size,
                          force=args.force, verify=args.verify, platforms=platforms)
    print("\n".join(describe(report, args.format)))


def _export(args):
    if args.format in ("onnx", "stablehlo"):
        return _export_graph(args)
    from pe_jax.convert.export import export_checkpoint

    keys = export_checkpoint(args.ckpt, args.out, format=args.format, force=args.force, verify=args.verify,
                             dtype=args.dtype)
    print(f"wrote {args.out}: {len(keys)} tensors in {args.format} naming" + (f", {args.dtype}" if args.dtype else ""))


def _verify(args):
    from pe_jax.checkpoints.verify import describe

    print(describe(args.ckpt))


def _plan(args):
    if args.target:
        return _plan_target(args)
    fresh = "jax" not in sys.modules  # then no backend has started: fake devices can still be made
    import jax

    from pe_jax.sharding import fake_device_count, parse_mesh

    sizes = parse_mesh(args.mesh)  # no -1: check_args
    devices = fake_device_count(args.mesh, sizes)
    if fresh:  # fake CPU devices shaped like the target mesh (XLA reads the flag when its backend starts)
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}"
        jax.config.update("jax_platforms", "cpu")

    from pe_jax.memory_plan import plan

    if jax.device_count() != devices:
        raise UsageError(f"mesh {args.mesh} needs {devices} devices; this process has {jax.device_count()}")
    result = plan(args.model, args.mesh, args.batch, strategy=args.strategy, dtype=args.dtype, remat=args.remat,
                  train=args.train, image_size=args.image_size, attention=args.attention)
    print(result.report())


def _plan_target(args):
    """`plan --target`: the accelerator's own compiler on compile-only devices (no accelerator needed)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the CUDA plugin registers compile-only devices only so
    from pe_jax.memory_plan import max_batch, plan
    from pe_jax.targets import get_target

    target = get_target(args.target, slices=args.slices, hbm_gib=args.hbm_gib)
    options = dict(strategy=args.strategy, dtype=args.dtype, remat=args.remat, train=args.train,
                   image_size=args.image_size, attention=args.attention)
    if not args.max_batch:
        print(plan(args.model, args.mesh, args.batch, target=target, **options).report())
        return
    show = lambda p: print(f"  batch {p.padded_batch}: peak {p.peak_gib:.2f} GiB per chip, "
                           f"{'fits' if p.fits else 'does not fit'} ({p.compile_seconds:.0f} s)", flush=True)
    best, plans = max_batch(args.model, args.mesh, target=target, start=args.batch, progress=show, **options)
    if not best:
        print(f"no batch fits {target.name}: even batch {min(plans)} needs {plans[min(plans)].peak_gib:.2f} GiB")
        return
    print(plans[best].report())
    print(f"largest global batch that fits: {best} ({len(plans)} compiles)")


def _finetune(args, config=None):
    from pe_jax.train.config import apply_overrides, load_config

    cfg, module = load_config(config or args.config)  # the recipe, its data and checkpoint checked before jax
    cfg = apply_overrides(cfg, args.set or [])
    if hasattr(module, "prepare"):  # a recipe that makes its own data (the shapes demo): tens of seconds, once
        print(f"pe-jax {args.command}: preparing the recipe's data in {args.workdir} (reruns reuse it)", flush=True)
        # a bar from the first image; a recipe's own prepare(cfg, workdir) without `progress` still works
        wants_bar = "progress" in inspect.signature(module.prepare).parameters
        cfg = module.prepare(cfg, args.workdir, **({"progress": not args.quiet} if wants_bar else {}))
    check_inputs(cfg.data.train, cfg.data.eval)
    check_local_checkpoint(cfg.model.checkpoint)
    from pe_jax.train.loop import finetune

    summary = finetune(cfg, args.workdir, progress=not args.quiet)
    print(f"step {summary['step']}/{summary['steps']}: loss {summary.get('loss', float('nan')):.4f}, "
          f"{summary['skipped_samples']} samples skipped"
          + (f", {summary['failed_samples']} left out (see failures.jsonl)" if summary.get("failed_samples") else "")
          + (f"; weights in {summary['model']}" if "model" in summary else " (not finished: rerun to resume)"))
    return summary


def _demo(args):
    from pe_jax.demo import open_clip_check

    print(f"pe-jax demo: a small CLIP trained on synthetic shapes in {args.workdir}"  # from the first second
          + ("" if args.skip_open_clip else " (first: does open_clip import?)"), flush=True)
    # the optional check's dependencies are probed before training: a broken torch skips the check, not the run
    skipped = "--no-open-clip" if args.skip_open_clip else open_clip_check.unavailable()
    summary = _finetune(args, config="demo_shapes")
    if skipped:
        print(f"open_clip check: skipped ({skipped})")
    else:
        agree, total = open_clip_check.open_clip_agreement(args.workdir)
        print(f"open_clip (the same weights in open_clip naming): same prediction on {agree}/{total} held-out images")
    print(f"zero-shot top-1: {100 * summary['eval_top1']:.1f}%")


def _eval_zeroshot(args):
    import json

    from pe_jax import distributed
    from pe_jax.evals.zero_shot import evaluate, imagenet_templates
    from pe_jax.pretrained import resolve_model

    distributed.initialize()  # the data and a local checkpoint: check_args
    model = resolve_model(args.checkpoint, model=args.model).load(verify=args.verify)
    if not hasattr(model, "text"):
        raise UsageError(f"{args.checkpoint} holds a vision tower alone; zero-shot needs a PE-Core CLIP")
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

    from pe_jax.data.sources import classify
    from pe_jax.embed.options import EmbedOptions

    # the options, the input and the checkpoint (a URL: that it exists) are checked once, here, before jax starts
    options = EmbedOptions(modality=args.modality, layout=args.layout, batch_size=args.batch_size,
                           part_size=args.part_size, dtype=args.dtype, normalize=not args.no_normalize,
                           layer_idx=args.layer_idx, pooling=args.pooling, workers=args.workers,
                           progress=not args.quiet, tiles=args.tiles, tile_features=args.tile_features)
    source = classify(args.input, options.listed_as)
    check_local_checkpoint(args.checkpoint)
    if args.mesh and args.engine != "local":
        raise UsageError("--mesh applies to --engine local (a Ray actor's devices: --accelerators-per-actor)")
    from pe_jax import distributed, sharding
    from pe_jax.embed import run

    mesh = None
    if args.engine == "local":
        distributed.initialize()
        import jax

        mesh = sharding.make_mesh(args.mesh, devices=jax.local_devices()) if args.mesh else None
    summary = run(source, args.output, checkpoint=args.checkpoint, model=args.model, engine=args.engine,
                  mesh=mesh, join=args.join, verify=args.verify, ray_address=args.ray_address, actors=args.actors,
                  accelerators_per_actor=args.accelerators_per_actor, options=options)
    run = summary["this_run"]
    failed = f"{summary['failed']} failed (see failures.jsonl)" if summary["failed"] else "0 failed"
    print(f"{summary['embedded']} embedded, {failed}, {summary['parts_finished']}/{summary['parts']} parts; "
          f"this run: {run['embedded']} items in {run['seconds']:.1f} s ({run['items_per_second']} items/s)")
    if run.get("input"):  # what the input was taken as (a folder of tar shards)
        print(run["input"])
    if not summary["complete"]:
        print(json.dumps(summary))


def _eval_retrieval(args):
    import json

    import numpy as np

    ks = integers(args.k, "-k")  # checked by check_args
    if args.embeddings is None:
        return _eval_layer_sweep(args, ks)
    queries, rows, labels = _labelled(args.embeddings, args.labels)
    gallery = gallery_labels = None
    if args.gallery:
        gallery, grows, gallery_labels = _labelled(args.gallery, args.labels)
    from pe_jax.evals.retrieval import evaluate

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


def _index(args):
    from pe_jax.embed.search import build_index

    info = build_index(args.embeddings, args.output, tower=args.tower, factory=args.factory)
    print(f"wrote {args.output}: {info['rows']} {info['tower']} rows of {info['dim']} dims ({info['factory']})")


def _search(args):
    import json

    from pe_jax.embed.search import search

    hits = search(args.index, args.checkpoint, text=args.text, image=args.image, k=args.k, embeddings=args.embeddings,
                  model=args.model, verify=args.verify)
    for hit in hits:
        if args.json:
            print(json.dumps(hit, default=str))
        else:
            print(f"{hit['rank']}\t{hit['score']:.4f}\t{hit['key']}\t{hit['caption'] or ''}")


def _eval_layer_sweep(args, ks):
    """eval retrieval --checkpoint --queries: every (layer, pooling) pair from images, one pass per batch."""
    import json

    from pe_jax.evals import layer_sweep
    from pe_jax.pretrained import resolve_model

    model = resolve_model(args.checkpoint, model=args.model).load()  # the inputs and flags: check_args
    report = layer_sweep.sweep(model, args.queries, args.labels, gallery=args.gallery,
                               layers=integers(args.layers, "--layers"), poolings=args.pooling.split(","), ks=ks,
                               batch_size=args.batch_size)
    print(layer_sweep.table(report, ks))
    best = report["best"]
    print(f"best: layer {best['layer']}, pooling {best['pooling']} (mAP@10 {best['mAP@10']:.4f}); "
          f"{best['queries']} queries, {len(report['failures'])} unreadable images skipped")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)


def _labelled(folder: str, name: str):
    """(embeddings, rows, labels) of the rows of an embedding job that have a label in column `name` (a folder
    embed labels only the images inside class folders: the others are left out, and said so)."""
    import numpy as np

    from pe_jax.embed.output import read_embeddings

    vectors, rows = read_embeddings(folder)
    if rows and name not in rows[0]:
        raise UsageError(f"{folder}: metadata has no column {name!r}; columns: {sorted(rows[0])}")
    keep = [i for i, r in enumerate(rows) if r[name] is not None]
    if len(keep) < len(rows):
        print(f"{folder}: {len(rows) - len(keep)} rows without a {name} left out")
        vectors, rows = vectors[np.asarray(keep, np.int64)], [rows[i] for i in keep]
    return vectors, rows, [r[name] for r in rows]


COMMANDS = {"convert": _convert, "export": _export, "verify": _verify, "finetune": _finetune, "demo": _demo,
            "plan": _plan, "eval_zeroshot": _eval_zeroshot, "eval_retrieval": _eval_retrieval, "embed": _embed,
            "index": _index, "search": _search}


@contextlib.contextmanager
def _third_party_logs_hidden(verbose: bool):
    """Keeps the libraries' notices out of the terminal for the command's length (`--verbose` shows them): XLA's
    C++ log ("Very slow compile?"; read when jaxlib loads, so set before any command imports jax), Python
    loggers other than pe_jax's below ERROR (Orbax's "Skipping merge of OCDBT checkpoints" through absl,
    open_clip's), and jax's warning when Ray forks a process. Set here, never at import: a program that
    imports pe_jax keeps its own logging."""
    if verbose:
        yield
        return
    saved_env = {k: os.environ.get(k) for k in ("TF_CPP_MIN_LOG_LEVEL", "GRPC_VERBOSITY")}
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # Ray's gRPC notes about fork()
    root, ours = logging.getLogger(), logging.getLogger("pe_jax")
    levels = root.level, ours.level
    root.setLevel(logging.ERROR)
    ours.setLevel(min(ours.getEffectiveLevel(), logging.WARNING))
    from absl import logging as absl_logging  # orbax's dependency, so always there

    absl_level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
            yield
    finally:
        root.setLevel(levels[0])
        ours.setLevel(levels[1])
        absl_logging.set_verbosity(absl_level)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)  # before jax and the model load: a typo fails in one line within a second
        with _third_party_logs_hidden(getattr(args, "verbose", False)):
            COMMANDS[args.run](args)
    except KeyboardInterrupt:
        resumable = "; rerun the same command to resume" if args.command in ("embed", "finetune", "demo") else ""
        print(f"pe-jax {args.command}: interrupted; no partial output was left{resumable}", file=sys.stderr)
        return 130
    except (PeJaxError, OSError, ModuleNotFoundError, RuntimeError) as e:
        # what the user can fix is one line (its traceback with --debug); anything else is a bug: its traceback
        error = user_error(e)
        if error is None:
            raise
        if args.debug:
            traceback.print_exception(error)
        print(f"pe-jax {args.command}: error: {error}", file=sys.stderr)
        return 2
    finally:
        # The job is done: spare the interpreter's final garbage collection over the ~million objects jax and
        # flax create (atexit handlers and file closing still run): it took 0.4 s of every command's exit.
        gc.freeze()
    return 0


def user_error(e: BaseException) -> PeJaxError | None:
    """`e` as an error the user can fix, or None for a bug. At the command line's boundary, the file system's own
    refusals (a missing file, a permission, a full disk: an OSError with an errno, for a path the user gave)
    become a StorageError and a missing third-party module a MissingDependency, so they stay one line too.

    Args:
        e: what a command raised.

    Example:
        >>> str(user_error(FileNotFoundError(2, "No such file or directory", "x.json")))
        'cannot use x.json: No such file or directory'
    """
    if isinstance(e, PeJaxError):
        return e
    if isinstance(e, OSError) and e.errno is not None:
        return storage_error(e, e.filename or "a file", "use")
    if isinstance(e, RuntimeError) and str(e).startswith("Unable to initialize backend"):  # JAX_PLATFORMS=tpu, no TPU
        return UsageError(f"JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '')}: {str(e).splitlines()[0]}")
    if isinstance(e, ModuleNotFoundError) and e.name and not e.name.startswith("pe_jax"):
        return MissingDependency(f"{e}: this command needs it installed (pip install {e.name.split('.')[0]})")
    return None


if __name__ == "__main__":
    sys.exit(main())
