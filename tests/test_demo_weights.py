"""Which weights the demo (and the entrypoint) serve: the released bundle fetched with MONAI's own download,
verified and cached, or random weights of the real architecture with one line saying why.

The released archive cannot be reached from these machines: a local HTTP server (http.server in a thread on
127.0.0.1) serves an archive of the model zoo's layout (`wholeBody_ct_segmentation/configs/metadata.json`,
`.../models/model.pt`, `.../models/model_lowres.pt`, random weights), a truncated one, and nothing at all.
Every download runs with a timeout of a few seconds.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.__main__ import demo_weights, parse_args
from wholebody import bundle_download
from wholebody.bundle import copy_model_repository, install_bundle, make_test_bundle
from wholebody.bundle_download import (
    BUNDLE_NAME,
    BUNDLE_VERSION,
    VERIFIED_MARKER,
    BundleDownloadError,
    choose_weights,
    released_bundle_urls,
)
from tests.test_deploy import entrypoint_module
from wholebody.contract import REPO_ROOT

TIMEOUT_S = 3.0
ARCHIVE = f"{BUNDLE_NAME}_v{BUNDLE_VERSION}.zip"
DEPLOY = REPO_ROOT / "deploy"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """(base URL, md5 of each checkpoint): good, truncated, garbage and wrong-version archives on 127.0.0.1."""
    root = tmp_path_factory.mktemp("zoo")
    bundle = make_test_bundle(root / "src" / BUNDLE_NAME, init_filters=8, seed=0)
    metadata = {"name": "Whole body CT segmentation", "version": BUNDLE_VERSION, "monai_version": "1.6.1"}
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in (bundle / "models").glob("*.pt")}
    site = root / "site"
    site.mkdir()
    with zipfile.ZipFile(site / "good.zip", "w") as archive:  # the model zoo's archive: one base folder
        for path in sorted(bundle.rglob("*")):
            archive.write(path, path.relative_to(bundle.parent).as_posix())
    good = (site / "good.zip").read_bytes()
    (site / "truncated.zip").write_bytes(good[: len(good) // 2])
    (site / "garbage.zip").write_bytes(bytes(range(256)) * 64)
    (bundle / "configs" / "metadata.json").write_text(json.dumps(dict(metadata, version="0.0.1")))
    with zipfile.ZipFile(site / "wrong-version.zip", "w") as archive:
        for path in sorted(bundle.rglob("*")):
            archive.write(path, path.relative_to(bundle.parent).as_posix())
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a, **k: _QuietHandler(*a, directory=str(site), **k))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", md5
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def random_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fallback's bundle (real architecture, ~75 MB a checkpoint), made once for the module."""
    return bundle_download.random_weights_bundle(tmp_path_factory.mktemp("random-cache"))


@pytest.fixture
def cache(tmp_path: Path, random_bundle: Path) -> Path:
    """A fresh cache whose random-weight bundle is the module's (made once)."""
    (tmp_path / bundle_download.RANDOM_BUNDLE_DIR).symlink_to(random_bundle, target_is_directory=True)
    return tmp_path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_warning(caplog: pytest.LogCaptureFixture) -> str:
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(records) == 1, [r.getMessage() for r in records]
    message = records[0].getMessage()
    assert "\n" not in message
    return message


def test_urls_are_the_ones_monai_builds() -> None:
    from monai.bundle import scripts

    monaihosting, github = released_bundle_urls()
    assert monaihosting == scripts._get_monaihosting_bundle_url(BUNDLE_NAME, BUNDLE_VERSION)
    assert github == scripts._get_git_release_url("Project-MONAI", "model-zoo", "hosting_storage_v1", ARCHIVE)
    assert bundle_download.MONAI_HOSTING_BASE_URL == scripts.MONAI_HOSTING_BASE_URL


def test_refused_download_falls_back_to_random_weights_in_one_line(
    cache: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO)
    started = time.monotonic()
    weights = choose_weights(cache, urls=[f"http://127.0.0.1:{_closed_port()}/{ARCHIVE}"], timeout=TIMEOUT_S)
    assert time.monotonic() - started < 2 * TIMEOUT_S
    message = _one_warning(caplog)
    assert "released bundle not available" in message and "refused" in message.lower(), message
    assert "random weights" in message and "labels mean nothing" in message
    assert weights.source == "random" and "labels mean nothing" in weights.description
    assert capfd.readouterr().out == "", "MONAI's own download logging is kept quiet"
    assert not any((cache / "bundles").iterdir()), "nothing is left behind"
    # the demo's install step proceeds with the fallback bundle
    repo = copy_model_repository(cache / "model_repository")
    assert install_bundle(weights.bundle, repo)


