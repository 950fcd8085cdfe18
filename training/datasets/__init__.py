"""Datasets for training: the RSNA layout (real downloads and synthetic phantoms)."""

from training.datasets.rsna import (
    RSNA_COLUMNS,
    LesionBox,
    RsnaRecord,
    lesion_mask_path,
    load_lesions,
    load_rsna,
)

__all__ = ["RSNA_COLUMNS", "LesionBox", "RsnaRecord", "lesion_mask_path", "load_lesions", "load_rsna"]
