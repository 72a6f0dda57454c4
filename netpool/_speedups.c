/*
 * netpool._speedups: the two steps every echoed message takes, in C.
 *
 * The pure-Python versions live in netpool/hot_path.py and define the
 * behaviour; this file must do exactly what they do, only without the
 * interpreter's per-bytecode cost, the argument parsing of socket.recv and
 * socket.send, and the GIL hand-over around two system calls that never
 * block (MSG_DONTWAIT). A message then costs about what it costs on uvloop:
 * the user's handler plus a few hundred instructions.
 *
 *   dispatch(events, start, conns, handler, calls, loop, bufsize, now)
 *       serves events[start:] that are plain reads of a raw-framed, set-up,
 *       plaintext connection: recv, count, run the handler. Returns the
 *       index of the first event the loop must serve in Python, or
 *       (index, kind, value) when that event's connection must finish.
 *   send and send_bytes (methods of LoopConnection, installed by hot_path)
 *       one non-blocking send() when nobody else is sending and nothing is
 *       queued; anything else goes to the Python method it replaces. send
 *       frames the message with the connection's encode first (none: raw).
 *
 * Both serve TLS connections too, once configure_tls() has been given
 * OpenSSL's entry points as pyOpenSSL links them: SSL_read and SSL_write are
 * called on the session's SSL pointer directly, under the transport's lock
 * as netpool/tls.py calls them, with the GIL held (the socket is
 * non-blocking, so they cannot wait). That skips what pyOpenSSL adds per
 * call: a cffi buffer, a GIL release and retake, three callback checks and
 * the exception it raises for "would block".
 *
 * The C send takes conn._send_lock without waiting, as every Python send
 * path does with waiting: if another thread holds it (or is just taking it),
 * the Python method waits its turn instead. Testing lock.locked() instead
 * would not do: a thread woken in acquire() owns the lock before it has the
 * GIL to say so.
 *
 * Connection fields are __slots__, read at the offsets of their member
 * descriptors, looked up once by configure().
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <string.h>
#include <limits.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <sys/resource.h>
#include <poll.h>

/* Slot offsets in LoopConnection instances (configure()). */
static Py_ssize_t off_fd, off_setup, off_tls, off_close_reason, off_last_read, off_bytes_in, off_bytes_out,
    off_wr_closed, off_out, off_send_lock, off_offloaded, off_proven, off_busy, off_quick,
    off_inline_after, off_stick_skip, off_encode;
/* Thread mode: an inline handler call longer than this (seconds, wall clock)
 * is reported to loop.call_was_slow (hot_path.OFFLOAD_AFTER). */
static double offload_after = 1e9, offload_long = 1e9;
static PyTypeObject *conn_type;  /* LoopConnection */
static PyTypeObject *plain_type; /* transport.PlainTransport: a connection's transport is this or a TLSTransport */
#define IS_PLAIN(transport) (Py_TYPE(transport) == plain_type)
static PyTypeObject *lock_type;  /* _thread.lock */
static PyObject *lock_acquire, *lock_release; /* _thread.lock's own methods (descriptors) */
static PyObject *str_gen, *str_handed_off, *str_error, *str_eof, *str_send_later, *str_send_bytes_py,
    *str_send_failed, *str_call_was_slow, *str_offload_new, *str_stopping,
    *str_threaded_calls, *str_idle_handlers;
static PyObject *one;

#define RECV_MAX 65536
static char recv_buf[RECV_MAX];

#define SLOT(obj, off) (*(PyObject **)((char *)(obj) + (off)))

/* Kinds in the (index, kind, value) result; hot_path.py names them. */
enum { FINISH = 0, RECV_ERROR = 1, HANDLER_ERROR = 2, TLS_ERROR = 3 };

/* OpenSSL, as pyOpenSSL links it (cryptography's copy, not the system's):
 * its functions by address, from configure_tls(). */
static struct {
    int (*read)(void *ssl, void *buf, int num);
    int (*write)(void *ssl, const void *buf, int num);
    int (*get_error)(const void *ssl, int ret);
    int (*pending)(const void *ssl);
    unsigned long (*err_get)(void);
    unsigned long (*err_peek)(void);
    void (*err_clear)(void);
    const char *(*err_reason_string)(unsigned long e);
    int (*err_get_reason)(unsigned long e);
    int eof_reason;  /* SSL_R_UNEXPECTED_EOF_WHILE_READING, or -1 where OpenSSL has none */
    int write_chunk; /* tls.WRITE_CHUNK */
} ossl;
/* TLSTransport: its class, its slots, and TLSError. */
static PyTypeObject *tls_type;
static Py_ssize_t off_tls_ptr, off_tls_lock, off_tls_closing, off_tls_notified;
static PyObject *tls_error_type;
static PyObject *str_tls, *str_tls_send_failed;
static PyObject *kw_error_tls; /* ("error", "transport") for loop.handed_off(conn, error=exc, transport=tls) */

/* SSL_get_error's codes (stable across OpenSSL versions). */
enum { E_NONE = 0, E_SSL = 1, E_WANT_READ = 2, E_WANT_WRITE = 3, E_SYSCALL = 5, E_ZERO_RETURN = 6 };

static int slot_offset(PyObject *cls, const char *name, Py_ssize_t *off) {
    PyObject *d = PyObject_GetAttrString(cls, name);
    if (d == NULL) return -1;
    if (!PyObject_TypeCheck(d, &PyMemberDescr_Type) ||
        ((PyMemberDescrObject *)d)->d_member->type != T_OBJECT_EX) {
        PyErr_Format(PyExc_TypeError, "%s is not a __slots__ member", name);
        Py_DECREF(d);
        return -1;
    }
    *off = ((PyMemberDescrObject *)d)->d_member->offset;
    Py_DECREF(d);
    return 0;
}

static PyObject *configure(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyType_Check(args[0]) || !PyType_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError,
                        "configure() takes the LoopConnection and PlainTransport classes, OFFLOAD_AFTER and OFFLOAD_LONG");
        return NULL;
    }
    PyObject *cls = args[0];
    double after = PyFloat_AsDouble(args[2]), long_ = PyFloat_AsDouble(args[3]);
    if (PyErr_Occurred()) return NULL;
    if (!(after >= 0) || !(long_ >= 0)) {
        PyErr_SetString(PyExc_ValueError, "configure(): OFFLOAD_AFTER and OFFLOAD_LONG must be >= 0");
        return NULL;
    }
    offload_after = after;
    offload_long = long_;
    if (conn_type != NULL) {
        if ((PyObject *)conn_type == cls) Py_RETURN_NONE;
        PyErr_SetString(PyExc_RuntimeError, "configure() was already called with another class");
        return NULL;
    }
    Py_ssize_t fd, setup, tls, close_reason, last_read, bytes_in, bytes_out, wr_closed, out, send_lock, offloaded,
        proven, busy, quick, inline_after, stick_skip, encode;
    if (slot_offset(cls, "_fd", &fd) || slot_offset(cls, "_setup", &setup) || slot_offset(cls, "transport", &tls) ||
        slot_offset(cls, "close_reason", &close_reason) || slot_offset(cls, "_last_read", &last_read) ||
        slot_offset(cls, "bytes_in", &bytes_in) || slot_offset(cls, "bytes_out", &bytes_out) ||
        slot_offset(cls, "_wr_closed", &wr_closed) || slot_offset(cls, "_out", &out) ||
        slot_offset(cls, "_send_lock", &send_lock) || slot_offset(cls, "_offloaded", &offloaded) ||
        slot_offset(cls, "_proven", &proven) || slot_offset(cls, "_busy", &busy) || slot_offset(cls, "_quick", &quick) ||
        slot_offset(cls, "_inline_after", &inline_after) || slot_offset(cls, "_stick_skip", &stick_skip) ||
        slot_offset(cls, "_encode", &encode))
        return NULL;
    off_fd = fd, off_setup = setup, off_tls = tls, off_close_reason = close_reason, off_last_read = last_read;
    off_bytes_in = bytes_in, off_bytes_out = bytes_out, off_wr_closed = wr_closed, off_out = out;
    off_send_lock = send_lock, off_offloaded = offloaded, off_proven = proven;
    off_busy = busy, off_quick = quick, off_inline_after = inline_after, off_stick_skip = stick_skip;
    off_encode = encode;
    plain_type = (PyTypeObject *)Py_NewRef(args[1]);
    conn_type = (PyTypeObject *)Py_NewRef(cls);
    Py_RETURN_NONE;
}

