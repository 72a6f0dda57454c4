"""The XMPP example: a small chat server that unmodified XMPP clients can log in to.

``netpool xmpp --port 5222 --domain localhost`` serves it; README.md says
how to connect a real client. It is also the model of a stateful protocol
server on netpool, one module per job:

==============  ====================================================================
parser          sans-I/O, restricted XML stream parser: bytes in, events out
writer          elements back to bytes, every attribute and text escaped
stanzas         the XML the server says itself: header, features, errors, replies
jid             JID parsing, validation and normalisation
sasl            SASL PLAIN decoding
users           the user file: salted scrypt hashes, ``netpool xmpp adduser``
deadlines       per-stream timeouts (short before login, long after), one thread
router          who is online where (netpool's session broker); where stanzas go
services        the iqs the server answers itself (disco, ping, roster, session)
stream          one client's stream: negotiation, then stanzas (the state machine)
settings        ServerSettings, validated at construction
server          the netpool hooks, and what all streams share
cli             ``netpool xmpp`` and ``netpool xmpp adduser``
==============  ====================================================================
"""

from .jid import JID, InvalidJID
from .parser import Limits, StreamError, StreamParser
from .server import XMPPServer
from .settings import ServerSettings
from .users import UserStore, UserStoreError

__all__ = [
    "InvalidJID",
    "JID",
    "Limits",
    "ServerSettings",
    "StreamError",
    "StreamParser",
    "UserStore",
    "UserStoreError",
    "XMPPServer",
]
