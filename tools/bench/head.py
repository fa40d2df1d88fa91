"""Peak memory and time of the language-model head's log-probs at response positions, forward and
backward, all rows at once against chunks (`carevl.losses.token_logprobs`), each in a fresh process.

    python -m tools.bench.head                                  # CPU: Qwen2-VL's vocabulary, a narrow width
    python -m tools.bench.head --device cuda --width 3584 --tokens 16000 --dtype bfloat16   # the 7B head on a GPU

Peak memory is the process's peak resident size on CPU (less what it held before the pass) and
torch's peak allocation on a GPU. The head's weight trains, as in full fine-tuning.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from carevl.losses import token_logprobs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def measure(args) -> dict:
    torch.manual_seed(0)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    head = torch.nn.Linear(args.width, args.vocabulary, bias=False, device=device, dtype=dtype)
    hidden = torch.randn(args.tokens, args.width, device=device, dtype=dtype, requires_grad=True)
    targets = torch.randint(args.vocabulary, (args.tokens,), device=device)
    chunk = args.chunk or None
    token_logprobs(hidden[:8], targets[:8], head, chunk).sum().backward()  # warm-up
    head.weight.grad = hidden.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds = []
    for _ in range(args.repeats):
        head.weight.grad = hidden.grad = None
        start = time.perf_counter()
        token_logprobs(hidden, targets, head, chunk).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"seconds": min(seconds), "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4000, help="response tokens in the step")
    parser.add_argument("--vocabulary", type=int, default=151936, help="Qwen2-VL's")
    parser.add_argument("--width", type=int, default=256, help="hidden size (1536: 2B, 3584: 7B)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 2048, 1024], help="rows per chunk; 0: all at once")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="passes timed (the fastest is reported)")
    parser.add_argument(
        "--chunk", type=int, default=None, help=argparse.SUPPRESS
    )  # one measurement, in a child process
    args = parser.parse_args()
    if args.chunk is not None:
        print(json.dumps(measure(args)))
        return
    results = {}
    for chunk in args.chunks:
        child = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--chunk", str(chunk)], capture_output=True, text=True, check=True
        )
        results[chunk] = json.loads(child.stdout.strip().splitlines()[-1])
    whole = results[args.chunks[0]]
    print(
        f"{args.tokens} response tokens, vocabulary {args.vocabulary}, width {args.width}, {args.dtype} on "
        f"{args.device}"
    )
    for chunk, result in results.items():
        print(
            f"  {'all at once' if not chunk else f'chunks of {chunk}'}: peak {result['peak_bytes'] / 2**30:.2f} GiB "
            f"({result['peak_bytes'] / whole['peak_bytes']:.2f} of the first row's), "
            f"{result['seconds']:.2f} s ({result['seconds'] / whole['seconds']:.2f}x)"
        )


if __name__ == "__main__":
    main()
