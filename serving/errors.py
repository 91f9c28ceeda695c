"""The app's error responses: every 4xx/5xx is one JSON body ``{"error": {field, reason, status}}``
(:class:`serving.schemas.ErrorResponse`), whether FastAPI's validation, an unknown route, a request
body over the limit (:class:`BodyLimit`, 413) or a :class:`serving.codec.BadInput` of a model replica.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from latentforge.serving.codec import BadInput
from latentforge.serving.schemas import Limits


def error_response(status: int, field: str, reason: str, headers: dict | None = None) -> JSONResponse:
    """The JSON error body for ``status``, naming the request ``field`` and the ``reason``."""
    return JSONResponse(BadInput(field, reason, status).body(), status_code=status, headers=headers)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's request validation: 400 for a body that is not JSON, else 422 naming the first bad field."""
    first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid request", "type": ""}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    field = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc).lstrip(".") or "body"
    if first.get("type") == "json_invalid":
        return error_response(400, "body", f"not valid JSON ({first.get('ctx', {}).get('error', first.get('msg'))})")
    return error_response(422, field, str(first.get("msg")))


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's HTTP errors (an unknown route: 404, a wrong method: 405) as the JSON error body, with
    the exception's headers (a 405's ``Allow``: the methods the path takes, RFC 9110)."""
    return error_response(exc.status_code, "path", f"{exc.detail}: {request.method} {request.url.path}", exc.headers)


# Set by the ingress replica at start (set_body_limit). A module global, not ``api.state``: Serve ships
# the FastAPI app to the replica as a pickled copy, while this module (and so this dict and BodyLimit)
# is imported there.
BODY_LIMIT = {"max_body_bytes": Limits().max_body_bytes}


def set_body_limit(max_body_bytes: int) -> None:
    """The request body size over which :class:`BodyLimit` answers 413, in this process."""
    BODY_LIMIT["max_body_bytes"] = max_body_bytes


class BodyLimit:
    """ASGI middleware: a request body over ``max_body_bytes`` gets a 413 before any route reads it
    (announced by Content-Length or counted as it streams)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = BODY_LIMIT["max_body_bytes"]
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_big = length is not None and length.isdigit() and int(length) > limit
        chunks, size, more = [], 0, not too_big
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            too_big = size > limit
            if too_big:
                break
        if too_big:
            response = error_response(413, "body", f"request body over the limit of {limit} bytes")
            return await response(scope, receive, send)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