/* Whether obj is a LoopConnection; the last class seen is remembered, since
 * a listener has one connection class. */
static PyTypeObject *last_conn_class;
static int is_conn(PyObject *obj) {
    PyTypeObject *t = Py_TYPE(obj);
    if (t == last_conn_class) return 1;
    if (!PyType_IsSubtype(t, conn_type)) return 0;
    last_conn_class = t; /* borrowed: a class outlives its instances */
    return 1;
}

/* The descriptor in an int slot, or -1 if it is not one (unset, closed, out of range). */
static int slot_fd(PyObject *conn) {
    PyObject *obj = SLOT(conn, off_fd);
    if (obj == NULL || !PyLong_CheckExact(obj)) return -1;
    long fd = PyLong_AsLong(obj);
    if (fd < 0 || fd > INT_MAX) {
        PyErr_Clear();
        return -1;
    }
    return (int)fd;
}

static void set_slot(PyObject *conn, Py_ssize_t off, PyObject *value) {
    PyObject *old = SLOT(conn, off);
    SLOT(conn, off) = Py_NewRef(value);
    Py_XDECREF(old);
}

/* conn.attr += n for an int slot. */
static int add_to_slot(PyObject *conn, Py_ssize_t off, Py_ssize_t n) {
    PyObject *old = SLOT(conn, off);
    if (old == NULL) {
        PyErr_SetString(PyExc_AttributeError, "byte counter not set");
        return -1;
    }
    if (PyLong_CheckExact(old)) { /* the usual case: no int objects but the result */
        Py_ssize_t v = PyLong_AsSsize_t(old);
        if (v >= 0 && v <= PY_SSIZE_T_MAX - n) {
            PyObject *sum = PyLong_FromSsize_t(v + n);
            if (sum == NULL) return -1;
            set_slot(conn, off, sum);
            Py_DECREF(sum);
            return 0;
        }
        PyErr_Clear();
    }
    PyObject *delta = PyLong_FromSsize_t(n);
    if (delta == NULL) return -1;
    Py_INCREF(old);
    PyObject *sum = PyNumber_Add(old, delta);
    Py_DECREF(delta);
    Py_DECREF(old);
    if (sum == NULL) return -1;
    set_slot(conn, off, sum);
    Py_DECREF(sum);
    return 0;
}

static PyObject *outcome(Py_ssize_t i, int kind, PyObject *value) {
    return Py_BuildValue("(niO)", i, kind, value);
}

/* The exception being raised, normalized, with its traceback attached (the
 * handler_error log prints it). Clears the error indicator. */
static PyObject *take_exception(void) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL) PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
}

/* The monitor took this call's connection: raise loop.handed_off(conn, error=exc, transport=tls). */
static PyObject *raise_handed_off(PyObject *loop, PyObject *conn, PyObject *exc, PyObject *tls) {
    PyObject *args[4] = {loop, conn, exc ? exc : Py_None, tls};
    PyObject *handed = PyObject_VectorcallMethod(str_handed_off, args, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                                 kw_error_tls);
    if (handed == NULL) return NULL;
    PyErr_SetObject((PyObject *)Py_TYPE(handed), handed);
    Py_DECREF(handed);
    return NULL;
}

static int try_lock(PyObject *lock);
static int unlock(PyObject *lock);

/* -- TLS ------------------------------------------------------------------ */

/* The SSL pointer of a TLSTransport the C path may use, or NULL. */
static void *tls_session(PyObject *tls) {
    if (tls_type == NULL || Py_TYPE(tls) != tls_type) return NULL;
    PyObject *lock = SLOT(tls, off_tls_lock), *ptr = SLOT(tls, off_tls_ptr);
    if (lock == NULL || Py_TYPE(lock) != lock_type || ptr == NULL || !PyLong_CheckExact(ptr)) return NULL;
    void *ssl = PyLong_AsVoidPtr(ptr);
    if (ssl == NULL) PyErr_Clear();
    return ssl;
}

/* What an SSL_read or SSL_write returned, read as tls.py reads the exception
 * pyOpenSSL raises for it:
 *   TLS_OK        ret > 0: bytes moved (not from tls_failure)
 *   TLS_WANT      WantReadError or WantWriteError: try again later
 *   TLS_CLOSED    ZeroReturnError: the peer's close_notify
 *   TLS_EOF       SysCallError(-1): the stream ended without close_notify
 *   TLS_OS_ERROR  SysCallError(errno): *code says which
 *   TLS_FAILED    any other SSL.Error: *exc is the TLSError (NULL and an
 *                 exception set if it could not be made)
 * The error queue is left empty, as pyOpenSSL leaves it. */
enum { TLS_OK, TLS_WANT, TLS_CLOSED, TLS_EOF, TLS_OS_ERROR, TLS_FAILED };

/* Said when OpenSSL failed without a reason in its queue (tls._ssl_reason says the same). */
#define NO_REASON "OpenSSL gave no reason"

static PyObject *tls_error_from_queue(void) {
    PyObject *parts = PyList_New(0), *exc = NULL;
    unsigned long e;
    while (parts != NULL && (e = ossl.err_get()) != 0) {
        const char *text = ossl.err_reason_string(e);
        PyObject *part = PyUnicode_DecodeUTF8(text ? text : "", text ? (Py_ssize_t)strlen(text) : 0, "replace");
        if (part == NULL || PyList_Append(parts, part) < 0) Py_CLEAR(parts);
        Py_XDECREF(part);
    }
    ossl.err_clear();
    if (parts == NULL) return NULL;
    PyObject *sep = PyUnicode_FromString("; ");
    PyObject *reason = PyList_GET_SIZE(parts) == 0 ? PyUnicode_FromString(NO_REASON)
                       : sep != NULL               ? PyUnicode_Join(sep, parts)
                                                   : NULL;
    PyObject *message = reason ? PyUnicode_FromFormat("TLS error: %U", reason) : NULL;
    if (message != NULL) exc = PyObject_CallOneArg(tls_error_type, message);
    Py_XDECREF(message);
    Py_XDECREF(reason);
    Py_XDECREF(sep);
    Py_DECREF(parts);
    return exc;
}

static int tls_failure(void *ssl, int ret, int err_no, int *code, PyObject **exc) {
    switch (ossl.get_error(ssl, ret)) {
    case E_WANT_READ:
    case E_WANT_WRITE:
        return TLS_WANT;
    case E_ZERO_RETURN:
    case E_NONE:
        return TLS_CLOSED;
    case E_SYSCALL:
        if (ossl.err_peek() == 0 || err_no != 0) {
            ossl.err_clear();
            if (ret < 0 && err_no != 0) {
                *code = err_no;
                return TLS_OS_ERROR;
            }
            return TLS_EOF;
        }
        break; /* the queue says why */
    case E_SSL: {
        /* OpenSSL 3 reports a missing close_notify this way; pyOpenSSL
         * turns it back into SysCallError(-1). */
        unsigned long e = ossl.err_peek();
        if (e != 0 && ossl.eof_reason >= 0 && ossl.err_get_reason(e) == ossl.eof_reason) {
            ossl.err_clear();
            return TLS_EOF;
        }
        break;
    }
    }
    *exc = tls_error_from_queue();
    return TLS_FAILED;
}

static PyObject *os_error(PyObject *type, int code, const char *text) {
    return PyObject_CallFunction(type, "is", code, text ? text : strerror(code));
}

