# Two commands do everything on a fresh machine with Python 3.11:
#   make run    set up .venv, install netpool, serve the echo example on 127.0.0.1:$(PORT)
#   make test   same set-up, then the whole test suite
PYTHON ?= python3
VENV   ?= .venv
# Plain "=" so a PORT or HOST exported by the shell or a platform is not
# picked up by accident; `make run PORT=6000` still overrides.
PORT   = 5555
HOST   = 127.0.0.1
PYTEST_ARGS ?=

BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test venv clean bench bench-tools bench-instructions soak docs

venv: $(STAMP)

# Re-install only when the package metadata or the C module (netpool/_speedups.c,
# compiled by the install) changes; the install is editable, so Python edits
# need no new install.
$(STAMP): setup.cfg pyproject.toml setup.py netpool/_speedups.c
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "netpool needs Python 3.11 or newer (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

run: $(STAMP)
	$(BIN)/netpool echo --host $(HOST) --port $(PORT)

# Tools the tests drive as real, independent peers (openssl s_client,
# haproxy, a redis-server started by tests/redis_server.py,
# systemd-socket-activate for socket activation). Installed from Debian's
# packages when missing, never by hand: each entry is COMMAND or
# COMMAND:PACKAGE when the Debian package has another name.
SYSTEM_TOOLS := openssl haproxy redis-server systemd-socket-activate:systemd
.PHONY: system-tools
system-tools:
	@missing=""; for entry in $(SYSTEM_TOOLS); do tool=$${entry%%:*}; package=$${entry#*:}; \
		command -v $$tool >/dev/null || missing="$$missing $$package"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

test: $(STAMP) system-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The benchmark (not part of make test): the C load generator, the reference
# servers' packages, then bench/run.py. See bench/results.md for the last run.
BENCH_ARGS ?=
LOADGEN := bench/loadgen
BENCH_STAMP := $(VENV)/.bench-installed

$(LOADGEN): bench/loadgen.c
	@command -v gcc >/dev/null && [ -f /usr/include/openssl/ssl.h ] && command -v taskset >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq gcc libssl-dev util-linux; }
	gcc -O2 -Wall -Wextra -DWITH_TLS -o $@ $< -lssl -lcrypto

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	@touch $@

# The redis runs call a real redis-server (Debian's), started by bench/run.py on a free loopback port.
bench-tools: $(LOADGEN) $(BENCH_STAMP)
	@$(MAKE) --no-print-directory system-tools SYSTEM_TOOLS="redis-server"

bench: bench-tools
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# Instructions per echoed message under callgrind: the same every run, unlike
# throughput on a shared machine (bench/instructions.py).
bench-instructions: bench-tools
	@command -v valgrind >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq valgrind; }
	$(BIN)/python bench/instructions.py $(BENCH_ARGS)
	$(BIN)/python bench/instructions.py --tls $(BENCH_ARGS)

# Mixed traffic against one listener (10 minutes; SOAK_ARGS="--minutes 60" for the hour the
# memory target is judged on), then a report with slopes per hour (bench/soak-report.md).
SOAK_ARGS ?=
soak: $(STAMP)
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

