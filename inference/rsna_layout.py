"""The RSNA Screening Mammography dataset layout: what training reads and the node's case export writes.

A dataset root holds ``train.csv`` (the 14 columns below, one row per image) and
``train_images/<patient_id>/<image_id>.dcm``. It lives in inference, the one package both sides
may import (node never imports training).
"""

from __future__ import annotations

CSV_NAME = "train.csv"
IMAGES_DIR = "train_images"

RSNA_COLUMNS: tuple[str, ...] = (
    "site_id",
    "patient_id",
    "image_id",
    "laterality",
    "view",
    "age",
    "cancer",
    "biopsy",
    "invasive",
    "BIRADS",
    "implant",
    "density",
    "machine_id",
    "difficult_negative_case",
)
