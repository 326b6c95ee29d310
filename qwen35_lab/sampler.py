"""The sampler, as vLLM does it on Hugging Face ``generate``: the model cards' presets, parameter
checks, the exact logits transforms and processors, single generations with their metrics.

This is the lower layer of :mod:`qwen35_lab.sampling` (which adds sweeps and their plots and
re-exports everything here); the HTTP backend and the sweep engine build on it, so it imports
neither. See :mod:`qwen35_lab.sampling` for the order vLLM applies the transforms in.
"""

from __future__ import annotations

import difflib
import itertools
import math
import numbers
from dataclasses import asdict, dataclass, fields

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TextStreamer

from . import chat_format
from .checks import BadType, BadValue

__all__ = [
    "PARAMETERS",
    "PRESETS",
    "STAGES",
    "Preset",
    "Sample",
    "SamplingParams",
    "apply_min_p",
    "apply_penalties",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "distinct_n",
    "generation_kwargs",
    "get_preset",
    "logits_processors",
    "process",
    "repeated_tokens",
    "repetition_rate",
    "resolve",
    "sample",
    "stages",
]

#: The sampling parameters, in the order vLLM applies them (penalties first).
PARAMETERS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
              "repetition_penalty")

#: Processing steps whose next-token distribution ``stages`` returns, in order.
STAGES = ("raw", "penalties", "temperature", "min_p", "top_k", "top_p")

_VLLM_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "presence_penalty": 0.0,
                  "frequency_penalty": 0.0, "repetition_penalty": 1.0}
_RANGES = {  # name: (low, high, low inclusive, high inclusive, how it is written)
    "temperature": (0.0, 2.0, True, True, "[0, 2] (0 = greedy)"),
    "top_p": (0.0, 1.0, False, True, "(0, 1]"),
    "min_p": (0.0, 1.0, True, True, "[0, 1]"),
    "presence_penalty": (-2.0, 2.0, True, True, "[-2, 2]"),
    "frequency_penalty": (-2.0, 2.0, True, True, "[-2, 2]"),
    "repetition_penalty": (0.0, math.inf, False, True, "> 0 (1 = off)"),
}


# ============================================================================ parameters

