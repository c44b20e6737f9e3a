"""A decoder whose MoE layers are the common `gate` + `experts` ModuleList pattern with their own forward
(Hugging Face Mixtral's loop: one-hot mask, `torch.where` per expert, experts without tokens skipped,
`index_add_`), not autoshard's reference MoE; 4 experts, top-2, renormalised gates. The rest is the
reference model of examples/specs/tiny_moe_top1.yaml. For tests/distributed/test_ep.py: expert parallelism
must work on a MoE forward it does not know."""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoshard.planner.capture.reference_model import FeedForward, MoE, build_reference_model
from autoshard.planner.capture.spec import load_spec

SPEC = Path(__file__).resolve().parents[3] / "examples" / "specs" / "tiny_moe_top1.yaml"
TOP_K = 2


class SparseMoeBlock(nn.Module):
    def __init__(self, hidden: int, ffn: int, experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = experts, top_k
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(hidden, ffn) for _ in range(experts))

    def forward(self, hidden_states: Tensor) -> Tensor:
        b, s, h = hidden_states.shape
        x = hidden_states.view(-1, h)
        weights = F.softmax(self.gate(x), dim=1, dtype=torch.float)
        weights, selected = torch.topk(weights, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        if x.is_meta:  # capture: no values to route by; balanced routing's FLOPs
            n = x.shape[0] * self.top_k // self.num_experts
            for expert in self.experts:
                out = out.index_add(0, torch.arange(n, device=x.device), expert(x[:n]))
            return out.view(b, s, h)
        mask = F.one_hot(selected, self.num_experts).permute(2, 1, 0)  # [E, k, T]
        for e in range(self.num_experts):
            slot, token = torch.where(mask[e])
            if token.numel() == 0:
                continue
            y = self.experts[e](x[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(x.dtype))
        return out.view(b, s, h)


def build_model() -> nn.Module:
    spec, _, _ = load_spec(SPEC)
    model = build_reference_model(spec)
    for block in model.layers:
        if isinstance(getattr(block, "moe", None), MoE):
            block.moe = SparseMoeBlock(spec.hidden, spec.moe.expert_ffn_hidden, spec.moe.experts, TOP_K)
    return model
