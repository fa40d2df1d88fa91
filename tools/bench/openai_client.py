"""Throughput of the live OpenAI-compatible client against a loopback endpoint with fixed latency.

With `concurrency` requests in flight and `latency` seconds per request, the ceiling is
concurrency / latency requests per second; the script prints what the client reaches and the ratio
(the target is >= 0.90). The endpoint runs in its own process, as a remote one would; both share
this machine's cores.

    python -m tools.bench.openai_client --latency 0.1 1.0 --concurrency 64 256 --seconds 10

Each concurrency is measured three ways: through one HTTP client (one connection pool, the SDK's
default use), through clients of `--pool-size` requests each (carevl's default, 16), and through
such pools in `--processes` event-loop processes; each as requests/s and its ratio to the
ceiling. The last columns are the CPU milliseconds per request of the one-process client (pools)
and of the endpoint's process: one core sends at most 1000 / ms requests/s, and where client and
endpoint together need more than the machine's cores, the ceiling is out of reach here whatever
the client does.
Each measurement sends concurrency x `seconds` / latency requests: `seconds` at the ceiling, so the
start of the request processes (~1 s) weighs the same at every setting.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from carevl.backends.interface import Chat, Sampling
from carevl.backends.openai_api import OpenAIChat
from carevl.prompts import JUDGMENT_SCHEMA, curation_judge_prompt
from carevl.standins.shapes import judge_items


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rate(
    base_url: str,
    chats: list[Chat],
    concurrency: int,
    pool_size: int,
    server: int,
    processes: int = 1,
    transport: str = "httpx",
) -> tuple[float, ...]:
    """Requests per second of one `generate` call over `chats`, and the CPU milliseconds per
    request of this process and of the endpoint's (process id `server`)."""
    model = OpenAIChat(
        "gpt-4o",
        base_url=base_url,
        concurrency=concurrency,
        pool_size=pool_size,
        processes=processes,
        transport=transport,
    )
    model.generate(chats[:1], Sampling(), JUDGMENT_SCHEMA)  # imports the SDK, outside the timing
    start, cpu, served = time.perf_counter(), time.process_time(), cpu_seconds(server)
    replies = model.generate(chats, Sampling(), JUDGMENT_SCHEMA)
    elapsed, cpu, served = time.perf_counter() - start, time.process_time() - cpu, cpu_seconds(server) - served
    assert all(r.ok for r in replies), "a request failed"
    return len(chats) / elapsed, 1000 * cpu / len(chats), 1000 * served / len(chats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, nargs="+", default=[0.1, 1.0], help="seconds per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--pool-size", type=int, default=16, help="requests in flight per client")
    parser.add_argument("--processes", type=int, default=2, help="event-loop processes of the third way")
    parser.add_argument("--transport", default="httpx", help="the SDK's HTTP transport: httpx or aiohttp")
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="each measurement sends what the ceiling takes this long to send"
    )
    args = parser.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "sk-loopback")
    item = judge_items(1, seed=0)[0]
    chat = Chat.user(curation_judge_prompt(item.question, item.responses), item.image)
    print(
        f"{'latency':>7} {'concurrency':>11} {'requests':>8} {'ceiling':>8} {'one pool':>17} {'pools':>17} "
        f"{f'{args.processes} processes':>17} {'client ms':>9} {'endpoint ms':>11}"
    )
    for latency in args.latency:
        server = subprocess.Popen(
            [sys.executable, "-m", "carevl.standins.loopback", "--latency", str(latency)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            base_url = server.stdout.readline().strip()
            for concurrency in args.concurrency:
                chats = [chat] * (concurrency * max(1, round(args.seconds / latency)))
                ceiling = concurrency / latency
                way = {"server": server.pid, "transport": args.transport}
                one, *_ = rate(base_url, chats, concurrency, concurrency, **way)
                pools, client, endpoint = rate(base_url, chats, concurrency, args.pool_size, **way)
                spread, *_ = rate(base_url, chats, concurrency, args.pool_size, processes=args.processes, **way)
                cells = [f"{r:7.1f}/s ({r / ceiling:.3f})" for r in (one, pools, spread)]
                print(
                    f"{latency:>7} {concurrency:>11} {len(chats):>8} {ceiling:>8.1f} {cells[0]:>17} {cells[1]:>17}"
                    f" {cells[2]:>17} {client:>9.2f} {endpoint:>11.2f}",
                    flush=True,
                )
        finally:
            server.terminate()


if __name__ == "__main__":
    main()
