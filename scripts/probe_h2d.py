"""Host cost of a small asynchronous host-to-device copy (a step's metadata, a block-table row)
while the GPU is busy: ``Tensor.pin_memory()`` then ``.to(non_blocking=True)``, a
``torch.empty(pin_memory=True)`` staging copy, and a non-blocking copy from pageable memory
(``kv_pool.to_device_async``). Prints us a call; a copy that waited for the queued matmuls
would average hundreds of us."""

from __future__ import annotations

import time

import torch

from kvtier.cache.kv_pool import to_device_async


def _time(fn, n: int = 200) -> float:
    for _ in range(10):
        fn()
    busy = torch.empty(8192, 8192, device="cuda")
    for _ in range(4):
        busy = busy @ busy  # keep the stream busy: the copies must not wait for it
    t = time.perf_counter()
    for _ in range(n):
        fn()
    elapsed = time.perf_counter() - t
    torch.cuda.synchronize()
    return elapsed / n * 1e6


def main() -> None:
    dev = torch.device("cuda")
    host = torch.arange(64, dtype=torch.int64)
    print(
        f"pin_memory().to(): {_time(lambda: host.pin_memory().to(dev, non_blocking=True)):.1f} us"
    )
    print(f"pinned staging:    {_time(lambda: _staged(host, dev)):.1f} us")
    print(f"to_device_async:   {_time(lambda: to_device_async(host, dev)):.1f} us")


def _staged(host: torch.Tensor, dev: torch.device) -> torch.Tensor:
    staging = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
    staging.copy_(host)
    return staging.to(dev, non_blocking=True)


if __name__ == "__main__":
    main()
