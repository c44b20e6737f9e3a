"""What the training framework does with a layout: the same layout runs differently on Megatron-Core + TE,
torchtitan, DeepSpeed, nanotron, or autoshard's own `apply_plan` (torch-native, the default).

Each framework is a few facts read from its code or documentation (what `recompute=selective` saves, how
many bytes a logit costs at the loss, how ZeRO-3 gathers parameters, how gradients are bucketed), plus one
fitted coefficient, `kernel_efficiency`: the fraction of the hardware profile's GEMM/attention efficiency its
kernels reach (fused TE kernels = 1 by definition). It is fitted per framework on the calibration runs by
benchmarks/accuracy.py and cross-validated leaving one source family out; `prior` is the value before any fit.
Only frameworks with at least 3 calibration runs are fitted (accuracy.MIN_FRAMEWORK_RUNS): megatron_2023
(Megatron-LM before Transformer Engine, 12 runs over three sources, 0.76) and nanotron (1.2, the top of
its range since the loss's HBM passes are priced: docs/accuracy.md, stop 23);
torchtitan's stays at its prior, degenerate with the GEMM efficiency of its 500 W H100s (no other source
uses them); DeepSpeed and plain torch have 1 and 2 runs. `accuracy.py --write-profiles` writes the fitted
values here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from autoshard.hardware_profiles import Profile


@dataclass(kw_only=True, frozen=True, slots=True)
class Framework:
    name: str
    description: str
    selective: str
    """What recompute=selective recomputes: "attention" (the attention core: Megatron's selective,
    Korthikanti et al. Sec. 5; autoshard's transforms/ac.py) or "op" (torchtitan's op-level selective AC:
    saves the outputs of every other matmul and of SDPA, recomputes the rest)."""
    logit_bytes: float
    """Bytes per logit at the loss's backward peak (memory.LOGIT_BYTES)."""
    vocab_parallel_logit_bytes: float = 0.0
    """The same with vocabulary-parallel logits, TP > 1 (0: as logit_bytes)."""
    sp_saves_gathered: bool = False
    """Under sequence parallelism a column-parallel linear saves its all-gathered input for the weight
    gradient (DTensor's parallel styles: autoshard's transforms/tp.py and torchtitan gather a module's input
    once and its linears keep it), rather than its sequence shard gathered again in backward (Megatron-LM's
    and Transformer Engine's linears, Korthikanti et al. Sec. 4.2.2)."""
    zero3_gather: str
    """ZeRO-3 parameter gathers: "block" (FSDP2 units, one per transformer block, prefetched), "linear"
    (DeepSpeed ZeRO-3 fetches each submodule's parameters) or "tensor" (one all-gather per parameter
    tensor: DeepSpeed of 2021)."""
    zero3_overlap: float
    """Fraction of the ZeRO-3 traffic that can hide under compute (prefetch)."""
    zero3_reduce_bytes: float = 4.0
    """Bytes per gradient element of the ZeRO-3 reduce-scatter (FSDP2 reduces in fp32 under bf16 mixed
    precision, torchtitan's and autoshard's default; DeepSpeed stage 3 in the 16-bit gradient dtype)."""
    zero3_regather: bool = False
    """A unit recomputed in backward gathers its parameters once more (DeepSpeed's per-submodule fetch hooks
    fire again in the recomputed forward; FSDP2 gathers a block once for its recompute and backward)."""
    dp_bucket_bytes: float
    """Gradient bucket: one reduction (with its ring latency) per this many bytes of gradients (math.inf: one
    for the stage's whole gradient buffer)."""
    dp_overlap: bool = True
    """Gradient reduction runs under the last micro-batch's backward and the ZeRO-1/2 parameter all-gather
    under the next step's first forward (torch DDP/FSDP hooks; Megatron-Core's overlap_grad_reduce and
    overlap_param_gather). False: both run after the pipeline schedule, exposed (Megatron-LM before August
    2023: train_step calls optimizer.reduce_model_grads after forward_backward_func and gather_model_params
    after the step)."""
    dp_bucket_params: float = 0.0
    dp_bucket_params_per_rank: float = 0.0
    """When dp_bucket_params is set, a bucket holds max(dp_bucket_params, this x the ranks reducing)
    parameters, whatever the gradient dtype (Megatron-Core's default: max(40M, 1M x dp x cp) parameters, so
    large DP stays bandwidth-bound), instead of dp_bucket_bytes."""
    grad_bytes: float
    """Bytes per parameter of the gradient buffer that accumulates micro-batches and is reduced over DP
    (ZeRO 0-2): 2 for 16-bit buffers, 4 for fp32 (Megatron's main_grad with bf16)."""
    cp_comm: str
    """How context-parallel attention runs: "ring" (keys/values passed round the cp ranks while the previous
    block computes, one causal flash kernel per step: TE's p2p CP), "allgather" (keys/values all-gathered
    before attention, not overlapped, one causal kernel per chunk: torch's context_parallel default rotate
    method, Llama 3) or "allgather_masked" (autoshard's transforms/cp.py with cp_attention=allgather:
    all-gathered keys/values and one SDPA call with an explicit mask over every key, so causality skips no
    work). autoshard's default, cp_attention=ring, is "ring" (transforms/cp.py: P2P round the cp ranks,
    overlapped with the attention of the block held, one kernel per step)."""
    cp_allgather: str = "allgather"
    """What its all-gather CP is (`cp_comm` under Training.cp_attention="allgather")."""
    zero_stages: tuple[int, ...]
    """The ZeRO stages the framework runs (0: replicated DDP)."""
    interleaved: bool
    """Whether it runs the interleaved (virtual-stage) pipeline schedule, vpp > 1."""
    tp_bwd_overlap: bool = False
    """The column-parallel linears' backward collectives (input all-gather for wgrad, dgrad reduce-scatter
    or all-reduce) run asynchronously under their dgrad/wgrad GEMMs (Megatron-Core's and TE's linears)."""
    pp_scatter_gather: bool = False
    """Without sequence parallelism, each TP rank sends 1/tp of a pipeline boundary tensor and the receiving
    stage all-gathers it over NVLink (Megatron-LM's scatter/gather, SC'21 Sec. 4.1, on by default until
    Megatron-Core)."""
    zero_with_pp: int = 3
    """The highest ZeRO stage it combines with pipeline parallelism."""
    even_stages: bool = False
    """Pipeline chunks hold equal numbers of layers: blocks divisible by pp x vpp, no uneven split."""
    dims: tuple[str, ...] = ("tp", "pp", "cp", "ep")
    """The parallelisms it runs besides data parallelism (a search under it tries no other)."""
    attention_kernel: str = "flash2"
    """Whose fused attention it runs: "best" (Transformer Engine's cuDNN attention, FlashAttention-3 class on
    Hopper) or "flash2" (torch SDPA, whose default backend priority puts FlashAttention-2 first, or the
    flash-attn 2 package), which reaches Profile.flash2_attention_ratio of the best on the GPU."""
    kernel_efficiency: float
    """Fitted: fraction of the profile's GEMM and attention efficiency these kernels reach."""
    kernels: str = ""
    """Whose kernels it runs, the key `kernel_efficiency` is fitted under: a variant of a framework (an older
    version, a subset of its parallelisms) shares its parent's; empty means its own name."""
    prior: float
    source: str

    def bucket_bytes(self, ranks: int, grad_bytes: float) -> float:
        """Bytes of one gradient bucket reduced over `ranks` ranks in `grad_bytes`-byte elements."""
        if not self.dp_bucket_params:
            return self.dp_bucket_bytes
        return max(self.dp_bucket_params, self.dp_bucket_params_per_rank * ranks) * grad_bytes

    def logit_bytes_at(self, tp: int) -> float:
        """Bytes per logit at the loss with `tp` tensor-parallel ranks (vocabulary-parallel when tp > 1)."""
        return self.vocab_parallel_logit_bytes if tp > 1 and self.vocab_parallel_logit_bytes else self.logit_bytes


