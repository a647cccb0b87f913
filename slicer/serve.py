"""Start MONAI Label's own server with this project's app, locked, in front of a Triton server:

    make monailabel                                         # its virtualenv, once (python -m slicer.venv)
    python -m slicer.serve --studies DIR                    # http://127.0.0.1:8000, Triton at localhost:8001
    WHOLEBODY_MONAILABEL_TOKEN=... python -m slicer.serve --studies DIR --host 0.0.0.0

It reads the ensemble's size limits from the Triton server (client.limits(); it must answer), then replaces
itself with `monailabel start_server --app <work>/app --studies DIR --uvicorn_app
slicer.monailabel_app.guard:app ...` (as `python -m monailabel.main`, what the `monailabel` command runs) in
the virtualenv, <work>/app holding a copy of slicer/monailabel_app/main.py and the repository on PYTHONPATH
(the app imports the project's client library from it). Locks (docs/slicer.md): loopback unless --host says
otherwise, and then only with a token ($WHOLEBODY_MONAILABEL_TOKEN or --token-file); requests of web pages
refused; request bodies capped from max_input_voxels; MONAI Label's training, scoring, strategy and
batch-infer tasks off.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from client.segmentation_client import SegmentationClient, SegmentationError
from slicer import protocol
from slicer.venv import REPO, default_cache, ready_python
from wholebody.triton_server.locks import is_loopback
from wholebody.triton_server.ports import free_port

log = logging.getLogger("slicer.serve")

APP_DIR = Path(__file__).resolve().parent / "monailabel_app"
GUARD_APP = "slicer.monailabel_app.guard:app"
LIMITS_TIMEOUT_S = 30.0
# MONAI Label tasks this app does not offer (it only infers), off so that their routes do nothing
TASKS_OFF = ("MONAI_LABEL_TASKS_TRAIN", "MONAI_LABEL_TASKS_STRATEGY", "MONAI_LABEL_TASKS_SCORING",
             "MONAI_LABEL_TASKS_BATCH_INFER", "MONAI_LABEL_AUTH_ENABLE")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m slicer.serve", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-s", "--studies", type=Path, required=True,
                        help="MONAI Label's datastore: a folder of NIfTI CTs (made when missing)")
    parser.add_argument("-u", "--url", default="localhost:8001", help="Triton gRPC endpoint (default: localhost:8001)")
    parser.add_argument("-i", "--host", default="127.0.0.1",
                        help="address to listen on (default: loopback; another one needs a token)")
    parser.add_argument("-p", "--port", type=int, default=8000,
                        help="port (default: 8000, MONAI Label's; also Triton's HTTP port under `make serve`: "
                             "choose another, e.g. 8010, there)")
    parser.add_argument("--token-file", type=Path, default=None,
                        help=f"file holding the bearer token (default: ${protocol.TOKEN_ENV})")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="the server's own files: app/ (a copy of slicer/monailabel_app with MONAI Label's logs), "
                             "sessions/ (uploaded volumes) and tmp/ (its temporary files); default: "
                             "<cache>/monailabel/work")
    parser.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                        help="limit per inference request to Triton (default: 3600)")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of starting it")
    return parser


def read_token(path: Path | None) -> str | None:
    """The token of `path`, else $WHOLEBODY_MONAILABEL_TOKEN, else None. Raises ValueError for an empty
    file, one with spaces, or one that other users may read or write (as ssh refuses such a key); OSError
    for a file that cannot be read."""
    if path is None:
        return os.environ.get(protocol.TOKEN_ENV) or None
    if not path.is_file():
        raise ValueError(f"{path}: no such token file; write one: `python -c 'import secrets; "
                         f"print(secrets.token_urlsafe(32))' > {path} && chmod 600 {path}`")
    if os.name == "posix" and path.stat().st_mode & 0o077:
        raise ValueError(f"{path}: readable by other users, who could then use the server; chmod 600 {path}")
    token = path.read_text().strip()
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"{path}: the token must be one word; write e.g. `python -c 'import secrets; "
                         f"print(secrets.token_urlsafe(32))' > {path}`")
    return token


def prepare_work_dir(work: Path) -> Path:
    """Make `work`/{app,sessions,tmp} and copy the app's main.py into app/ (MONAI Label writes its model/,
    logs/, lib/ and bin/ folders into the app folder: not into the repository). Returns the app folder."""
    app = work / "app"
    for folder in (app, work / "sessions", work / "tmp"):
        folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(APP_DIR / "main.py", app / "main.py")
    return app


def command(args: argparse.Namespace, python: Path, app: Path) -> list[str]:
    """monailabel start_server's command line for `args`: what the virtualenv's `monailabel` console script runs
    (`python -m monailabel.main`), without that bash script, which splits arguments with spaces."""
    return [str(python), "-m", "monailabel.main", "start_server", "--app", str(app),
            "--studies", str(args.studies.resolve()), "--host", args.host, "--port", str(args.port),
            "--uvicorn_app", GUARD_APP, "--conf", "triton_url", args.url, "--conf", "timeout_s", str(args.timeout)]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.studies.exists() and not args.studies.is_dir():
        log.error("error: --studies %s is a file; give the folder of NIfTI CTs (made when missing)", args.studies)
        return 2
    if not 0 < args.port < 65536:
        log.error("error: --port %d is not a TCP port; give one in 1..65535 (e.g. 8010)", args.port)
        return 2
    try:
        token = read_token(args.token_file)
    except (OSError, ValueError) as exc:
        log.error("error: %s", exc)
        return 2
    if not is_loopback(args.host) and token is None:
        log.error("error: --host %s is beyond loopback: set %s or --token-file (clients send it as a bearer "
                  "token; Slicer: as the password)", args.host, protocol.TOKEN_ENV)
        return 2
    python = ready_python()
    if python is None:
        log.error("error: MONAI Label's virtualenv is not made: run `make monailabel` (python -m slicer.venv)")
        return 2
    try:
        with SegmentationClient(args.url, timeout_s=LIMITS_TIMEOUT_S) as seg:
            seg.check_ready()
            limits = seg.limits()
    except SegmentationError as exc:
        log.error("error: %s", exc)
        return 1
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    work = (args.work_dir or default_cache() / "monailabel" / "work").resolve()
    env["MONAI_LABEL_SESSION_PATH"] = str(work / "sessions")
    env["TMPDIR"] = str(work / "tmp")  # uploads, the log config and results live there, not in /tmp
    env.update({key: "false" for key in TASKS_OFF})
    env.pop(protocol.TOKEN_ENV, None)
    if token is not None:
        env[protocol.TOKEN_ENV] = token
    env.pop(protocol.HOSTS_ENV, None)
    if is_loopback(args.host):
        env[protocol.HOSTS_ENV] = ",".join(protocol.loopback_hosts(args.port, args.host))
    body = protocol.max_body_bytes(limits)
    if body is not None:
        env[protocol.MAX_BODY_ENV] = str(body)
    if args.dry_run:
        print(" ".join(command(args, python, work / "app")))
        return 0
    cmd = command(args, python, prepare_work_dir(work))
    log.info("MONAI Label on http://%s:%d (Triton %s, body limit %s bytes, token %s)", args.host, args.port, args.url,
             body, "on" if token else "off")
    args.studies.mkdir(parents=True, exist_ok=True)
    os.execve(cmd[0], cmd, env)
    return 0  # not reached


CALLS_SCRIPT = Path(__file__).resolve().parent / "monailabel_calls.py"
START_TIMEOUT_S = 300.0  # MONAI Label imports torch, MONAI, ITK and more; minutes on a loaded 2-core box


class MonaiLabelServer:
    """`python -m slicer.serve` as a child process on a free loopback port, for tests and benchmarks:

        with MonaiLabelServer(studies, work_dir, triton_url, token="...") as ml:
            ml.calls([{"method": "info"}])

    Its output goes to `work_dir`/server.log. On exit: SIGTERM to its process group, SIGKILL after 30 s.
    Raises RuntimeError (with the log's tail) when it exits or does not answer GET /info/ within `timeout_s`.
    """

    def __init__(self, studies: Path, work_dir: Path, triton_url: str, token: str | None = None,
                 timeout_s: float = START_TIMEOUT_S) -> None:
        self.studies, self.work_dir, self.triton_url = Path(studies), Path(work_dir), triton_url
        self.token, self.timeout_s = token, timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        python = ready_python()
        if python is None:
            raise RuntimeError("MONAI Label's virtualenv is not made: run `make monailabel` (python -m slicer.venv)")
        self.python = python
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> MonaiLabelServer:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.pop(protocol.TOKEN_ENV, None)
        if self.token:
            env[protocol.TOKEN_ENV] = self.token
        with open(self.work_dir / "server.log", "wb") as log_file:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "slicer.serve", "--studies", str(self.studies), "--work-dir", str(self.work_dir),
                 "-u", self.triton_url, "--port", str(self.port)],
                cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return (self.work_dir / "server.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        assert self._process is not None
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        deadline = time.monotonic() + self.timeout_s
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"MONAI Label exited with {self._process.returncode}: {self.log_tail()}")
            try:
                if self.raw("GET", "/info/", headers)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"MONAI Label did not answer in {self.timeout_s:.0f} s: {self.log_tail()}")
            time.sleep(1.0)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            if process.poll() is not None:
                break
            try:
                os.killpg(process.pid, sig)
                process.wait(timeout=wait)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass

    def raw(self, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
        """Status and JSON of a request without a body, sent with http.client (headers exactly as given)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.putrequest(method, path, skip_host="host" in {k.lower() for k in headers or {}})
            for key, value in (headers or {}).items():
                conn.putheader(key, value)
            conn.endheaders()
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        try:
            return response.status, json.loads(body or b"{}")
        except ValueError:
            return response.status, {"raw": body[:200].decode("latin-1")}

    def calls(self, calls: list[dict[str, Any]], token: str | None = None, login: list[str] | None = None,
              timeout_s: float = 3600.0) -> list[dict[str, Any]]:
        """MONAILabelClient's answers to `calls` (slicer/monailabel_calls.py, run in MONAI Label's virtualenv);
        `token` defaults to the server's. Raises RuntimeError when the script fails."""
        request = {"url": self.url, "token": token if token is not None else self.token, "login": login,
                   "calls": calls}
        done = subprocess.run([str(self.python), str(CALLS_SCRIPT)], input=json.dumps(request), capture_output=True,
                              text=True, timeout=timeout_s, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{CALLS_SCRIPT.name} failed: {done.stderr.strip()[-2000:]}")
        return json.loads(done.stdout)


if __name__ == "__main__":
    sys.exit(main())
