"""The XMPP example's small parts on their own: JIDs, SASL PLAIN, the user file, the deadlines."""

from __future__ import annotations

import base64
import json
import os
import stat
import threading
import time

import pytest
from netpool.examples.xmpp_stub.deadlines import Deadlines
from netpool.examples.xmpp_stub.jid import JID, InvalidJID, localpart
from netpool.examples.xmpp_stub.sasl import SASLFailure, decode_payload, parse_plain
from netpool.examples.xmpp_stub.users import UserStore, UserStoreError

from .conftest import wait_for

CHEAP = {"n": 2**4}  # hashes that take microseconds, for tests that add many users


# -- JIDs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, local, domain, resource", [
    ("alice@localhost", "alice", "localhost", None),
    ("Alice@LocalHost/Laptop", "alice", "localhost", "Laptop"),
    ("localhost", None, "localhost", None),
    ("bob@example.com./a/b@c", "bob", "example.com", "a/b@c"),
    ("ÉLODIE@bücher.example/Téléphone", "élodie", "bücher.example", "Téléphone"),
    ("x@[::1]", "x", "[::1]", None),
    ("x@127.0.0.1/with space", "x", "127.0.0.1", "with space"),
])
def test_jids_are_parsed_and_normalised(text, local, domain, resource):
    jid = JID.parse(text)
    assert (jid.local, jid.domain, jid.resource) == (local, domain, resource)
    assert JID.parse(str(jid)) == jid


@pytest.mark.parametrize("text", [
    "", "@localhost", "alice@", "a\"b@x", "a'b@x", "a<b@x", "a b@x", "a:b@x", "a@b@x",
    "alice@local_host", "alice@-bad.example", "alice@[not-v6]", "alice@localhost/",
    "alice@localhost/ edge", "a\u0000b@x", "alice@localhost/\u202eevil", "x" * 1024 + "@x",
])
def test_bad_jids_are_refused(text):
    with pytest.raises(InvalidJID):
        JID.parse(text)


def test_bare_and_str():
    jid = JID.parse("alice@localhost/phone")
    bare = jid.bare
    assert str(bare) == "alice@localhost" and bare.bare is bare and bare == JID.parse("ALICE@localhost")
    assert localpart("ALICE") == "alice"


# -- SASL PLAIN -----------------------------------------------------------------------------


def test_plain_payload_is_split():
    credentials = parse_plain(decode_payload(base64.b64encode(b"alice@x\0alice\0p\xc3\xa4ss").decode()))
    assert credentials == ("alice@x", "alice", "päss")
    assert "päss" not in repr(credentials)  # the password never shows in a repr or a traceback


@pytest.mark.parametrize("text, condition", [
    ("not base64!", "incorrect-encoding"),
    ("=", "malformed-request"),
    (base64.b64encode(b"alice\0secret").decode(), "malformed-request"),
    (base64.b64encode(b"\0\0secret").decode(), "malformed-request"),
    (base64.b64encode(b"\0alice\0").decode(), "malformed-request"),
    (base64.b64encode(b"\0alice\0\xff").decode(), "malformed-request"),
    ("A" * 5000, "malformed-request"),
])
def test_bad_plain_payloads(text, condition):
    with pytest.raises(SASLFailure) as info:
        parse_plain(decode_payload(text))
    assert info.value.condition == condition


# -- the user file ---------------------------------------------------------------------------


def test_users_are_added_checked_and_stored_hashed(tmp_path):
    path = tmp_path / "users.json"
    store = UserStore(path)
    assert store.add("Alice", "wonderland") == "alice"
    assert store.verify("alice", "wonderland")
    assert not store.verify("alice", "Wonderland")
    assert not store.verify("nobody", "wonderland")
    text = path.read_text()
    assert "wonderland" not in text
    record = json.loads(text)["users"]["alice"]
    assert record["scheme"] == "scrypt" and record["n"] == 2**14 and len(base64.b64decode(record["salt"])) == 16
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(KeyError):
        store.add("alice", "again")
    store.add("alice", "changed", replace=True, **CHEAP)
    assert store.verify("alice", "changed") and not store.verify("alice", "wonderland")


def test_same_password_different_salts(tmp_path):
    store = UserStore(tmp_path / "users.json")
    store.add("a", "same", **CHEAP)
    store.add("b", "same", **CHEAP)
    users = json.loads(store.path.read_text())["users"]
    assert users["a"]["hash"] != users["b"]["hash"]


def test_a_running_server_sees_users_added_later(tmp_path):
    path = tmp_path / "users.json"
    UserStore(path).add("alice", "one", **CHEAP)
    server_side = UserStore.open(path)
    assert "bob" not in server_side
    UserStore(path).add("bob", "two", **CHEAP)  # as `netpool xmpp adduser` does, from another process
    assert server_side.verify("bob", "two")


@pytest.mark.parametrize("content, needle", [
    ("not json", "not valid JSON"),
    ('{"users": {}}', "not a netpool xmpp user file"),
    ('{"format": "netpool-xmpp-users", "users": {"a": {"scheme": "md5"}}}', "scheme 'scrypt'"),
    ('{"format": "netpool-xmpp-users", "users": {"a": {"scheme": "scrypt", "n": 3, "r": 8, "p": 1}}}', "power of two"),
    ('{"format": "netpool-xmpp-users", "users": {"a": {"scheme": "scrypt", "n": 1073741824, "r": 8, "p": 1}}}',
     "1..1048576"),
])
def test_broken_user_files_are_refused_with_the_file_named(tmp_path, content, needle):
    path = tmp_path / "users.json"
    path.write_text(content)
    with pytest.raises(UserStoreError, match=needle) as info:
        UserStore.open(path)
    assert str(path) in str(info.value)


def test_a_missing_user_file_fails_at_open(tmp_path):
    with pytest.raises(UserStoreError, match="no such user file"):
        UserStore.open(tmp_path / "absent.json")


# -- the deadlines -----------------------------------------------------------------------------


class Stream:
    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.expired = threading.Event()

    def expire(self) -> None:
        self.expired.set()


def keeper_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "netpool-xmpp-deadlines"]


def test_deadlines_expire_in_order_and_moved_ones_later():
    keeper = Deadlines()
    now = time.monotonic()
    early, moved, late = Stream(now + 0.05), Stream(now + 0.1), Stream(now + 0.3)
    for stream in (late, moved, early):
        keeper.watch(stream)
    moved.deadline = now + 0.6  # activity: no call, just a store
    assert early.expired.wait(5) and late.expired.wait(5)
    assert not moved.expired.is_set()
    assert moved.expired.wait(5)
    assert time.monotonic() >= now + 0.6
    wait_for(lambda: not keeper_threads(), what="the keeper to exit with nothing to watch")


def test_unwatched_streams_never_expire_and_the_keeper_exits():
    keeper = Deadlines()
    stream = Stream(time.monotonic() + 0.05)
    keeper.watch(stream)
    keeper.unwatch(stream)
    wait_for(lambda: not keeper_threads(), what="the keeper to exit")
    assert not stream.expired.wait(0.1)
