"""Bad inputs to the Lab facade (``run``, ``generate``, ``trace``, ``prepare``, ``estimate``) and to the
edit constructors: each refused before any work with the value and what is valid — never a silent
no-op (an edit past the prompt), never NaN logits, never an empty trace — and after every refusal
the model is exactly as before (plain HF modules, the same logits bit for bit)."""

from __future__ import annotations

import pytest
import torch

import qwen35_lab as ql
from qwen35_lab.checks import BadIndex, BadType, BadValue, InputError
from qwen35_lab.instrument import patch, replace, scale, zero

IDS = torch.arange(100, 112)[None]  # 12 tokens
T = IDS.shape[1]


@pytest.fixture(autouse=True)
def unchanged_after(lab, plain):
    """After any refused call: not instrumented, plain logits bit for bit."""
    yield
    assert not lab.is_instrumented
    assert torch.equal(lab.run(IDS).meta["last_logits"], plain)


BETA = "layers.0.deltanet.beta"


# ----------------------------------------------------------------------------- edits that would select nothing
@pytest.mark.parametrize("edit, error, match", [
    (zero(positions=[T]), BadIndex, rf"positions of the edit on '{BETA}' {T} is out of range; valid: 0..{T - 1}"),
    (zero(positions=[500]), BadIndex, r"500 is out of range.*the input has 12 tokens"),
    (zero(positions=[-13]), BadIndex, r"-13 is out of range; valid: 0..11 \(or -12..-1 from the end\)"),
    (zero(positions=[]), BadValue, r"is empty: it would select nothing"),
    (zero(positions=1.5), BadType, r"must be an int, a list of ints"),
    (zero(positions=["3"]), BadType, r"must contain ints, got '3'"),
    (zero(heads=[4]), BadIndex, rf"head 4 is out of range; valid: 0..3.*probe '{BETA}' has 4 heads"),
    (zero(heads=[-5]), BadIndex, r"head -5 is out of range"),
    (zero(batch=[1]), BadIndex, r"batch of the edit on .* 1 is out of range; valid: 0..0"),
])
def test_edit_selections_outside_the_input(lab, edit, error, match):
    with pytest.raises(error, match=match):
        lab.run(IDS, edits={BETA: edit})


def test_edit_positions_count_prompt_and_generated_tokens(lab):
    with pytest.raises(BadIndex, match=r"14 is out of range; valid: 0..13"):
        lab.generate(IDS, max_new_tokens=2, edits={BETA: zero(positions=[T + 2])})


# ----------------------------------------------------------------------------- values that would poison the logits
@pytest.mark.parametrize("edits, error, match", [
    ({BETA: float("nan")}, BadValue, rf"the edit value for '{BETA}' must be finite, got nan"),
    ({BETA: float("inf")}, BadValue, r"must be finite, got inf"),
    ({BETA: torch.tensor([1.0, float("nan")])}, BadValue, r"edit tensor for .* holds 1 non-finite value"),
    ({BETA: True}, BadType, r"the edit for .* is True"),
    ({BETA: "zero"}, BadType, r"edit for 'layers.0.deltanet.beta' must be a number, a tensor, a function or an Edit"),
    ({BETA: None}, BadType, r"must be a number, a tensor, a function or an Edit"),
    ({3: 0.0}, BadType, r"edit keys are probe names or globs \(str\), got 3"),
    ([(BETA, 0.0)], BadType, r"edits must be a dict \{probe name or glob: edit\}.*got list"),
    ("layers.0.deltanet.beta", BadType, r"edits must be a dict.*got str"),
    ({"layers.0.deltanet.conv_state": 0.0}, BadValue, r"read-only"),
    ({"layers.0.attn.gate": 0.0}, BadValue, r"layer 0 is a linear_attention layer"),
    ({"layers.*.nothing": 0.0}, BadValue, r"matches no probe"),
    ({"layers.99.deltanet.beta": 0.0}, BadValue, r"layers.99"),
])
def test_bad_edits(lab, edits, error, match):
    with pytest.raises(error, match=match):
        lab.run(IDS, edits=edits)


