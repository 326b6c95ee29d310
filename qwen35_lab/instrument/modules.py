"""Instrumented drop-ins for HF's Qwen3.5 decoder layer, Gated DeltaNet and gated attention.

``instrument(model)`` changes the class of each existing module in place to a
subclass defined here: the very same parameters (same names, same tensors, no
copies), removable by :func:`uninstrument`. When a session wants nothing from
a layer, the subclass calls HF's own ``forward`` — the logits are then those
of plain HF, bit for bit. When it does, the instrumented forward below runs:
the same computation written out with a probe point at every named value.

Models dispatched by accelerate keep working: accelerate wraps a module's
``forward`` on the instance and calls ``module._old_forward``; that reference
is re-pointed to the instrumented forward and restored on removal.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from transformers.integrations.accelerate import force_accelerate_hooks
from transformers.models.qwen3_5 import modeling_qwen3_5 as hf
from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as hf_moe

from .. import ops
from ..ops import attention as attention_ops
from ..ops.dispatch import backend_for
from ..checks import BadType

__all__ = ["instrument", "uninstrument", "is_instrumented", "Hub"]


class Hub:
    """Per-model instrumentation handle: the active session, hooks and swapped modules."""

    def __init__(self, model):
        self.model = model
        self.session = None
        self.swapped: list[tuple[torch.nn.Module, type, object]] = []
        self.handles: list = []


def _session(module):
    hub = module.__dict__.get("_ql_hub")
    return None if hub is None else hub.session


# --------------------------------------------------------------------------- DeltaNet
class InstrumentedGatedDeltaNet(hf.Qwen3_5GatedDeltaNet):
    """Gated DeltaNet with probes ``layers.i.deltanet.{q,k,v,beta,g,z,o,state,conv_state,out}``."""

    _hf_cls = hf.Qwen3_5GatedDeltaNet  # whose forward runs when nothing is wanted (MoE models: their copy)

    def forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
        s = _session(self)
        if s is None or not s.wants_layer(self.layer_idx):
            return self._hf_cls.forward(self, hidden_states, cache_params=cache_params,
                                        attention_mask=attention_mask, **kwargs)
        s.ran_instrumented.add("deltanet")
        return self._probed_forward(s, hidden_states, cache_params, attention_mask, **kwargs)

    @force_accelerate_hooks("conv1d")
    def _probed_forward(self, s, hidden_states, cache_params, attention_mask, **kwargs):
        L = self.layer_idx
        p = f"layers.{L}.deltanet."
        hidden_states = hf.apply_mask_to_padding_states(hidden_states, attention_mask)
        B, T, _ = hidden_states.shape
        if cache_params is not None:
            conv_state = cache_params.get_conv_state(L, state_idx=0)
            recurrent_state = cache_params.get_recurrent_state(L, state_idx=0)
        else:
            conv_state, recurrent_state = None, None

        mixed_qkv = self.in_proj_qkv(hidden_states).transpose(1, 2)  # [B, C, T]
        conv_input = mixed_qkv
        z = self.in_proj_z(hidden_states).reshape(B, T, -1, self.head_v_dim)
        b = self.in_proj_b(hidden_states)
        a = self.in_proj_a(hidden_states)

        decode = conv_state is not None and T == 1 and not cache_params.is_recording_past(L)
        if decode:
            mixed_qkv = hf.causal_conv1d_update(mixed_qkv, conv_state, self.conv1d.weight.squeeze(1),
                                                self.conv1d.bias, self.activation)
        else:
            if cache_params is not None:
                mixed_qkv = cache_params.update_conv_state(mixed_qkv, L, conv_kernel_size=self.conv_kernel_size)
            mixed_qkv = hf.causal_conv1d_fn(mixed_qkv, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                            activation=self.activation, **kwargs)
            if cache_params is not None:
                mixed_qkv = mixed_qkv[:, :, -T:]

        mixed_qkv = mixed_qkv.transpose(1, 2)
        query, key, value = torch.split(mixed_qkv, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        query = query.reshape(B, T, -1, self.head_k_dim)
        key = key.reshape(B, T, -1, self.head_k_dim)
        value = value.reshape(B, T, -1, self.head_v_dim)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)

        # What enters the recurrence: q and k L2-normalised in fp32 (as the kernels do internally).
        q = s.point(p + "q", hf.l2norm(query.float(), dim=-1, eps=1e-6))
        k = s.point(p + "k", hf.l2norm(key.float(), dim=-1, eps=1e-6))
        v = s.point(p + "v", value)
        beta = s.point(p + "beta", beta)
        g = s.point(p + "g", g)
        z = s.point(p + "z", z)

        o, final_state = self._recurrence(s, q, k, v, g, beta, recurrent_state)
        o = s.point(p + "o", o.to(value.dtype))

        if cache_params is not None:
            cache_params.update_recurrent_state(final_state, L)
        if s.wants(p + "conv_state"):
            if cache_params is not None:
                window = cache_params.get_conv_state(L, state_idx=0)
            else:
                window = F.pad(conv_input, (max(0, self.conv_kernel_size - T), 0))[..., -self.conv_kernel_size:]
            s.point(p + "conv_state", window)

        core = self.norm(o.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim)).reshape(B, T, -1)
        return s.point(p + "out", self.out_proj(core))

    def _recurrence(self, s, q, k, v, g, beta, initial_state):
        """Run the gated delta rule, recording state checkpoints and applying state edits.

        q, k ``[B, T, H, K]`` (normalised, fp32), v ``[B, T, HV, V]``, g, beta ``[B, T, HV]``.
        Returns o ``[B, T, HV, V]`` (fp32) and the final state ``[B, HV, K, V]`` (fp32).
        """
        L = self.layer_idx
        B, T, H, K = q.shape
        HV, V = v.shape[2], v.shape[3]
        capture_state = s.wants(f"layers.{L}.deltanet.state") and f"layers.{L}.deltanet.state" in s.capture
        edit_at = s.state_edit_positions(L) or []
        state = (initial_state.float() if initial_state is not None
                 else q.new_zeros(B, HV, K, V))
        if capture_state:
            rep = HV // H
            s.record_state_inputs(L, q=q.repeat_interleave(rep, dim=2), k=k.repeat_interleave(rep, dim=2),
                                  v=v.float(), g=g.float(), beta=beta.float())
        if not capture_state and not edit_at and q.device.type == "cpu":
            # Nothing asked of the state: HF's own recurrence, so gate-only captures and edits
            # of other probes change the logits by exactly what they change, nothing more.
            fn = hf.torch_recurrent_gated_delta_rule if T == 1 and initial_state is not None \
                else hf.torch_chunk_gated_delta_rule
            o, state = fn(q, k, v, g=g, beta=beta, initial_state=initial_state, output_final_state=True,
                          use_qk_l2norm_in_kernel=False)
            return o.float(), state
        outs = []
        start = 0
        for stop in sorted(set(edit_at)) + [None]:
            end = T if stop is None else stop  # run tokens [start, end) as a chunked segment
            if end > start:
                seg = slice(start, end)
                want_ckpt = capture_state
                o_seg, state, chunks = ops.chunk_gated_delta_rule(
                    q[:, seg], k[:, seg], v[:, seg], g[:, seg], beta[:, seg], chunk_size=s.chunk_size,
                    initial_state=state, output_final_state=True, output_chunk_states=want_ckpt,
                    use_qk_l2norm=False)
                if want_ckpt:  # chunk i starts at absolute position offset + start + i*C
                    for i in range(chunks.shape[1]):
                        pos = s.offset + start + i * s.chunk_size
                        if end - start > 1 or s.needs_checkpoint(L, pos):
                            s.record_checkpoint(L, pos, chunks[:, i])
                outs.append(o_seg.float())
            if stop is None:
                break
            # token `stop`: one step, then overwrite S_stop and read o_stop from the edited state
            if capture_state:
                s.record_checkpoint(L, s.offset + stop, state)
            state = state.clone()
            ops.recurrent_gated_delta_step(q[:, stop], k[:, stop], v[:, stop], g[:, stop], beta[:, stop], state,
                                           use_qk_l2norm=False, in_place=True)
            state = s.edit_state(L, stop, state)
            if capture_state:  # the edited S_stop, so that replay from here starts from it
                s.record_checkpoint(L, s.offset + stop + 1, state)
            rep = HV // H
            q_t = q[:, stop].repeat_interleave(rep, dim=1) * K**-0.5  # [B, HV, K]
            outs.append(torch.einsum("bhkv,bhk->bhv", state, q_t)[:, None].float())
            start = stop + 1
        if capture_state:
            s.record_final_state(L, s.offset + T, state)
        o = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        return o, state


# -------------------------------------------------------------------------- attention
def _key_padding(attention_mask, batch: int, keys: int, device):
    """``[B, Tk]`` keep-mask from HF's 4D mask (None when there is no padding)."""
    if attention_mask is None or not torch.is_tensor(attention_mask) or attention_mask.dim() != 4:
        return None
    keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    return keep[:, 0, -1, :keys].to(device)


