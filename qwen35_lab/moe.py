"""Routing of the Mixture-of-Experts models: what experts each token uses, measured and plotted.

Everything here reads a :class:`~qwen35_lab.Trace` that captured the router
probes (``layers.i.moe.router_logits`` ``[B, T, E]``, ``topk_ids`` /
``topk_weights`` ``[B, T, k]``; see :mod:`qwen35_lab.instrument.moe` for the
block and the edits):

* :func:`expert_load` — per layer, how many token slots each expert got
  (``counts``, Σ = N·k) and how much routing weight (``mass``, Σ = N), with the
  balanced load ``N·k/E`` / ``N/E`` for reference;
* :func:`token_expert_map` — ``[T, E]`` routing weight of each token to each expert;
* :func:`router_entropy` — ``[B, T]`` entropy (nats) of the router's full softmax;
* :func:`coactivation` — ``[E, E]`` how often two experts serve the same token;
* :func:`routing_by_segment` — the expert distribution of each part of a chat
  prompt (system, user text, image, video, thinking, answer; :func:`chat_segments`);
* :func:`routing_similarity` — per layer, the cosine similarity of two prompts' expert loads;
* :func:`mutual_information` — I(label; top-1 expert) in bits, for specialisation.

The ``plot_*`` functions draw them (matplotlib; sequential colour maps with the
norm named on the bar).
"""

from __future__ import annotations

import math

import torch

from .checks import BadType, BadValue, NotCaptured, check_int
from .configs import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID

__all__ = [
    "moe_layers", "expert_load", "token_expert_map", "router_entropy", "coactivation", "chat_segments",
    "routing_by_segment", "routing_similarity", "mutual_information", "SEGMENTS",
    "plot_expert_load", "plot_token_experts", "plot_router_entropy", "plot_coactivation",
    "plot_routing_by_segment", "plot_routing_similarity",
]

SEGMENTS = ("system", "user", "image", "video", "thinking", "answer", "template")


# ---------------------------------------------------------------------------------------- reading
def _check_trace(trace) -> None:
    from .instrument import Trace

    if not isinstance(trace, Trace):
        raise BadType(f"routing analysis reads a Trace (lab.run(..., capture='layers.*.moe.*')), "
                      f"got {type(trace).__name__}")


def moe_layers(trace, probe: str = "topk_ids") -> list[int]:
    """Layers whose ``layers.i.moe.<probe>`` the trace holds, in order."""
    _check_trace(trace)
    layers = sorted(int(n.split(".")[1]) for n in trace.names if n.endswith(f".moe.{probe}"))
    if not layers:
        raise NotCaptured(f"the trace holds no 'layers.i.moe.{probe}'; capture it (capture='layers.*.moe.*' on a "
                          f"MoE model). Captured: {', '.join(trace.names[:8]) or 'nothing'}")
    return layers


def _layer(trace, layer: int, probe: str) -> torch.Tensor:
    _check_trace(trace)
    check_int("layer", layer, lo=0)
    name = f"layers.{layer}.moe.{probe}"
    if name not in trace:
        raise NotCaptured(f"{name!r} was not captured; layers with routing in this trace: "
                          f"{moe_layers(trace, probe) if any('.moe.' in n for n in trace.names) else 'none'}")
    return trace[name]


def _num_experts(trace, layer: int, num_experts: int | None) -> int:
    if num_experts is not None:
        return check_int("num_experts", num_experts, lo=1)
    name = f"layers.{layer}.moe.router_logits"
    if name in trace:
        return int(trace[name].shape[-1])
    E = trace.meta.get("num_experts")
    if E is None:
        raise BadValue("pass num_experts=...: the trace holds no router_logits to read the expert count from")
    return int(E)


def _layers_arg(trace, layers, probe="topk_ids") -> list[int]:
    if layers is None:
        return moe_layers(trace, probe)
    if isinstance(layers, int):
        return [layers]
    return list(layers)


