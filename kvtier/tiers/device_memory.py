"""Memory that another allocator owns, seen as torch tensors; peer access between GPUs.

``tensor_from_pointer`` wraps a raw address (an X-Mem ``malloc`` pointer, a peer GPU's buffer, a
stand-in bank) in a torch tensor without copying, through a DLPack capsule built here with
ctypes (no third-party package needed). The tensor reports the device it is *used from* (the
compute GPU, or the CPU for host memory), not the device that holds the bytes: under unified
addressing, with peer access enabled, the compute GPU's kernels and copy engines reach such
memory through the address alone, and a tensor on the compute device keeps every copy on the
compute device's streams (torch would otherwise add cross-device barriers).

The wrapper does not own the memory: ``owner`` (any object) is kept alive as long as the tensor
or any view of it, and the caller must not free the memory while tensors still use it.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import torch

# DLPack ABI (dlpack.h, v0.8 layout: the one every framework accepts as a "dltensor" capsule).
_DL_CPU = 1
_DL_CUDA = 2
_DL_UINT = 1


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    pass


_Deleter = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [
    ("dl_tensor", _DLTensor),
    ("manager_ctx", ctypes.c_void_p),
    ("deleter", _Deleter),
]

# What each live capsule needs until its consumer calls the deleter: the struct, its shape
# array and the owner, keyed by the struct's address.
_live: dict[int, tuple[_DLManagedTensor, ctypes.Array[ctypes.c_int64], Any]] = {}
_live_lock = threading.Lock()


@_Deleter
def _release(managed: Any) -> None:
    with _live_lock:
        _live.pop(ctypes.addressof(managed.contents), None)


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
# The capsule keeps this pointer: the name must outlive every capsule (module constant).
_CAPSULE_NAME = ctypes.create_string_buffer(b"dltensor")


def tensor_from_pointer(
    ptr: int, nbytes: int, dtype: torch.dtype, device: torch.device, owner: Any = None
) -> torch.Tensor:
    """A 1-D ``dtype`` tensor over ``nbytes`` bytes at address ``ptr``, on ``device`` (the
    device its users run on), sharing the memory. ``owner`` is kept alive with the tensor."""
    if ptr == 0:
        raise ValueError("tensor_from_pointer needs a non-null address")
    elem = torch.empty((), dtype=dtype).element_size()
    if nbytes <= 0 or nbytes % elem:
        raise ValueError(f"{nbytes} bytes is not a positive whole number of {dtype} elements")
    if ptr % elem:
        raise ValueError(f"address {ptr:#x} is not aligned to {dtype} ({elem} bytes)")
    if device.type == "cuda":
        dev = _DLDevice(
            _DL_CUDA, torch.cuda.current_device() if device.index is None else device.index
        )
    elif device.type == "cpu":
        dev = _DLDevice(_DL_CPU, 0)
    else:
        raise ValueError(f"tensor_from_pointer supports cpu and cuda devices; got {device}")
    shape = (ctypes.c_int64 * 1)(nbytes)
    managed = _DLManagedTensor()
    # Bytes, viewed as ``dtype`` afterwards: DLPack has no code for every torch dtype's name
    # but every consumer takes uint8.
    managed.dl_tensor = _DLTensor(
        ctypes.c_void_p(ptr), dev, 1, _DLDataType(_DL_UINT, 8, 1), shape, None, 0
    )
    managed.manager_ctx = None
    managed.deleter = _release
    with _live_lock:
        _live[ctypes.addressof(managed)] = (managed, shape, owner)
    capsule = _capsule_new(ctypes.addressof(managed), _CAPSULE_NAME, None)
    try:
        raw = torch.utils.dlpack.from_dlpack(capsule)
    except Exception:
        with _live_lock:
            _live.pop(ctypes.addressof(managed), None)
        raise
    return raw.view(dtype)


def live_wrappers() -> int:
    """Wrapped buffers whose tensors are still alive (for leak checks)."""
    with _live_lock:
        return len(_live)


def enable_peer_access(device: int, peer: int) -> None:
    """Let ``device`` (its kernels and copy engines) reach ``peer``'s memory, both ways.

    torch enables peer access lazily, in its first copy between two devices, and keeps it
    for the process; a one-element copy in each direction triggers it before any of our
    kernels dereferences a peer address (which would fault otherwise)."""
    if device == peer:
        return
    a = torch.zeros(1, device=f"cuda:{device}")
    b = torch.zeros(1, device=f"cuda:{peer}")
    b.copy_(a)
    a.copy_(b)
    torch.cuda.synchronize(device)
    torch.cuda.synchronize(peer)
