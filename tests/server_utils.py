"""Run ``python -m kvtier.launch_server`` as a subprocess on loopback for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server on 127.0.0.1 with the built-in model; its output goes to a log file (a pipe
    nobody reads would eventually block it)."""

    def __init__(self, *flags: str, api_key: str | None = None) -> None:
        self.port = free_port()
        self.api_key = api_key
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkstemp(prefix="kvtier-server-", suffix=".log")[1])
        cmd = [
            sys.executable,
            "-m",
            "kvtier.launch_server",
            "--model",
            "builtin:tiny-qwen3",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            *flags,
        ]
        if api_key:
            cmd += ["--api-key", api_key]
        # One intra-op thread: the tiny model gains nothing from more, and several servers plus
        # the test client share the CI machine's cores; oversubscribed OpenMP threads spin, and a
        # step of 32 tiny sequences went from 0.07 s to 6 s under such contention.
        env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode} while starting:\n{self.log()}"
                )
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not healthy after {timeout}s:\n{self.log()}")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def http(self, **kw: Any) -> httpx.Client:
        kw.setdefault("timeout", 60.0)
        return httpx.Client(base_url=self.url, headers=self.headers(), trust_env=False, **kw)

    def ahttp(self, **kw: Any) -> httpx.AsyncClient:
        kw.setdefault("timeout", 60.0)
        return httpx.AsyncClient(base_url=self.url, headers=self.headers(), trust_env=False, **kw)

    def anthropic(self, **kw: Any) -> Any:
        """The official ``anthropic`` client on this server (the key as ``x-api-key``)."""
        import anthropic

        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 60.0)
        return anthropic.Anthropic(base_url=self.url, api_key=self.api_key or "none", **kw)

    def openai(self, **kw: Any) -> Any:
        import openai

        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 60.0)
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", **kw)

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, then wait; kill (and fail) if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(
                    f"server ignored SIGTERM for {timeout}s:\n{self.log()}"
                ) from None
        return self.proc.returncode

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.terminate()
        finally:
            self.log_path.unlink(missing_ok=True)
