"""`python -m wholebody.triton_server install|serve`: the launcher's command line.

SIGTERM or SIGINT drains the server (`LocalTritonServer.drain`: not ready, no new scans, those in flight
finish within `--drain-seconds`), then stops it and every Python backend stub (TERM, then KILL after a
grace period) and removes the stubs' /dev/shm regions.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import time
from pathlib import Path

from wholebody.contract import MODEL_REPOSITORY
from wholebody.served_models import models_to_load, models_with_config
from wholebody.triton_server.install import install_tritonserver
from wholebody.triton_server.local import DEFAULT_DRAIN_S, LocalTritonServer
from wholebody.triton_server.locks import OPERATOR_KEY_ENV, resolve_operator_key
from wholebody.triton_server.perf_analyzer import install_perf_analyzer
from wholebody.triton_server.ports import PortInUseError

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised in the main thread by SIGTERM/SIGINT."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def _drain(server: LocalTritonServer, seconds: float) -> None:
    """`server.drain(seconds)`; a server that cannot be drained (it died, or refuses) is stopped anyway."""
    from tritonclient.utils import InferenceServerException

    started = time.monotonic()
    try:
        finished = server.drain(seconds)
    except InferenceServerException as exc:
        log.warning("drain: %s; stopping without it", exc.message())
        return
    log.info("drain: %s in %.1f s", "done" if finished else "timed out", time.monotonic() - started)


def serve(args: argparse.Namespace) -> int:
    """`serve`: run the locked server until SIGTERM/SIGINT (then drain and stop) or until it exits by itself.

    Returns the exit status: 0 after a signal, 1 when tritonserver failed or exited, 2 for a bad operator key.
    """
    # A background job starts with SIGINT ignored, and SIGTERM kills Python without cleanup: own both.
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        key, generated = resolve_operator_key(args.operator_key_file)
    except (OSError, ValueError) as exc:
        log.error("error: operator key: %s", exc)
        return 2
    config_name = args.config_name or None
    # Without --model: every model of the config, less the torch network models when the sliding-window
    # stage runs the network in-process (the CPU default): they would only be idle stubs.
    models = args.models or models_to_load(
        args.model_repository, config_name, models_with_config(args.model_repository, config_name)
    )
    server = LocalTritonServer(
        model_repository=args.model_repository,
        config_name=config_name,
        models=models,
        address=args.address,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        log_path=args.log,
        tritonserver=args.tritonserver,
        backend_directory=args.backend_directory,
        operator_key=key,
        watchdog=not args.no_watchdog,
        max_idle_pool_bytes=args.max_idle_pool_mb * 2**20,
        verbose=args.verbose,
        extra_args=args.tritonserver_arg,
    )
    code = 0
    stopping = False
    try:
        server.start()
        where = f"key file {generated}" if generated else (args.operator_key_file or f"${OPERATOR_KEY_ENV}")
        log.info(
            "serving %s on grpc %s, http %s, metrics %s; operator key: %s; watchdog %s; SIGTERM or Ctrl-C stops",
            args.model_repository, server.grpc_url, server.http_url, server.metrics_url, where,
            "off" if args.no_watchdog else "on",
        )
        assert server.process is not None
        code = server.process.wait()
        log.error("tritonserver exited by itself with code %s", code)
        code = code or 1
    except _Stop as stop:
        log.info("%s: draining, then stopping tritonserver and its stubs", stop)
        stopping = True
    except (PortInUseError, RuntimeError, TimeoutError, ValueError) as exc:
        log.error("error: %s", exc)
        code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not interrupt the cleanup
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if stopping and args.drain_seconds > 0:
            _drain(server, args.drain_seconds)
        server.stop()
        if generated is not None:
            shutil.rmtree(generated.parent, ignore_errors=True)
    return code


def build_parser() -> argparse.ArgumentParser:
    """The CLI's parser (subcommands install and serve); tests/test_docs.py parses the docs' commands with it."""
    parser = argparse.ArgumentParser(
        prog="python -m wholebody.triton_server",
        description="Fetch and run a local Triton server serving the model repository, locked down: "
        "clients may infer, read metadata/config/statistics and (on loopback) use shared memory; loading, "
        "unloading and uploading models need the operator key.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="fetch tritonserver and perf_analyzer into the cache folder")
    serve_parser = sub.add_parser(
        "serve",
        help="serve the model repository until SIGTERM or Ctrl-C",
        description="Serve the model repository until SIGTERM or Ctrl-C, then stop the server and every "
        "stub and remove their shared memory. An operator reloads a model with the key, e.g. "
        "tritonclient.grpc.InferenceServerClient(URL).load_model(NAME, "
        "headers={'triton-grpc-protocol-operator-key': KEY}) or "
        "curl -X POST -H 'operator-key: KEY' http://HOST:8000/v2/repository/models/NAME/load",
    )
    serve_parser.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY)
    serve_parser.add_argument(
        "--config-name", default="cpu",
        help="per-model config to load from configs/NAME.pbtxt ('' = each model's config.pbtxt: the GPU configs)",
    )
    serve_parser.add_argument("--model", action="append", dest="models", help="load only this model (repeatable)")
    serve_parser.add_argument(
        "--address", default="127.0.0.1", help="address to listen on (default loopback; 0.0.0.0 in a container)"
    )
    serve_parser.add_argument("--grpc-port", type=int, default=8001, help="0 = any free port")
    serve_parser.add_argument("--http-port", type=int, default=8000, help="0 = any free port")
    serve_parser.add_argument("--metrics-port", type=int, default=8002, help="0 = any free port")
    serve_parser.add_argument("--log", default="-", help="server log file, appended to ('-' = stdout, the default)")
    serve_parser.add_argument(
        "--tritonserver", type=Path, help="server binary (default: the one unpacked from nvidia-pytriton into "
        "the cache; in NVIDIA's container /opt/tritonserver/bin/tritonserver)",
    )
    serve_parser.add_argument(
        "--backend-directory", type=Path, help="backends folder (default: next to --tritonserver's bin/, else the "
        "cached one; in NVIDIA's container /opt/tritonserver/backends)",
    )
    serve_parser.add_argument(
        "--operator-key-file", type=Path,
        help=f"file holding the operator key (created with a new key, mode 0600, when missing); ${OPERATOR_KEY_ENV} "
        "takes precedence; neither: a new key in a private temporary file whose path is logged",
    )
    serve_parser.add_argument(
        "--no-watchdog", action="store_true",
        help="do not reload a model whose Python stub died (the health command then fails: let the "
        "orchestrator restart the server)",
    )
    serve_parser.add_argument(
        "--max-idle-pool-mb", type=int, default=64,
        help="the watchdog reloads a model whose stub keeps a shared-memory pool above this while the server "
        "is idle (a pool grows to the largest request and never shrinks; default 64)",
    )
    serve_parser.add_argument(
        "--drain-seconds", type=float, default=DEFAULT_DRAIN_S,
        help="on SIGTERM or Ctrl-C: the server first reports not ready and takes no new scans, and the scans in "
        f"flight have this long to finish before tritonserver is stopped (default {DEFAULT_DRAIN_S:.0f}; 0 = stop "
        "at once); then tritonserver's own exit timeout (10 s) and the stubs' stop (up to 20 s) follow",
    )
    serve_parser.add_argument("--verbose", action="store_true", help="tritonserver --log-verbose=1")
    serve_parser.add_argument(
        "--tritonserver-arg", action="append", default=[], metavar="FLAG",
        help="an extra tritonserver flag, e.g. --tritonserver-arg=--cuda-memory-pool-byte-size=0:8589934592 "
        "(repeatable; flags of the locks are refused)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m wholebody.triton_server install|serve ...`; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.command == "install":
        install = install_tritonserver()
        binary = install_perf_analyzer()
        print(f"tritonserver:  {install.tritonserver}\nperf_analyzer: {binary}")
        return 0
    return serve(args)
