"""`mammonode retrain`: fine-tune the serving model on the node's own labelled cases.

Outcomes (per study and laterality) select the breasts; they are exported de-identified in the
RSNA layout (:mod:`node.cases.export_cases`), split by patient into a training part and a held-out part,
the current model (champion) is fine-tuned on the training part, and champion and challenger
are scored on the held-out part. The challenger is registered, never promoted: switching the
serving model stays an explicit `mammonode model promote`.

The training steps come in as a :class:`TrainingSteps` built by the CLI: node never imports
training (it is an optional extra of a serving install).
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.orm import Session

from inference import CSV_NAME, IMAGES_DIR, RSNA_COLUMNS, MammoNodeError, json_safe, load_manifest
from node import audit
from node.admin.registry import register_model, select_model_dir
from node.cases.export_cases import (
    ExportSummary,
    export_cases,
    read_outcomes,
    select_cases,
    write_csv,
)
from node.config import NodeConfig

log = logging.getLogger(__name__)

DATASET_DIR = "dataset"
TRAIN_DIR = "train"
HELDOUT_DIR = "heldout"
RUN_DIR = "run"
REPORT_KEYS = ("roc_auc", "pf1", "sensitivity", "specificity", "threshold")


class RetrainError(MammoNodeError):
    """Retraining cannot run on what was given (too few cases of a class, bad output folder...)."""


class TrainingSteps(Protocol):
    """What retraining needs from the training package.

    The CLI (the composition root) provides it; node never imports training (design: layering,
    checked by import-linter), and a serving install without the training extra still loads.
    """

    def split_by_patient(
        self, patient_ids: Sequence[str], labels: Sequence[float], fraction: float, seed: int
    ) -> tuple[list[str], list[str]]:
        """Patients split into (train, held-out), stratified by patient label; ValueError if impossible."""
        ...

    def train(self, **request: Any) -> Path:
        """Train from a training request's fields; the new model's folder."""
        ...

    def evaluate(self, dataset: Path, *, model_dir: Path, backend: str, workers: int) -> dict[str, Any]:
        """The evaluation report of ``model_dir`` on an RSNA-layout ``dataset``."""
        ...

    def record_report(self, report: dict[str, Any], *, model_dir: Path, name: str) -> None:
        """Store ``report`` in the model's manifest under ``name``."""
        ...


@dataclass(frozen=True)
class RetrainOptions:
    """What `mammonode retrain` was asked for."""

    labels: Path
    out: Path
    epochs: int = 5
    input_size: tuple[int, int] | None = None
    """None: the champion's own input size."""
    batch_ids: int = 8
    batches_per_epoch: int | None = None
    lr: float = 1e-4
    heldout_fraction: float = 0.3
    val_fraction: float = 0.2
    seed: int = 0
    backend: str = "torch"
    device: str = "cpu"
    workers: int = 1
    version: str | None = None
    """Challenger version; None: ``<champion version>-ft<UTC timestamp>``."""
    include_burned_in: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.heldout_fraction < 1.0:
            raise RetrainError(f"--heldout-fraction must be in (0, 1), got {self.heldout_fraction}")


