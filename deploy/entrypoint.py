"""Container entrypoint: prepare a writable model repository, install the bundle, then exec the launcher.

Steps, each with the project's own command:

1. copy the image's model repository (configs and code, read-only in the image) into a writable
   folder (an emptyDir in Kubernetes): `wholebody.bundle.copy_model_repository`;
2. `python -m wholebody.bundle install --bundle DIR --model-repository REPO` (the checkpoints come
   from a mounted volume or an init container; the image holds no weights). Without a bundle,
   `--download-bundle` fetches the released one with MONAI's bundle download into `--cache`, verified
   (`wholebody.bundle_download`); a failure stops the start (exit 2) unless `--random-weights` is
   given too, which falls back to random weights of the real architecture with one line saying why.
   `--random-weights` alone serves them without a download (image smoke tests: labels mean nothing);
   a server never serves random weights unless told to;
3. optionally `python -m export --bundle DIR --out REPO` (TensorRT plans are tied to the GPU model and
   the TensorRT version, so they are built where they will be served, at start, when asked);
4. `exec python -m wholebody.triton_server serve ...`: the launcher builds the locked-down
   tritonserver flags itself (one source of truth), stops the server and its stubs on SIGTERM, and
   runs the stub watchdog. This process becomes the launcher (same PID), so the container's SIGTERM
   reaches it.

Every setting is a flag whose default comes from an environment variable (`WHOLEBODY_*`, listed in
`--help`), so the same script runs in the image, in a Kubernetes pod and outside a container (the
tests run it against a local model repository). Errors are one line naming what to fix; exit 2.

    python deploy/entrypoint.py --bundle /bundle/wholeBody_ct_segmentation --config-name cpu
    python deploy/entrypoint.py --help
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

log = logging.getLogger("wholebody.entrypoint")

# A model repository prepared by this script carries this file; only such a folder is ever replaced.
MARKER = ".prepared-by-wholebody-entrypoint"
DEFAULT_TARGET = Path("/var/lib/wholebody/model_repository")
DEFAULT_CACHE = Path("/var/lib/wholebody/cache")
DEFAULT_KEY_FILE_ENV = "WHOLEBODY_OPERATOR_KEY_FILE"


class EntrypointError(RuntimeError):
    """A setting or a step that cannot go on; the message says what to fix."""


@dataclass(frozen=True)
class Settings:
    """What the entrypoint does; see `parser()` for each field's flag and environment variable."""

    bundle: Path | None
    model_repository: Path
    source_repository: Path
    config_name: str
    address: str
    grpc_port: int
    http_port: int
    metrics_port: int
    log: str
    operator_key_file: Path | None
    tritonserver: Path | None
    backend_directory: Path | None
    build_tensorrt: bool
    export_args: list[str] = field(default_factory=list)
    launcher_args: list[str] = field(default_factory=list)
    python: str = sys.executable
    download_bundle: bool = False
    random_weights: bool = False
    cache: Path = DEFAULT_CACHE
    bundle_urls: list[str] | None = None
    download_timeout: float = 20.0
    drain_seconds: float | None = None  # None: the launcher's default


def _env_bool(value: str, name: str = "WHOLEBODY_BUILD_TENSORRT") -> bool:
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("", "0", "false", "no", "off"):
        return False
    raise EntrypointError(f"{name}={value!r}: use 1/true/yes or 0/false/no")


def optional_float(value: str) -> float | None:
    """An environment variable's number, None when unset or empty."""
    if not value.strip():
        return None
    try:
        return float(value)
    except ValueError:
        raise EntrypointError(f"{value!r} is not a number of seconds") from None


def default_source_repository() -> Path:
    """The model repository shipped with the project (the image's copy), read-only to this script."""
    try:
        from wholebody.contract import MODEL_REPOSITORY
    except ImportError as exc:  # the project is not installed: nothing can be served
        raise EntrypointError(f"the wholebody package is not importable ({exc}); install the project") from exc
    return MODEL_REPOSITORY


def parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """The flags; each default comes from the `WHOLEBODY_*` variable named in its help."""

    def get(name: str, default: str = "") -> str:
        return env.get(name, default)

    def optional_path(name: str) -> Path | None:
        return Path(env[name]) if env.get(name) else None

    p = argparse.ArgumentParser(
        prog="deploy/entrypoint.py",
        description="Prepare a writable model repository, install the bundle, optionally build TensorRT "
        "plans, then exec the locked-down launcher (python -m wholebody.triton_server serve).",
        epilog="Flags override their environment variables. Exit status 2: a setting or a step failed "
        "(one line on stderr says which); otherwise the launcher's own.",
    )
    p.add_argument("--bundle", type=Path, default=optional_path("WHOLEBODY_BUNDLE"),
                   help="MONAI bundle directory (configs/inference.json, models/*.pt) [WHOLEBODY_BUNDLE]")
    p.add_argument("--download-bundle", action=argparse.BooleanOptionalAction,
                   default=_env_bool(get("WHOLEBODY_DOWNLOAD_BUNDLE", ""), "WHOLEBODY_DOWNLOAD_BUNDLE"),
                   help="without --bundle: fetch the released wholeBody_ct_segmentation with MONAI's bundle "
                   "download into --cache, verified; a failure stops the start [WHOLEBODY_DOWNLOAD_BUNDLE=1]")
    p.add_argument("--random-weights", action=argparse.BooleanOptionalAction,
                   default=_env_bool(get("WHOLEBODY_RANDOM_WEIGHTS", ""), "WHOLEBODY_RANDOM_WEIGHTS"),
                   help="without --bundle: random weights of the real architecture (smoke tests; labels mean "
                   "nothing); with --download-bundle, only if the download fails [WHOLEBODY_RANDOM_WEIGHTS=1]")
    p.add_argument("--cache", type=Path, default=Path(get("WHOLEBODY_BUNDLE_CACHE", str(DEFAULT_CACHE))),
                   help=f"where downloaded/random bundles are kept [WHOLEBODY_BUNDLE_CACHE, default {DEFAULT_CACHE}]")
    p.add_argument("--bundle-url", action="append", default=shlex.split(get("WHOLEBODY_BUNDLE_URL", "")) or None,
                   help="archive URL of the released bundle to try instead of MONAI's, e.g. a mirror "
                   "(repeatable) [WHOLEBODY_BUNDLE_URL, space-separated]")
    p.add_argument("--download-timeout", type=float, default=float(get("WHOLEBODY_DOWNLOAD_TIMEOUT", "20")),
                   help="seconds each network operation of the download may take [WHOLEBODY_DOWNLOAD_TIMEOUT]")
    p.add_argument("--model-repository", type=Path,
                   default=Path(get("WHOLEBODY_MODEL_REPOSITORY", str(DEFAULT_TARGET))),
                   help="writable folder the repository is prepared in and served from; replaced on every "
                   f"start if this script made it [WHOLEBODY_MODEL_REPOSITORY, default {DEFAULT_TARGET}]")
    p.add_argument("--source-repository", type=Path, default=optional_path("WHOLEBODY_SOURCE_REPOSITORY"),
                   help="the model repository to copy (configs and code) [WHOLEBODY_SOURCE_REPOSITORY, "
                   "default: the project's model_repository/]")
    p.add_argument("--config-name", default=get("WHOLEBODY_CONFIG_NAME", ""),
                   help="'' = each model's config.pbtxt (GPU), 'cpu' = configs/cpu.pbtxt "
                   "[WHOLEBODY_CONFIG_NAME, default '']")
    p.add_argument("--address", default=get("WHOLEBODY_ADDRESS", "127.0.0.1"),
                   help="address the server binds; in a pod 0.0.0.0 [WHOLEBODY_ADDRESS, default loopback]")
    p.add_argument("--grpc-port", type=int, default=int(get("WHOLEBODY_GRPC_PORT", "8001")),
                   help="[WHOLEBODY_GRPC_PORT]")
    p.add_argument("--http-port", type=int, default=int(get("WHOLEBODY_HTTP_PORT", "8000")),
                   help="[WHOLEBODY_HTTP_PORT]")
    p.add_argument("--metrics-port", type=int, default=int(get("WHOLEBODY_METRICS_PORT", "8002")),
                   help="Prometheus metrics [WHOLEBODY_METRICS_PORT]")
    p.add_argument("--log", default=get("WHOLEBODY_LOG", "-"), help="server log path, '-' = stdout [WHOLEBODY_LOG]")
    p.add_argument("--operator-key-file", type=Path, default=optional_path(DEFAULT_KEY_FILE_ENV),
                   help="file holding the operator key for the model-repository API (a mounted Secret); "
                   f"else the launcher reads WHOLEBODY_OPERATOR_KEY [{DEFAULT_KEY_FILE_ENV}]")
    p.add_argument("--tritonserver", type=Path, default=optional_path("WHOLEBODY_TRITONSERVER"),
                   help="tritonserver binary, e.g. /opt/tritonserver/bin/tritonserver in NVIDIA's image "
                   "[WHOLEBODY_TRITONSERVER, default: the launcher's own]")
    p.add_argument("--backend-directory", type=Path, default=optional_path("WHOLEBODY_BACKEND_DIRECTORY"),
                   help="Triton backends folder, e.g. /opt/tritonserver/backends [WHOLEBODY_BACKEND_DIRECTORY]")
    p.add_argument("--build-tensorrt", action=argparse.BooleanOptionalAction,
                   default=_env_bool(get("WHOLEBODY_BUILD_TENSORRT", "")),
                   help="build TensorRT plans at start with python -m export (GPU image with TensorRT only) "
                   "[WHOLEBODY_BUILD_TENSORRT=1]")
    p.add_argument("--export-args", default=get("WHOLEBODY_EXPORT_ARGS", ""),
                   help="more flags for python -m export, e.g. '--precision fp16' [WHOLEBODY_EXPORT_ARGS]")
    p.add_argument("--drain-seconds", type=float, default=optional_float(get("WHOLEBODY_DRAIN_SECONDS", "")),
                   help="on SIGTERM, how long scans in flight may take to finish while the server reports not "
                   "ready (the launcher's --drain-seconds; keep terminationGracePeriodSeconds above it) "
                   "[WHOLEBODY_DRAIN_SECONDS]")
    p.add_argument("--launcher-args", default=get("WHOLEBODY_LAUNCHER_ARGS", ""),
                   help="more flags for the launcher, appended last [WHOLEBODY_LAUNCHER_ARGS]")
    p.add_argument("--prepare-only", action="store_true",
                   help="prepare the repository and install the bundle, print the launcher command, exit 0")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    """Check the parsed flags; raises EntrypointError naming the flag/variable to fix."""
    if args.bundle is None and not (args.download_bundle or args.random_weights):
        raise EntrypointError("no bundle: pass --bundle DIR or set WHOLEBODY_BUNDLE (a mounted MONAI bundle folder), "
                              "or WHOLEBODY_DOWNLOAD_BUNDLE=1 to fetch the released one")
    if args.bundle is not None and args.random_weights:
        raise EntrypointError("--bundle and --random-weights together: choose one (WHOLEBODY_BUNDLE, "
                              "WHOLEBODY_RANDOM_WEIGHTS)")
    if args.bundle is not None and not (args.bundle / "configs" / "inference.json").is_file():
        raise EntrypointError(
            f"{args.bundle} is not a MONAI bundle (no configs/inference.json): mount the folder that "
            "`python -m monai.bundle download wholeBody_ct_segmentation` wrote, or fix WHOLEBODY_BUNDLE"
        )
    if args.operator_key_file is not None:
        key_file = args.operator_key_file
        if not key_file.is_file() or not key_file.read_text().strip():
            raise EntrypointError(f"operator key file {key_file} is missing or empty: mount the Secret or fix "
                                  f"--operator-key-file/{DEFAULT_KEY_FILE_ENV}")
    for name in ("grpc_port", "http_port", "metrics_port"):
        if not 0 < getattr(args, name) < 65536:
            raise EntrypointError(f"--{name.replace('_', '-')} {getattr(args, name)} is not a TCP port")
    if args.config_name not in ("", "cpu"):
        raise EntrypointError(f"--config-name {args.config_name!r}: use '' (GPU configs) or 'cpu'")
    return Settings(
        bundle=args.bundle,
        model_repository=args.model_repository,
        source_repository=args.source_repository or default_source_repository(),
        config_name=args.config_name,
        address=args.address,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        log=args.log,
        operator_key_file=args.operator_key_file,
        tritonserver=args.tritonserver,
        backend_directory=args.backend_directory,
        build_tensorrt=args.build_tensorrt,
        export_args=shlex.split(args.export_args),
        launcher_args=shlex.split(args.launcher_args),
        download_bundle=args.download_bundle,
        random_weights=args.random_weights,
        cache=args.cache,
        bundle_urls=args.bundle_url,
        download_timeout=args.download_timeout,
        drain_seconds=args.drain_seconds,
    )


