"""Sample sheet validation: each bad sheet gets one error naming the row and the value."""

import math
from pathlib import Path

import pytest
from wsiattack.errors import SampleSheetError
from wsiattack.samples import read_samples

CLASSES = ["normal", "tumor"]


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "a.tiff").write_bytes(b"x")
    (tmp_path / "b.tiff").write_bytes(b"x")
    path = tmp_path / "samples.csv"
    path.write_text(text)
    return path


def test_valid_sheet_resolves_relative_paths_against_the_sheet(tmp_path):
    sheet = read_samples(
        write(tmp_path, "slide_id,path,label,mpp\nA,a.tiff,normal,0.25\nB,b.tiff,tumor,\n"),
        classes=CLASSES,
        base_dir=tmp_path,
    )
    assert list(sheet.index) == ["A", "B"]
    assert sheet.loc["A", "path"] == str(tmp_path / "a.tiff")
    assert sheet.loc["A", "mpp"] == 0.25 and math.isnan(sheet.loc["B", "mpp"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("slide_id,path\nA,a.tiff\n", r"missing column\(s\) label"),
        ("slide_id,path,label,stain\nA,a.tiff,normal,he\n", r"unknown column\(s\) stain"),
        ("slide_id,path,label\nA,a.tiff,normal\nA,b.tiff,tumor\n", r"duplicate slide_id 'A'"),
        (
            "slide_id,path,label\nA,a.tiff,normal\nB,b.tiff,cancer\n",
            r"line 3: slide 'B': label 'cancer' is not one of the config's classes \(normal, tumor\)",
        ),
        ("slide_id,path,label\nA,missing.tiff,normal\n", r"slide 'A': file not found: .*missing\.tiff"),
        ("slide_id,path,label\nA b,a.tiff,normal\n", r"line 2: slide_id 'A b' must be"),
        ("slide_id,path,label,mpp\nA,a.tiff,normal,-1\n", r"slide 'A': mpp '-1' is not a positive number"),
        ("slide_id,path,label\n", r"no slides"),
    ],
)
def test_bad_sheets(tmp_path, text, message):
    with pytest.raises(SampleSheetError, match=message):
        read_samples(write(tmp_path, text), classes=CLASSES, base_dir=tmp_path)


def test_missing_sheet(tmp_path):
    with pytest.raises(SampleSheetError, match="sample sheet .*nope.csv not found"):
        read_samples(tmp_path / "nope.csv", classes=CLASSES)