@pytest.mark.parametrize("make, error, match", [
    (lambda: scale("x"), BadType, r"scale factor must be a number, got 'x'"),
    (lambda: scale(float("nan")), BadValue, r"scale factor must be finite"),
    (lambda: scale(None), BadType, r"scale factor must be a number"),
    (lambda: replace(float("inf")), BadValue, r"replace value must be finite"),
    (lambda: replace("1"), BadType, r"replace value must be a number"),
    (lambda: replace(torch.tensor([float("nan")])), BadValue, r"replace value holds 1 non-finite"),
])
def test_edit_constructors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_patch_position_lists_must_pair_up(lab):
    donor = lab.run(IDS, capture=BETA)
    with pytest.raises(BadValue, match=r"positions has 2 entries but donor_positions has 3"):
        lab.run(IDS, edits={BETA: patch(donor, positions=[1, 2], donor_positions=[1, 2, 3])})
    with pytest.raises(BadType, match=r"patch\(\) takes a Trace"):
        lab.run(IDS, edits={BETA: patch({"x": 1}, positions=[1])})


# ----------------------------------------------------------------------------- capture arguments
@pytest.mark.parametrize("kwargs, error, match", [
    ({"capture": 123}, BadType, r"capture must be a probe name or glob.*got 123"),
    ({"capture": []}, BadValue, r"empty list: it selects nothing"),
    ({"capture": lambda name: False}, BadValue, r"capture filter .* selects no probe"),
    ({"capture": "layers.*.mamba.*"}, BadValue, r"matches no probe"),
    ({"capture": [BETA, 7]}, BadType, r"probe patterns are strings.*got 7"),
    ({"capture": BETA, "dtype": torch.int8}, BadValue, r"capture dtype torch.int8 is not supported here"),
    ({"capture": BETA, "dtype": "int8"}, BadValue, r"unknown capture dtype 'int8'"),
    ({"capture": BETA, "dtype": 4}, BadType, r"capture dtype must be a torch.dtype"),
    ({"capture": BETA, "device": "gpu"}, BadValue, r"unknown capture device 'gpu'"),
    ({"capture": BETA, "device": "cuda"}, BadValue, r"capture device 'cuda' is not available: no CUDA GPU"),
    ({"capture": BETA, "device": None}, BadType, r"capture device must be a string"),
    ({"capture": BETA, "positions": [12]}, BadIndex, r"position 12 is out of range; valid: 0..11"),
    ({"capture": BETA, "positions": [-13]}, BadIndex, r"position -13 is out of range"),
    ({"capture": BETA, "positions": []}, BadValue, r"positions is empty"),
    ({"capture": BETA, "heads": [-5]}, BadIndex, r"head -5 is out of range"),
    ({"capture": BETA, "heads": "0"}, BadType, r"heads must be an int, a list of ints"),
    ({"capture": BETA, "batch": 2}, BadIndex, r"batch 2 is out of range"),
    ({"capture": BETA, "chunk_size": 0}, BadValue, r"chunk_size=0 is out of range; valid: >= 1"),
    ({"capture": BETA, "chunk_size": 8.0}, BadType, r"chunk_size must be an int"),
    ({"capture": BETA, "budget_bytes": -1}, BadValue, r"budget_bytes=-1 is out of range"),
    ({"capture": BETA, "budget_bytes": "1GB"}, BadType, r"budget_bytes must be a number"),
])
def test_bad_capture_arguments(lab, kwargs, error, match):
    with pytest.raises(error, match=match):
        lab.run(IDS, **kwargs)


def test_capture_over_budget_names_the_estimate(lab):
    with pytest.raises(MemoryError, match=r"needs about .* over the budget") as info:
        lab.run(IDS, capture="layers.*", budget_bytes=1000)
    assert isinstance(info.value, InputError)


def test_a_string_dtype_is_accepted_and_used(lab):
    tr = lab.run(IDS, capture=BETA, dtype="bfloat16")
    assert tr[BETA].dtype == torch.bfloat16


