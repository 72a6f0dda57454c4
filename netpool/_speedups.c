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
 *   send_bytes (a method of LoopConnection, installed by hot_path)
 *       one non-blocking send() when nobody else is sending and nothing is
 *       queued; anything else goes to the Python method it replaces.
 *
 * Why holding the GIL is enough: the Python send paths run under
 * conn._send_lock and only leave the GIL inside that lock. If the lock is
 * free, no thread is in the middle of a send, and none can start one until
 * this code returns, because nothing here releases the GIL or runs Python
 * code before the bytes are in the kernel.
 *
 * Connection fields are __slots__, read at the offsets of their member
 * descriptors, looked up once by configure().
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <sys/epoll.h>
#include <sys/socket.h>

/* Slot offsets in LoopConnection instances (configure()). */
static Py_ssize_t off_fd, off_setup, off_tls, off_close_reason, off_last_read, off_bytes_in, off_bytes_out,
    off_wr_closed, off_out, off_send_lock;
static PyTypeObject *conn_type;  /* LoopConnection */
static PyTypeObject *lock_type;  /* _thread.lock */
static PyObject *lock_locked;    /* _thread.lock.locked, a method descriptor */
static PyObject *lock_acquire, *lock_release;
static PyObject *str_gen, *str_handed_off, *str_error, *str_eof, *str_send_later, *str_send_bytes_py,
    *str_send_failed;
static PyObject *kw_error; /* ("error",) for loop._handed_off(conn, error=exc) */
static PyObject *one;

#define RECV_MAX 65536
static char recv_buf[RECV_MAX];

#define SLOT(obj, off) (*(PyObject **)((char *)(obj) + (off)))

/* Kinds in the (index, kind, value) result; hot_path.py names them. */
enum { FINISH = 0, RECV_ERROR = 1, HANDLER_ERROR = 2 };

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

static PyObject *configure(PyObject *mod, PyObject *cls) {
    if (!PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "configure() takes the LoopConnection class");
        return NULL;
    }
    if (slot_offset(cls, "_fd", &off_fd) || slot_offset(cls, "_setup", &off_setup) ||
        slot_offset(cls, "_tls", &off_tls) || slot_offset(cls, "close_reason", &off_close_reason) ||
        slot_offset(cls, "_last_read", &off_last_read) || slot_offset(cls, "bytes_in", &off_bytes_in) ||
        slot_offset(cls, "bytes_out", &off_bytes_out) || slot_offset(cls, "_wr_closed", &off_wr_closed) ||
        slot_offset(cls, "_out", &off_out) || slot_offset(cls, "_send_lock", &off_send_lock))
        return NULL;
    Py_XSETREF(conn_type, (PyTypeObject *)Py_NewRef(cls));
    Py_RETURN_NONE;
}

/* conn.attr += n for an int slot. */
static int add_to_slot(PyObject *conn, Py_ssize_t off, Py_ssize_t n) {
    PyObject *old = SLOT(conn, off);
    if (old == NULL) {
        PyErr_SetString(PyExc_AttributeError, "byte counter not set");
        return -1;
    }
    PyObject *delta = PyLong_FromSsize_t(n);
    if (delta == NULL) return -1;
    PyObject *sum = PyNumber_Add(old, delta);
    Py_DECREF(delta);
    if (sum == NULL) return -1;
    SLOT(conn, off) = sum;
    Py_DECREF(old);
    return 0;
}

