"""Reference: gevent, monkey-patched, StreamServer whose handler blocks MS milliseconds (time.sleep; every message, or with WHICH=mixed only those starting with B), then echoes."""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402
import time  # noqa: E402

from gevent.server import StreamServer  # noqa: E402


def main(port: int, ms: str, which: str = "all") -> None:
    seconds = float(ms) / 1000
    every = which == "all"

    def handler(sock, _address) -> None:
        recv, sendall = sock.recv, sock.sendall
        while True:
            data = recv(65536)
            if not data:
                break
            if seconds and (every or data[:1] == b"B"):
                time.sleep(seconds)
            sendall(data)

    server = StreamServer(("127.0.0.1", port), handler, backlog=4096)
    server.init_socket()
    print("READY", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(int(sys.argv[1]), *sys.argv[2:4])
