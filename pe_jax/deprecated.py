"""Module names from before the library was grouped into rooms: they still import, with a DeprecationWarning,
as a module that forwards every name to where it lives now."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

MOVED = {
    "pe_jax.embed_parts": ("pe_jax.embed.parts",),
    "pe_jax.embed_output": ("pe_jax.embed.output",),
    "pe_jax.embed_pipeline": ("pe_jax.embed.pipeline",),
    "pe_jax.embed_ray": ("pe_jax.embed.ray_engine",),
    "pe_jax.embed_layout": ("pe_jax.embed.layout",),
    "pe_jax.search": ("pe_jax.embed.search",),
    "pe_jax.sources": ("pe_jax.data.sources",),
    "pe_jax.samples": ("pe_jax.data.samples",),
    "pe_jax.files": ("pe_jax.storage.files",),
    "pe_jax.jobs": ("pe_jax.storage.atomic", "pe_jax.storage.locks"),
    "pe_jax.checkpoints.hashing": ("pe_jax.storage.hashing",),
}


class _Forwarding(types.ModuleType):
    def __getattr__(self, name: str):
        for target in MOVED[self.__name__]:
            module = importlib.import_module(target)
            if hasattr(module, name):
                return getattr(module, name)
        moved = ", ".join(MOVED[self.__name__])
        raise AttributeError(f"module {self.__name__!r} (now {moved}) has no attribute {name!r}")


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old names of `MOVED` (last on `sys.meta_path`: only names no file answers)."""

    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name in MOVED else None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {' and '.join(MOVED[spec.name])}; import it from there",
                      DeprecationWarning, stacklevel=2)
        return _Forwarding(spec.name)

    def exec_module(self, module):
        pass


def install() -> None:
    if not any(isinstance(f, MovedModules) for f in sys.meta_path):
        sys.meta_path.append(MovedModules())
