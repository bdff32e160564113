"""ASGI middleware in front of every route: bearer-token check, request body size limit, request counts.

With an API key, every route but ``/health`` and the playground page itself (static HTML; the page sends
the key with each API call) needs ``Authorization: Bearer <key>``. Bodies over ``max_body_bytes`` get 413,
whether the client announced the size (``Content-Length``) or streamed it.
"""

from __future__ import annotations

import hmac

from .protocol import ErrorBody, ErrorResponse

OPEN_PATHS = ("/health", "/")


async def _send_error(send, status: int, message: str, kind: str, extra_headers=()) -> None:
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, code=status)).model_dump_json().encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app, api_key: str | None, max_body_bytes: int, metrics):
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ("/", "/health", "/metrics") or path.startswith("/v1/") else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and path not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                return await _send_error(counting_send, 401, "missing or wrong API key: send Authorization: "
                                         "Bearer <key>", "authentication_error", [(b"www-authenticate", b"Bearer")])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body
            except ValueError:
                return await _send_error(counting_send, 400, "bad Content-Length header", "invalid_request_error")
            if too_big:
                return await _send_error(counting_send, 413, f"request body of {int(length)} bytes is over the "
                                         f"limit of {self.max_body} bytes", "invalid_request_error")
            return await self.app(scope, receive, counting_send)
        if scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, counting_send)
        # no Content-Length (chunked): read the body up to the limit, then hand it on
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body:
                return await _send_error(counting_send, 413, f"request body is over the limit of {self.max_body} "
                                         "bytes", "invalid_request_error")
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, counting_send)
