"""`mammonode bench`: measure decoding, preprocessing, inference and a study end to end here.

Synthetic inputs (one mammogram in every transfer syntax, a 4-view JPEG 2000 study) and the ONNX
export of a model that has none need the training extra, imported inside the command only; with
``--data DIR`` the bench runs on the DICOM files given instead. The measuring is in
:mod:`node.tools.bench`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from node.commands._args import parse_size

if TYPE_CHECKING:
    from node.tools.bench import BenchInputs, ExportOnnx

log = logging.getLogger(__name__)

QUICK_SIZE = (384, 288)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"batch sizes must be >= 1, got {text!r}")
    return values


def synthesise_inputs(workdir: Path, size: tuple[int, int]) -> BenchInputs:
    """One phantom in every transfer syntax, and a 4-view JPEG 2000 study (training extra)."""
    import numpy as np

    from inference import SCREENING_SIDE_VIEWS, derive_uid
    from node.tools.bench import SYNTAXES, BenchInputs
    from training.synth import make_dicom, synth_breast, write_dicom

    study_uid = derive_uid("mammonode-bench", f"{size[0]}x{size[1]}")
    study: list[Path] = []
    first: np.ndarray | None = None
    for number, (laterality, view) in enumerate(SCREENING_SIDE_VIEWS, start=1):
        pixels, _ = synth_breast(
            np.random.default_rng([7, number]), laterality=laterality, view=view, size=size
        )
        first = pixels if first is None else first
        path = workdir / "study" / f"{laterality}_{view}.dcm"
        ds = make_dicom(
            pixels,
            patient_id="BENCH",
            study_uid=study_uid,
            laterality=laterality,
            view=view,
            transfer_syntax="jpeg2000",
            instance_number=number,
        )
        write_dicom(ds, path)
        study.append(path)
    assert first is not None
    syntaxes: dict[str, Path] = {}
    for name in SYNTAXES:
        path = workdir / "syntaxes" / f"{name}.dcm"
        ds = make_dicom(
            first,
            patient_id="BENCH",
            study_uid=derive_uid(study_uid, "syntaxes"),
            laterality="L",
            view="CC",
            transfer_syntax=name,
        )
        write_dicom(ds, path)
        syntaxes[name] = path
    return BenchInputs(syntaxes, study, "synthetic")


def _exporter() -> ExportOnnx | None:
    """:func:`training.onnx_export.export_onnx` as an :data:`ExportOnnx`, or None without the extra."""
    try:
        from training.onnx_export import export_onnx
    except ImportError:
        return None

    def export(model_dir: Path, out: Path) -> Path:
        return export_onnx(model_dir, out=out).model_dir

    return export


def bench_command(
    model: Annotated[
        Path | None, typer.Option("--model", help="Model folder; default: the bundled demo model.")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Folder of DICOM files to measure instead of synthetic images."),
    ] = None,
    size: Annotated[
        str, typer.Option("--size", help="Rows x columns of the synthetic images.")
    ] = "3328x2560",
    iterations: Annotated[int, typer.Option(min=1, help="Timed runs per figure (median kept).")] = 3,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma-separated.")] = "1,4,8",
    backends: Annotated[
        str, typer.Option(help="Comma-separated backends to measure (unavailable ones say why).")
    ] = "torch,onnxruntime,tensorrt",
    e2e_backend: Annotated[
        str | None, typer.Option("--e2e-backend", help="Backend of the end-to-end run (default onnxruntime).")
    ] = None,
    pool: Annotated[
        str, typer.Option(help="Decode pool of the end-to-end figure: process, thread or serial.")
    ] = "process",
    workers: Annotated[int | None, typer.Option(min=1, help="Decode workers (default: one per CPU).")] = None,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help=f"Small images ({QUICK_SIZE[0]}x{QUICK_SIZE[1]}), one run, batches 1,2."
        ),
    ] = False,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Also write the report as JSON here.")
    ] = None,
) -> None:
    """Measure decode, preprocessing, inference per backend and a 4-view study end to end on this machine."""
    from inference import POOL_KINDS
    from node.tools.bench import BenchSettings, data_inputs, format_report, run_bench

    if pool not in POOL_KINDS:
        raise typer.BadParameter(f"--pool must be one of {', '.join(POOL_KINDS)}, got {pool!r}")
    image_size = QUICK_SIZE if quick else parse_size(size)
    settings = BenchSettings(
        model_dir=model,
        iterations=1 if quick else iterations,
        batch_sizes=(1, 2) if quick else _ints(batch_sizes),
        backends=tuple(b.strip() for b in backends.split(",") if b.strip()),
        e2e_backend=e2e_backend,
        pool=pool,  # narrowed to a PoolKind by the check above
        pools=(pool,) if quick else POOL_KINDS,
        workers=workers,
        image_size=None if data is not None else image_size,
    )
    export = _exporter()
    with tempfile.TemporaryDirectory(prefix="mammonode-bench-inputs-") as tmp:
        if data is not None:
            inputs = data_inputs(data)
        else:
            try:
                inputs = synthesise_inputs(Path(tmp), image_size)
            except ImportError as exc:
                typer.echo(
                    f"error: synthetic bench inputs need the training extra ({exc.name} missing): "
                    "pip install 'mammonode[train]', or give --data DIR with DICOM files",
                    err=True,
                )
                raise typer.Exit(1) from None
        if export is None:
            log.warning(
                "training extra not installed: a model without ONNX cannot be exported for onnxruntime"
            )
        report = run_bench(inputs, settings, export_onnx=export)
    typer.echo(format_report(report))
    if json_file is not None:
        json_file.parent.mkdir(parents=True, exist_ok=True)
        json_file.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        typer.echo(f"wrote {json_file}")


def register(app: typer.Typer) -> None:
    """Add `mammonode bench`."""
    app.command("bench")(bench_command)
