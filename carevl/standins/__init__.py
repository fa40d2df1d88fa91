"""Stand-ins for the real world, so that everything runs on a CPU, offline, in minutes.

- `shapes`: synthetic images whose content is known exactly, with questions, answers and critiques;
  `world` writes its files (shards, benchmark records, preference groups, a questions file).
- `tiny`: tiny random-weight checkpoints of the supported model families (real classes, weight
  names and processors), `vision_pretrain`: their vision encoder trained on the world.
- `simulated`: the curation models (candidates, captioner, GPT-4o judge, experts, evaluator) as
  simulations that read the world's truth.
- `loopback`: a local OpenAI-compatible endpoint (chat completions, files, batches) with chosen
  latency and injected faults.
- `baselines`: carevl's data in a peer system's format (TRL), for comparisons.

The product never imports this package: configs and tests choose these stand-ins by name.
"""
