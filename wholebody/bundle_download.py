"""Getting the released wholeBody_ct_segmentation bundle with MONAI's own download, verified and cached.

    python -m wholebody.bundle_download --cache .cache        # prints the verified bundle directory

`fetch_released_bundle` calls `monai.bundle.download(name=..., version=..., bundle_dir=..., url=...)` for
each URL in turn: MONAI's NGC "monaihosting" archive, then the model zoo's GitHub release (the URL MONAI's
`source="github"` builds). `source="monaihosting"` itself is not used: in MONAI 1.6 it first calls
`huggingface_hub.snapshot_download` (not a dependency of this project; without it that source fails
before any request), with no timeout to bound. MONAI's download has no timeout either (urllib's
`urlretrieve`), so every socket operation is bounded here with `socket.setdefaulttimeout`.

The archive is downloaded and unpacked in the cache folder's unique temporary (`wholebody.atomic`), then
verified before that is renamed into place: `configs/metadata.json` names the expected version, each checkpoint has the md5 of the release
(the bundle's large-files list) and loads into the bundle's `network_def` (`wholebody.bundle`'s own
check, the one `install_bundle` makes). A cached bundle is reused after its md5s are checked again.

`choose_weights` is the policy the demo and the container entrypoint share: a given bundle, else the
released one, else (when allowed) random weights of the real architecture with one line saying why.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import shutil
import socket
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from wholebody.atomic import atomic_path
from wholebody.bundle import BundleError, build_network, checkpoint_path, load_checkpoint, make_test_bundle
from wholebody.bundle import read_network_def
from wholebody.contract import RESOLUTIONS

log = logging.getLogger(__name__)

BUNDLE_NAME = "wholeBody_ct_segmentation"
BUNDLE_VERSION = "0.2.5"
# md5 of the released checkpoints of 0.2.5 (the bundle's large-files list, as the model zoo publishes it)
RELEASED_MD5: dict[str, str] = {
    "model.pt": "aded45dea52f9c00b37922bcd0a98502",
    "model_lowres.pt": "dbdebeae650f4fb5ea7f4ad01e0d2431",
}
# Mirrors monai.bundle.scripts' MONAI_HOSTING_BASE_URL and _get_git_release_url (tested against them).
MONAI_HOSTING_BASE_URL = "https://api.ngc.nvidia.com/v2/models/nvidia/monaihosting"
MODEL_ZOO_RELEASE = "https://github.com/Project-MONAI/model-zoo/releases/download/hosting_storage_v1"
DEFAULT_TIMEOUT_S = 20.0
RANDOM_BUNDLE_DIR = "bundle_random_weights"
VERIFIED_MARKER = ".verified-by-wholebody"


class BundleDownloadError(RuntimeError):
    """The released bundle could not be downloaded or did not verify; the message says why, briefly."""


@dataclass(frozen=True)
class Weights:
    """The bundle chosen, where it came from ('given', 'released' or 'random') and a line describing it."""

    bundle: Path
    source: str
    description: str


def released_bundle_urls(name: str = BUNDLE_NAME, version: str = BUNDLE_VERSION) -> list[str]:
    """The archive's URLs, in the order MONAI's own download tries its sources."""
    archive = f"{name}_v{version}.zip"
    return [f"{MONAI_HOSTING_BASE_URL}/{name.lower()}/versions/{version}/files/{archive}",
            f"{MODEL_ZOO_RELEASE}/{archive}"]


@contextlib.contextmanager
def _bounded_and_quiet(timeout: float) -> Iterator[None]:
    """Bound every socket operation by `timeout` seconds; silence MONAI's own stdout loggers meanwhile.

    MONAI's "no hash value provided" warning is silenced too: the checkpoints' md5s are checked after.
    """
    loggers = [logging.getLogger(n) for n in ("monai.apps", "monai.bundle.scripts", "monai.bundle")]
    levels = [lg.level for lg in loggers]
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No hash value provided", category=UserWarning)
            yield
    finally:
        socket.setdefaulttimeout(previous)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_md5(bundle: Path, expected_md5: Mapping[str, str] | None) -> None:
    for filename, expected in (expected_md5 or {}).items():
        path = bundle / "models" / filename
        if not path.is_file():
            raise BundleDownloadError(f"models/{filename} missing from the archive")
        actual = _md5(path)
        if actual != expected:
            raise BundleDownloadError(f"models/{filename} md5 {actual} != released {expected}")


def verify_bundle(bundle: Path, version: str | None, expected_md5: Mapping[str, str] | None) -> None:
    """Raise BundleDownloadError unless `bundle` is the expected release and its checkpoints load."""
    metadata_path = bundle / "configs" / "metadata.json"
    try:
        metadata = json.loads(metadata_path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleDownloadError(f"configs/metadata.json unreadable ({exc.__class__.__name__})") from exc
    if version is not None and metadata.get("version") != version:
        raise BundleDownloadError(f"metadata.json says version {metadata.get('version')!r}, expected {version}")
    _check_md5(bundle, expected_md5)
    try:
        network_def = read_network_def(bundle)
        for resolution in sorted(RESOLUTIONS):
            load_checkpoint(build_network(network_def), checkpoint_path(bundle, resolution))
    except BundleError as exc:
        raise BundleDownloadError(str(exc)) from exc
    except Exception as exc:  # torch.load of a truncated or foreign file raises many kinds
        raise BundleDownloadError(f"a checkpoint does not load: {exc.__class__.__name__}: {exc}") from exc


def _short(exc: BaseException) -> str:
    """An exception in a few words, for the one line a failed download gets."""
    text = str(getattr(exc, "reason", "") or exc).strip().splitlines()
    return (text[0] if text else exc.__class__.__name__)[:160]


def _unpacked_bundle(staging: Path, name: str) -> Path:
    """Where the archive put the bundle: `staging/name/` (the model zoo's layout) or `staging/` itself."""
    for candidate in (staging / name, staging):
        if (candidate / "configs").is_dir():
            return candidate
    raise BundleDownloadError("the archive has no configs/ folder (not a MONAI bundle)")


def _download_one(url: str, staging: Path, name: str, version: str, timeout: float) -> Path:
    from monai.bundle import download  # the server extra's MONAI; imported here: it takes a while

    try:
        with _bounded_and_quiet(timeout):
            download(name=name, version=version, bundle_dir=str(staging), url=url, progress=False)
    except Exception as exc:  # URLError, HTTPError, timeouts, BadZipFile, ... from urllib and zipfile
        raise BundleDownloadError(f"{exc.__class__.__name__}: {_short(exc)}") from exc
    return _unpacked_bundle(staging, name)


def fetch_released_bundle(
    cache: Path,
    urls: Sequence[str] | None = None,
    *,
    name: str = BUNDLE_NAME,
    version: str = BUNDLE_VERSION,
    expected_md5: Mapping[str, str] | None = RELEASED_MD5,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> tuple[Path, str]:
    """The verified released bundle under `cache/bundles/`, downloading it on first use.

    Returns (bundle directory, where it came from). Raises BundleDownloadError with each URL's reason.
    """
    root = Path(cache) / "bundles"
    target = root / f"{name}_v{version}"
    if (target / VERIFIED_MARKER).is_file():
        try:
            _check_md5(target, expected_md5)
            return target, f"cached in {target}"
        except BundleDownloadError as exc:
            log.warning("cached bundle %s no longer verifies (%s): downloading it again", target, exc)
    root.mkdir(parents=True, exist_ok=True)
    reasons = []
    for url in urls if urls is not None else released_bundle_urls(name, version):
        try:
            # downloaded, unpacked and verified inside the target's unique temporary, renamed when complete
            with atomic_path(target, directory=True) as temporary:
                download = temporary / ".download"
                download.mkdir()
                bundle = _download_one(url, download, name, version, timeout)
                verify_bundle(bundle, version, expected_md5)
                for part in list(bundle.iterdir()):
                    part.rename(temporary / part.name)
                shutil.rmtree(download)  # the archive (and the folder the bundle came in)
                (temporary / VERIFIED_MARKER).write_text(f"{url}\n")
                shutil.rmtree(target, ignore_errors=True)  # a cached copy that no longer verified
            return target, f"downloaded from {url}"
        except BundleDownloadError as exc:
            reasons.append(f"{urlparse(url).netloc or url}: {exc}")
    raise BundleDownloadError("; ".join(reasons) or "no URL to download from")


def random_weights_bundle(cache: Path) -> Path:
    """A bundle of the real architecture with seeded random weights (seed 0), made once in `cache`."""
    bundle = Path(cache) / RANDOM_BUNDLE_DIR
    if not all((bundle / "models" / r.checkpoint).is_file() for r in RESOLUTIONS.values()):
        make_test_bundle(bundle, init_filters=32, seed=0)
    return bundle


RANDOM_DESCRIPTION = "random weights of the real architecture (seed 0): the labels mean nothing"


def choose_weights(
    cache: Path,
    bundle: Path | None = None,
    *,
    download: bool = True,
    random_fallback: bool = True,
    urls: Sequence[str] | None = None,
    expected_md5: Mapping[str, str] | None = RELEASED_MD5,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Weights:
    """A given bundle; else the released one (when `download`); else random weights (when allowed).

    A failed download with `random_fallback` logs ONE warning line with the reason; without it, raises
    BundleDownloadError. `download=False, random_fallback=True` forces random weights.
    """
    if bundle is not None:
        return Weights(Path(bundle), "given", f"the bundle at {bundle}")
    if download:
        try:
            path, how = fetch_released_bundle(cache, urls, expected_md5=expected_md5, timeout=timeout)
            return Weights(path, "released", f"released {BUNDLE_NAME} {BUNDLE_VERSION} ({how}, verified)")
        except BundleDownloadError as exc:
            if not random_fallback:
                raise
            log.warning("released bundle not available (%s): using %s", exc, RANDOM_DESCRIPTION)
    elif not random_fallback:
        raise BundleDownloadError("no bundle given, download off and random weights not allowed")
    return Weights(random_weights_bundle(cache), "random", RANDOM_DESCRIPTION)


def main(argv: list[str] | None = None) -> int:
    """Download and verify the released bundle into the cache; print its directory."""
    parser = argparse.ArgumentParser(prog="python -m wholebody.bundle_download", description=main.__doc__)
    parser.add_argument("--cache", type=Path, required=True, help="folder the bundle is kept in (bundles/)")
    parser.add_argument("--url", action="append", help="archive URL to try (repeatable; default: MONAI's)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per socket operation")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path, how = fetch_released_bundle(args.cache, args.url, timeout=args.timeout)
    except BundleDownloadError as exc:
        log.error("error: released bundle not downloaded: %s", exc)
        return 2
    log.info("%s %s: %s", BUNDLE_NAME, BUNDLE_VERSION, how)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
