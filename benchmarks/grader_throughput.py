"""Throughput of the mllm reward: concurrent against sequential grading, on a local fake server.

    python benchmarks/grader_throughput.py --n 64 --latency_ms 200 --concurrency 16

Starts testing/fake_openai_server.py on 127.0.0.1 with a fixed per-request latency, scores --n images
through the real openai client once with --mllm_concurrency 1 and once with --concurrency, and prints
both wall times and the speed-up. No network and no API key are needed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from reward import build_reward  # noqa: E402
from testing.fake_openai_server import FakeOpenAIServer, Reply, grade_json  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64, help="Images scored per run.")
    parser.add_argument("--latency_ms", type=float, default=200.0, help="Server latency of every request.")
    parser.add_argument("--concurrency", type=int, default=16, help="--mllm_concurrency of the concurrent run.")
    parser.add_argument("--image_size", type=int, default=512, help="Side of the (random) images sent, in pixels.")
    args = parser.parse_args(argv)
    if args.n < 1 or args.concurrency < 1 or args.latency_ms < 0 or args.image_size < 1:
        parser.error("--n, --concurrency and --image_size must be >= 1 and --latency_ms >= 0.")
    return args


def time_run(server: FakeOpenAIServer, images: list[Image.Image], concurrency: int) -> tuple[float, int]:
    """Wall time of one evaluate() over all images, and the most requests the server saw at once."""
    reward = build_reward("mllm", argparse.Namespace(
        base_url=server.base_url, api_key=None, mllm_concurrency=concurrency, mllm_max_retries=0))
    reward.evaluate(images[:1], ["warm-up"])  # connection setup is not part of the steady state
    server.reset()
    start = time.perf_counter()
    out = reward.evaluate(images, [f"prompt {i}" for i in range(len(images))])
    elapsed = time.perf_counter() - start
    failures = reward.counters()["mllm/failures"]
    if failures or not bool(out.total.isfinite().all()):
        raise RuntimeError(f"{failures} requests failed; the timing would be meaningless.")
    return elapsed, server.max_in_flight


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    images = [Image.effect_noise((args.image_size, args.image_size), 64).convert("RGB") for _ in range(args.n)]
    latency = args.latency_ms / 1000.0
    with FakeOpenAIServer(lambda request: Reply.chat(grade_json(70), delay_s=latency)) as server:
        sequential, _ = time_run(server, images, 1)
        concurrent, in_flight = time_run(server, images, args.concurrency)
    print(f"{args.n} images, {args.latency_ms:.0f} ms server latency, {args.image_size}px PNG each")
    print(f"sequential (concurrency 1):   {sequential:7.2f} s  ({args.n / sequential:6.1f} images/s)")
    print(f"concurrent (concurrency {args.concurrency}): {concurrent:7.2f} s  ({args.n / concurrent:6.1f} images/s), "
          f"max {in_flight} requests in flight")
    print(f"speed-up: {sequential / concurrent:.1f}x (ideal {min(args.concurrency, args.n)}x)")


if __name__ == "__main__":
    main()
