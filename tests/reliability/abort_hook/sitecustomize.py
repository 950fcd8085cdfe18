"""Test-only: make the node's pixel-work child abort like a C++ codec, on one marked image.

Put this folder on PYTHONPATH of a `mammonode serve` subprocess (never of pytest itself): Python
imports ``sitecustomize`` at start-up in the serve process and in every process it spawns, and
this module then wraps ``inference.pipeline.prepare_image`` (the decode + preprocess task the
pixel pool runs) as soon as that module is imported, before anything binds the name. Inside a
multiprocessing child only, an image whose ImageComments is :data:`MARKER` calls ``os.abort()``
(SIGABRT, what GDCM or OpenJPEG do on a bad code stream); everywhere else the wrapper only calls
through. The product carries no test hook: the fault comes from outside, as in production.

A line naming the SOP Instance UID goes to stderr just before the abort, so the test can tell
that image failed because its child died and not for another reason.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

MARKER = "MAMMONODE-TEST-ABORT"
TARGET_MODULE = "inference.pipeline"
TARGET_FUNCTION = "prepare_image"


def _wrap(prepare: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(prepare)
    def prepare_image(dataset: Any, *args: Any, **kwargs: Any) -> Any:
        if multiprocessing.parent_process() is not None and str(dataset.get("ImageComments", "")) == MARKER:
            sys.stderr.write(
                f"{MARKER}: pixel-work child {os.getpid()} aborting on {dataset.SOPInstanceUID}\n"
            )
            sys.stderr.flush()
            os.abort()
        return prepare(dataset, *args, **kwargs)

    return prepare_image


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        setattr(module, TARGET_FUNCTION, _wrap(getattr(module, TARGET_FUNCTION)))


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchingLoader(spec.loader)
        return spec


sys.meta_path.insert(0, _Finder())
