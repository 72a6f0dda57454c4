"""Reference: a line protocol on asyncio streams, as its users write one (readline, write, drain)."""

import asyncio
import sys


async def echo_lines(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def main(port: int, use_uvloop: bool = False) -> None:
    if use_uvloop:
        import uvloop

        uvloop.install()

    async def serve():
        server = await asyncio.start_server(echo_lines, "127.0.0.1", port, backlog=4096, reuse_address=True)
        print("READY", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main(int(sys.argv[1]), use_uvloop=sys.argv[2:3] == ["uvloop"])
