"""The sliding-window stage's two placements of a torch network, through real servers (CPU).

`placement: bls` (the session server) sends each batch of windows to the network model;
`placement: in_process` runs the same network, from the same files with the same config
parameters, inside the sliding-window stub. Same network, same layout: the same labels.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from client import SegmentationClient, SegmentationError
from perf.gpu_session import set_parameters
from wholebody.contract import ENSEMBLE, POSTPROCESS, PREPROCESS, SLIDING_WINDOW
from wholebody.sample_data import synthetic_ct
from wholebody.triton_server import LocalTritonServer


def test_in_process_placement_gives_the_bls_labels(
    server: LocalTritonServer, test_model_repository: Path, tmp_path: Path
) -> None:
    repo = shutil.copytree(test_model_repository, tmp_path / "model_repository")  # with the installed weights
    config = repo / SLIDING_WINDOW / "configs" / "cpu.pbtxt"
    config.write_text(set_parameters(config.read_text(), placement="in_process", network_config="configs/cpu.pbtxt"))
    image = synthetic_ct((40, 36, 30), (3.0, 3.0, 3.0), seed=3)
    array = np.asarray(image.dataobj)
    with SegmentationClient(server.grpc_url) as seg:
        by_bls = seg.segment(array, image.affine, resolution="lowres", network="torch_fp32")
    # no network model loaded: the sliding-window stage must run the network itself
    with LocalTritonServer(model_repository=repo, models=[ENSEMBLE, PREPROCESS, SLIDING_WINDOW, POSTPROCESS]) as alone:
        with SegmentationClient(alone.grpc_url) as seg:
            in_process = seg.segment(array, image.affine, resolution="lowres", network="torch_fp32")
            with pytest.raises(SegmentationError, match="TensorRT plan: it runs by BLS only"):
                seg.segment(array, image.affine, resolution="lowres", network="trt_fp16")
            again = seg.segment(array, image.affine, resolution="lowres", network="torch_fp32")
    assert np.array_equal(in_process, by_bls)
    assert np.array_equal(again, in_process)  # a refused request leaves the stage serving
