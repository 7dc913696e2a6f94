/*
 * amlx._arraytype: the C core of amlx's Array (amlx/_mlx/array.py subclasses it).
 *
 * Why it exists: an array op made through cffi cost 2-4x what MLX's own
 * bindings cost (benchmarks/ffi_overhead.py). The time went to Python, not to
 * MLX: a Python frame for the operator, cffi's call (a pointer object for the
 * handle, the GIL released and taken again), a Python __del__ frame and a
 * second cffi call to free each array. Here the handle lives in a C field, the
 * operators of the common cases (array with array, Python float or int, and the
 * unary ones) call mlxc directly, and deallocation frees the handle in C.
 *
 * This module does not link against mlxc: amlx/_mlx/array.py hands it the
 * addresses of the few mlxc functions it calls (install), taken from the cffi
 * module, so there is one copy of mlxc (and of its thread-local error text) in
 * the process. Everything else (other operand types, errors' text, the rest of
 * the Array API) stays in Python, through the callables given to install.
 *
 * Calls into mlxc from here keep the GIL: building one graph node takes well
 * under a microsecond, less than releasing and retaking the GIL would.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>
#include <stddef.h>
#include <stdint.h>

#include "mlxc.h"

typedef mlxc_array (*binary_fn)(int, mlxc_array, mlxc_array);
typedef mlxc_array (*binary_float_fn)(int, mlxc_array, double, int);
typedef mlxc_array (*binary_int_fn)(int, mlxc_array, int64_t, int);
typedef int (*unary_fn)(int, mlxc_array, mlxc_array*);
typedef void (*free_fn)(mlxc_array);
typedef int (*shape_fn)(mlxc_array, const int*, int, mlxc_array*);
typedef int (*reduce_fn)(int, mlxc_array, const int*, int, int, mlxc_array*);
typedef int (*ndim_fn)(mlxc_array);
typedef int (*dims_fn)(mlxc_array, int*);
typedef int (*slice_fn)(mlxc_array, const int*, const int*, const int*, int, mlxc_array*);
typedef int (*dtype_fn)(mlxc_array, int, mlxc_array*);
typedef int (*where_fn)(mlxc_array, mlxc_array, mlxc_array, mlxc_array*);
typedef int (*take_fn)(mlxc_array, mlxc_array, int, int, mlxc_array*);
typedef int (*vec_new_fn)(mlxc_vec*);
typedef int (*vec_push_fn)(mlxc_vec, const mlxc_array*, size_t);
typedef void (*vec_free_fn)(mlxc_vec);
typedef int (*list_fn)(mlxc_vec, int, mlxc_array*);

/* These types are the prototypes in mlxc.h written again (this module takes the functions'
   addresses at run time, not at link time): a change there must fail here, not at run time. */