# ----------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("inputs, error, match", [
    ("", BadValue, r"prompt must not be empty"),
    (torch.tensor([[1.0, 2.0]]), BadType, r"token ids must be integers \(torch.long\), got dtype torch.float32"),
    (torch.tensor([[True, False]]), BadType, r"must be integers"),
    (torch.tensor([[5, 248320]]), BadIndex, r"hold id 248320, outside the vocabulary of 248320"),
    (torch.tensor([[-1, 5]]), BadIndex, r"hold id -1, outside the vocabulary"),
    (torch.zeros(1, 0, dtype=torch.long), BadValue, r"must be a non-empty \[T\] or \[B, T\] tensor, got shape \[1, 0\]"),
    (torch.zeros(1, 2, 3, dtype=torch.long), BadValue, r"got shape \[1, 2, 3\]"),
    ({"attention_mask": torch.ones(1, 3)}, BadValue, r"needs 'input_ids'; got keys \['attention_mask'\]"),
    ({"input_ids": [1, 2, 3]}, BadType, r"inputs\['input_ids'\] must be a torch.Tensor"),
    (42, BadType, r"inputs must be a prompt string, a list of chat messages"),
    ([], BadValue, r"messages is empty"),
])
def test_bad_inputs(lab, inputs, error, match):
    with pytest.raises(error, match=match):
        lab.run(inputs)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"seed": 1.5}, BadType, r"seed must be an int, got 1.5"),
    ({"seed": -1}, BadValue, r"seed=-1 is out of range"),
    ({"seed": "0"}, BadType, r"seed must be an int"),
    ({"max_new_tokens": 0}, BadValue, r"max_new_tokens=0 is out of range; valid: >= 1"),
    ({"max_new_tokens": 2.0}, BadType, r"max_new_tokens must be an int"),
    ({"max_new_tokens": 10**9}, BadValue, r"tokens exceed the model's native context of 262,144.*yarn_for_context"),
    ({"capture": BETA, "capture_dtype": torch.int8}, BadValue, r"capture dtype torch.int8"),
    ({"edits": [0.0]}, BadType, r"edits must be a dict"),
])
def test_bad_generate_arguments(lab, kwargs, error, match):
    with pytest.raises(error, match=match):
        lab.generate(IDS, **{"max_new_tokens": 2, **kwargs})


def test_a_context_past_the_maximum_is_refused_by_run_as_by_prefill():
    lab = ql.load("recall", device="cpu")  # max_position_embeddings 32,768
    ids = torch.full((1, 32_769), 5)
    with pytest.raises(BadValue, match=r"32,769 tokens exceed the model's native context of 32,768"):
        lab.run(ids)
    with pytest.raises(BadValue, match=r"exceed"):
        lab.generate(ids[:, :32_760], max_new_tokens=20)


def test_estimate_and_trace_check_their_arguments(lab):
    with pytest.raises(BadValue, match="needs inputs or length"):
        lab.estimate(BETA)
    with pytest.raises(BadType, match="capture must be a probe name"):
        with lab.trace(3.5):
            pass
    with pytest.raises(BadValue, match="capture device 'cuda'"):
        with lab.trace(BETA, device="cuda"):
            pass


# ----------------------------------------------------------------------------- organisms' own words
def test_unknown_words_on_a_word_level_organism():
    lab = ql.load("recall", device="cpu")
    with pytest.raises(BadValue, match=r"\['banana'\] is not in the vocabulary of 'recall' \(\d+ words, e.g. .*"
                                       r"data/organisms/recall/README.md"):
        lab.run("banana")
    with pytest.raises(BadValue, match=r"\['hello', 'world'\] are not in the vocabulary"):
        lab.generate("hello world", max_new_tokens=1)


def test_known_words_still_work():
    lab = ql.load("recall", device="cpu")
    word = next(w for w in lab.tokenizer.get_vocab() if not w.startswith("<"))
    assert lab.run(word).meta["last_logits"].shape[-1] == lab.text_config.vocab_size
