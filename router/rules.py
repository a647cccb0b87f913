"""Which received series the router segments: the site's rules file and the pure decision on one series.

A rules file is YAML (``.yaml``/``.yml``, needs PyYAML: the ``router`` extra) or JSON, one mapping; every
key is optional and a missing key takes the default below (the default takes axial CTs)::

    modalities: [CT]                      # Modality (0008,0060), exact, case-insensitive
    slice_thickness_mm: [0.5, 5.0]        # SliceThickness (0018,0050) inclusive range; null = any
    body_parts: []                        # BodyPartExamined (0018,0015), case-insensitive; [] = any
    description_include: []              # SeriesDescription must match one (re.search); [] = any
    description_exclude: ["(?i)scout|localizer|topogram|dose|report"]  # and none of these
    min_slices: 20                        # images in the series (Orthanc instances)
    orientation: axial                    # axial | any: the slice normal within `max_tilt_deg` of the body axis
    max_tilt_deg: 15

`decide(rules, facts)` is pure (no I/O): the router reads `SeriesFacts` from Orthanc and records the
`Decision`'s reason for the operator (``python -m router status``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


class RulesError(ValueError):
    """A rules file that cannot be used; the message is one line naming the file and the fix."""


@dataclass(frozen=True)
class Rules:
    """The site's selection rules (see the module docstring for the file format and defaults)."""

    modalities: tuple[str, ...] = ("CT",)
    slice_thickness_mm: tuple[float, float] | None = (0.5, 5.0)
    body_parts: tuple[str, ...] = ()
    description_include: tuple[str, ...] = ()
    description_exclude: tuple[str, ...] = (r"(?i)scout|localizer|topogram|dose|report",)
    min_slices: int = 20
    orientation: str = "axial"
    max_tilt_deg: float = 15.0


@dataclass(frozen=True)
class SeriesFacts:
    """What the rules look at, from one series' tags (`router.orthanc.OrthancClient.series_facts`).

    slice_thickness_mm: None when the tag is absent; orientation: ImageOrientationPatient's six
    direction cosines (row, column), None when absent; slices: the number of instances.
    """

    modality: str
    description: str = ""
    body_part: str = ""
    slice_thickness_mm: float | None = None
    slices: int = 0
    orientation: tuple[float, ...] | None = None
    image_type: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Decision:
    accepted: bool
    reason: str  # one line: why taken, or the first rule that refused it


