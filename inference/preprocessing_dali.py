"""GPU preprocessing with NVIDIA DALI: the JPEG 2000 decode on the device, the CPU path's plan.

The CPU path (:mod:`inference.reduced_decode`, :mod:`inference.voi`, :mod:`inference.preprocessing`)
decodes only the resolution-pyramid levels it needs, windows, inverts MONOCHROME1, min-max
normalises, crops the breast, flips it so the chest wall is on ``config.chest_wall_side``, resizes
keeping the aspect ratio and pads to the model grid. On a GPU the expensive step is the decode of
the full code stream, which nvJPEG2000 does fast and without a reduced-resolution mode; so:

1. **Device** (``_decode_graph``): decode the JPEG 2000 / JPEG Lossless code stream sliced out of
   PixelData with ``fn.decoders.image(output_type=ANY_DATA, dtype=UINT16)``: the stored values.
2. **Host**: they are copied to the host once (16 bits a pixel), and there the CPU path's own code
   computes the pyramid levels it would read (:meth:`inference.reduced_decode.SourceLevels.from_stored`),
   windows them, finds the breast, chooses the level and the geometry
   (:func:`inference.preprocessing.plan_levels`) and makes the CAM capture's display copy
   (:func:`inference.rendering.display_level`): the same arrays, transform and display as the CPU
   path, so CAMs map back identically. Lifting and windowing a level is tens of milliseconds.
3. **Device** (``_geometry_graph``): the chosen level (already windowed and normalised, a quarter
   or a sixteenth of the source's pixels) is cropped, flipped, resized (area resampling as
   OpenCV's INTER_AREA when shrinking: nearest-neighbour samples on a grid k times finer, then
   the mean of each k x k block, k at least :data:`AREA_SUPERSAMPLING` / scale; plain bilinear
   when growing), padded onto the model grid, clipped to [0, 1] and laid out as (B, 1, H, W). On a
   GPU the batch stays in device memory and is handed to the backend as a
   :class:`~inference.backends.cuda_runtime.CudaArray` (TensorRT binds its pointer; torch wraps
   it), never through the host.

The one difference from the CPU path, bounded by the parity test: when shrinking, the box mean of
nearest-neighbour samples on a grid k times finer instead of OpenCV's exact INTER_AREA (the same
box filter, sampled rather than integrated: small differences at sharp edges).

What DALI is not given, the CPU path takes (``fallbacks``, with the reason): transfer syntaxes
other than JPEG 2000 (and JPEG Lossless, which DALI decodes on the GPU only); 8-bit code streams
(DALI rescales them to 16 bits, and an 8-bit baseline JPEG decoded as ANY_DATA crashes the
process, so no baseline JPEG is ever sent); anything but unsigned single-sample 16-bit
MONOCHROME1/2; a code stream whose header disagrees with the DICOM tags; and a whole batch whose
DALI run failed (the pipeline is rebuilt). Any VOI (window, VOI LUT, the fallback) and Modality LUT
is fine: the host applies them with the CPU path's code.

DALI is imported inside the functions (``nvidia-dali-cuda120``, in the ``gpu`` and ``dev``
extras); DALI also runs without a GPU (``device_id=None``), which is how CI tests this module.
"""

from __future__ import annotations

import logging
import math
import struct
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame

from inference.backends.cuda_runtime import CudaArray
from inference.dicom_header import read_meta
from inference.dicom_pixels import MAX_PIXELS
from inference.preprocessing import LevelPlan, plan_levels
from inference.reduced_decode import SourceLevels
from inference.rendering import display_copy
from inference.types import GeometricTransform, ImageMeta, InputError, PreprocessConfig

if TYPE_CHECKING:
    from nvidia.dali.pipeline import Pipeline as DaliPipeline

logger = logging.getLogger(__name__)

