"""`mammonode demo`: show the whole product on two synthetic studies, with nothing to download.

A new user has no mammograms they may use and no PACS to send them from, so the demo makes both
sides itself: it synthesises one cancer and one normal 4-view screening study (training.synth,
the phantoms the bundled model was trained on), scores them with the bundled model (or
``--model``) and says where the CAM pictures, secondary captures and report went, next to the
ground truth, so the user can judge the result.

The demo is three steps: synthesise -> score -> report. The score step starts a node on
loopback and sends the studies to it over DICOM (:func:`node.tools.demo_network.score_over_network`),
so the demo shows the product's whole loop; ``--offline`` uses the file scorer
(:func:`node.tools.offline.run_score`) instead. Both have the same signature (input files, output
folder, model folder -> exit status) and write the same ``summary.json``.

Nothing here prints: the steps hand their lines to a ``say`` callback and :func:`run_demo`
returns the closing lines; `mammonode demo` (:mod:`node.commands.demo`) prints them.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from inference import resolve_model_dir

log = logging.getLogger(__name__)


class DemoStudy(Protocol):
    """One synthesised study and its ground truth (made by training.synth.synthesise)."""

    @property
    def patient_id(self) -> str: ...
    @property
    def cancer_sides(self) -> tuple[str, ...]: ...
    @property
    def files(self) -> tuple[Path, ...]: ...


Synthesise = Callable[[Path, int], Sequence[DemoStudy]]
"""Writes the demo studies under a folder for a seed; the CLI passes the training generator, since
the node never imports training itself."""

ScoreStep = Callable[[list[Path], Path, Path], int]
"""Scores the given input files into the output folder with the model folder and returns the exit
status; writes ``summary.json`` there."""


Say = Callable[[str, bool], None]
"""Where a step's lines go as they come: ``say(line, err)`` (the command prints them, on stderr
when ``err``)."""


def _silent(line: str, err: bool) -> None:
    """The default ``say``: the lines are dropped."""


def offline_step(say: Say = _silent) -> ScoreStep:
    """The ``--offline`` score step: the file scorer; its score table and problems go to ``say``."""

    def step(files: list[Path], out: Path, model_dir: Path) -> int:
        from node.tools.offline import run_score

        result = run_score(files, out=out, model_dir=model_dir)
        for line in result.problems:
            say(line, True)
        say(result.output, False)
        return result.exit_code

    return step


def describe_results(out: Path, studies: Sequence[DemoStudy]) -> list[str]:
    """Lines telling the user the ground truth next to each exam score and where the files are."""
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    by_patient = {s["patient_id"]: s for s in summary["studies"]}
    lines = ["", "ground truth vs result:"]
    for study in studies:
        truth = (
            f"cancer in {'+'.join(study.cancer_sides)} breast" if study.cancer_sides else "normal (no cancer)"
        )
        scored = by_patient.get(study.patient_id)
        if scored is None:
            result = "not scored"
        else:
            decision = "RECALL" if scored["recall_recommended"] else "no recall"
            result = f"exam P={scored['exam_probability']:.3f} -> {decision}"
        lines.append(f"  patient {study.patient_id}: {truth}; {result}")
    written = summary["written"]
    lines += [
        "",
        f"CAM overlays (PNG):      {out / 'png'} ({len(written['png'])} files)",
        f"secondary captures (SC): {out / 'sc'} ({len(written['sc'])} files)",
        f"structured reports (SR): {out / 'sr'} ({len(written['sr'])} files)",
        f"CAD SR (marks):          {out / 'cad'} ({len(written.get('cad', []))} files)",
        f"summary (JSON):          {out / 'summary.json'}",
    ]
    if summary["model"].get("notice"):
        lines.append(f"note: {summary['model']['notice']}")
    return lines


@dataclass(frozen=True)
class DemoOutcome:
    """The demo's exit status and its closing lines (ground truth against the results, where the
    files are); no lines when nothing was scored."""

    exit_code: int
    lines: list[str]


def run_demo(
    out: Path,
    model_dir: Path | None,
    seed: int,
    *,
    synthesise: Synthesise,
    score_step: ScoreStep | None = None,
) -> DemoOutcome:
    """Synthesise two studies in a temporary folder inside ``out``, score them, describe the results.

    The model folder is resolved first, so a missing model fails before anything is synthesised.
    The synthetic inputs are removed afterwards: the results in ``out`` are what the demo is about.
    """
    model = resolve_model_dir(model_dir)  # the bundled demo model when None
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".demo-studies-") as tmp:
        studies = synthesise(Path(tmp), seed)
        files = [path for study in studies for path in study.files]
        log.info("synthesised %d studies (%d images) for the demo", len(studies), len(files))
        if score_step is None:
            from node.tools.demo_network import score_over_network

            score_step = score_over_network
        code = score_step(files, out, model)
    lines = describe_results(out, studies) if (out / "summary.json").is_file() else []
    return DemoOutcome(code, lines)