#if defined(__GNUC__)
#define SAME_TYPE(fn_type, fn) \
  _Static_assert(__builtin_types_compatible_p(fn_type, __typeof__(&fn)), #fn " changed in mlxc.h")
SAME_TYPE(binary_fn, mlxc_binary_r);
SAME_TYPE(binary_float_fn, mlxc_binary_float_r);
SAME_TYPE(binary_int_fn, mlxc_binary_int_r);
SAME_TYPE(unary_fn, mlxc_unary);
SAME_TYPE(free_fn, mlxc_array_free);
SAME_TYPE(shape_fn, mlxc_reshape);
SAME_TYPE(shape_fn, mlxc_broadcast_to);
SAME_TYPE(reduce_fn, mlxc_reduce);
SAME_TYPE(ndim_fn, mlxc_array_ndim);
SAME_TYPE(dims_fn, mlxc_array_shape);
SAME_TYPE(slice_fn, mlxc_slice);
SAME_TYPE(shape_fn, mlxc_squeeze);
SAME_TYPE(shape_fn, mlxc_expand_dims);
SAME_TYPE(shape_fn, mlxc_transpose);
SAME_TYPE(where_fn, mlxc_where);
SAME_TYPE(take_fn, mlxc_take);
SAME_TYPE(vec_new_fn, mlxc_vec_new);
SAME_TYPE(vec_push_fn, mlxc_vec_push_many);
SAME_TYPE(vec_free_fn, mlxc_vec_free);
SAME_TYPE(list_fn, mlxc_concatenate);
SAME_TYPE(list_fn, mlxc_stack);
SAME_TYPE(dtype_fn, mlxc_astype);
SAME_TYPE(dtype_fn, mlxc_view);
#undef SAME_TYPE
#endif

/* Set once by install(); every entry point below checks `installed`. */
static int installed = 0;
static binary_fn c_binary;
static binary_float_fn c_binary_float;
static binary_int_fn c_binary_int;
static unary_fn c_unary;
static free_fn c_free;
static PyTypeObject* result_type;  /* the Python Array class: what new arrays are */
static PyObject* py_other;         /* other(code, name, array, operand, reflected) */
static PyObject* py_error;         /* error(name) -> the exception to raise */
static PyTypeObject* dtype_type;   /* amlx._mlx.dtypes.Dtype, for the dtype ops (dtype_function) */
static PyObject* code_name;        /* "code", interned: a Dtype's mlxc code */

#define MAX_DIMS 32 /* (longer shapes or axes go the Python way) */

typedef struct {
  PyObject_HEAD
  mlxc_array h; /* 0 once closed (or never set) */
} ArrayCore;

static PyTypeObject ArrayCore_Type;

static PyObject* closed_error(void) {
  PyErr_SetString(PyExc_ValueError, "array is closed");
  return NULL;
}

static PyObject* not_installed(void) {
  PyErr_SetString(PyExc_RuntimeError, "amlx._arraytype is not installed (import amlx._mlx first)");
  return NULL;
}

/* Raises the exception py_error builds for a failed op (MLX's text, the op's name). */
static PyObject* op_failed(const char* name) {
  PyObject* exc = PyObject_CallFunction(py_error, "s", name);
  if (exc != NULL) {
    PyErr_SetObject((PyObject*)Py_TYPE(exc), exc);
    Py_DECREF(exc);
  }
  return NULL;
}

/* A new Array owning h; h is freed if the object cannot be made. */
static PyObject* adopt(mlxc_array h) {
  ArrayCore* r = (ArrayCore*)result_type->tp_alloc(result_type, 0);
  if (r == NULL) {
    c_free(h);
    return NULL;
  }
  r->h = h;
  return (PyObject*)r;
}

/* op(a, b) where one of a, b is an Array. Operands that are neither an Array nor exactly a
   Python float or int go to `function_fallback(a, b)` when it is given (the ops module's
   functions), else to py_other (the operators: it may answer NotImplemented). */
static PyObject* binary_with(PyObject* a, PyObject* b, int code, const char* name, PyObject* function_fallback) {
  if (!installed) return not_installed();
  int reflected = !PyObject_TypeCheck(a, &ArrayCore_Type);
  PyObject* self = reflected ? b : a;
  PyObject* other = reflected ? a : b;
  mlxc_array h = ((ArrayCore*)self)->h;
  if (h == 0) return closed_error();
  mlxc_array out;
  /* Exactly float and int, as in MLX's bindings: weakly typed scalars that take the
     array's dtype. bool, numpy scalars and subclasses take the Python path. */
  if (PyFloat_CheckExact(other)) {
    out = c_binary_float(code, h, PyFloat_AS_DOUBLE(other), reflected);
  } else if (PyLong_CheckExact(other)) {
    long long v = PyLong_AsLongLong(other);
    if (v == -1 && PyErr_Occurred()) return NULL;
    out = c_binary_int(code, h, (int64_t)v, reflected);
  } else if (PyObject_TypeCheck(other, &ArrayCore_Type)) {
    mlxc_array o = ((ArrayCore*)other)->h;
    if (o == 0) return closed_error();
    out = reflected ? c_binary(code, o, h) : c_binary(code, h, o);
  } else if (function_fallback != NULL) {
    return PyObject_CallFunctionObjArgs(function_fallback, a, b, NULL);
  } else {
    return PyObject_CallFunction(py_other, "isOOi", code, name, self, other, reflected);
  }
  if (out == 0) return op_failed(name);
  return adopt(out);
}

static PyObject* binary(PyObject* a, PyObject* b, int code, const char* name) {
  return binary_with(a, b, code, name, NULL);
}

static PyObject* unary(PyObject* self, int code, const char* name) {
  if (!installed) return not_installed();
  mlxc_array h = ((ArrayCore*)self)->h;
  if (h == 0) return closed_error();
  mlxc_array out = 0;
  if (c_unary(code, h, &out)) return op_failed(name);
  return adopt(out);
}

#define BINARY(slot, code, name) \
  static PyObject* slot(PyObject* a, PyObject* b) { return binary(a, b, code, name); }
BINARY(nb_add, MLXC_ADD, "add")
BINARY(nb_subtract, MLXC_SUBTRACT, "sub")
BINARY(nb_multiply, MLXC_MULTIPLY, "mul")
BINARY(nb_true_divide, MLXC_DIVIDE, "truediv")
BINARY(nb_floor_divide, MLXC_FLOOR_DIVIDE, "floordiv")
BINARY(nb_remainder, MLXC_REMAINDER, "mod")
BINARY(nb_matrix_multiply, MLXC_MATMUL, "matmul")
BINARY(nb_and, MLXC_BITWISE_AND, "and")
BINARY(nb_or, MLXC_BITWISE_OR, "or")
BINARY(nb_xor, MLXC_BITWISE_XOR, "xor")
BINARY(nb_lshift, MLXC_LEFT_SHIFT, "lshift")
BINARY(nb_rshift, MLXC_RIGHT_SHIFT, "rshift")
#undef BINARY

static PyObject* nb_power(PyObject* a, PyObject* b, PyObject* mod) {
  if (mod != Py_None) Py_RETURN_NOTIMPLEMENTED; /* pow(x, y, m): a TypeError, as before */
  return binary(a, b, MLXC_POWER, "pow");
}

static PyObject* nb_negative(PyObject* self) { return unary(self, MLXC_NEGATIVE, "negative"); }
static PyObject* nb_absolute(PyObject* self) { return unary(self, MLXC_ABS, "abs"); }
static PyObject* nb_invert(PyObject* self) { return unary(self, MLXC_BITWISE_INVERT, "bitwise_invert"); }

/* self is always the Array here: for `1.0 < x` Python asks x with the swapped op. */
static PyObject* richcompare(PyObject* self, PyObject* other, int op) {
  switch (op) {
    case Py_EQ: return binary(self, other, MLXC_EQUAL, "eq");
    case Py_NE: return binary(self, other, MLXC_NOT_EQUAL, "ne");
    case Py_LT: return binary(self, other, MLXC_LESS, "lt");
    case Py_LE: return binary(self, other, MLXC_LESS_EQUAL, "le");
    case Py_GT: return binary(self, other, MLXC_GREATER, "gt");
    case Py_GE: return binary(self, other, MLXC_GREATER_EQUAL, "ge");
  }
  Py_RETURN_NOTIMPLEMENTED;
}

/* Frees the handle self owns, if any (none before install: nothing could have made one). */
static void release(PyObject* self) {
  mlxc_array h = ((ArrayCore*)self)->h;
  if (h != 0 && c_free != NULL) {
    ((ArrayCore*)self)->h = 0;
    c_free(h);
  }
}

static void dealloc(PyObject* self) {
  release(self);
  Py_TYPE(self)->tp_free(self);
}

static PyObject* close_method(PyObject* self, PyObject* unused) {
  release(self);
  Py_RETURN_NONE;
}

static PyObject* get_handle(PyObject* self, void* unused) {
  mlxc_array h = ((ArrayCore*)self)->h;
  if (h == 0) return closed_error();
  return PyLong_FromUnsignedLongLong((unsigned long long)h);
}

static shape_fn c_transpose; /* (install_getitem sets it: ArrayCore.T) */

static PyObject* get_transposed(PyObject* self, void* unused) {
  mlxc_array h = ((ArrayCore*)self)->h;
  if (h == 0) return closed_error();
  if (c_transpose == NULL) return not_installed();
  mlxc_array out = 0;
  if (c_transpose(h, NULL, -1, &out)) return op_failed("transpose");
  return adopt(out);
}

static PyObject* get_raw(PyObject* self, void* unused) {
  return PyLong_FromUnsignedLongLong((unsigned long long)((ArrayCore*)self)->h);
}

/* Sets the handle this object owns (0: none). The old one, if any, is the caller's
   to have moved elsewhere: nothing is freed here. */
static int set_raw(PyObject* self, PyObject* value, void* unused) {
  if (value == NULL) {
    PyErr_SetString(PyExc_AttributeError, "an array's handle cannot be deleted");
    return -1;
  }
  unsigned long long v = PyLong_AsUnsignedLongLong(value);
  if (v == (unsigned long long)-1 && PyErr_Occurred()) return -1;
  ((ArrayCore*)self)->h = (mlxc_array)v;
  return 0;
}

/* x.reshape(2, 3) / x.reshape((2, 3)): mlxc_reshape in C for Python ints; anything else (and
   before install_reshape) goes to reshape_fallback(self, *args), the Python method. */
static shape_fn c_reshape;
static PyObject* reshape_fallback;
static int read_ints(PyObject* seq, int* out, int* n);
static int read_int_args(PyObject* const* args, Py_ssize_t nargs, int* out, int* n);

static PyObject* reshape_method(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  int dims[MAX_DIMS];
  int n = 0;
  int ok = c_reshape != NULL &&
           (nargs == 1 && (PyTuple_CheckExact(args[0]) || PyList_CheckExact(args[0])) ? read_ints(args[0], dims, &n)
                                                                                      : read_int_args(args, nargs, dims, &n));
  if (!ok) {
    if (reshape_fallback == NULL) return not_installed();
    PyObject* call_args = PyTuple_New(nargs + 1);
    if (call_args == NULL) return NULL;
    Py_INCREF(self);
    PyTuple_SET_ITEM(call_args, 0, self);
    for (Py_ssize_t i = 0; i < nargs; ++i) {
      Py_INCREF(args[i]);
      PyTuple_SET_ITEM(call_args, i + 1, args[i]);
    }
    PyObject* r = PyObject_Call(reshape_fallback, call_args, NULL);
    Py_DECREF(call_args);
    return r;
  }
  mlxc_array h = ((ArrayCore*)self)->h;
  if (h == 0) return closed_error();
  mlxc_array out = 0;
  if (c_reshape(h, dims, n, &out)) return op_failed("reshape");
  return adopt(out);
}

/* a[index] for basic indices: Python ints, slices with a positive step, None and one Ellipsis,
   on at most MAX_DIMS dimensions; the same steps as amlx/_mlx/indexing.py takes for them (one
   slice where the bounds are not the whole array, the int-indexed axes squeezed, then the new
   axes). Anything else (index arrays, negative steps, numpy integers, and every index that is
   an error, so that its message is the Python one) goes to getitem_fallback(a, index). */
static struct {
  ndim_fn ndim;
  dims_fn dims;
  slice_fn slice;
  shape_fn squeeze;
  shape_fn expand_dims;
} gi;
static PyObject* getitem_fallback;

static PyObject* subscript(PyObject* self, PyObject* index) {
  mlxc_array h = ((ArrayCore*)self)->h;
  if (h == 0) return closed_error();
  if (gi.slice == NULL) goto fallback;
  {
    PyObject* single[1] = {index};
    PyObject* const* items = single;
    Py_ssize_t count = 1;
    if (PyTuple_CheckExact(index)) {
      items = &PyTuple_GET_ITEM(index, 0);
      count = PyTuple_GET_SIZE(index);
    }
    int ndim = gi.ndim(h);
    if (ndim > MAX_DIMS || count > MAX_DIMS) goto fallback;
    int shape[MAX_DIMS];
    if (ndim > 0) gi.dims(h, shape);
    int consumed = 0, ellipses = 0;
    for (Py_ssize_t k = 0; k < count; ++k) {
      PyObject* it = items[k];
      if (it == Py_Ellipsis) {
        ++ellipses;
      } else if (it != Py_None) {
        if (!PyLong_CheckExact(it) && !PySlice_Check(it)) goto fallback;
        ++consumed;
      }
    }
    if (ellipses > 1 || consumed > ndim) goto fallback;
    int start[MAX_DIMS], stop[MAX_DIMS], step[MAX_DIMS], squeeze[MAX_DIMS], added[2 * MAX_DIMS];
    int nsqueeze = 0, nadded = 0, axis = 0, dim = 0;
    for (Py_ssize_t k = 0; k <= count; ++k) {
      /* (k == count: the axes no index named, as slice(None), where there was no Ellipsis) */
      PyObject* it = k < count ? items[k] : NULL;
      int fill = it == Py_Ellipsis ? ndim - consumed : (it == NULL && !ellipses ? ndim - axis : 0);
      for (int f = 0; f < fill; ++f, ++axis, ++dim) {
        start[axis] = 0, stop[axis] = shape[axis], step[axis] = 1;
      }
      if (it == NULL || it == Py_Ellipsis) continue;
      if (it == Py_None) {
        added[nadded++] = dim++;
        continue;
      }
      int n = shape[axis];
      if (PyLong_CheckExact(it)) {
        int overflow = 0;
        long i = PyLong_AsLongAndOverflow(it, &overflow);
        if (overflow || i < -(long)n || i >= (long)n) goto fallback; /* (the Python error) */
        if (i < 0) i += n;
        start[axis] = (int)i, stop[axis] = (int)i + 1, step[axis] = 1;
        squeeze[nsqueeze++] = axis;
      } else {
        Py_ssize_t s0, s1, st;
        if (PySlice_Unpack(it, &s0, &s1, &st) < 0) {
          PyErr_Clear();
          goto fallback;
        }
        PySlice_AdjustIndices(n, &s0, &s1, st);
        if (st <= 0) goto fallback; /* (negative steps gather, in Python) */
        if (s1 < s0) s1 = s0;
        start[axis] = (int)s0, stop[axis] = (int)s1, step[axis] = (int)st;
        ++dim;
      }
      ++axis;
    }
    /* what indexing.py computes: the slice only where it is not the whole array */
    int sliced = 0;
    for (int a = 0; a < ndim; ++a)
      if (start[a] != 0 || stop[a] != shape[a] || step[a] != 1) sliced = 1;
    if (!sliced && nsqueeze == 0 && nadded == 0) {
      Py_INCREF(self); /* (a[:], a[...]: the array itself, as indexing.py returns it) */
      return self;
    }
    /* up to three ops, each on the last one's result (freed once used: the graph holds it) */
    mlxc_array cur = h, out = 0;
    for (int op = 0; op < 3; ++op) {
      int status;
      if (op == 0 && sliced) status = gi.slice(cur, start, stop, step, ndim, &out);
      else if (op == 1 && nsqueeze) status = gi.squeeze(cur, squeeze, nsqueeze, &out);
      else if (op == 2 && nadded) status = gi.expand_dims(cur, added, nadded, &out);
      else continue;
      if (cur != h) c_free(cur);
      if (status) return op_failed("getitem");
      cur = out;
    }
    return adopt(cur);
  }
fallback:
  if (getitem_fallback == NULL) return not_installed();
  return PyObject_CallFunctionObjArgs(getitem_fallback, self, index, NULL);
}

static PyMappingMethods mapping_methods = {
    .mp_subscript = subscript,
};

static PyNumberMethods number_methods = {
    .nb_add = nb_add,
    .nb_subtract = nb_subtract,
    .nb_multiply = nb_multiply,
    .nb_remainder = nb_remainder,
    .nb_power = nb_power,
    .nb_negative = nb_negative,
    .nb_absolute = nb_absolute,
    .nb_invert = nb_invert,
    .nb_lshift = nb_lshift,
    .nb_rshift = nb_rshift,
    .nb_and = nb_and,
    .nb_xor = nb_xor,
    .nb_or = nb_or,
    .nb_floor_divide = nb_floor_divide,
    .nb_true_divide = nb_true_divide,
    .nb_matrix_multiply = nb_matrix_multiply,
};

static PyMethodDef methods[] = {
    {"close", close_method, METH_NOARGS, "Releases the native handle; the array is unusable afterwards."},
    {"reshape", (PyCFunction)(void (*)(void))reshape_method, METH_FASTCALL,
     "reshape(*shape) or reshape(shape): the array with a new shape (one dimension may be -1)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef getset[] = {
    {"handle", get_handle, NULL,
     "The raw mlxc_array (an int), valid only while this Array is alive and open.\n\n"
     "It does not keep the Array alive: `f(make_array().handle)` frees the temporary\n"
     "before `f` runs (a use-after-free). Hold the Array in a variable across the C call.",
     NULL},
    {"T", get_transposed, NULL, "The array with its axes reversed.", NULL},
    {"_h", get_raw, set_raw, "The owned mlxc_array as an int, 0 once closed (for amlx._mlx only).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ArrayCore_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "amlx._arraytype.ArrayCore",
    .tp_basicsize = sizeof(ArrayCore),
    .tp_dealloc = dealloc,
    .tp_as_number = &number_methods,
    .tp_as_mapping = &mapping_methods,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "An MLX array handle owned in C (the base of amlx._mlx.Array).",
    .tp_richcompare = richcompare,
    .tp_methods = methods,
    .tp_getset = getset,
    .tp_new = PyType_GenericNew,
};

static void* address(PyObject* value) {
  unsigned long long v = PyLong_AsUnsignedLongLong(value);
  if (v == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
  if (v == 0) PyErr_SetString(PyExc_ValueError, "a null function address");
  return (void*)(uintptr_t)v;
}

/* address() of each of count objects into fns; 0 (an exception set) at the first that fails. */
static int addresses(PyObject* const* objs, int count, void** fns) {
  for (int i = 0; i < count; ++i)
    if ((fns[i] = address(objs[i])) == NULL) return 0;
  return 1;
}

/* ---- ops as functions (amlx/_mlx/ops.py): exp(a), add(a, b), reshape(a, shape) ----------
   A NativeOp runs the common case in C, as the operators do, and hands any other arguments to
   the Python function it stands in for (`fallback`), which converts them (numpy data, scalars,
   numpy integers in shapes, None axes) and gives the same result and errors as before. */

enum { OP_UNARY = 0, OP_BINARY = 1, OP_SHAPE = 2, OP_REDUCE = 3, OP_DTYPE = 4, OP_AXES = 5, OP_SOFTMAX = 6,
       OP_WHERE = 7, OP_TAKE = 8, OP_LIST = 9 };
#define MAX_LIST 64 /* (longer lists of arrays go the Python way) */

/* OP_LIST's mlxc_vec functions (list_function sets them) */
static vec_new_fn c_vec_new;
static vec_push_fn c_vec_push;
static vec_free_fn c_vec_free;

typedef struct {
  PyObject_HEAD
  vectorcallfunc vectorcall;
  int kind;
  int code;          /* OP_UNARY, OP_BINARY, OP_REDUCE, OP_SOFTMAX: the mlxc op code */
  int code2;         /* OP_SOFTMAX: the op code with precise=True */
  void* fn;          /* OP_SHAPE (shape_fn), OP_REDUCE (reduce_fn), OP_DTYPE (dtype_fn) */
  PyObject* name;    /* str */
  const char* cname; /* its UTF-8, alive with `name` */
  PyObject* fallback;
} NativeOp;

static PyObject* fallback_call(NativeOp* op, PyObject* const* args, size_t nargsf, PyObject* kwnames) {
  return PyObject_Vectorcall(op->fallback, args, nargsf, kwnames);
}

/* Ints given as separate arguments (x.reshape(2, 3)): each an exact Python int within C's int,
   at most MAX_DIMS of them, else 0 (take the Python way; nothing raised). */
static int read_int_args(PyObject* const* args, Py_ssize_t nargs, int* out, int* n) {
  if (nargs > MAX_DIMS) return 0;
  for (Py_ssize_t i = 0; i < nargs; ++i) {
    if (!PyLong_CheckExact(args[i])) return 0;
    int overflow = 0;
    long v = PyLong_AsLongAndOverflow(args[i], &overflow);
    if (overflow || v < INT_MIN || v > INT_MAX) return 0;
    if (v == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      return 0;
    }
    out[i] = (int)v;
  }
  *n = (int)nargs;
  return 1;
}

/* The same for a shape or axes given as one tuple or list. */
static int read_ints(PyObject* seq, int* out, int* n) {
  if (!PyTuple_CheckExact(seq) && !PyList_CheckExact(seq)) return 0;
  return read_int_args(PySequence_Fast_ITEMS(seq), PySequence_Fast_GET_SIZE(seq), out, n);
}

/* A reduction's axis: None (n = -1: every axis), one int, or ints; else 0. */
static int read_axis(PyObject* arg, int* axes, int* n) {
  if (arg == Py_None) {
    *n = -1;
    return 1;
  }
  return PyLong_CheckExact(arg) ? read_int_args(&arg, 1, axes, n) : read_ints(arg, axes, n);
}

static PyObject* native_op_call(PyObject* self, PyObject* const* args, size_t nargsf, PyObject* kwnames) {
  NativeOp* op = (NativeOp*)self;
  Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
  if (!installed) return not_installed();
  if (kwnames != NULL && PyTuple_GET_SIZE(kwnames) > 0) return fallback_call(op, args, nargsf, kwnames);
  switch (op->kind) {
    case OP_UNARY:
      if (nargs == 1 && PyObject_TypeCheck(args[0], &ArrayCore_Type)) return unary(args[0], op->code, op->cname);
      break;
    case OP_BINARY:
      if (nargs == 2 && (PyObject_TypeCheck(args[0], &ArrayCore_Type) || PyObject_TypeCheck(args[1], &ArrayCore_Type)))
        return binary_with(args[0], args[1], op->code, op->cname, op->fallback);
      break;
    case OP_SHAPE: {
      int dims[MAX_DIMS];
      int n = 0;
      if (nargs == 2 && PyObject_TypeCheck(args[0], &ArrayCore_Type) && read_ints(args[1], dims, &n)) {
        mlxc_array h = ((ArrayCore*)args[0])->h;
        if (h == 0) return closed_error();
        mlxc_array out = 0;
        if (((shape_fn)op->fn)(h, dims, n, &out)) return op_failed(op->cname);
        return adopt(out);
      }
      break;
    }
    case OP_AXES: { /* op(a, axes=None): None (or no argument) for all axes, as mlxc takes -1 */
      int axes[MAX_DIMS];
      int n = -1;
      if (nargs < 1 || nargs > 2 || !PyObject_TypeCheck(args[0], &ArrayCore_Type)) break;
      if (nargs == 2 && args[1] != Py_None && !read_ints(args[1], axes, &n)) break;
      mlxc_array h = ((ArrayCore*)args[0])->h;
      if (h == 0) return closed_error();
      mlxc_array out = 0;
      if (((shape_fn)op->fn)(h, n < 0 ? NULL : axes, n, &out)) return op_failed(op->cname);
      return adopt(out);
    }
    case OP_REDUCE:   /* op(a, axis=None, keepdims=False), positional */
    case OP_SOFTMAX: { /* op(a, axis=-1, precise=False), positional */
      int axes[MAX_DIMS];
      int n = op->kind == OP_SOFTMAX ? 1 : -1; /* (the default axis: the last, or all) */
      axes[0] = -1;
      if (nargs < 1 || nargs > 3 || !PyObject_TypeCheck(args[0], &ArrayCore_Type)) break;
      if (nargs >= 2 && !read_axis(args[1], axes, &n)) break;
      if (nargs == 3 && !PyBool_Check(args[2])) break;
      int flag = nargs == 3 && args[2] == Py_True; /* keepdims, or softmax's precise */
      int code = op->kind == OP_SOFTMAX && flag ? op->code2 : op->code;
      mlxc_array h = ((ArrayCore*)args[0])->h;
      if (h == 0) return closed_error();
      mlxc_array out = 0;
      if (((reduce_fn)op->fn)(code, h, axes, n, op->kind == OP_REDUCE && flag, &out)) return op_failed(op->cname);
      return adopt(out);
    }
    case OP_WHERE: { /* op(cond, x, y) of three Arrays */
      if (nargs != 3) break;
      mlxc_array h[3];
      int all_arrays = 1;
      for (int k = 0; k < 3; ++k) {
        if (!PyObject_TypeCheck(args[k], &ArrayCore_Type)) all_arrays = 0;
        else h[k] = ((ArrayCore*)args[k])->h;
      }
      if (!all_arrays) break;
      if (h[0] == 0 || h[1] == 0 || h[2] == 0) return closed_error();
      mlxc_array out = 0;
      if (((where_fn)op->fn)(h[0], h[1], h[2], &out)) return op_failed(op->cname);
      return adopt(out);
    }
    case OP_TAKE: { /* op(a, indices, axis=None) of two Arrays and None or an int */
      if (nargs < 2 || nargs > 3 || !PyObject_TypeCheck(args[0], &ArrayCore_Type) ||
          !PyObject_TypeCheck(args[1], &ArrayCore_Type))
        break;
      int axis = 0, none = 1;
      if (nargs == 3 && args[2] != Py_None) {
        int n = 0;
        if (!PyLong_CheckExact(args[2]) || !read_int_args(args + 2, 1, &axis, &n)) break;
        none = 0;
      }
      mlxc_array a = ((ArrayCore*)args[0])->h, idx = ((ArrayCore*)args[1])->h;
      if (a == 0 || idx == 0) return closed_error();
      mlxc_array out = 0;
      if (((take_fn)op->fn)(a, idx, axis, none, &out)) return op_failed(op->cname);
      return adopt(out);
    }
    case OP_LIST: { /* op(arrays, axis=0): a list or tuple of Arrays and an int */
      if (nargs < 1 || nargs > 2 || (!PyList_CheckExact(args[0]) && !PyTuple_CheckExact(args[0]))) break;
      Py_ssize_t len = PySequence_Fast_GET_SIZE(args[0]);
      if (len < 1 || len > MAX_LIST) break;
      int axis = 0, n = 0;
      if (nargs == 2 && !(PyLong_CheckExact(args[1]) && read_int_args(args + 1, 1, &axis, &n))) break;
      PyObject** items = PySequence_Fast_ITEMS(args[0]);
      mlxc_array hs[MAX_LIST];
      int all_arrays = 1;
      for (Py_ssize_t i = 0; i < len && all_arrays; ++i) {
        if (!PyObject_TypeCheck(items[i], &ArrayCore_Type)) all_arrays = 0;
        else hs[i] = ((ArrayCore*)items[i])->h;
      }
      if (!all_arrays) break;
      for (Py_ssize_t i = 0; i < len; ++i)
        if (hs[i] == 0) return closed_error();
      mlxc_vec v = NULL;
      if (c_vec_new(&v)) return op_failed(op->cname);
      mlxc_array out = 0;
      int failed = c_vec_push(v, hs, (size_t)len) || ((list_fn)op->fn)(v, axis, &out);
      c_vec_free(v);
      if (failed) return op_failed(op->cname);
      return adopt(out);
    }
    case OP_DTYPE: { /* op(a, dtype) for one of amlx's Dtype objects */
      if (nargs != 2 || !PyObject_TypeCheck(args[0], &ArrayCore_Type) || dtype_type == NULL ||
          Py_TYPE(args[1]) != dtype_type)
        break;
      if (code_name == NULL && (code_name = PyUnicode_InternFromString("code")) == NULL) return NULL;
      PyObject* code = PyObject_GetAttr(args[1], code_name);
      if (code == NULL) return NULL;
      long c = PyLong_AsLong(code);
      Py_DECREF(code);
      if (c == -1 && PyErr_Occurred()) return NULL;
      mlxc_array h = ((ArrayCore*)args[0])->h;
      if (h == 0) return closed_error();
      mlxc_array out = 0;
      if (((dtype_fn)op->fn)(h, (int)c, &out)) return op_failed(op->cname);
      return adopt(out);
    }
  }
  return fallback_call(op, args, nargsf, kwnames);
}

static void native_op_dealloc(PyObject* self) {
  NativeOp* op = (NativeOp*)self;
  Py_XDECREF(op->name);
  Py_XDECREF(op->fallback);
  Py_TYPE(self)->tp_free(self);
}

static PyObject* native_op_repr(PyObject* self) {
  return PyUnicode_FromFormat("<amlx op %U>", ((NativeOp*)self)->name);
}

static PyObject* native_op_get_name(PyObject* self, void* unused) {
  PyObject* name = ((NativeOp*)self)->name;
  Py_INCREF(name);
  return name;
}

static PyObject* native_op_get_doc(PyObject* self, void* unused) {
  return PyObject_GetAttrString(((NativeOp*)self)->fallback, "__doc__");
}

static PyObject* native_op_get_wrapped(PyObject* self, void* unused) {
  PyObject* fallback = ((NativeOp*)self)->fallback;
  Py_INCREF(fallback);
  return fallback;
}

static PyGetSetDef native_op_getset[] = {
    {"__name__", native_op_get_name, NULL, "the op's name", NULL},
    {"__doc__", native_op_get_doc, NULL, "the Python function's docstring", NULL},
    {"__wrapped__", native_op_get_wrapped, NULL, "the Python function it stands in for", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

#ifndef Py_TPFLAGS_HAVE_VECTORCALL /* (public from Python 3.12) */
#define Py_TPFLAGS_HAVE_VECTORCALL _Py_TPFLAGS_HAVE_VECTORCALL
#endif

static PyTypeObject NativeOp_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "amlx._arraytype.NativeOp",
    .tp_basicsize = sizeof(NativeOp),
    .tp_dealloc = native_op_dealloc,
    .tp_vectorcall_offset = offsetof(NativeOp, vectorcall),
    .tp_repr = native_op_repr,
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "An array op run in C for Array arguments, by its Python function otherwise.",
    .tp_getset = native_op_getset,
};

static PyObject* make_op(int kind, int code, void* fn, PyObject* name, PyObject* fallback) {
  if (!PyUnicode_Check(name)) {
    PyErr_SetString(PyExc_TypeError, "an op's name is a str");
    return NULL;
  }
  if (!PyCallable_Check(fallback)) {
    PyErr_SetString(PyExc_TypeError, "an op's fallback must be callable");
    return NULL;
  }
  const char* cname = PyUnicode_AsUTF8(name);
  if (cname == NULL) return NULL;
  NativeOp* op = PyObject_New(NativeOp, &NativeOp_Type);
  if (op == NULL) return NULL;
  op->vectorcall = native_op_call;
  op->kind = kind;
  op->code = code;
  op->fn = fn;
  op->code2 = 0;
  Py_INCREF(name);
  op->name = name;
  op->cname = cname;
  Py_INCREF(fallback);
  op->fallback = fallback;
  return (PyObject*)op;
}

static PyObject* unary_function(PyObject* module, PyObject* args) {
  int code;
  PyObject *name, *fallback;
  if (!PyArg_ParseTuple(args, "iUO:unary_function", &code, &name, &fallback)) return NULL;
  return make_op(OP_UNARY, code, NULL, name, fallback);
}

static PyObject* binary_function(PyObject* module, PyObject* args) {
  int code;
  PyObject *name, *fallback;
  if (!PyArg_ParseTuple(args, "iUO:binary_function", &code, &name, &fallback)) return NULL;
  return make_op(OP_BINARY, code, NULL, name, fallback);
}

static PyObject* shape_function(PyObject* module, PyObject* args) {
  PyObject *addr, *name, *fallback;
  if (!PyArg_ParseTuple(args, "OUO:shape_function", &addr, &name, &fallback)) return NULL;
  void* fn = address(addr);
  if (fn == NULL) return NULL;
  return make_op(OP_SHAPE, 0, fn, name, fallback);
}

static PyObject* reduce_function(PyObject* module, PyObject* args) {
  int code;
  PyObject *addr, *name, *fallback;
  if (!PyArg_ParseTuple(args, "OiUO:reduce_function", &addr, &code, &name, &fallback)) return NULL;
  void* fn = address(addr);
  if (fn == NULL) return NULL;
  return make_op(OP_REDUCE, code, fn, name, fallback);
}

static PyObject* axes_function(PyObject* module, PyObject* args) {
  PyObject *addr, *name, *fallback;
  if (!PyArg_ParseTuple(args, "OUO:axes_function", &addr, &name, &fallback)) return NULL;
  void* fn = address(addr);
  if (fn == NULL) return NULL;
  return make_op(OP_AXES, 0, fn, name, fallback);
}

static PyObject* arrays_function(PyObject* module, PyObject* args) {
  PyObject *addr, *kind, *name, *fallback;
  if (!PyArg_ParseTuple(args, "OUUO:arrays_function", &addr, &kind, &name, &fallback)) return NULL;
  int k = PyUnicode_CompareWithASCIIString(kind, "where") == 0 ? OP_WHERE
          : PyUnicode_CompareWithASCIIString(kind, "take") == 0 ? OP_TAKE : -1;
  if (k < 0) {
    PyErr_SetString(PyExc_ValueError, "arrays_function: the kind is 'where' or 'take'");
    return NULL;
  }
  void* fn = address(addr);
  if (fn == NULL) return NULL;
  return make_op(k, 0, fn, name, fallback);
}

static PyObject* list_function(PyObject* module, PyObject* args) {
  PyObject *addr, *a_new, *a_push, *a_free, *name, *fallback;
  if (!PyArg_ParseTuple(args, "OOOOUO:list_function", &addr, &a_new, &a_push, &a_free, &name, &fallback))
    return NULL;
  void* fns[4];
  PyObject* addrs[4] = {addr, a_new, a_push, a_free};
  if (!addresses(addrs, 4, fns)) return NULL;
  c_vec_new = (vec_new_fn)(uintptr_t)fns[1];
  c_vec_push = (vec_push_fn)(uintptr_t)fns[2];
  c_vec_free = (vec_free_fn)(uintptr_t)fns[3];
  return make_op(OP_LIST, 0, fns[0], name, fallback);
}

static PyObject* softmax_function(PyObject* module, PyObject* args) {
  int code, precise_code;
  PyObject *addr, *name, *fallback;
  if (!PyArg_ParseTuple(args, "OiiUO:softmax_function", &addr, &code, &precise_code, &name, &fallback)) return NULL;
  void* fn = address(addr);
  if (fn == NULL) return NULL;
  PyObject* op = make_op(OP_SOFTMAX, code, fn, name, fallback);
  if (op != NULL) ((NativeOp*)op)->code2 = precise_code;
  return op;
}

static PyObject* dtype_function(PyObject* module, PyObject* args) {
  PyObject *addr, *name, *fallback, *type;
  if (!PyArg_ParseTuple(args, "OUOO:dtype_function", &addr, &name, &fallback, &type)) return NULL;
  if (!PyType_Check(type)) {
    PyErr_SetString(PyExc_TypeError, "dtype_function: the dtype class must be a type");
    return NULL;
  }
  void* fn = address(addr);
  if (fn == NULL) return NULL;
  if (dtype_type == NULL) {
    Py_INCREF(type);
    dtype_type = (PyTypeObject*)type;
  } else if ((PyObject*)dtype_type != type) {
    PyErr_SetString(PyExc_RuntimeError, "dtype_function: another dtype class was given before");
    return NULL;
  }
  return make_op(OP_DTYPE, 0, fn, name, fallback);
}

static PyObject* install_getitem(PyObject* module, PyObject* args) {
  PyObject *a_ndim, *a_dims, *a_slice, *a_squeeze, *a_expand, *a_transpose, *fallback;
  if (!PyArg_ParseTuple(args, "OOOOOOO:install_getitem", &a_ndim, &a_dims, &a_slice, &a_squeeze, &a_expand,
                        &a_transpose, &fallback))
    return NULL;
  if (!PyCallable_Check(fallback)) {
    PyErr_SetString(PyExc_TypeError, "install_getitem: the fallback must be callable");
    return NULL;
  }
  void* fns[6];
  PyObject* addrs[6] = {a_ndim, a_dims, a_slice, a_squeeze, a_expand, a_transpose};
  if (!addresses(addrs, 6, fns)) return NULL;
  Py_INCREF(fallback);
  Py_XSETREF(getitem_fallback, fallback);
  c_transpose = (shape_fn)(uintptr_t)fns[5];
  gi.ndim = (ndim_fn)(uintptr_t)fns[0];
  gi.dims = (dims_fn)(uintptr_t)fns[1];
  gi.squeeze = (shape_fn)(uintptr_t)fns[3];
  gi.expand_dims = (shape_fn)(uintptr_t)fns[4];
  gi.slice = (slice_fn)(uintptr_t)fns[2]; /* (last: set means installed) */
  Py_RETURN_NONE;
}

static PyObject* install_reshape(PyObject* module, PyObject* args) {
  PyObject *addr, *fallback;
  if (!PyArg_ParseTuple(args, "OO:install_reshape", &addr, &fallback)) return NULL;
  if (!PyCallable_Check(fallback)) {
    PyErr_SetString(PyExc_TypeError, "install_reshape: the fallback must be callable");
    return NULL;
  }
  void* fn = address(addr);
  if (fn == NULL) return NULL;
  Py_INCREF(fallback);
  Py_XSETREF(reshape_fallback, fallback);
  c_reshape = (shape_fn)(uintptr_t)fn;
  Py_RETURN_NONE;
}

static PyObject* adopt_function(PyObject* module, PyObject* arg) {
  if (!installed) return not_installed();
  unsigned long long v = PyLong_AsUnsignedLongLong(arg);
  if (v == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
  if (v == 0) {
    PyErr_SetString(PyExc_ValueError, "adopt: a null handle");
    return NULL;
  }
  return adopt((mlxc_array)v);
}

static PyObject* install(PyObject* module, PyObject* args) {
  PyObject *binary_addr, *binary_float_addr, *binary_int_addr, *unary_addr, *free_addr;
  PyObject *type, *other, *error;
  if (!PyArg_ParseTuple(args, "OOOOOOOO:install", &binary_addr, &binary_float_addr, &binary_int_addr,
                        &unary_addr, &free_addr, &type, &other, &error))
    return NULL;
  if (installed) {
    PyErr_SetString(PyExc_RuntimeError, "amlx._arraytype is installed already");
    return NULL;
  }
  if (!PyType_Check(type) || !PyType_IsSubtype((PyTypeObject*)type, &ArrayCore_Type)) {
    PyErr_SetString(PyExc_TypeError, "install: the array type must subclass ArrayCore");
    return NULL;
  }
  void* fns[5];
  PyObject* addrs[5] = {binary_addr, binary_float_addr, binary_int_addr, unary_addr, free_addr};
  if (!addresses(addrs, 5, fns)) return NULL;
  c_binary = (binary_fn)(uintptr_t)fns[0];
  c_binary_float = (binary_float_fn)(uintptr_t)fns[1];
  c_binary_int = (binary_int_fn)(uintptr_t)fns[2];
  c_unary = (unary_fn)(uintptr_t)fns[3];
  c_free = (free_fn)(uintptr_t)fns[4];
  Py_INCREF(type);
  Py_INCREF(other);
  Py_INCREF(error);
  result_type = (PyTypeObject*)type;
  py_other = other;
  py_error = error;
  installed = 1;
  Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"install", install, METH_VARARGS,
     "install(binary, binary_float, binary_int, unary, free, array_type, other, error): the\n"
     "addresses of mlxc_binary_r, mlxc_binary_float_r, mlxc_binary_int_r, mlxc_unary and\n"
     "mlxc_array_free; the ArrayCore subclass new arrays are made of; other(code, name, array,\n"
     "operand, reflected) for operands that are not an Array, float or int; error(name) -> the\n"
     "exception for a failed op. Once per process."},
    {"adopt", adopt_function, METH_O, "adopt(handle) -> a new array owning the handle (an int, not 0)."},
    {"reduce_function", reduce_function, METH_VARARGS,
     "reduce_function(address, code, name, fallback) -> op(a, axis=None, keepdims=False): mlxc_reduce\n"
     "(at `address`) with op `code` in C for an Array, an axis that is None, an int or a tuple or\n"
     "list of ints, and a bool keepdims, given positionally; fallback(...) otherwise."},
    {"axes_function", axes_function, METH_VARARGS,
     "axes_function(address, name, fallback) -> op(a, axes=None): the mlxc function at `address`\n"
     "(int f(mlxc_array, const int*, int, mlxc_array*), -1 axes for all) in C for an Array and None\n"
     "or a tuple or list of ints, fallback(...) otherwise."},
    {"arrays_function", arrays_function, METH_VARARGS,
     "arrays_function(address, kind, name, fallback): kind 'where' -> op(cond, x, y) in C for three\n"
     "Arrays (mlxc_where); 'take' -> op(a, indices, axis=None) in C for two Arrays and None or an int\n"
     "(mlxc_take); fallback(...) otherwise."},
    {"list_function", list_function, METH_VARARGS,
     "list_function(address, vec_new, vec_push_many, vec_free, name, fallback) -> op(arrays, axis=0):\n"
     "the mlxc function at `address` (int f(mlxc_vec, int, mlxc_array*)) in C for a list or tuple of\n"
     "1-64 Arrays and an int axis, through an mlxc_vec; fallback(...) otherwise."},
    {"softmax_function", softmax_function, METH_VARARGS,
     "softmax_function(address, code, precise_code, name, fallback) -> op(a, axis=-1, precise=False):\n"
     "mlxc_reduce (at `address`) in C for an Array, an axis None, int or ints, a bool precise, given\n"
     "positionally; fallback(...) otherwise."},
    {"dtype_function", dtype_function, METH_VARARGS,
     "dtype_function(address, name, fallback, dtype_class) -> op(a, dtype): the mlxc function at\n"
     "`address` (int f(mlxc_array, int dtype, mlxc_array*)) in C for an Array and an instance of\n"
     "dtype_class (its `code`), fallback(a, dtype) otherwise."},
    {"install_getitem", install_getitem, METH_VARARGS,
     "install_getitem(ndim, shape, slice, squeeze, expand_dims, transpose, fallback): a[index] for\n"
     "basic indices and a.T in C through those mlxc functions (their addresses); fallback(a, index)\n"
     "for any other index."},
    {"install_reshape", install_reshape, METH_VARARGS,
     "install_reshape(address, fallback): ArrayCore.reshape calls mlxc_reshape (at `address`) for\n"
     "Python ints, fallback(array, *args) otherwise."},
    {"unary_function", unary_function, METH_VARARGS,
     "unary_function(code, name, fallback) -> op(a): mlxc_unary's op `code` in C where `a` is an\n"
     "Array, fallback(a) otherwise."},
    {"binary_function", binary_function, METH_VARARGS,
     "binary_function(code, name, fallback) -> op(a, b): the binary op `code` in C where one of a, b\n"
     "is an Array and the other an Array or exactly a float or int, fallback(a, b) otherwise."},
    {"shape_function", shape_function, METH_VARARGS,
     "shape_function(address, name, fallback) -> op(a, ints): the mlxc function at `address`\n"
     "(int f(mlxc_array, const int*, int, mlxc_array*)) in C where `a` is an Array and `ints` a\n"
     "tuple or list of at most 32 Python ints, fallback(a, ints) otherwise."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "amlx._arraytype",
    .m_doc = "The C core of amlx's Array and of its most used ops.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__arraytype(void) {
  /* Arrays compare elementwise, so they hash by identity, as objects do (set here: a type
     that defines richcompare alone would be unhashable). */
  ArrayCore_Type.tp_hash = PyBaseObject_Type.tp_hash;
  if (PyType_Ready(&ArrayCore_Type) < 0 || PyType_Ready(&NativeOp_Type) < 0) return NULL;
  PyObject* m = PyModule_Create(&module_def);
  if (m == NULL) return NULL;
  Py_INCREF(&ArrayCore_Type);
  if (PyModule_AddObject(m, "ArrayCore", (PyObject*)&ArrayCore_Type) < 0) {
    Py_DECREF(&ArrayCore_Type);
    Py_DECREF(m);
    return NULL;
  }
  return m;
}
