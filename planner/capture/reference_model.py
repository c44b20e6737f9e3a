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

import torch
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
        self.w1 = nn.Linear(hidden, ffn_hidden, bias=gpt)
        self.w2 = nn.Linear(ffn_hidden, hidden, bias=gpt)
        self.w3 = None if gpt else nn.Linear(hidden, ffn_hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.w3 is None:
            return self.w2(F.gelu(self.w1(x), approximate="tanh"))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Top-k routed SwiGLU experts (Mixtral-style softmax then top-k, renormalised when k > 1), plus
    optional always-on shared experts (DeepSeek), with dropless dispatch.

    Dispatch: the T*k (token, expert) assignments are sorted by expert (`argsort(stable=True)`), the tokens
    gathered in that order, split into one contiguous chunk per expert, each chunk run through its expert,
    scaled by its gate weight and added back to its token with `index_add_`.

    Chunk sizes: with real values they are the routed counts (`bincount`). Under `torch.fx.symbolic_trace`
    or on meta tensors there are no values, so the tokens are split as evenly as possible among the experts
    (`tensor_split`), i.e. the FLOPs of perfectly balanced routing, which is what the planner captures (and
    what MoE throughput benchmarks force). FakeTensor capture (make_fx "fake") would hit the data-dependent
    `bincount`; capture on meta instead.

    After each eager forward, `aux_loss` holds the Switch Transformer load-balancing loss
    (Fedus et al. 2021, arXiv:2101.03961, eq. 4): E * sum_i f_i * P_i, with f_i the fraction of the T*k
    assignments routed to expert i and P_i the mean router probability of expert i. Add
    `coef * aux_loss` (e.g. 0.01) to the training loss.
    """

    def __init__(
        self, hidden: int, *, experts: int, top_k: int, expert_ffn_hidden: int, shared_experts: int = 0
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k = experts, top_k
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(hidden, expert_ffn_hidden) for _ in range(experts))
        self.shared_experts = (
            FeedForward(hidden, shared_experts * expert_ffn_hidden) if shared_experts > 0 else None
        )
        self.aux_loss: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        xt = x.reshape(-1, x.shape[-1])  # [T, hidden]
        probs = F.softmax(self.router(xt).float(), dim=-1)  # [T, E]
        gate, expert_ids = probs.topk(self.top_k, dim=-1)  # [T, k]
        if self.top_k > 1:
            gate = gate / gate.sum(dim=-1, keepdim=True)
        flat_ids = expert_ids.reshape(-1)  # [T*k], assignment a belongs to token a // k
        order = torch.argsort(flat_ids, stable=True)
        token_idx = order // self.top_k
        routed = xt[token_idx]  # [T*k, hidden], grouped by expert
        if _is_symbolic_tracing() or x.is_meta:
            # capture (balanced routing): every expert would get T*k/E rows; one expert on all T*k rows has
            # the same FLOPs and saved bytes forward and backward (both linear in rows) and costs 1/E of
            # the dispatch, so a 256-expert block is traced and measured as fast as a dense one
            outs = self.experts[0](routed)
        else:
            chunks = routed.split(torch.bincount(flat_ids, minlength=self.num_experts).tolist())
            outs = torch.cat([expert(chunks[i]) for i, expert in enumerate(self.experts)])
        outs = outs * gate.reshape(-1)[order].to(outs.dtype)[:, None]
        y = torch.zeros_like(xt).index_add_(0, token_idx, outs)
        if self.shared_experts is not None:
            y = y + self.shared_experts(xt)
        if not _is_symbolic_tracing():
            self.aux_loss = self._load_balancing_loss(probs, flat_ids)
        return y.view_as(x)

    def _load_balancing_loss(self, probs: Tensor, flat_ids: Tensor) -> Tensor:
        """Switch Transformer eq. 4: E * sum_i f_i * P_i (1.0 when routing is perfectly balanced)."""
        counts = probs.new_zeros(self.num_experts).scatter_add_(0, flat_ids, probs.new_ones(flat_ids.shape))
        f = counts / flat_ids.shape[0]
        p = probs.mean(dim=0)
        return self.num_experts * (f * p).sum()


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(attention_norm(x)), then + feed_forward or moe (of ffn_norm(x))."""

    def __init__(self, spec: ModelSpec, layer_id: int) -> None:
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

    def __init__(self, spec: ModelSpec, layer_ids: list[int] | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.tok_embeddings = nn.Embedding(spec.vocab, spec.hidden)
        self.pos_embeddings = nn.Embedding(spec.seq_len, spec.hidden) if spec.style == "gpt" else None
        ids = range(spec.layers) if layer_ids is None else layer_ids
        self.layers = nn.ModuleList(TransformerBlock(spec, i) for i in ids)
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


def build_reference_model(spec: ModelSpec, layer_ids: list[int] | None = None) -> Transformer:
    """The reference transformer for `spec`, on the current default device (use meta for big models).
    `layer_ids` builds only those blocks (capture of a deep model: see `repeated_blocks`)."""
    return Transformer(spec, layer_ids)


def repeated_blocks(spec: ModelSpec) -> tuple[list[int], list[tuple[int, int]]]:
    """(blocks to build, runs of identical blocks as (start, length)) for capturing `spec` without building
    every block: dense and MoE blocks form the runs, and each run keeps its first, second and last block, as
    planner/capture/repeat.py cuts a built model (building 14,848 experts only to drop most costs seconds)."""
    runs: list[tuple[int, int]] = []
    for i in range(spec.layers):
        if runs and spec.is_moe_layer(runs[-1][0]) == spec.is_moe_layer(i):
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    keep = [i for start, n in runs for i in sorted({start, min(start + 1, start + n - 1), start + n - 1})]
    return keep, runs
