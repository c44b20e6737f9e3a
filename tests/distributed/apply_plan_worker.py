"""Worker for test_apply_plan.py (launched by torchrun): plan tiny_llama with the given layout keys, apply
the plan to a model with real weights (argv[2] == "real": train.py's seeded weights, the same on every rank,
sharded by apply_plan) or with meta parameters ("meta": each rank initialises its shards), train 5 steps on
train.py's synthetic tokens, print the losses as JSON lines on rank 0."""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

import autoshard
from autoshard.planner.capture.reference_model import build_reference_model
from autoshard.planner.capture.spec import load_spec
from autoshard.synthetic import synthetic_batch
from autoshard.transforms.init import init_parameters, meta_parameters

SPEC = Path(__file__).resolve().parents[2] / "examples" / "specs" / "tiny_llama.yaml"
SEED, BATCH, SEQ = 7, 8, 32

dist.init_process_group("gloo")
plan = autoshard.plan(SPEC, gpus=dist.get_world_size(), profile="h100_ib", global_batch=BATCH, seq_len=SEQ,
                      layout=sys.argv[1])
if sys.argv[2] == "real":
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
        print(json.dumps({"step": step, "loss": loss}), flush=True)
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # skip interpreter teardown: gloo's threads can abort it ("terminate called without an active exception")