/* One SSL_read into recv_buf, the session's lock held: the bytes read (> 0),
 * 0 at the end of the stream, or READ_WANT, READ_RESET or READ_TLS_ERROR
 * (with *exc), or READ_PY_ERROR. */
enum { READ_WANT = -1, READ_SLOW = -2, READ_RESET = -3, READ_TLS_ERROR = -4, READ_PY_ERROR = -5 };
static Py_ssize_t read_locked(PyObject *tls, void *ssl, Py_ssize_t bufsize, PyObject **exc) {
    ossl.err_clear(); /* SSL_get_error is only right with an empty queue */
    errno = 0;
    int n = ossl.read(ssl, recv_buf, (int)bufsize);
    if (n > 0) return n;
    int err_no = errno, code = 0;
    int kind = tls_failure(ssl, n, err_no, &code, exc);
    if (kind == TLS_WANT) return READ_WANT;
    if (kind == TLS_CLOSED) return 0;
    set_slot(tls, off_tls_notified, Py_True); /* a broken session gets no close_notify */
    if (kind == TLS_EOF) return 0;
    if (kind == TLS_OS_ERROR) {
        *exc = os_error(PyExc_ConnectionResetError, code, NULL);
        return *exc ? READ_RESET : READ_PY_ERROR;
    }
    return *exc ? READ_TLS_ERROR : READ_PY_ERROR;
}

/* One SSL_read into recv_buf, for dispatch: as read_locked, or READ_SLOW
 * while another thread holds the session (the loop's Python path waits for it). */
static Py_ssize_t tls_read(PyObject *tls, void *ssl, Py_ssize_t bufsize, PyObject **exc) {
    if (SLOT(tls, off_tls_closing) != Py_False) return 0; /* told to close: no SSL_read on a half-shut socket */
    PyObject *lock = SLOT(tls, off_tls_lock);
    int got = try_lock(lock);
    if (got <= 0) return got < 0 ? READ_PY_ERROR : READ_SLOW;
    Py_ssize_t n = read_locked(tls, ssl, bufsize, exc);
    if (unlock(lock) < 0) {
        Py_CLEAR(*exc);
        return READ_PY_ERROR;
    }
    return n;
}

/* Whether OpenSSL holds decrypted bytes epoll cannot see: 1, 0, READ_SLOW if
 * another thread is in the session (let the loop read again), or READ_PY_ERROR. */
static int tls_has_pending(PyObject *tls, void *ssl) {
    PyObject *lock = SLOT(tls, off_tls_lock);
    int got = try_lock(lock);
    if (got <= 0) return got < 0 ? READ_PY_ERROR : READ_SLOW;
    int pending = ossl.pending(ssl) > 0;
    return unlock(lock) < 0 ? READ_PY_ERROR : pending;
}

/* tls_recv(transport, size): TLSTransport.recv_nowait's SSL_read, for a caller
 * that holds the session's lock; what it returns and raises is what that
 * method says. It reads into recv_buf without letting the GIL go (the socket
 * is non-blocking: SSL_read cannot wait), so a read allocates only the bytes
 * it returns. pyOpenSSL's recv allocates `size` bytes per call, and those
 * short-lived 64 KiB blocks, between long-lived ones, fragment malloc's
 * arenas: RSS grew for hours (bench/soak-report.md). */
static PyObject *tls_recv(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "tls_recv() takes a TLSTransport and a size");
        return NULL;
    }
    PyObject *tls = args[0];
    void *ssl = tls_session(tls);
    if (ssl == NULL) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "tls_recv(): not a session the C path serves");
        return NULL;
    }
    Py_ssize_t size = PyLong_AsSsize_t(args[1]);
    if (size == -1 && PyErr_Occurred()) return NULL;
    if (size < 1 || size > RECV_MAX) {
        PyErr_Format(PyExc_ValueError, "tls_recv(): size not in 1..%d", RECV_MAX);
        return NULL;
    }
    PyObject *exc = NULL;
    Py_ssize_t n = read_locked(tls, ssl, size, &exc);
    if (n >= 0) return PyBytes_FromStringAndSize(n ? recv_buf : NULL, n);
    if (n == READ_WANT) exc = PyObject_CallFunction(PyExc_BlockingIOError, "is", EAGAIN, "TLS record not complete");
    if (exc != NULL) { /* READ_RESET, READ_TLS_ERROR, or the BlockingIOError */
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

static PyObject *dispatch(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "dispatch() takes 8 arguments");
        return NULL;
    }
    PyObject *events = args[0], *conns = args[2], *handler = args[3], *calls = args[4], *loop = args[5],
             *now = args[7];
    Py_ssize_t i = PyLong_AsSsize_t(args[1]);
    Py_ssize_t bufsize = PyLong_AsSsize_t(args[6]);
    if ((i == -1 || bufsize == -1) && PyErr_Occurred()) return NULL;
    if (!PyList_CheckExact(events) || !PyDict_CheckExact(conns) || conn_type == NULL ||
        (calls != Py_None && !PyList_CheckExact(calls))) {
        PyErr_SetString(PyExc_TypeError, "dispatch(): bad arguments, or configure() not called");
        return NULL;
    }
    if (i < 0 || bufsize < 1 || bufsize > RECV_MAX) {
        PyErr_Format(PyExc_ValueError, "dispatch(): start must be >= 0 and bufsize in 1..%d", RECV_MAX);
        return NULL;
    }
    for (; i < PyList_GET_SIZE(events); i++) {
        PyObject *event = PyList_GET_ITEM(events, i);
        if (!PyTuple_CheckExact(event) || PyTuple_GET_SIZE(event) != 2) goto slow;
        long ev = PyLong_AsLong(PyTuple_GET_ITEM(event, 1));
        if (ev == -1 && PyErr_Occurred()) return NULL;
        if (ev & EPOLLOUT) goto slow;
        PyObject *conn = PyDict_GetItemWithError(conns, PyTuple_GET_ITEM(event, 0)); /* borrowed */
        if (conn == NULL) {
            if (PyErr_Occurred()) return NULL;
            goto slow;
        }
        if (!is_conn(conn) || SLOT(conn, off_setup) != Py_None || SLOT(conn, off_close_reason) != Py_None)
            goto slow;
        /* Thread mode: an offloaded connection's calls run on threads, which read it too; the
         * full path moves it to them. So does it one with no quick call of its own yet while
         * the handler is known to block (loop.offload_new). */
        if (SLOT(conn, off_offloaded) != Py_False) goto slow;
        if (calls != Py_None && SLOT(conn, off_proven) == Py_False) {
            PyObject *prior = PyObject_GetAttr(loop, str_offload_new);
            if (prior == NULL) return NULL;
            int blocks = PyObject_IsTrue(prior);
            Py_DECREF(prior);
            if (blocks < 0) return NULL;
            if (blocks) goto slow;
        }
        PyObject *tls = SLOT(conn, off_tls); /* borrowed; held across the handler below */
        void *ssl = NULL;
        Py_ssize_t got;
        if (IS_PLAIN(tls)) {
            int fd = slot_fd(conn);
            if (fd < 0) goto slow;
            do {
                got = recv(fd, recv_buf, (size_t)bufsize, MSG_DONTWAIT);
            } while (got < 0 && errno == EINTR);
            if (got < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK) continue;
                PyErr_SetFromErrno(PyExc_OSError);
                PyObject *exc = take_exception();
                PyObject *result = outcome(i, RECV_ERROR, exc);
                Py_DECREF(exc);
                return result;
            }
        } else {
            if ((ssl = tls_session(tls)) == NULL) goto slow;
            PyObject *exc = NULL;
            got = tls_read(tls, ssl, bufsize, &exc);
            if (got < 0) {
                if (got == READ_WANT) continue;
                if (got == READ_SLOW) goto slow;
                if (got == READ_PY_ERROR) return NULL;
                PyObject *result = outcome(i, got == READ_RESET ? RECV_ERROR : TLS_ERROR, exc);
                Py_DECREF(exc);
                return result;
            }
        }
        set_slot(conn, off_last_read, now);
        if (got == 0) return outcome(i, FINISH, str_eof);
        if (add_to_slot(conn, off_bytes_in, got) < 0) return NULL;
        PyObject *data = PyBytes_FromStringAndSize(recv_buf, got);
        if (data == NULL) return NULL;
        /* The call protocol of io_loop: push, call, pop; an empty list at
         * the pop means the monitor handed this call off. */
        Py_INCREF(conn); /* the handler may close it and the loop forget it */
        Py_INCREF(tls);
        if (calls != Py_None) {
            PyObject *gen = PyObject_GetAttr(loop, str_gen);
            if (gen == NULL) goto fail;
            PyObject *next = PyNumber_Add(gen, one);
            Py_DECREF(gen);
            if (next == NULL) goto fail;
            int rc = PyObject_SetAttr(loop, str_gen, next);
            Py_DECREF(next);
            if (rc < 0 || PyList_Append(calls, conn) < 0) goto fail;
        }
        PyObject *call_args[2] = {data, conn};
        struct timespec started;
        if (calls != Py_None) clock_gettime(CLOCK_MONOTONIC, &started);
        PyObject *res = PyObject_Vectorcall(handler, call_args, 2, NULL);
        Py_DECREF(data);
        data = NULL;
        PyObject *exc = NULL;
        if (res == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_Exception)) { /* KeyboardInterrupt and such end the loop */
                if (calls != Py_None && PyList_GET_SIZE(calls) > 0) {
                    PyObject *type, *value, *tb;
                    PyErr_Fetch(&type, &value, &tb);
                    PyList_SetSlice(calls, PyList_GET_SIZE(calls) - 1, PyList_GET_SIZE(calls), NULL);
                    PyErr_Restore(type, value, tb);
                }
                goto fail;
            }
            exc = take_exception();
        } else {
            Py_DECREF(res);
        }
        if (calls != Py_None) {
            Py_ssize_t depth = PyList_GET_SIZE(calls);
            if (depth == 0) {
                raise_handed_off(loop, conn, exc, tls);
                Py_XDECREF(exc);
                Py_DECREF(tls);
                Py_DECREF(conn);
                return NULL;
            }
            if (PyList_SetSlice(calls, depth - 1, depth, NULL) < 0) {
                Py_XDECREF(exc);
                goto fail;
            }
            struct timespec ended;
            clock_gettime(CLOCK_MONOTONIC, &ended);
            double took = (double)(ended.tv_sec - started.tv_sec) + (double)(ended.tv_nsec - started.tv_nsec) * 1e-9;
            if (exc == NULL && took > offload_after) {
                PyObject *seconds = PyFloat_FromDouble(took);
                if (seconds == NULL) goto fail;
                PyObject *r = PyObject_CallMethodObjArgs(loop, str_call_was_slow, conn, seconds, NULL);
                Py_DECREF(seconds);
                if (r == NULL) goto fail;
                Py_DECREF(r);
            } else if (exc == NULL && SLOT(conn, off_proven) == Py_False) {
                set_slot(conn, off_proven, Py_True);
            }
        }
        if (exc != NULL) {
            PyObject *result = outcome(i, HANDLER_ERROR, exc);
            Py_DECREF(exc);
            Py_DECREF(tls);
            Py_DECREF(conn);
            return result;
        }
        int closing = SLOT(conn, off_close_reason) != Py_None;
        int more = 0;
        if (!closing && !IS_PLAIN(tls) && SLOT(conn, off_tls) == tls) {
            /* OpenSSL may hold decrypted bytes epoll cannot see: read this event again. */
            more = tls_has_pending(tls, ssl);
        }
        Py_DECREF(tls);
        Py_DECREF(conn);
        if (closing) return outcome(i, FINISH, str_error);
        if (more == READ_PY_ERROR) return NULL;
        if (more == READ_SLOW) goto slow; /* the loop reads it again, waiting for the session's lock */
        if (more) i--;
        continue;
    fail:
        Py_XDECREF(data);
        Py_DECREF(tls);
        Py_DECREF(conn);
        return NULL;
    slow:
        return PyLong_FromSsize_t(i);
    }
    return PyLong_FromSsize_t(i);
}

