"""The trained organisms: task generators, evaluators, the committed checkpoints and their mechanisms.

Generators are checked by parsing their text back independently (the answer
to each query is the value paired with that key earlier; the passkey answer is
the word of the only needle). Evaluators are checked against an oracle model
(accuracy 1.0) and a random one (chance). The committed organisms are loaded
with ``qwen35_lab.load`` and measured on fresh data with seeds neither
training nor their cards used; the recall state readout is recomputed with
the toolkit's own state captures and compared with the number in the card.
"""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

import qwen35_lab as ql
from qwen35_lab.checks import BadValue
from qwen35_lab.organisms import TRAINABLE, organisms_dir, passkey, recall, tasks
from qwen35_lab.organisms.__main__ import main as cli

FRESH_SEED = 31337  # neither training (seed 0, eval 10_000_019) nor the cards (777) use it


# ------------------------------------------------------------------ generators
def parse_recall(text: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Independent parser: ``{key: value}`` of the pairs and the ``(query, answer)`` list."""
    words = text.split()
    cut = words.index("?")
    pairs = words[:cut]
    table = dict(zip(pairs[0::2], pairs[1::2]))
    after = words[cut + 1:]
    return table, list(zip(after[0::2], after[1::2]))


@pytest.mark.parametrize("num_pairs", [1, 2, 8, 64])
def test_recall_example_answers_are_the_paired_values(num_pairs):
    rng = random.Random(num_pairs)
    for _ in range(20):
        ex = tasks.recall_example(rng, num_pairs)
        words = ex.words
        assert len(words) == 4 * num_pairs + 1
        table, queries = parse_recall(ex.text)
        assert len(table) == num_pairs  # keys are distinct
        assert all(re.fullmatch(r"k\d+", k) and re.fullmatch(r"v\d+", v) for k, v in table.items())
        assert sorted(q for q, _ in queries) == sorted(table)  # every key asked once
        assert [a for _, a in queries] == ex.answers
        assert all(table[q] == a for q, a in queries)
        assert [words[p] for p in ex.answer_positions] == ex.answers
        assert all(words[p - 1] == q for p, (q, _) in zip(ex.answer_positions, queries))


def test_recall_values_repeat_and_keys_cover_the_vocabulary():
    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        table, _ = parse_recall(tasks.recall_example(rng, 8).text)
        seen |= set(table)
    assert seen == {f"k{i}" for i in range(tasks.RECALL_NUM_KEYS)}


@pytest.mark.parametrize("length", [0, 7, 256, 2048])
def test_passkey_example_format(length):
    rng = random.Random(length)
    filler_words = {w for s in tasks.FILLER_SENTENCES for w in s.split()}
    for _ in range(10):
        ex = tasks.passkey_example(rng, length)
        words = ex.words
        prompt, answer = words[:-1], words[-1]
        assert len(prompt) == length + 10
        assert prompt[-5:] == "what is the key ?".split()
        assert ex.answers == [answer] and ex.answer_positions == [len(words) - 1]
        assert answer in tasks.PASSKEY_WORDS
        needles = [i for i in range(len(prompt) - 3) if prompt[i:i + 3] == ["the", "key", "is"]]
        assert len(needles) == 1
        i = needles[0]
        assert prompt[i + 3] == answer and prompt[i + 4] == "."
        rest = prompt[:i] + prompt[i + 5:-5]
        assert len(rest) == length and set(rest) <= filler_words
        assert not set(rest) & set(tasks.PASSKEY_WORDS)


def test_passkey_depth_places_the_needle():
    rng = random.Random(0)
    assert tasks.passkey_example(rng, 100, depth=0.0).words[:3] == ["the", "key", "is"]
    end = tasks.passkey_example(rng, 100, depth=1.0).words
    assert end[-11:-8] == ["the", "key", "is"]


def test_tokenizer_reads_as_words_and_round_trips():
    for task in tasks.TASKS:
        tok = tasks.build_tokenizer(task)
        vocab = tasks.vocabulary(task)
        assert len(tok) == len(vocab) == len(set(vocab))
        ex = tasks.make_example(task, random.Random(1), 8 if task == "recall" else 40)
        ids = tok(ex.text)["input_ids"]
        assert ids == [vocab.index(w) for w in ex.words]
        assert tok.convert_ids_to_tokens(ids) == ex.words
        assert tok.decode(ids) == ex.text
        assert tok("zebra")["input_ids"] == [vocab.index("<unk>")]


def test_make_batch_labels_only_the_answers():
    tok = tasks.build_tokenizer("recall")
    ids, labels = tasks.make_batch("recall", tok, random.Random(3), 5, 4)
    assert ids.shape == labels.shape == (4, 21)
    assert (labels != -100).sum(1).tolist() == [5] * 4
    mask = labels != -100
    assert torch.equal(labels[mask], ids[mask])
    answer_words = {tok.convert_ids_to_tokens(int(i)) for i in ids[mask]}
    assert all(w.startswith("v") for w in answer_words)


# ------------------------------------------------------------------ evaluators
class _Out:
    def __init__(self, logits):
        self.logits = logits


class OracleModel(torch.nn.Module):
    """Predicts from the prompt alone by parsing it — never looks at a later token."""

    def __init__(self, task, tokenizer, random_predictions=False):
        super().__init__()
        self.task, self.tok, self.random = task, tokenizer, random_predictions
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, input_ids):
        B, T = input_ids.shape
        V = len(self.tok)
        if self.random:
            return _Out(torch.randn(B, T, V, generator=self.gen))
        logits = torch.zeros(B, T, V)
        vocab = self.tok.get_vocab()
        for b in range(B):
            words = self.tok.convert_ids_to_tokens(input_ids[b].tolist())
            for t in range(T):
                seen = words[: t + 1]
                if self.task == "recall" and "?" in seen[:-1]:
                    cut = seen.index("?")
                    table = dict(zip(seen[:cut:2], seen[1:cut:2]))
                    if seen[-1] in table:
                        logits[b, t, vocab[table[seen[-1]]]] = 1.0
                elif self.task == "passkey" and seen[-1] == "?":
                    i = max(j for j in range(len(seen) - 2) if seen[j:j + 2] == ["key", "is"])
                    logits[b, t, vocab[seen[i + 2]]] = 1.0
        return _Out(logits)


class FakeLab:
    def __init__(self, task, random_predictions=False):
        self.tokenizer = tasks.build_tokenizer(task)
        self.model = OracleModel(task, self.tokenizer, random_predictions)
        self.meta = {"task": task, "train_length": 8 if task == "recall" else 64}


@pytest.mark.parametrize("task,length", [("recall", 8), ("recall", 30), ("passkey", 64), ("passkey", 300)])
def test_evaluate_oracle_scores_one(task, length):
    result = tasks.evaluate(FakeLab(task), task, length=length, n=12, seed=5)
    assert result["accuracy"] == 1.0
    assert result["n"] == 12 and result["length"] == length
    assert result["answers"] == 12 * (length if task == "recall" else 1)


def test_evaluate_random_predictions_score_chance():
    recall_acc = tasks.evaluate(FakeLab("recall", True), "recall", length=16, n=100, seed=5)["accuracy"]
    passkey_acc = tasks.evaluate(FakeLab("passkey", True), "passkey", length=8, n=400, seed=5)["accuracy"]
    chance_recall = 1 / len(tasks.vocabulary("recall"))
    chance_passkey = 1 / len(tasks.vocabulary("passkey"))
    assert abs(recall_acc - chance_recall) < 0.01
    assert abs(passkey_acc - chance_passkey) < 0.03


def test_evaluate_uses_the_training_length_by_default():
    assert tasks.evaluate(FakeLab("recall"), "recall", n=2)["length"] == 8


@pytest.mark.parametrize("kwargs,error", [
    (dict(task="copy"), ValueError),
    (dict(task="passkey"), ValueError),  # the fake lab was trained on recall
    (dict(task="recall", length=0), ValueError),
    (dict(task="recall", length=65), ValueError),
    (dict(task="recall", length=8.0), TypeError),
    (dict(task="recall", n=0), ValueError),
    (dict(task="recall", seed="x"), TypeError),
])
def test_evaluate_rejects_bad_input(kwargs, error):
    with pytest.raises(error):
        tasks.evaluate(FakeLab("recall"), **kwargs)


def test_evaluate_rejects_a_model_without_the_vocabulary():
    lab = FakeLab("passkey")
    lab.meta = {}
    with pytest.raises(ValueError, match="vocabulary"):
        tasks.evaluate(lab, "recall", length=4, n=1)


def test_generators_reject_bad_input():
    rng = random.Random(0)
    with pytest.raises(ValueError, match="num_pairs"):
        tasks.recall_example(rng, 0)
    with pytest.raises(ValueError, match="num_pairs"):
        tasks.recall_example(rng, tasks.RECALL_NUM_KEYS + 1)
    with pytest.raises(ValueError, match="depth"):
        tasks.passkey_example(rng, 10, depth=1.5)
    with pytest.raises(TypeError, match="length"):
        tasks.passkey_example(rng, "10")
    with pytest.raises(ValueError, match="unknown task"):
        tasks.vocabulary("mqar")


# ------------------------------------------------------------------ the committed organisms
@pytest.fixture(scope="module")
def labs():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = ql.load(name, dtype="float32", device="cpu")
        return cache[name]
    return get


@pytest.mark.parametrize("name", TRAINABLE)
def test_organism_folder_is_complete_and_loads(name, labs):
    folder = organisms_dir() / name
    for f in ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json", "qwen35_lab.json", "README.md", "train_log.jsonl", "training_curve.png"]:
        assert (folder / f).is_file(), f
    assert (folder / "model.safetensors").stat().st_size < 5e6
    meta = json.loads((folder / "qwen35_lab.json").read_text())
    assert "tokenizer" not in meta
    assert meta["organism"] == name and meta["task"] in tasks.TASKS and isinstance(meta["seed"], int)
    lab = labs(name)
    assert type(lab.model).__name__ == "Qwen3_5ForCausalLM"
    assert lab.model.config.model_type == "qwen3_5_text"
    assert lab.tokenizer.convert_ids_to_tokens(list(range(len(lab.tokenizer)))) == tasks.vocabulary(meta["task"])
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert log and log[-1]["step"] == meta["steps"]


def test_recall_has_the_hybrid_layout(labs):
    config = labs("recall").model.config
    assert config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert config.attn_output_gate is True
    assert 0 < config.rope_parameters["partial_rotary_factor"] < 1
    assert labs("recall-linear").model.config.layer_types == ["linear_attention"] * 2
    rope = labs("passkey").model.config.rope_parameters
    assert rope["rope_theta"] <= 2000
    assert config.head_dim * rope["partial_rotary_factor"] >= 16  # passkey's attention has 8+ frequencies


def card_number(name: str, *keys):
    value = json.loads((organisms_dir() / name / "qwen35_lab.json").read_text())["evaluation"]
    for k in keys:
        value = value[k]
    return value


@pytest.mark.parametrize("name", ["recall", pytest.param("passkey", marks=pytest.mark.slow)])
def test_organism_accuracy_at_training_length(name, labs):
    lab = labs(name)
    result = tasks.evaluate(lab, lab.meta["task"], n=100, seed=FRESH_SEED)
    assert result["length"] == lab.meta["train_length"]
    assert result["accuracy"] >= 0.95


def test_recall_linear_matches_its_card(labs):
    lab = labs("recall-linear")
    card = next(r["accuracy"] for r in card_number("recall-linear", "by_length") if r["length"] == lab.meta["train_length"])
    result = tasks.evaluate(lab, "recall", n=100, seed=FRESH_SEED)
    assert result["accuracy"] >= card - 0.05


def test_recall_linear_state_readout_matches_its_card(labs):
    """The card's readout (the nearer of each pair's two writes) re-measured on fresh prompts: the stated head
    holds the pairs, far above chance; reading only the value token's writes misses them in this organism."""
    lab = labs("recall-linear")
    stated = card_number("recall-linear", "state_readout")
    assert stated["writes"] == "both"
    result = recall.state_readout(lab, layer=stated["layer"], n=40, seed=FRESH_SEED, writes="both")
    assert (result["head"], result["layer"]) == (stated["head"], stated["layer"])
    assert abs(result["accuracy"] - stated["accuracy"]) < 0.1 and result["accuracy"] >= 5 * result["chance"]
    value_only = recall.state_readout(lab, layer=stated["layer"], n=40, seed=FRESH_SEED, writes="value")
    assert value_only["accuracy"] < 2 * value_only["chance"], value_only["accuracy"]
    with pytest.raises(BadValue, match="writes"):
        recall.state_readout(lab, writes="pair")