class InstrumentedAttention(hf.Qwen3_5Attention):
    """Gated attention with probes ``layers.i.attn.{q,k,v,gate,probs,summary,out}``."""

    _hf_cls = hf.Qwen3_5Attention

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
        s = _session(self)
        if s is None or not s.wants_layer(self.layer_idx):
            return self._hf_cls.forward(self, hidden_states, position_embeddings, attention_mask,
                                        past_key_values=past_key_values, **kwargs)
        s.ran_instrumented.add("attn")
        return self._probed_forward(s, hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)

    def _probed_forward(self, s, hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs):
        p = f"layers.{self.layer_idx}.attn."
        input_shape = hidden_states.shape[:-1]
        B, T = input_shape
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states, gate = torch.chunk(self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim * 2), 2, dim=-1)
        gate = gate.reshape(*input_shape, -1)
        query_states = self.q_norm(query_states.view(hidden_shape)).transpose(1, 2)
        key_states = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = hf.apply_rotary_pos_emb(query_states, key_states, cos, sin)

        query_states = s.point(p + "q", query_states)
        key_states = s.point(p + "k", key_states)
        value_states = s.point(p + "v", value_states)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
        Tk = key_states.shape[2]
        pad = _key_padding(attention_mask, B, Tk, query_states.device)

        fused = None
        if p + "summary" in s.capture:
            if (pad is None and p + "probs" not in s.edits and not self.training
                    and backend_for(query_states.device) == "torch"):
                # the torch ops: the output and the summaries from one flash pass (None where it does not
                # apply); where the Triton kernels are chosen, they compute the summaries
                fused = attention_ops.causal_attention_with_summaries(query_states, key_states, value_states,
                                                                      scaling=self.scaling)
            summary = fused[1] if fused is not None else ops.attention_summaries(
                query_states, key_states, scaling=self.scaling, key_padding_mask=pad)
            s.capture_value(p + "summary", summary)
        if p + "probs" in s.capture and p + "probs" not in s.edits:
            sel = s.probs_selection(p + "probs", T)
            if sel is not None:
                heads, rows, abs_rows = sel
                probs = ops.attention_probs_rows(query_states, key_states, heads=heads, rows=rows,
                                                 scaling=self.scaling, key_padding_mask=pad)
                if s.batch is not None:
                    probs = probs[s.batch]
                s.store_direct(p + "probs", probs, abs_rows)

        if p + "probs" in s.edits:
            # Edited probabilities: eager attention on the edited weights.
            keys = hf.repeat_kv(key_states, self.num_key_value_groups)
            values = hf.repeat_kv(value_states, self.num_key_value_groups)
            scores = torch.matmul(query_states, keys.transpose(2, 3)) * self.scaling
            causal = torch.ones(T, Tk, dtype=torch.bool, device=scores.device).tril(Tk - T)
            keep = causal[None, None] if pad is None else causal[None, None] & pad[:, None, None, :].bool()
            scores = scores.masked_fill(~keep, float("-inf"))
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query_states.dtype)
            weights = s.point(p + "probs", weights)
            attn_output = torch.matmul(weights, values).transpose(1, 2).contiguous()
        elif fused is not None:
            attn_output = fused[0].transpose(1, 2).contiguous()
        else:
            interface = hf.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                 hf.eager_attention_forward)
            attn_output, _ = interface(self, query_states, key_states, value_states, attention_mask,
                                       dropout=0.0, scaling=self.scaling, **kwargs)

        gate = s.point(p + "gate", torch.sigmoid(gate).view(B, T, -1, self.head_dim))
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = attn_output * gate.reshape(*input_shape, -1)
        return s.point(p + "out", self.o_proj(attn_output)), None


