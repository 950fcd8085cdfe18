"""`mammonode retrain`: fine-tune the serving model on the node's own labelled cases.

Outcomes (per study and laterality) select the breasts; they are exported de-identified in the
RSNA layout (:mod:`node.export`), split by patient into a training part and a held-out part,
the current model (champion) is fine-tuned on the training part, and champion and challenger
are scored on the held-out part. The challenger is registered, never promoted: switching the
serving model stays an explicit `mammonode model promote`.

``training`` is imported inside :func:`run_retrain` only (design: node never imports training at
module level; it is an optional extra of a serving install).
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from inference.manifest import load_manifest
from inference.types import MammoNodeError
from node import audit
from node.config import NodeConfig
from node.export import (
    CSV_NAME,
    IMAGES_DIR,
    RSNA_COLUMNS,
    ExportSummary,
    export_cases,
    read_outcomes,
    select_cases,
    write_csv,
)

log = logging.getLogger(__name__)

DATASET_DIR = "dataset"
TRAIN_DIR = "train"
HELDOUT_DIR = "heldout"
RUN_DIR = "run"
REPORT_KEYS = ("roc_auc", "pf1", "sensitivity", "specificity", "threshold")


class RetrainError(MammoNodeError):
    """Retraining cannot run on what was given (too few cases of a class, bad output folder...)."""


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
    summary: ExportSummary, rows: list[dict[str, str]], fraction: float, seed: int
) -> tuple[set[int], set[int]]:
    """Exported patient numbers split into (train, held-out), stratified by patient label.

    The split is made on the real patient IDs (kept in memory only), so the same cases and seed
    give the same split on every run although the exported numbers are new each time.
    """
    from training.sampler import split_by_patient

    positive: dict[int, bool] = {}
    for r in rows:
        pid = int(r["patient_id"])
        positive[pid] = positive.get(pid, False) or r["cancer"] == "1"
    real = {pseudo: patient for patient, pseudo in summary.pseudonyms.items()}
    ids = sorted(positive, key=lambda p: real[p])
    try:
        train, held = split_by_patient(
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


def run_retrain(session: Session, config: NodeConfig, options: RetrainOptions, actor: str) -> RetrainResult:
    """Export, split, fine-tune, compare and register; audits ``data.exported`` and ``retrain.run``.

    The export is audited (and committed) as soon as it is written, before the long training
    run, so a crash later cannot leave de-identified data on disk that the log does not know.
    """
    from inference.jsonsafe import json_safe
    from node.model_registry import register_model
    from node.queue.model import select_model_dir
    from training.dispatch import record_report, run_evaluate, run_train
    from training.request import TrainRequest

    outcomes = read_outcomes(options.labels)
    cases = select_cases(session, config.spool_dir, outcomes)
    champion_dir = select_model_dir(config, session).resolve()
    champion = load_manifest(champion_dir)
    _prepare_out(options.out)
    dataset = options.out / DATASET_DIR
    summary = export_cases(cases, dataset, include_burned_in=options.include_burned_in)
    audit.record(
        session, audit.DATA_EXPORTED, actor, details=summary.audit_details("retrain cases", labelled=True)
    )
    session.commit()

    rows = _read_rows(dataset / CSV_NAME)
    train_ids, held_ids = _split(summary, rows, options.heldout_fraction, options.seed)
    train_root = _write_split(options.out / TRAIN_DIR, rows, train_ids, dataset)
    held_root = _write_split(options.out / HELDOUT_DIR, rows, held_ids, dataset)
    held_rows = [r for r in rows if int(r["patient_id"]) in held_ids]
    split_text = f"{options.heldout_fraction:.0%} of patients held out, stratified, seed {options.seed}"
    measured_on = {
        "dataset": str(held_root),
        "split": split_text,
        "patients": len(held_ids),
        "breasts": len({(r["patient_id"], r["laterality"]) for r in held_rows}),
        "cancer_breasts": len({(r["patient_id"], r["laterality"]) for r in held_rows if r["cancer"] == "1"}),
        "images": len(held_rows),
    }
    log.info("retraining on %d patients, holding out %d", len(train_ids), len(held_ids))

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S")
    input_size = options.input_size or (champion.preprocess.input_height, champion.preprocess.input_width)
    challenger_dir = run_train(
        TrainRequest(
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
        )
    ).resolve()

    reports = {}
    for role, model_dir in (("champion", champion_dir), ("challenger", challenger_dir)):
        reports[role] = run_evaluate(
            held_root, model_dir=model_dir, backend=options.backend, workers=options.workers
        )
    record_report(reports["challenger"], model_dir=challenger_dir, name="retrain_heldout")
    champion_score = _score("champion", reports["champion"], champion_dir)
    challenger_score = _score("challenger", reports["challenger"], challenger_dir)
    comparison = json_safe(
        {
            "measured_on": measured_on,
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
            "train_patients": len(train_ids),
            "heldout_patients": len(held_ids),
            "epochs": options.epochs,
            "input_size": list(input_size),
            "challenger_model_version_id": row.id,
            **comparison,
        },
    )
    session.commit()
    return RetrainResult(champion_score, challenger_score, row.id, measured_on, summary)