static void set_slot(PyObject *conn, Py_ssize_t off, PyObject *value) {
    PyObject *old = SLOT(conn, off);
    SLOT(conn, off) = Py_NewRef(value);
    Py_XDECREF(old);
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

/* The monitor took this call's connection: raise loop._handed_off(conn, error=exc). */
static PyObject *raise_handed_off(PyObject *loop, PyObject *conn, PyObject *exc) {
    PyObject *args[3] = {loop, conn, exc};
    PyObject *handed = PyObject_VectorcallMethod(str_handed_off, args,
                                                 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, exc ? kw_error : NULL);
    if (handed == NULL) return NULL;
    PyErr_SetObject((PyObject *)Py_TYPE(handed), handed);
    Py_DECREF(handed);
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
    if (bufsize > RECV_MAX) bufsize = RECV_MAX;
    Py_ssize_t n = PyList_GET_SIZE(events);
    for (; i < n; i++) {
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
        if (!PyObject_TypeCheck(conn, conn_type) || SLOT(conn, off_setup) != Py_False ||
            SLOT(conn, off_close_reason) != Py_None || SLOT(conn, off_tls) != Py_None)
            goto slow;
        PyObject *fdobj = SLOT(conn, off_fd);
        if (fdobj == NULL) goto slow;
        int fd = (int)PyLong_AsLong(fdobj);
        if (fd < 0) {
            if (PyErr_Occurred()) return NULL;
            goto slow;
        }
        ssize_t got;
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
        set_slot(conn, off_last_read, now);
        if (got == 0) return outcome(i, FINISH, str_eof);
        if (add_to_slot(conn, off_bytes_in, got) < 0) return NULL;
        PyObject *data = PyBytes_FromStringAndSize(recv_buf, got);
        if (data == NULL) return NULL;
        /* The call protocol of io_loop: push, call, pop; an empty list at
         * the pop means the monitor handed this call off. */
        Py_INCREF(conn); /* the handler may close it and the loop forget it */
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
        PyObject *res = PyObject_Vectorcall(handler, call_args, 2, NULL);
        Py_DECREF(data);
        data = NULL;
        PyObject *exc = NULL;
        if (res == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_Exception)) { /* KeyboardInterrupt and such end the loop */
                if (calls != Py_None && PyList_GET_SIZE(calls) > 0)
                    PyList_SetSlice(calls, PyList_GET_SIZE(calls) - 1, PyList_GET_SIZE(calls), NULL);
                goto fail;
            }
            exc = take_exception();
        } else {
            Py_DECREF(res);
        }
        if (calls != Py_None) {
            Py_ssize_t depth = PyList_GET_SIZE(calls);
            if (depth == 0) {
                raise_handed_off(loop, conn, exc);
                Py_XDECREF(exc);
                Py_DECREF(conn);
                return NULL;
            }
            if (PyList_SetSlice(calls, depth - 1, depth, NULL) < 0) {
                Py_XDECREF(exc);
                goto fail;
            }
        }
        if (exc != NULL) {
            PyObject *result = outcome(i, HANDLER_ERROR, exc);
            Py_DECREF(exc);
            Py_DECREF(conn);
            return result;
        }
        int closing = SLOT(conn, off_close_reason) != Py_None;
        Py_DECREF(conn);
        if (closing) return outcome(i, FINISH, str_error);
        continue;
    fail:
        Py_XDECREF(data);
        Py_DECREF(conn);
        return NULL;
    slow:
        return PyLong_FromSsize_t(i);
    }
    return PyLong_FromSsize_t(n);
}

/* lock.acquire(False) / lock.release() through the type's own methods. */
static int lock_call(PyObject *method, PyObject *lock, PyObject *arg) {
    PyObject *argv[2] = {lock, arg};
    PyObject *r = PyObject_Vectorcall(method, argv, arg ? 2 : 1, NULL);
    if (r == NULL) return -1;
    int ok = r == Py_True || r == Py_None;
    Py_DECREF(r);
    return ok;
}

