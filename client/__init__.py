"""gRPC client of the wholebody_ct_segmentation Triton ensemble (library and `python -m client`)."""

from client.segmentation_client import SegmentationClient, SegmentationError, SegmentationResult

__all__ = ["SegmentationClient", "SegmentationError", "SegmentationResult"]
