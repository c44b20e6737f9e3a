"""autoshard's reference decoder-only transformer, built from a `ModelSpec`.

Two styles share one skeleton (nanoGPT for "gpt", torchtitan's llama3 for "llama"):

| | gpt | llama |
|---|---|---|
| positions | learned `pos_embeddings` | RoPE on q and k (real cos/sin buffers) |
| norms | LayerNorm (with bias) | RMSNorm |
| FFN | `w2(gelu_tanh(w1 x))` | SwiGLU `w2(silu(w1 x) * w3 x)` |
| biases | on every linear except `output` | none |

Module names (FQNs), which the TP/EP transforms and the tests rely on; the planner itself discovers the
structure generically:

```
tok_embeddings, pos_embeddings (gpt only), layers.{i}, norm, output
layers.{i}.attention_norm, layers.{i}.attention.{wq,wk,wv,wo}, layers.{i}.ffn_norm
dense block:  layers.{i}.feed_forward.{w1,w2} (gpt) or .{w1,w2,w3} (llama)
MoE block:    layers.{i}.moe.router, layers.{i}.moe.experts.{e}.{w1,w2,w3}, layers.{i}.moe.shared_experts.{w1,w2,w3}
```

A block holds either `feed_forward` or `moe` (torchtitan's convention), never both; `block.moe_enabled`
says which. Big models are only ever built on the meta device:
`with torch.device("meta"): build_reference_model(spec)`; `init_weights()` materialises them after
`to_empty()`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import _symbolic_trace

from autoshard.planner.capture.spec import ModelSpec

__all__ = ["Attention", "FeedForward", "MoE", "Transformer", "TransformerBlock", "build_reference_model"]

INIT_STD = 0.02
"""Std of every linear and embedding weight (GPT-2 / nanoGPT initialisation)."""

# `is_fx_tracing` also answers True under torch.export (and warns); the symbolic-only variant is newer.
_is_symbolic_tracing = getattr(_symbolic_trace, "is_fx_symbolic_tracing", _symbolic_trace.is_fx_tracing)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding (Su et al. 2021, arXiv:2104.09864) in the rotate-half layout of HF Llama.

    x: [b, s, heads, head_dim]; cos, sin: [s, head_dim].
    """
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