@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling parameters with vLLM's meaning (see the module docstring).

    Raises ``ValueError`` naming the value and its valid range: temperature in [0, 2], top_p in
    (0, 1], top_k >= -1 (0 and -1 turn it off), min_p in [0, 1], presence and frequency penalties
    in [-2, 2], repetition_penalty > 0.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        for name, (low, high, low_in, high_in, text) in _RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise BadType(f"{name} must be a number in {text}, got {value!r}")
            value = float(value)
            ok = (value >= low if low_in else value > low) and (value <= high if high_in else value < high)
            if not ok or math.isnan(value):
                raise BadValue(f"{name}={value!r} is out of range; valid: {text}")
            object.__setattr__(self, name, value)
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) and not (isinstance(k, float) and k.is_integer()):
            raise BadType(f"top_k must be an integer >= -1 (0 or -1 = off), got {k!r}")
        if k < -1:
            raise BadValue(f"top_k={k!r} is out of range; valid: an integer >= -1 (0 or -1 = off)")
        object.__setattr__(self, "top_k", int(k))

    @property
    def greedy(self) -> bool:
        """True when the temperature is 0: the argmax of the penalised logits."""
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Preset:
    """A sampling preset of the model cards, with the thinking mode it is meant for."""

    name: str
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    presence_penalty: float
    repetition_penalty: float
    enable_thinking: bool
    description: str

    @property
    def params(self) -> SamplingParams:
        return SamplingParams(**{f.name: getattr(self, f.name) for f in fields(SamplingParams)
                                 if f.name != "frequency_penalty"})

    def as_dict(self) -> dict:
        """The six card values and ``enable_thinking``."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                "presence_penalty": self.presence_penalty, "repetition_penalty": self.repetition_penalty,
                "enable_thinking": self.enable_thinking}


def _preset(name, t, p, k, m, pres, rep, thinking, description) -> tuple[str, Preset]:
    return name, Preset(name, t, p, k, m, pres, rep, thinking, description)


#: The sampling presets of the Qwen3.5 (9B and 0.8B) and Qwen3.6 (27B) model cards.
PRESETS: dict[str, Preset] = dict([
    _preset("qwen3.5-thinking-general", 1.0, 0.95, 20, 0.0, 1.5, 1.0, True,
            "Qwen3.5, thinking mode, general tasks (also the 0.8B card's thinking text preset)"),
    _preset("qwen3.5-thinking-precise-coding", 0.6, 0.95, 20, 0.0, 0.0, 1.0, True,
            "Qwen3.5, thinking mode, precise coding such as WebDev (0.8B card: also thinking VL)"),
    _preset("qwen3.5-instruct-general", 0.7, 0.8, 20, 0.0, 1.5, 1.0, False,
            "Qwen3.5, instruct (non-thinking) mode, general tasks"),
    _preset("qwen3.5-instruct-reasoning", 1.0, 1.0, 40, 0.0, 2.0, 1.0, False,
            "Qwen3.5, instruct (non-thinking) mode, reasoning tasks"),
    _preset("qwen3.5-0.8b-instruct-text", 1.0, 1.0, 20, 0.0, 2.0, 1.0, False,
            "Qwen3.5-0.8B card, non-thinking mode, text tasks"),
    _preset("qwen3.5-0.8b-instruct-vl", 0.7, 0.8, 20, 0.0, 1.5, 1.0, False,
            "Qwen3.5-0.8B card, non-thinking mode, vision-language tasks"),
    _preset("qwen3.6-thinking-general", 1.0, 0.95, 20, 0.0, 0.0, 1.0, True,
            "Qwen3.6, thinking mode, general tasks"),
    _preset("qwen3.6-thinking-precise-coding", 0.6, 0.95, 20, 0.0, 0.0, 1.0, True,
            "Qwen3.6, thinking mode, precise coding such as WebDev"),
    _preset("qwen3.6-instruct", 0.7, 0.8, 20, 0.0, 1.5, 1.0, False,
            "Qwen3.6, instruct (non-thinking) mode"),
])


def get_preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name raises ``ValueError`` with the closest names."""
    if isinstance(name, Preset):
        return name
    if not isinstance(name, str):
        raise BadType(f"preset must be a preset name (str), got {type(name).__name__}")
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise BadValue(f"unknown preset {name!r}{hint} Presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def _checkpoint_defaults(model) -> dict:
    """Sampling defaults from a model's generation config, as vLLM's ``--generation-config auto``."""
    config = getattr(model, "generation_config", None)
    found = {}
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        value = getattr(config, name, None) if config is not None else None
        if value is not None:
            found[name] = value
    return found


def resolve(sampling: dict, *, defaults: dict | None = None) -> tuple[SamplingParams, bool | None, int | None]:
    """``(params, enable_thinking, seed)`` from user arguments: defaults < preset < explicit values.

    ``sampling`` holds any of ``PARAMETERS``, ``preset``, ``seed``, ``do_sample`` (False = greedy)
    and ``enable_thinking``. Everything is checked before anything runs.
    """
    if not isinstance(sampling, dict):
        raise BadType(f"sampling arguments must be a dict, got {type(sampling).__name__}")
    valid = set(PARAMETERS) | {"preset", "seed", "do_sample", "enable_thinking"}
    unknown = set(sampling) - valid
    if unknown:
        hints = [f"{u!r} (did you mean {difflib.get_close_matches(u, valid, n=1)[0]!r}?)"
                 if difflib.get_close_matches(u, valid, n=1) else repr(u) for u in sorted(unknown)]
        raise BadType(f"unknown sampling argument(s) {', '.join(hints)}; valid: {', '.join(sorted(valid))}")
    merged = {**_VLLM_DEFAULTS, **(defaults or {})}
    enable_thinking = None
    if sampling.get("preset") is not None:
        preset = get_preset(sampling["preset"])
        merged.update(preset.params.as_dict())
        enable_thinking = preset.enable_thinking
    merged.update({k: v for k, v in sampling.items() if k in PARAMETERS})
    do_sample = sampling.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise BadType(f"do_sample must be True, False or None, got {do_sample!r}")
    if do_sample is False:
        merged["temperature"] = 0.0
    params = SamplingParams(**merged)
    if do_sample is True and params.greedy:
        raise BadValue("do_sample=True with temperature=0 asks for sampling and greedy decoding at once; "
                         "give a temperature in (0, 2] or drop do_sample")
    if sampling.get("enable_thinking") is not None:
        enable_thinking = sampling["enable_thinking"]
        if not isinstance(enable_thinking, bool):
            raise BadType(f"enable_thinking must be True, False or None, got {enable_thinking!r}")
    seed = sampling.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
        raise BadValue(f"seed must be a non-negative integer or None, got {seed!r}")
    return params, enable_thinking, seed


# ============================================================================ the sampler, as functions

def _counts(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[B, V]`` occurrence counts of the token ids ``[B, N]`` (ids outside [0, V) are ignored)."""
    counts = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.long, device=ids.device)
    if ids.numel():
        ids = ids.long()
        ids = torch.where((ids < 0) | (ids >= vocab_size), vocab_size, ids)  # into the spare last column
        counts.scatter_add_(1, ids, torch.ones_like(ids))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, prompt_ids: torch.Tensor | None, output_ids: torch.Tensor | None, *,
                    presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                    repetition_penalty: float = 1.0) -> torch.Tensor:
    """vLLM's penalties on ``logits [B, V]`` (a new tensor).

    ``prompt_ids [B, T]`` and ``output_ids [B, N]``: the repetition penalty covers both, the
    frequency and presence penalties the generated ``output_ids`` only.
    """
    B, V = logits.shape
    empty = torch.empty(B, 0, dtype=torch.long, device=logits.device)
    prompt_ids = empty if prompt_ids is None else prompt_ids.to(logits.device)
    output_ids = empty if output_ids is None else output_ids.to(logits.device)
    out_counts = _counts(output_ids, V)  # [B, V]
    logits = logits.clone()
    if repetition_penalty != 1.0:
        seen = (_counts(prompt_ids, V) > 0) | (out_counts > 0)
        scaled = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, scaled, logits)
    if frequency_penalty:
        logits = logits - frequency_penalty * out_counts.to(logits.dtype)
    if presence_penalty:
        logits = logits - presence_penalty * (out_counts > 0).to(logits.dtype)
    return logits


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / T``; ``T = 0`` keeps only the argmax (greedy): every other logit becomes -inf."""
    if temperature == 0:
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.argmax(-1, keepdim=True), True)
        return logits.masked_fill(~keep, -math.inf)
    return logits / temperature


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens with probability below ``min_p * max_prob`` (probabilities of ``logits [B, V]``)."""
    if min_p == 0:
        return logits
    probs = logits.float().softmax(-1)
    return logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), -math.inf)


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the tokens whose logit is at least the k-th largest (ties stay); 0 or -1: unchanged."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = logits.topk(top_k, dim=-1).values[..., -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, -math.inf)


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose total probability reaches ``top_p``.

    As vLLM: sort ascending, drop the tokens whose cumulative probability is ``<= 1 - top_p``;
    the most likely token always stays.
    """
    if top_p >= 1.0:
        return logits
    n_finite = int(torch.isfinite(logits).sum(-1).max())
    if 0 < n_finite < logits.shape[-1] // 2:  # after top_k / min_p: sort only the candidates left
        values, index = logits.topk(n_finite, dim=-1)  # [B, n], descending
        sorted_logits, order = values.flip(-1), index.flip(-1)
    else:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
    cumulative = sorted_logits.float().softmax(-1).cumsum(-1)
    drop = cumulative <= 1 - top_p
    drop[..., -1] = False
    removed = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, drop)
    return logits.masked_fill(removed, -math.inf)


