"""Fuzzing the receipt checks and the decoder with mutated real-shaped files (hypothesis).

Bases are what public CBIS-DDSM files look like (Secondary Capture, Modality MG, no ViewPosition,
odd width; 600 x 401 here for speed) in native, RLE and JPEG 2000 encodings. Each example flips,
cuts, inserts or overwrites bytes, aiming often at length fields and the code-stream header.

Properties:
- intake (:func:`node.dicom.intake.examine`, exactly as the SCP's ``_store`` calls it) either
  accepts or raises an :class:`~inference.types.InputError` subclass, i.e. a named status;
- decoding (what the worker does) in a child process either returns or raises InputError; a
  child that dies is reported as InputError by the pool, and the test process never dies.

Budget: the ``ci`` profile (default) runs a few dozen derandomized examples. For a long run:

    MAMMONODE_FUZZ_PROFILE=long .venv/bin/python -m pytest tests/reliability/test_fuzz_intake.py -q

(``long``: 5000 random examples per test; ``MAMMONODE_FUZZ_EXAMPLES=N`` overrides the count.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import cache

import hostile
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference.pixel_pool import PixelPool
from inference.types import InputError
from node.dicom import intake
from node.dicom.spool import InvalidUIDError

settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "long", max_examples=5000, deadline=None, derandomize=False, suppress_health_check=[HealthCheck.too_slow]
)
PROFILE = settings.get_profile(os.environ.get("MAMMONODE_FUZZ_PROFILE", "ci"))
if os.environ.get("MAMMONODE_FUZZ_EXAMPLES"):
    PROFILE = settings(PROFILE, max_examples=int(os.environ["MAMMONODE_FUZZ_EXAMPLES"]))

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns on every mutant
SYNTAXES = ("explicit", "rle", "jpeg2000")
SIZE = (600, 401)
MAX_PIXELS = 50_000_000
PREAMBLE = 132
"""Preamble and DICM prefix: the network never carries them, so mutations start after."""
NASTY_LENGTHS = (0, 1, 2, 3, 7, 0xFF, 0xFFFF, 0xFFFE, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFFFFFF0)


@cache
def base(syntax: str) -> tuple[bytes, str, str, list[int]]:
    """(file bytes, SOP Instance UID, transfer syntax, interesting offsets) of a base file."""
    ds = hostile.base_dataset(syntax, number=SYNTAXES.index(syntax) + 100, size=SIZE)
    data = hostile.encode(ds)
    return data, str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID), hostile.length_fields(data)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, str, str]:
    syntax = draw(st.sampled_from(SYNTAXES))
    data, sop, ts, fields = base(syntax)
    buffer = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(("length", "length", "flip", "truncate", "insert", "overwrite")))
        if len(buffer) <= PREAMBLE:  # cut to the preamble: nothing left to mutate
            break
        if kind == "length" and fields:
            at = draw(st.sampled_from(fields))
            value = draw(st.sampled_from(NASTY_LENGTHS) | st.integers(0, 0xFFFFFFFF))
            width = draw(st.sampled_from((2, 4)))
            buffer[at : at + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
        elif kind == "flip":
            at = draw(st.integers(PREAMBLE, len(buffer) - 1))
            buffer[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del buffer[draw(st.integers(PREAMBLE, len(buffer))) :]
        elif kind == "insert":
            at = draw(st.integers(PREAMBLE, len(buffer)))
            buffer[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "overwrite" and fields:
            at = draw(st.sampled_from(fields)) + draw(st.integers(-8, 8))
            chunk = draw(st.binary(min_size=1, max_size=8))
            buffer[max(at, PREAMBLE) : max(at, PREAMBLE) + len(chunk)] = chunk
    return bytes(buffer), sop, ts


def _examine(data: bytes, sop: str, ts: str) -> str:
    """``accepted`` or the refusing error's class name; any other exception fails the test."""
    try:
        intake.examine(
            data,
            transfer_syntax=ts,
            context_sop_class=hostile.SECONDARY_CAPTURE,
            affected_sop_instance=sop,
            max_pixels=MAX_PIXELS,
        )
    except (InputError, InvalidUIDError) as exc:  # the SCP answers both with a named status
        return type(exc).__name__
    return "accepted"


@pytest.fixture(scope="module")
def child_pool() -> Iterator[object]:
    """Pixel work in a spawned child, as the worker runs it (a dead child is an InputError)."""
    pool = PixelPool("process", workers=1)
    try:
        yield pool
    finally:
        pool.close()


def test_the_bases_are_accepted_and_decode() -> None:
    for syntax in SYNTAXES:
        data, sop, ts, fields = base(syntax)
        assert _examine(data, sop, ts) == "accepted" and fields
        assert hostile.decode_bytes(data) == SIZE


@PROFILE
@given(example=mutated())
def test_intake_refuses_with_a_named_error_or_accepts(example: tuple[bytes, str, str]) -> None:
    data, sop, ts = example
    assert _examine(data, sop, ts) in {"accepted", InvalidUIDError.__name__} | _INPUT_ERRORS


@settings(PROFILE, max_examples=max(PROFILE.max_examples // 2, 10))
@given(example=mutated())
def test_decoding_in_a_child_returns_or_raises_input_error(
    example: tuple[bytes, str, str], child_pool: object
) -> None:
    data, _, _ = example
    [(_, outcome)] = list(child_pool.imap(hostile.decode_bytes, [data]))  # type: ignore[attr-defined]
    assert isinstance(outcome, tuple | InputError), f"{type(outcome).__name__}: {outcome}"


def _subclasses(cls: type) -> set[str]:
    out = {cls.__name__}
    sub: type
    for sub in cls.__subclasses__():
        out |= _subclasses(sub)
    return out


_INPUT_ERRORS = _subclasses(InputError)
