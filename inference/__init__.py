"""MammoNode's inference library: DICOM images in, scores, CAMs and DICOM results out.

This is the public surface the node uses (design: node reaches inference through here). Names are
loaded on first use (PEP 562), so ``import inference`` stays cheap: a command that only needs a
UID helper does not import the decoders, ONNX Runtime or TensorRT. The submodules stay importable
for tests and for tools that need more than this surface.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from inference.aggregation import aggregate_studies
    from inference.backends.base import Backend, BackendUnavailable
    from inference.backends.cuda_runtime import gpu_info, gpu_unavailable_reason
    from inference.backends.loader import load_backend
    from inference.backends.tensorrt_build import build_engine, precision_of
    from inference.batching import score_stream
    from inference.bundled import BUNDLED_MODEL_DIR, bundled_model_dir, resolve_model_dir
    from inference.device import parse_device
    from inference.dicom_header import (
        DX_MAMMO_FOR_PRESENTATION,
        DX_MAMMO_FOR_PROCESSING,
        is_mammogram,
        read_dataset,
        read_meta,
    )
    from inference.dicom_pixels import decode_pixels
    from inference.jsonsafe import dumps, json_safe
    from inference.manifest import (
        ModelManifest,
        algorithm_info,
        atomic_write_bytes,
        load_manifest,
        verify_weights,
    )
    from inference.overlay import save_png
    from inference.phi import describe, quiet_value_checks, scrub, scrub_library_logs, where
    from inference.pipeline import Pipeline, PreparedImage, StudyOutputs, prepare_image
    from inference.pixel_pool import (
        POOL_KINDS,
        PixelPool,
        PoolKind,
        limit_heap_growth,
        release_memory,
        shared_pool,
        usable_cpus,
    )
    from inference.preprocessing import preprocess_array, preprocess_levels
    from inference.preprocessing_dali import DaliPreprocessor
    from inference.reduced_decode import SourceLevels
    from inference.rendering import EncodedObject, display_copy, display_image, display_level, shrink
    from inference.rsna_layout import CSV_NAME, IMAGES_DIR, RSNA_COLUMNS
    from inference.types import (
        SCREENING_SIDE_VIEWS,
        SCREENING_VIEWS,
        UNKNOWN,
        ImageFailure,
        ImageMeta,
        ImageScore,
        InputError,
        MammoNodeError,
        PreprocessConfig,
        StudyScore,
        view_key,
    )
    from inference.uids import derive_uid, is_valid_uid
    from inference.voi import apply_voi
    from inference.writers.common import copyable_header

_EXPORTS: dict[str, str] = {
    "BUNDLED_MODEL_DIR": "inference.bundled",
    "Backend": "inference.backends.base",
    "BackendUnavailable": "inference.backends.base",
    "CSV_NAME": "inference.rsna_layout",
    "DX_MAMMO_FOR_PRESENTATION": "inference.dicom_header",
    "DX_MAMMO_FOR_PROCESSING": "inference.dicom_header",
    "DaliPreprocessor": "inference.preprocessing_dali",
    "EncodedObject": "inference.rendering",
    "IMAGES_DIR": "inference.rsna_layout",
    "ImageFailure": "inference.types",
    "ImageMeta": "inference.types",
    "ImageScore": "inference.types",
    "InputError": "inference.types",
    "MammoNodeError": "inference.types",
    "ModelManifest": "inference.manifest",
    "POOL_KINDS": "inference.pixel_pool",
    "Pipeline": "inference.pipeline",
    "PixelPool": "inference.pixel_pool",
    "PoolKind": "inference.pixel_pool",
    "PreparedImage": "inference.pipeline",
    "PreprocessConfig": "inference.types",
    "RSNA_COLUMNS": "inference.rsna_layout",
    "SCREENING_SIDE_VIEWS": "inference.types",
    "SCREENING_VIEWS": "inference.types",
    "StudyOutputs": "inference.pipeline",
    "StudyScore": "inference.types",
    "UNKNOWN": "inference.types",
    "aggregate_studies": "inference.aggregation",
    "algorithm_info": "inference.manifest",
    "apply_voi": "inference.voi",
    "atomic_write_bytes": "inference.manifest",
    "build_engine": "inference.backends.tensorrt_build",
    "bundled_model_dir": "inference.bundled",
    "copyable_header": "inference.writers.common",
    "decode_pixels": "inference.dicom_pixels",
    "derive_uid": "inference.uids",
    "describe": "inference.phi",
    "display_copy": "inference.rendering",
    "display_image": "inference.rendering",
    "dumps": "inference.jsonsafe",
    "gpu_info": "inference.backends.cuda_runtime",
    "gpu_unavailable_reason": "inference.backends.cuda_runtime",
    "is_mammogram": "inference.dicom_header",
    "is_valid_uid": "inference.uids",
    "json_safe": "inference.jsonsafe",
    "limit_heap_growth": "inference.pixel_pool",
    "load_backend": "inference.backends.loader",
    "load_manifest": "inference.manifest",
    "parse_device": "inference.device",
    "precision_of": "inference.backends.tensorrt_build",
    "prepare_image": "inference.pipeline",
    "preprocess_array": "inference.preprocessing",
    "preprocess_levels": "inference.preprocessing",
    "SourceLevels": "inference.reduced_decode",
    "display_level": "inference.rendering",
    "shrink": "inference.rendering",
    "quiet_value_checks": "inference.phi",
    "read_dataset": "inference.dicom_header",
    "read_meta": "inference.dicom_header",
    "release_memory": "inference.pixel_pool",
    "resolve_model_dir": "inference.bundled",
    "save_png": "inference.overlay",
    "score_stream": "inference.batching",
    "scrub": "inference.phi",
    "scrub_library_logs": "inference.phi",
    "shared_pool": "inference.pixel_pool",
    "usable_cpus": "inference.pixel_pool",
    "verify_weights": "inference.manifest",
    "view_key": "inference.types",
    "where": "inference.phi",
}
"""Public name -> the module that defines it."""

__all__ = [
    "BUNDLED_MODEL_DIR",
    "CSV_NAME",
    "DX_MAMMO_FOR_PRESENTATION",
    "DX_MAMMO_FOR_PROCESSING",
    "IMAGES_DIR",
    "POOL_KINDS",
    "RSNA_COLUMNS",
    "SCREENING_SIDE_VIEWS",
    "SCREENING_VIEWS",
    "UNKNOWN",
    "Backend",
    "BackendUnavailable",
    "DaliPreprocessor",
    "EncodedObject",
    "ImageFailure",
    "ImageMeta",
    "ImageScore",
    "InputError",
    "MammoNodeError",
    "ModelManifest",
    "Pipeline",
    "PixelPool",
    "PoolKind",
    "PreparedImage",
    "PreprocessConfig",
    "SourceLevels",
    "StudyOutputs",
    "StudyScore",
    "aggregate_studies",
    "algorithm_info",
    "apply_voi",
    "atomic_write_bytes",
    "build_engine",
    "bundled_model_dir",
    "copyable_header",
    "decode_pixels",
    "derive_uid",
    "describe",
    "display_copy",
    "display_image",
    "display_level",
    "dumps",
    "gpu_info",
    "gpu_unavailable_reason",
    "is_mammogram",
    "is_valid_uid",
    "json_safe",
    "limit_heap_growth",
    "load_backend",
    "load_manifest",
    "parse_device",
    "precision_of",
    "prepare_image",
    "preprocess_array",
    "preprocess_levels",
    "quiet_value_checks",
    "read_dataset",
    "read_meta",
    "release_memory",
    "resolve_model_dir",
    "save_png",
    "score_stream",
    "scrub",
    "scrub_library_logs",
    "shared_pool",
    "shrink",
    "usable_cpus",
    "verify_weights",
    "view_key",
    "where",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'inference' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