def test_a_server_that_never_answers_is_given_up_on_in_bounded_time(
    cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as listener:  # accepts connections (backlog) but never sends a byte
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/{ARCHIVE}"
        started = time.monotonic()
        weights = choose_weights(cache, urls=[url], timeout=1.0)
    assert time.monotonic() - started < 10
    assert weights.source == "random" and "timed out" in _one_warning(caplog)


def test_served_archive_is_downloaded_verified_cached_and_installed(
    cache: Path, served: tuple[str, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    base, md5 = served
    url = f"{base}/good.zip"
    weights = choose_weights(cache, urls=[f"{base}/absent.zip", url], expected_md5=md5, timeout=TIMEOUT_S)
    assert weights.source == "released" and url in weights.description, weights
    assert weights.bundle == cache / "bundles" / f"{BUNDLE_NAME}_v{BUNDLE_VERSION}"
    assert (weights.bundle / VERIFIED_MARKER).read_text().strip() == url
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [p.name for p in (cache / "bundles").iterdir()] == [weights.bundle.name], "no staging left"
    repo = copy_model_repository(cache / "model_repository")
    installed = install_bundle(weights.bundle, repo)
    assert {p.name for p in installed} == set(md5)
    # the next run uses the cache: no request (the URL is unreachable now)
    again = choose_weights(cache, urls=[f"http://127.0.0.1:{_closed_port()}/x.zip"], expected_md5=md5)
    assert again.source == "released" and "cached in" in again.description
    # a cached checkpoint that changed is not trusted
    (weights.bundle / "models" / "model.pt").write_bytes(b"not a checkpoint")
    fallback = choose_weights(cache, urls=[f"http://127.0.0.1:{_closed_port()}/x.zip"], expected_md5=md5)
    assert fallback.source == "random"


@pytest.mark.parametrize(
    ("archive", "md5", "reason"),
    [
        ("garbage.zip", None, "BadZipFile"),
        # a checkpoint is itself a zip (torch.save): zipfile opens the tail's inner archive, without configs/
        ("truncated.zip", None, "no configs/ folder|BadZipFile"),
        ("wrong-version.zip", None, "version '0.0.1', expected 0.2.5"),
        ("good.zip", bundle_download.RELEASED_MD5, "md5"),  # random weights are not the release
    ],
)
def test_a_bad_archive_is_refused_in_one_line_and_the_demo_falls_back(
    cache: Path, served: tuple[str, dict[str, str]], caplog: pytest.LogCaptureFixture,
    archive: str, md5: dict[str, str] | None, reason: str,
) -> None:
    base, _ = served
    weights = choose_weights(cache, urls=[f"{base}/{archive}"], expected_md5=md5, timeout=TIMEOUT_S)
    assert weights.source == "random"
    assert re.search(reason, _one_warning(caplog))
    assert not any((cache / "bundles").iterdir()), "a refused archive is not kept"


def test_without_fallback_a_failed_download_raises(cache: Path) -> None:
    with pytest.raises(BundleDownloadError, match="127.0.0.1"):
        choose_weights(cache, urls=[f"http://127.0.0.1:{_closed_port()}/x.zip"], random_fallback=False)


def test_demo_flags_force_either_weights(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("no download was asked for")

    monkeypatch.setattr(bundle_download, "fetch_released_bundle", no_download)
    forced = demo_weights(parse_args(["--random-weights", "--cache", str(cache)]))
    assert forced.source == "random"
    given = demo_weights(parse_args(["--bundle", "/some/bundle", "--cache", str(cache)]))
    assert given.source == "given" and given.bundle == Path("/some/bundle")
    with pytest.raises(SystemExit):
        parse_args(["--bundle", "/b", "--random-weights"])


# --- the container entrypoint: download only when asked, random weights only when told ---------------------

def _entrypoint_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHOLEBODY_")}
    env.update({f"WHOLEBODY_{k.upper()}": v for k, v in settings.items()})
    env["PYTHONPATH"] = str(REPO_ROOT)  # this checkout's wholebody, wherever an editable install points
    return env


def _run_entrypoint(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(DEPLOY / "entrypoint.py"), *args], env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def test_entrypoint_stops_on_a_failed_download_in_one_line(cache: Path) -> None:
    env = _entrypoint_env(download_bundle="1", bundle_cache=str(cache), download_timeout=str(TIMEOUT_S),
                          bundle_url=f"http://127.0.0.1:{_closed_port()}/{ARCHIVE}",
                          model_repository=str(cache / "state" / "model_repository"), config_name="cpu")
    result = _run_entrypoint("--prepare-only", env=env)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "released bundle not downloaded" in line and "--random-weights" in line, line


def test_entrypoint_falls_back_to_random_weights_only_when_told(cache: Path) -> None:
    target = cache / "state" / "model_repository"
    env = _entrypoint_env(download_bundle="1", random_weights="1", bundle_cache=str(cache),
                          download_timeout=str(TIMEOUT_S), bundle_url=f"http://127.0.0.1:{_closed_port()}/x.zip",
                          model_repository=str(target), config_name="cpu")
    result = _run_entrypoint("--prepare-only", env=env)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "released bundle not available" in line]
    assert len(warnings) == 1 and "random weights" in warnings[0], result.stderr
    assert list((target / "segresnet_lowres_torch_fp32" / "1").glob("*.pt"))


def test_entrypoint_installs_the_downloaded_bundle(
    cache: Path, served: tuple[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, md5 = served
    monkeypatch.setattr(bundle_download, "RELEASED_MD5", md5)  # the served archive's random weights
    target = cache / "state" / "model_repository"
    env = _entrypoint_env(download_bundle="1", bundle_cache=str(cache), bundle_url=f"{base}/good.zip",
                          model_repository=str(target), config_name="cpu")
    assert entrypoint_module().main(["--prepare-only"], env=env) == 0
    bundle = cache / "bundles" / f"{BUNDLE_NAME}_v{BUNDLE_VERSION}"
    installed = target / "segresnet_lowres_torch_fp32" / "1" / "model_lowres.pt"
    assert installed.read_bytes() == (bundle / "models" / "model_lowres.pt").read_bytes()


def test_entrypoint_refuses_a_bundle_and_random_weights_together(tmp_path: Path) -> None:
    result = _run_entrypoint(env=_entrypoint_env(bundle=str(tmp_path), random_weights="1"))
    assert result.returncode == 2 and "--bundle and --random-weights together" in result.stderr
