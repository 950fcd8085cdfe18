"""HTJ2K (transfer syntaxes 1.2.840.10008.1.2.4.201, .202 and .203) as the node decodes it.

The phantoms' HTJ2K code streams come from OpenJPH (training/synth/htj2k.py); the node decodes
them with its own :func:`inference.dicom_pixels.decode_pixels` (pydicom + pylibjpeg-openjpeg,
i.e. OpenJPEG): the lossless syntaxes bit for bit, the lossy one within its quantisation step, at
mammogram sizes. OpenJPH's decoder gives a second opinion on valid streams here, and only here: on
a truncated stream it returns a wrong image without an error, so the node never decodes with it,
and a truncated frame must be a clean InputError of the node's decoder (checked in a child process,
where a codec crash cannot take pytest down).
"""

from __future__ import annotations

import math
import multiprocessing
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom.encaps import encapsulate, get_frame

from inference.dicom_header import read_dataset
from inference.dicom_pixels import decode_pixels
from inference.types import InputError
from inference.uids import derive_uid
from training.synth import TRANSFER_SYNTAXES, make_dicom, synth_breast, write_dicom
from training.synth.htj2k import LOSSY_METHOD, LOSSY_STEP, RPCL_BASE_SIDE, rpcl_decompositions

HTJ2K_NAMES = ("htj2k", "htj2k-rpcl", "htj2k-lossy")
LOSSLESS = ("htj2k", "htj2k-rpcl")
MAMMOGRAM = (3328, 2560)
ODD_MAMMOGRAM = (4084, 3327)
OPENJPH_DEFAULT_DECOMPOSITIONS = 5
CHILD_TIMEOUT_S = 120
ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------
# Helpers: files, code stream headers (parsed here, not with the encoder's own code)
# --------------------------------------------------------------------------------------------


def write_image(
    path: Path, pixels: np.ndarray, name: str, bits: int = 12, photometric: str = "MONOCHROME2"
) -> Path:
    ds = make_dicom(
        pixels,
        patient_id="HTJ2K",
        study_uid=derive_uid("tests", "htj2k"),
        laterality="L",
        view="CC",
        bits_stored=bits,
        photometric=photometric,
        transfer_syntax=name,
    )
    write_dicom(ds, path)
    return path


def first_frame(path: Path) -> bytes:
    ds = read_dataset(path)
    return get_frame(ds.PixelData, 0, number_of_frames=1)


def main_header(stream: bytes) -> dict[int, bytes]:
    """Marker -> body of each main-header marker segment (SOC to the first SOT)."""
    assert stream[:2] == b"\xff\x4f", "not a raw J2K code stream"
    segments: dict[int, bytes] = {}
    pos = 2
    while True:
        marker, length = struct.unpack_from(">HH", stream, pos)
        if marker == 0xFF90:
            return segments
        segments[marker] = stream[pos + 4 : pos + 2 + length]
        pos += 2 + length


def precision(stream: bytes) -> int:
    siz = main_header(stream)[0xFF51]
    (components,) = struct.unpack_from(">H", siz, 34)
    assert components == 1
    assert siz[36] & 0x80 == 0, "signed samples"
    return (siz[36] & 0x7F) + 1


def coding_style(stream: bytes) -> tuple[int, int, bool]:
    """(progression order, decompositions, reversible) from the COD segment."""
    cod = main_header(stream)[0xFF52]
    return cod[1], cod[5], cod[9] == 1


def openjph_decode(stream: bytes) -> np.ndarray:
    """OpenJPH's reading of a valid stream: a second decoder, for the tests only."""
    import imagecodecs

    return np.asarray(imagecodecs.htj2k_decode(stream))


def step_values(bits: int) -> float:
    return LOSSY_STEP * (1 << bits)


@pytest.fixture(scope="module")
def phantom() -> np.ndarray:
    """A 12-bit 3328x2560 phantom, the size of a real digital mammogram."""
    pixels, _ = synth_breast(np.random.default_rng(12), laterality="L", view="CC", size=MAMMOGRAM)
    return pixels


