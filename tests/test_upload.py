"""`_mlx.array.upload`: host data copied into a new array (by the CUDA driver on a GPU, by
the CPU elsewhere) holds exactly what `array` would, and the host buffer stays the caller's."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from amlx import _mlx as mx
from amlx._mlx import ops
from amlx._mlx.array import upload, upload_by_driver
from amlx.sample import upload_masks

DTYPES = ["int32", "uint32", "float32", "float16", "int8", "uint8", "bool"]


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(0, 9), min_size=1, max_size=3), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_upload_holds_what_array_holds(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    host = (rng.standard_normal(shape) * 100).astype(dtype)
    got = upload(host)
    assert got.shape == tuple(shape) and got.dtype is mx.array(host).dtype
    np.testing.assert_array_equal(got.numpy(), host)


def test_upload_copies_and_leaves_the_host_buffer_alone():
    host = np.arange(64 * 4752, dtype=np.int32).reshape(64, 4752)
    got = upload(host)
    host[:] = -1  # the caller reuses its buffer at once
    np.testing.assert_array_equal(got.numpy(), np.arange(64 * 4752, dtype=np.int32).reshape(64, 4752))


def test_upload_of_a_strided_view_is_its_values():
    host = np.arange(60, dtype=np.float32).reshape(6, 10)[:, ::3]
    np.testing.assert_array_equal(upload(host).numpy(), host)


def test_uploads_into_buffers_the_device_used_come_back_exact():
    """The case the driver copy is for: each step's masks land in a buffer from MLX's cache
    that the previous step's kernel read. Rounds of upload, a kernel over it, release."""
    rng = np.random.default_rng(0)
    for _ in range(8):
        host = rng.integers(-(2**31), 2**31, size=(64, 4752), dtype=np.int64).astype(np.int32)
        masks = upload_masks(host)
        total = ops.sum(ops.bitwise_and(masks, mx.array(0xFF, mx.int32)).astype(mx.int64))
        assert total.item() == int((host & 0xFF).astype(np.int64).sum())
        del masks, total


def test_upload_by_driver_only_where_the_gpu_is_the_default_device():
    if mx.device.default_device() != "gpu":
        assert not upload_by_driver()
    elif mx.fast.cuda_available():
        assert upload_by_driver()


def test_pinned_buffers_upload_exact_and_are_page_locked_where_the_driver_copies():
    """`pinned_empty` is page-locked memory where `upload` copies with the driver (a DMA
    with no staging), ordinary memory elsewhere; uploads from it, the buffer refilled and
    reused between them as the mask thread does, hold what was in it at each upload."""
    import gc

    from amlx._mlx.pinned import HostBuffers, is_pinned, pinned_empty

    assert is_pinned(pinned_empty(4096)) == upload_by_driver()
    buffers = HostBuffers()
    rng = np.random.default_rng(1)
    for rows in (64, 16, 64, 1):
        host = buffers.take((rows, 8192))
        assert is_pinned(host) == upload_by_driver()
        want = rng.integers(-(2**31), 2**31, size=(rows, 8192), dtype=np.int64).astype(np.int32)
        host[...] = want
        got = upload_masks(host, by_driver=True)
        host[...] = 0  # refilled at once, as the next step does
        buffers.give(host)
        np.testing.assert_array_equal(got.numpy(), want)
    del host, buffers
    gc.collect()  # (the page-locked buffers are freed with their last view: nothing to assert but no crash)
