"""The sample sheet: ``slide_id,path,label`` (+ optional ``patient_id``, ``mpp``), validated once."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from wsiattack.errors import SampleSheetError
from wsiattack.names import is_valid_name

REQUIRED = ("slide_id", "path", "label")
OPTIONAL = ("patient_id", "mpp")


def read_samples(path: str | Path, *, classes: Sequence[str], base_dir: str | Path | None = None) -> pd.DataFrame:
    """Read and validate a sample sheet; relative slide paths are resolved against ``base_dir``.

    Checks: required columns, no unknown columns, slide ids usable as file names and unique,
    labels among ``classes``, slide files that exist and are readable, positive ``mpp``.
    """
    path = Path(path)
    if not path.is_file():
        raise SampleSheetError(f"sample sheet {path} not found")
    try:
        sheet = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        raise SampleSheetError(f"sample sheet {path}: not a readable CSV ({error})") from None
    where = f"sample sheet {path}"
    missing = [c for c in REQUIRED if c not in sheet.columns]
    if missing:
        raise SampleSheetError(f"{where}: missing column(s) {', '.join(missing)} (needs {', '.join(REQUIRED)})")
    unknown = [c for c in sheet.columns if c not in REQUIRED + OPTIONAL]
    if unknown:
        raise SampleSheetError(
            f"{where}: unknown column(s) {', '.join(unknown)} (allowed: {', '.join(REQUIRED + OPTIONAL)})"
        )
    if sheet.empty:
        raise SampleSheetError(f"{where}: no slides")
    for row, record in enumerate(sheet.to_dict("records"), start=2):  # row 1 is the header
        _check_row(record, classes=classes, where=f"{where}, line {row}")
    duplicated = sheet["slide_id"][sheet["slide_id"].duplicated()]
    if not duplicated.empty:
        raise SampleSheetError(f"{where}: duplicate slide_id {duplicated.iloc[0]!r}")
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    # Normalised but not made absolute: Snakemake compares input paths as strings, and relative
    # paths keep a moved project directory from looking like new inputs.
    sheet["path"] = [os.path.normpath(p if Path(p).is_absolute() else base / p) for p in sheet["path"]]
    for slide_id, slide_path in zip(sheet["slide_id"], sheet["path"], strict=True):
        if not Path(slide_path).is_file():
            raise SampleSheetError(f"{where}: slide {slide_id!r}: file not found: {slide_path}")
        if not os.access(slide_path, os.R_OK):
            raise SampleSheetError(f"{where}: slide {slide_id!r}: file not readable: {slide_path}")
    if "mpp" in sheet.columns:
        sheet["mpp"] = [float(v) if v else float("nan") for v in sheet["mpp"]]  # NaN: from metadata
    return sheet.set_index("slide_id", drop=False)


def _check_row(record: dict[str, str], *, classes: Sequence[str], where: str) -> None:
    slide_id = record["slide_id"]
    if not is_valid_name(slide_id):
        raise SampleSheetError(
            f"{where}: slide_id {slide_id!r} must be non-empty and use only letters, digits, '_', '.', '-'"
        )
    if record["label"] not in classes:
        raise SampleSheetError(
            f"{where}: slide {slide_id!r}: label {record['label']!r} is not one of the config's classes ({', '.join(classes)})"
        )
    if not record["path"]:
        raise SampleSheetError(f"{where}: slide {slide_id!r}: empty path")
    mpp = record.get("mpp", "")
    if mpp:
        try:
            ok = float(mpp) > 0
        except ValueError:
            ok = False
        if not ok:
            raise SampleSheetError(f"{where}: slide {slide_id!r}: mpp {mpp!r} is not a positive number")