def obtain_bundle(s: Settings) -> Settings:
    """`s` with its bundle: the given one, else the released one downloaded (and verified) or random weights.

    A failed download is one line: an error (exit 2), or with --random-weights a warning and the fallback.
    """
    if s.bundle is not None:
        return s
    from wholebody import bundle_download

    try:
        weights = bundle_download.choose_weights(
            s.cache, download=s.download_bundle, random_fallback=s.random_weights, urls=s.bundle_urls,
            expected_md5=bundle_download.RELEASED_MD5, timeout=s.download_timeout)
    except bundle_download.BundleDownloadError as exc:
        raise EntrypointError(f"released bundle not downloaded ({exc}): mount one (--bundle/WHOLEBODY_BUNDLE) or "
                              "add --random-weights/WHOLEBODY_RANDOM_WEIGHTS=1 for a smoke test") from exc
    except OSError as exc:
        raise EntrypointError(f"cannot write the bundle cache {s.cache}: {exc} (fix --cache/WHOLEBODY_BUNDLE_CACHE)")
    log.info("weights: %s", weights.description)
    return replace(s, bundle=weights.bundle)


def bundle_install_command(s: Settings) -> list[str]:
    return [s.python, "-m", "wholebody.bundle", "install", "--bundle", str(s.bundle),
            "--model-repository", str(s.model_repository)]