# ------------------------------------------------------------------- decoder layer
class InstrumentedDecoderLayer(hf.Qwen3_5DecoderLayer):
    """Decoder layer with probes ``layers.i.{resid_pre,resid_mid,mlp_out,resid_post}``."""

    _hf_cls = hf.Qwen3_5DecoderLayer

    def forward(self, hidden_states, position_embeddings, attention_mask=None, position_ids=None,
                past_key_values=None, **kwargs):
        s = _session(self)
        i = self.__dict__["_ql_layer"]
        if s is None or not any(s.wants(f"layers.{i}.{n}") for n in ("resid_pre", "resid_mid", "mlp_out", "resid_post")):
            return self._hf_cls.forward(self, hidden_states, position_embeddings,
                                        attention_mask=attention_mask, position_ids=position_ids,
                                        past_key_values=past_key_values, **kwargs)
        s.ran_instrumented.add("layer")
        p = f"layers.{i}."
        hidden_states = s.point(p + "resid_pre", hidden_states)
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        if self.block_type == "linear_attention":
            hidden_states = self.linear_attn(hidden_states=hidden_states, cache_params=past_key_values,
                                             attention_mask=attention_mask, **kwargs)
        else:
            hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                              position_ids=position_ids, past_key_values=past_key_values,
                                              position_embeddings=position_embeddings, **kwargs)
        hidden_states = s.point(p + "resid_mid", residual + hidden_states)
        residual = hidden_states
        hidden_states = s.point(p + "mlp_out", self.mlp(self.post_attention_layernorm(hidden_states)))
        return s.point(p + "resid_post", residual + hidden_states)


