/*
 * loadgen: a small epoll load generator for echo servers, so the client is
 * never the bottleneck of a Python server benchmark.
 *
 *   loadgen pingpong HOST PORT CONNS SIZE SECONDS [tls] [mixed] [line]
 *       CONNS connections each send SIZE bytes and wait for the whole echo
 *       (closed loop); prints messages/s and p50/p99/p999 round-trip latency.
 *       With "mixed", even connections' messages start with 'B' (a server
 *       under test blocks on those) and odd ones' with 'F'; the 'F' half's
 *       latency is also printed on its own (fast_p50_us, fast_p99_us).
 *       With "line", each message ends with a newline, for a line-framed
 *       server.
 *   loadgen connrate HOST PORT SLOTS SECONDS
 *       SLOTS concurrent slots each connect, send 64 bytes, read the echo,
 *       close, and start again; prints connections/s. Connections come from
 *       250 loopback source addresses (see open_conn).
 *   loadgen idle HOST PORT CONNS HOLD_SECONDS
 *       opens CONNS connections and holds them; prints "HOLDING" once all
 *       are up, then checks a fresh client and a sample of held ones echo,
 *       and waits until stdin closes or HOLD_SECONDS pass.
 *
 * Output: one JSON object on stdout. Every phase is bounded in time; only
 * loopback addresses are accepted.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#ifdef WITH_TLS
#include <openssl/err.h>
#include <openssl/ssl.h>
#endif

static struct sockaddr_in target;
static int use_tls, mixed, line;
#ifdef WITH_TLS
static SSL_CTX *tls_ctx;
#endif

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* connrate spreads its connections over 250 source addresses (127.0.1.1 to
 * 127.0.1.250, all loopback). From one source address there are only the
 * 28,000 ephemeral ports, each in TIME_WAIT for a while after its close:
 * past about 14,000 connections a second, connect() spent the client's CPU
 * searching the port range for one it may reuse, and every server measured
 * the same 14,060/s. */
static int spread_sources;
static uint32_t next_source;