@pytest.fixture(scope="module")
def odd_phantom(phantom: np.ndarray) -> np.ndarray:
    """The phantom stretched to an odd width and a larger height."""
    return cv2.resize(phantom, ODD_MAMMOGRAM[::-1], interpolation=cv2.INTER_LINEAR)


# --------------------------------------------------------------------------------------------
# The code streams
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "levels"),
    [
        ((1, 1), 1),
        ((64, 64), 1),
        ((65, 3), 1),
        ((129, 40), 2),
        (MAMMOGRAM, 6),
        ((4096, 4096), 6),
        ((4097, 8), 7),
    ],
)
def test_rpcl_decompositions_leave_the_smallest_base_of_at_most_64(
    size: tuple[int, int], levels: int
) -> None:
    assert rpcl_decompositions(*size) == levels
    base = [math.ceil(side / 2**levels) for side in size]
    assert max(base) <= RPCL_BASE_SIDE
    if levels > 1:  # one fewer would leave a side above the limit
        assert max(math.ceil(side / 2 ** (levels - 1)) for side in size) > RPCL_BASE_SIDE


@pytest.mark.parametrize("bits", [12, 14, 16])
@pytest.mark.parametrize("name", HTJ2K_NAMES)
def test_the_code_stream_precision_is_bits_stored(name: str, bits: int, tmp_path: Path) -> None:
    """Full-range noise at an odd size, MONOCHROME1: SIZ says Bits Stored, as PS3.5 8.2.4 asks, and
    both decoders read the stored values back (lossy: within about a step, at every depth)."""
    pixels = np.random.default_rng(bits).integers(0, 1 << bits, (131, 97), dtype=np.uint16)
    pixels.flat[:2] = [0, (1 << bits) - 1]
    path = write_image(tmp_path / f"{name}.dcm", pixels, name, bits, photometric="MONOCHROME1")
    ds = read_dataset(path)
    stream = first_frame(path)
    assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[name]
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, bits, bits - 1)
    assert precision(stream) == bits
    stored = (1 << bits) - 1 - pixels  # MONOCHROME1 stores the inverse
    decoded, second = decode_pixels(ds), openjph_decode(stream)
    assert decoded.dtype == np.uint16 and decoded.shape == pixels.shape
    if name in LOSSLESS:
        np.testing.assert_array_equal(decoded, stored)
        np.testing.assert_array_equal(second, stored)
    else:
        error = np.abs(decoded.astype(np.int64) - stored)
        assert 0 < error.max() <= 2 * step_values(bits)
        # two decoders' float rounding: a value at 12 bits, a few at 16
        assert np.abs(second.astype(np.int64) - decoded).max() <= 1 << (bits - 12)


def test_the_three_syntaxes_write_the_layouts_their_names_promise(tmp_path: Path) -> None:
    """.202: RPCL, a base resolution of at most 64 a side, TLM markers (PS3.5 10.18); .201 and .203
    as OpenJPH writes them by default; .201/.202 reversible (5/3), .203 irreversible (9/7)."""
    pixels = np.random.default_rng(3).integers(0, 4096, (300, 211), dtype=np.uint16)
    streams = {name: first_frame(write_image(tmp_path / f"{name}.dcm", pixels, name)) for name in HTJ2K_NAMES}
    rpcl = 2
    assert coding_style(streams["htj2k-rpcl"]) == (rpcl, rpcl_decompositions(300, 211), True)
    assert 0xFF55 in main_header(streams["htj2k-rpcl"])
    assert coding_style(streams["htj2k"]) == (rpcl, OPENJPH_DEFAULT_DECOMPOSITIONS, True)
    assert coding_style(streams["htj2k-lossy"]) == (rpcl, OPENJPH_DEFAULT_DECOMPOSITIONS, False)
    for name, stream in streams.items():
        (rsiz,) = struct.unpack_from(">H", main_header(stream)[0xFF51], 0)
        assert rsiz & 0x4000, f"{name}: Rsiz does not declare HTJ2K (ISO/IEC 15444-15) capabilities"
        assert 0xFF50 in main_header(stream), f"{name}: no CAP marker segment"