# ------------------------------------------------------------------ MoE (qwen3_5_moe)
# transformers' qwen3_5_moe module holds its own copies of the DeltaNet, attention and decoder layer
# (identical code). Their drop-ins are the same instrumented classes, based on the MoE copy, so that
# the class swap keeps the module's HF type and the uninstrumented path runs the MoE copy's forward.
class InstrumentedMoeGatedDeltaNet(InstrumentedGatedDeltaNet, hf_moe.Qwen3_5MoeGatedDeltaNet):
    _hf_cls = hf_moe.Qwen3_5MoeGatedDeltaNet


class InstrumentedMoeAttention(InstrumentedAttention, hf_moe.Qwen3_5MoeAttention):
    _hf_cls = hf_moe.Qwen3_5MoeAttention


class InstrumentedMoeDecoderLayer(InstrumentedDecoderLayer, hf_moe.Qwen3_5MoeDecoderLayer):
    _hf_cls = hf_moe.Qwen3_5MoeDecoderLayer


# ---------------------------------------------------------------------- install
def _moe_block_class():
    from .moe import InstrumentedSparseMoeBlock

    return InstrumentedSparseMoeBlock


_SWAPS = {
    hf.Qwen3_5DecoderLayer: InstrumentedDecoderLayer,
    hf.Qwen3_5GatedDeltaNet: InstrumentedGatedDeltaNet,
    hf.Qwen3_5Attention: InstrumentedAttention,
    hf_moe.Qwen3_5MoeDecoderLayer: InstrumentedMoeDecoderLayer,
    hf_moe.Qwen3_5MoeGatedDeltaNet: InstrumentedMoeGatedDeltaNet,
    hf_moe.Qwen3_5MoeAttention: InstrumentedMoeAttention,
}


def is_instrumented(model) -> bool:
    return "_ql_hub" in model.__dict__


def _swap(hub: Hub, module: torch.nn.Module, new_cls: type) -> None:
    old_cls = module.__class__
    old_forward = module.__dict__.get("_old_forward")
    module.__class__ = new_cls
    module.__dict__["_ql_hub"] = hub
    if old_forward is not None:  # accelerate wraps the instance's forward and calls _old_forward
        module._old_forward = types.MethodType(new_cls.forward, module)
    hub.swapped.append((module, old_cls, old_forward))


