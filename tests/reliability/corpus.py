"""A small corpus of real-shaped mammograms, made by the product's own generator.

Real screening data first tried on the node is digitised film (CBIS-DDSM): Secondary Capture
class with Modality MG, RLE or JPEG 2000, 16-bit MONOCHROME2, about 4400-4700 x 2600-2900 with odd
sizes, no ViewPosition, one image per patient and study. Such files once aborted the node (GDCM's
RLE encoder on an odd-sized CAM capture), so reliability tests feed the node exactly these shapes.

A plain module, not a fixture: each test module decides how often it builds the corpus.
"""

from __future__ import annotations

from pathlib import Path

from training.synth import FILM, MIXED, generate_dataset

CORPUS_SEED = 4463
NOMINAL_SIZE = (4463, 2847)
"""The first image has exactly this size (rows, columns), both odd; the others vary around it
(at least 4000 rows, always an odd width)."""


def real_shaped_corpus(out: Path, *, seed: int = CORPUS_SEED, n: int = 6) -> list[Path]:
    """Write ``n`` CBIS-DDSM-shaped films under ``out`` and return their DICOM paths (sorted).

    RLE and JPEG 2000 alternate, half the images show a cancer, each image is its own patient and
    study. ``out`` must not exist or be empty. About 2-3 s per image on one core.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    generate_dataset(
        Path(out),
        patients=n,
        seed=seed,
        cancer_rate=0.5,
        size=NOMINAL_SIZE,
        transfer_syntax=MIXED,
        style=FILM,
    )
    return sorted(Path(out).rglob("*.dcm"))