# The API reference, built from the docstrings by Sphinx autodoc (docs/api).
# -W: a docstring Sphinx cannot read fails the build instead of rendering
# garbled; --keep-going lists every such warning in one run. Pages are
# rebuilt when the modules they document change. Offline: no intersphinx,
# the built-in theme.
DOCS_HTML := docs/_build/html
docs: $(STAMP)
	$(BIN)/python -m sphinx -W --keep-going -q -b html -d docs/_build/doctrees docs/api $(DOCS_HTML)
	@echo "API reference: $(DOCS_HTML)/index.html"

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis $(LOADGEN) netpool/*.so docs/_build

# The gateway example (examples/gateway): an HTTP front end calling a netpool
# TCP back end over pooled connections, users in SQLite. `make gateway` seeds
# 100,000 users on first use (build/gateway/users.db) and serves
# http://127.0.0.1:$(GATEWAY_PORT) with its back end on 127.0.0.1:7001.
GATEWAY_PORT = 8080
GATEWAY_ARGS ?=
BENCH_GATEWAY_ARGS ?=
# wrk, the HTTP load generator of bench-gateway, from Debian's packages.
GATEWAY_TOOLS := wrk
.PHONY: gateway gateway-tools bench-gateway

gateway: $(STAMP)
	$(BIN)/python -m netpool.examples.gateway run --port $(GATEWAY_PORT) $(GATEWAY_ARGS)

gateway-tools:
	@$(MAKE) --no-print-directory system-tools SYSTEM_TOOLS="$(GATEWAY_TOOLS)"

# Login throughput at 1,000 HTTP connections, pool on and off (about a minute;
# not part of make test). E.g. make bench-gateway BENCH_GATEWAY_ARGS="--users 1000000".
bench-gateway: $(STAMP) gateway-tools
	$(BIN)/python bench/gateway/bench.py $(BENCH_GATEWAY_ARGS)

# Chat fan-out past a stalled reader (both I/O modes), and private messages
# in one process and across two on a real redis-server, for the chat and the
# XMPP example (bench/chat.py; a few minutes; not part of make test).
BENCH_CHAT_ARGS ?=
.PHONY: bench-chat
bench-chat: $(STAMP)
	@$(MAKE) --no-print-directory system-tools SYSTEM_TOOLS="redis-server"
	$(BIN)/python bench/chat.py $(BENCH_CHAT_ARGS)

# The XMPP example (examples/xmpp_stub): `make xmpp` serves localhost on
# $(HOST):$(XMPP_PORT) with STARTTLS required, with a development certificate
# made on first use (build/xmpp/cert). Users live in build/xmpp/users.json:
# add one with `make xmpp-user NAME=alice` (asks for the password), or try it
# without any: make xmpp XMPP_ARGS=--accept-any-password
XMPP_PORT = 5222
XMPP_ARGS ?=
XMPP_DIR := build/xmpp
.PHONY: xmpp xmpp-user

$(XMPP_DIR)/cert/cert.pem: | $(STAMP)
	$(BIN)/netpool cert --out $(XMPP_DIR)/cert

xmpp: $(STAMP) $(XMPP_DIR)/cert/cert.pem
	$(BIN)/netpool xmpp --host $(HOST) --port $(XMPP_PORT) --domain localhost \
		--certfile $(XMPP_DIR)/cert/cert.pem --keyfile $(XMPP_DIR)/cert/key.pem --require-tls \
		--users $(XMPP_DIR)/users.json $(XMPP_ARGS)

xmpp-user: $(STAMP)
	@test -n "$(NAME)" || { echo "usage: make xmpp-user NAME=alice" >&2; exit 2; }
	$(BIN)/netpool xmpp adduser "$(NAME)" --users $(XMPP_DIR)/users.json

# Coverage-guided fuzzing of the sans-I/O parsers (fuzz/README.md; not part of
# make test, which replays the committed corpus and crashes instead): each
# target in turn for FUZZ_SECONDS into a scratch copy of its corpus
# (build/fuzz/), with -timeout=1 and -rss_limit_mb=2048; crashes are copied to
# fuzz/crashes/<target>/ and runs, exec/s and cov/ft go to fuzz/report.md.
# The committed corpus changes only with FUZZ_MERGE=1: libFuzzer's -merge=1
# then minimises it plus the run's finds into fuzz/corpus/<target>/ (commit
# that when it adds coverage). FUZZ_TARGETS="http_framer xmpp_parser" runs only those.
FUZZ_SECONDS ?= 60
FUZZ_MERGE ?=
FUZZ_TARGETS ?=
.PHONY: fuzz
fuzz: $(STAMP)
	@$(BIN)/python -c 'import atheris' 2>/dev/null || $(BIN)/python -m pip install --quiet -e '.[fuzz]'
	$(BIN)/python fuzz/run.py --seconds $(FUZZ_SECONDS) $(if $(FUZZ_MERGE),--merge) $(FUZZ_TARGETS)