static PyObject *send_slow(PyObject *self, PyObject *data) {
    PyObject *argv[2] = {self, data};
    return PyObject_VectorcallMethod(str_send_bytes_py, argv, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
}

static PyObject *send_bytes(PyObject *self, PyObject *data) {
    if (!PyBytes_CheckExact(data)) return send_slow(self, data);
    PyObject *lock = SLOT(self, off_send_lock);
    if (lock == NULL || Py_TYPE(lock) != lock_type) return send_slow(self, data);
    PyObject *held = PyObject_Vectorcall(lock_locked, &lock, 1, NULL);
    if (held == NULL) return NULL;
    Py_DECREF(held);
    PyObject *out = SLOT(self, off_out);
    PyObject *fdobj = SLOT(self, off_fd);
    if (held != Py_False || SLOT(self, off_wr_closed) != Py_False || SLOT(self, off_tls) != Py_None ||
        out == NULL || (out != Py_None && (!PyByteArray_CheckExact(out) || PyByteArray_GET_SIZE(out) > 0)) ||
        fdobj == NULL)
        return send_slow(self, data);
    /* _wr_closed is set before the descriptor is closed (Connection._finish),
     * and the GIL is held from that check to here: fd is still this socket's. */
    int fd = (int)PyLong_AsLong(fdobj);
    if (fd < 0) {
        if (PyErr_Occurred()) return NULL;
        return send_slow(self, data);
    }
    Py_ssize_t len = PyBytes_GET_SIZE(data);
    ssize_t sent;
    do {
        sent = send(fd, PyBytes_AS_STRING(data), (size_t)len, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    if (sent == len) {
        if (add_to_slot(self, off_bytes_out, len) < 0) return NULL;
        Py_RETURN_NONE;
    }
    if (sent < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
        PyErr_SetFromErrno(PyExc_OSError);
        PyObject *exc = take_exception();
        PyObject *argv[2] = {self, exc};
        PyObject *r = PyObject_VectorcallMethod(str_send_failed, argv, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        Py_DECREF(exc);
        return r; /* _send_failed raises */
    }
    /* The kernel took part (or none): the rest waits, in order, under the
     * send lock, as the Python path would (_send_later). The lock is free
     * and the GIL still held, so this acquire cannot fail. */
    if (sent < 0) sent = 0;
    int ok = lock_call(lock_acquire, lock, Py_False);
    if (ok <= 0) {
        if (ok == 0) PyErr_SetString(PyExc_RuntimeError, "send lock taken under the GIL");
        return NULL;
    }
    PyObject *sent_obj = PyLong_FromSsize_t(sent);
    PyObject *r = NULL;
    if (sent_obj != NULL) {
        PyObject *argv[3] = {self, data, sent_obj};
        r = PyObject_VectorcallMethod(str_send_later, argv, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        Py_DECREF(sent_obj);
    }
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (lock_call(lock_release, lock, NULL) < 0) {
        Py_XDECREF(r);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        return NULL;
    }
    PyErr_Restore(type, value, tb);
    return r;
}

static PyMethodDef send_bytes_def = {
    "send_bytes", (PyCFunction)send_bytes, METH_O,
    "Send bytes as they are, bypassing the framer (same guarantees as send()).",
};

static PyObject *send_method(PyObject *mod, PyObject *cls) {
    if (!PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "send_method() takes a class");
        return NULL;
    }
    return PyDescr_NewMethod((PyTypeObject *)cls, &send_bytes_def);
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_O, "Look up the LoopConnection slot offsets; call once."},
    {"dispatch", (PyCFunction)(void (*)(void))dispatch, METH_FASTCALL,
     "Serve the plain reads in events[start:]; see netpool.hot_path.dispatch."},
    {"send_method", send_method, METH_O, "A send_bytes method descriptor for the given connection class."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_speedups", NULL, -1, methods};

PyMODINIT_FUNC PyInit__speedups(void) {
    PyObject *thread = PyImport_ImportModule("_thread");
    if (thread == NULL) return NULL;
    lock_type = (PyTypeObject *)PyObject_GetAttrString(thread, "LockType");
    Py_DECREF(thread);
    if (lock_type == NULL) return NULL;
    lock_locked = PyObject_GetAttrString((PyObject *)lock_type, "locked");
    lock_acquire = PyObject_GetAttrString((PyObject *)lock_type, "acquire");
    lock_release = PyObject_GetAttrString((PyObject *)lock_type, "release");
    str_gen = PyUnicode_InternFromString("_gen");
    str_handed_off = PyUnicode_InternFromString("_handed_off");
    str_error = PyUnicode_InternFromString("error");
    str_eof = PyUnicode_InternFromString("eof");
    str_send_later = PyUnicode_InternFromString("_send_later");
    str_send_bytes_py = PyUnicode_InternFromString("_send_bytes_py");
    str_send_failed = PyUnicode_InternFromString("_send_failed");
    if (!lock_locked || !lock_acquire || !lock_release || !str_gen || !str_handed_off || !str_error || !str_eof ||
        !str_send_later || !str_send_bytes_py || !str_send_failed)
        return NULL;
    kw_error = PyTuple_Pack(1, str_error);
    one = PyLong_FromLong(1);
    if (kw_error == NULL || one == NULL) return NULL;
    return PyModule_Create(&module);
}