JPEG2000_LOSSLESS = uid.JPEG2000Lossless
JPEG2000 = uid.JPEG2000
JPEG_LOSSLESS_P14 = uid.JPEGLossless
JPEG_LOSSLESS_SV1 = uid.JPEGLosslessSV1
_J2K_SYNTAXES = frozenset({JPEG2000_LOSSLESS, JPEG2000})
_LOSSLESS_SYNTAXES = frozenset({JPEG_LOSSLESS_P14, JPEG_LOSSLESS_SV1})
MIN_PRECISION = 9
AREA_SUPERSAMPLING = 8
"""Samples per output pixel and axis, at least, of the box mean that stands in for INTER_AREA: the
pyramid level is only 1-2x larger than the grid, where a 2x2 mean is a coarse area integral."""
"""Code streams of 8 bits or fewer are rescaled to the full 16-bit range by DALI: CPU path."""


@dataclass(frozen=True)
class CodeStream:
    """The first frame's compressed bytes and what their header says."""

    data: bytes
    kind: str  # "jpeg2000" or "jpeg-lossless"
    precision: int  # bits per sample in the code stream


class NotForDali(Exception):
    """This file goes to the CPU path; ``reason`` says why (logged at debug level)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def route(ds: Dataset, *, gpu: bool) -> CodeStream:
    """The code stream DALI decodes for ``ds``, or :class:`NotForDali` with the reason.

    Checks everything DALI would get wrong or crash on before anything is sent to it; the CPU
    path handles (or reports) all the rest.
    """
    ts = str(getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID", ""))
    if ts in _LOSSLESS_SYNTAXES and not gpu:
        raise NotForDali("JPEG Lossless is decoded by DALI on the GPU only")
    if ts not in _J2K_SYNTAXES | _LOSSLESS_SYNTAXES:
        raise NotForDali(f"transfer syntax {ts or 'missing'} is not decoded by DALI")
    rows, cols = _int_tag(ds, "Rows"), _int_tag(ds, "Columns")
    layout = (
        _int_tag(ds, "SamplesPerPixel", 1),
        _int_tag(ds, "BitsAllocated"),
        _int_tag(ds, "PixelRepresentation"),
        _int_tag(ds, "NumberOfFrames", 1),
    )
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if layout != (1, 16, 0, 1) or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise NotForDali(f"pixel layout {photometric} samples/bits/signed/frames={layout} is not for DALI")
    if rows < 2 or cols < 2 or rows * cols > MAX_PIXELS:
        raise NotForDali(f"image size {rows}x{cols}")
    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    except (InputError, ValueError, KeyError, AttributeError, TypeError, struct.error) as exc:
        raise NotForDali(f"cannot slice the code stream: {exc}") from exc
    check = _check_j2k if ts in _J2K_SYNTAXES else _check_jpeg_lossless
    return check(frame, rows, cols)


def _int_tag(ds: Dataset, keyword: str, default: int = 0) -> int:
    try:
        value = ds.get(keyword)
        return default if value in (None, "") else int(value)
    except (ValueError, TypeError):
        return -1


def _check_j2k(frame: bytes, rows: int, cols: int) -> CodeStream:
    """A raw J2K code stream (SOC, SIZ) of one unsigned 9-16-bit component of the tagged size."""
    if len(frame) < 45 or frame[:4] != b"\xff\x4f\xff\x51":
        raise NotForDali("not a raw JPEG 2000 code stream (no SOC+SIZ; a JP2 wrapper?)")
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">4I", frame[8:24])
    components = struct.unpack(">H", frame[40:42])[0]
    ssiz = frame[42]
    precision, signed = (ssiz & 0x7F) + 1, bool(ssiz & 0x80)
    if (ysiz - yosiz, xsiz - xosiz) != (rows, cols) or components != 1 or signed:
        raise NotForDali(
            f"J2K header {ysiz - yosiz}x{xsiz - xosiz}, {components} components, signed={signed}"
        )
    if not MIN_PRECISION <= precision <= 16:
        raise NotForDali(f"{precision}-bit J2K code stream")
    return CodeStream(frame, "jpeg2000", precision)


_SOF_MARKERS = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)})
_STANDALONE = frozenset({0x01, *range(0xD0, 0xDA)})


def _check_jpeg_lossless(frame: bytes, rows: int, cols: int) -> CodeStream:
    """A process-14 (SOF3) Huffman lossless stream, one 9-16-bit component, predictor 1.

    Only SOF3 passes: a baseline or extended (8/12-bit DCT) JPEG never reaches DALI.
    """
    if frame[:2] != b"\xff\xd8":
        raise NotForDali("not a JPEG code stream (no SOI)")
    pos, sof = 2, None
    while pos + 4 <= len(frame):
        if frame[pos] != 0xFF:
            raise NotForDali(f"corrupt JPEG marker stream at byte {pos}")
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        length = struct.unpack(">H", frame[pos + 2 : pos + 4])[0]
        body = frame[pos + 4 : pos + 2 + length]
        if marker in _SOF_MARKERS:
            if marker != 0xC3:
                raise NotForDali(f"JPEG SOF{marker - 0xC0} is not lossless process 14")
            if len(body) < 6:
                raise NotForDali("truncated JPEG SOF3 segment")
            precision, height, width, components = struct.unpack(">BHHB", body[:6])
            sof = (precision, height, width, components)
        elif marker == 0xDA:  # SOS: Ns, Ns x (Cs, Td/Ta), Ss (the predictor for lossless), Se, Ah/Al
            if sof is None or len(body) < 1 + 2 * body[0] + 3:
                raise NotForDali("JPEG scan before its frame header")
            predictor = body[1 + 2 * body[0]]
            precision, height, width, components = sof
            if (height, width) != (rows, cols) or components != 1:
                raise NotForDali(f"JPEG header {height}x{width}, {components} components")
            if not MIN_PRECISION <= precision <= 16 or predictor != 1:
                raise NotForDali(f"{precision}-bit JPEG Lossless with predictor {predictor}")
            return CodeStream(frame, "jpeg-lossless", precision)
        pos += 2 + length
    raise NotForDali("no JPEG scan found")


@dataclass
class DaliRow:
    """One image that went through DALI: its row in the batch and what it needs downstream."""

    index: int  # position in the ``datasets`` given to :meth:`DaliPreprocessor.prepare`
    meta: ImageMeta
    transform: GeometricTransform
    display: np.ndarray  # the capture's display copy, as :func:`inference.pipeline.prepare_image` makes it


@dataclass
class DaliBatch:
    """What :meth:`DaliPreprocessor.prepare` made of a list of datasets.

    ``batch`` is float32 (n, 1, H, W) with one row per ``rows`` entry: a numpy array in CPU mode,
    a :class:`CudaArray` on the GPU, valid until the next ``prepare`` call (DALI reuses its
    output memory). ``fallbacks`` are the images for the CPU path, ``errors`` those that cannot be
    scored at all (the same InputError the CPU path raises: a uniform image, no breast).
    """

    batch: np.ndarray | CudaArray
    rows: list[DaliRow] = field(default_factory=list)
    fallbacks: list[tuple[int, str]] = field(default_factory=list)
    errors: list[tuple[int, InputError]] = field(default_factory=list)

    @property
    def transforms(self) -> list[GeometricTransform]:
        return [row.transform for row in self.rows]


@dataclass
class _Accepted:
    index: int
    meta: ImageMeta
    stream: CodeStream
    dataset: Dataset


class DaliPreprocessor:
    """Prepares batches of DICOM datasets with DALI, on GPU ``device_id`` or on the CPU (None).

    ``batch_size`` is the most datasets one :meth:`prepare` call takes (DALI's batch size).
    Calls are serialised (DALI pipelines are fed and run one batch at a time).
    """

    def __init__(
        self,
        config: PreprocessConfig,
        *,
        device_id: int | None = None,
        batch_size: int = 8,
        num_threads: int = 2,
    ) -> None:
        if batch_size < 1 or num_threads < 1:
            raise ValueError(f"batch_size and num_threads must be >= 1, got {batch_size}, {num_threads}")
        if config.input_height < 1 or config.input_width < 1:
            raise ValueError(f"invalid model grid {config.input_height}x{config.input_width}")
        self.config = config
        self.device_id = device_id
        self.batch_size = batch_size
        self.num_threads = num_threads
        self._pipes: tuple[DaliPipeline, DaliPipeline] | None = None
        self._decoder: DaliPipeline | None = None
        self._lock = threading.Lock()

    @property
    def gpu(self) -> bool:
        return self.device_id is not None

    def _pipeline_args(self) -> dict[str, Any]:
        """Synchronous execution: each run is fed, run and read before the next one."""
        return {
            "batch_size": self.batch_size,
            "num_threads": self.num_threads,
            "device_id": self.device_id,
            "prefetch_queue_depth": 1,
            "exec_async": False,
            "exec_pipelined": False,
        }

    def _pipelines(self) -> tuple[DaliPipeline, DaliPipeline]:
        if self._pipes is None:
            common = self._pipeline_args()
            decoder = _decode_graph(gpu=self.gpu, **common)
            geometry = _geometry_graph(
                gpu=self.gpu, grid=(self.config.input_height, self.config.input_width), **common
            )
            decoder.build()
            geometry.build()
            self._pipes = (decoder, geometry)
        return self._pipes

    def decode(self, datasets: list[Dataset]) -> list[np.ndarray]:
        """Only decode (what the bench times, and what must match pydicom bit for bit): the stored
        values of each dataset's first frame as uint16 (rows, columns), on the host.

        Raises :class:`NotForDali` for a dataset :meth:`prepare` would send to the CPU path.
        """
        if len(datasets) > self.batch_size:
            raise ValueError(f"{len(datasets)} datasets exceed the DALI batch size {self.batch_size}")
        streams = [route(ds, gpu=self.gpu) for ds in datasets]
        with self._lock:
            if self._decoder is None:
                self._decoder = _decode_graph(gpu=self.gpu, **self._pipeline_args())
                self._decoder.build()
            (decoded,) = self._decoder.run(stream=[np.frombuffer(s.data, dtype=np.uint8) for s in streams])
            host = decoded.as_cpu() if self.gpu else decoded
            return [np.array(host[k])[:, :, 0] for k in range(len(streams))]

    def prepare(self, datasets: list[Dataset], metas: list[ImageMeta] | None = None) -> DaliBatch:
        """Preprocess up to ``batch_size`` datasets; see :class:`DaliBatch` for the result."""
        if len(datasets) > self.batch_size:
            raise ValueError(f"{len(datasets)} datasets exceed the DALI batch size {self.batch_size}")
        if metas is not None and len(metas) != len(datasets):
            raise ValueError("metas must be given for every dataset or not at all")
        result = DaliBatch(batch=self._empty())
        accepted: list[_Accepted] = []
        for index, ds in enumerate(datasets):
            try:
                meta = metas[index] if metas is not None else read_meta(ds)
                stream = route(ds, gpu=self.gpu)
            except (NotForDali, InputError) as exc:
                reason = exc.reason if isinstance(exc, NotForDali) else str(exc)
                logger.debug("image %d to the CPU path: %s", index, reason)
                result.fallbacks.append((index, reason))
                continue
            accepted.append(_Accepted(index, meta, stream, ds))
        if not accepted:
            return result
        with self._lock:
            try:
                self._run(accepted, result)
            except (RuntimeError, IndexError, ValueError, TypeError) as exc:
                # A failed run leaves the DALI pipeline unusable: rebuild it, the batch goes to the CPU.
                reason = f"DALI failed: {_brief(exc)}"
                logger.warning("%s (a batch of %d goes to the CPU path)", reason, len(accepted))
                self._pipes = None
                ids = {a.index for a in accepted}
                result.rows.clear()
                result.errors = [e for e in result.errors if e[0] not in ids]
                result.fallbacks = [f for f in result.fallbacks if f[0] not in ids]
                result.fallbacks.extend((a.index, reason) for a in accepted)
                result.batch = self._empty()
        result.fallbacks.sort()
        return result

    def _empty(self) -> np.ndarray:
        return np.zeros((0, 1, self.config.input_height, self.config.input_width), dtype=np.float32)

    def _run(self, accepted: list[_Accepted], result: DaliBatch) -> None:
        decode_pipe, geometry_pipe = self._pipelines()
        (decoded,) = decode_pipe.run(stream=[np.frombuffer(a.stream.data, dtype=np.uint8) for a in accepted])
        stored = decoded.as_cpu() if self.gpu else decoded
        images: list[np.ndarray] = []
        plans: list[tuple[float, float, GeometricTransform]] = []
        for k, item in enumerate(accepted):
            pixels = np.array(stored[k])[:, :, 0]
            if int(pixels.max()) > (1 << item.stream.precision) - 1:
                # The decoder scaled the values to the 16-bit range; they are not the stored values.
                result.fallbacks.append(
                    (item.index, f"DALI decoder rescaled a {item.stream.precision}-bit stream")
                )
                continue
            try:
                plan, display = _plan_on_host(item, pixels, self.config)
            except InputError as exc:
                result.errors.append((item.index, exc))
                continue
            images.append(np.ascontiguousarray(plan.image[:, :, None]))
            plans.append((0.0, 1.0, plan.level_transform))
            result.rows.append(DaliRow(item.index, item.meta, plan.transform, display))
        if not images:
            return
        (grid,) = geometry_pipe.run(image=images, **_geometry_inputs(plans))
        tensor = grid.as_tensor()
        if self.gpu:
            shape = tuple(int(d) for d in tensor.shape())
            result.batch = CudaArray(
                ptr=cast(int, tensor.data_ptr()),
                shape=shape,
                dtype=np.dtype(np.float32),
                owner=(tensor, grid),
                to_host=lambda: np.array(tensor.as_cpu(), dtype=np.float32),
                device_index=int(self.device_id or 0),
            )
        else:
            result.batch = np.array(tensor, dtype=np.float32)


def _plan_on_host(
    item: _Accepted, stored: np.ndarray, config: PreprocessConfig
) -> tuple[LevelPlan, np.ndarray]:
    """The CPU path's geometry and display copy from the stored values DALI decoded: the breast
    is found, and the level chosen, on the same pyramid levels (:func:`plan_levels`), so both paths
    crop, flip and scale alike; only the final resampling (from the full-resolution image, on the
    device) differs."""
    ds = item.dataset
    source = SourceLevels.from_stored(ds, stored)
    plan = plan_levels(source, ds, item.meta, config)
    return plan, display_copy(source, ds, fallback=config.fallback_window)


def _brief(exc: BaseException) -> str:
    """DALI's message without its pipeline-definition traceback: what it "encountered"."""
    text = str(exc)
    _, found, after = text.partition("encountered:")
    return " ".join((after if found else text).split())[:200] or type(exc).__name__


def _geometry_inputs(plans: list[tuple[float, float, GeometricTransform]]) -> dict[str, list[Any]]:
    """Per-sample crop, normalisation, flip, size and padding of each planned transform.

    Normalisation is :func:`inference.preprocessing.normalised_grey`'s: ``(x - low) * (1 / (high
    - low))`` in float32, with low/high the windowed image's minimum and maximum.
    """
    inputs: dict[str, list[Any]] = {
        k: [] for k in ("start", "shape", "low", "scale", "flip", "shrinking", "size", "blocks", "pad")
    }
    for low, high, t in plans:
        y0, y1, x0, x1 = t.crop_box
        rh, rw = t.resized_shape
        k = 1 if t.scale >= 1.0 else math.ceil(AREA_SUPERSAMPLING / t.scale - 1e-9)
        inputs["start"].append(np.array([y0, x0], dtype=np.int32))
        inputs["shape"].append(np.array([y1 - y0, x1 - x0], dtype=np.int32))
        inputs["low"].append(np.float32(low))
        inputs["scale"].append(np.float32(1.0 / (high - low)))
        inputs["flip"].append(np.int32(t.flipped))
        inputs["shrinking"].append(np.float32(t.scale < 1.0))
        inputs["size"].append(np.array([k * rh, k * rw], dtype=np.float32))
        inputs["blocks"].append(np.array([rh, k, rw, k], dtype=np.int32))
        inputs["pad"].append(np.array([-t.pad_top, -t.pad_left], dtype=np.int32))
    return inputs


def _scalar(name: str, dtype: Any) -> Any:
    from nvidia.dali import fn

    return fn.external_source(name=name, dtype=dtype, ndim=0)


def _decode(stream: Any, *, gpu: bool) -> Any:
    """The 16-bit decode both graphs share: never given anything :func:`route` did not pass."""
    from nvidia.dali import fn, types

    return fn.decoders.image(
        stream,
        device="mixed" if gpu else "cpu",
        output_type=types.DALIImageType.ANY_DATA,
        dtype=types.DALIDataType.UINT16,
    )


def _decode_graph(*, gpu: bool, **pipeline_args: Any) -> DaliPipeline:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def graph() -> Any:
        return _decode(fn.external_source(name="stream", dtype=types.DALIDataType.UINT8, ndim=1), gpu=gpu)

    pipe: DaliPipeline = graph(**pipeline_args)
    return pipe


def _geometry_graph(*, gpu: bool, grid: tuple[int, int], **pipeline_args: Any) -> DaliPipeline:
    """crop -> normalise -> flip -> resize -> pad onto the grid -> clip -> (1, H, W)."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def graph() -> Any:
        image = fn.external_source(
            name="image", device="gpu" if gpu else "cpu", dtype=types.DALIDataType.FLOAT, ndim=3, layout="HWC"
        )
        start = fn.external_source(name="start", dtype=types.DALIDataType.INT32, ndim=1)
        shape = fn.external_source(name="shape", dtype=types.DALIDataType.INT32, ndim=1)
        params = [_scalar("low", types.DALIDataType.FLOAT), _scalar("scale", types.DALIDataType.FLOAT)]
        low, scale = (p.gpu() for p in params) if gpu else params
        flip = _scalar("flip", types.DALIDataType.INT32)
        shrinking = _scalar("shrinking", types.DALIDataType.FLOAT)
        shrinking = shrinking.gpu() if gpu else shrinking
        size = fn.external_source(name="size", dtype=types.DALIDataType.FLOAT, ndim=1)
        blocks = fn.external_source(name="blocks", dtype=types.DALIDataType.INT32, ndim=1)
        pad = fn.external_source(name="pad", dtype=types.DALIDataType.INT32, ndim=1)
        crop = fn.slice(image, start=start, shape=shape, axes=(0, 1))
        normalised = (crop - low) * scale
        oriented = fn.flip(normalised, horizontal=flip)
        # Area resampling as OpenCV's INTER_AREA does it when shrinking: nearest-neighbour samples
        # on a grid k times finer than the output, then the mean of each k x k block (the area
        # integral of the pixels as squares; bilinear samples would add a one-pixel triangle blur,
        # which matters at the 1-2x shrink from a pyramid level). Growing: plain bilinear, k = 1.
        # DALI's own antialiased filter is a triangle twice as wide as the box: it blurs visibly
        # more than what the model was trained on.
        nearest = fn.resize(oriented, size=size, interp_type=types.DALIInterpType.INTERP_NN, antialias=False)
        linear = fn.resize(
            oriented, size=size, interp_type=types.DALIInterpType.INTERP_LINEAR, antialias=False
        )
        fine: Any = nearest * shrinking + linear * (1.0 - shrinking)
        pooled: Any = fn.reductions.mean(fn.reshape(fine, shape=blocks), axes=[1, 3])
        resized = fn.expand_dims(pooled, axes=[2])
        placed = fn.slice(
            resized, start=pad, shape=list(grid), axes=(0, 1), out_of_bounds_policy="pad", fill_values=0.0
        )
        return fn.transpose(dmath.clamp(placed, 0.0, 1.0), perm=[2, 0, 1])

    pipe: DaliPipeline = graph(**pipeline_args)
    return pipe
