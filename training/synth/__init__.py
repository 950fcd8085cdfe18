"""Synthetic screening mammograms: phantoms in the RSNA dataset layout, as real-looking DICOM.

Public API:

- :func:`generate_dataset` writes a whole dataset and returns a :class:`SynthSummary`.
- :func:`synth_breast` / :func:`render_view` make one image (and its ground truth) in memory.
- :func:`make_dicom` / :func:`write_dicom` wrap pixels as a mammogram or Secondary Capture file.
- :data:`TRANSFER_SYNTAXES` names the supported transfer syntaxes (plus ``mixed``).
- :data:`STYLES`: ``digital`` 4-view exams, or ``film`` digitised films shaped like CBIS-DDSM
  (:func:`render_film_view`).
- ``distractor_rate``: skin markers, clips, calcified vessels, devices, lead letters, paddle edges
  and film defects, with their masks (:mod:`training.synth.distractors`; frequencies and their
  sources in :mod:`training.synth.distractor_plan`).
"""

from training.synth.anatomy import DENSITIES, BreastAnatomy
from training.synth.dataset import DEFAULT_SIZES, SynthSummary, generate_dataset
from training.synth.dicom_writer import make_dicom, write_dicom
from training.synth.encoding import FILM_MIXED_SYNTAXES, MIXED, TRANSFER_SYNTAXES, jpeg_lossless_sv1
from training.synth.film import render_film_view
from training.synth.lesions import Lesion, random_lesion
from training.synth.phantom import RenderedView, render_view, synth_breast
from training.synth.plan import DIGITAL, FILM, STYLES
from training.synth.windows import VOI_STYLES

__all__ = [
    "DEFAULT_SIZES",
    "DENSITIES",
    "DIGITAL",
    "FILM",
    "FILM_MIXED_SYNTAXES",
    "MIXED",
    "STYLES",
    "TRANSFER_SYNTAXES",
    "VOI_STYLES",
    "BreastAnatomy",
    "Lesion",
    "RenderedView",
    "SynthSummary",
    "generate_dataset",
    "jpeg_lossless_sv1",
    "make_dicom",
    "random_lesion",
    "render_film_view",
    "render_view",
    "synth_breast",
    "write_dicom",
]
