"""Reference: asyncio Protocol echo server (optionally TLS with the standard ssl module)."""

import asyncio
import ssl
import sys


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


def main(port: int, certfile: str = "", keyfile: str = "", use_uvloop: bool = False) -> None:
    if use_uvloop:
        import uvloop

        uvloop.install()
    context = None
    if certfile:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certfile, keyfile)

    async def serve():
        server = await asyncio.get_running_loop().create_server(
            Echo, "127.0.0.1", port, ssl=context, backlog=4096, reuse_address=True)
        print("READY", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main(int(sys.argv[1]), *sys.argv[2:4])