/* Taking and dropping conn._send_lock without waiting.
 *
 * Through the lock's own acquire(False)/release() methods this costs about
 * 1,000 instructions a message (argument tuples, keyword parsing): more than
 * the rest of the send. CPython 3.11 and 3.12 lay a _thread.lock out as
 * below, and their acquire()/release() do exactly what try_lock()/unlock()
 * do; module init checks that on a real lock (lock_direct) and otherwise
 * the methods are called. */
typedef struct {
    PyObject_HEAD
    PyThread_type_lock lock_lock;
    PyObject *in_weakreflist;
    char locked;
} thread_lock;
static int lock_direct;

/* 1 if taken, 0 if busy, -1 on an error. */
static int try_lock(PyObject *lock) {
    if (lock_direct) {
        thread_lock *tl = (thread_lock *)lock;
        if (!PyThread_acquire_lock(tl->lock_lock, NOWAIT_LOCK)) return 0;
        tl->locked = 1;
        return 1;
    }
    PyObject *argv[2] = {lock, Py_False};
    PyObject *r = PyObject_Vectorcall(lock_acquire, argv, 2, NULL);
    if (r == NULL) return -1;
    int ok = r == Py_True;
    Py_DECREF(r);
    return ok;
}

static int unlock(PyObject *lock) {
    if (lock_direct) {
        thread_lock *tl = (thread_lock *)lock;
        tl->locked = 0;
        PyThread_release_lock(tl->lock_lock);
        return 0;
    }
    PyObject *r = PyObject_Vectorcall(lock_release, &lock, 1, NULL);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* Whether a real _thread.lock behaves as thread_lock says, under both APIs. */
static int check_lock_layout(PyObject *allocate_lock) {
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030D0000
    if (lock_type->tp_basicsize != (Py_ssize_t)sizeof(thread_lock)) return 0;
    PyObject *lock = PyObject_CallNoArgs(allocate_lock);
    if (lock == NULL) return -1;
    if (Py_TYPE(lock) != lock_type) {
        Py_DECREF(lock);
        return 0;
    }
    thread_lock *tl = (thread_lock *)lock;
    int ok = tl->locked == 0 && tl->lock_lock != NULL;
    PyObject *argv[2] = {lock, Py_False};
    PyObject *r = ok ? PyObject_Vectorcall(lock_acquire, argv, 2, NULL) : NULL;
    if (r != NULL) {
        /* Taken through the method: the flag says so, and the OS lock is busy. */
        ok = r == Py_True && tl->locked == 1 && !PyThread_acquire_lock(tl->lock_lock, NOWAIT_LOCK);
        Py_DECREF(r);
        r = PyObject_Vectorcall(lock_release, &lock, 1, NULL);
        Py_XDECREF(r);
        /* Released through the method: flag clear, OS lock free; then the
         * other way round, which the method must accept. */
        if (r != NULL && ok && tl->locked == 0 && PyThread_acquire_lock(tl->lock_lock, NOWAIT_LOCK)) {
            tl->locked = 1;
            r = PyObject_Vectorcall(lock_release, &lock, 1, NULL);
            Py_XDECREF(r);
            ok = r != NULL && tl->locked == 0;
        } else {
            ok = 0;
        }
    }
    PyErr_Clear();
    Py_DECREF(lock);
    return ok;
#else
    (void)allocate_lock;
    return 0;
#endif
}

static PyObject *send_slow(PyObject *self, PyObject *data) {
    PyObject *argv[2] = {self, data};
    return PyObject_VectorcallMethod(str_send_bytes_py, argv, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
}

/* What the kernel did not take: the Python path's _send_later(data, sent), lock held. */
static PyObject *send_later(PyObject *self, PyObject *data, Py_ssize_t sent) {
    PyObject *sent_obj = PyLong_FromSsize_t(sent);
    if (sent_obj == NULL) return NULL;
    PyObject *argv[3] = {self, data, sent_obj};
    PyObject *r = PyObject_VectorcallMethod(str_send_later, argv, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(sent_obj);
    return r;
}

/* conn.<method>(exc), which closes the connection and raises. */
static PyObject *send_failed(PyObject *self, PyObject *method, PyObject *exc) {
    if (exc == NULL) return NULL;
    PyObject *argv[2] = {self, exc};
    PyObject *r = PyObject_VectorcallMethod(method, argv, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(exc);
    return r;
}

static PyObject *send_plain(PyObject *self, PyObject *data, int fd) {
    /* _wr_closed is set before the descriptor is closed (Connection._finish
     * closes it holding the send lock): fd is still this socket's. */
    Py_ssize_t len = PyBytes_GET_SIZE(data);
    ssize_t sent;
    do {
        sent = send(fd, PyBytes_AS_STRING(data), (size_t)len, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    if (sent == len) return add_to_slot(self, off_bytes_out, len) == 0 ? Py_NewRef(Py_None) : NULL;
    if (sent < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
        PyErr_SetFromErrno(PyExc_OSError);
        return send_failed(self, str_send_failed, take_exception());
    }
    /* The kernel took part, or none: the rest waits, in order, as the
     * Python path would have it wait. */
    return send_later(self, data, sent < 0 ? 0 : sent);
}

/* One SSL_write of the first WRITE_CHUNK bytes, as LoopConnection's
 * _send_now does; the rest goes to _send_later. Returns Py_None (a new
 * reference) for "done", NULL on an error, or Py_Ellipsis (borrowed) when
 * another thread is in the session and the Python method must wait for it. */
static PyObject *send_tls(PyObject *self, PyObject *tls, void *ssl, PyObject *data) {
    PyObject *lock = SLOT(tls, off_tls_lock);
    int got = try_lock(lock);
    if (got <= 0) return got < 0 ? NULL : Py_Ellipsis;
    Py_ssize_t len = PyBytes_GET_SIZE(data);
    int chunk = len < ossl.write_chunk ? (int)len : ossl.write_chunk;
    ossl.err_clear();
    errno = 0;
    int n = ossl.write(ssl, PyBytes_AS_STRING(data), chunk);
    int err_no = errno, code = 0;
    PyObject *exc = NULL;
    int kind = n > 0 ? TLS_OK : tls_failure(ssl, n, err_no, &code, &exc);
    if (unlock(lock) < 0) {
        Py_XDECREF(exc);
        return NULL;
    }
    if (n == len) return add_to_slot(self, off_bytes_out, len) == 0 ? Py_NewRef(Py_None) : NULL;
    if (kind == TLS_OK || kind == TLS_WANT) return send_later(self, data, kind == TLS_OK ? n : 0);
    switch (kind) {
    case TLS_CLOSED:
        return send_failed(self, str_send_failed, os_error(PyExc_BrokenPipeError, EPIPE, "peer closed the TLS session"));
    case TLS_EOF:
        return send_failed(self, str_send_failed, os_error(PyExc_ConnectionResetError, EPIPE, NULL));
    case TLS_OS_ERROR:
        return send_failed(self, str_send_failed, os_error(PyExc_ConnectionResetError, code, NULL));
    default:
        return send_failed(self, str_tls_send_failed, exc);
    }
}

static PyObject *send_bytes(PyObject *self, PyObject *data) {
    if (!PyBytes_CheckExact(data)) return send_slow(self, data);
    PyObject *lock = SLOT(self, off_send_lock);
    PyObject *tls = SLOT(self, off_tls);
    if (lock == NULL || Py_TYPE(lock) != lock_type || (!IS_PLAIN(tls) && tls_session(tls) == NULL))
        return send_slow(self, data); /* a TLS session only Python can drive: no need to try the lock */
    Py_INCREF(lock); /* _send_later runs Python code: keep the lock we took alive */
    int got = try_lock(lock);
    if (got <= 0) {
        Py_DECREF(lock);
        return got < 0 ? NULL : send_slow(self, data); /* busy: wait in the Python path */
    }
    PyObject *r = NULL;
    PyObject *out = SLOT(self, off_out);
    tls = SLOT(self, off_tls); /* again, under the lock start_tls() holds */
    void *ssl = IS_PLAIN(tls) ? NULL : tls_session(tls);
    int fd = IS_PLAIN(tls) ? slot_fd(self) : 0;
    if (SLOT(self, off_wr_closed) != Py_False || out == NULL ||
        (out != Py_None && (!PyByteArray_CheckExact(out) || PyByteArray_GET_SIZE(out) > 0)) || fd < 0 ||
        (!IS_PLAIN(tls) && ssl == NULL)) {
        /* Closed, or a queue to join: the Python method decides. */
        if (unlock(lock) == 0) r = send_slow(self, data);
        Py_DECREF(lock);
        return r;
    }
    if (IS_PLAIN(tls)) {
        r = send_plain(self, data, fd);
    } else {
        Py_INCREF(tls);
        r = send_tls(self, tls, ssl, data);
        Py_DECREF(tls);
    }
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (unlock(lock) < 0) {
        if (r != Py_Ellipsis) Py_CLEAR(r);
        r = NULL;
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
    } else {
        PyErr_Restore(type, value, tb);
        if (r == Py_Ellipsis) r = send_slow(self, data); /* the session is busy: the Python method waits */
    }
    Py_DECREF(lock);
    return r;
}

/* Connection.send: the framer's encode (None with raw framing, where a
 * message is its bytes), then send_bytes; no Python frame in between. */
static PyObject *send_message(PyObject *self, PyObject *message) {
    PyObject *encode = SLOT(self, off_encode);
    if (encode == NULL || encode == Py_None) return send_bytes(self, message);
    PyObject *data = PyObject_CallOneArg(encode, message);
    if (data == NULL) return NULL;
    PyObject *r = send_bytes(self, data);
    Py_DECREF(data);
    return r;
}

static PyMethodDef send_bytes_def = {
    "send_bytes", (PyCFunction)send_bytes, METH_O,
    "Send bytes as they are, bypassing the framer (same guarantees as send()).",
};

static PyMethodDef send_def = {
    "send", (PyCFunction)send_message, METH_O,
    "Send one message, framed by the listener's framer; whole or not at all.",
};

static PyObject *send_methods(PyObject *mod, PyObject *cls) {
    if (conn_type == NULL || !PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, conn_type)) {
        PyErr_SetString(PyExc_TypeError, "send_methods() takes the class given to configure(), after it");
        return NULL;
    }
    PyObject *send = PyDescr_NewMethod((PyTypeObject *)cls, &send_def);
    if (send == NULL) return NULL;
    PyObject *bytes = PyDescr_NewMethod((PyTypeObject *)cls, &send_bytes_def);
    if (bytes == NULL) {
        Py_DECREF(send);
        return NULL;
    }
    PyObject *r = PyTuple_Pack(2, send, bytes);
    Py_DECREF(send);
    Py_DECREF(bytes);
    return r;
}

/* epoll_wait(epfd, timeout) -> [(fd, events), ...], as select.epoll.poll
 * gives them, for less: that builds each pair through Py_BuildValue's
 * format parser and allocates room for 1,023 events per call. */
#define MAX_EVENTS 512
static PyObject *wait_events(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "epoll_wait() takes an epoll descriptor and a timeout in seconds");
        return NULL;
    }
    long epfd = PyLong_AsLong(args[0]);
    if (epfd == -1 && PyErr_Occurred()) return NULL;
    double timeout = PyFloat_AsDouble(args[1]);
    if (timeout == -1.0 && PyErr_Occurred()) return NULL;
    if (epfd < 0 || epfd > INT_MAX || timeout > INT_MAX / 1000) {
        PyErr_SetString(PyExc_ValueError, "epoll_wait(): bad descriptor or timeout");
        return NULL;
    }
    int ms = timeout < 0 ? -1 : (int)(timeout * 1000.0 + 0.999); /* rounded up, as select.epoll does */
    struct epoll_event events[MAX_EVENTS];
    int n;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        n = epoll_wait((int)epfd, events, MAX_EVENTS, ms);
        Py_END_ALLOW_THREADS
        if (n >= 0 || errno != EINTR) break;
        if (PyErr_CheckSignals() < 0) return NULL; /* PEP 475: retry unless a handler raised */
    }
    if (n < 0) return PyErr_SetFromErrno(PyExc_OSError);
    PyObject *list = PyList_New(n);
    if (list == NULL) return NULL;
    for (int i = 0; i < n; i++) {
        PyObject *fd = PyLong_FromLong(events[i].data.fd);
        PyObject *ev = PyLong_FromUnsignedLong(events[i].events);
        PyObject *pair = fd && ev ? PyTuple_New(2) : NULL;
        if (pair == NULL) {
            Py_XDECREF(fd);
            Py_XDECREF(ev);
            Py_DECREF(list);
            return NULL;
        }
        PyTuple_SET_ITEM(pair, 0, fd);
        PyTuple_SET_ITEM(pair, 1, ev);
        PyList_SET_ITEM(list, i, pair);
    }
    return list;
}

/* configure_tls(TLSTransport, TLSError, functions, eof_reason, write_chunk):
 * functions are the addresses of SSL_read, SSL_write, SSL_get_error,
 * SSL_pending, ERR_get_error, ERR_peek_error, ERR_clear_error,
 * ERR_reason_error_string and ERR_GET_REASON in the OpenSSL pyOpenSSL uses
 * (netpool/tls.py takes them from its cffi library). Once. */
static PyObject *configure_tls(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5 || !PyType_Check(args[0]) || !PyType_Check(args[1]) || !PyTuple_CheckExact(args[2]) ||
        PyTuple_GET_SIZE(args[2]) != 9) {
        PyErr_SetString(PyExc_TypeError,
                        "configure_tls(transport_class, error_class, (9 function addresses), eof_reason, write_chunk)");
        return NULL;
    }
    if (tls_type != NULL) {
        if ((PyObject *)tls_type == args[0]) Py_RETURN_NONE;
        PyErr_SetString(PyExc_RuntimeError, "configure_tls() was already called with another class");
        return NULL;
    }
    void *fn[9];
    for (int k = 0; k < 9; k++) {
        fn[k] = PyLong_AsVoidPtr(PyTuple_GET_ITEM(args[2], k));
        if (fn[k] == NULL) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "configure_tls(): a function address is 0");
            return NULL;
        }
    }
    long eof_reason = PyLong_AsLong(args[3]), write_chunk = PyLong_AsLong(args[4]);
    if ((eof_reason == -1 || write_chunk == -1) && PyErr_Occurred()) return NULL;
    if (write_chunk < 1 || write_chunk > INT_MAX || eof_reason < -1 || eof_reason > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "configure_tls(): bad eof_reason or write_chunk");
        return NULL;
    }
    Py_ssize_t ptr, lock, closing, notified;
    if (slot_offset(args[0], "_ssl_ptr", &ptr) || slot_offset(args[0], "_lock", &lock) ||
        slot_offset(args[0], "closing", &closing) || slot_offset(args[0], "_notified", &notified))
        return NULL;
    ossl.read = (int (*)(void *, void *, int))fn[0];
    ossl.write = (int (*)(void *, const void *, int))fn[1];
    ossl.get_error = (int (*)(const void *, int))fn[2];
    ossl.pending = (int (*)(const void *))fn[3];
    ossl.err_get = (unsigned long (*)(void))fn[4];
    ossl.err_peek = (unsigned long (*)(void))fn[5];
    ossl.err_clear = (void (*)(void))fn[6];
    ossl.err_reason_string = (const char *(*)(unsigned long))fn[7];
    ossl.err_get_reason = (int (*)(unsigned long))fn[8];
    ossl.eof_reason = (int)eof_reason;
    ossl.write_chunk = (int)write_chunk;
    off_tls_ptr = ptr, off_tls_lock = lock, off_tls_closing = closing, off_tls_notified = notified;
    tls_error_type = Py_NewRef(args[1]);
    tls_type = (PyTypeObject *)Py_NewRef(args[0]); /* last: the C path serves TLS from here on */
    Py_RETURN_NONE;
}

