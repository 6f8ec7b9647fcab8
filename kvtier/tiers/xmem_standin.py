"""A STAND-IN for Netpreme's X-Mem SDK (``xmem.mtier_sdk``). It is not X-Mem.

It mimics the SDK's surface (``init``, ``get_status``, ``get_bank_status``, ``malloc``, ``free``,
``get_last_error``, ``MTierError`` subclasses) closely enough to drive the xmem tier's
allocation, striping, accounting and error paths, and to run the engine's xmem code path end to
end where X-Mem does not exist:

- banks are plain memory: host tensors without CUDA; with CUDA, device allocations on the
  current GPU or on the GPUs listed in ``KVTIER_XMEM_STANDIN_DEVICES`` (round robin). Their
  bandwidth is that memory's (HBM or NVLink), never X-Mem's: numbers measured through the
  stand-in are not X-Mem numbers;
- a bank's capacity is an accounting limit (``bank_bytes``), not reserved memory.

Selected only explicitly: ``KVTIER_XMEM_STANDIN=1`` in the environment (the xmem tier then
imports this module instead of ``xmem`` and logs a warning saying so), or by tests passing
``load()``'s result to ``XMemTier``. Configuration: ``configure(...)`` or, for a fresh process,
``KVTIER_XMEM_STANDIN_BANKS`` (default 2), ``KVTIER_XMEM_STANDIN_BANK_GB`` (default 64) and
``KVTIER_XMEM_STANDIN_DEVICES``.
"""

from __future__ import annotations

import os
import threading
import types
from dataclasses import dataclass

import torch

from kvtier.tiers.device_memory import enable_peer_access

ENV_ENABLE = "KVTIER_XMEM_STANDIN"
ENV_BANKS = "KVTIER_XMEM_STANDIN_BANKS"
ENV_BANK_GB = "KVTIER_XMEM_STANDIN_BANK_GB"
ENV_DEVICES = "KVTIER_XMEM_STANDIN_DEVICES"


class MTierError(RuntimeError):
    """Base of the stand-in's errors (the SDK's are ``MTierError`` subclasses too)."""


class MTierOutOfMemoryError(MTierError):
    pass


class MTierInvalidArgumentError(MTierError):
    pass


class MTierServiceUnavailableError(MTierError):
    pass


class MTierEmptyContextError(MTierError):
    pass


@dataclass
class StandinConfig:
    num_banks: int = 2
    bank_bytes: int = 64 * 10**9
    # GPUs that hold the banks, round robin; None: the current GPU (host memory without CUDA).
    devices: tuple[int, ...] | None = None
    # Banks in host memory: None = exactly when CUDA is unavailable; True also on a GPU machine
    # (CPU engines); False also without CUDA (then the tier's "no CUDA" error path runs).
    host: bool | None = None
    # Failure modes of a broken installation, raised at load() like ``import xmem`` would:
    # "library" (libmtier.so missing), "service" (MTier service unreachable).
    import_error: str | None = None
    # The service answers but reports itself not ready (get_status().status != 0).
    service_ready: bool = True

    @classmethod
    def from_env(cls) -> StandinConfig:
        cfg = cls()
        if os.environ.get(ENV_BANKS):
            cfg.num_banks = int(os.environ[ENV_BANKS])
        if os.environ.get(ENV_BANK_GB):
            cfg.bank_bytes = int(float(os.environ[ENV_BANK_GB]) * 1e9)
        if os.environ.get(ENV_DEVICES):
            cfg.devices = tuple(int(x) for x in os.environ[ENV_DEVICES].split(",") if x.strip())
        return cfg


@dataclass(frozen=True)
class Status:
    status: int
    num_banks: int
    bank_size: int


@dataclass(frozen=True)
class BankStatus:
    bank_id: int
    total_memory: int
    available_memory: int