FRAMEWORKS: dict[str, Framework] = {f.name: f for f in (
    Framework(
        name="torch", cp_comm="ring", cp_allgather="allgather_masked", description="autoshard apply_plan: eager PyTorch, SDPA, FSDP2 / DDP (the default)",
        selective="attention", logit_bytes=12.0, vocab_parallel_logit_bytes=16.0, sp_saves_gathered=True,
        zero3_gather="block", zero3_overlap=1.0,
        dp_bucket_bytes=25e6, grad_bytes=2.0, zero_stages=(0, 1, 2, 3), interleaved=True,
        kernel_efficiency=0.9, prior=0.90,
        source="transforms/dp.py (ZeRO 0-3), transforms/pp.py (torch schedules); transforms/ac.py (selective = attention core); torch DDP bucket_cap_mb=25; FSDP2 prefetches the "
               "next block; logits: cost_models/memory.py LOGIT_BYTES (VOCAB_PARALLEL_LOGIT_BYTES under loss_parallel); DTensor SP styles (transforms/tp.py); prior: eager elementwise kernels "
               "unfused, about 10% below TE (assumed until fitted)"),
    Framework(
        name="torchtitan", cp_comm="allgather", description="torchtitan: eager or compiled PyTorch, FSDP2, op-level selective AC",
        selective="op", logit_bytes=12.0, vocab_parallel_logit_bytes=16.0, sp_saves_gathered=True,
        zero3_gather="block", zero3_overlap=1.0,
        dp_bucket_bytes=25e6, grad_bytes=2.0, zero_stages=(0, 2, 3), interleaved=True,
        kernel_efficiency=0.9, prior=0.90,
        source="torchtitan: DDP or FSDP2, fully sharded (ZeRO-3) or with fsdp_reshard_after_forward=never (ZeRO-2), no sharded-optimizer-only mode; torch pipelining schedules incl. interleaved; distributed/activation_checkpoint.py: selective_ac_option='op' saves mm outputs "
               "except every other one, and SDPA outputs; FSDP2 one unit per block; logits upcast to fp32 "
               "(torchtitan's cross_entropy_loss, under loss_parallel with TP); TP through DTensor's parallel "
               "styles (PrepareModuleInput gathers the attention's and the MLP's input)"),
    Framework(
        name="megatron", cp_comm="ring", description="Megatron-LM / Megatron-Core with Transformer Engine (NeMo, Megatron-Bridge)",
        selective="attention", logit_bytes=6.0, zero3_gather="block", zero3_overlap=1.0,
        dp_bucket_bytes=0.0, dp_bucket_params=40e6, dp_bucket_params_per_rank=1e6, grad_bytes=4.0, zero_stages=(0, 1, 3),
        interleaved=True, tp_bwd_overlap=True, attention_kernel="best",
        kernel_efficiency=1, prior=1.0,
        source="Megatron-Core: DDP, distributed optimizer (ZeRO-1) or Megatron-FSDP (ZeRO-3), no ZeRO-2; "
               "LinearWithGradAccumulationAndAsyncCommunication (and TE's Linear) launch the backward input "
               "all-gather before the dgrad GEMM and the dgrad reduce-scatter before the wgrad GEMM; "
               "selective = core attention (Korthikanti Sec. 5); vocab-parallel cross-entropy "
               "keeps the 16-bit logits and works on an fp32 copy in place (about 2 + 4 bytes); DDP buckets "
               "of max(40M, 1M x dp) parameters (distributed_data_parallel.py, bucket_size default); fp32 gradient buffers reduced in fp32: Megatron-LM's "
               "arguments.py turns accumulate_allreduce_grads_in_fp32 on for bf16, NeMo 2's and "
               "Megatron-Bridge's bf16_mixed recipes set grad_reduce_in_fp32=True (6 + 12/d bytes per "
               "parameter with the distributed optimizer); TE kernels are the efficiency reference (1 by "
               "definition)"),
    Framework(
        name="deepspeed", cp_comm="ring", description="DeepSpeed ZeRO (stage 3 fetches parameters per submodule)",
        selective="attention", logit_bytes=14.0, zero3_gather="linear", zero3_overlap=0.5,
        dp_bucket_bytes=5e8, grad_bytes=2.0, zero_stages=(0, 1, 2, 3), interleaved=False, zero_with_pp=1,
        zero3_reduce_bytes=2.0, zero3_regather=True, dims=("tp", "pp", "ep"), kernel_efficiency=0.9, prior=0.90,
        source="DeepSpeed with Megatron-style TP (Megatron-DeepSpeed); no ring context parallelism (its Ulysses sequence parallelism is an all-to-all scheme this model does not price); DeepSpeed PipelineEngine: 1F1B only, ZeRO-2/3 refused with pipeline parallelism (runtime/pipe/engine.py asserts zero stage < 2); ZeRO-3 (runtime/zero/partitioned_param_coordinator.py) gathers each submodule's "
               "parameters before it runs, prefetching within stage3_prefetch_bucket_size, and again in a "
               "recomputed forward (its pre-forward hooks fire there too); gradients reduce-scattered in the "
               "16-bit dtype; reduce_bucket_size 5e8; overlap 0.5 assumed (prefetch is partial)"),
    Framework(
        name="nanotron", cp_comm="ring", description="Hugging Face nanotron (the Ultra-Scale Playbook's runs)",
        selective="attention", logit_bytes=14.0, zero3_gather="block", zero3_overlap=1.0,
        dp_bucket_bytes=50e6, grad_bytes=4.0, zero_stages=(0, 1), interleaved=False,
        kernel_efficiency=1.2, prior=0.90,
        source="nanotron: optimizer.zero_stage 0 or 1 (ZeroDistributedOptimizer), pipeline engines afab and 1f1b (no interleaving); nanotron wraps torch DDP (bucket_cap_mb=25) for DP; flash-attn kernels, unfused elementwise; "
               "gradients accumulated and all-reduced in fp32: its scaling-benchmark launcher sets "
               "optimizer.accumulate_grad_in_fp32=True, and with it the DDP communication hook reduces the "
               "fp32 accumulation buffers (25 MB buckets counted on the bf16 gradients: 50 MB of fp32); "
               "kernel_efficiency fitted by benchmarks/accuracy.py on the 4 Ultra-Scale Playbook runs (the only "
               "nanotron source: left out in cross-validation, it falls back to the prior; at 1.2, the fit's upper "
               "bound, it makes up for the Ultra-Scale rows' small models with a 131K vocabulary coming out slow: "
               "a misfit flagged in docs/accuracy.md, not a claim that nanotron beats TE)"),
)}
FRAMEWORKS["megatron_2023"] = replace(
    FRAMEWORKS["megatron"], name="megatron_2023", zero_stages=(0, 1), dims=("tp", "pp", "ep"),
    even_stages=True, pp_scatter_gather=True, dp_overlap=False, dp_bucket_params=0.0, dp_bucket_bytes=math.inf,
    attention_kernel="flash2", kernel_efficiency=0.757, prior=0.9,
    description="Megatron-LM before Megatron-Core's context parallelism and Megatron-FSDP (2021-2023: SC'21, "
                "Korthikanti et al., MegaScale's Megatron-LM baseline)",
    source="as megatron; context parallelism reached Megatron-Core in 2024 (core_r0.5) and Megatron-FSDP "
           "(ZeRO-3) in 2025, so runs of 2021-2023 could use neither; its arguments.py asserted num_layers "
           "divisible by the pipeline size and, interleaved, by num_layers_per_virtual_pipeline_stage (uneven "
           "first/last stages, decoder_first/last_pipeline_num_layers, came in 2024); pipeline sends "
           "scattered over the TP ranks and gathered on NVLink (scatter_gather_tensors_in_pipeline, on by "
           "default; SC'21 Sec. 4.1); data-parallel gradients reduced after the whole pipeline schedule, one "
           "collective per gradient buffer (the local DDP's contiguous buffer: allreduce_gradients, or the "
           "distributed optimizer's reduce_model_grads), and parameters gathered after the step "
           "(gather_model_params), neither overlapped (--overlap-grad-reduce came in August 2023; checked at "
           "2021-07 and at 285068c8 of January 2023, the commit MegaScale's baseline ran); attention from the "
           "flash-attn package (--use-flash-attn, merged at 285068c8), not Transformer Engine; kernels of "
           "their own, fitted: apex's fused kernels and cuBLAS GEMMs before Transformer Engine (prior 0.9, as "
           "the other non-TE stacks)")
