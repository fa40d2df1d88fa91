"""Time a frozen Qwen2-VL vision tower's forward (no graph, as in training) with its attention per
image (transformers) and by image size (`carevl.vision_attention`), alternating the two in one
process, and print the ratio.

    python -m tools.bench.vision_attention                       # CPU: the 2B/7B towers' layout, narrow widths
    python -m tools.bench.vision_attention --device cuda --full  # the real widths, bf16, on a GPU
    python -m tools.bench.vision_attention --mixed               # images of three sizes instead of one

With narrow widths the forward's time is mostly the host's dispatching, which is what bounds a GPU
step at small batches; --full on a GPU times the real tower.
"""

import argparse
import time

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from carevl.vision_attention import batch_vision_attention
from tools.bench.gpu_smoke import NARROW_VISION, VISION


def tower(full: bool, device: str, dtype: torch.dtype, batched: bool) -> torch.nn.Module:
    vision = {**VISION, **({} if full else NARROW_VISION), "hidden_size": 1536 if full else 256}
    text = {
        "hidden_size": 64,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 128,
    }
    config = Qwen2VLConfig(text_config=text, vision_config=vision)
    config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).to(device=device, dtype=dtype).eval()
    if batched:
        assert batch_vision_attention(model) == VISION["depth"]
    return model.model.visual


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[4, 16, 32], help="images per forward")
    parser.add_argument(
        "--image-size", type=int, default=448, help="pixels per side (448: 1,024 patches, 256 image tokens)"
    )
    parser.add_argument("--mixed", action="store_true", help="cycle three image sizes (the side, 3/4 and 1/2 of it)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="the real widths (1,280 wide, 16 heads)")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    towers = {
        name: tower(args.full, args.device, dtype, batched)
        for name, batched in (("per image", False), ("by size", True))
    }
    towers["by size"].load_state_dict(towers["per image"].state_dict())
    patch = VISION["patch_size"]
    sides = [args.image_size, args.image_size * 3 // 4, args.image_size // 2] if args.mixed else [args.image_size]
    for count in args.images:
        grid = torch.tensor(
            [[1, sides[i % len(sides)] // patch, sides[i % len(sides)] // patch] for i in range(count)],
            device=args.device,
        )
        grid[:, 1:] -= grid[:, 1:] % VISION["spatial_merge_size"]
        pixels = torch.randn(
            int(grid.prod(dim=1).sum()),
            3 * VISION["temporal_patch_size"] * patch * patch,
            device=args.device,
            dtype=dtype,
        )
        times = {name: [] for name in towers}
        with torch.no_grad():
            outputs = {name: model(pixels, grid_thw=grid).pooler_output for name, model in towers.items()}  # warm-up
            for _ in range(args.repeats):
                for name, model in towers.items():
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    model(pixels, grid_thw=grid)
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    times[name].append(time.perf_counter() - start)
        difference = (outputs["per image"].float() - outputs["by size"].float()).abs().max().item()
        best = {name: min(values) for name, values in times.items()}
        print(
            f"{count} images ({'mixed sizes' if args.mixed else f'{sides[0]} px'}): per image "
            f"{best['per image'] * 1e3:.1f} ms, "
            f"by size {best['by size'] * 1e3:.1f} ms, {best['per image'] / best['by size']:.2f}x; largest output "
            f"difference {difference:.2e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
