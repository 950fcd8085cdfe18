"""`mammonode export-cases` and `mammonode retrain`: the node's cases as a dataset, and fine-tuning.

Both write de-identified data (audited as ``data.exported``); retrain also fine-tunes the serving
model and registers the challenger without promoting it. Training is imported only inside the
retrain command (it is an optional extra of a serving install).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from node.commands._admin import ConfigOption

BurnedInOption = Annotated[
    bool,
    typer.Option(
        "--include-burned-in",
        help="Also export images flagged BurnedInAnnotation=YES (text in the pixels is not removed).",
    ),
]


def export_cases_command(
    out: Annotated[Path, typer.Option("--out", help="New or empty folder for the RSNA-layout dataset.")],
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            help="Outcomes CSV (study_uid, laterality, cancer[, biopsy, invasive]): "
            "export only these breasts, with their labels.",
        ),
    ] = None,
    include_burned_in: BurnedInOption = False,
    config: ConfigOption = None,
) -> None:
    """Export the node's scorable mammograms, de-identified, in the RSNA layout (train.csv + images)."""
    from node import audit
    from node.cases.export_cases import export_cases, read_outcomes, select_cases
    from node.commands._admin import load, open_session

    cfg = load(config)
    outcomes = read_outcomes(labels) if labels is not None else None
    with open_session(cfg) as session:
        cases = select_cases(session, cfg.spool_dir, outcomes)
        summary = export_cases(cases, out, include_burned_in=include_burned_in)
        audit.record(
            session,
            audit.DATA_EXPORTED,
            audit.cli_actor(),
            details=summary.audit_details("cases", labelled=outcomes is not None),
        )
        session.commit()
    skipped = ", ".join(f"{n} {why}" for why, n in summary.skipped.items()) or "none"
    typer.echo(
        f"exported {summary.images} images of {summary.patients} patients ({summary.breasts} breasts, "
        f"{summary.cancer_breasts} cancer) to {out}; skipped: {skipped}"
    )


def retrain_command(
    labels: Annotated[
        Path,
        typer.Option("--labels", help="Outcomes CSV: study_uid, laterality, cancer[, biopsy, invasive]."),
    ],
    out: Annotated[Path, typer.Option("--out", help="New or empty folder: export, splits, training run.")],
    epochs: Annotated[int, typer.Option(min=1, help="Fine-tuning epochs.")] = 5,
    input_size: Annotated[
        str | None, typer.Option("--input-size", help="Model input HxW (default: the current model's).")
    ] = None,
    batch_ids: Annotated[int, typer.Option(min=1, help="Breasts per batch.")] = 8,
    batches_per_epoch: Annotated[
        int | None, typer.Option(min=1, help="Batches per epoch (default: one pass).")
    ] = None,
    lr: Annotated[float, typer.Option(help="Adam learning rate (fine-tuning: small).")] = 1e-4,
    heldout_fraction: Annotated[
        float, typer.Option(help="Fraction of patients held out to compare champion and challenger.")
    ] = 0.3,
    val_fraction: Annotated[
        float, typer.Option(help="Fraction of the training patients used to pick the epoch and threshold.")
    ] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the splits and training.")] = 0,
    backend: Annotated[str, typer.Option(help="Backend for the held-out comparison.")] = "torch",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    workers: Annotated[int, typer.Option(min=1, help="Preprocessing worker processes.")] = 1,
    model_version: Annotated[
        str | None, typer.Option("--model-version", help="Challenger version (default: <current>-ft<time>).")
    ] = None,
    include_burned_in: BurnedInOption = False,
    export_only: Annotated[
        bool, typer.Option("--export-only", help="Only write the de-identified dataset (like export-cases).")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Fine-tune the serving model on labelled node cases; compare it with the result on held-out patients."""
    if export_only:
        export_cases_command(out=out, labels=labels, include_burned_in=include_burned_in, config=config)
        return
    from importlib.util import find_spec

    from node.commands._args import parse_size

    if find_spec("torch") is None:
        typer.echo(
            "error: retrain needs the training extra (torch missing): pip install 'mammonode[train]'",
            err=True,
        )
        raise typer.Exit(1)
    from node.audit import cli_actor
    from node.cases.retrain import RetrainOptions, run_retrain
    from node.commands._admin import load, open_session

    options = RetrainOptions(
        labels=labels,
        out=out,
        epochs=epochs,
        input_size=parse_size(input_size) if input_size else None,
        batch_ids=batch_ids,
        batches_per_epoch=batches_per_epoch,
        lr=lr,
        heldout_fraction=heldout_fraction,
        val_fraction=val_fraction,
        seed=seed,
        backend=backend,
        device=device,
        workers=workers,
        version=model_version,
        include_burned_in=include_burned_in,
    )
    cfg = load(config)
    with open_session(cfg) as session:
        result = run_retrain(session, cfg, options, cli_actor(), _TrainingSteps())
    typer.echo(result.table())


class _TrainingSteps:
    """The training package's functions for :func:`node.cases.retrain.run_retrain` (imported here, lazily)."""

    def split_by_patient(
        self, patient_ids: Sequence[str], labels: Sequence[float], fraction: float, seed: int
    ) -> tuple[list[str], list[str]]:
        from training.sampler import split_by_patient

        return split_by_patient(patient_ids, labels, fraction, seed)

    def train(self, **request: Any) -> Path:
        from training.dispatch import run_train
        from training.request import TrainRequest

        return run_train(TrainRequest(**request))

    def evaluate(self, dataset: Path, *, model_dir: Path, backend: str, workers: int) -> dict[str, Any]:
        from training.dispatch import run_evaluate

        return run_evaluate(dataset, model_dir=model_dir, backend=backend, workers=workers)

    def record_report(self, report: dict[str, Any], *, model_dir: Path, name: str) -> None:
        from training.dispatch import record_report

        record_report(report, model_dir=model_dir, name=name)


def register(app: typer.Typer) -> None:
    app.command("export-cases")(export_cases_command)
    app.command("retrain")(retrain_command)
