"""ListenerConfig: validation that names the field, dicts and TOML with the same keys."""

from __future__ import annotations

import dataclasses
import functools
import os
import re

import pytest

import netpool
from netpool import ConfigError, HandlerImportError, ListenerConfig, load_toml

from .conftest import connect, echo, recv_exactly


def test_defaults_are_safe():
    cfg = ListenerConfig(handler=echo)
    assert cfg.host == "127.0.0.1"
    assert cfg.overflow == "refuse" and cfg.grow_step == 128
    assert cfg.idle_timeout == 300.0 and cfg.send_timeout == 30.0
    assert cfg.max_message_size == 65536


def test_config_is_frozen():
    cfg = ListenerConfig(handler=echo)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.port = 1  # type: ignore[misc]
    assert cfg.replace(port=7).port == 7


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("acceptors", 0, "at least 1"),
        ("acceptors", "4", "whole number"),
        ("acceptor_nice", -1, "at least 0"),
        ("acceptor_nice", 20, "up to 19"),
        ("max_connections", -5, "at least 1"),
        ("overflow", "drop", "refuse, grow, wait"),
        ("port", 70000, "0..65535"),
        ("framing", "xml", "raw, line, length"),
        ("idle_timeout", -1, "positive"),
        ("send_timeout", None, "number of seconds"),
        ("grow_step", True, "whole number"),
        ("refuse_message", 5, "bytes or str"),
        ("on_close", 42, "callable"),
        ("unix_mode", "999", "octal"),
    ],
)
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message) as info:
        ListenerConfig(handler=echo, **{field: value})
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}:")


def test_handler_must_be_callable():
    with pytest.raises(ConfigError, match="handler"):
        ListenerConfig(handler=42)  # type: ignore[arg-type]


def test_handler_spec_string_is_imported():
    cfg = ListenerConfig(handler="netpool.examples.echo.handler:echo")
    assert callable(cfg.handler) and cfg.handler.__name__ == "echo"


@pytest.mark.parametrize("spec", ["no_such_module_xyz:h", "os:no_such_attr", "just_a_module"])
def test_bad_handler_spec_is_a_clear_error(spec):
    with pytest.raises(HandlerImportError, match="handler"):
        ListenerConfig(handler=spec)


HOOKS = ["on_connect", "on_close", "on_alarm"]


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_spec_string_is_imported(hook):
    """Every hook takes a "module:attr" string, as handler does, and holds the function it names."""
    from netpool.examples.echo.handler import echo as example_echo

    cfg = ListenerConfig(handler=echo, **{hook: "netpool.examples.echo.handler:echo"})
    assert getattr(cfg, hook) is example_echo
    assert getattr(cfg.replace(port=7), hook) is example_echo
    assert getattr(ListenerConfig.from_mapping({"handler": echo, hook: "os.path:basename"}), hook) is os.path.basename


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
        ("os:no_such_attr", "has no attribute 'no_such_attr'"),
        ("just_a_module", "MODULE:ATTRIBUTE"),
    ],
    ids=["no-module", "no-attribute", "no-colon"],
)
def test_bad_hook_spec_is_a_clear_error_naming_the_hook(hook, spec, message):
    with pytest.raises(HandlerImportError, match=message) as info:
        ListenerConfig(handler=echo, **{hook: spec})
    assert info.value.field == hook
    assert str(info.value).startswith(f"{hook}:")


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_spec_must_name_a_callable(hook):
    with pytest.raises(ConfigError, match=r"expected a callable or None, 'os:sep' is") as info:
        ListenerConfig(handler=echo, **{hook: "os:sep"})
    assert info.value.field == hook


def test_alarm_threshold_needs_callback():
    with pytest.raises(ConfigError, match="on_alarm"):
        ListenerConfig(handler=echo, alarm_threshold=5)


