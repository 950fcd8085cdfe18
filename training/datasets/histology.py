"""Histology patch datasets: the IDC layout (seed 002) and folder-per-class sets such as BreaKHis (seed 004).

Both loaders only list files and derive labels and groups from the folder structure; nothing is
decoded until :class:`PatchDataset` needs the pixels. The *group* is the unit the train/validation
split keeps together: patches of one patient (or one slide) are strongly correlated, so putting
some in training and others in validation inflates the validation figures.

Policy for odd files: files whose extension is not an image type (``.txt``, ``.csv``, ``.DS_Store``
...) are skipped with one warning per folder tree; a file *with* an image extension that OpenCV
cannot decode is an :class:`~inference.types.InputError` naming the file, raised when the pixels
are first read (:meth:`PatchDataset.preload` reads them all up front), because a corrupt patch in a
labelled set is a data problem the user should fix rather than a row to drop silently.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from inference.types import InputError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})
NEGATIVE_NAMES: frozenset[str] = frozenset({"0", "benign", "negative"})
POSITIVE_NAMES: frozenset[str] = frozenset({"1", "malignant", "positive"})

# BreaKHis file names carry the patient's slide: SOB_B_F-14-29960AB-400-015.png is slide
# 14-29960AB (benign fibroadenoma, 400x, image 15). Grouping by slide keeps one patient's
# images at every magnification on one side of the split.
_BREAKHIS_NAME = re.compile(r"^SOB_[BM]_[A-Z]+-(?P<year>\d+)-(?P<slide>[0-9A-Za-z]+)-\d+-\d+$")


@dataclass(frozen=True)
class PatchRecord:
    """One labelled patch: its file, its label (1 = malignant) and the group it is split with."""

    path: Path
    label: int
    group: str


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _image_files(folder: Path, *, recursive: bool) -> tuple[list[Path], int]:
    """Image files under ``folder`` (sorted) and how many other files were skipped."""
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    images: list[Path] = []
    skipped = 0
    for path in candidates:
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        else:
            skipped += 1
    return sorted(images), skipped


def _warn_skipped(skipped: int, root: Path) -> None:
    if skipped:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        logger.warning("skipped %d non-image files under %s (patches must be %s)", skipped, root, suffixes)


def _check_root(root: Path) -> None:
    if not root.is_dir():
        raise InputError(f"dataset folder not found: {root}")


def load_idc(root: Path) -> list[PatchRecord]:
    """Patches of the IDC layout ``<patient_id>/<0|1>/*.png`` (Kaggle "Breast Histopathology Images").

    The label comes from the ``0``/``1`` folder, the group is the patient folder's name. Patient
    folders without a ``0`` or ``1`` sub-folder are ignored with a warning (the Kaggle archive also
    contains a nested copy of the whole set, which must not be read twice).
    """
    _check_root(root)
    records: list[PatchRecord] = []
    skipped = 0
    ignored: list[str] = []
    for patient_dir in sorted(p for p in root.iterdir() if p.is_dir() and _visible(p)):
        label_dirs = [patient_dir / name for name in ("0", "1") if (patient_dir / name).is_dir()]
        if not label_dirs:
            ignored.append(patient_dir.name)
            continue
        for label_dir in label_dirs:
            files, n_skipped = _image_files(label_dir, recursive=False)
            skipped += n_skipped
            records += [PatchRecord(path, int(label_dir.name), patient_dir.name) for path in files]
    _warn_skipped(skipped, root)
    if ignored:
        logger.warning(
            "ignored %d folders of %s without 0/ or 1/ sub-folders: %s",
            len(ignored),
            root,
            ", ".join(ignored[:5]) + (" ..." if len(ignored) > 5 else ""),
        )
    if not records:
        raise InputError(f"no IDC patches in {root}: expected <patient>/<0|1>/*.png")
    return records


def class_labels(names: Sequence[str]) -> dict[str, int]:
    """Map two class-folder names to 0/1.

    ``benign``/``0``/``negative`` is 0 and ``malignant``/``1``/``positive`` is 1 (any case). If
    only one of the names is recognised, the other takes the remaining label; if neither is, the
    alphabetically first folder is 0 and a warning says so, since the result then rests on names.
    """
    if len(names) != 2:
        shown = sorted(names)[:5]
        found = ", ".join(shown) + (", ..." if len(names) > len(shown) else "") or "none"
        raise InputError(f"expected exactly two class folders, found {len(names)} ({found})")
    known: dict[str, int] = {}
    for name in names:
        lower = name.lower()
        if lower in NEGATIVE_NAMES:
            known[name] = 0
        elif lower in POSITIVE_NAMES:
            known[name] = 1
    if len(known) == 2 and len(set(known.values())) == 1:
        raise InputError(f"class folders {names[0]!r} and {names[1]!r} both mean label {known[names[0]]}")
    if len(known) == 1:
        (name, label), other = next(iter(known.items())), next(n for n in names if n not in known)
        return {name: label, other: 1 - label}
    if not known:
        first, second = sorted(names)
        logger.warning("class folders %r and %r not recognised: %r = 0, %r = 1", first, second, first, second)
        return {first: 0, second: 1}
    return known


def _folder_group(path: Path, class_dir: Path) -> str:
    """Slide from a BreaKHis file name, else the nesting folder below the class, else the file."""
    match = _BREAKHIS_NAME.match(path.stem)
    if match:
        return f"slide:{match['year']}-{match['slide']}"
    relative = path.relative_to(class_dir)
    if len(relative.parts) > 1:
        return "folder:" + relative.parent.as_posix()
    return "image:" + path.relative_to(class_dir.parent).as_posix()


def load_class_folders(root: Path) -> list[PatchRecord]:
    """Images of a folder-per-class set ``<class>/*.{png,jpg,jpeg,tif}`` with exactly two classes.

    Labels follow :func:`class_labels`. There is no patient in this layout, so each image is its
    own group, unless the images are nested (``<class>/<patient>/*.png``: the folder is the group)
    or carry BreaKHis names (the slide is the group). Class folders are searched recursively.
    """
    _check_root(root)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p))
    labels = class_labels([p.name for p in class_dirs])
    records: list[PatchRecord] = []
    skipped = 0
    for class_dir in class_dirs:
        files, n_skipped = _image_files(class_dir, recursive=True)
        skipped += n_skipped
        if not files:
            raise InputError(f"class folder {class_dir} holds no images")
        label = labels[class_dir.name]
        records += [PatchRecord(path, label, _folder_group(path, class_dir)) for path in files]
    _warn_skipped(skipped, root)
    return records


def load_layout(root: Path, layout: str) -> list[PatchRecord]:
    """Dispatch on the ``--layout`` name: ``idc`` or ``folders``."""
    if layout == "idc":
        return load_idc(root)
    if layout == "folders":
        return load_class_folders(root)
    raise InputError(f"unknown histology layout {layout!r}; choose idc or folders")


def read_patch(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Decode an image as RGB uint8 resized to ``size`` (height, width).

    Grey-scale, 16-bit and RGBA files come out as 8-bit RGB (OpenCV's ``IMREAD_COLOR``). Area
    interpolation when shrinking avoids aliasing of the nuclei texture; linear when enlarging.
    """
    data = np.fromfile(path, dtype=np.uint8) if path.is_file() else np.zeros(0, np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise InputError(f"cannot decode image {path}")
    height, width = size
    if image.shape[:2] != (height, width):
        shrink = image.shape[0] * image.shape[1] > height * width
        interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        image = cv2.resize(image, (width, height), interpolation=interpolation)
    return np.ascontiguousarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))


class PatchDataset(Dataset[tuple[torch.Tensor, float, str, int]]):
    """Items are (RGB patch (3, H, W) float32 in [0, 1], label, patch ID, index).

    The patch ID is the file path, so every patch is its own sampling unit in
    :class:`training.sampler.BalancedPredictionIdSampler`. Decoded patches are kept in memory as
    uint8 at the model size (a 50x50 IDC patch is 7.5 kB), so each file is decoded once per run.
    """

    def __init__(self, records: Iterable[PatchRecord], size: tuple[int, int]) -> None:
        height, width = size
        if height < 1 or width < 1:
            raise ValueError(f"patch size must be positive, got {size}")
        self.records = list(records)
        self.size = (int(height), int(width))
        self.prediction_ids = [str(r.path) for r in self.records]
        self.labels = [float(r.label) for r in self.records]
        self._cache: list[np.ndarray | None] = [None] * len(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def patch(self, index: int) -> np.ndarray:
        """The cached uint8 RGB patch (H, W, 3), decoded on first use."""
        cached = self._cache[index]
        if cached is None:
            cached = read_patch(self.records[index].path, self.size)
            self._cache[index] = cached
        return cached

    def preload(self, workers: int = 1) -> None:
        """Decode every patch now, so an unreadable file stops the run before the first epoch.

        OpenCV releases the GIL while decoding, so threads are enough to use several cores.
        """
        missing = [i for i, cached in enumerate(self._cache) if cached is None]
        if workers <= 1:
            for i in missing:
                self.patch(i)
            return
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for i, image in zip(
                missing, pool.map(lambda i: read_patch(self.records[i].path, self.size), missing), strict=True
            ):
                self._cache[i] = image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, float, str, int]:
        image = torch.from_numpy(self.patch(index)).permute(2, 0, 1).float().div_(255.0)
        return image, self.labels[index], self.prediction_ids[index], index

    def batch(self, indices: Sequence[int]) -> np.ndarray:
        """Patches as a float32 (B, 3, H, W) array in [0, 1], the serving backends' input."""
        stack = np.stack([self.patch(i) for i in indices]).astype(np.float32) / 255.0
        return np.ascontiguousarray(stack.transpose(0, 3, 1, 2))
