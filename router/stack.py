"""`python -m router stack`: the whole local flow on loopback in one command.

Brings up, in this order: a local Triton (wholebody.triton_server.LocalTritonServer, the launcher `serve`
runs), a local Orthanc (router.orthanc.OrthancNode: DICOM port for the modalities, REST and DICOMweb), and
the router (router.service.Router) between them; prints the addresses; Ctrl-C or SIGTERM stops the router
first, then Orthanc and Triton, each with its process group (no orphans). Orthanc's storage and the
router's state live under `--state-dir` and survive the stack.

Before anything starts, `preflight` checks what the parts would need and fails in a fraction of a second
with one line naming the fix: the bundle's weights in every PyTorch network model the local Triton would
load (without them Triton itself gives up only after ~35 s on the 2-core box), Orthanc's binaries, and
Orthanc's ports.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from router.orthanc import DICOMWEB_PLUGIN, INSTALL_HINT, ORTHANC, Modality, OrthancNode, merge_config
from router.service import Router, RouterConfig
from router.state import StateStore

log = logging.getLogger(__name__)


@dataclass
class StackOptions:
    state_dir: Path
    router: RouterConfig  # orthanc_url and triton_urls are filled in by the stack
    dicom_port: int = 4242
    http_port: int = 8042
    aet: str = "WHOLEBODY"
    sender_aet: str = "STORESCU"
    stable_age_s: int = 10
    pacs: Modality | None = None  # forward results there (registered as modality "pacs")
    model_repository: Path | None = None  # None: the project's model_repository/
    triton_url: str | None = None  # an already running Triton (host:port): none is started
    # the OHIF viewer (viewer/): built once under this cache and served by Orthanc at /viewer/ (ServeFolders,
    # the same origin as DICOMweb); None: no viewer
    viewer_cache: Path | None = None
    orthanc_extra: dict[str, object] = field(default_factory=dict)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


WEIGHTS_HINT = ("install the bundle: `python -m wholebody.bundle install --bundle DIR`, or random weights of the real "
                "architecture: `python -m wholebody.bundle make-test --out .cache/test-bundle --init-filters 8` then "
                "`python -m wholebody.bundle install --bundle .cache/test-bundle` (docs/hospital-flow.md)")


def missing_weights(model_repository: Path, models: list[str], config_name: str | None) -> list[str]:
    """The PyTorch network models among `models` whose version folder `1/` lacks the installed bundle:
    `network_def.json` and the checkpoint their config (`configs/<config_name>.pbtxt` where it exists, as
    Triton reads it) names. The same files wholebody.torch_network needs at load, read without torch (whose
    import alone takes seconds here). Raises OSError / text_format.ParseError for an unreadable config."""
    from wholebody.served_models import config_parameters, config_path, holds_bundle, is_torch_network_model

    missing = []
    for name in models:
        if not is_torch_network_model(name):
            continue
        model_dir = Path(model_repository) / name
        checkpoint = config_parameters(config_path(model_dir, config_name)).get("checkpoint", "")
        if not holds_bundle(model_dir / "1", checkpoint):
            missing.append(name)
    return missing


def preflight(options: StackOptions) -> None:
    """Check, without starting anything, what `run_stack` would need: the weights of the local Triton's
    network models (when no `triton_url` is given), Orthanc and its DICOMweb plugin, and Orthanc's ports
    free (a port 0 is any free one). Raises RuntimeError with one line naming the file or port and the fix."""
    for path in (ORTHANC, DICOMWEB_PLUGIN):
        if not Path(path).exists():
            raise RuntimeError(f"{path} is missing: {INSTALL_HINT}")
    from wholebody.triton_server.ports import PortInUseError, check_port_free

    for role, port in (("http", options.http_port), ("dicom", options.dicom_port)):
        if port:
            try:
                check_port_free("0.0.0.0", port, role)  # Orthanc 1.10 listens on every interface
            except PortInUseError as exc:
                raise RuntimeError(f"Orthanc's {exc}") from None
    if options.triton_url is not None:
        return
    from wholebody.served_models import models_with_config
    from wholebody.triton_server.local import LocalTritonServer

    kwargs = {"model_repository": options.model_repository} if options.model_repository else {}
    server = LocalTritonServer(**kwargs)  # type: ignore[arg-type]  # not started: what it would load
    repository = Path(server.model_repository)
    if not repository.is_dir():
        raise RuntimeError(f"{repository}: no model repository there; give --model-repository (default: the "
                           "project's model_repository/) or -u HOST:PORT of a running Triton")
    models = server.models if server.models is not None else models_with_config(repository, server.config_name)
    missing = missing_weights(repository, models, server.config_name)
    if missing:
        names = ", ".join(missing)
        raise RuntimeError(f"{repository}: no weights in {names} (1/network_def.json and the checkpoint); "
                           f"{WEIGHTS_HINT}")


def run_stack(options: StackOptions, ready: Callable[[dict[str, str]], None] | None = None) -> int:
    """Start Triton, Orthanc and the router; call `ready(addresses)` (default: print them); block until
    Ctrl-C / SIGTERM; stop everything. Returns 0. Raises RuntimeError when `preflight` finds a part that
    cannot start (nothing is started then) or a part does not start."""
    preflight(options)
    options.state_dir.mkdir(parents=True, exist_ok=True)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
    with ExitStack() as stack:
        try:
            if options.triton_url is None:
                from wholebody.triton_server import LocalTritonServer

                kwargs = {"model_repository": options.model_repository} if options.model_repository else {}
                triton = stack.enter_context(LocalTritonServer(watchdog=True, **kwargs))  # type: ignore[arg-type]
                triton_url = triton.grpc_url
            else:
                triton_url = options.triton_url
            extra = dict(options.orthanc_extra)
            if options.viewer_cache is not None:
                from viewer import ensure_viewer, orthanc_settings

                extra = merge_config(extra, orthanc_settings(ensure_viewer(options.viewer_cache)))
            node = OrthancNode(
                aet=options.aet, http_port=options.http_port, dicom_port=options.dicom_port,
                storage=options.state_dir / "orthanc", stable_age_s=options.stable_age_s,
                senders={"scanner": Modality(options.sender_aet, "127.0.0.1", 104)},
                pacs={"pacs": options.pacs} if options.pacs else {}, extra=extra)
            stack.enter_context(node)
            config = options.router
            config.orthanc_url, config.triton_urls = node.url, [triton_url]
            config.pacs = "pacs" if options.pacs else None
            router = Router(config)
            router.start()
            stack.callback(router.stop)
            addresses = {
                "DICOM (C-STORE here)": f"{node.aet}@127.0.0.1:{node.dicom_port} (from AE title {options.sender_aet})",
                "Orthanc REST": node.url, "DICOMweb": node.dicomweb, "Triton gRPC": triton_url,
                "router status": str(config.status_path),
                "forward to": f"{options.pacs.aet}@{options.pacs.host}:{options.pacs.port}" if options.pacs else "-",
            }
            if options.viewer_cache is not None:
                addresses["viewer"] = f"{node.url}/viewer/ (each segmented study's page is printed when it is done)"
            (ready or _print_addresses)(addresses)
            shown: set[str] = set()
            while not router.stopping:
                threading.Event().wait(0.5)
                if options.viewer_cache is not None and ready is None:
                    _print_new_studies(config, node.url, shown)
        except KeyboardInterrupt:
            log.info("stopping the stack")
    return 0


def _print_new_studies(config: RouterConfig, orthanc_url: str, shown: set[str]) -> None:
    """Print the viewer page of each series that became done or held since the last call."""
    from viewer import study_url

    with StateStore(config.state_path) as store:
        rows = [r for r in store.rows() if r.status in ("done", "held") and r.orthanc_id not in shown]
    for row in rows:
        shown.add(row.orthanc_id)
        print(f"{row.status}: series {row.series_uid} -> {study_url(orthanc_url, row.study_uid)}", flush=True)


def _print_addresses(addresses: dict[str, str]) -> None:
    width = max(len(k) for k in addresses)
    for key, value in addresses.items():
        print(f"{key:{width}}  {value}")
    print("Ctrl-C stops everything.", flush=True)
    sys.stdout.flush()
