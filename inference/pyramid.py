"""The resolution pyramid of a source image: JPEG 2000's own, computed or decoded.

A JPEG 2000 code stream is a wavelet pyramid, and a decoder can stop at a coarser level for a
fraction of the time (a 3328x2560 mammogram: 1.2 s in full, 0.25 s at half, 0.06 s at a quarter
resolution). The model reads a 512x256 or 1024x512 grid, so most of a full decode is thrown away.
For the node to give the same answer whatever the transfer syntax and whichever path decoded the
image, the coarser levels are *defined* as what a JPEG 2000 decoder returns for a reversible
(lossless, 5/3) code stream: level ``r + 1`` is the low-pass (LL) band of one 2-D analysis step of
the reversible 5/3 integer lifting (ISO/IEC 15444-1 Annex F: vertical, then horizontal; whole-sample
symmetric extension) of level ``r``, clipped to the stored sample range as a decoder clips its
output. Level 0 is the stored image.

A reduced JPEG 2000 decode of a single-tile lossless code stream gives exactly these arrays (checked
bit for bit against openjpeg in the tests, which is why every level is clipped before the next is
made); every other source (RLE, JPEG-LS, JPEG Lossless, native, a multi-tile or a lossy JPEG 2000
stream) is decoded in full and its levels computed here. A level ``r`` array has
``ceil(rows / 2**r)`` rows; :meth:`Pyramid.level` trims it to ``rows // 2**r`` so that its pixel
``(i, j)`` stands for source pixels ``[i 2^r, (i + 1) 2^r)`` (a trimmed row or column holds fewer
than ``2^r`` source pixels at the bottom or right edge).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MAX_LEVEL = 5
"""Coarsest level ever used (a 32x reduction); JPEG 2000 streams of mammograms carry 5 or 6."""


def lowpass(x: np.ndarray, axis: int) -> np.ndarray:
    """The low-pass band of one reversible 5/3 lifting step along ``axis`` (int32 in, int32 out).

    ``d[n] = x[2n+1] - floor((x[2n] + x[2n+2]) / 2)``, ``s[n] = x[2n] + floor((d[n-1] + d[n] + 2) / 4)``
    with whole-sample symmetric extension (``x[-1] = x[1]``, ``x[N] = x[N-2]``); a single sample
    is its own low pass, as in the standard for an even origin.
    """
    a = np.moveaxis(x, axis, 0)
    n = a.shape[0]
    if n == 1:
        return np.array(x, dtype=np.int32, copy=True)
    even, odd = a[0::2], a[1::2]
    ne, no = even.shape[0], odd.shape[0]
    right = np.empty_like(odd)
    right[: no - 1] = even[1:no]
    right[no - 1] = even[no] if ne > no else even[no - 1]
    right += even[:no]
    right >>= 1
    d = odd - right
    acc = np.empty_like(even)
    acc[:no] = d
    if ne > no:
        acc[no] = d[no - 1]
    acc[1:] += d[: ne - 1]
    acc[0] += d[0]
    acc += 2
    acc >>= 2
    acc += even
    return np.moveaxis(acc, 0, axis)


def next_level(x: np.ndarray, low: int, high: int) -> np.ndarray:
    """Level ``r + 1`` from level ``r``: vertical then horizontal low pass, clipped to [low, high]."""
    out = lowpass(lowpass(np.asarray(x, dtype=np.int32), 0), 1)
    np.clip(out, low, high, out=out)
    return np.ascontiguousarray(out)


@dataclass
class Pyramid:
    """A source image's stored values at the levels asked for, computed on demand and kept.

    ``rows`` x ``columns`` is the source (level 0) size; ``base`` the finest level held (0 after a
    full decode, ``r`` after a reduced one); ``low``..``high`` the stored sample range every level
    is clipped to. Only levels ``>= base`` can be asked for.
    """

    rows: int
    columns: int
    base: int
    low: int
    high: int
    untrimmed: dict[int, np.ndarray] = field(default_factory=dict)

    @classmethod
    def of(cls, image: np.ndarray, rows: int, columns: int, base: int, low: int, high: int) -> Pyramid:
        """A pyramid holding ``image`` as level ``base`` (shape checked against the source size)."""
        expected = (-(-rows // (1 << base)), -(-columns // (1 << base)))
        if image.shape != expected:
            raise ValueError(f"level {base} of a {rows}x{columns} image is {expected}, got {image.shape}")
        return cls(rows, columns, base, low, high, {base: image})

    def level(self, r: int) -> np.ndarray:
        """Level ``r``, trimmed to ``rows // 2**r`` x ``columns // 2**r`` (a view; do not modify)."""
        if r < self.base:
            raise ValueError(f"level {r} is finer than the decoded level {self.base}")
        top = max(self.untrimmed)
        while top < r:
            self.untrimmed[top + 1] = next_level(self.untrimmed[top], self.low, self.high)
            top += 1
        f = 1 << r
        return self.untrimmed[r][: max(1, self.rows // f), : max(1, self.columns // f)]


def sample_range(bits: int, signed: bool) -> tuple[int, int]:
    """The range of a ``bits``-bit stored sample (what a decoder clips to)."""
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1