def test_ssl_options_from_a_dict_are_validated():
    """Empty TLS options mean plain TCP; bad keys and values name the ssl field."""
    assert ListenerConfig(handler=echo, ssl={}).ssl is None
    cfg = ListenerConfig(handler=echo, ssl={"certfile": "c.pem", "alpn": "xmpp-client", "min_version": 1.3})
    assert isinstance(cfg.ssl, netpool.TLSConfig)
    assert cfg.ssl.alpn == ("xmpp-client",) and cfg.ssl.min_version == "1.3"
    with pytest.raises(ConfigError, match="ssl.certfie: unknown TLS option"):
        ListenerConfig(handler=echo, ssl={"certfie": "c.pem"})
    with pytest.raises(ConfigError, match="needs ssl.cafile"):
        ListenerConfig(handler=echo, ssl={"certfile": "c.pem", "verify_client": "required"})
    with pytest.raises(ConfigError, match="ssl.min_version"):
        ListenerConfig(handler=echo, ssl={"certfile": "c.pem", "min_version": "1.1"})
    with pytest.raises(ConfigError, match="ssl.mode"):
        ListenerConfig(handler=echo, ssl={"certfile": "c.pem", "mode": "sometimes"})


def test_ssl_password_never_shows_in_repr():
    cfg = ListenerConfig(handler=echo, ssl={"certfile": "c.pem", "password": "hunter2"})
    assert "hunter2" not in repr(cfg)


def test_refuse_message_str_becomes_bytes():
    assert ListenerConfig(handler=echo, refuse_message="busy\n").refuse_message == b"busy\n"


def test_from_mapping_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown setting") as info:
        ListenerConfig.from_mapping({"handler": echo, "max_conns": 3})
    assert info.value.field == "max_conns"


def test_plain_dict_starts_a_listener():
    listener = netpool.start_listener({"handler": echo, "port": 0, "framing": "line", "acceptors": 2})
    try:
        with connect(listener) as sock:
            sock.sendall(b"dict\n")
            assert recv_exactly(sock, 5) == b"dict\n"
    finally:
        listener.stop()


def test_toml_file_has_the_same_keys(tmp_path):
    path = tmp_path / "listener.toml"
    path.write_text('port = 0\nframing = "length"\nmax_connections = 3\noverflow = "wait"\n')
    cfg = ListenerConfig.from_mapping({"handler": echo, **load_toml(str(path))})
    assert (cfg.framing, cfg.max_connections, cfg.overflow) == ("length", 3, "wait")


