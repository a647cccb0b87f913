"""Shared fixtures: a small test bundle, a copy of the model repository with it installed, and a
real tritonserver (CPU) serving that copy for the whole session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from wholebody.bundle import copy_model_repository, install_bundle, make_test_bundle
from wholebody.sample_data import real_ct
from wholebody.triton_server import LocalTritonServer
from wholebody.validation import write_size_limits

# init_filters=8: the real architecture with 1/4 of the channels, ~1 s per 96^3 window on 2 cores.
TEST_INIT_FILTERS = 8
# The test server's size limits (the ensemble's parameters), low enough that oversize tests send only
# ~40 MB; the resampled limit still admits the highres parity CT (~7.4 M voxels at 1.5 mm).
TEST_MAX_INPUT_VOXELS = 8_000_000
TEST_MAX_RESAMPLED_VOXELS = 10_000_000


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def test_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_bundle(tmp_path_factory.mktemp("bundle"), init_filters=TEST_INIT_FILTERS, seed=0)


@pytest.fixture(scope="session")
def test_model_repository(tmp_path_factory: pytest.TempPathFactory, test_bundle: Path) -> Path:
    repo = copy_model_repository(tmp_path_factory.mktemp("serving") / "model_repository")
    install_bundle(test_bundle, repo)
    write_size_limits(repo, TEST_MAX_INPUT_VOXELS, TEST_MAX_RESAMPLED_VOXELS)
    return repo


@pytest.fixture(scope="session")
def server(test_model_repository: Path) -> Iterator[LocalTritonServer]:
    # with the launcher's watchdog, as `serve` runs: idle stubs do not keep the pools of large requests
    with LocalTritonServer(model_repository=test_model_repository, watchdog=True) as running:
        yield running


@pytest.fixture(scope="session")
def example_ct() -> Path:
    """Real abdomen CT, 122x101x112 at 3.0 mm, RAS."""
    return real_ct("example_ct")


@pytest.fixture(scope="session")
def aorta_ct() -> Path:
    """Real chest CT angiogram, 233x167x191 at 1.5 mm, axis codes L,P,S."""
    return real_ct("aorta_ct")