class StandinSDK:
    """The ``mtier_sdk`` surface over plain memory, with allocation accounting."""

    IS_STANDIN = True

    def __init__(self, config: StandinConfig) -> None:
        self.config = config
        self._allocs: dict[int, tuple[int, torch.Tensor]] = {}  # ptr -> (bank, memory)
        self._used = [0] * config.num_banks
        self._last_error = ""
        # The SDK's malloc is not thread-safe: the stand-in refuses concurrent calls outright so
        # that a caller missing its lock fails in tests instead of corrupting state.
        self._busy = threading.Lock()
        self.initialised = False

    # ---------------------------------------------------------------- what the tier inspects
    @property
    def host_banks(self) -> bool:
        """Banks are host memory (usable by a CPU engine)."""
        if self.config.host is not None:
            return self.config.host
        return not torch.cuda.is_available()

    def bank_device(self, bank: int) -> torch.device:
        if self.host_banks:
            return torch.device("cpu")
        devices = self.config.devices
        if not devices:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cuda", devices[bank % len(devices)])

    # ---------------------------------------------------------------- the SDK surface
    def init(self, lib_path: str | None = None) -> None:
        self.initialised = True

    def get_status(self) -> Status:
        return Status(
            0 if self.config.service_ready else 1, self.config.num_banks, self.config.bank_bytes
        )

    def get_bank_status(self, bank: int) -> BankStatus:
        self._check_bank(bank)
        total = self.config.bank_bytes
        return BankStatus(bank, total, total - self._used[bank])

    def malloc(self, bank: int, size: int) -> int:
        if not self._busy.acquire(blocking=False):
            raise AssertionError("stand-in malloc called concurrently (the SDK's is not safe)")
        try:
            if not self.config.service_ready:
                return self._fail(MTierServiceUnavailableError("MTier service unavailable"))
            self._check_bank(bank)
            if size <= 0:
                return self._fail(MTierInvalidArgumentError(f"invalid size {size}"))
            if self._used[bank] + size > self.config.bank_bytes:
                return self._fail(
                    MTierOutOfMemoryError(
                        f"bank {bank}: out of memory ({size} bytes asked, "
                        f"{self.config.bank_bytes - self._used[bank]} available)"
                    )
                )
            device = self.bank_device(bank)
            if device.type == "cuda":
                current = torch.cuda.current_device()
                # The SDK's pointers are valid in the current context; a bank on another GPU
                # must then be reachable from it, as X-Mem's fabric memory is.
                enable_peer_access(current, device.index)
            # Poisoned (all bits set: NaN in every float dtype) so that reading a page nobody
            # wrote shows up, and tests can see which banks received data.
            memory = torch.full((size,), 0xFF, dtype=torch.uint8, device=device)
            ptr = memory.data_ptr()
            self._allocs[ptr] = (bank, memory)
            self._used[bank] += size
            return ptr
        finally:
            self._busy.release()

    def free(self, ptr: int) -> None:
        if not self._busy.acquire(blocking=False):
            raise AssertionError("stand-in free called concurrently (the SDK's is not safe)")
        try:
            entry = self._allocs.pop(ptr, None)
            if entry is None:
                self._fail(MTierInvalidArgumentError(f"free of unknown pointer {ptr:#x}"))
                return
            bank, memory = entry
            self._used[bank] -= memory.numel()
        finally:
            self._busy.release()

    def get_last_error(self) -> str:
        return self._last_error

    # ---------------------------------------------------------------- accounting for tests
    def live_allocations(self) -> int:
        return len(self._allocs)

    def allocations(self) -> list[tuple[int, int, int]]:
        """(bank, pointer, bytes) of every live allocation, in allocation order."""
        return [(bank, ptr, m.numel()) for ptr, (bank, m) in self._allocs.items()]

    def bank_memory(self, ptr: int) -> torch.Tensor:
        """The bytes behind a live pointer (tests read what the tier wrote)."""
        return self._allocs[ptr][1]

    # ---------------------------------------------------------------- internals
    def _check_bank(self, bank: int) -> None:
        if not 0 <= bank < self.config.num_banks:
            self._fail(MTierInvalidArgumentError(f"invalid bank id {bank}"))

    def _fail(self, err: MTierError) -> int:
        self._last_error = str(err)
        raise err


_current: StandinSDK | None = None


def configure(**kwargs: object) -> StandinSDK:
    """Start a fresh stand-in (forgetting the previous one) with ``StandinConfig(**kwargs)``."""
    global _current
    _current = StandinSDK(StandinConfig(**kwargs))  # type: ignore[arg-type]
    return _current


def current() -> StandinSDK:
    """The stand-in SDK in use (created from the environment on first use)."""
    global _current
    if _current is None:
        _current = StandinSDK(StandinConfig.from_env())
    return _current


def load() -> types.SimpleNamespace:
    """What ``import xmem`` gives, for the stand-in: a namespace with ``mtier_sdk`` and
    ``MTierError``; raises like the real import would when configured to fail."""
    sdk = current()
    if sdk.config.import_error == "library":
        raise OSError("libmtier.so: cannot open shared object file: No such file or directory")
    if sdk.config.import_error == "service":
        raise MTierServiceUnavailableError("cannot connect to the MTier service")
    sdk.init()
    return types.SimpleNamespace(mtier_sdk=sdk, MTierError=MTierError, IS_STANDIN=True)
