"""Worker for test_ep.py's router count: on 2 ranks with ep=2, one training step of one micro-batch per rank
through examples/train.py's builder and apply_layout, counting the calls of every MoE layer's router.
Prints one JSON line: {"reference": calls per layer, "record_replay": calls per layer} (the most over the
layers) for the reference MoE (route -> run_experts -> combine) and a MoE forward EP does not know."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch.distributed as dist
from spawn import exit_cleanly  # tests/distributed is the script's directory

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("train", ROOT / "examples" / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

MODELS = {"reference": ROOT / "tests" / "data" / "ep" / "mixed_topk_moe.py",
          "record_replay": ROOT / "tests" / "data" / "ep" / "mixtral_style_moe.py"}


def router_calls(model_file: Path) -> int:
    """Router calls per MoE layer in one forward (one micro-batch per rank), the most over the layers."""
    args = train._parser().parse_args(["--model", str(model_file), "--global-batch", "2", "--seq-len", "32",
                                       "--seed", "7", "--layout", "ep=2"])
    model, vocab = train._build(args)
    graph = train.capture(model, 1, args.seq_len)
    layout, recompute, split = train._layout(args, dist.get_world_size(), graph)
    parallel = train.apply_layout(model, layout, graph=graph, recompute=recompute, lr=args.lr, seed=args.seed)
    calls: dict[str, int] = {}
    for info in [u.moe for u in graph.units if u.moe is not None]:
        router = model.get_submodule(info.router)
        router.register_forward_hook(lambda *_, name=info.router: calls.__setitem__(name, calls.get(name, 0) + 1))
    parallel.train_step(train._batch(args, vocab, 0))
    return max(calls.values())


def main() -> None:
    dist.init_process_group("gloo")
    counts = {name: router_calls(path) for name, path in MODELS.items()}
    if dist.get_rank() == 0:
        print(json.dumps(counts), flush=True)
    exit_cleanly()


if __name__ == "__main__":
    main()
