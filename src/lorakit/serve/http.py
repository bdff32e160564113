"""Where errors become HTTP, in one place: :data:`STATUS` maps each error class of :mod:`lorakit.serve.errors`
to its status code, and every error body, from a route, a validation failure, the guard or a stream, is a
:class:`~lorakit.serve.protocol.ErrorResponse`."""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from . import errors as E
from . import protocol as P

STATUS: dict[type[E.ServeError], int] = {  # the most specific class of an error that is listed here wins
    E.InvalidRequest: 400,
    E.AdapterNotFound: 404,
    E.Conflict: 409,
    E.Overloaded: 503,
    E.AdapterLoadFailed: 500,
    E.InternalError: 500,
    E.ServeError: 500,
}


def status_of(error: E.ServeError) -> int:
    return next(STATUS[cls] for cls in type(error).__mro__ if cls in STATUS)


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                   headers: dict | None = None) -> JSONResponse:
    body = P.ErrorResponse(error=P.ErrorBody(message=message, type=kind, param=param, code=status))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


async def _serve_error(request, e: E.ServeError) -> JSONResponse:
    return error_response(status_of(e), e.message, e.param, e.kind)


async def _invalid(request, e: RequestValidationError) -> JSONResponse:
    err = e.errors()[0]
    if err.get("type") == "json_invalid":
        return error_response(400, f"malformed JSON body: {err.get('msg')}")
    field = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
    return error_response(422, f"{field}: {err.get('msg')}", field)


async def _http_error(request, e: HTTPException) -> JSONResponse:
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return error_response(e.status_code, str(e.detail), None, kind, getattr(e, "headers", None))


def error_body(error: E.ServeError) -> P.ErrorResponse:
    return P.ErrorResponse(error=P.ErrorBody(message=error.message, type=error.kind, param=error.param,
                                             code=status_of(error)))


HANDLERS = {E.ServeError: _serve_error, RequestValidationError: _invalid, HTTPException: _http_error}
