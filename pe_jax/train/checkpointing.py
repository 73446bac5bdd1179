"""The finetuning workdir's Orbax checkpoints, and their failures as one line.

Orbax saves asynchronously: a storage fault (a full disk, a read-only or forbidden folder) happens in its
threads, which log a traceback each through absl and leave `checkpoints/N.orbax-checkpoint-tmp*` behind, and
surfaces in the main thread at the next save or wait. `guarded(manager, directory)` drops those thread
tracebacks (the error itself is raised once in the main thread), and on any error drains and closes the
manager, removes its temporary checkpoints and re-raises a storage fault as one line naming the checkpoint.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import sys

import jax

from pe_jax.distributed import barrier
from pe_jax.errors import InputError
from pe_jax.storage.atomic import rename_noreplace, storage_error
from pe_jax.train.workdir import truncate_metrics


def checkpoint_manager(directory: str, cfg):
    import orbax.checkpoint as ocp

    best = cfg.best_metric
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep_checkpoints, enable_async_checkpointing=cfg.async_checkpoints,
        best_fn=(lambda metrics: metrics[best]) if best else None, best_mode="max",
        keep_checkpoints_without_metrics=False if best else True, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _orbax_thread_error(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname


class _DropOrbaxErrors(logging.Filter):
    def filter(self, record):
        return not _orbax_thread_error(record)


STEP_CHECKSUMS = "pe_jax_checksums.json"  # in each step's folder: {rel: [size, checksum]} of its files
_UNCHECKED = (STEP_CHECKSUMS, "_CHECKPOINT_METADATA")  # Orbax rewrites its metadata (timestamps, metrics)


def _step_files(step_dir: str) -> dict[str, int]:
    out = {}
    for folder, dirs, names in os.walk(step_dir):
        dirs.sort()
        for name in names:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, step_dir).replace(os.sep, "/")
            if rel not in _UNCHECKED:
                out[rel] = os.path.getsize(path)
    return out


def write_step_checksums(directory: str, steps):
    """Records the checksums of each finished step of `steps` that has none yet (process 0; the next save, or
    the end of the run, calls it once Orbax has finished writing the step)."""
    from pe_jax.checkpoints.verify import checksum_files
    from pe_jax.storage.atomic import write_text
    from pe_jax.storage.hashing import ALGORITHM

    if jax.process_index() != 0:
        return
    for step in steps:
        step_dir = os.path.join(directory, str(step))
        if os.path.isdir(step_dir) and not os.path.exists(os.path.join(step_dir, STEP_CHECKSUMS)):
            sizes = _step_files(step_dir)
            sums = checksum_files(step_dir, sizes)
            table = {"algorithm": ALGORITHM, "files": {rel: [sizes[rel], sums[rel]] for rel in sorted(sizes)}}
            write_text(os.path.join(step_dir, STEP_CHECKSUMS), json.dumps(table))


def step_problem(directory: str, step: int) -> str | None:
    """What is wrong with saved step `step` by its checksums (a file missing, added, of another size or
    content), or None when it matches them or has none (killed before they were written: its restore, and the
    restored state's finiteness, are then the checks)."""
    from pe_jax.checkpoints.verify import checksum_files
    from pe_jax.storage.files import read_capped

    step_dir = os.path.join(directory, str(step))
    try:
        table = json.loads(read_capped(os.path.join(step_dir, STEP_CHECKSUMS)))
        expected, algorithm = table["files"], table["algorithm"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {STEP_CHECKSUMS} is unreadable"
    found = _step_files(step_dir)
    for rel in sorted(set(expected) | set(found)):
        if rel not in found or rel not in expected:
            return f"{rel} {'is missing' if rel not in found else 'was added'}"
        if found[rel] != expected[rel][0]:
            return f"{rel} is {found[rel]} bytes, {expected[rel][0]} when saved"
    sums = checksum_files(step_dir, found, algorithm=algorithm)
    bad = sorted(rel for rel in found if sums[rel] != expected[rel][1])
    return f"{bad[0]} does not match its checksum (changed since it was saved)" if bad else None


def set_aside(directory: str, step: int) -> str:
    """Renames a damaged step out of Orbax's sight (`N.pe_jax-damaged`, kept for inspection, never deleted)."""
    path = os.path.join(directory, str(step))
    aside = f"{path}.pe_jax-damaged"
    n = 1
    while os.path.lexists(aside):
        n += 1
        aside = f"{path}.pe_jax-damaged-{n}"
    rename_noreplace(path, aside)  # never onto what appeared under that name meanwhile
    return aside


def remove_temporaries(directory: str):
    """Orbax's unfinished checkpoints (`N.orbax-checkpoint-tmp*`): never restored, and in the way of a rerun."""
    if jax.process_index() == 0:
        for path in glob.glob(os.path.join(directory, "*.orbax-checkpoint-tmp*")):
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def guarded(manager, directory: str, step=lambda: None):
    """Runs the block with Orbax's thread tracebacks silenced; on an error drains and closes `manager`, removes
    the temporary checkpoints, and raises a storage fault as 'cannot write the checkpoint DIR/STEP: REASON'."""
    quiet = _DropOrbaxErrors()
    loggers = [logging.getLogger("absl"), logging.getLogger()]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    except BaseException as e:
        with contextlib.suppress(Exception):
            manager.wait_until_finished()
        with contextlib.suppress(Exception):
            manager.close()
        remove_temporaries(directory)
        if isinstance(e, OSError):
            where = os.path.join(directory, str(step())) if step() is not None else directory
            raise storage_error(e, where, "write the checkpoint") from None
        raise
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


@jax.jit
def _all_finite(leaves):  # one program per state's structure, compiled once (not at every checkpoint)
    return jax.numpy.all(jax.numpy.stack([jax.numpy.isfinite(x).all() for x in leaves]))


def finite(tree) -> bool:
    """Whether every floating-point array of `tree` (a training state) is finite: one reduction on device."""
    leaves = [x for x in jax.tree.leaves(tree) if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)]
    return bool(_all_finite(leaves)) if leaves else True


def restore_newest(run):
    """Restores into `run` (pe_jax.train.loop.Run) the newest intact step: one whose files match their
    checksums, that Orbax restores and whose state is finite. A damaged step is set aside (`N.pe_jax-damaged`,
    kept) and said in one line on stderr; with none intact left the run stops in one line."""
    directory = os.path.join(run.workdir, "checkpoints")
    while (step := run.manager.latest_step()) is not None:
        problem = step_problem(directory, step) or _try_restore(run, step)
        if problem is None:
            truncate_metrics(run.metrics_path, run.step)
            return
        run.manager.close()
        aside = set_aside(directory, step) if jax.process_index() == 0 else f"{directory}/{step}.pe_jax-damaged"
        barrier("pe_jax_damaged_step_set_aside")
        run.manager = checkpoint_manager(directory, run.cfg)
        older = run.manager.latest_step()
        said = f"checkpoint {directory}/{step} is damaged ({problem}); it is kept as {os.path.basename(aside)}"
        if older is None:
            raise InputError(f"{said}, and no intact checkpoint is left: the same command starts the run again "
                             "from step 0")
        print(f"pe-jax finetune: {said}; resuming from step {older}", file=sys.stderr)


def _try_restore(run, step: int) -> str | None:
    """Restores `step` into `run`; None when done, else what failed."""
    import grain
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), run.state)
    try:
        restored = run.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(run.batches)))
    except Exception as e:  # a truncated or garbled file: Orbax and tensorstore raise many kinds
        said = (str(e).strip().splitlines() or [type(e).__name__])[0].split(" See full TensorStore")[0]
        return f"it cannot be restored: {said[:200]}"
    if not finite(restored["state"]):
        return "its state holds NaN or Inf"
    run.state, run.step = restored["state"], step
    return None