static int open_conn(int nonblocking) {
    int fd = socket(AF_INET, SOCK_STREAM | (nonblocking ? SOCK_NONBLOCK : 0), 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (spread_sources) {
        struct sockaddr_in src = {.sin_family = AF_INET, .sin_port = 0};
        src.sin_addr.s_addr = htonl(0x7F000100u + 1 + next_source++ % 250);
        /* the port is chosen at connect(), for the whole 4-tuple */
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) {
            close(fd);
            return -1;
        }
    }
    if (connect(fd, (struct sockaddr *)&target, sizeof target) < 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    return fd;
}

static int cmp_long(const void *a, const void *b) {
    long x = *(const long *)a, y = *(const long *)b;
    return x < y ? -1 : x > y;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* ---------------------------------------------------------------- ping-pong */

typedef struct {
    int fd;
    size_t sent, got;
    double started;
    int handshaking;
#ifdef WITH_TLS
    SSL *ssl;
#endif
} conn_t;

static ssize_t c_write(conn_t *c, const char *buf, size_t n) {
#ifdef WITH_TLS
    if (use_tls) {
        int r = SSL_write(c->ssl, buf, (int)n);
        if (r > 0) return r;
        int e = SSL_get_error(c->ssl, r);
        errno = (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) ? EAGAIN : EIO;
        return -1;
    }
#endif
    return send(c->fd, buf, n, MSG_NOSIGNAL);
}

static ssize_t c_read(conn_t *c, char *buf, size_t n) {
#ifdef WITH_TLS
    if (use_tls) {
        int r = SSL_read(c->ssl, buf, (int)n);
        if (r > 0) return r;
        int e = SSL_get_error(c->ssl, r);
        if (e == SSL_ERROR_ZERO_RETURN) return 0;
        errno = (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) ? EAGAIN : EIO;
        return -1;
    }
#endif
    return recv(c->fd, buf, n, 0);
}

/* Returns 1 when the TLS handshake is done (always for plain TCP), 0 when it
 * must wait, -1 on failure. */
static int c_handshake(conn_t *c) {
#ifdef WITH_TLS
    if (use_tls && c->handshaking) {
        int r = SSL_connect(c->ssl);
        if (r == 1) { c->handshaking = 0; return 1; }
        int e = SSL_get_error(c->ssl, r);
        return (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) ? 0 : -1;
    }
#endif
    (void)c;
    return 1;
}

static int pingpong(int nconns, size_t size, double seconds) {
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    conn_t *conns = calloc(nconns, sizeof *conns);
    char *msg = malloc(size), *buf = malloc(size > 65536 ? size : 65536);
    char *blocking_msg = malloc(size), *fast_msg = malloc(size);
    memset(msg, 'x', size);
    memset(blocking_msg, 'B', size);
    memset(fast_msg, 'F', size);
    if (line && size > 0) msg[size - 1] = blocking_msg[size - 1] = fast_msg[size - 1] = '\n';
    size_t cap = 1 << 20, nlat = 0, fcap = 1 << 20, nfast = 0;
    uint32_t *lat = malloc(cap * sizeof *lat), *fast = malloc(fcap * sizeof *fast);
    long errors = 0;

    /* Connect everything first (blocking, bounded by the kernel's timeout). */
    for (int i = 0; i < nconns; i++) {
        conn_t *c = &conns[i];
        c->fd = open_conn(0);
        if (c->fd < 0) die("connect");
        fcntl(c->fd, F_SETFL, O_NONBLOCK);
#ifdef WITH_TLS
        if (use_tls) {
            c->ssl = SSL_new(tls_ctx);
            SSL_set_fd(c->ssl, c->fd);
            c->handshaking = 1;
        }
#endif
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    }
    /* TLS: finish every handshake before the clock starts (bounded: 30 s). */
    double deadline = now() + 30.0;
    int pending = use_tls ? nconns : 0;
    struct epoll_event events[1024];
    while (pending > 0 && now() < deadline) {
        int n = epoll_wait(ep, events, 1024, 100);
        for (int k = 0; k < n; k++) {
            conn_t *c = &conns[events[k].data.u32];
            if (!c->handshaking) continue;
            int h = c_handshake(c);
            if (h < 0) die("TLS handshake");
            if (h == 1) pending--;
        }
    }
    if (pending > 0) { fprintf(stderr, "loadgen: %d TLS handshakes unfinished\n", pending); return 1; }
    for (int i = 0; i < nconns; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_MOD, conns[i].fd, &ev);
    }

    double t0 = now(), end = t0 + seconds;
#define MSG_OF(i) (mixed ? ((i) % 2 ? fast_msg : blocking_msg) : msg)
    for (int i = 0; i < nconns; i++) {
        conn_t *c = &conns[i];
        c->started = now();
        ssize_t w = c_write(c, MSG_OF(i), size);
        if (w < 0) { errors++; continue; }
        c->sent = (size_t)w;
    }
    long done = 0;
    double t = t0;
    while ((t = now()) < end) {
        int n = epoll_wait(ep, events, 1024, 50);
        for (int k = 0; k < n; k++) {
            uint32_t idx = events[k].data.u32;
            conn_t *c = &conns[idx];
            if (c->sent < size) {  /* rare: a large message that did not fit */
                ssize_t w = c_write(c, MSG_OF(idx) + c->sent, size - c->sent);
                if (w > 0) c->sent += (size_t)w;
            }
            for (;;) {
                ssize_t r = c_read(c, buf, size - c->got);
                if (r < 0) { if (errno != EAGAIN) errors++; break; }
                if (r == 0) { errors++; epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL); break; }
                c->got += (size_t)r;
                if (c->got == size) {
                    double stop = now();
                    if (nlat == cap) { cap *= 2; lat = realloc(lat, cap * sizeof *lat); }
                    lat[nlat++] = (uint32_t)((stop - c->started) * 1e6);
                    if (mixed && idx % 2) {
                        if (nfast == fcap) { fcap *= 2; fast = realloc(fast, fcap * sizeof *fast); }
                        fast[nfast++] = lat[nlat - 1];
                    }
                    done++;
                    c->got = 0;
                    c->started = stop;
                    ssize_t w = c_write(c, MSG_OF(idx), size);
                    c->sent = w > 0 ? (size_t)w : 0;
                    if (w < 0 && errno != EAGAIN) errors++;
                    if (!use_tls) break;  /* level-triggered: come back when more arrives */
                }
            }
        }
    }
    double elapsed = t - t0;
    qsort(lat, nlat, sizeof *lat, cmp_u32);
#define PCT(p) (nlat ? lat[(size_t)((p) * (nlat - 1))] : 0)
    printf("{\"mode\":\"pingpong\",\"tls\":%s,\"conns\":%d,\"size\":%zu,\"seconds\":%.3f,\"messages\":%ld,"
           "\"rate\":%.1f,\"p50_us\":%u,\"p99_us\":%u,\"p999_us\":%u,\"errors\":%ld",
           use_tls ? "true" : "false", nconns, size, elapsed, done, done / elapsed,
           PCT(0.50), PCT(0.99), PCT(0.999), errors);
    if (mixed) {
        qsort(fast, nfast, sizeof *fast, cmp_u32);
#define FPCT(p) (nfast ? fast[(size_t)((p) * (nfast - 1))] : 0)
        printf(",\"fast_messages\":%zu,\"fast_p50_us\":%u,\"fast_p99_us\":%u", nfast, FPCT(0.50), FPCT(0.99));
    }
    printf("}\n");
    return 0;
}