@dataclass
class ModelScore:
    """One model's held-out figures (breast level, at the model's own threshold)."""

    role: str
    name: str
    version: str
    weights_sha256: str
    path: str
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RetrainResult:
    champion: ModelScore
    challenger: ModelScore
    challenger_id: int
    measured_on: dict[str, Any]
    export: ExportSummary

    def table(self) -> str:
        """The comparison, with the data it was measured on."""
        m = self.measured_on
        lines = [
            f"measured on the held-out split of the node's labelled cases: {m['patients']} patients, "
            f"{m['breasts']} breasts ({m['cancer_breasts']} cancer), {m['images']} images "
            f"[{m['dataset']}; {m['split']}]",
            f"{'':<11} {'model':<40} {'ROC-AUC':>8} {'pF1':>6} {'sens':>6} {'spec':>6} {'thresh':>7} "
            f"{'breasts':>8}",
        ]
        for s in (self.champion, self.challenger):
            label = f"{s.name} {s.version} ({s.weights_sha256[:12]})"
            cells = [_fmt(s.metrics.get(k)) for k in REPORT_KEYS]
            lines.append(
                f"{s.role:<11} {label:<40} {cells[0]:>8} {cells[1]:>6} {cells[2]:>6} {cells[3]:>6} "
                f"{cells[4]:>7} {s.metrics.get('n', '-')!s:>8}"
            )
        lines.append(
            f"challenger registered (id {self.challenger_id}), not promoted; to serve it: "
            f"mammonode model promote {self.challenger.weights_sha256[:12]}"
        )
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.3f}"
    return "-" if value is None else str(value)


