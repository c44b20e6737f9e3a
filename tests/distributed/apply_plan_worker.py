"""Worker for test_apply_plan.py (launched by torchrun): for each pair of arguments LAYOUT WEIGHTS in argv[1:],
in turn (one launch for all), plan tiny_llama with the given layout keys, apply the plan to a model with real
weights (WEIGHTS == "real": train.py's seeded weights, the same on every rank, sharded by apply_plan) or with
meta parameters ("meta": each rank initialises its shards), train 5 steps on train.py's synthetic tokens,
print the losses as JSON lines on rank 0: {"layout": ..., "weights": ..., "step": i, "loss": x}."""

import json
import sys
from pathlib import Path

import torch.distributed as dist
from spawn import exit_cleanly  # tests/distributed is the script's directory

import autoshard
from autoshard.planner.capture.reference_model import build_reference_model
from autoshard.planner.capture.spec import load_spec
from autoshard.synthetic import synthetic_batch
from autoshard.transforms.init import init_parameters, meta_parameters

SPEC = Path(__file__).resolve().parents[2] / "examples" / "specs" / "tiny_llama.yaml"
SEED, BATCH, SEQ = 7, 8, 32


def train(layout: str, weights: str) -> None:
    plan = autoshard.plan(SPEC, gpus=dist.get_world_size(), profile="h100_ib", global_batch=BATCH, seq_len=SEQ,
                          layout=layout)
    if weights == "real":
        model = build_reference_model(load_spec(SPEC)[0])
        init_parameters(model, SEED)
        parallel = autoshard.apply_plan(model, plan)
    else:
        with meta_parameters():
            model = build_reference_model(load_spec(SPEC)[0])
        parallel = autoshard.apply_plan(model, plan, seed=SEED)
    for step in range(5):
        tokens = synthetic_batch(seed=SEED, step=step, batch=BATCH, seq_len=SEQ, vocab=256)
        loss = parallel.train_step(tokens)
        if dist.get_rank() == 0:
            print(json.dumps({"layout": layout, "weights": weights, "step": step, "loss": loss}), flush=True)


dist.init_process_group("gloo")
for layout, weights in zip(sys.argv[1::2], sys.argv[2::2], strict=True):
    train(layout, weights)
exit_cleanly()