static PyObject *tls_configured(PyObject *mod, PyObject *unused) {
    return PyBool_FromLong(tls_type != NULL);
}

/* recv_nowait(fd, bufsize) -> bytes, or None when nothing is there; OSError on errors.
 * Without letting the GIL go: the call cannot wait (MSG_DONTWAIT), and a thread
 * that lets the GIL go with many others waiting for it queues for it again. */
static PyObject *recv_nowait(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "recv_nowait() takes a descriptor and a size");
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    Py_ssize_t size = PyLong_AsSsize_t(args[1]);
    if ((fd == -1 || size == -1) && PyErr_Occurred()) return NULL;
    if (fd < 0 || fd > INT_MAX || size < 1 || size > RECV_MAX) {
        PyErr_Format(PyExc_ValueError, "recv_nowait(): bad descriptor, or size not in 1..%d", RECV_MAX);
        return NULL;
    }
    char buf[RECV_MAX];
    Py_ssize_t got;
    do {
        got = recv((int)fd, buf, (size_t)size, MSG_DONTWAIT);
    } while (got < 0 && errno == EINTR);
    if (got < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) Py_RETURN_NONE;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyBytes_FromStringAndSize(buf, got);
}

/* rearm(epfd, fd, events): epoll_ctl(EPOLL_CTL_MOD) without letting the GIL go (see recv_nowait). */
static PyObject *rearm(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "rearm() takes an epoll descriptor, a descriptor and events");
        return NULL;
    }
    long epfd = PyLong_AsLong(args[0]), fd = PyLong_AsLong(args[1]);
    unsigned long events = PyLong_AsUnsignedLong(args[2]);
    if (PyErr_Occurred()) return NULL;
    if (epfd < 0 || epfd > INT_MAX || fd < 0 || fd > INT_MAX || events > UINT_MAX) {
        PyErr_SetString(PyExc_ValueError, "rearm(): bad descriptor or events");
        return NULL;
    }
    struct epoll_event ev = {.events = (uint32_t)events, .data.fd = (int)fd};
    if (epoll_ctl((int)epfd, EPOLL_CTL_MOD, (int)fd, &ev) < 0) return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* Thread mode's test of whether a slow call blocked (io_loop.call_was_slow):
 * mark() notes this thread's CPU time and voluntary context switches (one
 * getrusage, once per batch of events); since_mark() gives the time the
 * thread spent off the CPU since then (wall minus CPU) and how often it gave
 * the CPU up itself, and marks again. A call that slept or waited gives the
 * CPU up; one that was only long (a collection, a computation) or was
 * preempted does not. Per thread: the loop's owner changes at hand-offs. */
