"""The RSNA-layout loader: real RSNA conventions, synthetic phantoms, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from inference.types import InputError
from training.datasets import RSNA_COLUMNS, LesionBox, lesion_mask_path, load_lesions, load_rsna
from training.synth import generate_dataset

HEADER = ",".join(RSNA_COLUMNS)
# Rows written the way the Kaggle train.csv writes them: site 2 without BIRADS/density, float
# ages, True/False for difficult_negative_case.
REAL_ROWS = [
    "2,10006,462822612,L,CC,61.0,0,0,0,,0,,29,False",
    "2,10006,1459541791,L,MLO,61.0,0,0,0,,0,,29,False",
    "1,10011,220375232,R,MLO,55.0,1,1,1,0,0,B,21,True",
    "1,10011,270344397,R,AT,,1,1,1,0,0,B,21,True",
]


def _write_root(root: Path, lines: list[str], *, header: str = HEADER, images: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.csv").write_text("\n".join([header, *lines]) + "\n")
    if images:
        for line in lines:
            cells = line.split(",")
            path = root / "train_images" / cells[1] / f"{cells[2]}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"not read by the loader")
    return root


def test_real_rsna_rows_are_typed(tmp_path: Path) -> None:
    records = load_rsna(_write_root(tmp_path / "rsna", REAL_ROWS))
    assert [r.image_id for r in records] == [462822612, 1459541791, 220375232, 270344397]
    first, third, fourth = records[0], records[2], records[3]
    assert first.site_id == 2 and first.patient_id == 10006 and first.age == 61
    assert first.birads is None and first.density is None and first.difficult_negative_case is False
    assert first.prediction_id == "10006_L"
    assert first.path == tmp_path / "rsna" / "train_images" / "10006" / "462822612.dcm"
    assert (third.cancer, third.biopsy, third.invasive, third.birads) == (1, 1, 1, 0)
    assert third.density == "B" and third.machine_id == 21 and third.difficult_negative_case is True
    assert fourth.view == "AT" and fourth.age is None  # RSNA's rare extra views and missing ages
    assert load_lesions(tmp_path / "rsna") == {}
    assert lesion_mask_path(tmp_path / "rsna", first) is None


def test_missing_column_is_named(tmp_path: Path) -> None:
    header = HEADER.replace(",BIRADS", "").replace(",machine_id", "")
    lines = [",".join(c for i, c in enumerate(row.split(",")) if i not in (9, 12)) for row in REAL_ROWS]
    root = _write_root(tmp_path / "r", lines, header=header)
    with pytest.raises(InputError, match=r"lacks column.*BIRADS, machine_id"):
        load_rsna(root)


def test_missing_files_are_reported_unless_not_checked(tmp_path: Path) -> None:
    root = _write_root(tmp_path / "r", REAL_ROWS, images=False)
    with pytest.raises(InputError, match=r"4 image file\(s\) .* missing"):
        load_rsna(root)
    assert len(load_rsna(root, check_files=False)) == 4
    with pytest.raises(InputError, match="does not exist"):
        load_rsna(root, csv_name="test.csv")


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ("2,10006,462822612,X,CC,61.0,0,0,0,,0,,29,False", "line 2: column laterality"),
        ("2,10006,462822612,L,CC,61.0,2,0,0,,0,,29,False", "line 2: column cancer"),
        ("2,abc,462822612,L,CC,61.0,0,0,0,,0,,29,False", "line 2: column patient_id"),
        ("2,10006,462822612,L,CC,61.0,0,0,0,,0,E,29,False", "line 2: column density"),
        ("2,10006,462822612,L,CC,61.0,0,0,0,,0,,29,maybe", "line 2: column difficult_negative_case"),
        ("2,10006,462822612,L,,61.0,0,0,0,,0,,29,False", "line 2: column view"),
    ],
)
def test_bad_cells_name_line_and_column(tmp_path: Path, bad_row: str, message: str) -> None:
    root = _write_root(tmp_path / "r", [bad_row])
    with pytest.raises(InputError, match=message):
        load_rsna(root)


def test_duplicate_image_ids_are_rejected(tmp_path: Path) -> None:
    root = _write_root(tmp_path / "r", [REAL_ROWS[0], REAL_ROWS[0]])
    with pytest.raises(InputError, match="line 3: duplicate image_id 462822612"):
        load_rsna(root)


def test_bad_lesion_box_is_rejected(tmp_path: Path) -> None:
    root = _write_root(tmp_path / "r", REAL_ROWS)
    (root / "lesions.csv").write_text(
        "patient_id,image_id,laterality,view,kind,y0,x0,y1,x1\n10011,220375232,R,MLO,mass,50,40,50,60\n"
    )
    with pytest.raises(InputError, match="empty or negative box"):
        load_lesions(root)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rsna") / "synth"
    generate_dataset(out, patients=3, seed=5, cancer_rate=0.67, size=(192, 160), transfer_syntax="explicit")
    return out


def test_synthetic_dataset_round_trips_through_the_loader(synthetic: Path) -> None:
    records = load_rsna(synthetic)
    lines = (synthetic / "train.csv").read_text().strip().splitlines()
    assert len(records) == len(lines) - 1
    assert all(r.path.is_file() for r in records)
    assert {r.laterality for r in records} == {"L", "R"} and {r.view for r in records} == {"CC", "MLO"}
    by_breast: dict[str, set[int]] = {}
    for r in records:
        by_breast.setdefault(r.prediction_id, set()).add(r.cancer)
    assert all(len(labels) == 1 for labels in by_breast.values())
    assert sum(labels == {1} for labels in by_breast.values()) >= 2

    boxes = load_lesions(synthetic)
    for r in records:
        mask = lesion_mask_path(synthetic, r)
        if r.cancer:
            assert mask is not None and mask.is_file()
            assert boxes[r.image_id] and all(isinstance(b, LesionBox) for b in boxes[r.image_id])
            assert all(b.y1 <= 192 and b.x1 <= 160 for b in boxes[r.image_id])
        else:
            assert mask is None and r.image_id not in boxes
