"""`mammonode score` decodes the next study while it infers, renders and writes the current one.

:func:`node.tools.offline.score_files` reads the files in study order through the pixel pool's
window (:func:`inference.batching.score_stream`): when a study's last image has been decoded, the
next study's images are already submitted, so they decode while the backend scores that study and
its SC and SR are rendered and written. Shown by order (a recording pool), not by timing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from peers import write_study
from recording_pool import RecordingPool

from inference.backends.loader import load_backend
from inference.pipeline import Pipeline, PreparedImage
from inference.types import ImageScore
from inference.uids import derive_uid
from node.tools import offline

A, B = (derive_uid("tests", "offline-overlap", name) for name in ("a", "b"))


def test_the_next_study_decodes_while_the_current_one_is_inferred_rendered_and_written(
    tmp_path: Path, test_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {
        uid: write_study(
            tmp_path / uid, patient_id=f"P-{n}", study_uid=uid, transfer_syntax="explicit", seed=n
        )
        for n, uid in enumerate((A, B))
    }
    study_of = {path: uid for uid, paths in files.items() for path in paths}
    pool = RecordingPool(lambda item: study_of.get(item) if isinstance(item, Path) else None)

    class Marking(Pipeline):
        def infer(self, images: Any) -> list[ImageScore]:
            studies = {p.meta.study_instance_uid for p in images if isinstance(p, PreparedImage)}
            for study in sorted(studies):
                pool.mark("infer", study)
            return super().infer(images)

    write = offline.write_outputs

    def marking_write(result: Any, out: Path, *, png: bool = True) -> dict[str, list[str]]:
        pool.mark("write", result.score.study_instance_uid)
        return write(result, out, png=png)

    monkeypatch.setattr(offline, "write_outputs", marking_write)
    pipeline = Marking(load_backend("torch", test_model), batch_size=8)  # the node's default batch

    with pool:
        run = offline.score_files(pipeline, files[A] + files[B], tmp_path / "out", pool=pool, png=False)

    assert [o.score.study_instance_uid for o in run.outputs] == [A, B] and not run.skipped
    (infer_a,), (write_a,) = pool.index("infer", A), pool.index("write", A)
    (infer_b,), (write_b,) = pool.index("infer", B), pool.index("write", B)
    b_decodes = pool.index("decode-start", B)
    assert len(b_decodes) == 4 and len(pool.index("decode-start", A)) == 4  # each image decoded once
    assert infer_a < write_a < infer_b < write_b  # one study a batch, written as soon as it is scored
    assert b_decodes[0] < infer_a  # B was decoding when A went to the backend ...
    assert max(b_decodes) < write_a  # ... and all of it before A's results were written