def _prepare_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RetrainError(f"output folder {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)


def _read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _write_split(out: Path, rows: list[dict[str, str]], patients: set[int], dataset: Path) -> Path:
    """An RSNA root with the rows of ``patients``, sharing the export's images through a symlink."""
    root = out
    root.mkdir(parents=True, exist_ok=True)
    chosen = [r for r in rows if int(r["patient_id"]) in patients]
    write_csv(root / CSV_NAME, ([r[c] for c in RSNA_COLUMNS] for r in chosen))
    (root / IMAGES_DIR).symlink_to(os.path.relpath(dataset / IMAGES_DIR, root), target_is_directory=True)
    return root


def _split(
    summary: ExportSummary, rows: list[dict[str, str]], fraction: float, seed: int, steps: TrainingSteps
) -> tuple[set[int], set[int]]:
    """Exported patient numbers split into (train, held-out), stratified by patient label.

    The split is made on the real patient IDs (kept in memory only), so the same cases and seed
    give the same split on every run although the exported numbers are new each time.
    """
    positive: dict[int, bool] = {}
    for r in rows:
        pid = int(r["patient_id"])
        positive[pid] = positive.get(pid, False) or r["cancer"] == "1"
    real = {pseudo: patient for patient, pseudo in summary.pseudonyms.items()}
    ids = sorted(positive, key=lambda p: real[p])
    try:
        train, held = steps.split_by_patient(
            [real[p] for p in ids], [float(positive[p]) for p in ids], fraction, seed
        )
    except ValueError as exc:
        raise RetrainError(
            f"cannot split the labelled cases into training and held-out parts: {exc}"
        ) from None
    return {summary.pseudonyms[p] for p in train}, {summary.pseudonyms[p] for p in held}


def _score(role: str, report: dict[str, Any], model_dir: Path) -> ModelScore:
    breast = report["breast"]
    model = report["model"]
    metrics = {k: breast.get(k) for k in (*REPORT_KEYS, "n", "n_pos", "confusion_matrix", "aggregation")}
    return ModelScore(role, model["name"], model["version"], model["weights_sha256"], str(model_dir), metrics)


@dataclass(frozen=True)
class _Split:
    """The exported cases split by patient: two RSNA roots and what the held-out part holds."""

    summary: ExportSummary
    train_root: Path
    held_root: Path
    train_patients: int
    measured_on: dict[str, Any]


def _export_and_split(
    session: Session, config: NodeConfig, options: RetrainOptions, actor: str, steps: TrainingSteps
) -> _Split:
    """Export the labelled cases (audited and committed at once) and split them by patient."""
    outcomes = read_outcomes(options.labels)
    cases = select_cases(session, config.spool_dir, outcomes)
    _prepare_out(options.out)
    dataset = options.out / DATASET_DIR
    summary = export_cases(cases, dataset, include_burned_in=options.include_burned_in)
    audit.record(
        session, audit.DATA_EXPORTED, actor, details=summary.audit_details("retrain cases", labelled=True)
    )
    session.commit()

    rows = _read_rows(dataset / CSV_NAME)
    train_ids, held_ids = _split(summary, rows, options.heldout_fraction, options.seed, steps)
    train_root = _write_split(options.out / TRAIN_DIR, rows, train_ids, dataset)
    held_root = _write_split(options.out / HELDOUT_DIR, rows, held_ids, dataset)
    held_rows = [r for r in rows if int(r["patient_id"]) in held_ids]
    measured_on = {
        "dataset": str(held_root),
        "split": f"{options.heldout_fraction:.0%} of patients held out, stratified, seed {options.seed}",
        "patients": len(held_ids),
        "breasts": len({(r["patient_id"], r["laterality"]) for r in held_rows}),
        "cancer_breasts": len({(r["patient_id"], r["laterality"]) for r in held_rows if r["cancer"] == "1"}),
        "images": len(held_rows),
    }
    log.info("retraining on %d patients, holding out %d", len(train_ids), len(held_ids))
    return _Split(summary, train_root, held_root, len(train_ids), measured_on)


def _fine_tune(
    options: RetrainOptions, champion_dir: Path, train_root: Path, steps: TrainingSteps
) -> tuple[Path, tuple[int, int]]:
    """Fine-tune the champion on the training part; the challenger's folder and its input size."""
    champion = load_manifest(champion_dir)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S")
    input_size = options.input_size or (champion.preprocess.input_height, champion.preprocess.input_width)
    challenger_dir = steps.train(
        dataset=train_root,
        out=options.out / RUN_DIR,
        architecture=champion.architecture,
        input_size=input_size,
        epochs=options.epochs,
        batch_ids=options.batch_ids,
        batches_per_epoch=options.batches_per_epoch,
        lr=options.lr,
        val_fraction=options.val_fraction,
        seed=options.seed,
        device=options.device,
        workers=options.workers,
        name=champion.name,
        version=options.version or f"{champion.version}-ft{stamp}"[:64],
        synthetic=champion.synthetic_training_data,
        init_model=champion_dir,
    ).resolve()
    return challenger_dir, input_size


def run_retrain(
    session: Session, config: NodeConfig, options: RetrainOptions, actor: str, steps: TrainingSteps
) -> RetrainResult:
    """Export, split, fine-tune, compare and register; audits ``data.exported`` and ``retrain.run``.

    The export is audited (and committed) as soon as it is written, before the long training
    run, so a crash later cannot leave de-identified data on disk that the log does not know.
    """
    champion_dir = select_model_dir(config, session).resolve()
    split = _export_and_split(session, config, options, actor, steps)
    challenger_dir, input_size = _fine_tune(options, champion_dir, split.train_root, steps)

    reports = {
        role: steps.evaluate(
            split.held_root, model_dir=model_dir, backend=options.backend, workers=options.workers
        )
        for role, model_dir in (("champion", champion_dir), ("challenger", challenger_dir))
    }
    steps.record_report(reports["challenger"], model_dir=challenger_dir, name="retrain_heldout")
    champion_score = _score("champion", reports["champion"], champion_dir)
    challenger_score = _score("challenger", reports["challenger"], challenger_dir)
    comparison = json_safe(
        {
            "measured_on": split.measured_on,
            "champion": champion_score.to_dict(),
            "challenger": challenger_score.to_dict(),
        }
    )
    row, _ = register_model(session, challenger_dir, actor, metrics={"retrain_heldout": comparison})
    audit.record(
        session,
        audit.RETRAIN_RUN,
        actor,
        details={
            "labels": str(options.labels.resolve()),
            "out": str(options.out.resolve()),
            "train_patients": split.train_patients,
            "heldout_patients": split.measured_on["patients"],
            "epochs": options.epochs,
            "input_size": list(input_size),
            "challenger_model_version_id": row.id,
            **comparison,
        },
    )
    session.commit()
    return RetrainResult(champion_score, challenger_score, row.id, split.measured_on, split.summary)