/* ---------------------------------------------------------- connection rate */

typedef struct {
    int fd;
    int stage; /* 0 connecting, 1 reading the echo */
    size_t got;
} slot_t;

static int connrate(int nslots, double seconds) {
    spread_sources = 1;
    int ep = epoll_create1(0);
    slot_t *slots = calloc(nslots, sizeof *slots);
    char msg[64], buf[64];
    memset(msg, 'c', sizeof msg);
    long done = 0, errors = 0;
    struct epoll_event events[1024];
    for (int i = 0; i < nslots; i++) {
        slots[i].fd = open_conn(1);
        if (slots[i].fd < 0) { errors++; continue; }
        struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, slots[i].fd, &ev);
    }
    double t0 = now(), end = t0 + seconds, t = t0;
    while ((t = now()) < end) {
        int n = epoll_wait(ep, events, 1024, 50);
        for (int k = 0; k < n; k++) {
            int i = (int)events[k].data.u32;
            slot_t *s = &slots[i];
            int restart = 0;
            if (s->stage == 0) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err || (events[k].events & (EPOLLERR | EPOLLHUP)) ||
                    send(s->fd, msg, sizeof msg, MSG_NOSIGNAL) != (ssize_t)sizeof msg) {
                    errors++;
                    restart = 1;
                } else {
                    s->stage = 1;
                    s->got = 0;
                    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
                    epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
                }
            } else {
                ssize_t r = recv(s->fd, buf, sizeof buf - s->got, 0);
                if (r > 0) {
                    s->got += (size_t)r;
                    if (s->got == sizeof msg) { done++; restart = 1; }
                } else if (r == 0 || errno != EAGAIN) {
                    errors++;
                    restart = 1;
                }
            }
            if (restart) {
                close(s->fd);  /* the client closes first: TIME_WAIT stays on our side */
                s->fd = open_conn(1);
                s->stage = 0;
                if (s->fd < 0) { errors++; continue; }
                struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)i};
                epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev);
            }
        }
    }
    double elapsed = t - t0;
    printf("{\"mode\":\"connrate\",\"slots\":%d,\"seconds\":%.3f,\"connections\":%ld,\"rate\":%.1f,\"errors\":%ld}\n",
           nslots, elapsed, done, done / elapsed, errors);
    return 0;
}

/* -------------------------------------------------------------------- idle */

/* One blocking echo on a fresh or held socket; returns the round trip in µs or -1. */
static long echo_once(int fd, double timeout) {
    char msg[16] = "are-you-there?!\n", buf[16];
    double t0 = now();
    if (send(fd, msg, sizeof msg, MSG_NOSIGNAL) != (ssize_t)sizeof msg) return -1;
    size_t got = 0;
    while (got < sizeof msg) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int left = (int)((t0 + timeout - now()) * 1000);
        if (left <= 0 || poll(&p, 1, left) <= 0) return -1;
        ssize_t r = recv(fd, buf + got, sizeof buf - got, 0);
        if (r <= 0) { if (r < 0 && errno == EAGAIN) continue; return -1; }
        got += (size_t)r;
    }
    return (long)((now() - t0) * 1e6);
}