FRAMEWORKS["megascale"] = replace(
    FRAMEWORKS["megatron_2023"], name="megascale", kernels="megatron_2023", dp_overlap=True,
    description="MegaScale (ByteDance, NSDI'24): Megatron-LM of 2023 with its communication overlapped",
    source="as megatron_2023; Jiang et al. NSDI'24 Sec. 3.2: the data-parallel all-gather prefetched under the "
           "first micro-batch's forward and the reduce-scatter run under the last one's backward (TP/SP fused "
           "with the GEMMs is the layout's async_tp); same kernels as megatron_2023 (its fused-kernel gains "
           "are not modelled)")
FRAMEWORKS["deepspeed_2021"] = replace(
    FRAMEWORKS["deepspeed"], name="deepspeed_2021", kernels="deepspeed", zero3_overlap=0.0, zero3_gather="tensor",
    description="DeepSpeed of 2021 (v0.3-0.5: SC'21's ZeRO-3 baseline): stage-3 parameter fetches not overlapped",
    source="as deepspeed; its 2021 stage-3 fetch (runtime/zero/partition_parameters.py _allgather_param) "
           "synchronized the device before each submodule's all-gather, issued one all-gather per parameter "
           "tensor (weights, biases and norm scales alike) and prefetched at most stage3_prefetch_bucket_size "
           "(5e6) elements, so the gathers ran exposed; coalesced, overlapped prefetch came with the "
           "partitioned_param_coordinator rewrite of 2022")
