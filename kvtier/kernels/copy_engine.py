"""Many memory copies in one call to the GPU's copy engines: the driver's cuMemcpyBatchAsync
(CUDA 12.8+), reached through ctypes so no extra package is needed.

Loading a prefix from L2 is thousands of 64 KiB chunks per layer. One cudaMemcpyAsync per chunk
from Python costs more host time than the copy itself (DESIGN: 4.5 GB/s); one batch per layer
hands the whole list to the driver, which runs it on the copy engines without using any of the
multiprocessors the forward is computing on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from functools import lru_cache

import torch

logger = logging.getLogger(__name__)

# CUmemcpySrcAccessOrder: the source is read in stream order (it may be written by earlier
# work on the stream).
_SRC_ACCESS_ORDER_STREAM = 1
# CUmemcpyFlags: let the copy overlap with kernels running at the same time.
_FLAG_PREFER_OVERLAP_WITH_COMPUTE = 1


class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _MemcpyAttributes(ctypes.Structure):
    _fields_ = [
        ("srcAccessOrder", ctypes.c_int),
        ("srcLocHint", _MemLocation),
        ("dstLocHint", _MemLocation),
        ("flags", ctypes.c_uint),
    ]


@lru_cache(maxsize=1)
def _driver_fn() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """cuMemcpyBatchAsync without the failure index (the CUDA 13 form), or None."""
    if not torch.cuda.is_available():
        return None
    name = ctypes.util.find_library("cuda") or "libcuda.so.1"
    try:
        lib = ctypes.CDLL(name)
        fn = lib.cuMemcpyBatchAsync_v2
    except (OSError, AttributeError) as e:
        logger.info("cuMemcpyBatchAsync is not available (%s): direct copies go one by one", e)
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [
        ctypes.c_void_p,  # CUdeviceptr *dsts
        ctypes.c_void_p,  # CUdeviceptr *srcs
        ctypes.c_void_p,  # size_t *sizes
        ctypes.c_size_t,  # count
        ctypes.POINTER(_MemcpyAttributes),
        ctypes.c_void_p,  # size_t *attrsIdxs
        ctypes.c_size_t,  # numAttrs
        ctypes.c_void_p,  # CUstream
    ]
    return fn


def batch_memcpy_available() -> bool:
    return _driver_fn() is not None


_ATTRS = _MemcpyAttributes(_SRC_ACCESS_ORDER_STREAM, _MemLocation(0, 0), _MemLocation(0, 0),
                           _FLAG_PREFER_OVERLAP_WITH_COMPUTE)  # fmt: skip
_ATTR_IDX = (ctypes.c_size_t * 1)(0)


def batch_memcpy(dsts: torch.Tensor, srcs: torch.Tensor, sizes: torch.Tensor) -> None:
    """Copy ``sizes[i]`` bytes from address ``srcs[i]`` to ``dsts[i]`` for every i, on the
    current CUDA stream, in one driver call. The three are int64 CPU tensors of one length; the
    addresses are device-visible (device memory, pinned host memory, a peer GPU's memory).
    Copies within the batch run in any order, so they must not overlap."""
    fn = _driver_fn()
    if fn is None:
        raise RuntimeError("cuMemcpyBatchAsync is not available with this driver")
    n = int(dsts.numel())
    if n == 0:
        return
    if not (dsts.dtype == srcs.dtype == sizes.dtype == torch.int64):
        raise TypeError("batch_memcpy takes int64 address and size tensors")
    dsts, srcs, sizes = dsts.contiguous(), srcs.contiguous(), sizes.contiguous()
    current = torch.cuda.current_stream()
    if current.cuda_stream != 0:
        _launch(fn, dsts, srcs, sizes, n, current.cuda_stream)
        return
    # The driver refuses the legacy default stream (handle 0) for batches: run the batch on a
    # side stream ordered after everything queued so far and before everything queued next.
    side = _side_stream(current.device)
    side.wait_stream(current)
    _launch(fn, dsts, srcs, sizes, n, side.cuda_stream)
    current.wait_stream(side)


def _launch(
    fn: Callable[..., int],
    dsts: torch.Tensor,
    srcs: torch.Tensor,
    sizes: torch.Tensor,
    n: int,
    stream: int,
) -> None:
    err = fn(
        dsts.data_ptr(), srcs.data_ptr(), sizes.data_ptr(), n, ctypes.byref(_ATTRS),
        ctypes.addressof(_ATTR_IDX), 1, stream,
    )  # fmt: skip
    if err != 0:
        raise RuntimeError(f"cuMemcpyBatchAsync failed with CUresult {err} ({n} copies)")


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]
