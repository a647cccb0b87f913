"""Calls of MONAI Label's own Python client (`monailabel.client.MONAILabelClient`, the code 3D Slicer's MONAI
Label module uses) for tests/test_monailabel.py and perf/slicer_overhead.py, run by the interpreter of MONAI
Label's virtualenv (slicer/venv.py): monailabel cannot be imported in the project's environment (pydicom < 3,
numpy < 2). Standard library and monailabel only.

stdin: {"url": "http://127.0.0.1:PORT", "token": null | "...", "login": null | [user, password],
        "calls": [{"method": "info"} | {"method": "upload_image", "file": F, "image_id": ID} |
                  {"method": "create_session", "file": F} |
                  {"method": "infer", "model": M, "image_id": ID, "session_id": S, "file": F, "params": {...},
                   "out": PATH}, ...]}
stdout: one JSON list, per call {"ok": true, "result": ...} or {"ok": false, "status": HTTP status or null,
        "error": one line}, each with "seconds" (wall time of the call). An infer's label file is moved to the
        call's "out".
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
import time
from typing import Any

from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException


def _status(exc: Exception) -> int | None:
    code = getattr(exc, "status_code", None)
    if code:
        return int(code)
    found = re.search(r"Status: (\d+)", str(getattr(exc, "msg", "")) + str(exc))
    return int(found.group(1)) if found else None


def call(client: MONAILabelClient, spec: dict[str, Any]) -> dict[str, Any]:
    method = spec["method"]
    try:
        if method == "info":
            return {"ok": True, "result": client.info()}
        if method == "upload_image":
            return {"ok": True, "result": client.upload_image(spec["file"], spec.get("image_id"))}
        if method == "create_session":
            return {"ok": True, "result": client.create_session(spec["file"])}
        if method == "infer":
            label, params = client.infer(spec["model"], spec.get("image_id", ""), spec.get("params") or {},
                                         file=spec.get("file"), session_id=spec.get("session_id"))
            if label and spec.get("out"):
                shutil.move(label, spec["out"])
            return {"ok": True, "result": params, "label": spec.get("out") if label else None}
        raise ValueError(f"unknown method {method!r}")
    except MONAILabelClientException as exc:
        return {"ok": False, "status": _status(exc), "error": str(exc.msg)[:500]}


def main() -> int:
    request = json.load(sys.stdin)
    with tempfile.TemporaryDirectory(prefix="monailabel_calls_") as tmp:
        client = MONAILabelClient(request["url"], tmpdir=tmp)
        if request.get("login"):
            user, password = request["login"]
            client.update_auth(client.auth_token(user, password))
        elif request.get("token"):
            client.update_auth({"token_type": "Bearer", "access_token": request["token"]})
        results = []
        for spec in request["calls"]:
            start = time.perf_counter()
            outcome = call(client, spec)
            outcome["seconds"] = time.perf_counter() - start
            results.append(outcome)
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
