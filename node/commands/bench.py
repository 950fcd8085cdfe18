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
from typing import TYPE_CHECKING, Annotated, Any

import typer

from node.commands._args import parse_size

if TYPE_CHECKING:
    import numpy as np

    from node.tools.bench import BenchInputs, ExportOnnx

log = logging.getLogger(__name__)

QUICK_SIZE = (384, 288)
IngestRounds = Annotated[int, typer.Option(min=0, help="Ingest rounds against storescp (0: none).")]
Burst = Annotated[
    int | None, typer.Option(min=0, help="Studies through serve to Orthanc (default 20, quick 0).")
]
BurstSize = Annotated[str | None, typer.Option(help="Rows x columns of the burst's images (default --size).")]


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"batch sizes must be >= 1, got {text!r}")
    return values


def synthesise_study(workdir: Path, size: tuple[int, int]) -> tuple[list[Path], np.ndarray]:
    """A 4-view JPEG 2000 screening study of phantoms in ``workdir/study``, and the first view's
    pixels (training extra)."""
    import numpy as np

    from inference import SCREENING_SIDE_VIEWS, derive_uid
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
    return study, first


def synthesise_inputs(workdir: Path, size: tuple[int, int]) -> BenchInputs:
    """One phantom in every transfer syntax, and a 4-view JPEG 2000 study (training extra)."""
    from inference import derive_uid
    from node.tools.bench import SYNTAXES, BenchInputs
    from training.synth import make_dicom, write_dicom

    study, first = synthesise_study(workdir, size)
    study_uid = derive_uid("mammonode-bench", f"{size[0]}x{size[1]}")
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
    ingest_rounds: IngestRounds = 5,
    burst: Burst = None,
    burst_size: BurstSize = None,
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
        _network_sections(report, inputs, Path(tmp), model, export, (quick, ingest_rounds, burst, burst_size))
    typer.echo(format_report(report))
    if json_file is not None:
        json_file.parent.mkdir(parents=True, exist_ok=True)
        json_file.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        typer.echo(f"wrote {json_file}")


def _network_sections(
    report: dict[str, Any],
    inputs: BenchInputs,
    work: Path,
    model: Path | None,
    export: ExportOnnx | None,
    options: tuple[bool, int, int | None, str | None],
) -> None:
    """Add the ingest section (rounds against dcmtk's storescp) and the burst (studies through
    `mammonode serve` to Orthanc) to ``report``; ``options`` are ``--quick``, ``--ingest-rounds``,
    ``--burst`` and ``--burst-size``. The burst's study is the bench's, or one synthesised at
    ``--burst-size`` when that differs from the bench's synthetic images."""
    from inference import resolve_model_dir
    from node.commands.dicom import quiet_pynetdicom
    from node.tools.bench import ensure_onnx
    from node.tools.bench_burst import BurstSettings, run_burst
    from node.tools.bench_ingest import IngestSettings, add_ingest, run_ingest

    quiet_pynetdicom()  # the burst's sender would narrate every C-STORE
    quick, rounds, studies, burst_size = options
    rounds, studies = (
        (min(rounds, 1), studies or 0) if quick else (rounds, 20 if studies is None else studies)
    )
    size = parse_size(burst_size) if burst_size else None
    if rounds:
        add_ingest(report, run_ingest(inputs.study, work / "ingest", IngestSettings(rounds=rounds)))
    if studies:
        study = inputs.study
        if size is not None and (
            inputs.origin != "synthetic" or list(size) != report["settings"]["image_size"]
        ):
            try:
                study, _ = synthesise_study(work / "burst-study", size)
            except ImportError as exc:
                report["burst"] = {
                    "unavailable": f"--burst-size needs the training extra ({exc.name} missing)"
                }
                return
        model_dir, missing = ensure_onnx(resolve_model_dir(model), work / "burst-model", export)
        if missing:
            log.warning("burst: %s; the node scores with torch", missing)
        report["burst"] = run_burst(study, model_dir, work / "burst", BurstSettings(studies=studies))


def register(app: typer.Typer) -> None:
    """Add `mammonode bench`."""
    app.command("bench")(bench_command)
