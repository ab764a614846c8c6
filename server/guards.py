"""Who may call the server: the Host check, the JSON-only rule for POST bodies, the API key.

A web page the user visits can send requests to a server on localhost. Three rules keep it out:
- Host: bound to a loopback address, only `localhost`, `127.0.0.1` and `[::1]` are served, so a
  DNS-rebinding page (whose Host is its own name) gets 421.
- POST bodies must be `application/json`: a browser sends that type cross-site only after a CORS
  preflight, which fails unless `--allowed-origins` lets the page in. Form and text/plain posts,
  which need no preflight, get 415.
- CORS itself stays off (no Access-Control-* headers) unless `--allowed-origins` is given.
"""

from __future__ import annotations

import hmac
import ipaddress

from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from server.protocol import APIError

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
# Probes and scrapers carry no key; the dashboard page holds no data (its feed needs the key).
OPEN_PATHS = ("/health", "/metrics", "/dashboard")


class RootPath:
    """--root-path: the public prefix a proxy serves the API under (vLLM's flag). A request's
    path may come with it (the proxy passed it on) or without (the proxy cut it off): either
    way it goes on with the prefix as ASGI's `root_path` and at the head of `path`, so the
    routes and the guards below (route_path) see one path, and URLs built from the request (a
    trailing-slash redirect) keep the prefix the client must send."""

    def __init__(self, app, root_path: str):
        self.app, self.root = app, root_path.rstrip("/")

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            path = scope["path"]
            if not (path == self.root or path.startswith(self.root + "/")):
                path = self.root + path
            scope = dict(scope, root_path=self.root, path=path)
        await self.app(scope, receive, send)


def route_path(scope) -> str:
    """The path the routes match: without RootPath's prefix (as Starlette's routing reads it)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root):] or "/"
    return path


def is_loopback(bind_host: str) -> bool:
    if bind_host == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind_host.strip("[]")).is_loopback
    except ValueError:  # a name: whatever it resolves to, treat it as public
        return False


def allowed_hosts_for(bind_host: str, extra: list[str]) -> list[str] | None:
    """The Host names to serve for a server bound to `bind_host` (None: any)."""
    if is_loopback(bind_host) or extra:
        return [*LOOPBACK_HOSTS, *extra]
    return None


def host_name(header: str) -> str:
    """`Host` without its port: "localhost:8000" -> "localhost", "[::1]:80" -> "[::1]". Anything
    after the name but a port keeps the whole header (which then names no allowed host):
    "127.0.0.1:80@evil.example" is not 127.0.0.1."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]") + 1
        name, port = header[:end], header[end:]
    else:
        name, colon, number = header.partition(":")
        port = colon + number
    # after the name: nothing, or ":" and the port's digits
    return name if port in ("", ":") or (port[0] == ":" and port[1:].isdigit()) else header


class HostGuard:
    """421 unless the Host header names one of `allowed` (any port); None or "*" allow all."""

    def __init__(self, app, allowed: list[str] | None):
        self.app = app
        self.allowed = None if allowed is None or "*" in allowed else {h.lower() for h in allowed}

    async def __call__(self, scope, receive, send):
        if self.allowed is not None and scope["type"] == "http":
            header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_name(header) not in self.allowed:
                error = APIError(421, f"this server does not serve Host {header!r}; it serves "
                                      f"{sorted(self.allowed)} (widen with --allowed-hosts)",
                                 param="Host", code="host_not_allowed")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class CORSGuard(CORSMiddleware):
    """Starlette's CORS, whose refused preflights answer in OpenAI's error shape like every
    other error here (they were text/plain)."""

    def preflight_response(self, request_headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        refused = APIError(400, f"{response.body.decode()} (see --allowed-origins)",
                           param="Origin", code="cors_refused")
        kept = {k: v for k, v in response.headers.items()
                if k.lower().startswith("access-control") or k.lower() == "vary"}
        answer = refused.response()
        answer.headers.update(kept)
        return answer


class RequestGuard:
    """401 unless `Authorization: Bearer <key>` matches (OPEN_PATHS stay open); then 415 for a
    POST whose body is not `application/json`."""

    def __init__(self, app, api_key: str | None, json_paths: set[str] | None = None):
        self.app, self.api_key = app, api_key
        # the routes that take a POST (the others answer a POST with 405, not 415); None: all
        self.json_paths = json_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            error = self._check(scope)
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check(self, scope) -> APIError | None:
        headers = dict(scope["headers"])
        path = route_path(scope)
        # "/dashboard/" too: the router answers it with a redirect to the open page
        if self.api_key and (path.rstrip("/") or "/") not in OPEN_PATHS:
            header = headers.get(b"authorization", b"")
            scheme, _, token = header.strip().partition(b" ")
            # the scheme's name is case-insensitive (RFC 9110 11.1); the key is compared whole
            if scheme.lower() != b"bearer" or not hmac.compare_digest(
                    token.strip(), self.api_key.encode()):
                message = "missing API key" if not header else "invalid API key"
                return APIError(401, message, type="authentication_error", code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
        if scope["method"] == "POST" and (self.json_paths is None
                                          or path in self.json_paths):
            media_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if media_type != b"application/json":
                return APIError(415, "the request body must be JSON, sent with "
                                     f"'Content-Type: application/json' (got "
                                     f"{media_type.decode('latin-1')!r})",
                                param="Content-Type", code="unsupported_media_type")
        return None