# --------------------------------------------------------------------------------------- measures
def expert_load(trace, layers=None, *, num_experts: int | None = None) -> dict[int, dict]:
    """Per layer: ``counts`` ``[E]`` (token slots routed to each expert, Σ = N·k), ``mass`` ``[E]`` (Σ of
    routing weights, Σ = N), ``balanced_counts`` = N·k/E and ``balanced_mass`` = N/E, ``tokens`` N."""
    out = {}
    for L in _layers_arg(trace, layers):
        ids = _layer(trace, L, "topk_ids").reshape(-1, _layer(trace, L, "topk_ids").shape[-1])  # [N, k]
        w = _layer(trace, L, "topk_weights").reshape(ids.shape).float()
        E = _num_experts(trace, L, num_experts)
        counts = torch.bincount(ids.flatten(), minlength=E).float()
        mass = torch.zeros(E).index_add_(0, ids.flatten().cpu(), w.flatten().cpu())
        N, k = ids.shape
        out[L] = {"counts": counts, "mass": mass, "balanced_counts": N * k / E, "balanced_mass": N / E, "tokens": N}
    return out


def token_expert_map(trace, layer: int, *, batch: int = 0, num_experts: int | None = None) -> torch.Tensor:
    """``[T, E]``: each token's routing weight to each expert (0 where not routed)."""
    ids = _layer(trace, layer, "topk_ids")[batch]  # [T, k]
    w = _layer(trace, layer, "topk_weights")[batch].float()
    E = _num_experts(trace, layer, num_experts)
    return torch.zeros(ids.shape[0], E).scatter_(1, ids.cpu(), w.cpu())


def router_entropy(trace, layer: int) -> torch.Tensor:
    """``[B, T]`` entropy (nats) of the router's softmax over all experts (0: one expert; log E: uniform)."""
    logp = torch.log_softmax(_layer(trace, layer, "router_logits").float(), dim=-1)
    return -(logp.exp() * logp).nan_to_num().sum(-1)


def coactivation(trace, layer: int, *, num_experts: int | None = None) -> torch.Tensor:
    """``[E, E]``: how many tokens were routed to both experts (diagonal: to that expert)."""
    ids = _layer(trace, layer, "topk_ids")
    E = _num_experts(trace, layer, num_experts)
    onehot = torch.zeros(ids.shape[:-1].numel(), E).scatter_(1, ids.reshape(-1, ids.shape[-1]).cpu(), 1.0)
    return onehot.T @ onehot


def chat_segments(token_strings: list[str], tokens=None) -> list[str]:
    """One label per token from the chat format: ``system``, ``user``, ``image``, ``video`` (the pad tokens of
    a picture or a clip), ``thinking`` (inside ``<think>…</think>`` of an assistant turn), ``answer`` (the rest
    of an assistant turn) and ``template`` (anything outside a turn). ``tokens``: the ids (for image/video)."""
    if not isinstance(token_strings, (list, tuple)):
        raise BadType(f"chat_segments takes the token strings (trace.token_strings), got {type(token_strings).__name__}")
    ids = None if tokens is None else [int(t) for t in torch.as_tensor(tokens).flatten().tolist()]
    labels, role, thinking = [], None, False
    expect_role = False
    for i, s in enumerate(token_strings):
        if ids is not None and ids[i] == IMAGE_TOKEN_ID:
            labels.append("image")
            continue
        if ids is not None and ids[i] == VIDEO_TOKEN_ID:
            labels.append("video")
            continue
        if s == "<|im_start|>":
            expect_role, role, thinking = True, None, False
            labels.append("template")
            continue
        if expect_role:
            role = {"system": "system", "user": "user", "assistant": "assistant"}.get(s.strip("Ġ"), "template")
            expect_role = False
        if s == "<think>" and role == "assistant":
            thinking = True
        label = ("thinking" if thinking else "answer") if role == "assistant" else (role or "template")
        labels.append(label)
        if s == "</think>":
            thinking = False
        if s == "<|im_end|>":
            role = None
    return labels


def routing_by_segment(trace, layer: int, labels: list[str] | None = None, *, batch: int = 0,
                       num_experts: int | None = None) -> dict[str, torch.Tensor]:
    """``{segment: [E]}``: the share of routing weight each expert gets from the tokens of each segment
    (rows sum to 1). ``labels``: one per token (default: :func:`chat_segments` of the trace's tokens)."""
    m = token_expert_map(trace, layer, batch=batch, num_experts=num_experts)  # [T, E]
    if labels is None:
        labels = chat_segments(trace.token_strings, trace.tokens[batch] if trace.tokens is not None else None)
    positions = trace.positions(f"layers.{layer}.moe.topk_ids")
    if len(labels) < max(positions) + 1:
        raise BadValue(f"{len(labels)} labels for a trace whose routing reaches position {max(positions)}; give one "
                       "label per token")
    out = {}
    for seg in dict.fromkeys(labels[p] for p in positions):
        rows = [i for i, p in enumerate(positions) if labels[p] == seg]
        out[seg] = m[rows].sum(0) / len(rows)
    return out