struct usage {
    double wall, cpu;
    long voluntary;
};
static _Thread_local struct usage usage_mark;

static int read_usage(struct usage *u) {
    struct rusage ru;
    struct timespec ts;
    if (getrusage(RUSAGE_THREAD, &ru) < 0 || clock_gettime(CLOCK_MONOTONIC, &ts) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    u->wall = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    u->cpu = (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) + (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1e-6;
    u->voluntary = ru.ru_nvcsw;
    return 0;
}

/* Since *then: the time off the CPU and the voluntary context switches; *then becomes now. */
static int usage_since(struct usage *then, double *off_cpu, long *gave_up) {
    struct usage now;
    if (read_usage(&now) < 0) return -1;
    *off_cpu = (now.wall - then->wall) - (now.cpu - then->cpu);
    *gave_up = now.voluntary - then->voluntary;
    *then = now;
    return 0;
}

static PyObject *mark(PyObject *mod, PyObject *unused) {
    if (read_usage(&usage_mark) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *since_mark(PyObject *mod, PyObject *unused) {
    double off_cpu;
    long gave_up;
    if (usage_since(&usage_mark, &off_cpu, &gave_up) < 0) return NULL;
    return Py_BuildValue("(dl)", off_cpu, gave_up);
}

/* serve_offloaded(loop, crew, conn, handler, epfd, bufsize, read_ahead, events, stick, stick_waits,
 * stick_skip): a handler thread's turn with a claimed, plain, raw-framed offloaded connection
 * (io_loop._run_calls in C): read, run the handler on each read (timed), read on up to
 * read_ahead times (waiting up to stick seconds for the client, stick_waits times at most, when
 * may_stick allows), then arm the connection again in epfd with events and release it
 * (conn._busy = False), all with the GIL held but for the handler's own calls and the waits,
 * so the release and io_loop's close cannot interleave (the claim keeps the descriptor open
 * through a wait). Returns None when done so, else (kind, value, calls, slow) for the Python path
 * to finish the turn: FINISH (value: the reason), RECV_ERROR or HANDLER_ERROR (value: the
 * exception), or REST (value None: anything else, such as coming back inline). */
enum { REST = 4 };

static int set_int_slot(PyObject *conn, Py_ssize_t off, Py_ssize_t v) {
    PyObject *obj = PyLong_FromSsize_t(v);
    if (obj == NULL) return -1;
    set_slot(conn, off, obj);
    Py_DECREF(obj);
    return 0;
}

/* Whether a handler thread should wait on this connection for its next message: not while
 * the connection sits out after a wait that timed out (each call here counts one of its
 * conn._stick_skip chances down), and only
 * while another handler thread is there for the other connections' events
 * (crew.idle: handler_threads.HandlerThreads), so that none of them waits for this one. 1 yes,
 * 0 no, -1 on an error. */
static int may_stick(PyObject *crew, PyObject *conn) {
    PyObject *skip = SLOT(conn, off_stick_skip);
    if (skip == NULL || !PyLong_CheckExact(skip)) return 0;
    Py_ssize_t left = PyLong_AsSsize_t(skip);
    if (left > 0) return set_int_slot(conn, off_stick_skip, left - 1) < 0 ? -1 : 0;
    PyObject *idle = PyObject_GetAttr(crew, str_idle_handlers);
    if (idle == NULL) return -1;
    int yes = PyLong_Check(idle) && Py_SIZE(idle) > 0; /* a positive int */
    Py_DECREF(idle);
    return yes;
}

static PyObject *serve_offloaded(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "serve_offloaded() takes 11 arguments");
        return NULL;
    }
    PyObject *loop = args[0], *crew = args[1], *conn = args[2], *handler = args[3];
    long epfd = PyLong_AsLong(args[4]);
    Py_ssize_t bufsize = PyLong_AsSsize_t(args[5]), read_ahead = PyLong_AsSsize_t(args[6]);
    unsigned long events = PyLong_AsUnsignedLong(args[7]);
    double stick = PyFloat_AsDouble(args[8]);
    Py_ssize_t stick_waits = PyLong_AsSsize_t(args[9]), stick_skip = PyLong_AsSsize_t(args[10]);
    if (PyErr_Occurred()) return NULL;
    struct timespec stick_ts = {.tv_sec = (time_t)stick, .tv_nsec = (long)((stick - (double)(time_t)stick) * 1e9)};
    if (conn_type == NULL || !is_conn(conn) || epfd < 0 || epfd > INT_MAX || bufsize < 1 || bufsize > RECV_MAX ||
        events > UINT_MAX) {
        PyErr_SetString(PyExc_ValueError, "serve_offloaded(): bad arguments, or configure() not called");
        return NULL;
    }
    int fd = slot_fd(conn);
    if (fd < 0) {
        if (PyErr_Occurred()) return NULL;
        return Py_BuildValue("(iOni)", REST, Py_None, (Py_ssize_t)0, 0);
    }
    Py_ssize_t calls = 0;
    int slow = 0, kind = -1;
    PyObject *value = NULL;
    Py_INCREF(conn);
    Py_ssize_t waits = 0;
    /* What this thread did with the CPU since the turn began or its last wait for the client: a
     * call longer than offload_after counts as slow only if it gave the CPU up for that long (it
     * slept or waited) or ran on it for offload_long, as io_loop.call_was_slow judges inline
     * calls; one the scheduler merely preempted does not restart the quick streak. */
    struct usage since;
    if (read_usage(&since) < 0) goto fail;
    /* Quick calls in a row before this turn, and how many bring it back to the loop: once this
     * turn's calls make up the difference, none of them slow, it stops reading here. */
    PyObject *q0 = SLOT(conn, off_quick), *ia0 = SLOT(conn, off_inline_after);
    Py_ssize_t back_after = q0 != NULL && ia0 != NULL && PyLong_CheckExact(q0) && PyLong_CheckExact(ia0)
                                ? PyLong_AsSsize_t(ia0) - PyLong_AsSsize_t(q0) : PY_SSIZE_T_MAX;
    for (Py_ssize_t reads = 0; reads <= read_ahead; reads++) {
        if (calls >= back_after && !slow) break; /* quick long enough: back to the loop (Python path) */
        if (calls && waits < stick_waits && stick > 0) {
            int want = may_stick(crew, conn);
            if (want < 0) goto fail;
            if (want) {
                /* Wait here for this client's next message, as its own thread would: one
                 * wake-up, and no epoll round trip (re-arm, wait, wake) per message. But
                 * not past another connection's event that finds no thread free: the
                 * handler threads' epoll (epfd) turns readable, and this thread lets the
                 * client go to take it. A waiting thread counted idle may not have taken
                 * its event yet (it waits for the GIL); epoll knows. */
                struct pollfd pfd[2] = {{.fd = fd, .events = POLLIN | POLLRDHUP}, {.fd = (int)epfd, .events = POLLIN}};
                int r;
                Py_BEGIN_ALLOW_THREADS
                r = ppoll(pfd, 2, &stick_ts, NULL);
                Py_END_ALLOW_THREADS
                if (r == 0) {
                    /* Its client is slower than that: it waits in epoll for a while. */
                    if (set_int_slot(conn, off_stick_skip, stick_skip) < 0) goto fail;
                    break;
                }
                if (r < 0 || !pfd[0].revents) break; /* a signal, or others wait: end the turn */
                waits++;
                /* Judged once per turn at most: once a call was slow, no need to measure more. */
                if (!slow && read_usage(&since) < 0) goto fail;
            }
        }
        Py_ssize_t got;
        do {
            got = recv(fd, recv_buf, (size_t)bufsize, MSG_DONTWAIT);
        } while (got < 0 && errno == EINTR);
        if (got < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            PyErr_SetFromErrno(PyExc_OSError);
            kind = RECV_ERROR, value = take_exception();
            goto out;
        }
        struct timespec started, ended;
        clock_gettime(CLOCK_MONOTONIC, &started);
        PyObject *now = PyFloat_FromDouble((double)started.tv_sec + (double)started.tv_nsec * 1e-9);
        if (now == NULL) goto fail;
        set_slot(conn, off_last_read, now);
        Py_DECREF(now);
        if (got == 0) {
            kind = FINISH, value = Py_NewRef(str_eof);
            goto out;
        }
        if (add_to_slot(conn, off_bytes_in, got) < 0) goto fail;
        PyObject *data = PyBytes_FromStringAndSize(recv_buf, got);
        if (data == NULL) goto fail;
        PyObject *call_args[2] = {data, conn};
        PyObject *res = PyObject_Vectorcall(handler, call_args, 2, NULL);
        Py_DECREF(data);
        clock_gettime(CLOCK_MONOTONIC, &ended);
        calls++;
        double took = (double)(ended.tv_sec - started.tv_sec) + (double)(ended.tv_nsec - started.tv_nsec) * 1e-9;
        if (took > offload_after && !slow) {
            /* As hot_path.blocked_since_mark judges. */
            double off_cpu;
            long gave_up;
            if (usage_since(&since, &off_cpu, &gave_up) < 0) {
                Py_XDECREF(res);
                goto fail;
            }
            slow = (off_cpu >= offload_after && gave_up > 0) || took - off_cpu >= offload_long;
        }
        if (res == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_Exception)) goto fail; /* KeyboardInterrupt and such */
            kind = HANDLER_ERROR, value = take_exception();
            goto out;
        }
        Py_DECREF(res);
        if (SLOT(conn, off_close_reason) != Py_None || !IS_PLAIN(SLOT(conn, off_tls))) {
            kind = REST; /* closing, or start_tls() ran: the Python path knows what follows */
            goto out;
        }
    }
    /* Nothing more to read now: arm it again, unless it has earned its way back to the loop or
     * the loop is closing (the Python path does those). */
    Py_ssize_t quick = 0, inline_after = 0;
    PyObject *q = SLOT(conn, off_quick), *ia = SLOT(conn, off_inline_after);
    if (q == NULL || ia == NULL || !PyLong_CheckExact(q) || !PyLong_CheckExact(ia)) {
        kind = REST;
        goto out;
    }
    quick = slow ? 0 : PyLong_AsSsize_t(q) + calls;
    inline_after = PyLong_AsSsize_t(ia);
    PyObject *stopping = PyObject_GetAttr(loop, str_stopping);
    if (stopping == NULL) goto fail;
    int closing = PyObject_IsTrue(stopping);
    Py_DECREF(stopping);
    if (closing < 0) goto fail;
    if (closing || quick >= inline_after) {
        kind = REST;
        goto out;
    }
    if (set_int_slot(conn, off_quick, quick) < 0) goto fail;
    if (calls && !slow && PyObject_SetAttr(loop, str_offload_new, Py_False) < 0) goto fail;
    if (calls) {
        PyObject *total = PyObject_GetAttr(loop, str_threaded_calls);
        if (total == NULL) goto fail;
        PyObject *delta = PyLong_FromSsize_t(calls);
        PyObject *sum = delta ? PyNumber_Add(total, delta) : NULL;
        Py_DECREF(total);
        Py_XDECREF(delta);
        if (sum == NULL) goto fail;
        int rc = PyObject_SetAttr(loop, str_threaded_calls, sum);
        Py_DECREF(sum);
        if (rc < 0) goto fail;
    }
    struct epoll_event ev = {.events = (uint32_t)events, .data.fd = fd};
    epoll_ctl((int)epfd, EPOLL_CTL_MOD, fd, &ev); /* failing only as it closes: the loop finishes it */
    set_slot(conn, off_busy, Py_False);
    Py_DECREF(conn);
    Py_RETURN_NONE;
out:;
    PyObject *result = Py_BuildValue("(iOni)", kind, value ? value : Py_None, calls, slow);
    Py_XDECREF(value);
    Py_DECREF(conn);
    return result;
fail:
    Py_XDECREF(value);
    Py_DECREF(conn);
    return NULL;
}

