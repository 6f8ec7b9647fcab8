"""Host cost of a small asynchronous host-to-device copy (a step's metadata, a block-table row):
``Tensor.pin_memory()`` then ``.to(non_blocking=True)`` against a ``torch.empty(pin_memory=True)``
staging copy (``kv_pool.to_device_async``), while the GPU is busy. Prints us a call."""

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
    print(f"to_device_async:   {_time(lambda: to_device_async(host, dev)):.1f} us")
    print(f"pageable .to():    {_time(lambda: host.to(dev, non_blocking=True)):.1f} us")


if __name__ == "__main__":
    main()