def routing_similarity(trace_a, trace_b, layers=None, *, num_experts: int | None = None) -> dict[int, float]:
    """Per layer, the cosine similarity of two traces' expert loads (routing mass per expert):
    1 = the same experts in the same proportions, 0 = disjoint experts."""
    la, lb = expert_load(trace_a, layers, num_experts=num_experts), expert_load(trace_b, layers, num_experts=num_experts)
    out = {}
    for L in la:
        if L not in lb:
            raise NotCaptured(f"the second trace holds no routing of layer {L}; it has layers {sorted(lb)}")
        a, b = la[L]["mass"], lb[L]["mass"]
        out[L] = float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-12))
    return out


def mutual_information(experts: torch.Tensor, labels: torch.Tensor) -> float:
    """I(label; expert) in bits from paired samples (e.g. each token's top-1 expert and its task), the plug-in
    estimate Σ p(l, e) log2 p(l, e) / (p(l) p(e))."""
    experts, labels = torch.as_tensor(experts).flatten().long(), torch.as_tensor(labels).flatten().long()
    if experts.numel() != labels.numel() or experts.numel() == 0:
        raise BadValue(f"mutual_information needs as many labels as experts (> 0): got {labels.numel()} labels, "
                       f"{experts.numel()} experts")
    _, e = torch.unique(experts, return_inverse=True)
    _, lab = torch.unique(labels, return_inverse=True)
    joint = torch.zeros(int(lab.max()) + 1, int(e.max()) + 1).index_put_((lab, e), torch.ones(e.numel()), accumulate=True)
    joint /= joint.sum()
    pl, pe = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    return float((joint[nz] * torch.log2(joint[nz] / (pl @ pe)[nz])).sum())


# ------------------------------------------------------------------------------------------ plots
def _ax(ax, figsize):
    """``ax``, or the axes of a new pyplot figure (shown by ``plt.show()``, as the plots return axes) no
    wider than the notebook shows unshrunk (``viz.DISPLAY_WIDTH``)."""
    import matplotlib.pyplot as plt

    from . import viz

    if ax is None:
        width, height = figsize
        ax = plt.figure(figsize=(min(float(width), viz.DISPLAY_WIDTH), float(height)), layout="constrained").add_subplot()
    return ax


def _heatmap(ax, m: torch.Tensor, label: str, *, bounds=None):
    """``m`` on a sequential map whose norm comes from the data and is named on the colour bar."""
    from . import viz

    norm, scale = viz._magnitude_norm(m.numpy(), bounds=bounds)
    im = ax.imshow(m.numpy(), aspect="auto", cmap=viz._cmap(viz.SEQUENTIAL), norm=norm, interpolation="nearest")
    viz._colorbar(ax.figure, im, ax, label, scale)
    return im


def _int_ticks(ax, axis: str, label: str):
    from matplotlib.ticker import MaxNLocator

    from . import viz

    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(axis=axis, labelsize=viz.TEXT_PT["tick"])
    (ax.set_xlabel if axis == "x" else ax.set_ylabel)(label, fontsize=viz.TEXT_PT["label"])


def plot_expert_load(trace, layers=None, *, what: str = "mass", ax=None, num_experts: int | None = None):
    """Heat map layers × experts of routing ``mass`` (or ``counts``) relative to the balanced load (1 = balanced)."""
    from . import viz

    if what not in ("mass", "counts"):
        raise BadValue(f"what must be 'mass' or 'counts', got {what!r}")
    load = expert_load(trace, layers, num_experts=num_experts)
    Ls = sorted(load)
    rel = torch.stack([load[L][what] / load[L][f"balanced_{what}"] for L in Ls])  # [layers, E]
    ax = _ax(ax, (min(viz.DISPLAY_WIDTH, 3.5 + 0.3 * rel.shape[1]), 1.6 + 0.3 * len(Ls)))
    _heatmap(ax, rel, f"{what} / balanced\n(1 = balanced)")
    viz._category_axis(ax, "y", Ls, label="layer")
    viz._category_axis(ax, "x", range(rel.shape[1]), label="expert")
    viz._title(ax, f"expert load ({what}), relative to a balanced router")
    return ax