def stages(logits: torch.Tensor, params: SamplingParams, *, prompt_ids=None, output_ids=None) -> dict:
    """The logits after each step, ``{stage: [B, V]}`` for ``STAGES`` (raw → … → top_p).

    With temperature 0 the "temperature" stage keeps only the argmax (greedy), and the later
    stages leave it so.
    """
    out = {"raw": logits}
    x = apply_penalties(logits, prompt_ids, output_ids, presence_penalty=params.presence_penalty,
                        frequency_penalty=params.frequency_penalty, repetition_penalty=params.repetition_penalty)
    out["penalties"] = x
    out["temperature"] = x = apply_temperature(x, params.temperature)
    out["min_p"] = x = apply_min_p(x, params.min_p)
    out["top_k"] = x = apply_top_k(x, params.top_k)
    out["top_p"] = apply_top_p(x, params.top_p)
    return out


def process(logits: torch.Tensor, params: SamplingParams, *, prompt_ids=None, output_ids=None) -> torch.Tensor:
    """The logits ``[B, V]`` the next token is drawn from (softmax, then one multinomial draw)."""
    return stages(logits, params, prompt_ids=prompt_ids, output_ids=output_ids)["top_p"]


# ============================================================================ as HF logits processors

class ScoresProcessor(LogitsProcessor):
    """One of vLLM's per-step transforms as an HF logits processor: ``apply(scores, value)``.

    Every transform has this one shape; the subclasses below only name the function and the value.
    """

    @staticmethod
    def apply(scores: torch.Tensor, value) -> torch.Tensor:  # the identity: a subclass names its transform
        return scores

    def __init__(self, value):
        self.value = value

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return type(self).apply(scores, self.value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.value!r})"


