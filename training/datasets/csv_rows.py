"""The csv files of a dataset root (``train.csv``, ``lesions.csv``, ``distractors.csv``), read row
by row with every cell error naming the file, line and column, so a broken download or a
hand-edited file fails before training with a line a person can fix."""

from __future__ import annotations

import csv
from pathlib import Path

from inference.types import InputError

_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no", ""}


def read_rows(path: Path, required: tuple[str, ...]) -> list[CsvRow]:
    """The rows of ``path``; InputError when it is missing or lacks a ``required`` column."""
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in required if c not in header]
        if missing:
            raise InputError(f"{path.name} lacks column(s) {', '.join(missing)}")
        return [CsvRow(path, i + 2, row) for i, row in enumerate(reader)]


class CsvRow:
    """Parses the cells of one csv row, naming the row and column in every error."""

    def __init__(self, path: Path, line: int, row: dict[str, str]) -> None:
        """``line`` is the row's line number in the file (the header is line 1)."""
        self.path, self.line, self.row = path, line, row

    def _fail(self, column: str, why: str) -> InputError:
        value = self.row.get(column)
        return InputError(f"{self.path.name} line {self.line}: column {column} = {value!r}: {why}")

    def text(self, column: str) -> str:
        return (self.row.get(column) or "").strip()

    def integer(self, column: str) -> int:
        value = self.optional_int(column)
        if value is None:
            raise self._fail(column, "an integer is required")
        return value

    def optional_int(self, column: str) -> int | None:
        text = self.text(column)
        if text == "" or text.lower() == "nan":
            return None
        try:
            number = float(text)
        except ValueError:
            raise self._fail(column, "not a number") from None
        if not number.is_integer():
            raise self._fail(column, "not an integer")
        return int(number)

    def flag(self, column: str) -> int:
        value = self.integer(column)
        if value not in (0, 1):
            raise self._fail(column, "must be 0 or 1")
        return value

    def boolean(self, column: str) -> bool:
        text = self.text(column).lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise self._fail(column, "must be True/False or 1/0")

    def choice(self, column: str, allowed: tuple[str, ...], *, optional: bool = False) -> str | None:
        text = self.text(column)
        if text == "" and optional:
            return None
        if text not in allowed:
            raise self._fail(column, f"must be one of {', '.join(allowed)}")
        return text