def export_command(s: Settings) -> list[str]:
    artifacts = s.model_repository.parent / "export-artifacts"
    return [s.python, "-m", "export", "--bundle", str(s.bundle), "--out", str(s.model_repository),
            "--artifacts", str(artifacts), *s.export_args]


def launcher_command(s: Settings) -> list[str]:
    """`python -m wholebody.triton_server serve ...` with every setting spelled out."""
    cmd = [
        s.python, "-m", "wholebody.triton_server", "serve",
        "--model-repository", str(s.model_repository),
        "--config-name", s.config_name,
        "--address", s.address,
        "--grpc-port", str(s.grpc_port),
        "--http-port", str(s.http_port),
        "--metrics-port", str(s.metrics_port),
        "--log", s.log,
    ]
    if s.tritonserver is not None:
        cmd += ["--tritonserver", str(s.tritonserver)]
    if s.backend_directory is not None:
        cmd += ["--backend-directory", str(s.backend_directory)]
    if s.operator_key_file is not None:
        cmd += ["--operator-key-file", str(s.operator_key_file)]
    if s.drain_seconds is not None:
        cmd += ["--drain-seconds", f"{s.drain_seconds:g}"]
    return cmd + s.launcher_args


def prepare_repository(source: Path, target: Path) -> None:
    """Copy `source` (configs and code, no weights) to `target`, replacing an earlier copy of ours.

    A container restart keeps its emptyDir, so the previous start's copy is replaced, never merged.
    A `target` this script did not make is refused rather than deleted.
    """
    from wholebody.atomic import atomic_path
    from wholebody.bundle import copy_model_repository

    if not (source / "wholebody_ct_segmentation" / "config.pbtxt").is_file():
        raise EntrypointError(f"{source} is not this project's model repository (no wholebody_ct_segmentation/)")
    if target.exists() and any(target.iterdir()):
        if not (target / MARKER).exists():
            raise EntrypointError(
                f"{target} exists and was not prepared by this script; point --model-repository/"
                "WHOLEBODY_MODEL_REPOSITORY at an empty or new folder"
            )
        shutil.rmtree(target)
    elif target.exists():
        target.rmdir()
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target, directory=True) as staging:  # a unique temporary beside it, renamed when complete
        staging.rmdir()  # copytree makes the folder itself (with the umask's mode)
        copy_model_repository(staging, source)
        (staging / MARKER).write_text(f"copied from {source}\n")


def run_step(name: str, cmd: Sequence[str]) -> None:
    """Run one step's command, its output going to the container log; raises EntrypointError."""
    log.info("%s: %s", name, shlex.join(cmd))
    started = time.monotonic()
    result = subprocess.run(list(cmd), check=False)
    if result.returncode != 0:
        raise EntrypointError(f"{name} failed with exit status {result.returncode} (its output is above): "
                              f"{shlex.join(cmd)}")
    log.info("%s: done in %.1f s", name, time.monotonic() - started)


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="entrypoint: %(message)s", stream=sys.stderr)
    env = os.environ if env is None else env
    try:
        args = parser(env).parse_args(argv)
        s = obtain_bundle(settings_from(args))
        prepare_repository(s.source_repository, s.model_repository)
        log.info("model repository %s prepared from %s", s.model_repository, s.source_repository)
        run_step("bundle install", bundle_install_command(s))
        if s.build_tensorrt:
            run_step("TensorRT export", export_command(s))
    except EntrypointError as exc:
        log.error("error: %s", exc)
        return 2
    except ValueError as exc:  # a WHOLEBODY_*_PORT that is not a number
        log.error("error: %s (check the WHOLEBODY_* environment variables)", exc)
        return 2
    except OSError as exc:  # e.g. the repository's folder is read-only or is itself a mount point
        log.error("error: cannot prepare the model repository: %s (mount a writable volume above "
                  "--model-repository/WHOLEBODY_MODEL_REPOSITORY)", exc)
        return 2
    cmd = launcher_command(s)
    if args.prepare_only:
        print(shlex.join(cmd))
        return 0
    log.info("exec %s", shlex.join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)  # never returns: this PID becomes the launcher and receives SIGTERM


if __name__ == "__main__":
    sys.exit(main())