def plot_token_experts(trace, layer: int, *, batch: int = 0, ax=None, max_tokens: int = 80,
                       num_experts: int | None = None):
    """Tokens × experts routing weights of one layer (the first ``max_tokens`` captured tokens)."""
    from . import viz

    m = token_expert_map(trace, layer, batch=batch, num_experts=num_experts)[:max_tokens]  # [T, E]
    positions = list(trace.positions(f"layers.{layer}.moe.topk_ids")[:m.shape[0]])
    ax = _ax(ax, (min(viz.DISPLAY_WIDTH, 4.5 + 0.3 * m.shape[1]), 1.5 + 0.16 * m.shape[0]))
    _heatmap(ax, m, "routing weight", bounds=(0.0, 1.0))
    viz._token_axis(ax, "y", trace, positions)
    viz._category_axis(ax, "x", range(m.shape[1]), label="expert")
    viz._title(ax, f"layer {layer}: routing weight of each token")
    return ax


def plot_router_entropy(trace, layers=None, *, batch: int = 0, ax=None):
    """Router entropy (nats) per token, one line per layer, with log E (a uniform router) dashed."""
    from . import viz

    Ls = _layers_arg(trace, layers, "router_logits")
    ax = _ax(ax, (8, 3.2))
    E = None
    for L in Ls:
        h = router_entropy(trace, L)[batch]
        E = _layer(trace, L, "router_logits").shape[-1]
        ax.plot(trace.positions(f"layers.{L}.moe.router_logits")[:h.numel()], h.numpy(), label=f"layer {L}", lw=1)
    ax.axhline(math.log(E), ls="--", color="grey", lw=1, label=f"uniform (log {E})")
    ax.set_ylim(0, 1.05 * math.log(E))
    _int_ticks(ax, "x", "token position")
    ax.set_ylabel("router entropy (nats)", fontsize=viz.TEXT_PT["label"])
    ax.tick_params(axis="y", labelsize=viz.TEXT_PT["tick"])
    ax.legend(fontsize=viz.TEXT_PT["tick"], ncol=1 + len(Ls) // 12, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0)
    viz._title(ax, "router entropy of each token")
    return ax


def plot_coactivation(trace, layer: int, *, ax=None, num_experts: int | None = None):
    """Expert × expert co-activation counts of one layer."""
    from . import viz

    c = coactivation(trace, layer, num_experts=num_experts)  # [E, E]
    ax = _ax(ax, (5.5, 4.6))
    _heatmap(ax, c, "tokens routed to both")
    ax.set_aspect("equal")
    viz._category_axis(ax, "x", range(c.shape[1]), label="expert")
    viz._category_axis(ax, "y", range(c.shape[0]), label="expert")
    viz._title(ax, f"layer {layer}: tokens routed to both (diagonal: to the expert)")
    return ax


def plot_routing_by_segment(trace, layer: int, labels=None, *, batch: int = 0, ax=None,
                            num_experts: int | None = None):
    """Segments × experts: the share of each segment's routing weight that goes to each expert."""
    from . import viz

    by = routing_by_segment(trace, layer, labels, batch=batch, num_experts=num_experts)
    names = list(by)
    m = torch.stack([by[n] for n in names])  # [segments, E]
    ax = _ax(ax, (min(viz.DISPLAY_WIDTH, 4.5 + 0.3 * m.shape[1]), 1.6 + 0.35 * len(names)))
    _heatmap(ax, m, "share of the\nsegment's weight")
    viz._category_axis(ax, "y", names, label="segment")
    viz._category_axis(ax, "x", range(m.shape[1]), label="expert")
    viz._title(ax, f"layer {layer}: routing by segment")
    return ax


def plot_routing_similarity(trace_a, trace_b, layers=None, *, ax=None, labels=("a", "b")):
    """Per-layer cosine similarity of two prompts' expert loads."""
    from . import viz

    sim = routing_similarity(trace_a, trace_b, layers)
    ax = _ax(ax, (7, 3))
    ax.bar(list(sim), list(sim.values()), color="tab:blue")
    ax.set_ylim(0, 1.05)
    _int_ticks(ax, "x", "layer")
    ax.set_ylabel("cosine similarity", fontsize=viz.TEXT_PT["label"])
    ax.tick_params(axis="y", labelsize=viz.TEXT_PT["tick"])
    viz._title(ax, f"routing similarity: {labels[0]} vs {labels[1]}")
    return ax
