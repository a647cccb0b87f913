"""DICOM-SEG encodings by name: segmentation type and transfer syntax UID (`clinical.dicom_seg` writes them).

Plain strings, no DICOM library: the client's `--seg-encoding` choices come from here without loading
pydicom or highdicom (the client imports no DICOM library until DICOM is used).

- "labelmap-*": Label Map Segmentation Storage (DICOM 2024, SOP class 1.2.840.10008.5.1.4.1.1.66.7):
  one 8-bit frame per slice whose pixel values are the bundle's labels; "-rle", "-jpegls",
  "-jpeg2000" compress each frame losslessly.
- "binary", "binary-jpeg2000": the classic Segmentation Storage (1.2.840.10008.5.1.4.1.1.66.4):
  one 1-bit frame per slice and segment (non-empty frames only).

Which readers open which encoding is measured by tests/test_clinical_seg_readers.py (docs/clinical-formats.md, DICOM-SEG:
the compatibility table); the default follows from that table and the sizes and times there.
"""

from __future__ import annotations

LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"

ENCODINGS: dict[str, tuple[str, str]] = {  # name -> (segmentation type, transfer syntax UID)
    "labelmap-jpegls": ("LABELMAP", JPEG_LS_LOSSLESS),
    "labelmap-rle": ("LABELMAP", RLE_LOSSLESS),
    "labelmap-jpeg2000": ("LABELMAP", JPEG_2000_LOSSLESS),
    "labelmap": ("LABELMAP", EXPLICIT_VR_LITTLE_ENDIAN),
    "binary": ("BINARY", EXPLICIT_VR_LITTLE_ENDIAN),
    "binary-jpeg2000": ("BINARY", JPEG_2000_LOSSLESS),
}
# Opened by highdicom, dcmqi 1.5.7 (3D Slicer) and @cornerstonejs/adapters (OHIF), 77x smaller and 3.6x faster
# to write than "binary" on a whole-body label map; "binary" for readers older than the 2024 SOP class, which
# every reader tested opens (docs/clinical-formats.md, DICOM-SEG: the measured tables and the reasons)
DEFAULT_ENCODING = "labelmap-rle"


def sop_class_uid(encoding: str) -> str:
    """The SOP class UID a SEG of `encoding` has; KeyError for an unknown encoding."""
    return LABEL_MAP_SEGMENTATION_STORAGE if ENCODINGS[encoding][0] == "LABELMAP" else SEGMENTATION_STORAGE