def test_recall_state_readout_finds_the_value(labs):
    """Reading ``S_tᵀ q_t`` at the recall layer picks the queried pair's value far above chance."""
    lab = labs("recall")
    stated = card_number("recall", "state_readout")
    result = recall.state_readout(lab, layer=stated["layer"], n=40, seed=FRESH_SEED, writes=stated.get("writes", "value"))
    assert result["accuracy"] >= 3 * result["chance"]
    assert result["accuracy"] >= 0.5
    assert abs(result["accuracy"] - stated["accuracy"]) < 0.1
    assert result["head"] == stated["head"]
    others = [a for (layer, head), a in result["per_head"].items() if head != stated["head"]]
    assert max(others) < result["accuracy"] - 0.3  # the other value head of that layer does not hold it
    readme = (organisms_dir() / "recall" / "README.md").read_text()
    assert f"State readout: {stated['accuracy']:.3f}" in readme


def test_recall_state_readout_matches_a_manual_read(labs):
    """The readout's read vector is ``S_tᵀ q_t``: check it against the layer's own output ``o_t``."""
    lab = labs("recall")
    layer = card_number("recall", "state_readout")["layer"]
    ex = tasks.recall_example(random.Random(FRESH_SEED), 8)
    ids = lab.tokenizer(ex.text, return_tensors="pt")["input_ids"]
    tr = lab.run(ids, capture=[f"layers.{layer}.deltanet.state", f"layers.{layer}.deltanet.o"])
    x = tr.state_inputs(layer)
    t = ex.answer_positions[0] - 1
    S = tr.state(layer, t)  # [B, HV, K, V]
    read = torch.einsum("bhkv,bhk->bhv", S, x["q"][:, t].float()) / S.shape[2] ** 0.5
    torch.testing.assert_close(read, tr[f"layers.{layer}.deltanet.o"][:, t].float(), rtol=1e-3, atol=1e-4)


