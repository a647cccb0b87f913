"""clinical/structures.json: the 105 labels' names agree with the served config, every structure is coded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from clinical import structures
from wholebody import contract

SHARED_LABELS = Path(__file__).resolve().parents[2] / "shared" / "data" / "wholebody_labels.json"


def test_names_agree_with_the_ensemble_config_label_names() -> None:
    path = contract.MODEL_REPOSITORY / contract.ENSEMBLE / "config.pbtxt"
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    served = config.parameters[contract.LABEL_NAMES_PARAMETER].string_value.split(",")
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