class TemperatureProcessor(ScoresProcessor):
    """``scores / temperature`` (temperature > 0; 0 is greedy decoding, which needs no processor)."""

    apply = staticmethod(apply_temperature)


class MinPProcessor(ScoresProcessor):
    """Drop tokens below ``min_p`` times the top probability."""

    apply = staticmethod(apply_min_p)


class TopKProcessor(ScoresProcessor):
    """Keep the k most likely tokens (ties at the k-th stay)."""

    apply = staticmethod(apply_top_k)


class TopPProcessor(ScoresProcessor):
    """Keep the smallest most-likely set reaching probability ``top_p``."""

    apply = staticmethod(apply_top_p)


class PenaltiesProcessor(ScoresProcessor):
    """Repetition (prompt + output), frequency and presence (output only) penalties, as vLLM.

    ``prompt_len``: the number of prompt tokens at the start of the ``input_ids`` HF passes in;
    the tokens after them are the generated ones. The one transform that also reads the ids.
    """

    def __init__(self, prompt_len: int, *, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0):
        super().__init__({"presence_penalty": presence_penalty, "frequency_penalty": frequency_penalty,
                          "repetition_penalty": repetition_penalty})
        self.prompt_len = int(prompt_len)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] < self.prompt_len:
            raise BadValue(f"PenaltiesProcessor was made for a {self.prompt_len}-token prompt but got "
                           f"{input_ids.shape[1]} tokens; build the processors for this prompt")
        return apply_penalties(scores, input_ids[:, :self.prompt_len], input_ids[:, self.prompt_len:], **self.value)


def logits_processors(params: SamplingParams, prompt_len: int) -> LogitsProcessorList:
    """The processors for ``params``, in vLLM's order, leaving out the ones that change nothing.

    Greedy (temperature 0) needs the penalties only: the argmax is the greedy choice.
    """
    procs = LogitsProcessorList()
    if params.has_penalties:
        procs.append(PenaltiesProcessor(prompt_len, presence_penalty=params.presence_penalty,
                                        frequency_penalty=params.frequency_penalty,
                                        repetition_penalty=params.repetition_penalty))
    if params.greedy:
        return procs
    if params.temperature != 1.0:
        procs.append(TemperatureProcessor(params.temperature))
    if params.min_p > 0:
        procs.append(MinPProcessor(params.min_p))
    if params.top_k > 0:
        procs.append(TopKProcessor(params.top_k))
    if params.top_p < 1.0:
        procs.append(TopPProcessor(params.top_p))
    return procs


# HF generate's own warpers and penalties, switched off so nothing is applied twice.
_HF_OFF = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h",
           "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size")


def _eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def generation_kwargs(lab, sampling: dict, *, prompt_ids: torch.Tensor | None = None) -> dict:
    """Keyword arguments for HF ``generate`` that sample exactly as vLLM would.

    ``sampling``: any of ``temperature, top_p, top_k, min_p, presence_penalty, frequency_penalty,
    repetition_penalty``, ``preset=NAME``, ``seed`` (seeds torch's generator now, which
    ``generate`` draws from) and ``do_sample`` (False = greedy). ``prompt_ids [B, T]``: the prompt,
    for the penalties. Returns ``do_sample``, a ``logits_processor`` list that does all the
    processing, HF's own warpers switched off, and ``pad_token_id`` when the model has none.
    """
    params, _, seed = resolve(sampling, defaults=_checkpoint_defaults(lab.model))
    if prompt_ids is None and params.has_penalties:
        raise BadValue("the penalties need the prompt: pass prompt_ids= (the [B, T] prompt token ids)")
    prompt_len = 0 if prompt_ids is None else int(prompt_ids.shape[-1])
    kw = {name: None for name in _HF_OFF}
    kw.update(do_sample=not params.greedy, logits_processor=logits_processors(params, prompt_len))
    if lab.model.generation_config.pad_token_id is None and _eos_ids(lab.model):
        kw["pad_token_id"] = _eos_ids(lab.model)[0]
    if seed is not None:
        torch.manual_seed(seed)
    return kw