def test_zeroing_beta_at_the_recall_layer_breaks_recall(labs):
    lab = labs("recall")
    layer = card_number("recall", "state_readout")["layer"]
    result = recall.beta_ablation(lab, layer, n=40, seed=FRESH_SEED)
    assert result["accuracy"] >= 0.9
    assert result["ablated_accuracy"] <= 2 * result["chance"]


@pytest.mark.slow
def test_passkey_prompts_beyond_training_length(labs):
    lab = labs("passkey")
    long = tasks.evaluate(lab, "passkey", length=8 * lab.meta["train_length"], n=4, seed=FRESH_SEED, batch_size=2)
    assert long["length"] == 2048 and long["answers"] == 4 and 0.0 <= long["accuracy"] <= 1.0
    attn = passkey.needle_attention(lab, n=20, seed=FRESH_SEED)
    assert attn["attention"] > 10 / (lab.meta["train_length"] + 10)  # far above uniform attention


def test_cli_evaluate(capsys):
    assert cli(["evaluate", "recall", "--n", "20", "--seed", str(FRESH_SEED)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["length"] == 8 and result["n"] == 20 and result["accuracy"] >= 0.9
    with pytest.raises(SystemExit):
        cli(["train", "mqar"])


@pytest.mark.slow
def test_training_is_deterministic_and_saves_a_loadable_organism(tmp_path):
    from qwen35_lab.organisms.train import train

    a = train("recall", seed=3, out_dir=tmp_path / "a", max_steps=3, progress=False, evaluate_after=False)
    b = train("recall", seed=3, out_dir=tmp_path / "b", max_steps=3, progress=False, evaluate_after=False)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    c = train("recall", seed=4, out_dir=tmp_path / "c", max_steps=3, progress=False, evaluate_after=False)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    lab = ql.load(str(a), dtype="float32")
    assert lab.meta["seed"] == 3 and lab.meta["organism"] == "recall"
    with pytest.raises(ValueError, match="trainable organisms"):
        train("tiny", out_dir=tmp_path / "d")


@pytest.mark.slow
def test_a_second_stage_continues_a_saved_run(tmp_path):
    from safetensors.torch import load_file

    from qwen35_lab.organisms.train import train

    a = train("recall", seed=3, out_dir=tmp_path / "a", max_steps=3, progress=False, evaluate_after=False)
    b = train("recall", seed=3, out_dir=tmp_path / "b", max_steps=2, lr=1e-3, init_from=a, progress=False,
              evaluate_after=False)
    meta = json.loads((b / "qwen35_lab.json").read_text())
    assert meta["steps"] == 5 and [st["steps"] for st in meta["stages"]] == [3, 2]
    assert meta["stages"][1]["lr"] == 1e-3 and meta["stages"][1]["data_seed"] == 4
    log = [json.loads(line) for line in (b / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3, 5]
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and any(not torch.equal(wa[k], wb[k]) for k in wa)  # trained on, same shapes
    with pytest.raises(ValueError, match="holds organism 'recall', not 'passkey'"):
        train("passkey", init_from=a, max_steps=1, out_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="not a saved organism"):
        train("recall", init_from=tmp_path / "nowhere", max_steps=1, out_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="lr"):
        train("recall", init_from=a, lr=-1.0, max_steps=1, out_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="max_steps"):
        train("recall", init_from=a, max_steps=0, out_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()
    c = train("recall", seed=3, out_dir=tmp_path / "c", max_steps=1, init_from=b, progress=False, evaluate_after=False)
    third = json.loads((c / "qwen35_lab.json").read_text())["stages"]
    assert [st["data_seed"] for st in third] == [3, 4, 5]  # each stage draws data of its own
