"""``load()``: a model, its tokenizer and processor, from a hub id, a directory or an organism.

Real checkpoints go through ``from_pretrained`` exactly as users already load
them; organisms are saved in the same HF format and take the same path. Every
problem that can be seen before loading (unknown name, missing directory,
missing or corrupt weights, wrong model type, unavailable dtype or device, not
enough memory) is reported before any weight is read, with the value and what
would be valid.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path

import torch

from . import configs, organisms
from .checkpoint_files import check_safetensors, read_config
from .checks import (BadType, BadValue, MissingFile, OverBudget, check_bool, check_choice, check_device, check_dtype,
                     check_path)

__all__ = ["load", "resolve", "ModelSource"]

# dense and Mixture-of-Experts (qwen3_5_moe: 35B-A3B, 122B-A10B, 397B-A17B, 3.6-35B-A3B), multimodal or text-only
SUPPORTED_MODEL_TYPES = ("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text")
TEXT_ONLY_MODEL_TYPES = ("qwen3_5_text", "qwen3_5_moe_text")


class ModelSource:
    """Where a model comes from: ``kind`` is ``"organism"``, ``"local"`` or ``"hub"``."""

    def __init__(self, kind: str, location: str, name: str, spec: configs.ModelSpec | None = None):
        self.kind, self.location, self.name, self.spec = kind, location, name, spec

    def __repr__(self) -> str:
        return f"ModelSource({self.kind!r}, {self.location!r})"


def resolve(name_or_path: str | os.PathLike) -> ModelSource:
    """Decide what ``name_or_path`` names, or raise a clear error."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise BadType(f"load() takes a model name or path as a string, got {type(name_or_path).__name__}")
    text = os.fspath(name_or_path)
    if not text.strip():
        raise BadValue("load() needs a model name or path; got an empty string")
    if text in organisms.available():
        path = organisms.organisms_dir() / text
        return ModelSource("organism", str(path), text)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BadValue(f"{text!r} is a file; load() takes a checkpoint directory (with config.json and *.safetensors)")
        spec = configs.resolve_known(path.name)
        return ModelSource("local", str(path.resolve()), path.name, spec)
    looks_like_path = text.startswith((".", "/", "~")) or os.sep in text.strip("/").split("/", 1)[-1] or text.count("/") > 1
    if looks_like_path:
        raise MissingFile(f"no directory {text!r}; pass an existing checkpoint directory, a hub id such as "
                                f"'Qwen/Qwen3.5-0.8B', or an organism name ({', '.join(organisms.available()) or 'none built'})")
    spec = configs.resolve_known(text)
    if spec is not None:
        return ModelSource("hub", spec.hub_id, spec.name, spec)
    if "/" in text:  # some other hub repository, e.g. a fine-tune of Qwen3.5
        return ModelSource("hub", text, text.split("/")[-1])
    choices = organisms.available() + list(configs.KNOWN_MODELS)
    close = difflib.get_close_matches(text, choices, n=3, cutoff=0.4)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise BadValue(
        f"unknown model {text!r}.{hint} Valid: an organism ({', '.join(organisms.available()) or 'none built'}), "
        f"a known model ({', '.join(configs.KNOWN_MODELS)}), a hub id 'org/name', or a local directory."
    )


def _check_local_checkpoint(path: Path) -> dict:
    """Validate a checkpoint directory without loading it; return its config dict."""
    config = read_config(path)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BadValue(f"{str(path)!r} holds a model of type {model_type!r}; qwen35_lab loads "
                         f"model_type {' or '.join(map(repr, SUPPORTED_MODEL_TYPES))} (Qwen3.5 / Qwen3.6, dense and "
                         "Mixture-of-Experts)")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise MissingFile(f"{str(path)!r} has a config.json but no *.safetensors weights; "
                                "download the weights into it or point load() at the full checkpoint")
    for f in weights:
        check_safetensors(f)
    return config


def free_memory_bytes(device: str) -> int:
    """Free memory where the weights would go: all visible GPUs for 'auto'/'cuda', else RAM."""
    import psutil

    if device != "cpu" and torch.cuda.is_available():
        if device == "auto":
            return sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return psutil.virtual_memory().available