static int idle(int nconns, double hold) {
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    if (rl.rlim_cur < rl.rlim_max) { rl.rlim_cur = rl.rlim_max; setrlimit(RLIMIT_NOFILE, &rl); }
    int *fds = calloc(nconns, sizeof *fds);
    int opened = 0;
    double deadline = now() + 60.0;
    for (int i = 0; i < nconns && now() < deadline; i++) {
        fds[i] = open_conn(0);
        if (fds[i] < 0) break;
        opened++;
    }
    /* Round trips: a fresh client 100 times (p50/p99), then a sample of held ones. */
    long fresh[100];
    int nfresh = 0, fresh_failed = 0;
    for (int i = 0; i < 100; i++) {
        int fd = open_conn(0);
        long us = fd >= 0 ? echo_once(fd, 5.0) : -1;
        if (fd >= 0) close(fd);
        if (us < 0) fresh_failed++; else fresh[nfresh++] = us;
    }
    int sample = opened < 100 ? opened : 100, sample_ok = 0;
    for (int i = 0; i < sample; i++) {
        int idx = (int)((long)i * opened / sample);
        if (echo_once(fds[idx], 5.0) >= 0) sample_ok++;
    }
    qsort(fresh, nfresh, sizeof *fresh, cmp_long);
    printf("HOLDING\n");
    fflush(stdout);
    /* Hold until the driver closes our stdin (it measures the server's RSS meanwhile). */
    struct pollfd p = {.fd = 0, .events = POLLIN};
    double stop = now() + hold;
    char sink[64];
    while (now() < stop) {
        int left = (int)((stop - now()) * 1000);
        if (poll(&p, 1, left) > 0 && read(0, sink, sizeof sink) <= 0) break;
    }
    printf("{\"mode\":\"idle\",\"requested\":%d,\"opened\":%d,\"fresh_ok\":%d,\"fresh_failed\":%d,"
           "\"fresh_p50_us\":%ld,\"fresh_p99_us\":%ld,\"sample\":%d,\"sample_ok\":%d}\n",
           nconns, opened, nfresh, fresh_failed, nfresh ? fresh[nfresh / 2] : -1,
           nfresh ? fresh[(nfresh * 99) / 100 - (nfresh >= 1)] : -1, sample, sample_ok);
    for (int i = 0; i < opened; i++) close(fds[i]);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: loadgen pingpong HOST PORT CONNS SIZE SECONDS [tls]\n"
                        "       loadgen connrate HOST PORT SLOTS SECONDS\n"
                        "       loadgen idle HOST PORT CONNS HOLD_SECONDS\n");
        return 2;
    }
    target.sin_family = AF_INET;
    target.sin_port = htons((uint16_t)atoi(argv[3]));
    if (inet_pton(AF_INET, argv[2], &target.sin_addr) != 1 || (ntohl(target.sin_addr.s_addr) >> 24) != 127) {
        fprintf(stderr, "loadgen: only loopback addresses (127.0.0.0/8) are allowed\n");
        return 2;
    }
    if (!strcmp(argv[1], "pingpong") && argc >= 7) {
        for (int k = 7; k < argc; k++) {
            if (!strcmp(argv[k], "tls")) {
#ifdef WITH_TLS
                use_tls = 1;
                tls_ctx = SSL_CTX_new(TLS_client_method());
                SSL_CTX_set_verify(tls_ctx, SSL_VERIFY_NONE, NULL); /* a benchmark of the server, not of trust */
#else
                fprintf(stderr, "loadgen: built without TLS\n");
                return 2;
#endif
            } else if (!strcmp(argv[k], "mixed")) {
                mixed = 1;
            } else if (!strcmp(argv[k], "line")) {
                line = 1;
            } else {
                fprintf(stderr, "loadgen: unknown pingpong option %s\n", argv[k]);
                return 2;
            }
        }
        return pingpong(atoi(argv[4]), (size_t)atol(argv[5]), atof(argv[6]));
    }
    if (!strcmp(argv[1], "connrate")) return connrate(atoi(argv[4]), atof(argv[5]));
    if (!strcmp(argv[1], "idle")) return idle(atoi(argv[4]), atof(argv[5]));
    fprintf(stderr, "loadgen: unknown mode %s\n", argv[1]);
    return 2;
}
