"""The 104 structures (+ background) of the bundle: name, display colour and SNOMED CT codes.

`structures.json` beside this module is the one source of these facts. Its codes and colours are
TotalSegmentator 2.18's (`totalsegmentator/resources/totalsegmentator_snomed_mapping.csv` in the
`totalsegmentator==2.18.0` source archive on PyPI, Apache-2.0), taken for the bundle's v1 structure
names, which that table lists under the same names. Regenerate it from that table with
`python -m clinical.structures --csv PATH` (the label order comes from the ensemble config).

The table's code meanings were checked against a second source, pydicom's dictionary of DICOM PS3.16
concepts (`pydicom.sr._concepts_dict`, tests/test_clinical_structures.py); `MEANING_CORRECTIONS`
records what differed and is applied on regeneration, so the file stays reproducible from the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

STRUCTURES_JSON = Path(__file__).with_name("structures.json")
SOURCE = (
    "TotalSegmentator 2.18.0 source archive (PyPI totalsegmentator==2.18.0, Apache-2.0), "
    "totalsegmentator/resources/totalsegmentator_snomed_mapping.csv: SegmentedPropertyCategory/Type/"
    "TypeModifier codes and DicomRGBColor of each structure, matched by name (the v1 names of this bundle "
    "are rows of that table); background has no code; code meanings corrected where clinical/structures.py "
    "MEANING_CORRECTIONS says (checked against pydicom's dictionary of DICOM PS3.16 concepts)"
)

# SNOMED CT code value -> (meaning in TotalSegmentator's table, meaning written, why). A meaning is the
# display text of its code; viewers show it, and DICOM tools compare it with the standard's.
MEANING_CORRECTIONS: dict[str, tuple[str, str, str]] = {
    "75297007": ("Gluteus minius muscle", "Gluteus minimus muscle",
                 "typo in the table; SNOMED CT 75297007 is the gluteus minimus muscle"),
    "87878005": ("Left ventricle of heart", "Left ventricle", "PS3.16's meaning (CID 7151, CID 12305, ...)"),
    "53085002": ("Right ventricle of heart", "Right ventricle", "PS3.16's meaning (CID 7151, CID 12305, ...)"),
    "30315005": ("Small Intestine", "Small intestine", "PS3.16's meaning (CID 7151, CID 7154, ...)"),
    "89837001": ("Urinary bladder", "Bladder", "PS3.16's meaning (CID 7151, CID 7160, ...)"),
}
# Kept although the second source differs: SCT 123037004 "Anatomical Structure" (every structure's
# category). PS3.16 now codes the CID 7150 category "Anatomical Structure" as SCT 91723000 and SNOMED CT
# names 123037004 "Body structure", but 3D Slicer's terminology lists (the General Anatomy list that the
# seg.nrrd TerminologyEntry names), MONAI Label and TotalSegmentator use 123037004 "Anatomical Structure";
# changing it would make our SEGs and seg.nrrd files differ from theirs.
KEPT_AGAINST_PS3_16 = {"123037004": "Anatomical Structure"}


@dataclass(frozen=True)
class Code:
    """A coded concept: code value, coding scheme designator (e.g. "SCT") and code meaning."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class Structure:
    """One label of the label map: `label` 0..104, `name` as in the ensemble config, `color` RGB 0..255,
    SNOMED CT segmented-property `category` and `type`, and `modifier` (laterality) where the type needs one.
    Background (label 0) has no codes."""

    label: int
    name: str
    color: tuple[int, int, int]
    category: Code | None
    type: Code | None
    modifier: Code | None = None


def _code(entry: dict | None) -> Code | None:
    return None if entry is None else Code(entry["value"], entry["scheme"], entry["meaning"])


@cache
def structures() -> tuple[Structure, ...]:
    """All 105 structures in label order (index = label value), read once from structures.json."""
    data = json.loads(STRUCTURES_JSON.read_text())
    out = tuple(
        Structure(s["label"], s["name"], tuple(s["color"]), _code(s.get("category")), _code(s.get("type")),
                  _code(s.get("modifier")))
        for s in data["structures"]
    )
    if [s.label for s in out] != list(range(len(out))):
        raise ValueError(f"{STRUCTURES_JSON}: labels must be 0..{len(out) - 1} in order")
    return out


def label_names() -> list[str]:
    """Names in label order; index 0 is "background"."""
    return [s.name for s in structures()]


def by_name(name: str) -> Structure:
    """The structure called `name`; KeyError naming the closest valid names otherwise."""
    for s in structures():
        if s.name == name:
            return s
    import difflib

    close = difflib.get_close_matches(name, label_names(), n=3)
    raise KeyError(f"unknown structure {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))


def _csv_code(row: dict[str, str], prefix: str) -> dict[str, str] | None:
    value = row.get(f"{prefix}.CodeValue", "").strip()
    if not value:
        return None
    meaning = row[f"{prefix}.CodeMeaning"].strip()
    if value in MEANING_CORRECTIONS and meaning == MEANING_CORRECTIONS[value][0]:
        meaning = MEANING_CORRECTIONS[value][1]
    return {"value": value, "scheme": row[f"{prefix}.CodingSchemeDesignator"].strip(), "meaning": meaning}


def build_table(csv_path: Path, names: list[str]) -> dict:
    """The content of structures.json from TotalSegmentator's mapping table, for `names` in label order,
    with the code meanings of `MEANING_CORRECTIONS` corrected. Raises KeyError for a name the table lacks."""
    with open(csv_path, newline="") as f:
        rows = {r["Structure"]: r for r in csv.DictReader(f)}
    table = [{"label": 0, "name": names[0], "color": [0, 0, 0]}]
    for label, name in enumerate(names[1:], start=1):
        if name not in rows:
            raise KeyError(f"{csv_path} has no row for {name!r}")
        row = rows[name]
        entry = {"label": label, "name": name, "color": [int(c) for c in row["DicomRGBColor"].split(",")],
                 "category": _csv_code(row, "SegmentedPropertyCategoryCodeSequence"),
                 "type": _csv_code(row, "SegmentedPropertyTypeCodeSequence")}
        modifier = _csv_code(row, "SegmentedPropertyTypeModifierCodeSequence")
        if modifier is not None:
            entry["modifier"] = modifier
        table.append(entry)
    return {"source": SOURCE, "structures": table}


def main(argv: list[str] | None = None) -> int:
    """Regenerate structures.json from TotalSegmentator's mapping table (see the module docstring)."""
    from wholebody import contract

    parser = argparse.ArgumentParser(prog="python -m clinical.structures", description=main.__doc__)
    parser.add_argument("--csv", type=Path, required=True, help="totalsegmentator_snomed_mapping.csv")
    parser.add_argument("--out", type=Path, default=STRUCTURES_JSON, help="default: %(default)s")
    args = parser.parse_args(argv)
    from wholebody.served_models import config_parameters

    ensemble = config_parameters(contract.MODEL_REPOSITORY / contract.ENSEMBLE / "config.pbtxt")
    names = ensemble[contract.LABEL_NAMES_PARAMETER].split(",")
    table = build_table(args.csv, names)
    lines = ",\n".join("  " + json.dumps(s) for s in table["structures"])  # one structure a line
    args.out.write_text(f'{{\n "source": {json.dumps(table["source"])},\n "structures": [\n{lines}\n ]\n}}\n')
    print(f"wrote {args.out} ({len(names)} structures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