def _fmt_gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def load(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    text_only: bool = False,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
    check_memory: bool = True,
    rope: dict | None = None,
    attn_implementation: str | None = None,
    strict: bool = True,
):
    """Load a Qwen3.5 / Qwen3.6 model and return a :class:`~qwen35_lab.Lab`.

    Args:
        name_or_path: an organism (``"tiny"``), a known model (``"Qwen3.5-0.8B"``),
            a hub id (``"Qwen/Qwen3.5-9B"``) or a local checkpoint directory.
        dtype: ``"auto"`` (the checkpoint's; float32 for organisms on a CPU), ``"bfloat16"``,
            ``"float16"`` or ``"float32"``.
        device: ``"auto"`` spreads the model over the visible GPUs with accelerate's
            ``device_map="auto"`` and offloads to CPU / disk what does not fit
            (CPU only when there is no GPU); or ``"cpu"``, ``"cuda"``, ``"cuda:1"``.
        text_only: load the language model alone (``Qwen3_5ForCausalLM``, vision
            weights skipped), like the cards' ``--language-model-only``.
        max_memory, offload_folder: passed to accelerate (e.g. ``{"cpu": "2GB"}``)
            to cap what goes where; the rest is offloaded to ``offload_folder``.
        check_memory: refuse, with the numbers, a known model that will not fit.
        rope: a ``rope_parameters`` dict (e.g. from ``yarn_for_context``) applied
            to ``text_config`` before loading.
        strict: refuse a checkpoint whose weights do not cover the model exactly (missing,
            unexpected or mis-shaped tensors, named in the error): such a model would run with
            randomly initialised weights. ``strict=False`` loads it anyway and warns with the list.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from .lab import Lab
    from .tokenizer import get_tokenizer

    source = resolve(name_or_path)
    torch_dtype = check_dtype(dtype, allow_auto=True)
    device = check_device(device, allow_auto=True)
    check_bool("text_only", text_only)
    check_bool("check_memory", check_memory)
    check_bool("strict", strict)
    _check_max_memory(max_memory)
    if offload_folder is not None:
        check_path("offload_folder", offload_folder)
    if rope is not None and not isinstance(rope, dict):
        raise BadType(f"rope must be a rope_parameters dict (e.g. ql.longctx.yarn_for_context(...)) or None, "
                      f"got {rope!r}")
    if attn_implementation is not None:
        check_choice("attn_implementation", attn_implementation, ("eager", "sdpa", "flash_attention_2"))

    meta: dict = {}
    n_params = None
    if source.kind in ("organism", "local"):
        path = Path(source.location)
        raw = _check_local_checkpoint(path)
        n_params = sum(check_safetensors(f) for f in sorted(path.glob("*.safetensors")))
        if (path / "qwen35_lab.json").is_file():
            meta = json.loads((path / "qwen35_lab.json").read_text())
        if raw.get("model_type") in TEXT_ONLY_MODEL_TYPES:
            text_only = True
    location = source.location
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if torch_dtype == "auto" and source.kind == "organism" and on_cpu:
        # Organisms are small; fp32 is exact and, on CPUs without bf16 matrix units, faster.
        torch_dtype = torch.float32

    # Memory check before reading any weights.
    if check_memory and max_memory is None:
        itemsize = (torch_dtype if torch_dtype != "auto" else torch.bfloat16).itemsize
        if source.spec is not None:
            need = configs.estimate_weight_bytes(source.spec.name, torch_dtype if torch_dtype != "auto" else torch.bfloat16, text_only)
        elif n_params is not None:
            need = n_params * itemsize
        else:
            need = 0
        have = free_memory_bytes(device)
        offload_ok = device == "auto" and offload_folder is not None
        if need and need > 0.9 * have and not offload_ok:
            where = "RAM" if device == "cpu" or not torch.cuda.is_available() else "GPU memory"
            moe = ""
            if source.spec is not None and source.spec.is_moe:  # all experts are loaded; a token uses k of E
                w = configs.moe_weights(source.spec.name, torch_dtype if torch_dtype != "auto" else torch.bfloat16,
                                        text_only=text_only)
                moe = (f" (all {w['num_experts']} experts per layer: {_fmt_gb(w['expert_bytes'])} of routed experts; "
                       f"a token uses {_fmt_gb(w['active_bytes'])}; with the experts offloaded to CPU/disk about "
                       f"{_fmt_gb(w['resident_bytes'])} stays resident)")
            raise OverBudget(
                f"{source.name} needs about {_fmt_gb(need)} for its weights"
                f"{' (text only)' if text_only else ''}{moe} but only {_fmt_gb(have)} of {where} is free. "
                f"Try text_only=True, dtype='bfloat16', device='auto' with offload_folder=..., "
                f"or pass check_memory=False to try anyway."
            )

    kwargs: dict = {"dtype": torch_dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if device == "auto":
        if torch.cuda.is_available() or max_memory is not None or offload_folder is not None:
            kwargs["device_map"] = "auto"
            if max_memory is not None:
                kwargs["max_memory"] = max_memory
            if offload_folder is not None:
                kwargs["offload_folder"] = str(offload_folder)
    else:
        kwargs["device_map"] = device if device != "cpu" else None

    if rope is not None:
        from transformers import AutoConfig

        from .longctx import apply_rope_to_config

        config = AutoConfig.from_pretrained(location)
        apply_rope_to_config(config, rope)
        kwargs["config"] = config.get_text_config() if text_only else config

    cls = AutoModelForCausalLM if text_only else AutoModelForImageTextToText
    # transformers reports what does not fit (rather than failing on the first mis-shaped tensor with
    # a generic message); _check_coverage then refuses it by name unless strict=False
    kwargs.update(output_loading_info=True, ignore_mismatched_sizes=True)
    try:
        model, info = cls.from_pretrained(location, **kwargs)
    except OSError as e:
        if source.kind != "hub":
            raise
        raise OSError(
            f"could not load {location!r} from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0]}). "
            f"If this machine is offline, download the checkpoint where you have network access "
            f"(`huggingface-cli download {location} --local-dir ./{location.split('/')[-1]}`), copy it here and call "
            f"load('./{location.split('/')[-1]}'), or set HF_HOME to a cache that holds it."
        ) from e
    _check_coverage(location, info, strict)
    model.eval()

    tokenizer, processor = _attach_tokenizer_and_processor(location, meta, source, text_only, get_tokenizer)
    variant = meta.get("chat_template") or _template_variant(source, model.config)
    attach_chat_template(variant, tokenizer, processor)
    return Lab(model=model, tokenizer=tokenizer, processor=processor, name=source.name,
               source=source, chat_variant=variant, meta=meta)


def _check_max_memory(max_memory) -> None:
    """accelerate's ``max_memory``: ``{device: bytes or "20GiB"}`` with devices 'cpu', GPU ints or 'disk'."""
    if max_memory is None:
        return
    if not isinstance(max_memory, dict) or not max_memory:
        raise BadType(f"max_memory must be a dict such as {{0: '20GiB', 'cpu': '60GiB'}}, got {max_memory!r}")
    for key, value in max_memory.items():
        if not (key in ("cpu", "disk", "mps") or (isinstance(key, int) and not isinstance(key, bool) and key >= 0)
                or (isinstance(key, str) and key.startswith("cuda:"))):
            raise BadValue(f"max_memory key {key!r} is not a device; valid: GPU indices 0, 1, …, 'cpu', 'disk'")
        ok = (isinstance(value, int) and not isinstance(value, bool) and value > 0) or (
            isinstance(value, str) and re.fullmatch(r"\s*\d+(\.\d+)?\s*([KMGT]i?B)\s*", value, re.I))
        if not ok:
            raise BadValue(f"max_memory[{key!r}] = {value!r} is not a size; give bytes (an int) or a string such "
                           "as '20GiB' / '500MB'")


