"""``dram``: the L2 buffer in page-locked (pinned) host memory, reached over PCIe.

The buffer is an anonymous mmap registered with ``cudaHostRegister``: the exact size asked for is
pinned (torch's pinned allocator would round it up to a power of two), GPU kernels address it
through UVA (a pinned page's device address equals its host address), and copy engines reach
full PCIe bandwidth. On a machine without CUDA the buffer is ordinary host memory.
"""

from __future__ import annotations

import logging
import mmap
import resource

import torch

from kvtier.tiers.base import MemoryTier, TierError, TierSpec

logger = logging.getLogger(__name__)

# Host memory left to everything else (the OS, the Python heap, the model load) when sizing L2.
HOST_HEADROOM_BYTES = 4 * 1024**3

_pinned_bytes = 0


def pinned_bytes() -> int:
    """Bytes this process currently holds pinned through DRAM tiers (for leak checks)."""
    return _pinned_bytes


def available_host_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise TierError("cannot read MemAvailable from /proc/meminfo")


class DramTier(MemoryTier):
    name = "dram"

    def __init__(self, spec: TierSpec, device: torch.device) -> None:
        super().__init__(spec)
        self.device = device
        self.pinned = device.type == "cuda"
        nbytes = spec.total_bytes
        self._check_capacity(nbytes)
        self._mmap: mmap.mmap | None = mmap.mmap(
            -1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        )
        raw = torch.frombuffer(self._mmap, dtype=torch.uint8)
        buffer = raw.view(spec.dtype)
        self._registered_ptr = 0
        if self.pinned:
            self._pin(buffer, nbytes)
        self._set_buffer(buffer)
        self._nbytes = nbytes

    def _check_capacity(self, nbytes: int) -> None:
        gb = nbytes / 1e9
        avail = available_host_bytes() - HOST_HEADROOM_BYTES
        if nbytes > avail:
            raise TierError(
                f"--hicache-size asks for {gb:.2f} GB of host memory for the L2 tier but only "
                f"{max(avail, 0) / 1e9:.2f} GB are available (MemAvailable less "
                f"{HOST_HEADROOM_BYTES / 1e9:.1f} GB headroom); lower --hicache-size"
            )
        if self.pinned:
            soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
            if soft != resource.RLIM_INFINITY and nbytes > soft:
                raise TierError(
                    f"--hicache-size asks to pin {gb:.2f} GB but the memlock limit is "
                    f"{soft / 1e9:.2f} GB (ulimit -l; in containers --ulimit memlock=-1); "
                    "lower --hicache-size or raise the limit"
                )

    def _pin(self, buffer: torch.Tensor, nbytes: int) -> None:
        global _pinned_bytes
        ptr = buffer.data_ptr()
        err = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)
        if int(err) != 0:
            raise TierError(
                f"pinning {nbytes / 1e9:.2f} GB of host memory for --hicache-size failed "
                f"(cudaHostRegister error {int(err)}); lower --hicache-size or check the memlock "
                "limit (ulimit -l)"
            )
        self._registered_ptr = ptr
        _pinned_bytes += nbytes

    @property
    def kernel_accessible(self) -> bool:
        return self.pinned

    @property
    def pinned_nbytes(self) -> int:
        return self._nbytes if self._registered_ptr else 0

    def close(self) -> None:
        global _pinned_bytes
        if self._mmap is None:
            return
        self._space = None
        if self._registered_ptr:
            torch.cuda.synchronize(self.device)
            torch.cuda.cudart().cudaHostUnregister(self._registered_ptr)
            _pinned_bytes -= self._nbytes
            self._registered_ptr = 0
        try:
            self._mmap.close()
        except BufferError:
            # A tensor view still exports the buffer; the mapping goes with the last view.
            logger.debug("dram tier buffer still referenced at close")
        self._mmap = None

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "pinned": self.pinned}
