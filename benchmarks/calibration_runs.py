"""Published training runs (shared/calibration/published_runs_dev.yaml) as inputs for autoshard's cost model.

Each usable entry becomes a `CalibrationRun`: a complete `model:` mapping that `parse_spec` accepts, a
`Layout`, a `Training`, a hardware profile name and the measured tokens/s/GPU. Every value filled in that
the source does not state is listed, with its reason, in the run's `assumptions` (each starting with the
field it sets); `derived` says how tokens/s/GPU was computed when the source does not give it directly.

    .venv/bin/python benchmarks/calibration_runs.py      # one line per run, then the skipped runs

The file is read from `AUTOSHARD_CALIBRATION` when set, else from `DEFAULT_PATH` (`../shared/calibration/`
next to the repository root). Definitions (MFU vs HFU vs Megatron eq.(3), dp, ep, vpp): that folder's README.

Rules
-----
0. Reading. Integer fields written as text ("8", "16,384", "ZeRO-1") or as whole floats are read as
   integers (INT_FIELDS); an entry no rule can read is skipped with the error as its reason, and the
   file's other runs still load.
1. Model completion.
   * `ffn_hidden: null` (the GPT-style runs) -> 4 x hidden, the sources' standard GPT MLP.
   * `kv_heads: null` -> heads (multi-head attention).
   * `vocab: null` -> the family's published tokenizer size: Llama 2 32000 (meta-llama/Llama-2-7b-hf
     config.json), Nemotron 256000 (Nemotron-4 15B report / nvidia Nemotron HF config.json; the NeMo
     TFLOP/s <-> tokens/s check reproduces the table to 0.1% with it), DeepSeek-V3 129280
     (deepseek-ai/DeepSeek-V3 config.json). An unknown family is skipped.
   * `seq_len` from `training.seq_len`, else `model.seq_len`; the model's seq_len is set to the same value.
   * `style` is always written: "gpt" (2-matrix MLP) for ffn == 4h with MHA, "llama" (SwiGLU) otherwise;
     Llama-style models that happen to have ffn == 4h and MHA (the Ultra-Scale 1B) are written "llama".
   * `tied_embeddings`: the YAML's value; else tied for Megatron-LM GPT runs (SC'21, Korthikanti,
     MegaScale: Megatron-LM shares embedding and output weights by default, and the SC'21 parameter counts
     only match tied) and for MPT (llm-foundry's NumParams only match tied); untied otherwise (the
     Megatron-Core H100 README's 70.0B / 177.0B counts match untied).
   * MoE keeps only experts, top_k, expert_ffn_hidden, shared_experts, dense_layers_first; other keys
     (DeepSeek-V3's `mla`) are dropped and recorded, MLA being approximated by MHA with head_dim hidden/heads.
   * A model the spec rejects (`parse_spec` raises) is skipped with the error as reason.
2. Layout. tp/pp/cp/ep from `parallel`; dp = num_gpus/(tp*pp*cp). A run whose tp or pp is null (Table 2
   PTD-P rows give only TP*PP) is skipped; so is one whose GPUs do not divide, or that `Layout` rejects
   (ep must divide dp*cp).
   * vpp: vpp > 1 -> "interleaved_1f1b". A source that names the interleaved schedule in `pp_schedule`
     without a degree gets vpp 2 under torchtitan (its default of two stages per rank when no split
     points are given), the unstated rule below elsewhere; one that names another (1F1B) gets 1. Otherwise null with pp > 1 is unstated, like an unstated recompute: priced at the
     fastest interleaving degree that fits by our memory model among those the framework runs (1 where it
     does not interleave; benchmarks/accuracy.py `fitting_layout`): experts tune what they do not report.
     SC'21 Table 1 says "interleaved" only in prose, with no degree: the same rule.
   * zero: `zero_stage` when given; FSDP full shard (`fsdp` text: FSDP / Megatron-FSDP) -> 3; else by
     framework: Megatron SC'21 and Korthikanti (plain DP, fp32 gradients) -> 0; NeMo, Megatron-Bridge and
     the Megatron-Core H100 README (distributed optimizer on in their recipes) -> 1; MegaScale -> 1
     (assumed: its Megatron-LM setup is not described at this level); anything else -> 1.
   * mbs: `training.micro_batch`, null -> 1. For torchtitan pipeline runs the table's "local batch" is
     split into pp micro-batches (torchtitan's default `pipeline_parallel_microbatches` = pp degree), so
     mbs = local batch / pp.
   * recompute: `training.recompute` when none|selective|full (or text naming one: "selective ...", "full
     ...", "activation checkpointing", yes/no); null -> "none" for NeMo/Megatron-Bridge
     recipes, "selective" for the Megatron-Core H100 README, else "none".
   * sequence_parallel: `parallel.sequence_parallel`; null -> True when tp > 1 (False when tp == 1, where
     it has no effect).
   * async_tp: `parallel.async_tp`, or the notes name `--tp-comm-overlap` or "comm overlap" (MegaScale's own
     system: TP/SP collectives fused with the GEMMs, its Sec. 3.2), with tp > 1.
3. Training. global_batch = `global_batch_sequences`, else global_batch_tokens / seq_len (skipped when
   neither gives a whole number); precision "fp8" when the text mentions FP8 / MXFP8 / Float8
   (case-insensitive), else "bf16" (a null or "mixed (16-bit)" text is recorded as an assumption).
   c. grad_reduce: bf16 when the notes say "performance recipe" (Megatron-Bridge: its performance recipes
      set grad_reduce_in_fp32=False, as NeMo 2's pretrain_recipe_performance does); else the framework's
      default (Megatron: fp32 main gradients, Megatron-LM arguments.py for bf16).
   b. framework (cost_models/framework.py): DeepSpeed when the notes name it (SC'21's ZeRO-3 baseline:
      deepspeed_2021, DeepSpeed as it was that year);
      else by source family: Megatron-LM as of 2021-2023 (megatron_2023: no context parallelism, no
      ZeRO-3, data-parallel collectives after the schedule) for SC'21, Korthikanti and MegaScale's
      Megatron-LM baseline, and its `megascale` variant (those collectives overlapped) for MegaScale's own
      rows, whose notes name communication overlap; Megatron-Core for the Megatron-Core README, NeMo and
      Megatron-Bridge; torchtitan; PyTorch FSDP alone (torch_fsdp, through Composer) for llm-foundry;
      nanotron for the Ultra-Scale Playbook. A family not among these: the framework its group, title or
      notes name (_NAMED_FRAMEWORK), else Megatron-Core with TE, the reference kernels (a run published at
      scale ran on a tuned stack; autoshard's own eager runtime, `torch`, is the planner's default, not a
      guess for somebody else's run).
4. Profile, from `hardware.gpu` and `hardware.inter_node`: GB200 -> gb200_nvl72; B200 -> b200_ib;
   H200 -> h200_ib; H800 -> h800_ib; H100 -> h100_efa when the network text says EFA, h100_roce when it
   says RoCE, else h100_ib (torchtitan's 96GB HBM2e 500 W H100 -> h100_ib with gpu_memory_gib 96);
   A100 and MegaScale's "NVIDIA Ampere" -> a100_ib (there is no A100 RoCE profile).
5. Throughput (tokens/s/GPU), first that applies:
   a. `tokens_per_sec_per_gpu` as given;
   b. step time: global_batch * seq_len / step_time_s / num_gpus;
   c. Megatron SC'21 eq.(3) TFLOP/s (group megatron_sc21, definition mentions eq.(3)):
      tflops*1e12 / (96*l*h^2*(1 + s/(6h) + V/(16*l*h))), eq.(3) per iteration divided by B*s tokens;
   d. model TFLOP/s (NeMo, Megatron-Bridge, Megatron-Core README): tflops*1e12 / model_flops_per_token;
   e. MFU: mfu * peak / model_flops_per_token with the dense BF16 peak the sources use (A100 312e12,
      H100 989e12).
   model_flops_per_token = 6*N + 12*l*h*s (PaLM appendix B), with N the matmul weights a token passes
   through: all parameters but the input-embedding lookup (a tied matrix counts once, as the output
   projection); for MoE the active ones (attention, top_k + shared experts, router, dense layers, output
   projection). Megatron-LM's and NeMo 24.07's formulas are exactly this (NeMo's TFLOP/s <-> tokens/s pairs
   agree to 0.1%). Megatron-Bridge counts causal attention (6*l*h*s instead of 12): only that reproduces
   its pairs (Llama 3 8B: 0.03%). Every other estimate the entry allows lands in `cross_checks` (an extra
   field, (method, tokens/s/GPU) pairs); they agree within 10% except two known cases (the Ultra-Scale 1B
   MFU, and GPT-OSS whose 64-dim heads and sliding windows are not modelled), see the test.
6. peak_memory_gib from `measured.peak_memory_gib` (None when absent).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from autoshard.cost_models.layout import Layout, Training
from autoshard.planner.capture.spec import parse_spec
from autoshard.planner.errors import SpecError

__all__ = [
    "DEFAULT_PATH", "ENV_VAR", "CalibrationRun", "Estimate", "SkipRun", "build_run", "eq3_flops_per_token",
    "load_entries", "load_runs", "model_flops_per_token", "params", "resolve_path", "summary",
]  # fmt: skip

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "shared" / "calibration" / "published_runs_dev.yaml"
ENV_VAR = "AUTOSHARD_CALIBRATION"

PROFILES = ("a100_ib", "h100_ib", "h100_96gb_500w", "h100_roce", "h100_efa", "h200_ib", "h800_ib", "b200_ib",
            "gb200_nvl72")
UNFUSED_ATTENTION_GROUPS = ("megatron_sc21", "korthikanti")
"""Sources whose software predates fused attention."""
PEAK_BF16_DENSE = {"a100": 312e12, "h100": 989e12}
"""Dense BF16 tensor-core peak per GPU that the MFU sources divide by (SC'21: A100 312 TF/s; H100 SXM)."""

_VOCAB = (
    ("llama 2", 32000, "Llama 2 tokenizer size (meta-llama/Llama-2-7b-hf config.json vocab_size)"),
    ("nemotron", 256000, "Nemotron tokenizer size (Nemotron-4 15B report; nvidia Nemotron HF config.json)"),
    ("deepseek-v3", 129280, "DeepSeek-V3 tokenizer size (deepseek-ai/DeepSeek-V3 config.json vocab_size)"),
)
_MOE_KEYS = ("experts", "top_k", "expert_ffn_hidden", "shared_experts", "dense_layers_first")
_RECOMPUTE = ("none", "selective", "full")
_MEGATRON_GPT_GROUPS = ("megatron_sc21", "korthikanti", "megascale")
_MCORE_RECIPE_GROUPS = ("nemo_2407", "nemo_cp", "megatron_bridge")


@dataclass(kw_only=True, frozen=True, slots=True)
class CalibrationRun:
    """One published run, ready for the cost model."""

    id: str
    group: str
    model: dict
    """A complete `model:` mapping accepted by `parse_spec`."""
    layout: Layout
    training: Training
    profile: str
    """Hardware profile name, one of PROFILES."""
    gpu_memory_gib: float | None
    """Override of the profile's GPU memory (torchtitan's 96 GB H100s), else None."""
    tokens_per_sec_per_gpu: float
    derived: str
    """"" when read directly, else the formula and inputs that gave tokens_per_sec_per_gpu."""
    peak_memory_gib: float | None
    assumptions: tuple[str, ...]
    """Every value filled in that the source does not state, with the reason."""
    cross_checks: tuple[tuple[str, float], ...] = ()
    """The other tokens/s/GPU estimates the entry allows, as (method, value), for consistency checks."""
    recompute_blocks: dict[str, str] | None = None
    """Block FQN -> recompute where blocks differ from layout.recompute (Megatron's
    `--recompute-method block --recompute-num-layers k`: the first k blocks of each model chunk), else None."""


class Estimate(NamedTuple):
    method: str
    """tokens, step_time, tokens_total, eq3, model_tflops, hfu or mfu."""
    value: float
    """tokens/s/GPU."""
    formula: str


class SkipRun(Exception):
    """The entry cannot be turned into cost-model inputs; the message is the reason."""


def resolve_path(path: str | Path | None = None) -> Path:
    """`path` when given, else $AUTOSHARD_CALIBRATION, else DEFAULT_PATH."""
    if path is not None:
        return Path(path)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_PATH


def load_entries(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The raw `runs:` entries of the calibration YAML."""
    data = yaml.safe_load(resolve_path(path).read_text())
    runs = data.get("runs") if isinstance(data, Mapping) else None
    if not isinstance(runs, list):
        raise ValueError(f"{resolve_path(path)}: expected a top-level `runs:` list")
    return runs


def load_runs(path: str | Path | None = None) -> tuple[list[CalibrationRun], list[tuple[str, str]]]:
    """All usable runs, and (id, reason) for each skipped run (e.g. no TP/PP split given)."""
    runs: list[CalibrationRun] = []
    skipped: list[tuple[str, str]] = []
    for entry in load_entries(path):
        try:
            runs.append(build_run(entry))
        except SkipRun as e:
            skipped.append((str(entry.get("id", "?")), str(e)))
        except (ValueError, TypeError, KeyError, AttributeError, ZeroDivisionError) as e:
            # a value of a kind no rule reads (a number as free text, a missing block): this run is
            # skipped with the reason, the file's other runs still count
            skipped.append((str(entry.get("id", "?")) if isinstance(entry, Mapping) else "?",
                            f"unreadable entry: {type(e).__name__}: {e}"))
    return runs, skipped


# --------------------------------------------------------------------------------------------- counting


def _attention_params(model: Mapping[str, Any]) -> int:
    h, heads = model["hidden"], model["heads"]
    kv = model.get("kv_heads") or heads
    head_dim = model.get("head_dim") or h // heads
    return 2 * h * heads * head_dim + 2 * h * kv * head_dim  # q and o: h x heads*head_dim; k, v: h x kv*head_dim


def _mlp_params(model: Mapping[str, Any], width: int) -> int:
    return (2 if model.get("style") == "gpt" else 3) * model["hidden"] * width


def _layer_params(model: Mapping[str, Any], *, active: bool) -> int:
    """Matmul weights of all layers (norms and biases are negligible)."""
    layers, h = model["layers"], model["hidden"]
    total = layers * _attention_params(model)
    moe = model.get("moe")
    if not moe:
        return total + layers * _mlp_params(model, model["ffn_hidden"])
    dense = moe.get("dense_layers_first") or 0
    experts = moe["top_k"] if active else moe["experts"]
    per_moe_layer = (experts + (moe.get("shared_experts") or 0)) * 3 * h * moe["expert_ffn_hidden"]
    per_moe_layer += h * moe["experts"]  # router
    if dense:
        total += dense * _mlp_params(model, model["ffn_hidden"])
    return total + (layers - dense) * per_moe_layer


def params(model: Mapping[str, Any], *, active: bool = False) -> int:
    """Parameters of a completed model mapping: token embedding, output projection unless tied, learned
    positions (GPT style), attention q/k/v/o with GQA, the MLP (2 matrices GPT style, 3 Llama style) or
    the experts (SwiGLU) plus router. `active`: only top_k routed experts per token."""
    h, vocab = model["hidden"], model["vocab"]
    embed = vocab * h * (1 if model.get("tied_embeddings") else 2)
    if model.get("style") == "gpt":
        embed += model["seq_len"] * h
    return embed + _layer_params(model, active=active)


def _flop_params(model: Mapping[str, Any]) -> int:
    """N of 6*N: weights a token multiplies with (active experts; output projection, no input lookup)."""
    return _layer_params(model, active=True) + model["vocab"] * model["hidden"]


def model_flops_per_token(model: Mapping[str, Any], seq_len: int, *, causal: bool = False) -> float:
    """6*N + 12*l*h*s (PaLM appendix B), forward + backward, no recompute; `causal` halves attention."""
    attention = (6 if causal else 12) * model["layers"] * model["hidden"] * seq_len
    return 6.0 * _flop_params(model) + attention


def eq3_flops_per_token(model: Mapping[str, Any], seq_len: int) -> float:
    """Megatron SC'21 eq.(3), 96*B*s*l*h^2*(1 + s/(6h) + V/(16*l*h)) per iteration, divided by B*s."""
    layers, h, vocab = model["layers"], model["hidden"], model["vocab"]
    return 96.0 * layers * h * h * (1 + seq_len / (6 * h) + vocab / (16 * layers * h))


# ------------------------------------------------------------------------------------------ completion


def _complete_model(entry: Mapping[str, Any], seq_len: int, notes: list[str]) -> dict[str, Any]:
    src = entry["model"]
    group, name = entry.get("group", ""), str(src.get("name") or entry["id"])
    for key in ("layers", "hidden", "heads"):
        if not isinstance(src.get(key), int):
            raise SkipRun(f"model.{key} is not given")
    h, heads = src["hidden"], src["heads"]
    model: dict[str, Any] = {"name": name, "layers": src["layers"], "hidden": h}
    moe_src = src.get("moe")

    ffn = src.get("ffn_hidden")
    if ffn is None and not moe_src:
        ffn = 4 * h
        notes.append(f"ffn_hidden={ffn}: not stated; 4 x hidden, the sources' standard GPT MLP")
    model["ffn_hidden"] = ffn
    kv = src.get("kv_heads")
    if kv is None:
        kv = heads
        notes.append(f"kv_heads={kv}: not stated; = heads (multi-head attention)")
    model["heads"], model["kv_heads"] = heads, kv
    if isinstance(src.get("head_dim"), int):  # not in the schema today; taken when a source states it
        model["head_dim"] = src["head_dim"]

    vocab = src.get("vocab")
    if vocab is None:
        lname = name.lower().replace("-", " ").replace("deepseek v3", "deepseek-v3")
        found = next(((v, why) for key, v, why in _VOCAB if key in lname), None)
        if found is None:
            raise SkipRun(f"model.vocab is null and no published tokenizer size is known for {name!r}")
        vocab = found[0]
        notes.append(f"vocab={vocab}: not stated; {found[1]}")
    model["vocab"] = vocab
    if src.get("seq_len") not in (None, seq_len):
        notes.append(f"model.seq_len={seq_len}: set to the training sequence length (source: {src['seq_len']})")
    model["seq_len"] = seq_len

    tied = src.get("tied_embeddings")
    if tied is None:
        if group in _MEGATRON_GPT_GROUPS:
            tied = True
            notes.append("tied_embeddings=true: not stated; Megatron-LM GPT shares embedding and output weights "
                         "by default (and SC'21's parameter counts only match tied)")
        elif name.upper().startswith("MPT"):
            tied = True
            notes.append("tied_embeddings=true: not stated; MPT computes logits with its token-embedding matrix "
                         "(llm-foundry NumParams only match tied)")
        elif group == "megatron_h100_readme":
            tied = False
            notes.append("tied_embeddings=false: not stated; untied matches the README's 70.0B / 177.0B "
                         "parameter counts (tied would give 68.7B / 175.6B)")
        else:
            tied = False
    model["tied_embeddings"] = bool(tied)

    gpt = (ffn == 4 * h and kv == heads) and not moe_src
    if gpt and "llama" in name.lower():
        gpt = False
        notes.append("style=llama: ffn = 4 x hidden with MHA would read as GPT style, but the model is "
                     "Llama-style (SwiGLU, RMSNorm, RoPE) per its name/source")
    model["style"] = "gpt" if gpt else "llama"
    if gpt and "nemotron" in name.lower():
        notes.append("style=gpt: Nemotron's 2-matrix squared-ReLU MLP priced as the GPT-style MLP "
                     "(its RoPE is not modelled: learned positions instead)")

    if moe_src:
        moe = {k: moe_src[k] for k in _MOE_KEYS if moe_src.get(k) is not None}
        dropped = sorted(k for k in moe_src if k not in _MOE_KEYS)
        if dropped:
            notes.append(f"moe: dropped {', '.join(dropped)} (not modelled)"
                         + ("; MLA approximated by MHA with head_dim = hidden/heads" if "mla" in dropped else ""))
        model["moe"] = moe
    if "gpt-oss" in name.lower() and "head_dim" not in model:
        notes.append(f"attention: head_dim = hidden/heads = {h // heads} (not stated; GPT-OSS uses 64, and "
                     "alternates 128-token sliding-window layers, not modelled)")
    try:
        parse_spec({"model": model}, source=str(entry["id"]))
    except SpecError as e:
        raise SkipRun(f"model cannot be represented: {e}") from None
    return model


# ---------------------------------------------------------------------------------------------- layout


def _zero(entry: Mapping[str, Any], notes: list[str]) -> int:
    par, group = entry["parallel"], entry.get("group", "")
    if par.get("zero_stage") is not None:
        return int(par["zero_stage"])
    fsdp = par.get("fsdp")
    if isinstance(fsdp, str) and "fsdp" in fsdp.lower():
        notes.append(f"zero=3: zero_stage not stated; FSDP ({fsdp}) shards parameters, gradients and optimizer")
        return 3
    if group in ("megatron_sc21", "korthikanti"):
        notes.append("zero=0: not stated; Megatron-LM 2021-22 used plain data parallelism with fp32 gradients")
        return 0
    if group in _MCORE_RECIPE_GROUPS or group == "megatron_h100_readme":
        notes.append("zero=1: not stated; Megatron-Core recipes (NeMo, Megatron-Bridge, the H100 README runs) "
                     "turn on the distributed optimizer")
        return 1
    if group == "megascale":
        notes.append("zero=1: not stated; MegaScale's Megatron-LM setup assumed to use the distributed optimizer")
        return 1
    notes.append("zero=1: not stated; distributed optimizer assumed")
    return 1


def _recompute_said(value: Any) -> str | None:
    """none | selective | full from a source's text (or a yes/no), None when it says none of them."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    if text in _RECOMPUTE:
        return text
    if "selective" in text:
        return "selective"
    if "full" in text or "checkpoint" in text or text in ("yes", "on", "true"):
        return "full"
    if text in ("no", "off", "false", "disabled", "n/a"):
        return "none"
    return None


def _recompute(entry: Mapping[str, Any], notes: list[str]) -> str:
    value = entry["training"].get("recompute")
    if (said := _recompute_said(value)) is not None:
        if not (isinstance(value, str) and value.strip().lower() == said):
            notes.append(f"recompute={said}: the source says {value!r}")
        return said
    if value is not None:
        notes.append(f"recompute: the source's {value!r} is not none, selective or full; treated as not stated")
    group = entry.get("group", "")
    if group in _MCORE_RECIPE_GROUPS:
        notes.append("recompute=none: not stated; NeMo/Megatron-Bridge performance recipes run without it")
        return "none"
    if group == "megatron_h100_readme":
        notes.append("recompute=selective: not stated; Megatron-Core's H100 scaling runs use selective recompute")
        return "selective"
    notes.append("recompute=none: not stated")
    return "none"


VPP_UNSTATED = "vpp=unstated"
"""The assumption note that marks a pipeline run whose interleaving degree the source does not give."""


def _layout(entry: Mapping[str, Any], notes: list[str], framework: str) -> Layout:
    par, tr, hw, group = entry["parallel"], entry["training"], entry["hardware"], entry.get("group", "")
    if par.get("tp") is None or par.get("pp") is None:
        mp = par.get("model_parallel_size")
        raise SkipRun("the TP/PP split is not given" + (f" (only TP x PP = {mp})" if mp else ""))
    tp, pp = int(par["tp"]), int(par["pp"])
    cp, ep = int(par.get("cp") or 1), int(par.get("ep") or 1)
    gpus = int(hw["num_gpus"])
    if gpus % (tp * pp * cp):
        raise SkipRun(f"tp x pp x cp = {tp * pp * cp} does not divide the {gpus} GPUs")
    dp = gpus // (tp * pp * cp)
    if par.get("dp") is not None and int(par["dp"]) != dp:
        raise SkipRun(f"parallel.dp = {par['dp']} but num_gpus/(tp*pp*cp) = {dp}")

    vpp = par.get("vpp")
    schedule_text = str(par.get("pp_schedule") or "").lower()
    if vpp is None and pp > 1 and "interleaved" in schedule_text and framework == "torchtitan":
        vpp = 2
        notes.append(f"vpp=2: the source names the {par['pp_schedule']} schedule without a degree; torchtitan "
                     "puts 2 stages per rank when no split points are given")
    elif vpp is None:
        vpp = 1
        if pp > 1 and (not schedule_text or "interleav" in schedule_text):  # another named schedule: one chunk
            said = "the source used an interleaved schedule but gives no degree" \
                if "interleav" in f"{schedule_text} {entry.get('notes', '')}".lower() else "not stated"
            notes.append(f"{VPP_UNSTATED}: {said}; priced at the fastest that fits by our model among the "
                         "framework's interleaving degrees, as an unstated recompute (benchmarks/accuracy.py)")
    vpp = int(vpp)

    mbs = tr.get("micro_batch")
    if mbs is None:
        mbs = 1
        notes.append("mbs=1: micro-batch not stated")
    mbs = int(mbs)
    if group == "torchtitan" and pp > 1:
        if mbs % pp:
            raise SkipRun(f"torchtitan local batch {mbs} does not split into pp={pp} micro-batches")
        notes.append(f"mbs={mbs // pp}: the table's local batch {mbs} is split into pp={pp} micro-batches "
                     "(torchtitan's default pipeline_parallel_microbatches = pp degree)")
        mbs //= pp

    sp = par.get("sequence_parallel")
    if sp is None:
        sp = tp > 1
        if tp > 1:
            notes.append("sequence_parallel=true: not stated; assumed on with tp > 1 (usual in Megatron-Core/NeMo "
                         "recipes; nanotron's default REDUCE_SCATTER TP mode)")
    async_tp = bool(par.get("async_tp")) or "--tp-comm-overlap" in str(entry.get("notes", ""))
    if not async_tp and tp > 1 and _names_comm_overlap(entry):
        async_tp = True
        notes.append("async_tp=true: the notes name communication overlap (MegaScale, Jiang et al. NSDI'24 Sec. 3.2: "
                     "TP/SP all-gather and reduce-scatter fused with the linears' GEMMs, in chunks)")
    try:
        return Layout(
            tp=tp, pp=pp, vpp=vpp, cp=cp, ep=ep, dp=dp, zero=_zero(entry, notes), mbs=mbs,
            recompute=_recompute(entry, notes), schedule="interleaved_1f1b" if vpp > 1 else "1f1b",
            sequence_parallel=bool(sp), async_tp=async_tp and tp > 1,
        )  # fmt: skip
    except ValueError as e:
        raise SkipRun(f"invalid layout: {e}") from None


# -------------------------------------------------------------------------------------------- training


def _tokens_count(text: Any) -> int | None:
    """'1M' -> 1048576, '4M tokens' -> 4194304, 2048 -> 2048 (binary M, as the sources use)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([kKmMbB]?)\b.*", str(text or ""))
    if not m:
        return None
    scale = {"": 1, "k": 2**10, "m": 2**20, "b": 2**30}[m.group(2).lower()]
    return round(float(m.group(1)) * scale)


def _training(entry: Mapping[str, Any], notes: list[str]) -> Training:
    tr, src = entry["training"], entry["model"]
    seq_len = tr.get("seq_len") or src.get("seq_len")
    if not isinstance(seq_len, int):
        raise SkipRun("no sequence length given")
    gbs = tr.get("global_batch_sequences")
    if gbs is None:
        tokens = _tokens_count(tr.get("global_batch_tokens"))
        if tokens is None or tokens % seq_len:
            raise SkipRun("global batch not given in sequences, nor as tokens divisible by seq_len")
        gbs = tokens // seq_len
        notes.append(f"global_batch={gbs}: global_batch_tokens {tr['global_batch_tokens']!r} / seq_len {seq_len}")
    text = tr.get("precision")
    lower = str(text or "").lower()
    if any(k in lower for k in ("fp8", "float8")):
        precision = "fp8"
    else:
        precision = "bf16"
        if "bf16" not in lower and "bfloat16" not in lower:
            said = f"source says {text!r}" if text else "not stated"
            notes.append(f"precision=bf16: {said}; 16-bit mixed precision priced as bf16 (same tensor-core peak)")
    attention = "flash"
    if entry.get("group") in UNFUSED_ATTENTION_GROUPS:
        attention = "unfused"
        notes.append("attention=unfused: Megatron-LM of 2021-22 ran scale-mask-softmax over the full score "
                     "matrix; FlashAttention (2022) came later")
    grad_reduce = None
    if "performance recipe" in str(entry.get("notes", "")).lower():
        grad_reduce = "bf16"
        notes.append("grad_reduce=bf16: NeMo 2 / Megatron-Bridge performance recipes turn grad_reduce_in_fp32 "
                     "off (e.g. NeMo nemo/collections/llm/recipes/gpt3_175b.py pretrain_recipe_performance)")
    return Training(global_batch=int(gbs), seq_len=seq_len, precision=precision, attention=attention,
                    framework=_framework(entry, notes), grad_reduce=grad_reduce)


def _names_comm_overlap(entry: Mapping[str, Any]) -> bool:
    """Whether the notes name communication overlap (MegaScale's own rows: NSDI'24 Sec. 3.2)."""
    return "comm overlap" in str(entry.get("notes", ""))


_GROUP_FRAMEWORK = {
    "megatron_sc21": "megatron_2023", "korthikanti": "megatron_2023", "megatron_h100_readme": "megatron",
    "nemo_2407": "megatron", "nemo_cp": "megatron", "megatron_bridge": "megatron", "megascale": "megatron_2023",
    "torchtitan": "torchtitan", "llmfoundry": "torch_fsdp", "ultrascale": "nanotron",
}
"""The framework, as it was when the run trained: Megatron-LM of 2021-2023 had no context parallelism or
ZeRO-3 (megatron_2023; same kernels as megatron), llm-foundry's 2023 MPT runs used FSDP alone (torch_fsdp)."""


_NAMED_FRAMEWORK = (
    ("torchtitan", "torchtitan"), ("nanotron", "nanotron"), ("ultra-scale", "nanotron"),
    ("llm-foundry", "torch_fsdp"), ("composer", "torch_fsdp"), ("fsdp", "torch_fsdp"),
    ("nemo", "megatron"), ("megatron", "megatron"), ("transformer engine", "megatron"),
)
"""For a source family not in _GROUP_FRAMEWORK: the first of these words in its group, source title or
notes names the framework."""


def _framework(entry: Mapping[str, Any], notes: list[str]) -> str:
    """What ran the layout: DeepSpeed when the notes say so, else the source family's framework (rule 3b),
    else the framework its text names, else Megatron-Core's."""
    if "deepspeed" in str(entry.get("notes", "")).lower():
        if entry.get("group") == "megatron_sc21":  # DeepSpeed as it was in 2021 (cost_models/framework.py)
            notes.append("framework=deepspeed_2021: SC'21 (2021) ran DeepSpeed v0.3-0.5, whose stage-3 fetches "
                         "were not overlapped")
            return "deepspeed_2021"
        return "deepspeed"
    group = entry.get("group", "")
    if group == "megascale" and _names_comm_overlap(entry):
        notes.append("framework=megascale: the notes name MegaScale's communication overlap (NSDI'24 Sec. 3.2: "
                     "data-parallel collectives under the first forward and last backward)")
        return "megascale"
    if group in _GROUP_FRAMEWORK:
        return _GROUP_FRAMEWORK[group]
    source = entry.get("source")
    text = " ".join(str(t) for t in (group, source.get("title") if isinstance(source, Mapping) else source,
                                     entry.get("notes"))).lower()
    for word, framework in _NAMED_FRAMEWORK:
        if word in text:
            notes.append(f"framework={framework}: a source family not seen before that names {word!r}")
            return framework
    notes.append("framework=megatron: the source does not name its framework; Megatron-Core with Transformer "
                 "Engine assumed, the reference kernels (a run published at scale ran on a tuned stack, not "
                 "on eager PyTorch)")
    return "megatron"


# --------------------------------------------------------------------------------------------- profile


def _profile(entry: Mapping[str, Any], notes: list[str]) -> tuple[str, float | None]:
    hw = entry["hardware"]
    gpu, net = str(hw.get("gpu") or "").lower(), str(hw.get("inter_node") or "").lower()
    if "gb200" in gpu:
        notes.append("profile=gb200_nvl72: NVLink domain size not stated; NVL72 assumed")
        return "gb200_nvl72", None
    if "b200" in gpu:
        if "infiniband" not in net or "not stated" in net:
            notes.append("profile=b200_ib: inter-node network not stated; InfiniBand (DGX-B200) assumed")
        return "b200_ib", None
    if "h200" in gpu:
        return "h200_ib", None
    if "h800" in gpu:
        return "h800_ib", None
    if "h100" in gpu:
        memory = None
        if "96gb" in gpu.replace(" ", ""):
            notes.append("profile=h100_96gb_500w: H100 96GB HBM2e at a 500 W power limit, clocked below H100 "
                         "SXM5; its own family so its GEMM efficiency is fitted apart from the 700 W parts")
            return "h100_96gb_500w", None
        if "efa" in net:
            return "h100_efa", memory
        if "roce" in net:
            return "h100_roce", memory
        if "infiniband" not in net or "not stated" in net:
            notes.append(f"profile=h100_ib: network {repr(hw['inter_node']) if net else 'not stated'}; "
                         "InfiniBand assumed")
        return "h100_ib", memory
    if "a100" in gpu or "ampere" in gpu:
        if "a100" not in gpu:
            notes.append("profile=a100_ib: GPU SKU not stated ('Ampere'); A100 80GB assumed")
        if "roce" in net or "tomahawk" in net:
            notes.append(f"profile=a100_ib: the source's network is Ethernet/RoCE ({hw['inter_node']}); "
                         "there is no A100 RoCE profile")
        elif "infiniband" not in net:
            notes.append("profile=a100_ib: network not stated; InfiniBand assumed")
        if "40gb" in gpu.replace(" ", ""):
            notes.append("profile=a100_ib with 40 GiB: the A100 40GB part")
            return "a100_ib", 40.0
        return "a100_ib", None
    raise SkipRun(f"no hardware profile for GPU {hw.get('gpu')!r}")


# ------------------------------------------------------------------------------------------ throughput


def _peak(profile: str) -> float | None:
    return next((v for k, v in PEAK_BF16_DENSE.items() if profile.startswith(k)), None)


def throughput_estimates(
    entry: Mapping[str, Any], model: Mapping[str, Any], training: Training, profile: str
) -> list[Estimate]:
    """Every tokens/s/GPU estimate the entry allows, best first (the order of rule 5)."""
    me, hw, group = entry["measured"], entry["hardware"], entry.get("group", "")
    gpus, s, gbs = int(hw["num_gpus"]), training.seq_len, training.global_batch
    out: list[Estimate] = []
    if me.get("tokens_per_sec_per_gpu") is not None:
        out.append(Estimate("tokens", float(me["tokens_per_sec_per_gpu"]), ""))
    if me.get("step_time_s") is not None:
        t = float(me["step_time_s"])
        v = gbs * s / t / gpus
        out.append(Estimate("step_time", v, f"global_batch x seq_len / step_time / GPUs = "
                                            f"{gbs} x {s} / {t} s / {gpus} = {v:.4g}"))
    if me.get("tokens_per_sec_total") is not None:
        v = float(me["tokens_per_sec_total"]) / gpus
        out.append(Estimate("tokens_total", v, f"tokens_per_sec_total / GPUs = {me['tokens_per_sec_total']:.6g} "
                                               f"/ {gpus} = {v:.4g}"))
    definition = str(me.get("tflops_definition") or "").lower()
    nl, h, vocab = model["layers"], model["hidden"], model["vocab"]
    tflops = me.get("tflops_per_gpu")
    if group == "megatron_sc21" and re.search(r"eq\.\s*\(3\)", definition):
        f = eq3_flops_per_token(model, s)
        formula = (f"96*l*h^2*(1 + s/(6h) + V/(16lh)) = 96*{nl}*{h}^2*(1 + {s}/(6*{h}) + {vocab}/(16*{nl}*{h})) "
                   f"= {f:.4g} FLOP/token")
        if tflops is not None:
            v = float(tflops) * 1e12 / f
            out.append(Estimate("eq3", v, f"Megatron eq.(3) TFLOP/s: {tflops}e12 / [{formula}] = {v:.4g}"))
        peak = _peak(profile)
        if me.get("hfu") is not None and peak:
            v = float(me["hfu"]) * peak / f
            out.append(Estimate("hfu", v, f"HFU {me['hfu']} x {peak:.4g} / [{formula}] = {v:.4g}"))
    causal = group == "megatron_bridge"
    f = model_flops_per_token(model, s, causal=causal)
    n = _flop_params(model)
    att = 6 if causal else 12
    formula = (f"6*N + {att}*l*h*s = 6*{n:.5g} + {att}*{nl}*{h}*{s} = {f:.4g} FLOP/token"
               + (" (N: active params)" if model.get("moe") else ""))
    if tflops is not None and "model" in definition:
        v = float(tflops) * 1e12 / f
        out.append(Estimate("model_tflops", v, f"model TFLOP/s: {tflops}e12 / [{formula}] = {v:.4g}"))
    peak = _peak(profile)
    if me.get("mfu") is not None and peak:
        v = float(me["mfu"]) * peak / f
        out.append(Estimate("mfu", v, f"MFU {me['mfu']} x peak {peak:.4g} / [{formula}] = {v:.4g}"))
    return out


# ------------------------------------------------------------------------------------------------ runs


INT_FIELDS = {
    "model": ("layers", "hidden", "ffn_hidden", "heads", "kv_heads", "vocab", "seq_len", "head_dim"),
    "hardware": ("num_gpus", "gpus_per_node"),
    "training": ("global_batch_sequences", "global_batch_tokens", "micro_batch", "seq_len"),
    "parallel": ("tp", "pp", "vpp", "cp", "ep", "dp", "zero_stage"),
}
"""Integer fields of the schema, read as integers when a source writes them as text ("8", "1,024") or as
a whole float (16384.0); a ZeRO stage also as "ZeRO-1" or "stage 3"."""


def _normalized(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The entry with its integer fields (INT_FIELDS) as int where their text is a plain number."""
    out = dict(entry)
    for section, keys in INT_FIELDS.items():
        block = dict(out[section]) if isinstance(out.get(section), Mapping) else None
        if block is None:
            continue
        for key in keys:
            block[key] = _as_int(block.get(key), stage=key == "zero_stage")
        out[section] = block
    return out


def _as_int(value: Any, *, stage: bool = False) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip().replace(",", "").replace("_", "")
        if text.isdigit():
            return int(text)
        if stage and (m := re.fullmatch(r"(?:zero|stage)[\s_-]*(\d)", text.lower())):
            return int(m.group(1))
    return value


def build_run(entry: Mapping[str, Any]) -> CalibrationRun:
    """One YAML entry as a CalibrationRun; raises SkipRun(reason) when it cannot be used."""
    for key in ("id", "model", "hardware", "training", "parallel", "measured"):
        if not isinstance(entry.get(key), Mapping if key != "id" else str):
            raise SkipRun(f"entry has no `{key}`")
    entry = _normalized(entry)
    notes: list[str] = []
    training = _training(entry, notes)
    model = _complete_model(entry, training.seq_len, notes)
    layout = _layout(entry, notes, training.framework)
    if layout.gpus != entry["hardware"]["num_gpus"]:
        raise SkipRun(f"layout covers {layout.gpus} GPUs, the run used {entry['hardware']['num_gpus']}")
    profile, memory = _profile(entry, notes)
    estimates = throughput_estimates(entry, model, training, profile)
    if not estimates:
        raise SkipRun("no tokens/s, step time, usable TFLOP/s or MFU")
    best = estimates[0]
    if best.method == "model_tflops":
        notes.append("tokens_per_sec_per_gpu: derived from model TFLOP/s assuming the source counts "
                     "6*N + 12*l*h*s (non-causal attention), as Megatron-LM's and NeMo 24.07's formulas do")
    elif best.method == "mfu":
        notes.append("tokens_per_sec_per_gpu: derived from MFU assuming the source's peak is the dense BF16 one")
    peak_mem = entry["measured"].get("peak_memory_gib")
    return CalibrationRun(
        id=entry["id"], group=str(entry.get("group", "")), model=model, layout=layout, training=training,
        profile=profile, gpu_memory_gib=memory, tokens_per_sec_per_gpu=best.value, derived=best.formula,
        peak_memory_gib=float(peak_mem) if peak_mem is not None else None, assumptions=tuple(notes),
        cross_checks=tuple((e.method, e.value) for e in estimates[1:]),
    )  # fmt: skip


def summary(path: str | Path | None = None, file: Any = None) -> None:
    """Print one line per usable run and the skipped runs with their reasons."""
    out = file or sys.stdout
    runs, skipped = load_runs(path)
    print(f"{len(runs)} usable runs from {resolve_path(path)}", file=out)
    for r in runs:
        how = "derived" if r.derived else "read"
        checks = " ".join(f"{m}={v:.4g}" for m, v in r.cross_checks)
        print(f"{r.id:58s} {r.profile:11s} {r.layout.to_string():100s} {r.tokens_per_sec_per_gpu:10.1f} "
              f"{how}{'  [' + checks + ']' if checks else ''}", file=out)
    print(f"\n{len(skipped)} skipped:", file=out)
    for run_id, reason in skipped:
        print(f"  {run_id}: {reason}", file=out)


if __name__ == "__main__":
    summary(sys.argv[1] if len(sys.argv) > 1 else None)
