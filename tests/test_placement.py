"""The sliding-window stage's two placements of a torch network, through real servers (CPU).

`placement: in_process` (the CPU default, the session server) runs the network inside the
sliding-window stub from the network model's files and configs/cpu.pbtxt parameters;
`placement: bls` (a second server on a copy) sends each batch of windows to the network model.
Same network, same layout: the same labels.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from client import SegmentationClient, SegmentationError
from perf.gpu_session import drop_parameter, set_parameters
from wholebody.contract import ENSEMBLE, POSTPROCESS, PREPROCESS, SLIDING_WINDOW, network_model_name
from wholebody.sample_data import synthetic_ct
from wholebody.served_models import models_to_load, sliding_window_placement
from wholebody.triton_server import LocalTritonServer


def network_calls(url: str, model: str) -> int:
    stats = grpcclient.InferenceServerClient(url).get_inference_statistics(model, as_json=True)
    return int(stats["model_stats"][0].get("execution_count", 0))


def test_in_process_placement_gives_the_bls_labels(
    server: LocalTritonServer, test_model_repository: Path, tmp_path: Path
) -> None:
    network = network_model_name("lowres", "torch_fp32")
    assert sliding_window_placement(test_model_repository, "cpu") == "in_process"
    image = synthetic_ct((40, 36, 30), (3.0, 3.0, 3.0), seed=3)
    array = np.asarray(image.dataobj)
    calls = network_calls(server.grpc_url, network)  # the session server loads it (the launcher's list)
    with SegmentationClient(server.grpc_url) as seg:
        in_process = seg.segment(array, image.affine, resolution="lowres", network="torch_fp32")
        with pytest.raises(SegmentationError, match=r"'trt_fp16' \(segresnet_lowres_trt_fp16\) is not loaded"):
            seg.segment(array, image.affine, resolution="lowres", network="trt_fp16")
        again = seg.segment(array, image.affine, resolution="lowres", network="torch_fp32")
    assert network_calls(server.grpc_url, network) == calls  # the network ran in the sliding-window stub
    assert np.array_equal(again, in_process)  # a refused request leaves the stage serving

    repo = shutil.copytree(test_model_repository, tmp_path / "model_repository")  # with the installed weights
    config = repo / SLIDING_WINDOW / "configs" / "cpu.pbtxt"
    config.write_text(drop_parameter(set_parameters(config.read_text(), placement="bls"), "preload_networks"))
    models = [ENSEMBLE, PREPROCESS, SLIDING_WINDOW, POSTPROCESS, network]
    assert models_to_load(repo, "cpu", models) == models  # by BLS the network model is needed
    with LocalTritonServer(model_repository=repo, models=models) as by_bls_server:
        with SegmentationClient(by_bls_server.grpc_url) as seg:
            by_bls = seg.segment(array, image.affine, resolution="lowres", network="torch_fp32")
        assert network_calls(by_bls_server.grpc_url, network) > 0
    assert np.array_equal(in_process, by_bls)
