"""clinical/structures.json: the 105 labels' names agree with the served config, every structure is coded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clinical import structures
from wholebody import contract
from wholebody.served_models import config_parameters

SHARED_LABELS = Path(__file__).resolve().parents[2] / "shared" / "data" / "wholebody_labels.json"


def test_names_agree_with_the_ensemble_config_label_names() -> None:
    path = contract.MODEL_REPOSITORY / contract.ENSEMBLE / "config.pbtxt"
    served = config_parameters(path)[contract.LABEL_NAMES_PARAMETER].split(",")
    assert structures.label_names() == served
    assert len(served) == contract.NUM_CLASSES
    if SHARED_LABELS.exists():  # the team's copy of the bundle's metadata, where it is at hand
        labels = json.loads(SHARED_LABELS.read_text())["labels"]
        assert structures.label_names() == [labels[str(i)] for i in range(len(labels))]


def test_every_structure_has_colour_and_snomed_codes() -> None:
    table = structures.structures()
    assert table[0].name == "background" and table[0].type is None
    for s in table[1:]:
        assert len(s.color) == 3 and all(0 <= c <= 255 for c in s.color), s
        assert s.category is not None and s.type is not None, s.name
        assert s.category.scheme == "SCT" and s.type.scheme == "SCT" and s.type.value.isdigit(), s.name
        if s.name.endswith(("_left", "_right")) or "_left_" in s.name or "_right_" in s.name:
            side = "Left" if "left" in s.name else "Right"
            # a laterality modifier, or a concept that is sided itself ("Left atrium")
            assert (s.modifier.meaning if s.modifier else s.type.meaning).lower().count(side.lower()), s.name
    coded = {(s.type.value, s.modifier.value if s.modifier else None) for s in table[1:]}
    assert len(coded) == len(table) - 1, "two structures share one coded identity"
    # spot checks against the SNOMED CT concepts themselves
    assert structures.by_name("liver").type.value == "10200004"
    assert structures.by_name("kidney_left").modifier.value == "7771000"  # Left
    assert structures.by_name("kidney_right").modifier.value == "24028007"  # Right
    assert structures.by_name("aorta").type.meaning == "Aorta"


def test_unknown_name_suggests_close_ones() -> None:
    with pytest.raises(KeyError, match="kidney_left"):
        structures.by_name("kidny_left")


def _ps3_16_meanings() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """SNOMED CT code value -> meanings in pydicom's dictionary of DICOM concepts: those of PS3.16 context
    groups (CIDs), and SNOMED CT's own names ("... (body structure)") that pydicom lists without a CID."""
    from pydicom.sr._concepts_dict import concepts

    in_cids: dict[str, set[str]] = {}
    snomed_names: dict[str, set[str]] = {}
    for by_value in concepts["SCT"].values():
        for value, (meaning, cids) in by_value.items():
            (in_cids if cids else snomed_names).setdefault(value, set()).add(meaning)
    return in_cids, snomed_names


def test_codes_agree_with_pydicoms_dicom_dictionary() -> None:
    """A second source for the codes taken from TotalSegmentator's table: every SNOMED CT code whose meaning
    pydicom's PS3.16 dictionary knows has that meaning, letter for letter (a PS3.16 context group's meaning,
    else SNOMED CT's name without its "(body structure)" tag, ignoring case); only the documented category
    code differs (structures.KEPT_AGAINST_PS3_16)."""
    in_cids, snomed_names = _ps3_16_meanings()
    used = {(c.value, c.meaning) for s in structures.structures()[1:] for c in (s.category, s.type, s.modifier) if c}
    checked, disagree = 0, []
    for value, meaning in sorted(used):
        if value in in_cids:
            agrees = meaning in in_cids[value]
        elif value in snomed_names:
            agrees = meaning.lower() in {m.removesuffix(" (body structure)").lower() for m in snomed_names[value]}
        else:
            continue
        checked += 1
        if not agrees and structures.KEPT_AGAINST_PS3_16.get(value) != meaning:
            disagree.append(f"{value} {meaning!r}: pydicom has {sorted(in_cids.get(value) or snomed_names[value])}")
    assert not disagree, "\n".join(disagree)
    assert checked >= 55, f"only {checked} codes could be checked against pydicom"
    # the documented exception is real: pydicom names 123037004 otherwise, and codes CID 7150's category apart
    from pydicom.sr.codedict import codes

    assert "Anatomical Structure" not in snomed_names["123037004"] | in_cids.get("123037004", set())
    assert codes.cid7150.AnatomicalStructure.value == "91723000"


def test_no_meaning_left_from_before_the_corrections() -> None:
    meanings = {c.meaning for s in structures.structures()[1:] for c in (s.category, s.type, s.modifier) if c}
    for value, (before, after, _why) in structures.MEANING_CORRECTIONS.items():
        assert before not in meanings and after in meanings, value
    assert structures.by_name("gluteus_minimus_left").type.meaning == "Gluteus minimus muscle"


def test_structures_json_is_the_source_table_with_its_corrections() -> None:
    """Regenerating from TotalSegmentator's table (the cached source archive) gives the file as committed."""
    from wholebody.sample_data import snomed_mapping_csv

    table = structures.build_table(snomed_mapping_csv(), structures.label_names())
    assert table == json.loads(structures.STRUCTURES_JSON.read_text())