def _check_coverage(location, info: dict, strict: bool) -> None:
    """Refuse (or, with ``strict=False``, warn about) weights that do not cover the model."""
    problems = {what: sorted(map(str, info.get(key) or [])) for what, key in
                (("missing", "missing_keys"), ("unexpected", "unexpected_keys"), ("mis-shaped", "mismatched_keys"))}
    problems = {k: v for k, v in problems.items() if v}
    if not problems:
        return
    listed = "; ".join(f"{what} ({len(keys)}): {', '.join(keys[:6])}{' …' if len(keys) > 6 else ''}"
                       for what, keys in problems.items())
    if strict:
        raise BadValue(f"the checkpoint {str(location)!r} does not cover the model its config describes — {listed}. "
                       "A model loaded from it would run with randomly initialised weights there. Check the "
                       "download and config.json (num_hidden_layers, sizes); pass strict=False to load it anyway.")
    import warnings

    warnings.warn(f"loaded {str(location)!r} with strict=False although its weights do not cover the model — "
                  f"{listed}", stacklevel=3)


def attach_chat_template(variant: str, *holders) -> None:
    """Give each tokenizer / processor that has no chat template ours (``variant``), so that
    ``apply_chat_template`` works as every Hugging Face user expects and equals ``Lab.render``.
    A checkpoint's own template (the official one) is kept."""
    from .chat_format import TEMPLATES

    for holder in holders:
        if holder is not None and not getattr(holder, "chat_template", None):
            holder.chat_template = TEMPLATES[variant]


def _template_variant(source: ModelSource, config) -> str:
    """The chat-template variant from the model's name, else from its config (size)."""
    from .chat_format import template_for

    try:
        return template_for(source.name)
    except ValueError:
        return template_for(config)


def _attach_tokenizer_and_processor(location, meta, source, text_only, get_tokenizer):
    """The checkpoint's own tokenizer files when present, else the real tokenizer built here."""
    from transformers import AutoImageProcessor, AutoTokenizer, AutoVideoProcessor, Qwen3VLProcessor

    path = Path(location)
    has_tokenizer_files = source.kind == "hub" or (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    if has_tokenizer_files and not meta.get("tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(location)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and type(backend.model).__name__ == "BPE" and tokenizer.vocab_size > 200_000:
            # transformers rebuilds the Qwen3.5 BPE from vocab + merges and drops ignore_merges;
            # without it the whole-word vocabulary entries unreachable by merges tokenize wrongly.
            backend.model.ignore_merges = True
    else:
        tokenizer = get_tokenizer()
    processor = None
    if not text_only:
        try:
            image_processor = AutoImageProcessor.from_pretrained(location)
            video_processor = AutoVideoProcessor.from_pretrained(location)
        except (OSError, ValueError):
            image_processor = video_processor = None
        if image_processor is not None:
            processor = Qwen3VLProcessor(image_processor=image_processor, video_processor=video_processor,
                                         tokenizer=tokenizer)
    return tokenizer, processor