# ============================================================================ one sample, with its measures

def distinct_n(ids, n: int) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / n-grams of a token sequence (1.0 when empty)."""
    ids = list(ids)
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def repetition_rate(ids, n: int = 4) -> float:
    """seq-rep-n (Welleck et al. 2019): 1 - unique n-grams / n-grams; 0 = no n-gram repeats."""
    return 1.0 - distinct_n(ids, n)


def repeated_tokens(ids) -> int:
    """How many tokens of the sequence already appeared earlier in it (what presence_penalty punishes)."""
    seen, repeats = set(), 0
    for t in ids:
        repeats += t in seen
        seen.add(t)
    return repeats


class _EntropyRecorder(LogitsProcessor):
    """Records the entropy (nats) of ``softmax(scores)`` at each step and changes nothing."""

    def __init__(self):
        self.values: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.values.append(torch.special.entr(scores.float().softmax(-1)).sum(-1).cpu())  # [B]
        return scores

    def mean(self) -> float:
        return float(torch.stack(self.values).mean()) if self.values else float("nan")


class _CallbackStreamer(TextStreamer):
    """Sends each finished piece of generated text to ``callback(text)``."""

    def __init__(self, tokenizer, callback):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=False)
        self.callback = callback

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if text:
            self.callback(text)


@dataclass
class Sample:
    """One generation with its measures (what a sweep row holds)."""

    text: str  # the generated text, special tokens kept
    ids: list  # generated token ids
    prompt_tokens: int
    reasoning: str | None
    answer: str
    finished: bool  # ended on an end-of-turn token (not max_new_tokens)
    finished_thinking: bool
    reasoning_tokens: int
    entropy: float  # mean entropy (nats) of the distribution each token was drawn from (greedy: 0)
    entropy_raw: float  # mean entropy of the model's own next-token distribution
    params: SamplingParams
    enable_thinking: bool | None

    def metrics(self, *, loop_threshold: float = 0.3) -> dict:
        """distinct-1/2, seq-rep-4, repeated tokens and the thinking-loop flag over the generated tokens."""
        ids = self._content_ids()
        rate = repetition_rate(ids, 4)
        return {"distinct_1": distinct_n(ids, 1), "distinct_2": distinct_n(ids, 2), "repetition_rate": rate,
                "repeated_tokens": repeated_tokens(ids),
                "thinking_loop": bool(self.reasoning is not None and not self.finished_thinking
                                      and not self.finished and rate >= loop_threshold)}

    def _content_ids(self) -> list:
        return self.ids[:-1] if self.finished and self.ids else list(self.ids)


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise BadValue(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _model_inputs(lab, prompt, *, chat: bool, enable_thinking):
    if isinstance(prompt, str):
        if not prompt:
            raise BadValue("the prompt is empty")
        return lab.prepare([{"role": "user", "content": prompt}] if chat else prompt, enable_thinking=enable_thinking)
    if isinstance(prompt, list):
        return lab.prepare(prompt, enable_thinking=enable_thinking)
    raise BadType(f"a prompt must be a str or a list of chat messages, got {type(prompt).__name__}")


def sample(lab, prompt, *, max_new_tokens: int = 64, seed: int | None = None, chat: bool = True,
           streamer=None, on_text=None, **sampling) -> Sample:
    """Generate once from ``prompt`` (a user message, chat messages, or raw text with ``chat=False``).

    ``sampling``: as :func:`generation_kwargs`, plus ``enable_thinking`` (default: the preset's,
    else the chat template's). ``on_text(piece)`` receives the text as it is generated.
    """
    max_new_tokens = _check_positive_int("max_new_tokens", max_new_tokens)
    params, enable_thinking, _ = resolve({**sampling, "seed": seed}, defaults=_checkpoint_defaults(lab.model))
    inputs = _model_inputs(lab, prompt, chat=chat, enable_thinking=enable_thinking)
    prompt_ids = inputs["input_ids"]  # [1, T]
    if prompt_ids.shape[0] != 1:
        raise BadValue(f"sample() takes one prompt at a time, got a batch of {prompt_ids.shape[0]}")
    kw = generation_kwargs(lab, {**{k: v for k, v in sampling.items() if k != "enable_thinking"}, "seed": seed},
                           prompt_ids=prompt_ids)
    raw, final = _EntropyRecorder(), _EntropyRecorder()
    kw["logits_processor"] = LogitsProcessorList([raw, *kw["logits_processor"], final])
    if on_text is not None:
        streamer = _CallbackStreamer(lab.tokenizer, on_text)
    with torch.no_grad():
        out = lab.model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer, **kw)
    ids = out[0, prompt_ids.shape[1]:].tolist()
    eos = set(_eos_ids(lab.model))
    finished = bool(ids) and ids[-1] in eos
    text = lab.tokenizer.decode(ids, skip_special_tokens=False)
    clean = text
    for end in ("<|im_end|>", "<|endoftext|>"):
        clean = clean.split(end)[0]
    opened = lab.tokenizer.decode(prompt_ids[0, -3:].tolist(), skip_special_tokens=False).endswith("<think>\n")
    parsed = chat_format.parse_output(clean, prompt_opened_think=opened)
    think_end = lab.tokenizer.convert_tokens_to_ids("</think>")
    if parsed.reasoning is None:
        reasoning_tokens = 0
    elif think_end in ids:
        reasoning_tokens = ids.index(think_end)
    else:
        reasoning_tokens = len(ids) - int(finished)
    return Sample(text=text, ids=ids, prompt_tokens=int(prompt_ids.shape[1]), reasoning=parsed.reasoning,
                  answer=parsed.answer, finished=finished, finished_thinking=parsed.finished_thinking,
                  reasoning_tokens=reasoning_tokens, entropy=0.0 if params.greedy else final.mean(),
                  entropy_raw=raw.mean(), params=params,
                  enable_thinking=enable_thinking)


# ============================================================================ sweeps

_GRID_KEYS = set(PARAMETERS) | {"enable_thinking"}


def _settings(grid, presets) -> list[dict]:
    """Every combination: each preset (or none) as the base, the grid's values on top."""
    if grid is None and presets is None:
        raise BadValue("give grid={'temperature': [0.5, 1.0], ...} and/or presets=[...] to sweep over")
    if grid is not None:
        if not isinstance(grid, dict):
            raise BadType(f"grid must be a dict {{parameter: [values]}}, got {type(grid).__name__}")
        if not grid:
            raise BadValue(f"the grid is empty; give at least one parameter with values, e.g. "
                             f"{{'temperature': [0.5, 1.0]}}. Parameters: {', '.join(sorted(_GRID_KEYS))}")
        for key, values in grid.items():
            if key not in _GRID_KEYS:
                close = difflib.get_close_matches(str(key), _GRID_KEYS, n=1)
                raise BadValue(f"unknown grid parameter {key!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                                 f"valid: {', '.join(sorted(_GRID_KEYS))}")
            if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
                raise BadType(f"grid[{key!r}] must be a list of values, got {values!r}")
            if not list(values):
                raise BadValue(f"grid[{key!r}] is empty; give at least one value")
    if presets is not None:
        if isinstance(presets, str) or not hasattr(presets, "__iter__"):
            raise BadType(f"presets must be a list of preset names, got {presets!r}")
        presets = list(presets)
        if not presets:
            raise BadValue(f"presets is empty; choose from {', '.join(PRESETS)}")
    bases = [{"preset": get_preset(p).name} for p in presets] if presets else [{}]
    keys = list(grid or {})
    combos = list(itertools.product(*[list(grid[k]) for k in keys])) if keys else [()]
    settings = [{**base, **dict(zip(keys, combo))} for base in bases for combo in combos]
    for s in settings:  # every setting is checked before the first generation
        resolve(s)
    return settings


def _row(setting: dict, params: SamplingParams, enable_thinking, prompt_index, prompt, sample_index, seed) -> dict:
    return {"prompt_index": prompt_index, "prompt": prompt if isinstance(prompt, str) else str(prompt),
            "preset": setting.get("preset"), **params.as_dict(), "enable_thinking": enable_thinking,
            "sample": sample_index, "seed": seed}
