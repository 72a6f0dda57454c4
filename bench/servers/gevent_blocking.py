"""Reference: gevent, monkey-patched, StreamServer whose handler does WORK (see work.py), then echoes."""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

from gevent.server import StreamServer  # noqa: E402
from work import make_work  # noqa: E402


def main(port: int, spec: str) -> None:
    work = make_work(spec)

    def handler(sock, _address) -> None:
        recv, sendall = sock.recv, sock.sendall
        while True:
            data = recv(65536)
            if not data:
                break
            work(data)
            sendall(data)

    server = StreamServer(("127.0.0.1", port), handler, backlog=4096)
    server.init_socket()
    print("READY", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
