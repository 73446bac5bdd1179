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
import logging
import os
import shutil

import jax

from pe_jax.jobs import storage_error


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
