"""Start ``python -m kvtier.launch_server`` with a real-size model on the GPU and talk to it with
the official ``openai`` client: models, chat (plain and streamed), completions, a repeated long
system prompt served from the cache (after evicting it from the GPU), and the metrics. Prints
what it saw; exits non-zero on the first failure. A GPU check, not part of the test suite.

    python scripts/server_check.py --model Qwen/Qwen3-30B-A3B-Instruct-2507
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import httpx
import openai


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="Qwen/Qwen3-30B-A3B-Instruct-2507")
    ap.add_argument("--port", type=int, default=30123)
    ap.add_argument("--log", default="server.log")
    args = ap.parse_args()
    cmd = [
        sys.executable, "-m", "kvtier.launch_server", "--model", args.model,
        "--load-format", "dummy", "--tokenizer-path", "builtin:tiny-qwen3",
        "--enable-hierarchical-cache", "--hicache-size", "8", "--page-size", "64",
        "--port", str(args.port), "--log-level", "info",
    ]  # fmt: skip
    if not args.model.startswith("builtin:"):
        cmd += ["--mem-fraction-static", "0.85"]
    url = f"http://127.0.0.1:{args.port}"
    with open(args.log, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        t0 = time.time()
        while time.time() - t0 < 300:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                print("server exited", proc.returncode)
                return 1
            time.sleep(1)
        print(f"healthy after {time.time() - t0:.1f} s")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        models = [m.id for m in client.models.list().data]
        print("models:", models)
        name = models[0]
        msgs = [{"role": "user", "content": "Say hello."}]
        r = client.chat.completions.create(model=name, messages=msgs, max_tokens=8, temperature=0)
        print("chat:", repr(r.choices[0].message.content), r.usage)
        pieces = []
        stream = client.chat.completions.create(
            model=name, messages=msgs, max_tokens=8, temperature=0, stream=True
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
        text = "".join(pieces)
        print("streamed:", repr(text), "equal:", text == r.choices[0].message.content)
        c = client.completions.create(model=name, prompt="The cache", max_tokens=8, temperature=0)
        print("completion:", repr(c.choices[0].text), c.usage)
        system = " ".join(f"rule {i}: keep the tests green." for i in range(1500))
        long_msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Go."}]
        times = []
        # Pass 0 computes the prompt, pass 1 is a GPU hit, passes 2 and 3 L2 hits (the GPU
        # copies dropped before each): the second shows whether the first paid for a build.
        for i in range(4):
            if i >= 2:
                flushed = httpx.post(f"{url}/flush_cache", json={"tier": "device"}, timeout=30)
                print("flush device:", flushed.status_code, flushed.text)
            t = time.time()
            r = client.chat.completions.create(
                model=name, messages=long_msgs, max_tokens=1, temperature=0
            )
            times.append(time.time() - t)
            details = getattr(r.usage, "prompt_tokens_details", None)
            print(f"long prompt pass {i}: {1e3 * times[-1]:.1f} ms, usage {r.usage}, {details}")
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        for line in metrics.splitlines():
            if line.startswith("kvtier:") and any(w in line for w in ("cached", "l2", "load")):
                print("metric:", line)
        return 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        print("server exit code", proc.returncode)


if __name__ == "__main__":
    raise SystemExit(main())
