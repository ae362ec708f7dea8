"""Post-import hooks: run a function right after a module is first imported (or now, if it was).

A meta-path finder sits in front of the import system for the hooked module names only; it
asks the other finders for the real spec and wraps its loader so the hooks run after the
module's code has executed. Nothing else about the import changes.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from collections.abc import Callable

_hooks: dict[str, list[Callable[[], None]]] = {}
_lock = threading.RLock()


def when_imported(module: str, hook: Callable[[], None]) -> None:
    """Run ``hook()`` once ``module`` is imported; at once if it already is."""
    with _lock:
        if sys.modules.get(module) is not None:
            hook()
            return
        _hooks.setdefault(module, []).append(hook)
        if not any(isinstance(finder, _PostImportFinder) for finder in sys.meta_path):
            sys.meta_path.insert(0, _PostImportFinder())


def _run_hooks(module: str) -> None:
    with _lock:
        hooks = _hooks.pop(module, [])
    for hook in hooks:
        hook()


class _HookedLoader(importlib.abc.Loader):
    def __init__(self, loader, name: str):
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _run_hooks(self._name)

    def __getattr__(self, attr):  # get_source, get_filename, is_package, ... of the real loader
        return getattr(self._loader, attr)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _hooks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _HookedLoader(spec.loader, fullname)
                return spec
        return None