static PyMethodDef methods[] = {
    {"serve_offloaded", (PyCFunction)(void (*)(void))serve_offloaded, METH_FASTCALL,
     "A handler thread's turn with a plain, raw-framed offloaded connection; see io_loop._run_calls."},
    {"mark", mark, METH_NOARGS, "Note this thread's CPU time and voluntary context switches."},
    {"since_mark", since_mark, METH_NOARGS,
     "(seconds off the CPU, voluntary context switches) since mark(); marks again."},
    {"recv_nowait", (PyCFunction)(void (*)(void))recv_nowait, METH_FASTCALL,
     "recv(fd, size, MSG_DONTWAIT) holding the GIL: bytes, or None when nothing is there."},
    {"tls_recv", (PyCFunction)(void (*)(void))tls_recv, METH_FASTCALL,
     "TLSTransport.recv_nowait's SSL_read into a reused buffer, for a caller holding the session's lock."},
    {"rearm", (PyCFunction)(void (*)(void))rearm, METH_FASTCALL,
     "epoll_ctl(EPOLL_CTL_MOD) holding the GIL."},
    {"epoll_wait", (PyCFunction)(void (*)(void))wait_events, METH_FASTCALL,
     "epoll_wait(epfd, timeout) -> [(fd, events), ...]; what select.epoll.poll returns."},
    {"configure", (PyCFunction)(void (*)(void))configure, METH_FASTCALL,
     "Look up the LoopConnection slot offsets and take OFFLOAD_AFTER; call once."},
    {"dispatch", (PyCFunction)(void (*)(void))dispatch, METH_FASTCALL,
     "Serve the plain reads in events[start:]; see netpool.hot_path."},
    {"send_methods", send_methods, METH_O, "(send, send_bytes) method descriptors for the given connection class."},
    {"configure_tls", (PyCFunction)(void (*)(void))configure_tls, METH_FASTCALL,
     "Give the C path OpenSSL's entry points, so it serves TLS sessions too; call once."},
    {"tls_configured", tls_configured, METH_NOARGS, "Whether configure_tls() has been called."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_speedups", NULL, -1, methods};

PyMODINIT_FUNC PyInit__speedups(void) {
    PyObject *thread = PyImport_ImportModule("_thread");
    if (thread == NULL) return NULL;
    lock_type = (PyTypeObject *)PyObject_GetAttrString(thread, "LockType");
    PyObject *allocate_lock = PyObject_GetAttrString(thread, "allocate_lock");
    Py_DECREF(thread);
    if (lock_type == NULL || allocate_lock == NULL) return NULL;
    lock_acquire = PyObject_GetAttrString((PyObject *)lock_type, "acquire");
    lock_release = PyObject_GetAttrString((PyObject *)lock_type, "release");
    str_gen = PyUnicode_InternFromString("call_count");
    str_handed_off = PyUnicode_InternFromString("handed_off");
    str_error = PyUnicode_InternFromString("error");
    str_eof = PyUnicode_InternFromString("eof");
    str_send_later = PyUnicode_InternFromString("_send_later");
    str_send_bytes_py = PyUnicode_InternFromString("_send_bytes_py");
    str_send_failed = PyUnicode_InternFromString("_send_failed");
    str_call_was_slow = PyUnicode_InternFromString("call_was_slow");
    str_offload_new = PyUnicode_InternFromString("offload_new");
    str_stopping = PyUnicode_InternFromString("stopping");
    str_threaded_calls = PyUnicode_InternFromString("threaded_calls");
    str_idle_handlers = PyUnicode_InternFromString("idle");
    if (!lock_acquire || !lock_release || !str_gen || !str_handed_off || !str_error || !str_eof ||
        !str_send_later || !str_send_bytes_py || !str_send_failed || !str_call_was_slow || !str_offload_new || !str_stopping ||
        !str_threaded_calls || !str_idle_handlers)
        return NULL;
    lock_direct = check_lock_layout(allocate_lock);
    Py_DECREF(allocate_lock);
    if (lock_direct < 0) return NULL;
    str_tls = PyUnicode_InternFromString("transport");
    str_tls_send_failed = PyUnicode_InternFromString("_tls_send_failed");
    kw_error_tls = str_tls ? PyTuple_Pack(2, str_error, str_tls) : NULL;
    one = PyLong_FromLong(1);
    if (kw_error_tls == NULL || str_tls_send_failed == NULL || one == NULL) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && (PyModule_AddIntConstant(m, "RECV_MAX", RECV_MAX) < 0 ||
                      PyModule_AddIntConstant(m, "LOCK_DIRECT", lock_direct) < 0))
        Py_CLEAR(m);
    return m;
}
