"""Train a model on synthetic tokens under a parallel layout; the contract the tests and users rely on.

    torchrun --nproc-per-node K examples/train.py --model MODEL --layout L --steps N --seed S
             [--micro-batch M] [--global-batch B] [--seq-len T] [--lr LR] [--plan plan.yaml]
    python examples/train.py --model MODEL --steps N --seed S        # the unsharded reference

Tokens come from the seed (autoshard/synthetic.py: a learnable bigram rule with noise; the same global
batch whatever the layout); AdamW; rank 0 prints one JSON line per step: {"step": i, "loss": x}, the mean
next-token loss plus, for MoE models, each layer's load-balancing loss times the model's coefficient
(`model.moe.aux_loss_coef`, trained through its gradient: `ParallelModel.train_step`). Degrees
the layout leaves out are 1, except dp, which takes the remaining ranks; zero defaults to 0 (plain data parallel). `--plan` runs a plan written by `plan ... -o plan.yaml`
(its layout, micro-batch and per-block recompute; --layout must then be empty).

The model is built with its parameters on the meta device and every rank allocates and initialises only its
shards (transforms/init.py: seeded per parameter, so every layout starts from the unsharded model's exact
weights). `--grads-out F` saves the whole gradients after the first step (rank 0) for equivalence tests.
Every layout of tp (with sp), pp (with vpp and the schedule), cp, ep, dp and zero runs; `--stage-split 1,3`
sets the blocks per pipeline chunk (the plan's split with --plan; even otherwise). Bad input exits with 2.
`--verify` checks the sharded model against the unsharded one on one batch before training (exit 1 if they
differ).

Checkpoints (transforms/checkpoint.py): `--checkpoint-dir DIR --save-every K --keep N` saves every K steps and
after the last (DIR/step_N, complete or absent, under the unsharded model's names: it loads under any layout
and GPU count), keeping the newest N. A job started again with the same command (torchrun --max-restarts after
a rank died) continues from the newest complete checkpoint in DIR; `--resume PATH` loads a given checkpoint
(or the newest in a folder of them). A missing, damaged or foreign checkpoint exits with 2, nothing written.
`--precision bf16` computes in bf16 with fp32 master weights, gradients reduced in `--grad-reduce` (default:
the cost model's, bf16 under zero 0-1, fp32 under FSDP2's zero 2-3; transforms/precision.py); the default is
fp32. `--lr-schedule cosine --warmup-steps W` warms the learning rate up and decays it (its state is saved in
checkpoints and restored on resume). `--cp-attention allgather` runs context-parallel attention on
all-gathered keys and values instead of the ring (transforms/cp.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoshard.cost_models.layout import complete, parse_layout  # noqa: E402
from autoshard.planner.capture import structure  # noqa: E402
from autoshard.planner.capture.loading import load_model  # noqa: E402
from autoshard.planner.capture.trace import capture  # noqa: E402
from autoshard.planner.errors import UserError  # noqa: E402
from autoshard.planner.outputs.plan import fingerprint, load_plan  # noqa: E402
from autoshard.synthetic import synthetic_batch  # noqa: E402
from autoshard.transforms.apply import apply_layout, check_apply, plan_choices  # noqa: E402
from autoshard.transforms.checkpoint import checkpoints  # noqa: E402
from autoshard.transforms.init import meta_parameters  # noqa: E402
from autoshard.transforms.lr_schedule import WarmupCosine  # noqa: E402


def main() -> int:
    args = _parser().parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        model, vocab = _build(args)
        graph = capture(model, 1, args.seq_len)
        layout, recompute, split = _layout(args, world, graph)
        if args.global_batch % (layout.dp * layout.mbs):
            raise UserError(f"--global-batch {args.global_batch} is not divisible by dp({layout.dp}) x "
                            f"micro-batch({layout.mbs})")
        # every refusal before joining the process group, so that no rank leaves while another is connecting
        check_apply(model, layout, graph=graph, split=split, precision=args.precision,
                    grad_reduce=args.grad_reduce, cp_attention=args.cp_attention)
        rank = _init_distributed(world)
        parallel = apply_layout(model, layout, graph=graph, recompute=recompute, lr=args.lr, seed=args.seed,
                                split=split, precision=args.precision, cp_attention=args.cp_attention,
                                grad_reduce=args.grad_reduce)
        parallel.lr_schedule = _lr_schedule(args)
        start, position = _resume(parallel, args, rank)
    except (UserError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return _exit(2, world)
    if args.verify and not _verify(parallel, args, vocab, rank):
        return _exit(1, world)
    for step in range(start, args.steps):
        _kill_for_tests(step, rank, world)
        loss = parallel.train_step(_batch(args, vocab, position + step - start))
        if rank == 0:
            print(json.dumps({"step": step, "loss": loss}), flush=True)
        if args.checkpoint_dir and (step + 1 == args.steps or args.save_every and (step + 1) % args.save_every == 0):
            parallel.save(args.checkpoint_dir, step=step + 1, keep=args.keep,
                          extra={"data_position": position + step + 1 - start})
        if step == 0 and args.grads_out:
            grads = parallel.full_gradients()
            if rank == 0:
                torch.save(grads, args.grads_out)
    if world > 1:
        dist.barrier()  # let every rank finish its last collective before the group goes away
        dist.destroy_process_group()
    return _exit(0, world)


def _exit(code: int, world: int) -> int:
    """`code`, with gloo's threads stopped first: interpreter teardown with them alive can abort ("terminate
    called without an active exception", exit -6). After a run the process ends at once; after a refusal it
    exits normally, so that a rank still inside apply_layout can reach its own refusal before the store goes."""
    if world > 1 and code == 0:
        sys.stdout.flush()
        os._exit(0)  # the group is already destroyed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return code


def _resume(parallel, args: argparse.Namespace, rank: int) -> tuple[int, int]:
    """(first step, its batch index): from --resume, else from the newest checkpoint in --checkpoint-dir (a job
    restarted with the same command), else (0, 0)."""
    source = args.resume
    if source is None and args.checkpoint_dir and Path(args.checkpoint_dir).is_dir() \
            and checkpoints(Path(args.checkpoint_dir)):
        source = args.checkpoint_dir
    if source is None:
        return 0, 0
    resumed = parallel.load(source)
    if rank == 0:
        print(f"resumed from {resumed.path} at step {resumed.step}", file=sys.stderr, flush=True)
    return resumed.step, int(resumed.extra.get("data_position", resumed.step))


def _lr_schedule(args: argparse.Namespace) -> WarmupCosine | None:
    """--lr-schedule cosine: warmup to --lr over --warmup-steps, cosine to a tenth of it at --steps."""
    if args.lr_schedule == "constant":
        return None
    return WarmupCosine(peak=args.lr, warmup=args.warmup_steps, total=args.steps)


def _kill_for_tests(step: int, rank: int, world: int) -> None:
    """Tests only: with AUTOSHARD_TEST_KILL_AT_STEP=k and AUTOSHARD_TEST_KILL_MARKER=file set, the last rank
    SIGKILLs itself inside the forward of step k, once (the marker file, created first, stops the restarted
    job from doing it again)."""
    at, marker = os.environ.get("AUTOSHARD_TEST_KILL_AT_STEP"), os.environ.get("AUTOSHARD_TEST_KILL_MARKER")
    if at is None or marker is None or int(at) != step or rank != world - 1 or Path(marker).exists():
        return
    Path(marker).touch()
    torch.nn.modules.module.register_module_forward_hook(lambda *_: os.kill(os.getpid(), signal.SIGKILL))


VERIFY_RTOL = 1e-4


def _verify(parallel, args: argparse.Namespace, vocab: int, rank: int) -> bool:
    """One forward and backward on a batch the training never sees, sharded and unsharded (the whole model,
    built and seeded the same way on every rank: for models that fit one device, such as a tiny config of
    the architecture); True when the losses agree within VERIFY_RTOL. Neither model is updated."""
    tokens = synthetic_batch(seed=args.seed + 1, step=0, batch=args.global_batch, seq_len=args.seq_len, vocab=vocab)
    got = parallel.train_step(tokens, update=False)
    model, _ = _build(args)
    reference = apply_layout(model, complete({"zero": 0, "mbs": args.micro_batch}, 1),
                             graph=capture(model, 1, args.seq_len), seed=args.seed)
    want = reference.train_step(tokens, update=False)
    rel = abs(got - want) / abs(want)
    ok = rel <= VERIFY_RTOL
    if rank == 0:
        print(json.dumps({"verify": "ok" if ok else "FAILED", "loss": got, "unsharded_loss": want,
                          "relative_difference": rel}), flush=True)
        if not ok:
            print(f"error: --verify: the sharded model's loss {got:.6f} differs from the unsharded model's "
                  f"{want:.6f} by {rel:.2e} relative (> {VERIFY_RTOL:g}): this layout does not compute the same "
                  "model; please report it with the model's config", file=sys.stderr)
    return ok


def _layout(args: argparse.Namespace, world: int, graph) -> tuple:
    """The Layout, per-block recompute and stage split from --layout (and --stage-split) or --plan, checked
    against the world size."""
    if args.plan:
        if args.layout:
            raise UserError("give --layout or --plan, not both")
        plan = load_plan(args.plan)
        if plan.gpus != world:
            raise UserError(f"{args.plan} is a plan for {plan.gpus} GPUs but {world} processes were started")
        if plan.model.get("fingerprint") != fingerprint(graph):
            raise UserError(f"{args.plan} was made for another model ({plan.model.get('name')}); re-plan {args.model}")
        return plan.layout_obj(), *plan_choices(plan, graph)
    partial = parse_layout(args.layout or "")
    partial.setdefault("zero", 0)
    partial.setdefault("mbs", args.micro_batch)
    split = [int(x) for x in args.stage_split.split(",")] if args.stage_split else None
    return complete(partial, world), None, split


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
    p.add_argument("--plan", help="a plan .yaml to run instead of --layout")
    p.add_argument("--stage-split", help="blocks per pipeline chunk (pp x vpp numbers), e.g. 1,3; even if not given")
    p.add_argument("--grads-out", help="save the whole gradients after the first step here (rank 0)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: bf16 compute and parameters, fp32 master weights in the optimizer (any zero stage)")
    p.add_argument("--grad-reduce", choices=["fp32", "bf16"],
                   help="bf16 runs: gradient buffer and reduction dtype (default: bf16 under zero 0-1, fp32 "
                        "under zero 2-3, as the cost model prices them)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="cosine: linear warmup over --warmup-steps, then cosine decay to 0.1 x --lr at --steps "
                        "(its state is saved in checkpoints)")
    p.add_argument("--warmup-steps", type=int, default=0, help="--lr-schedule cosine: steps of linear warmup")
    p.add_argument("--checkpoint-dir", help="save checkpoints here (DIR/step_N); a restarted job resumes from the "
                                            "newest complete one")
    p.add_argument("--save-every", type=int, default=0, help="save every K steps (and after the last); 0: after "
                                                             "the last only")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept in --checkpoint-dir, the newest (0: all)")
    p.add_argument("--resume", help="load this checkpoint (or the newest in this folder of them) before training")
    p.add_argument("--cp-attention", choices=["ring", "allgather"], default="ring",
                   help="context-parallel attention: ring (keys/values passed round the cp ranks, overlapped) or "
                        "allgather (keys/values all-gathered; transforms/cp.py)")
    p.add_argument("--verify", action="store_true",
                   help="before training, compare one forward/backward with the unsharded model (built whole on "
                        "every rank: use a small config of the architecture); exit 1 if the losses differ")
    return p


def _init_distributed(world: int) -> int:
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restart and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's store outlives a restart: without a fresh prefix the new ranks can read the dead ones'
            # addresses and fail to connect (pytorch/pytorch#135712)
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
            dist.init_process_group(backend, store=dist.PrefixStore(f"restart_{restart}", store),
                                    rank=int(os.environ["RANK"]), world_size=world)
        else:
            dist.init_process_group(backend)
    return dist.get_rank() if world > 1 else 0


def _build(args: argparse.Namespace) -> tuple[torch.nn.Module, int]:
    """The model with its parameters on meta (buffers real); apply_layout allocates and seeds the shards."""
    loaded = load_model(args.model)
    with meta_parameters():
        if loaded.kind == "hf":
            import transformers

            model = transformers.AutoModelForCausalLM.from_config(loaded.module.config, torch_dtype=torch.float32)
            return model, model.config.vocab_size
        if loaded.spec is not None:
            from autoshard.planner.capture.reference_model import build_reference_model

            return build_reference_model(loaded.spec), loaded.spec.vocab
        import importlib.util

        spec = importlib.util.spec_from_file_location("user_model", args.model)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = module.build_model()
    return model, structure.token_embedding(model).num_embeddings


def _batch(args: argparse.Namespace, vocab: int, step: int) -> torch.Tensor:
    """The step's global batch of token ids, the same on every rank and for every layout."""
    return synthetic_batch(seed=args.seed, step=step, batch=args.global_batch, seq_len=args.seq_len, vocab=vocab)


if __name__ == "__main__":
    sys.exit(main())