FRAMEWORKS["torch_fsdp"] = replace(
    FRAMEWORKS["torch"], name="torch_fsdp", kernels="torch", zero_stages=(0, 2, 3), dims=(), interleaved=False,
    description="PyTorch FSDP (v1) data parallelism only: NO_SHARD, SHARD_GRAD_OP or FULL_SHARD (MosaicML "
                "llm-foundry / Composer, 2023)",
    source="torch.distributed.fsdp.ShardingStrategy NO_SHARD / SHARD_GRAD_OP / FULL_SHARD = ZeRO 0 / 2 / 3; "
           "llm-foundry's 2023 training configs shard with FSDP only (no tensor, pipeline or context "
           "parallelism); kernels as torch")


def attention_ratio(fw: Framework, profile: Profile) -> float:
    """Speed of `fw`'s fused attention on `profile`'s GPU against the best kernel there (attention_kernel)."""
    return profile.flash2_attention_ratio if fw.attention_kernel == "flash2" else 1.0


def kernel_family(fw: Framework) -> str:
    """The name `fw`'s kernel efficiency is fitted under (Framework.kernels)."""
    return fw.kernels or fw.name


def with_cp_attention(fw: Framework, cp_attention: str | None) -> Framework:
    """`fw` running context-parallel attention as `cp_attention` says: "ring", "allgather" (its all-gather
    kind, `cp_allgather`), or None (its default, `cp_comm`)."""
    if cp_attention is None:
        return fw
    return replace(fw, cp_comm="ring" if cp_attention == "ring" else fw.cp_allgather)


def _squash(text: str) -> str:
    return text.strip().lower().replace("-", "").replace("_", "")


_ALIASES = {"megatronlm": "megatron", "megatroncore": "megatron", "nemo": "megatron", "autoshard": "torch",
            "pytorch": "torch", **{_squash(n): n for n in FRAMEWORKS}}


def get_framework(name: str) -> Framework:
    """Case-insensitive lookup ignoring '-' and '_'; an unknown name lists the valid ones."""
    fw = FRAMEWORKS.get(name)  # the exact name: the common case, on every unit the search prices
    if fw is not None:
        return fw
    key = _ALIASES.get(_squash(name))
    if key is None:
        raise ValueError(f"unknown framework {name!r}; valid: {', '.join(FRAMEWORKS)}")
    return FRAMEWORKS[key]