def _vision_hook(name: str):
    def hook(module, args, output):
        s = _session(module)
        if s is None or not s.wants(name):
            return None
        if torch.is_tensor(output):
            return s.point(name, output)
        return None
    return hook


def _simple_hook(name: str, t_from_end: bool = False):
    def hook(module, args, output):
        s = _session(module)
        if s is None or not s.wants(name):
            return None
        t0 = s.length - output.shape[1] if t_from_end else 0
        return s.point(name, output, t0=t0)
    return hook


def _begin_call_hook(module, args, kwargs):
    s = _session(module)
    if s is None:
        return None
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    length = (ids if ids is not None else embeds).shape[1]
    past = kwargs.get("past_key_values")
    past_len = None
    if past is None:
        past_len = 0
    else:
        try:
            n = past.get_seq_length()
        except Exception:  # caches without attention layers
            n = 0
        has_prev = any(getattr(layer, "has_previous_state", [False])[0] if isinstance(
            getattr(layer, "has_previous_state", None), (list, tuple)) else bool(getattr(layer, "has_previous_state", False))
            for layer in getattr(past, "layers", []))
        past_len = n if n > 0 else (None if has_prev else 0)
    s.begin_call(length, past_len, batch_size=(ids if ids is not None else embeds).shape[0], cached=past is not None)
    if ids is not None:
        s.token_chunks.append(ids.detach())
    return None


def instrument(model) -> Hub:
    """Swap the decoder layers, Gated DeltaNets and attentions of ``model`` for instrumented ones, in place."""
    if is_instrumented(model):
        return model.__dict__["_ql_hub"]
    hub = Hub(model)
    found = 0
    swaps = {**_SWAPS, hf_moe.Qwen3_5MoeSparseMoeBlock: _moe_block_class()}
    for name, module in model.named_modules():
        cls = type(module)
        if cls in swaps:
            if cls in (hf.Qwen3_5DecoderLayer, hf_moe.Qwen3_5MoeDecoderLayer):
                module.__dict__["_ql_layer"] = int(name.rsplit(".", 1)[-1])
            elif cls is hf_moe.Qwen3_5MoeSparseMoeBlock:  # "...layers.{i}.mlp"
                module.__dict__["_ql_layer"] = int(name.rsplit(".", 2)[-2])
            _swap(hub, module, swaps[cls])
            found += 1
    if not found:
        raise BadType(f"{type(model).__name__} has no Qwen3.5 layers to instrument; instrument() takes a "
                        "Qwen3_5(Moe)ForConditionalGeneration or Qwen3_5(Moe)ForCausalLM")
    model.__dict__["_ql_hub"] = hub

    def attach(module, hook, pre=False):
        module.__dict__["_ql_hub"] = hub
        if pre:
            hub.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        else:
            hub.handles.append(module.register_forward_hook(hook))

    attach(model, _begin_call_hook, pre=True)
    attach(model.get_input_embeddings(), _simple_hook("embed"))
    if model.get_output_embeddings() is not None:
        attach(model.get_output_embeddings(), _simple_hook("logits", t_from_end=True))
    visual = getattr(getattr(model, "model", None), "visual", None)
    if visual is not None:
        for j, block in enumerate(visual.blocks):
            attach(block, _vision_hook(f"visual.blocks.{j}.out"))
        attach(visual.merger, _vision_hook("visual.merger.out"))
    return hub


def uninstrument(model) -> None:
    """Restore HF's classes and remove every hook; a no-op on a model that is not instrumented."""
    hub = model.__dict__.get("_ql_hub")
    if hub is None:
        return
    for module, old_cls, old_forward in reversed(hub.swapped):
        module.__class__ = old_cls
        if old_forward is not None:
            module._old_forward = old_forward
        module.__dict__.pop("_ql_hub", None)
        module.__dict__.pop("_ql_layer", None)
    for h in hub.handles:
        h.remove()
    for m in model.modules():
        m.__dict__.pop("_ql_hub", None)
    hub.session = None
    model.__dict__.pop("_ql_hub", None)