def rope_tables(
    seq_len: int, head_dim: int, theta: float, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """cos and sin of position x inverse frequency, [seq_len, rot]; inv_freq_j = theta^(-2j/rot).

    rot = head_dim rounded down to even: an odd head_dim (gpt-oss-like 2880 / 64 = 45) leaves its last
    channel unrotated.
    """
    rot = head_dim - head_dim % 2
    inv_freq = 1.0 / theta ** (torch.arange(0, rot, 2, device=device, dtype=torch.float32) / rot)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


class Attention(nn.Module):
    """Causal multi-head attention with grouped-query KV heads.

    Head counts are read from `n_heads`, `n_kv_heads` and `head_dim` in forward, so a tensor-parallel
    transform can shard `wq`/`wk`/`wv` column-wise and divide the counts on its copy.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = spec.heads, spec.kv_heads, spec.head_dim
        bias = spec.style == "gpt"
        self.wq = nn.Linear(spec.hidden, spec.heads * spec.head_dim, bias=bias)
        self.wk = nn.Linear(spec.hidden, spec.kv_heads * spec.head_dim, bias=bias)
        self.wv = nn.Linear(spec.hidden, spec.kv_heads * spec.head_dim, bias=bias)
        self.wo = nn.Linear(spec.heads * spec.head_dim, spec.hidden, bias=bias)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        bsz, seqlen = x.shape[0], x.shape[1]
        q = self.wq(x).view(bsz, seqlen, -1, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, -1, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, -1, self.head_dim)
        if rope is not None:
            q, k = self._rope(q, *rope), self._rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, heads, s, head_dim]
        # GQA: each KV head serves n_rep consecutive query heads (Llama's repeat_kv). expand + flatten works
        # on meta and under fx, and a TP shard keeps the same ratio.
        n_rep = self.n_heads // self.n_kv_heads
        if n_rep > 1:
            k = k.unsqueeze(2).expand(-1, -1, n_rep, -1, -1).flatten(1, 2)
            v = v.unsqueeze(2).expand(-1, -1, n_rep, -1, -1).flatten(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        if self.head_dim % 2 == 0:
            return apply_rope(x, cos, sin)
        return torch.cat((apply_rope(x[..., :-1], cos, sin), x[..., -1:]), dim=-1)  # see rope_tables


class FeedForward(nn.Module):
    """GPT MLP `w2(gelu_tanh(w1 x))` with biases, or Llama SwiGLU `w2(silu(w1 x) * w3 x)` without."""

    def __init__(self, hidden: int, ffn_hidden: int, *, style: str = "llama") -> None:
        super().__init__()
        self.style = style
        gpt = style == "gpt"
        self.w1 = _linear(hidden, ffn_hidden, bias=gpt)
        self.w2 = _linear(ffn_hidden, hidden, bias=gpt)
        self.w3 = None if gpt else _linear(hidden, ffn_hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.w3 is None:
            return self.w2(F.gelu(self.w1(x), approximate="tanh"))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _linear(in_features: int, out_features: int, *, bias: bool) -> nn.Linear:
    """nn.Linear; built on meta, without its random init, which means nothing there and was most of the
    capture time of a 256-expert model (2,300 meta `kaiming_uniform_` calls for DeepSeek-V3's kept blocks)."""
    if torch.get_default_device().type != "meta":
        return nn.Linear(in_features, out_features, bias=bias)
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.in_features, linear.out_features = in_features, out_features
    linear.weight = nn.Parameter(torch.empty(out_features, in_features))
    linear.register_parameter("bias", nn.Parameter(torch.empty(out_features)) if bias else None)
    return linear


class MoE(nn.Module):
    """Top-k routed SwiGLU experts (Mixtral-style softmax then top-k, renormalised when k > 1), plus
    optional always-on shared experts (DeepSeek), dropless or with a capacity factor.

    The forward is route -> dispatch -> combine, and expert parallelism (transforms/ep.py) replaces only
    `run_experts`, so the router runs once per forward however the experts are placed:
    1. route: router, softmax, top-k over the T tokens of the call (the routing group: one micro-batch of
       one data-parallel rank; tensor parallelism gathers the whole micro-batch first). Assignment
       a = t * k + j is token t's j-th choice.
    2. assign: the T*k assignments sorted by expert (`argsort(stable=True)`, so ascending a within an
       expert). With `capacity_factor` cf, expert e keeps its first C = ceil(cf * T * k / E) assignments in
       that order (token order, then choice: Switch Transformer / GShard's "position" priority) and drops
       the rest; a dropped assignment contributes zero (the block's residual carries the token).
       `dropped` counts them over all forwards so far (recomputes in backward left out).
    3. run_experts(rows, counts): rows grouped by expert, `counts[e]` rows for expert e; one grouped GEMM
       per weight (`torch._grouped_mm`) where it runs (`grouped_mm_ok`), else a loop over the experts.
    4. combine: each output scaled by its gate (not renormalised after drops) and added to its token
       (`index_add_`), plus the shared experts.

    Capture (`torch.fx.symbolic_trace` or meta tensors, where there are no values): the rows are not
    counted and one expert runs on all T*k of them (so capture builds two experts, `experts_built`, and
    declares the others in `unbuilt_experts`: planner/capture/structure.declared_parameters counts them;
    building DeepSeek-V3's 256 per kept layer cost a cold `plan` 0.2 s), the FLOPs and saved bytes of perfectly balanced
    routing (what MoE throughput benchmarks force) at 1/E of the dispatch cost; the cost model applies the
    capacity factor (cost_models/work.py). FakeTensor capture (make_fx "fake") would hit the
    data-dependent `bincount`; capture on meta instead.

    Auxiliary loss: `aux_loss` holds the Switch Transformer load-balancing loss of the last forward
    (Fedus et al. 2021, arXiv:2101.03961, eq. 4): E * sum_i f_i * P_i over the routing group, f_i the
    fraction of its T*k assignments routed to expert i (before capacity drops), P_i the mean router
    probability of expert i. When context parallelism splits a micro-batch's sequences over ranks,
    `token_group` is their process group and the counts behind f_i are all-reduced over it, while P_i is
    this rank's mean (Megatron-Core's switch_load_balancing_loss_func): the mean over those ranks of the
    local values is then the loss of the whole micro-batch. `aux_loss_coef` > 0 adds
    `aux_loss_coef * aux_loss` to the training loss through its gradient (`AuxLossToGradient`, as
    Megatron's MoEAuxLossAutoScaler): with the step loss the mean over micro-batches, the training loop sets
    `aux_loss_scale` to 1 / micro-batches (transforms/apply.py; pipeline schedules divide the gradients
    themselves). The backward of each trained forward appends the value to `aux_loss_log`, which the
    training loop reads to report the loss it trained (`pop_aux_losses`).
    """

    def __init__(
        self, hidden: int, *, experts: int, top_k: int, expert_ffn_hidden: int, shared_experts: int = 0,
        capacity_factor: float | None = None, aux_loss_coef: float = 0.0, experts_built: int | None = None,
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k = experts, top_k
        self.capacity_factor, self.aux_loss_coef = capacity_factor, aux_loss_coef
        self.router = nn.Linear(hidden, experts, bias=False)
        built = experts if experts_built is None else min(experts, max(2, experts_built))
        self.experts = nn.ModuleList(FeedForward(hidden, expert_ffn_hidden) for _ in range(built))
        self.unbuilt_experts = experts - built
        self.shared_experts = (
            FeedForward(hidden, shared_experts * expert_ffn_hidden) if shared_experts > 0 else None
        )
        self.aux_loss: Tensor | None = None
        self.aux_loss_scale = 1.0
        self.aux_loss_log: list[Tensor] = []
        self.token_group = None
        self.dropped = 0

    def forward(self, x: Tensor) -> Tensor:
        xt = x.reshape(-1, x.shape[-1])  # [T, hidden]
        probs = F.softmax(self.router(xt).float(), dim=-1)  # [T, E]
        gate, expert_ids = probs.topk(self.top_k, dim=-1)  # [T, k]
        if self.top_k > 1:
            gate = gate / gate.sum(dim=-1, keepdim=True)
        flat_ids = expert_ids.reshape(-1)  # [T*k], assignment a belongs to token a // k
        if _is_symbolic_tracing() or x.is_meta:
            order, counts = torch.argsort(flat_ids, stable=True), None
        else:
            order, counts = self.assign(flat_ids)
        token_idx = order // self.top_k
        outs = self.run_experts(xt[token_idx], counts)  # [kept, hidden], grouped by expert
        outs = outs * gate.reshape(-1)[order].to(outs.dtype)[:, None]
        y = torch.zeros_like(xt).index_add_(0, token_idx, outs)
        if self.shared_experts is not None:
            y = y + self.shared_experts(xt)
        if not _is_symbolic_tracing():
            y = self._add_aux_loss(y, probs, flat_ids)
        return y.view_as(x)

    def assign(self, flat_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(kept assignments grouped by expert, ascending within one; kept rows per expert [E])."""
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=self.num_experts)
        if self.capacity_factor is None:
            return order, counts
        capacity = math.ceil(self.capacity_factor * flat_ids.numel() / self.num_experts)
        first = torch.cumsum(counts, 0) - counts  # position of each expert's first assignment in `order`
        keep = torch.arange(len(order), device=order.device) - first[flat_ids[order]] < capacity
        dropped = int(len(order) - keep.sum())  # also in a recompute: selective checkpointing replays op by op
        if torch._C._current_graph_task_id() == -1:  # not the recompute of an activation checkpoint
            self.dropped += dropped
        return order[keep], counts.clamp(max=capacity)

    def run_experts(self, rows: Tensor, counts: Tensor | None) -> Tensor:
        """Expert e on its `counts[e]` consecutive rows (counts None: capture, one expert on all rows)."""
        if counts is None:
            return self.experts[0](rows)
        assert not self.unbuilt_experts, "a MoE built for capture (experts_built) holds too few experts to train"
        return run_local_experts(list(self.experts), rows, counts)

    def _add_aux_loss(self, y: Tensor, probs: Tensor, flat_ids: Tensor) -> Tensor:
        # scatter_add, not bincount: the capture's fake tensors have no values to size a bincount by
        counts = probs.new_zeros(self.num_experts).scatter_add_(0, flat_ids, probs.new_ones(flat_ids.shape))
        assignments = flat_ids.numel()
        if self.token_group is not None:
            dist.all_reduce(counts, group=self.token_group)
            assignments *= dist.get_world_size(self.token_group)
        self.aux_loss = self.num_experts * (counts / assignments * probs.mean(dim=0)).sum()
        if self.aux_loss_coef > 0 and torch.is_grad_enabled() and not y.is_meta:  # meta: capture, nothing trained
            y = AuxLossToGradient.apply(y, self.aux_loss, self.aux_loss_coef * self.aux_loss_scale, self.aux_loss_log)
        return y


class AuxLossToGradient(torch.autograd.Function):
    """Identity on `y`; in backward, `aux` gets the gradient `scale`: adds scale * aux to the loss being
    differentiated wherever y's gradient comes from (Megatron-Core's MoEAuxLossAutoScaler). The backward
    appends aux's value to `log`: it runs once per trained forward, never for a forward that is not
    differentiated (a pipeline stage's shape inference) or that recomputes a checkpoint in backward."""

    @staticmethod
    def forward(ctx, y: Tensor, aux: Tensor, scale: float, log: list[Tensor]) -> Tensor:
        ctx.scale, ctx.log = scale, log
        ctx.save_for_backward(aux)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        (aux,) = ctx.saved_tensors
        ctx.log.append(aux.detach())
        return grad, torch.full_like(aux, ctx.scale), None, None


def grouped_mm_ok(experts: list[nn.Module], rows: Tensor) -> bool:
    """`torch._grouped_mm` runs the experts: bias-free SwiGLU experts with plain (not FSDP-sharded) weights,
    rows 16-byte aligned (it refuses other strides), fp32 or bf16 on CPU (checked exact against the loop in
    tests/unit/test_moe_capacity.py), bf16 on CUDA from sm90 (H100; its CUTLASS kernel; not run here: no GPU).
    The stacked copy of the experts' weights it multiplies is kept for backward: one MoE layer's local expert
    weights more per layer in flight (3-D expert parameters would avoid it, at the cost of renaming them)."""
    if not hasattr(torch, "_grouped_mm") or not experts or rows.dtype not in (torch.float32, torch.bfloat16):
        return False
    if rows.is_cuda and (rows.dtype != torch.bfloat16 or torch.cuda.get_device_capability(rows.device) < (9, 0)):
        return False
    first = experts[0]
    if not isinstance(first, FeedForward) or first.w3 is None or first.w1.bias is not None:
        return False
    weights = [e.w1.weight for e in experts]
    if any(type(w) is not nn.Parameter and type(w) is not Tensor for w in weights):
        return False  # a DTensor shard (FSDP2) is gathered by the expert's own forward only
    align = 16 // rows.element_size()
    return first.w1.in_features % align == 0 and first.w1.out_features % align == 0 and \
        all(w.dtype == rows.dtype for w in weights)


def run_local_experts(experts: list[nn.Module], rows: Tensor, counts: Tensor) -> Tensor:
    """Expert i of `experts` on its `counts[i]` consecutive rows of `rows`, outputs in the same order: one
    grouped GEMM per SwiGLU weight where `grouped_mm_ok`, else expert by expert."""
    if grouped_mm_ok(experts, rows):
        offs = torch.cumsum(counts, 0).to(torch.int32)
        rows = rows.contiguous()

        def gmm(x: Tensor, name: str) -> Tensor:
            weight = torch.stack([getattr(e, name).weight for e in experts])  # [E, out, in]
            return torch._grouped_mm(x, weight.transpose(1, 2), offs=offs)

        return gmm(F.silu(gmm(rows, "w1")) * gmm(rows, "w3"), "w2")
    chunks = rows.split(counts.tolist())
    return torch.cat([expert(chunk) for expert, chunk in zip(experts, chunks, strict=True)])


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(attention_norm(x)), then + feed_forward or moe (of ffn_norm(x))."""

    def __init__(self, spec: ModelSpec, layer_id: int, experts_built: int | None = None) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.moe_enabled = spec.is_moe_layer(layer_id)
        self.attention_norm = _norm(spec)
        self.attention = Attention(spec)
        self.ffn_norm = _norm(spec)
        if self.moe_enabled:
            assert spec.moe is not None
            self.moe = MoE(
                spec.hidden,
                experts=spec.moe.experts,
                top_k=spec.moe.top_k,
                expert_ffn_hidden=spec.moe.expert_ffn_hidden,
                shared_experts=spec.moe.shared_experts,
                capacity_factor=spec.moe.capacity_factor,
                aux_loss_coef=spec.moe.aux_loss_coef,
                experts_built=experts_built,
            )
        else:
            assert spec.ffn_hidden is not None, "the spec parser requires ffn_hidden for dense layers"
            self.feed_forward = FeedForward(spec.hidden, spec.ffn_hidden, style=spec.style)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        x = x + self.attention(self.attention_norm(x), rope)
        ffn = self.moe if self.moe_enabled else self.feed_forward
        return x + ffn(self.ffn_norm(x))


def _norm(spec: ModelSpec) -> nn.Module:
    if spec.style == "gpt":
        return nn.LayerNorm(spec.hidden, eps=spec.norm_eps)
    return nn.RMSNorm(spec.hidden, eps=spec.norm_eps)


class Transformer(nn.Module):
    """Decoder-only LM: tokens [b, s] -> logits [b, s, vocab]. See the module docstring for names."""

    rope_cos: Tensor
    rope_sin: Tensor

    def __init__(self, spec: ModelSpec, layer_ids: list[int] | None = None, experts_built: int | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.tok_embeddings = nn.Embedding(spec.vocab, spec.hidden)
        self.pos_embeddings = nn.Embedding(spec.seq_len, spec.hidden) if spec.style == "gpt" else None
        ids = range(spec.layers) if layer_ids is None else layer_ids
        self.layers = nn.ModuleList(TransformerBlock(spec, i, experts_built) for i in ids)
        self.norm = _norm(spec)
        self.output = nn.Linear(spec.hidden, spec.vocab, bias=False)
        if spec.tied_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if spec.style == "llama":
            # Not persistent: recomputed by init_weights(), so meta -> to_empty() -> init_weights() works.
            cos, sin = rope_tables(spec.seq_len, spec.head_dim, spec.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if not self.tok_embeddings.weight.is_meta:
            self.init_weights()

    def forward(self, tokens: Tensor, positions: Tensor | None = None) -> Tensor:
        """`positions` [s]: the global positions of the tokens (default 0..s-1); context parallelism
        (transforms/cp.py) passes those of this rank's sequence chunks. fx traces the default."""
        seqlen = tokens.shape[1]
        if _is_symbolic_tracing():
            positions = None
        h = self.tok_embeddings(tokens)
        rope = None
        if self.pos_embeddings is not None:
            h = h + self.pos_embeddings(torch.arange(seqlen, device=tokens.device) if positions is None else positions)
        elif positions is None:
            # narrow, not [:seqlen]: fx cannot slice a buffer with a traced length.
            rope = (self.rope_cos.narrow(0, 0, seqlen), self.rope_sin.narrow(0, 0, seqlen))
        else:
            rope = (self.rope_cos[positions], self.rope_sin[positions])
        for layer in self.layers:
            h = layer(h, rope)
        return self.output(self.norm(h))

    @torch.no_grad()
    def init_weights(self) -> None:
        """Deterministic under torch.manual_seed: N(0, 0.02) for linear and embedding weights, zero biases,
        unit norm scales; also recomputes the RoPE tables (needed after `to_empty()` from meta)."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm | nn.RMSNorm):
                module.reset_parameters()  # weight = 1, bias = 0
        if self.spec.style == "llama":
            cos, sin = rope_tables(
                self.spec.seq_len, self.spec.head_dim, self.spec.rope_theta, self.rope_cos.device
            )
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def moe_aux_loss(self) -> Tensor | None:
        """Sum of the MoE layers' load-balancing losses from the last forward, or None for a dense model."""
        losses = [m.aux_loss for m in self.modules() if isinstance(m, MoE) and m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """d(step loss) / d(one micro-batch's loss) for the aux loss gradient of every MoE layer of `model`."""
    for m in model.modules():
        if isinstance(m, MoE):
            m.aux_loss_scale = scale


def pop_aux_losses(model: nn.Module, micro_batches: int) -> Tensor | None:
    """sum over the MoE layers of `model` of aux_loss_coef x the sum of the aux losses of the step's
    `micro_batches` backwards (the last ones logged: a pipeline schedule's first step also differentiates
    a shape-inference forward, on placeholder inputs, before them), the logs emptied; None when no layer
    adds its aux loss."""
    total = None
    for m in model.modules():
        if isinstance(m, MoE):
            if m.aux_loss_coef > 0 and m.aux_loss_log:
                part = m.aux_loss_coef * torch.stack(m.aux_loss_log[-micro_batches:]).sum()
                total = part if total is None else total + part
            m.aux_loss_log.clear()
    return total


def build_reference_model(spec: ModelSpec, layer_ids: list[int] | None = None,
                          experts_built: int | None = None) -> Transformer:
    """The reference transformer for `spec`, on the current default device (use meta for big models).
    `layer_ids` builds only those blocks (capture of a deep model: see `repeated_blocks`); `experts_built`
    (at least 2) only that many experts per MoE layer, the others declared (capture only: MoE)."""
    return Transformer(spec, layer_ids, experts_built)


def repeated_blocks(spec: ModelSpec) -> tuple[list[int], list[tuple[int, int]]]:
    """(blocks to build, runs of identical blocks as (start, length)) for capturing `spec` without building
    every block: dense and MoE blocks form the runs, and each run keeps its first and second block (every
    block reads and writes the hidden state alone, so the second stands for all after it: planner/capture/
    repeat.py; building 14,848 experts only to drop most costs seconds, and each kept MoE block of
    DeepSeek-V3's 256 experts about 0.2 s of a cold `plan`)."""
    runs: list[tuple[int, int]] = []
    for i in range(spec.layers):
        if runs and spec.is_moe_layer(runs[-1][0]) == spec.is_moe_layer(i):
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    keep = [i for start, n in runs for i in range(start, start + min(n, 2))]
    return keep, runs
