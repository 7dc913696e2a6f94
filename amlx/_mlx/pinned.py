"""Page-locked host arrays, reused: where data bound for the GPU is written first.

`array.upload` from page-locked memory is the copy engine's DMA alone. From ordinary
(pageable) memory the CUDA driver first copies the data into a page-locked buffer of its
own with the CPU, and on an H100 that copy slowed the kernel launches of the thread running
meanwhile by as much as the driver's copy saved (benchmarks/README.md). Page-locked memory
is slow to allocate (milliseconds), so `HostBuffers` keeps what it handed out for reuse.

Where there is no CUDA driver (the CPU, Metal) the arrays are ordinary numpy arrays."""

from __future__ import annotations

import threading

import numpy as np

from amlx._mlx._lib import ffi, lib

# buffers kept for reuse; more given back are let go (a step needs one at a time)
_KEPT = 4


def pinned_empty(nbytes: int) -> np.ndarray:
    """An uninitialized uint8 array of `nbytes`, page-locked where the CUDA driver gives
    such memory (`mlxc_pinned_alloc`), else ordinary. The memory is freed when the array
    and every view of it are gone."""
    ptr = lib.mlxc_pinned_alloc(nbytes) if nbytes > 0 else ffi.NULL
    if ptr == ffi.NULL:
        return np.empty(nbytes, dtype=np.uint8)
    # the buffer keeps `owned` alive, and the array keeps the buffer: freed with the last view
    owned = ffi.gc(ffi.cast("char *", ptr), lib.mlxc_pinned_free, size=nbytes)
    return np.frombuffer(ffi.buffer(owned, nbytes), dtype=np.uint8)


def is_pinned(array: np.ndarray) -> bool:
    """Whether `array` views page-locked memory from `pinned_empty` (for tests and checks)."""
    base = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return not isinstance(base, np.ndarray)


class HostBuffers:
    """Page-locked arrays to fill and upload, taken and given back (any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[np.ndarray] = []  # flat uint8 buffers, smallest first
        self._lent: dict[int, np.ndarray] = {}  # the address of an array handed out -> its buffer

    def take(self, shape: tuple[int, ...], dtype: np.dtype | type = np.int32) -> np.ndarray:
        """An uninitialized C-contiguous array of `shape` and `dtype` in a page-locked buffer
        no other taken array shares, until it is given back."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        with self._lock:
            fit = next((i for i, b in enumerate(self._free) if b.nbytes >= nbytes), None)
            buffer = self._free.pop(fit) if fit is not None else None
        if buffer is None:
            buffer = pinned_empty(max(nbytes, 1))
        array = buffer[:nbytes].view(dtype).reshape(shape)
        with self._lock:
            self._lent[array.ctypes.data] = buffer
        return array

    def give(self, array: np.ndarray) -> None:
        """Returns an array `take` gave; it must not be used after. Others are ignored."""
        with self._lock:
            buffer = self._lent.pop(array.ctypes.data, None)
            if buffer is None:
                return
            self._free.append(buffer)
            self._free.sort(key=lambda b: b.nbytes)
            if len(self._free) > _KEPT:
                self._free.pop(0)  # the smallest: a step's masks only grow with the batch

    def clear(self) -> None:
        """Lets every kept buffer go (those lent are freed once given back and dropped)."""
        with self._lock:
            self._free.clear()
