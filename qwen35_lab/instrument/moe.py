"""The sparse MoE block of ``qwen3_5_moe`` models, instrumented; routing edits.

``Qwen3_5MoeSparseMoeBlock`` (transformers) computes, for the normed residual
``x`` ``[B·T, D]`` of one layer::

    router_logits = x Wgᵀ                                   # [B·T, E]   (the router, module `gate`)
    p = softmax(router_logits) in fp32; w, ids = topk(p, k)  # [B·T, k]
    w = w / Σ w  (always renormalised), cast to the logits' dtype
    routed = Σ_j w_j · down_e(silu(gate_e x) ⊙ up_e x),  e = ids_j     (module `experts`, fused weights)
    shared = sigmoid(shared_expert_gate x) · shared_expert(x)
    out = routed + shared

:class:`InstrumentedSparseMoeBlock` is a drop-in subclass (class swap, same
parameters) with a probe at every named value — ``layers.i.moe.router_logits``
``[B, T, E]``, ``topk_ids`` / ``topk_weights`` ``[B, T, k]``, ``shared_gate``
``[B, T, 1]``, ``shared_out`` / ``routed_out`` ``[B, T, D]`` and, on request,
``expert_out`` ``[B, T, k, D]`` (each chosen expert's own output for the token,
before its weight). It calls HF's own router and experts modules, so with or
without captures the block returns HF's values bit for bit, and transformers'
``output_router_logits=True`` recorder still sees the router.

Edits follow the one edit API: an edit of ``router_logits`` re-routes (softmax,
top-k and renormalisation recomputed from the edited logits); an edit of
``topk_ids`` keeps the router's probabilities of the forced experts,
renormalised over them; ``topk_weights``, ``shared_gate``, ``shared_out`` and
``routed_out`` are used as edited. :func:`remove_experts` and
:func:`force_experts` build the two routing edits and check them against the
model before it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as hf_moe

from ..checks import BadIndex, BadType, BadValue, check_indices
from .edits import Edit
from .probes import MOE_PROBES

__all__ = ["InstrumentedSparseMoeBlock", "RoutingEdit", "remove_experts", "force_experts", "route", "check_moe_edit"]


def route(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's routing of ``router_logits`` ``[N, E]``: ``(weights [N, k], ids [N, k])``, softmax in fp32 over
    all experts, top-k, renormalised to sum 1, weights cast back to the logits' dtype."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float)
    weights, ids = torch.topk(probs, k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def _session(module):
    hub = module.__dict__.get("_ql_hub")
    return None if hub is None else hub.session


class InstrumentedSparseMoeBlock(hf_moe.Qwen3_5MoeSparseMoeBlock):
    """The MoE FFN with probes ``layers.i.moe.{router_logits,topk_ids,topk_weights,shared_gate,shared_out,
    routed_out,expert_out}``."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        s = _session(self)
        p = f"layers.{self.__dict__['_ql_layer']}.moe."
        if s is None or not any(s.wants(p + n) for n in MOE_PROBES):
            return hf_moe.Qwen3_5MoeSparseMoeBlock.forward(self, hidden_states)
        s.ran_instrumented.add("moe")
        return self._probed_forward(s, p, hidden_states)

    def _probed_forward(self, s, p: str, hidden_states: torch.Tensor) -> torch.Tensor:
        B, T, D = hidden_states.shape
        x = hidden_states.view(-1, D)  # [B·T, D]
        k, E = self.gate.top_k, self.gate.num_experts
        shared = self.shared_expert(x)
        logits, weights, ids = self.gate(x)  # [N, E], [N, k], [N, k]: HF's router (its recorder sees it)
        if p + "router_logits" in s.edits:
            logits = s.point(p + "router_logits", logits.view(B, T, E)).reshape(-1, E)
            weights, ids = route(logits, k)
        else:
            s.point(p + "router_logits", logits.view(B, T, E))
        if p + "topk_ids" in s.edits:
            new_ids = s.point(p + "topk_ids", ids.view(B, T, k)).reshape(-1, k)
            if not torch.equal(new_ids, ids):  # the router's probabilities of the forced experts, renormalised
                probs = torch.softmax(logits, dim=-1, dtype=torch.float).gather(1, new_ids)
                weights = (probs / probs.sum(-1, keepdim=True).clamp_min(1e-30)).to(logits.dtype)
                ids = new_ids
        else:
            s.point(p + "topk_ids", ids.view(B, T, k))
        weights = s.point(p + "topk_weights", weights.view(B, T, k)).reshape(-1, k)
        if p + "expert_out" in s.capture:
            s.point(p + "expert_out", self._expert_outputs(x, ids).view(B, T, k, D))
        routed = self.experts(x, ids, weights)
        gate = s.point(p + "shared_gate", F.sigmoid(self.shared_expert_gate(x)).view(B, T, 1)).reshape(-1, 1)
        shared = s.point(p + "shared_out", (gate * shared).view(B, T, D)).reshape(-1, D)
        routed = s.point(p + "routed_out", routed.view(B, T, D)).reshape(-1, D)
        return (routed + shared).reshape(B, T, D)

    def _expert_outputs(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``[N, k, D]``: each token's chosen experts' outputs ``down_e(silu(gate_e x) ⊙ up_e x)``, unweighted."""
        ex = self.experts
        out = x.new_zeros(x.shape[0], ids.shape[1], x.shape[1])
        for e in ids.unique().tolist():
            token, slot = torch.where(ids == e)
            gate, up = F.linear(x[token], ex.gate_up_proj[e]).chunk(2, dim=-1)
            out[token, slot] = F.linear(ex.act_fn(gate) * up, ex.down_proj[e]).to(out.dtype)
        return out


# ------------------------------------------------------------------------------------------- edits
@dataclass
class RoutingEdit(Edit):
    """Remove experts (their router logits set to -inf before the top-k) or force a token's experts."""

    remove: list[int] | None = None
    force: list[int] | None = None

    def describe(self) -> str:
        return f"remove experts {self.remove}" if self.remove is not None else f"force experts {self.force}"

    @property
    def target(self) -> str:
        return "moe.router_logits" if self.remove is not None else "moe.topk_ids"

    def new_values(self, name, old, rel_positions, abs_positions):
        if self.remove is not None:  # old [..., E]
            masked = old.clone()
            masked[..., self.remove] = float("-inf")
            return masked
        forced = torch.as_tensor(self.force, dtype=old.dtype, device=old.device)  # old [..., k]
        return torch.broadcast_to(forced, old.shape).clone()


def _expert_list(what: str, experts) -> list[int]:
    if isinstance(experts, torch.Tensor):
        experts = experts.tolist()
    if isinstance(experts, int) and not isinstance(experts, bool):
        experts = [experts]
    if not isinstance(experts, (list, tuple, range)) or not experts:
        raise BadType(f"{what} takes a non-empty list of expert indices, got {experts!r}")
    check_indices(what, list(experts), None)
    if len(set(experts)) != len(experts):
        raise BadValue(f"{what}: expert indices repeat in {list(experts)!r}; give each expert once")
    return [int(e) for e in experts]


def remove_experts(experts, *, positions=None, batch=None) -> RoutingEdit:
    """Remove ``experts`` from routing: key it by ``layers.i.moe.router_logits`` (a glob for several layers).

    Their router logits become -inf before the softmax and top-k, so the tokens go to the best remaining
    experts (with renormalised weights). ``positions`` / ``batch`` narrow where.
    """
    return RoutingEdit(remove=_expert_list("remove_experts", experts), positions=positions, batch=batch)


def force_experts(experts, *, positions=None, batch=None) -> RoutingEdit:
    """Send the selected tokens to exactly ``experts`` (as many as the model routes to, top-k): key it by
    ``layers.i.moe.topk_ids``. Their weights are the router's probabilities of those experts, renormalised."""
    return RoutingEdit(force=_expert_list("force_experts", experts), positions=positions, batch=batch)


def check_moe_edit(name: str, kind: str, edit: Edit, text) -> None:
    """Refuse, before the model runs, a routing edit that does not fit layer ``name``'s router."""
    if not (getattr(text, "num_experts", 0) and hasattr(text, "num_experts_per_tok")):
        raise BadValue(f"{edit.describe() if isinstance(edit, RoutingEdit) else 'a routing edit'} on {name!r}: this "
                       "is a dense model, it has no routed (MoE) layers")
    E, k = text.num_experts, text.num_experts_per_tok
    layer = name.split(".")[1]
    if isinstance(edit, RoutingEdit):
        if kind != edit.target:
            raise BadValue(f"{edit.describe()} edits '{edit.target}': key it by 'layers.i.{edit.target}' "
                           f"(or a glob such as 'layers.*.{edit.target}'), not {name!r}")
        chosen = edit.remove if edit.remove is not None else edit.force
        bad = [e for e in chosen if e >= E]
        if bad:
            raise BadIndex(f"expert {bad[0]} does not exist in layer {layer}: it has {E} experts (0–{E - 1})")
        if edit.remove is not None and len(set(edit.remove)) >= E:
            raise BadValue(f"removing experts {edit.remove} leaves layer {layer} no expert to route to (it has "
                           f"{E}); remove at most {E - 1}")
        if edit.force is not None and len(edit.force) != k:
            raise BadValue(f"force_experts got {len(edit.force)} experts {edit.force}, but layer {layer} routes each "
                           f"token to exactly {k} (top-k = {k}); give {k} distinct experts")
        return
    value = edit.value
    if kind == "moe.router_logits" and torch.is_tensor(value) and (value.ndim == 0 or value.shape[-1] != E):
        raise BadValue(f"router-logit edit for {name!r} has shape {tuple(value.shape)}; its last axis must be the "
                       f"layer's {E} experts ([E], [T, E] or [B, T, E])")
    if kind == "moe.topk_ids" and value is not None:
        ids = value if torch.is_tensor(value) else torch.tensor(value)
        if ids.is_floating_point() and not torch.is_tensor(value):
            raise BadType(f"the edit of {name!r} gives expert indices; use ql.force_experts([...]) "
                          f"({k} distinct experts)")
        if ids.ndim == 0 or ids.shape[-1] != k:
            raise BadValue(f"the edit of {name!r} has shape {tuple(ids.shape)}; its last axis must hold the "
                           f"{k} experts a token is routed to")
        if ids.is_floating_point() or (ids < 0).any() or (ids >= E).any():
            raise BadIndex(f"the edit of {name!r} holds {ids.flatten()[:8].tolist()}: expert indices are "
                           f"integers 0–{E - 1} (layer {layer} has {E} experts)")
        if k > 1 and bool((ids.sort(-1).values.diff(dim=-1) == 0).any()):
            raise BadValue(f"the edit of {name!r} sends a token to one expert twice; give {k} distinct experts")
    if kind in ("moe.topk_weights",) and torch.is_tensor(value) and value.ndim and value.shape[-1] not in (1, k):
        raise BadValue(f"the edit of {name!r} has shape {tuple(value.shape)}; its last axis must be top-k = {k}")