def test_toml_errors_name_file_and_key(tmp_path):
    bad_key = tmp_path / "a.toml"
    bad_key.write_text("acceptorz = 3\n")
    with pytest.raises(ConfigError, match=r"acceptorz: unknown setting in .*a\.toml"):
        load_toml(str(bad_key))
    bad_syntax = tmp_path / "b.toml"
    bad_syntax.write_text("port = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(str(bad_syntax))
    with pytest.raises(ConfigError, match="cannot read"):
        load_toml(str(tmp_path / "missing.toml"))


# -- async callables: netpool never awaits them, so they are refused up front --


async def async_handler(message, conn):
    conn.send(message)


class AsyncCallable:
    async def __call__(self, message, conn):
        conn.send(message)


class SyncCallable:
    def __call__(self, message, conn):
        conn.send(message)


ASYNC_CALLABLES = {
    "async-def": async_handler,
    "async-call": AsyncCallable(),
    "partial": functools.partial(async_handler),
    "partial-of-async-call": functools.partial(AsyncCallable(), b"x"),
}


@pytest.mark.parametrize("field", ["handler", *HOOKS])
@pytest.mark.parametrize("value", list(ASYNC_CALLABLES.values()), ids=list(ASYNC_CALLABLES))
def test_async_callables_are_refused_naming_the_field(field, value):
    with pytest.raises(ConfigError, match="does not run coroutines") as info:
        ListenerConfig(**{"handler": echo, field: value})
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert f"`def {field}(" in str(info.value) and "run_coroutine_threadsafe" in str(info.value)


@pytest.mark.parametrize("field", ["handler", *HOOKS])
def test_async_callable_named_by_a_spec_is_refused(field, tmp_path, monkeypatch):
    (tmp_path / "async_app_mod.py").write_text("async def handle(*args):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"'async_app_mod:handle' is an async function") as info:
        ListenerConfig(**{"handler": echo, field: "async_app_mod:handle"})
    assert info.value.field == field


@pytest.mark.parametrize("field", ["handler", *HOOKS])
@pytest.mark.parametrize(
    "value", [echo, SyncCallable(), functools.partial(echo), SyncCallable], ids=["def", "call", "partial", "class"]
)
def test_plain_callables_are_still_accepted(field, value):
    assert getattr(ListenerConfig(**{"handler": echo, field: value}), field) is value


# -- paths in a TOML file are relative to the file, not to the current directory --


def test_toml_ssl_paths_are_relative_to_the_file(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    conf.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    absolute = str(tmp_path / "abs" / "ca.pem")
    (conf / "server.toml").write_text(
        'unix = "run/server.sock"\n'
        "[ssl]\n"
        'certfile = "cert.pem"\n'
        'keyfile = "keys/key.pem"\n'
        f'cafile = "{absolute}"\n'
        'verify_client = "optional"\n'
        "[ssl.sni.\"example.org\"]\n"
        'certfile = "sni/example.pem"\n'
        'keyfile = "sni/example.key"\n'
    )
    monkeypatch.chdir(elsewhere)
    data = load_toml("../conf/server.toml")  # a relative path to the file, too
    cfg = ListenerConfig.from_mapping({"handler": echo, **data})
    assert cfg.ssl.certfile == str(conf / "cert.pem")
    assert cfg.ssl.keyfile == str(conf / "keys" / "key.pem")
    assert cfg.ssl.cafile == absolute
    assert cfg.ssl.sni["example.org"] == {"certfile": str(conf / "sni" / "example.pem"),
                                          "keyfile": str(conf / "sni" / "example.key")}
    assert cfg.unix == str(conf / "run" / "server.sock")


def test_toml_absolute_paths_and_bad_values_are_kept(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text('unix = "/run/netpool.sock"\n[ssl]\ncertfile = "/etc/ssl/cert.pem"\nkeyfile = ""\ncafile = 5\n')
    data = load_toml(str(path))
    assert data["unix"] == "/run/netpool.sock"
    assert data["ssl"] == {"certfile": "/etc/ssl/cert.pem", "keyfile": "", "cafile": 5}
    with pytest.raises(ConfigError, match="ssl.keyfile"):
        ListenerConfig.from_mapping({"handler": echo, **data})


def test_command_line_paths_stay_relative_to_the_current_directory(tmp_path, monkeypatch):
    """Flags are not from the file: --certfile over a --config file keeps its path; the file's keyfile is resolved."""
    from netpool.cli import read_settings_and_flags

    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "server.toml").write_text('[ssl]\ncertfile = "cert.pem"\nkeyfile = "key.pem"\n')
    monkeypatch.chdir(tmp_path)
    settings = read_settings_and_flags("conf/server.toml", {"tls_certfile": "cli.pem", "unix": "cli.sock"}, "t")
    assert settings["ssl"] == {"certfile": "cli.pem", "keyfile": str(conf / "key.pem")}
    assert settings["unix"] == "cli.sock"


@pytest.mark.parametrize("cls", [netpool.ListenerConfig, netpool.TLSConfig], ids=["ListenerConfig", "TLSConfig"])
def test_help_shows_every_field_with_its_default_and_documentation(cls: type) -> None:
    """help() shows each field's docstring (attribute docstrings alone reach only Sphinx-like tools)."""
    import dataclasses
    import pydoc

    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    assert "(undocumented)" not in text
    for field in dataclasses.fields(cls):
        match = re.search(rf"^ \|  {field.name}( = .*| \(required\))\n \|      \S", text, re.M)
        assert match, f"{field.name} is not documented in help({cls.__name__})"
    assert re.search(r"^ \|  handshake_timeout = 10\.0\n \|      Seconds a TLS handshake may take\.", text, re.M) \
        or cls is netpool.TLSConfig
