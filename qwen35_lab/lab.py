"""The ``Lab``: one loaded model with its tokenizer, processor and chat template."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from . import chat_format, multimodal
from . import sampling as sampling_module
from . import instrument as _inst
from ._io import fmt_bytes
from .checks import (BadIndex, BadType, BadValue, InputError, OverBudget, check_device, check_dtype, check_finite,
                     check_float, check_indices, check_int, check_seed, check_str)

__all__ = ["Lab", "ChatResult", "Generation"]


@dataclass
class Generation:
    """What ``Lab.generate`` returns: the new text and ids, and the trace when something was captured."""

    text: str
    ids: torch.Tensor  # [B, N] generated token ids
    prompt_ids: torch.Tensor  # [B, T] prompt token ids
    trace: "_inst.Trace | None" = None

    def __getitem__(self, key):  # dict-style access, e.g. gen["text"]
        return getattr(self, key)


@dataclass
class ChatResult:
    """What ``Lab.chat`` returns: the model's reasoning, its answer and parsed tool calls."""

    reasoning: str | None
    answer: str
    tool_calls: list[dict]
    text: str  # the raw generated text, special tokens included
    prompt: str
    prompt_tokens: int
    generated_tokens: int
    finished: bool  # stopped on an end-of-turn token rather than max_new_tokens
    extra: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        r = (self.reasoning[:60] + "…") if self.reasoning and len(self.reasoning) > 60 else self.reasoning
        a = (self.answer[:80] + "…") if len(self.answer) > 80 else self.answer
        return (f"ChatResult(reasoning={r!r}, answer={a!r}, tool_calls={self.tool_calls!r}, "
                f"tokens={self.prompt_tokens}+{self.generated_tokens}, finished={self.finished})")


