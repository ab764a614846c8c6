"""A lean HTTP/1.1 client for the serving benchmark's streamed requests (tools/bench_serving.py).

The benchmark's own event loop reads every SSE chunk of every stream; through httpx (httpcore,
anyio, h11) that took ~165 CPU us a chunk on a 2-core CPU, over twice what the server spent
making it, so at W2's ~7,700 chunks/s the client's loop was the busier one and its lag showed up
in TTFT and in `http_in` (README: Performance, the API per streamed chunk). Here a chunk costs two
StreamReader reads and a JSON decode (82 us with the start-up). It speaks only what that needs:
POST with a JSON body, a chunked (or Content-Length) answer, keep-alive connections reused
across requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit


class SSEClient:
    """POSTs to one `http://host:port` server over a pool of keep-alive connections."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None):
        url = urlsplit(base_url)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"base_url must be http://HOST[:PORT], got {base_url!r}")
        self.host, self.port = url.hostname, url.port or 80
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._head = (f"Host: {url.netloc}\r\nContent-Type: application/json\r\n"
                      f"Accept: text/event-stream\r\n{extra}")
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, body: bytes) -> Response:
        """Send the request; the answer's status and headers are read, its body is not."""
        request = (f"POST {path} HTTP/1.1\r\n{self._head}Content-Length: {len(body)}\r\n\r\n"
                   ).encode() + body
        while True:
            reused = bool(self._idle)
            reader, writer = (self._idle.pop() if reused
                              else await asyncio.open_connection(self.host, self.port))
            writer.write(request)
            status = await reader.readline()
            if status or not reused:
                break
            writer.close()  # the server closed it while idle: retry on a fresh one
        if not status:
            raise ConnectionError("the server closed the connection without answering")
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return Response(self, reader, writer, int(status.split()[1]), headers)

    async def close(self):
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


class Response:
    def __init__(self, client: SSEClient, reader, writer, status_code: int, headers: dict):
        self.client, self.reader, self.writer = client, reader, writer
        self.status_code, self.headers = status_code, headers

    async def lines(self) -> AsyncIterator[str]:
        """The body's lines (without their newline), as they arrive."""
        pending = b""
        async for data in self._body():
            *done, pending = (pending + data).split(b"\n")
            for line in done:
                yield line.rstrip(b"\r").decode()
        if pending:
            yield pending.rstrip(b"\r").decode()

    async def read(self) -> bytes:
        return b"".join([data async for data in self._body()])

    async def _body(self) -> AsyncIterator[bytes]:
        reader, complete = self.reader, False
        try:
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                while size := int((await reader.readline()).split(b";")[0], 16):
                    yield (await reader.readexactly(size + 2))[:-2]
                while await reader.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
            else:
                yield await reader.readexactly(int(self.headers.get("content-length", 0)))
            complete = True
        finally:  # a body read to its end leaves the connection reusable
            if complete and self.headers.get("connection", "").lower() != "close":
                self.client._idle.append((reader, self.writer))
            else:
                self.writer.close()
