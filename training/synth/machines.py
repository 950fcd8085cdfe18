"""Simulated mammography units: what differs between sites and machines in the RSNA data.

Each machine fixes the bit depth and the photometric interpretation, and leans towards some
VOI styles, burned-in labels and collimator strips. Patients are spread over the machines so
that every small dataset still contains every variant.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Machine:
    """One simulated unit. ``machine_id`` and ``site_id`` follow the RSNA csv conventions."""

    machine_id: int
    site_id: int
    model_name: str
    bits_stored: int
    photometric: str
    label_rate: float  # fraction of images with a burned-in "R MLO"-style label
    border_rate: float  # fraction of images with a bright collimator strip


MACHINES: tuple[Machine, ...] = (
    Machine(48, 1, "Phantom Selenia 12", 12, "MONOCHROME2", 0.35, 0.10),
    Machine(21, 1, "Phantom Senographe", 12, "MONOCHROME1", 0.40, 0.05),
    Machine(49, 1, "Phantom Selenia 14", 14, "MONOCHROME2", 0.25, 0.20),
    Machine(29, 2, "Phantom Mammomat", 14, "MONOCHROME1", 0.20, 0.25),
    Machine(93, 2, "Phantom Amulet", 12, "MONOCHROME2", 0.45, 0.15),
    Machine(216, 2, "Phantom Revolution", 14, "MONOCHROME1", 0.30, 0.30),
)
"""Patients are assigned in this cyclic order, which alternates MONOCHROME2 and MONOCHROME1, so
any two consecutive patients already show both."""

# VOI style per image cycles through this list (starting at a per-dataset offset), so the
# proportions are fixed and a dozen images already contain every style. "none" images are
# written as Secondary Capture: a mammogram For Presentation without a VOI is not valid DICOM,
# and that is how such images really arrive (scanned or re-exported through a PACS).
VOI_CYCLE: tuple[str, ...] = (
    "linear",
    "lut",
    "linear_exact",
    "sigmoid",
    "linear",
    "none",
    "linear",
    "multi",
    "linear_exact",
    "lut",
    "sigmoid",
    "linear",
)

FILM_MACHINES: tuple[Machine, ...] = (
    Machine(301, 1, "Phantom Lumisys 200 film digitiser", 16, "MONOCHROME2", 0.50, 0.05),
    Machine(302, 1, "Phantom Howtek 960 film digitiser", 16, "MONOCHROME2", 0.40, 0.10),
    Machine(303, 1, "Phantom DBA M2100 film digitiser", 16, "MONOCHROME2", 0.60, 0.05),
)
"""Film digitisers of the ``film`` style (CBIS-DDSM-like): screen-film mammograms scanned to
16-bit MONOCHROME2, no VOI. Site 1, so density and BIRADS are filled in as for RSNA site 1."""
