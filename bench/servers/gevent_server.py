"""Reference: gevent StreamServer echo server."""

import sys

from gevent.server import StreamServer


def echo(sock, _address):
    recv, sendall = sock.recv, sock.sendall
    while True:
        data = recv(65536)
        if not data:
            break
        sendall(data)


if __name__ == "__main__":
    server = StreamServer(("127.0.0.1", int(sys.argv[1])), echo, backlog=4096)
    server.init_socket()
    print("READY", flush=True)
    server.serve_forever()