class Lab:
    """A loaded model: ``.model``, ``.tokenizer``, ``.processor``, ``.config``.

    Made by :func:`qwen35_lab.load`.
    """

    def __init__(self, *, model, tokenizer, processor, name, source=None, chat_variant="qwen3.5", meta=None):
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        self.name = name
        self.source = source
        self.chat_variant = chat_variant
        self.meta = meta or {}

    # ---------------------------------------------------------------- basics
    @property
    def config(self):
        return self.model.config

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embeddings (CPU when they are offloaded)."""
        d = self.model.get_input_embeddings().weight.device
        return torch.device("cpu") if d.type == "meta" else d

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def layer_types(self) -> list[str]:
        return list(self.text_config.layer_types)

    @property
    def is_multimodal(self) -> bool:
        return hasattr(self.model, "model") and hasattr(self.model.model, "visual")

    def __repr__(self) -> str:
        c = self.text_config
        n_lin = self.layer_types.count("linear_attention")
        return (f"Lab({self.name!r}: {c.num_hidden_layers} layers ({n_lin} Gated DeltaNet, "
                f"{c.num_hidden_layers - n_lin} gated attention), hidden {c.hidden_size}, "
                f"{'multimodal' if self.is_multimodal else 'text only'}, {self.dtype}, {self.device}, "
                f"template {self.chat_variant!r})")

    # --------------------------------------------------------------- prompts
    def render(self, messages, *, enable_thinking=None, add_generation_prompt=True, tools=None,
               preserve_thinking=None, add_vision_id=False) -> str:
        """The prompt text the chat template makes of ``messages``."""
        chat_format.validate_messages(messages)
        return chat_format.render(messages, variant=self.chat_variant, tools=tools,
                                  add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
                                  preserve_thinking=preserve_thinking, add_vision_id=add_vision_id)

    def encode(self, text: str) -> torch.Tensor:
        """Token ids ``[1, T]`` of a prompt text (special tokens parsed), on the model's device."""
        check_str("prompt", text)
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        if ids.numel() == 0:
            raise BadValue(f"the prompt {text!r} encodes to no tokens; give some text")
        self._check_known_words(text, ids)
        return ids.to(self.device)

    def _check_known_words(self, text: str, ids: torch.Tensor) -> None:
        """A word-level organism maps an unknown word to ``<unk>`` (an id it was never trained on): refuse."""
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if unk is None or not bool((ids == unk).any()) or self.tokenizer.unk_token in text:
            return
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        vocab = self.tokenizer.get_vocab()
        words = ([w for w, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
                 if backend is not None and backend.pre_tokenizer is not None else text.split())
        unknown = sorted({w for w in words if w not in vocab})
        plain = sorted(w for w in vocab if not w.startswith("<"))
        raise BadValue(
            f"{unknown[:8]} {'is' if len(unknown) == 1 else 'are'} not in the vocabulary of {self.name!r} "
            f"({len(vocab)} words, e.g. {plain[:12]}); this organism reads only its own words in its documented "
            f"prompt format (see its card, data/organisms/{self.name}/README.md, and lab.tokenizer.get_vocab())")

    def prepare(self, inputs, *, enable_thinking=None, tools=None, add_generation_prompt=True) -> dict:
        """Model inputs (``input_ids``, ``attention_mask``, vision tensors) from a str, messages or ids."""
        if isinstance(inputs, dict):
            if "input_ids" not in inputs:
                raise BadValue(f"a dict of model inputs needs 'input_ids'; got keys {sorted(map(str, inputs))}")
            self._check_ids(inputs["input_ids"], "inputs['input_ids']")
            return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
        if torch.is_tensor(inputs):
            self._check_ids(inputs, "token ids")
            ids = inputs if inputs.dim() == 2 else inputs[None]
            return {"input_ids": ids.to(self.device), "attention_mask": torch.ones_like(ids).to(self.device)}
        if isinstance(inputs, str):
            ids = self.encode(inputs)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if isinstance(inputs, list):
            built = multimodal.build_inputs(self, inputs, enable_thinking=enable_thinking, tools=tools,
                                            add_generation_prompt=add_generation_prompt)
            return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in built.items()}
        raise BadType(f"inputs must be a prompt string, a list of chat messages, token ids or a dict of model "
                        f"inputs; got {type(inputs).__name__}")

    def _check_ids(self, ids, what: str) -> None:
        """Token ids: an integer tensor ``[T]`` or ``[B, T]``, non-empty, every id inside the vocabulary."""
        if not torch.is_tensor(ids):
            raise BadType(f"{what} must be a torch.Tensor of token ids, got {type(ids).__name__}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise BadType(f"{what} must be integers (torch.long), got dtype {ids.dtype}")
        if ids.dim() not in (1, 2) or ids.numel() == 0:
            raise BadValue(f"{what} must be a non-empty [T] or [B, T] tensor, got shape {list(ids.shape)}")
        vocab = self.text_config.vocab_size
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise BadIndex(f"{what} hold id {bad}, outside the vocabulary of {vocab} (valid ids: 0..{vocab - 1})")

    def _check_context(self, n_tokens: int) -> None:
        """The same limit ``prefill`` enforces: the active RoPE's maximum context."""
        from .longctx import check_context

        check_context(self, n_tokens)

    # ------------------------------------------------------------ generation
    def generate(self, inputs, *, max_new_tokens: int = 64, seed: int | None = None, enable_thinking=None,
                 tools=None, capture=None, edits=None, positions=None, heads=None, batch=None,
                 capture_device="cpu", capture_dtype=None, chunk_size: int = 64, budget_bytes=None,
                 **sampling) -> Generation:
        """Generate with HF ``generate``; with ``capture``/``edits``, probes cover prompt and new tokens.

        Returns a :class:`Generation` (``.text``, ``.ids``, ``.prompt_ids``, ``.trace``).
        """
        check_int("max_new_tokens", max_new_tokens, lo=1)
        check_seed(seed)
        capture_device, capture_dtype = _check_session_args(capture, edits, capture_device, capture_dtype, chunk_size,
                                                            budget_bytes)
        if enable_thinking is None and "preset" in sampling:
            enable_thinking = sampling_module.resolve(sampling)[1]
        model_inputs = self.prepare(inputs, enable_thinking=enable_thinking, tools=tools)
        gen_kwargs = sampling_module.generation_kwargs(self, sampling, prompt_ids=model_inputs["input_ids"])
        prompt_len = model_inputs["input_ids"].shape[1]
        self._check_context(prompt_len + max_new_tokens)
        with self._session(capture, edits, model_inputs, positions=positions, heads=heads, batch=batch,
                           device=capture_device, dtype=capture_dtype, chunk_size=chunk_size,
                           budget_bytes=budget_bytes, extra_tokens=max_new_tokens) as session:
            if seed is not None:
                torch.manual_seed(seed)
            with torch.no_grad():
                out = self.model.generate(**model_inputs, max_new_tokens=max_new_tokens, **gen_kwargs)
        new = out[:, prompt_len:]
        trace = None
        if session is not None and session.capture:
            trace = _inst.Trace.from_session(session, self._trace_meta(model_inputs, out))
            if out.shape[0] == 1:
                trace.meta["segments"] = multimodal.segments(self, model_inputs)
        return Generation(text=self.tokenizer.decode(new[0], skip_special_tokens=False), ids=new,
                          prompt_ids=model_inputs["input_ids"], trace=trace)

    def chat(self, messages, *, enable_thinking=None, max_new_tokens: int = 256, tools=None,
             preserve_thinking=None, seed: int | None = None, **sampling) -> ChatResult:
        """Render ``messages`` with the model's chat template, generate, and split the reply.

        ``messages`` are OpenAI-style dicts as in the model cards. ``sampling``
        takes ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``presence_penalty``,
        ``frequency_penalty``, ``repetition_penalty`` (vLLM's meanings) or a
        ``preset`` name; with none given the checkpoint's generation config applies.
        """
        if enable_thinking is None and "preset" in sampling:
            enable_thinking = sampling_module.resolve(sampling)[1]
        prompt = self.render(messages, enable_thinking=enable_thinking, tools=tools,
                             preserve_thinking=preserve_thinking)
        model_inputs = multimodal.build_inputs(self, messages, enable_thinking=enable_thinking, tools=tools,
                                               preserve_thinking=preserve_thinking)
        out = self.generate(model_inputs, max_new_tokens=max_new_tokens, seed=seed, **sampling)
        text = out.text
        stop_ids = set(_eos_ids(self.model))
        finished = bool(out.ids.numel()) and int(out.ids[0, -1]) in stop_ids
        clean = text
        for tok in ("<|im_end|>", "<|endoftext|>"):
            clean = clean.split(tok)[0]
        parsed = chat_format.parse_output(clean, prompt_opened_think=prompt.endswith("<think>\n"))
        return ChatResult(reasoning=parsed.reasoning, answer=parsed.answer, tool_calls=parsed.tool_calls,
                          text=text, prompt=prompt, prompt_tokens=model_inputs["input_ids"].shape[1],
                          generated_tokens=out.ids.shape[1], finished=finished)

    # ------------------------------------------------------ inputs & sampling
    def inspect_inputs(self, messages, **options):
        """Segments of a prompt (text, images, video frame pairs): token spans, grids, times, M-RoPE positions."""
        return multimodal.inspect_inputs(self, messages, **options)

    def sweep(self, prompts, **kwargs):
        """Generate for every combination of sampling settings; tidy rows as a ``datasets.Dataset``."""
        return sampling_module.sweep(self, prompts, **kwargs)

    def sample(self, prompt, **kwargs):
        """One generation with vLLM-exact sampling and its metrics (see ``qwen35_lab.sampling.sample``)."""
        return sampling_module.sample(self, prompt, **kwargs)

    def sampling_panel(self, **kwargs):
        """An ipywidgets panel: presets, sliders, streamed output and the next-token distribution per step."""
        from .sampling_panel import SamplingPanel

        return SamplingPanel(self, **kwargs)

    # ---------------------------------------------------------- long context
    def set_rope(self, rope):
        """Apply a ``rope_parameters`` dict (e.g. ``yarn_for_context(1_010_000)``) in place; ``None`` restores."""
        from .longctx import set_rope

        return set_rope(self, rope)

    @property
    def rope(self):
        """The active rope: type, factor, attention factor and the effective maximum context."""
        from .longctx import rope_info

        return rope_info(self)

    @property
    def max_context(self) -> int:
        from .longctx import max_context

        return max_context(self)

    def prefill(self, inputs, **kwargs):
        """Chunked prefill of a long prompt with bounded memory and a progress bar (captures work across chunks)."""
        from .longctx import chunked_prefill

        return chunked_prefill(self, inputs, **kwargs)

    # -------------------------------------------------------- instrumentation
    def probe_names(self, pattern=None) -> list[str]:
        """Every probe name of this model (or those a pattern selects)."""
        names = _inst.probe_names(self.config)
        return names if pattern is None else _inst.select(pattern, names, self.layer_types)

    def instrument(self):
        """Swap in the instrumented modules (same parameters; logits unchanged until you capture)."""
        _inst.instrument(self.model)
        return self

    def uninstrument(self):
        """Restore HF's modules and remove every hook."""
        _inst.uninstrument(self.model)
        return self

    @property
    def is_instrumented(self) -> bool:
        return _inst.is_instrumented(self.model)

    @contextlib.contextmanager
    def instrumented(self):
        """``with lab.instrumented(): ...`` — instrumented inside, plain HF after (also after an exception)."""
        was = self.is_instrumented
        self.instrument()
        try:
            yield self
        finally:
            if not was:
                self.uninstrument()

    def estimate(self, capture, inputs=None, *, length: int | None = None, batch_size: int = 1, positions=None,
                 heads=None, dtype=None, chunk_size: int = 64) -> dict:
        """Bytes a capture needs: ``{"total": n, "per_probe": {...}}``, for ``inputs`` or a ``length``."""
        names, _ = _inst.plan(self.config, capture, None)
        if inputs is not None:
            ids = self.prepare(inputs)["input_ids"]
            batch_size, length = ids.shape
        if length is None:
            raise BadValue("estimate() needs inputs or length=")
        return self._estimate(names, length, batch_size, positions=positions, heads=heads, dtype=dtype,
                              chunk_size=chunk_size)

    def _estimate(self, names: list[str], length: int, batch_size: int, *, positions, heads, dtype,
                  chunk_size: int) -> dict:
        n_pos = None if positions is None else len(_positions_list(positions, length))
        n_heads = None if heads is None else len([heads] if isinstance(heads, int) else list(heads))
        item = (dtype or torch.float32).itemsize if isinstance(dtype, torch.dtype) or dtype is None else 4
        per = _inst.estimate_capture_bytes(self.config, names, batch=batch_size, length=length, n_positions=n_pos,
                                           n_heads=n_heads, dtype_bytes=item if dtype else self.dtype.itemsize,
                                           chunk_size=chunk_size)
        return {"total": sum(per.values()), "per_probe": per}

    @contextlib.contextmanager
    def _session(self, capture, edits, model_inputs, *, positions=None, heads=None, batch=None, device="cpu",
                 dtype=None, chunk_size=64, budget_bytes=None, extra_tokens=0):
        """Plan, check the budget, instrument, run the body with a live session, always clean up."""
        if capture is None and not edits:
            yield None
            return
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise BadValue(f"chunk_size must be a positive integer, got {chunk_size!r}")
        names, resolved = _inst.plan(self.config, capture, edits)
        _check_heads(self.config, names + list(resolved), heads)

        def check(B: int, T: int) -> None:
            """Refuse selections outside the input and a capture over budget, before the forward runs."""
            batch_list = check_indices("batch", batch, B, what=f"the batch has {B} sequences")
            pos_list = check_indices("positions", positions, T, what=f"the input has {T} tokens")
            _check_edit_selections(resolved, B, T, self.config)
            n_b = B if batch_list is None else len(batch_list)
            est = self._estimate(names, T, n_b, positions=pos_list, heads=heads, dtype=dtype,
                                 chunk_size=chunk_size)
            budget = budget_bytes if budget_bytes is not None else _inst.default_budget_bytes(device)
            if est["total"] > budget:
                top = sorted(est["per_probe"].items(), key=lambda kv: -kv[1])[:3]
                raise OverBudget(
                    f"this capture needs about {fmt_bytes(est['total'])}, over the budget of "
                    f"{fmt_bytes(budget)} (largest: {', '.join(f'{n} {fmt_bytes(b)}' for n, b in top)}). "
                    f"Narrow it: fewer probes (e.g. 'layers.3.*'), positions=[...], heads=[...], "
                    f"a smaller capture dtype (torch.bfloat16), or raise budget_bytes=.")

        if model_inputs is not None:
            B, T = model_inputs["input_ids"].shape
            check(B, T + extra_tokens)
        session = _inst.Session(capture=names, edits=resolved, positions=positions, heads=heads, batch=batch,
                                device=device, dtype=dtype, chunk_size=chunk_size)
        if model_inputs is None:  # lab.trace(): the inputs are seen on the first forward call
            session.first_call_check = check
        was = self.is_instrumented
        hub = _inst.instrument(self.model)
        hub.session = session
        try:
            yield session
        finally:
            hub.session = None
            if not was:
                _inst.uninstrument(self.model)

    def _trace_meta(self, model_inputs, all_ids: torch.Tensor) -> dict:
        meta = {"model": self.name, "tokens": all_ids.detach().cpu(), "layer_types": self.layer_types}
        if self.tokenizer is not None:
            meta["token_strings"] = self.tokenizer.convert_ids_to_tokens(all_ids[0].tolist())
        try:
            pos = self._position_ids(model_inputs)
            if pos is not None:
                meta["position_ids"] = pos.detach().cpu()
        except Exception:  # position ids are informative only
            pass
        return meta

    def _position_ids(self, model_inputs):
        inner = getattr(self.model, "model", None)
        if inner is None or not hasattr(inner, "get_rope_index"):
            return None
        kw = {k: model_inputs.get(k) for k in ("image_grid_thw", "video_grid_thw", "attention_mask")}
        kw = {k: v for k, v in kw.items() if v is not None}
        mm = model_inputs.get("mm_token_type_ids")
        if mm is not None:
            kw["mm_token_type_ids"] = mm
        pos, _ = inner.get_rope_index(model_inputs["input_ids"], **kw)
        return pos

    @contextlib.contextmanager
    def trace(self, capture=None, *, edits=None, positions=None, heads=None, batch=None, device="cpu",
              dtype=None, chunk_size: int = 64, budget_bytes=None):
        """``with lab.trace("layers.*.deltanet.beta") as tr: lab.model(**inputs)`` — tr is filled on exit.

        Every forward call inside the block (a prefill, ``model.generate``'s decode steps) lands in one
        trace; the memory guard runs on the first call, before any work.
        """
        device, dtype = _check_session_args(capture, edits, device, dtype, chunk_size, budget_bytes)
        tr = _inst.Trace(meta={"model": self.name})
        tr._recording = True
        with self._session(capture, edits, None, positions=positions, heads=heads, batch=batch, device=device,
                           dtype=dtype, chunk_size=chunk_size, budget_bytes=budget_bytes) as session:
            yield tr
        tr._recording = False
        if session is not None:
            meta = {"model": self.name, "layer_types": self.layer_types}
            if session.token_chunks:
                ids = torch.cat([t.cpu() for t in session.token_chunks], dim=1)
                meta["tokens"] = ids
                if self.tokenizer is not None:
                    meta["token_strings"] = self.tokenizer.convert_ids_to_tokens(ids[0].tolist())
            filled = _inst.Trace.from_session(session, meta)
            tr.__dict__.update({k: v for k, v in filled.__dict__.items() if k != "_recording"})

    def run(self, inputs, *, capture=None, edits=None, positions=None, heads=None, batch=None, device="cpu",
            dtype=None, chunk_size: int = 64, budget_bytes=None, enable_thinking=None) -> "_inst.Trace":
        """One forward pass; returns a :class:`Trace` of the captured probes (and the last logits).

        ``capture``: probe names, globs (``"layers.*.deltanet.beta"``), a list or a callable.
        ``edits``: ``{name or glob: number | tensor | function | ql.scale(...) | ql.patch(...)}``.
        ``positions`` / ``heads`` / ``batch`` narrow what is stored; ``device`` / ``dtype`` where it goes.
        """
        device, dtype = _check_session_args(capture, edits, device, dtype, chunk_size, budget_bytes)
        model_inputs = self.prepare(inputs, enable_thinking=enable_thinking)
        self._check_context(model_inputs["input_ids"].shape[1])
        with self._session(capture, edits, model_inputs, positions=positions,
                           heads=heads, batch=batch, device=device, dtype=dtype, chunk_size=chunk_size,
                           budget_bytes=budget_bytes) as session:
            with torch.no_grad():
                out = self.model(**model_inputs, use_cache=False)
        ids = model_inputs["input_ids"]
        if session is None:
            tr = _inst.Trace(meta=self._trace_meta(model_inputs, ids))
        else:
            tr = _inst.Trace.from_session(session, self._trace_meta(model_inputs, ids))
        tr.meta["last_logits"] = out.logits[:, -1].detach().float().cpu()
        if ids.shape[0] == 1:
            tr.meta["segments"] = multimodal.segments(self, model_inputs)
        return tr


def _check_session_args(capture, edits, device, dtype, chunk_size, budget_bytes) -> tuple[str, torch.dtype | None]:
    """Types and values of what ``run`` / ``generate`` / ``trace`` take, before any work; returns the
    capture device and dtype normalised (``"cuda"`` → ``"cuda"``, ``"bfloat16"`` → ``torch.bfloat16``)."""
    if capture is not None and not (isinstance(capture, (str, list, tuple)) or callable(capture)):
        raise BadType(f"capture must be a probe name or glob, a list of them or a callable name -> bool; "
                      f"got {capture!r} ({type(capture).__name__})")
    if edits is not None:
        if not isinstance(edits, Mapping):
            raise BadType(f"edits must be a dict {{probe name or glob: edit}}, e.g. "
                          f"{{'layers.0.deltanet.beta': 0.0}}; got {type(edits).__name__}")
        for key, spec in edits.items():
            if not isinstance(key, str):
                raise BadType(f"edit keys are probe names or globs (str), got {key!r}")
            _check_edit_value(key, spec)
    device = check_device(device, name="capture device")
    if dtype is not None:
        dtype = check_dtype(dtype, name="capture dtype")
    check_int("chunk_size", chunk_size, lo=1)
    if budget_bytes is not None:
        check_float("budget_bytes", budget_bytes, lo=0, lo_open=True)
    return device, dtype


def _check_edit_value(key: str, spec) -> None:
    """An edit's numbers must be finite (a NaN edit would poison the logits without a word)."""
    if isinstance(spec, bool):
        raise BadType(f"the edit for {key!r} is {spec!r}; give a number, a tensor, a function or an Edit")
    if isinstance(spec, (int, float)):
        check_float(f"the edit value for {key!r}", spec)
    elif torch.is_tensor(spec):
        check_finite(f"the edit tensor for {key!r}", spec)
    elif isinstance(spec, _inst.Edit):
        if spec.factor is not None:
            check_float(f"the scale factor for {key!r}", spec.factor)
        if torch.is_tensor(spec.value):
            check_finite(f"the edit tensor for {key!r}", spec.value)
        elif spec.value is not None:
            check_float(f"the edit value for {key!r}", spec.value)
        if spec.donor is not None and not isinstance(spec.donor, _inst.Trace):
            raise BadType(f"patch() takes a Trace (from lab.run(..., capture=...)), got {type(spec.donor).__name__}")
        if spec.donor is not None:
            _check_donor(key, spec)
        if spec.donor_positions is not None and spec.positions is not None:
            n_to, n_from = _count(spec.positions), _count(spec.donor_positions)
            if n_to is not None and n_from is not None and n_to != n_from:
                raise BadValue(f"patch for {key!r}: positions has {n_to} entries but donor_positions has {n_from}; "
                               "give one donor position per patched position")


def _check_donor(key: str, spec) -> None:
    """A patch takes the same kind of probe from a trace that holds it at the donor positions."""
    source = spec.donor_name or key
    if spec.donor_name is not None and not any(c in key for c in "*?["):
        if _inst.parse(source)[1] != _inst.parse(key)[1]:
            raise BadValue(f"cannot patch {key!r} from {source!r}: a patch takes the same kind of probe "
                           f"({_inst.parse(key)[1]!r}) from the donor trace")
    if any(c in source for c in "*?["):
        return  # each name a glob selects is checked when the edit runs
    kind = _inst.parse(source)[1]
    held = spec.donor.names
    if kind == "deltanet.state":
        if source not in held:
            raise BadValue(f"the donor trace did not capture {source!r}; it holds {held or 'nothing'}")
        return
    if source not in held:
        raise BadValue(f"the donor trace did not capture {source!r}; capture it in the donor run "
                       f"(it holds {held or 'nothing'})")
    if spec.donor_positions is not None or spec.positions is not None:
        wanted = spec.donor_positions if spec.donor_positions is not None else spec.positions
        if isinstance(wanted, list):
            try:
                have = spec.donor.positions(source)
            except InputError:
                return
            missing = [p for p in wanted if p not in have]
            if missing:
                raise BadIndex(f"the donor trace holds {source!r} at positions {have[0]}..{have[-1]}, "
                               f"not at {missing[:5]}")


def _count(selection) -> int | None:
    if isinstance(selection, int):
        return 1
    return len(selection) if isinstance(selection, (list, tuple, range)) else None


def _check_heads(config, names: list[str], heads) -> None:
    """``heads`` against the head count of every selected probe that has heads."""
    if heads is None:
        return
    counts = _inst.head_counts(config)
    for name in names:
        n = counts.get(_inst.parse(name)[1])
        if n is not None:
            check_indices("heads", heads, n, what=f"probe {name!r} has {n} heads")


def _check_edit_selections(edits: dict, B: int, T: int, config) -> None:
    """Every edit's own positions / heads / batch against the real input: an edit that selects
    nothing (a position past the prompt) is an error, not a silent no-op."""
    for name, e in edits.items():
        check_indices(f"positions of the edit on {name!r}", e.positions, T, what=f"the input has {T} tokens")
        check_indices(f"batch of the edit on {name!r}", e.batch, B, what=f"the batch has {B} sequences")
        _check_heads(config, [name], e.heads)


def _positions_list(positions, length: int) -> list[int]:
    from .instrument.probes import as_index_list

    return as_index_list(positions, length, "positions")


def _eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