def _strings(where: str, key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RulesError(f"{where}: {key} must be a list of strings, got {value!r}")
    return tuple(value)


def _number(value: Any) -> bool:
    """An int or float, not a bool (YAML's `true` is a Python int, and means no number of slices or mm)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def rules_from_mapping(data: dict[str, Any], where: str = "rules") -> Rules:
    """Rules from a parsed mapping; raises RulesError for unknown keys, wrong types or bad regexes."""
    if not isinstance(data, dict):
        raise RulesError(f"{where}: the rules must be a mapping of keys to values, got {type(data).__name__}")
    known = {f.name for f in fields(Rules)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RulesError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values: dict[str, Any] = {}
    for key in ("modalities", "body_parts", "description_include", "description_exclude"):
        if key in data:
            values[key] = _strings(where, key, data[key])
    for key in ("description_include", "description_exclude"):
        for pattern in values.get(key, ()):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise RulesError(f"{where}: {key} pattern {pattern!r} is not a regular expression ({exc})") from None
    if "slice_thickness_mm" in data:
        span = data["slice_thickness_mm"]
        if span is not None:
            if (not isinstance(span, list) or len(span) != 2
                    or not all(_number(v) for v in span) or span[0] > span[1]):
                raise RulesError(f"{where}: slice_thickness_mm must be [min, max] in mm (or null), got {span!r}")
            span = (float(span[0]), float(span[1]))
        values["slice_thickness_mm"] = span
    if "min_slices" in data:
        if not _number(data["min_slices"]) or not isinstance(data["min_slices"], int) or data["min_slices"] < 1:
            raise RulesError(f"{where}: min_slices must be a positive integer, got {data['min_slices']!r}")
        values["min_slices"] = data["min_slices"]
    if "orientation" in data:
        if data["orientation"] not in ("axial", "any"):
            raise RulesError(f"{where}: orientation must be 'axial' or 'any', got {data['orientation']!r}")
        values["orientation"] = data["orientation"]
    if "max_tilt_deg" in data:
        if not _number(data["max_tilt_deg"]) or not 0 <= data["max_tilt_deg"] <= 90:
            raise RulesError(f"{where}: max_tilt_deg must be a number of degrees 0..90, got {data['max_tilt_deg']!r}")
        values["max_tilt_deg"] = float(data["max_tilt_deg"])
    return Rules(**values)


def load_rules(path: str | Path | None) -> Rules:
    """Rules from a YAML or JSON file; None gives the defaults. Raises RulesError (file named, fix said)."""
    if path is None:
        return Rules()
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RulesError(f"{path}: cannot read the rules file ({exc.strerror}); give an existing YAML or JSON file")
    except UnicodeDecodeError as exc:  # a ValueError: without this its message would not name the file
        raise RulesError(f"{path}: not UTF-8 text (byte {exc.start}); save the rules file as UTF-8") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise RulesError(f"{path}: YAML rules need PyYAML: pip install 'wholebody-ct-triton[router]', "
                             "or write the rules as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RulesError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RulesError(f"{path}: not valid JSON ({exc}); YAML files must end in .yaml or .yml") from None
    return rules_from_mapping(data if data is not None else {}, str(path))


def tilt_deg(orientation: tuple[float, ...]) -> float:
    """Angle in degrees between the slice normal (row x column cosines) and the patient's S axis."""
    row, col = orientation[:3], orientation[3:6]
    normal = (row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2], row[0] * col[1] - row[1] * col[0])
    norm = math.sqrt(sum(v * v for v in normal)) or 1.0
    return math.degrees(math.acos(min(1.0, abs(normal[2]) / norm)))


def decide(rules: Rules, facts: SeriesFacts) -> Decision:
    """Whether to segment a series; the reason names the first rule that refused it. Pure."""
    if facts.modality.upper() not in {m.upper() for m in rules.modalities}:
        return Decision(False, f"modality {facts.modality or '(none)'} not in {', '.join(rules.modalities)}")
    if any(t.upper() == "LOCALIZER" for t in facts.image_type):
        return Decision(False, "ImageType LOCALIZER")
    if facts.slices < rules.min_slices:
        return Decision(False, f"{facts.slices} slices < min_slices {rules.min_slices}")
    if rules.slice_thickness_mm is not None:
        low, high = rules.slice_thickness_mm
        if facts.slice_thickness_mm is None:
            return Decision(False, "no SliceThickness while the rules ask for a range")
        if not low <= facts.slice_thickness_mm <= high:
            return Decision(False, f"slice thickness {facts.slice_thickness_mm:g} mm outside {low:g}..{high:g} mm")
    if rules.body_parts and facts.body_part.upper() not in {b.upper() for b in rules.body_parts}:
        return Decision(False, f"body part {facts.body_part or '(none)'} not in {', '.join(rules.body_parts)}")
    if rules.description_include and not any(re.search(p, facts.description) for p in rules.description_include):
        return Decision(False, f"description {facts.description!r} matches no description_include pattern")
    for pattern in rules.description_exclude:
        if re.search(pattern, facts.description):
            return Decision(False, f"description {facts.description!r} matches description_exclude {pattern!r}")
    if rules.orientation == "axial":
        if facts.orientation is None or len(facts.orientation) != 6:
            return Decision(False, "no ImageOrientationPatient while the rules ask for axial slices")
        if not all(math.isfinite(v) for v in facts.orientation):  # NaN made tilt_deg 0: taken as axial
            return Decision(False, "ImageOrientationPatient is not finite while the rules ask for axial slices")
        tilt = tilt_deg(facts.orientation)
        if tilt > rules.max_tilt_deg:
            return Decision(False, f"not axial: slice normal {tilt:.0f} deg from the body axis "
                                   f"> {rules.max_tilt_deg:g}")
    return Decision(True, f"{facts.modality} {facts.slices} slices matched the rules")
