"""Reference: the same asyncio Protocol echo server on uvloop."""

import sys

from asyncio_server import main

if __name__ == "__main__":
    main(int(sys.argv[1]), use_uvloop=True)