# --------------------------------------------------------------------------------------------
# Decoding at mammogram sizes
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("odd", [False, True], ids=["3328x2560", "4084x3327"])
@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_htj2k_decodes_bit_exactly_at_mammogram_size(
    name: str, odd: bool, phantom: np.ndarray, odd_phantom: np.ndarray, tmp_path: Path
) -> None:
    pixels = odd_phantom if odd else phantom
    path = write_image(tmp_path / f"{name}.dcm", pixels, name)
    ds = read_dataset(path)
    assert (ds.Rows, ds.Columns) == pixels.shape
    decoded = decode_pixels(ds)
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, pixels)
    np.testing.assert_array_equal(openjph_decode(first_frame(path)), pixels)
    assert ds.LossyImageCompression == "00" and "LossyImageCompressionMethod" not in ds


@pytest.mark.slow
@pytest.mark.parametrize("odd", [False, True], ids=["3328x2560", "4084x3327"])
def test_lossy_htj2k_decodes_close_and_says_it_is_lossy(
    odd: bool, phantom: np.ndarray, odd_phantom: np.ndarray, tmp_path: Path
) -> None:
    pixels = odd_phantom if odd else phantom
    path = write_image(tmp_path / "lossy.dcm", pixels, "htj2k-lossy")
    ds = read_dataset(path)
    stream = first_frame(path)
    error = np.abs(decode_pixels(ds).astype(np.int64) - pixels)
    step = step_values(12)
    assert 0 < error.max() <= 4 * step and error.mean() <= step / 2
    assert ds.LossyImageCompression == "01" and ds.LossyImageCompressionMethod == LOSSY_METHOD
    ratio = float(ds.LossyImageCompressionRatio)
    assert ratio == pytest.approx(pixels.size * 2 / len(stream), abs=0.01)
    assert ratio > 5  # it really compressed: a lossless stream of this phantom is about 2.8:1


# --------------------------------------------------------------------------------------------
# Truncated frames: a clean InputError, never a wrong image
# --------------------------------------------------------------------------------------------


KEEP = (0.9, 0.5, 0.02)
"""How much of the frame a truncated copy keeps: most of it, half, the headers and a little."""


def decode_truncated_in_child(path: Path, result: Path) -> None:
    """Child: for each of :data:`KEEP`, cut the frame of ``path`` to that share of its bytes and
    decode it with the node's decoder; write one line each, ``InputError: ...`` or ``decoded``."""
    ds = read_dataset(path)
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    lines = []
    for keep in KEEP:
        ds.PixelData = encapsulate([frame[: int(len(frame) * keep) // 2 * 2]])
        try:
            decode_pixels(ds)
        except InputError as exc:
            lines.append(f"InputError: {exc}")
            continue
        lines.append("decoded")
    result.write_text("\n".join(lines), encoding="utf-8")


@pytest.mark.parametrize("name", HTJ2K_NAMES)
def test_a_truncated_htj2k_frame_is_a_clean_input_error(name: str, tmp_path: Path) -> None:
    pixels, _ = synth_breast(np.random.default_rng(5), laterality="R", view="MLO", size=(512, 384))
    path = write_image(tmp_path / f"{name}.dcm", pixels, name)
    result = tmp_path / "result.txt"
    process = multiprocessing.get_context("spawn").Process(
        target=decode_truncated_in_child, args=(path, result)
    )
    process.start()
    process.join(CHILD_TIMEOUT_S)
    if process.is_alive():
        process.kill()
        process.join()
        pytest.fail(f"decoder child did not finish in {CHILD_TIMEOUT_S} s")
    assert process.exitcode == 0, f"decoder child exited {process.exitcode}"
    lines = result.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(KEEP)
    for keep, line in zip(KEEP, lines, strict=True):
        assert line.startswith("InputError: cannot decode pixel data"), (keep, line)
        assert TRANSFER_SYNTAXES[name] in line


def test_the_node_never_decodes_with_openjph() -> None:
    """OpenJPH (imagecodecs.htj2k_decode) returns a wrong image for a truncated stream without an
    error: neither the node nor the preprocessing may call it."""
    users = [
        path.relative_to(ROOT)
        for package in ("node", "inference")
        for path in sorted((ROOT / package).rglob("*.py"))
        if "htj2k_decode" in path.read_text(encoding="utf-8")
    ]
    assert users == []
