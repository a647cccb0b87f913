"""The ASGI app uvicorn serves (`monailabel start_server --uvicorn_app slicer.monailabel_app.guard:app`):
MONAI Label's own FastAPI app behind this project's locks (docs/slicer.md, security):

- a bearer token when $WHOLEBODY_MONAILABEL_TOKEN is set (slicer/serve.py requires one off loopback): every
  request needs `Authorization: Bearer <token>`; `GET /auth/` says auth is on, and `POST /auth/token` (what the
  Slicer module sends with the user name and password it asks for) returns the token when the password is it;
- request bodies above $WHOLEBODY_MONAILABEL_MAX_BODY_BYTES (from the ensemble's max_input_voxels) refused
  with 413 before they are read, and chunked bodies without a length with 411;
- requests a web browser sends for a page (an Origin header), and on loopback a Host header that does not name
  this server (DNS rebinding), refused with 403: a web page the user visits must not reach it;
- the routes that would change the server (model uploads, reload) or reach beyond it (DICOMweb proxy, log
  files) refused with 403 (slicer.protocol.REFUSED_ROUTES).

MONAI Label's own auth (MONAI_LABEL_AUTH_ENABLE) needs a Keycloak realm; this needs nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

from monailabel.app import app as monailabel_app

from slicer import protocol

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

TOKEN = os.environ.get(protocol.TOKEN_ENV) or None
MAX_BODY = int(os.environ.get(protocol.MAX_BODY_ENV) or 0) or None
HOSTS = [h.strip().lower() for h in os.environ[protocol.HOSTS_ENV].split(",")] if os.environ.get(protocol.HOSTS_ENV) \
    else None
MAX_LOGIN_BYTES = 4096  # the form of POST /auth/token


async def _params_not_json(request: Any, exc: json.JSONDecodeError) -> Any:
    """MONAI Label's endpoints json.loads the `params` form field as they are; a caller's broken JSON would be a
    500 with a traceback in the log. It is the caller's fault: 400, one line."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"detail": f"params is not JSON ({exc.msg} at character {exc.pos}); send a JSON object"},
                        status_code=400)


monailabel_app.add_exception_handler(json.JSONDecodeError, _params_not_json)


async def _answer(send: Send, status: int, body: dict, extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": data})


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > limit:
            return None
        if not message.get("more_body"):
            return body


async def _login(receive: Receive, send: Send) -> None:
    """POST /auth/token: form username, password -> {"access_token", "token_type"} when the password is the token."""
    body = await _read_body(receive, MAX_LOGIN_BYTES)
    if TOKEN is None:
        return await _answer(send, 404, {"detail": "auth is off: this server listens on loopback without a token"})
    form = parse_qs((body or b"").decode("latin-1"))
    password = (form.get("password") or [""])[0]
    if not protocol.authorized(f"Bearer {password}", TOKEN):
        return await _answer(send, 401, {"detail": "wrong token: give the server's token as the password"})
    await _answer(send, 200, {"access_token": TOKEN, "token_type": "bearer"})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        return await monailabel_app(scope, receive, send)
    if scope["type"] != "http":
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        return None
    method, path = scope["method"], scope["path"]
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    browser = protocol.browser_refusal(headers.get("host"), headers.get("origin"), HOSTS)
    if browser:
        return await _answer(send, 403, {"detail": browser})
    if path.rstrip("/") == "/auth" and method == "GET":
        return await _answer(send, 200, {"enabled": TOKEN is not None, "client_id": "wholebody-ct-triton"})
    if path.rstrip("/") == "/auth/token" and method == "POST":
        return await _login(receive, send)
    if TOKEN is not None and not protocol.authorized(headers.get("authorization"), TOKEN):
        return await _answer(send, 401, {"detail": "send Authorization: Bearer <token> (the server's token)"},
                             ((b"www-authenticate", b"Bearer"),))
    if path.rstrip("/") == "/auth/token/valid":
        return await _answer(send, 200, {"valid": True})
    reason = protocol.refused_route(method, path)
    if reason:
        return await _answer(send, 403, {"detail": reason})
    if path.startswith("/infer") and "dicom_seg" in parse_qs(scope.get("query_string", b"").decode("latin-1")).get(
            "output", []):  # MONAI Label answers it with a 500: it makes DICOM-SEG only from a DICOMweb datastore
        return await _answer(send, 400, {"detail": "output=dicom_seg needs a DICOMweb datastore; ask for output=image "
                                                   "or all, or use python -m client --output-type dicom-seg"})
    refusal = protocol.body_refusal(method, headers.get("content-length"),
                                    "chunked" in headers.get("transfer-encoding", "").lower(), MAX_BODY)
    if refusal:
        return await _answer(send, refusal[0], {"detail": refusal[1]}, ((b"connection", b"close"),))
    return await monailabel_app(scope, receive, send)
