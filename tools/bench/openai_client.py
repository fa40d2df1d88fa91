"""Throughput of the live OpenAI-compatible client against a loopback endpoint with fixed latency.

With `concurrency` requests in flight and `latency` seconds per request, the ceiling is
concurrency / latency requests per second; the script prints what the client reaches and the ratio
(the target is >= 0.90). The endpoint runs in its own process, as a remote one would; both share
this machine's cores.

    python -m tools.bench.openai_client --latency 0.1 --concurrency 8 32 64 --requests 640
"""

import argparse
import os
import subprocess
import sys
import time

from carevl.backends.interface import Chat, Sampling
from carevl.backends.openai_api import OpenAIChat
from carevl.prompts import JUDGMENT_SCHEMA, curation_judge_prompt
from carevl.standins.shapes import judge_items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, default=0.1, help="seconds the endpoint takes per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--requests", type=int, default=640, help="requests per measurement")
    args = parser.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "sk-loopback")
    item = judge_items(1, seed=0)[0]
    chats = [Chat.user(curation_judge_prompt(item.question, item.responses), item.image)] * args.requests
    print(f"{'concurrency':>11} {'requests/s':>10} {'ceiling':>8} {'ratio':>6}")
    server = subprocess.Popen(
        [sys.executable, "-m", "carevl.standins.loopback", "--latency", str(args.latency)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        base_url = server.stdout.readline().strip()
        for concurrency in args.concurrency:
            model = OpenAIChat("gpt-4o", base_url=base_url, concurrency=concurrency)
            model.generate(chats[:concurrency], Sampling(), JUDGMENT_SCHEMA)  # warm up
            start = time.perf_counter()
            replies = model.generate(chats, Sampling(), JUDGMENT_SCHEMA)
            rate = len(chats) / (time.perf_counter() - start)
            assert all(r.ok for r in replies), "a request failed"
            ceiling = concurrency / args.latency
            print(f"{concurrency:>11} {rate:>10.1f} {ceiling:>8.1f} {rate / ceiling:>6.3f}")
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
