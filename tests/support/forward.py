"""A TCP port inside a network namespace that leads to a UNIX socket outside it.

Run inside the namespace (scripts/second-libvirtd.sh netns-exec ... -- python -m
tests.support.forward ADDRESS PORT SOCKET): guests there reach ADDRESS:PORT, and every
connection is relayed to SOCKET, where a web server of the test listens. No traffic leaves
the namespace: the other side is a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        with contextlib.suppress(OSError):
            writer.close()


async def main(address: str, port: int, socket_path: str) -> None:
    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(socket_path)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(relay, address, port)
    print(f"forwarding {address}:{port} to {socket_path}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
