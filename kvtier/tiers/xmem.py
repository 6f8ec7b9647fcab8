"""``xmem``: the L2 buffer in Netpreme's X-Mem, through its SDK package ``xmem-mtier``.

X-Mem memory comes from ``mtier_sdk.malloc(bank, size)`` as CUDA device pointers valid in the
current context; our kernels and the copy engines reach it like peer-GPU memory. The buffer is
striped over the banks (all of them, or those of ``--hicache-xmem-banks``, in that order): one
allocation per bank holding an equal, contiguous range of L2 pages in the chosen layout (see
``stripe_pages`` and ``KVSpace.striped``), so loads stay one kernel launch per layer and
copy-engine runs are only cut at bank boundaries.

``import xmem`` initialises the SDK at import and raises when ``libmtier.so`` or the MTier
service is missing, so it is imported here, lazily, only when this tier is chosen; every
failure becomes one ``TierError`` that says what is wrong and that ``--no-hicache-use-xmem``
falls back to host DRAM.

``KVTIER_XMEM_STANDIN=1`` replaces the SDK with ``kvtier.tiers.xmem_standin`` (plain memory, not
X-Mem) for tests and for exercising this code path on machines without X-Mem; a warning says so
and ``describe()`` reports ``standin: True``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import torch

from kvtier.tiers.base import MemoryTier, TierError, TierSpec, stripe_pages
from kvtier.tiers.device_memory import tensor_from_pointer

logger = logging.getLogger(__name__)

DEFAULT_LIB_PATH = "/usr/local/lib/libmtier.so"
FALLBACK = "--no-hicache-use-xmem falls back to host DRAM"

# The SDK's malloc (and free) are not thread-safe; every call into them takes this lock.
_sdk_lock = threading.Lock()


def _error(what: str) -> TierError:
    return TierError(f"the xmem L2 tier cannot start: {what}; {FALLBACK}")


def lib_path() -> str:
    return os.environ.get("MTIER_LIB_PATH", DEFAULT_LIB_PATH)


def standin_requested() -> bool:
    return os.environ.get("KVTIER_XMEM_STANDIN", "") not in ("", "0")


def load_sdk() -> Any:
    """Import the X-Mem SDK (or the stand-in when asked for); every failure is a TierError."""
    if standin_requested():
        from kvtier.tiers import xmem_standin

        logger.warning(
            "KVTIER_XMEM_STANDIN is set: the xmem tier runs on a STAND-IN for the X-Mem SDK "
            "(kvtier.tiers.xmem_standin), NOT on X-Mem. Its banks are plain host or GPU memory "
            "and nothing measured through it is an X-Mem number."
        )
        importer = xmem_standin.load
    else:

        def importer() -> Any:
            import xmem

            return xmem

    try:
        module = importer()
        # Netpreme's own scripts call init with the library path right after the import (which
        # already initialises the SDK); doing the same covers a build whose import does not.
        module.mtier_sdk.init(lib_path())
    except ModuleNotFoundError as e:
        if e.name != "xmem":
            raise _error(
                f"the X-Mem SDK needs the module {e.name!r}, which is not installed "
                "(pip install 'kvtier[xmem]')"
            ) from e
        raise _error(
            "the xmem-mtier package is not installed (pip install 'kvtier[xmem]'; it works only "
            "where X-Mem hardware and the MTier service exist)"
        ) from e
    except OSError as e:
        raise _error(
            f"the X-Mem SDK could not load libmtier.so from {lib_path()} (set MTIER_LIB_PATH): {e}"
        ) from e
    except Exception as e:
        raise _error(
            f"the X-Mem SDK failed to initialise ({type(e).__name__}: {e}); is the MTier service "
            "running?"
        ) from e
    return module


def _field(record: Any, name: str, index: int) -> int:
    """A field of an SDK status record, whether it comes as an object or as a tuple."""
    if hasattr(record, name):
        return int(getattr(record, name))
    return int(record[index])


def _describe_exception(e: BaseException, sdk: Any) -> str:
    text = f"{type(e).__name__}: {e}"
    with contextlib.suppress(Exception):
        last = sdk.get_last_error()
        if last and str(last) not in text:
            text += f"; last error: {last}"
    return text


class XMemTier(MemoryTier):
    name = "xmem"

    def __init__(
        self,
        spec: TierSpec,
        device: torch.device,
        banks: list[int] | None = None,
        sdk_module: Any = None,
    ) -> None:
        """``banks``: bank ids in striping order (default: every bank). ``sdk_module``: what
        ``import xmem`` returns (default: imported here; tests pass the stand-in's)."""
        super().__init__(spec)
        self.device = device
        self._allocs: list[tuple[int, int]] = []  # (bank, pointer), in striping order
        self.banks: list[int] = []
        self.segment_pages = 0
        self.segment_bytes = 0
        module = sdk_module if sdk_module is not None else load_sdk()
        self._sdk = module.mtier_sdk
        self.standin = bool(getattr(module, "IS_STANDIN", False))
        sdk = self._sdk
        on_gpu = device.type == "cuda"
        if not on_gpu and not (self.standin and sdk.host_banks):
            raise _error(
                f"X-Mem is reached through CUDA device pointers but this engine runs on {device} "
                "(no CUDA GPU)"
            )
        with self._context():
            self.banks = self._choose_banks(banks)
            total = spec.num_pages + 1
            self.segment_pages, segments = stripe_pages(total, len(self.banks))
            if segments < len(self.banks):
                logger.info(
                    "the xmem tier needs only %d of the %d banks for %d pages",
                    segments,
                    len(self.banks),
                    total,
                )
                self.banks = self.banks[:segments]
            self.segment_bytes = self.segment_pages * spec.page_bytes
            self._check_capacity()
            self._allocate()
            try:
                buffers = [
                    tensor_from_pointer(ptr, self.segment_bytes, spec.dtype, device)
                    for _, ptr in self._allocs
                ]
            except Exception as e:
                self._free_all()
                raise _error(f"an X-Mem pointer could not be wrapped as a tensor ({e})") from e
        self._set_segments(buffers, self.segment_pages)
        if self.standin:
            logger.warning("xmem tier on the STAND-IN SDK: %s", self.describe())

    # ------------------------------------------------------------------ setup
    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        """Make the compute GPU's context current: the SDK's pointers belong to it."""
        if self.device.type != "cuda":
            yield
            return
        with torch.cuda.device(self.device):
            torch.zeros(1, device=self.device)  # creates the primary context if not there yet
            yield

    def _choose_banks(self, banks: list[int] | None) -> list[int]:
        sdk = self._sdk
        try:
            status_rec = sdk.get_status()
        except Exception as e:
            raise _error(
                f"the MTier service did not answer get_status() ({_describe_exception(e, sdk)})"
            ) from e
        status = _field(status_rec, "status", 0)
        num_banks = _field(status_rec, "num_banks", 1)
        if status != 0:
            raise _error(f"the MTier service is not ready (get_status() reports status {status})")
        if num_banks < 1:
            raise _error("the MTier service reports no X-Mem banks")
        if banks is None:
            return list(range(num_banks))
        seen: set[int] = set()
        for b in banks:
            if not 0 <= b < num_banks:
                raise _error(
                    f"--hicache-xmem-banks names bank {b} but the MTier service has {num_banks} "
                    f"bank(s) (ids 0..{num_banks - 1})"
                )
            if b in seen:
                raise _error(f"--hicache-xmem-banks names bank {b} twice")
            seen.add(b)
        return list(banks)

    def _check_capacity(self) -> None:
        sdk = self._sdk
        need = self.segment_bytes
        for b in self.banks:
            try:
                available = _field(sdk.get_bank_status(b), "available_memory", 2)
            except Exception as e:
                raise _error(f"get_bank_status({b}) failed ({_describe_exception(e, sdk)})") from e
            if available < need:
                raise _error(
                    f"X-Mem bank {b} has {available / 1e9:.2f} GB available but --hicache-size "
                    f"needs {need / 1e9:.2f} GB on each of {len(self.banks)} bank(s); lower "
                    "--hicache-size or stripe over more banks (--hicache-xmem-banks)"
                )

    def _allocate(self) -> None:
        sdk = self._sdk
        for b in self.banks:
            try:
                with _sdk_lock:
                    ptr = int(sdk.malloc(b, self.segment_bytes))
            except Exception as e:
                detail = _describe_exception(e, sdk)
                self._free_all()
                raise _error(
                    f"malloc of {self.segment_bytes / 1e9:.2f} GB on X-Mem bank {b} failed "
                    f"({detail}); lower --hicache-size"
                ) from e
            if ptr == 0:
                self._free_all()
                raise _error(f"malloc on X-Mem bank {b} returned a null pointer")
            self._allocs.append((b, ptr))

    def _free_all(self) -> None:
        while self._allocs:
            b, ptr = self._allocs.pop()
            try:
                with _sdk_lock:
                    self._sdk.free(ptr)
            except Exception as e:
                logger.warning(
                    "freeing X-Mem bank %d pointer %#x failed: %s",
                    b,
                    ptr,
                    _describe_exception(e, self._sdk),
                )

    # ------------------------------------------------------------------ the tier
    @property
    def kernel_accessible(self) -> bool:
        return self.device.type == "cuda"

    def page_location(self, page: int) -> tuple[int, int]:
        """(bank id, page within that bank's allocation) of L2 page ``page``."""
        seg, local = self.space.locate(page)
        return self.banks[seg], local

    def close(self) -> None:
        if not self._allocs and self._space is None:
            return
        self._space = None
        with self._context():
            if self.device.type == "cuda":
                # Copies still queued on any stream may touch the memory being freed.
                torch.cuda.synchronize(self.device)
            self._free_all()

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "banks": list(self.banks),
            "pages_per_bank": self.segment_pages,
            "standin": self.standin,
        }
