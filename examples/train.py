"""Train a model on synthetic tokens under a parallel layout; the contract the tests and users rely on.

    torchrun --nproc-per-node K examples/train.py --model MODEL --layout L --steps N --seed S
             [--micro-batch M] [--global-batch B] [--seq-len T] [--lr LR]
    python examples/train.py --model MODEL --steps N --seed S        # the unsharded reference

Tokens come from the seed (the same global batch whatever the layout); AdamW; rank 0 prints one JSON line
per step: {"step": i, "loss": x}. Degrees the layout leaves out are 1, except dp, which takes the remaining
ranks. This version runs tensor parallelism (tp), data parallelism with ZeRO 0-3 and activation
recomputation; pp, cp and ep come with the later transform issues and are refused with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoshard.cost_models.layout import parse_layout  # noqa: E402
from autoshard.planner import structure  # noqa: E402
from autoshard.planner.errors import UserError  # noqa: E402
from autoshard.planner.loading import load_model  # noqa: E402
from autoshard.transforms.ac import apply_ac  # noqa: E402
from autoshard.transforms.dp import apply_dp  # noqa: E402

UNSUPPORTED = ("pp", "cp", "ep", "vpp")


def main() -> int:
    args = _parser().parse_args()
    try:
        layout = parse_layout(args.layout or "")
    except ValueError as exc:
        return _fail(f"--layout: {exc}")
    rank, world = _init_distributed()
    not_yet = [k for k in UNSUPPORTED if layout.get(k, 1) != 1]
    if not_yet:
        return _fail(f"--layout sets {', '.join(f'{k}={layout[k]}' for k in not_yet)}: this version runs data "
                     "parallelism (dp, zero 0-3) and recompute only; tensor, pipeline, context and expert "
                     "parallelism come with the next transforms.")
    tp = layout.get("tp", 1)
    if world % tp:
        return _fail(f"--layout tp={tp} does not divide the {world} processes")
    dp = layout.get("dp", world // tp)
    if dp * tp != world:
        return _fail(f"--layout dp={dp} x tp={tp} but {world} processes were started")
    zero = layout.get("zero", 0 if tp == 1 else 3)
    if tp > 1 and dp > 1 and zero < 2:
        return _fail(f"zero={zero} with tp > 1 needs DDP over DTensor parameters, which PyTorch lacks; use "
                     "zero=2 or zero=3 (FSDP2 over the dp axis)")
    if args.global_batch % (dp * args.micro_batch):
        return _fail(f"--global-batch {args.global_batch} is not divisible by dp({dp}) x micro-batch({args.micro_batch})")
    try:
        model, vocab = _build(args)
    except UserError as exc:
        return _fail(str(exc))
    blocks = _blocks(model)
    mesh = None
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        device = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device, (dp, tp), mesh_dim_names=("dp", "tp"))  # TP innermost
    if tp > 1:  # fixed order: TP, then recompute, then DP/ZeRO (transforms/apply.py's order)
        from autoshard.planner.capture import capture
        from autoshard.transforms.tp import apply_tp

        try:
            apply_tp(model, mesh=mesh["tp"], graph=capture(model, 1, args.seq_len))
        except ValueError as exc:
            return _fail(str(exc))
    apply_ac(model, blocks=blocks, modes=dict.fromkeys(blocks, layout.get("recompute", "none")))
    if dp > 1:
        model, optimizer = apply_dp(model, zero=zero, blocks=blocks, lr=args.lr, mesh=mesh["dp"] if zero >= 2 else None,
                                    sparse_grads=_has_experts(model))
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    dp_group = mesh["dp"].get_group() if mesh is not None and dp > 1 else None
    for step in range(args.steps):
        loss = _train_step(model, optimizer, _batch(args, vocab, step), dp_rank, dp, args.micro_batch, dp_group)
        if rank == 0:
            print(json.dumps({"step": step, "loss": loss}), flush=True)
    if world > 1:
        dist.barrier()  # let every rank finish its last collective before the group goes away
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)  # skip interpreter teardown, which gloo's threads can abort ("terminate called ...")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="spec .yaml or model.py")
    p.add_argument("--layout", default="", help="e.g. dp=2,zero=3,recompute=full")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    return p


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _init_distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _build(args: argparse.Namespace) -> tuple[torch.nn.Module, int]:
    """The model with real fp32 weights from the seed: every rank builds the same, unsharded model."""
    loaded = load_model(args.model)
    torch.manual_seed(args.seed)
    if loaded.kind == "hf":
        import transformers

        model = transformers.AutoModelForCausalLM.from_config(loaded.module.config)
        return model.float(), model.config.vocab_size
    if loaded.spec is not None:
        from autoshard.planner.reference_model import build_reference_model

        model = build_reference_model(loaded.spec)
        return model, loaded.spec.vocab
    import importlib.util

    spec = importlib.util.spec_from_file_location("user_model", args.model)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.build_model()
    emb = structure.token_embedding(model)
    return model, emb.num_embeddings


def _has_experts(model: torch.nn.Module) -> bool:
    """A router beside a list of identical experts somewhere (what capture calls MoE)."""
    blocks = _blocks(model)
    return any(structure.moe_info(model, b, []) is not None for b in blocks)


def _blocks(model: torch.nn.Module) -> list[str]:
    found = structure.find_block_container(model)
    return found[1] if found else []


def _batch(args: argparse.Namespace, vocab: int, step: int) -> torch.Tensor:
    """The step's global batch of token ids, the same on every rank and for every layout."""
    g = torch.Generator().manual_seed(args.seed * 100_003 + step)
    return torch.randint(0, vocab, (args.global_batch, args.seq_len + 1), generator=g)


def _train_step(model, optimizer, tokens: torch.Tensor, rank: int, dp: int, micro_batch: int, group=None) -> float:
    """One optimizer step on this rank's share of the batch; returns the global mean loss."""
    local = tokens.chunk(dp)[rank]
    micro = local.split(micro_batch)
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros(())
    for mb in micro:
        out = model(mb[:, :-1])
        logits = getattr(out, "logits", out)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), mb[:, 1:].reshape(-1))
        (loss / len(micro)).backward()
        total += loss.detach() / len(micro)
    optimizer.step()
    if dp > 1:
        dist.all_reduce(total, group=group)
        total /= dp
    return total.item()


if __name__ == "__main__":
    sys.exit(main())
