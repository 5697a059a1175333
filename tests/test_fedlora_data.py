"""Tests of the fedlora tokenizers, generated tasks, Alpaca/Dolly loader, Dirichlet split and tokenisation."""
import json
import re
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcodec.integrations.fedlora.dataset import (TaskSizes, collate, dirichlet_split, format_prompt,
                                                    generate_examples, load_instructions, tokenize_example)
from gradcodec.integrations.fedlora.tokenizer import ByteTokenizer, HFTokenizer

BYTES = ByteTokenizer()


# --- byte tokenizer -------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trips_any_unicode(text):
    ids = BYTES.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == BYTES.bos_id and ids[-1] == BYTES.eos_id
    assert ids[1:-1] == list(text.encode("utf-8"))
    assert BYTES.decode(ids) == text


def test_byte_tokenizer_specials_and_invalid_bytes():
    assert BYTES.vocab_size == 259 and {BYTES.pad_id, BYTES.bos_id, BYTES.eos_id} == {256, 257, 258}
    assert BYTES.encode("hé", add_bos=False) == [104, 0xC3, 0xA9]
    assert BYTES.decode([BYTES.pad_id, 104, BYTES.eos_id, 105]) == "hi"
    assert BYTES.decode([104, 0xC3]) == "h\ufffd"  # a truncated UTF-8 sequence, as a model may generate
    with pytest.raises(ValueError, match="outside"):
        BYTES.decode([259])


def test_hf_tokenizer_adapter_on_a_local_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2, "hello": 3, "world": 4}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="[UNK]").save_pretrained(tmp_path)

    tok = HFTokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 1, 5)  # no pad token: eos stands in
    assert tok.encode("hello world") == [0, 3, 4]
    assert tok.encode("world", add_bos=False, add_eos=True) == [4, 1]
    assert tok.decode([0, 3, 4, 1]) == "hello world"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFTokenizer(tmp_path / "missing")


# --- generated tasks ------------------------------------------------------------------------------

def _expected(example):
    """The answer recomputed from the rendered instruction and input alone."""
    text, instruction = example["input"], example["instruction"]
    category = example["category"]
    if category == "add":
        a, b = text.split("+")
        return str(int(a) + int(b))
    if category == "sort":
        return "".join(sorted(text))
    if category == "copy":
        return text
    if category == "reverse":
        return "".join(reversed(text))
    if category == "lookup":
        key = re.fullmatch(r"Find the value of (\w)\.", instruction).group(1)
        return dict(pair.split(":") for pair in text.split())[key]
    if category == "count":
        letter = re.fullmatch(r"Count the letter (\w)\.", instruction).group(1)
        return str(sum(ch == letter for ch in text))
    if category == "upper":
        return "".join(chr(ord(ch) - 32) for ch in text)
    raise AssertionError(f"unexpected category {category}")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_generated_answer_is_correct(seed):
    examples = generate_examples(1400, seed, sizes=TaskSizes(max_digits=3, min_len=1, max_len=9, num_keys=6))
    for example in examples:
        assert set(example) == {"instruction", "input", "output", "category"}
        assert example["output"] == _expected(example), example


def test_generation_is_balanced_and_respects_sizes():
    sizes = TaskSizes(max_digits=1, min_len=2, max_len=4, num_keys=3)
    examples = generate_examples(100, 5, categories=("add", "copy", "lookup"), sizes=sizes)
    assert Counter(e["category"] for e in examples) == {"add": 34, "copy": 33, "lookup": 33}
    for e in examples:
        if e["category"] == "add":
            assert all(0 <= int(x) <= 9 for x in e["input"].split("+"))
        elif e["category"] == "copy":
            assert 2 <= len(e["input"]) <= 4
        else:
            assert len(e["input"].split()) == 3


def test_generation_is_deterministic_per_seed():
    assert generate_examples(200, 3) == generate_examples(200, 3)
    assert generate_examples(200, 3) != generate_examples(200, 4)


def test_generation_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown"):
        generate_examples(10, 0, categories=("add", "divide"))
    with pytest.raises(ValueError, match="task sizes"):
        TaskSizes(min_len=5, max_len=4)


# --- Alpaca / Dolly loader ------------------------------------------------------------------------

def test_loader_reads_alpaca_json_and_dolly_jsonl(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Add.", "input": "1+2", "output": "3"},
    ]))
    assert load_instructions(alpaca) == [
        {"instruction": "Say hi.", "input": "", "output": "hi", "category": "general"},
        {"instruction": "Add.", "input": "1+2", "output": "3", "category": "general"},
    ]
    dolly = tmp_path / "dolly.jsonl"
    dolly.write_text(json.dumps({"instruction": "Who?", "context": "Ann met Bo.", "response": "Ann",
                                 "category": "closed_qa"}) + "\n\n"
                     + json.dumps({"instruction": "Name a colour.", "response": "red", "category": "brainstorming"}) + "\n")
    assert load_instructions(dolly) == [
        {"instruction": "Who?", "input": "Ann met Bo.", "output": "Ann", "category": "closed_qa"},
        {"instruction": "Name a colour.", "input": "", "output": "red", "category": "brainstorming"},
    ]


@pytest.mark.parametrize("record, problem", [
    ({"instruction": "Say hi."}, "missing field 'output' or 'response'"),
    ({"output": "hi"}, "missing field 'instruction'"),
    ({"instruction": "  ", "output": "hi"}, "'instruction' is empty"),
    ({"instruction": "Say hi.", "output": 3}, "'output' must be a string"),
    ({"instruction": "Q", "input": "a", "context": "b", "output": "x"}, "both 'input' and 'context'"),
    ({"instruction": "Q", "output": "x", "category": ""}, "'category' must be a non-empty string"),
    (["Say hi.", "hi"], "expected an object"),
])
def test_loader_names_file_and_record_of_bad_data(tmp_path, record, problem):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"instruction": "ok", "output": "fine"}, record]))
    with pytest.raises(ValueError) as info:
        load_instructions(path)
    assert str(path) in str(info.value) and "record 1" in str(info.value) and problem in str(info.value)


def test_loader_names_the_line_of_bad_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"instruction": "ok", "output": "fine"}\n{"instruction": "broken",\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 2: not valid JSON")):
        load_instructions(path)


# --- Dirichlet split ------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha, num_clients, seed", [(0.01, 10, 0), (0.1, 7, 1), (1.0, 4, 2), (100.0, 3, 3), (0.05, 30, 4)])
def test_dirichlet_split_partitions_all_examples_with_no_empty_client(alpha, num_clients, seed):
    examples = generate_examples(210, seed)
    clients = dirichlet_split(examples, num_clients, alpha, seed)
    assert len(clients) == num_clients and all(clients)
    assigned = sorted(id(e) for client in clients for e in client)
    assert assigned == sorted(id(e) for e in examples)  # each example exactly once


def test_dirichlet_split_is_deterministic_per_seed():
    examples = generate_examples(140, 0)
    assert dirichlet_split(examples, 5, 0.3, 9) == dirichlet_split(examples, 5, 0.3, 9)
    assert dirichlet_split(examples, 5, 0.3, 9) != dirichlet_split(examples, 5, 0.3, 10)


def _skew(clients):
    """Mean total-variation distance between each client's category mix and the overall mix."""
    overall = Counter(e["category"] for c in clients for e in c)
    total = sum(overall.values())
    distances = []
    for client in clients:
        mix = Counter(e["category"] for e in client)
        distances.append(0.5 * sum(abs(mix[k] / len(client) - overall[k] / total) for k in overall))
    return float(np.mean(distances))


def test_smaller_alpha_gives_more_skewed_clients():
    examples = generate_examples(700, 0)
    skew = {alpha: np.mean([_skew(dirichlet_split(examples, 5, alpha, seed)) for seed in range(20)])
            for alpha in (0.1, 1.0, 100.0)}
    assert skew[0.1] > skew[1.0] + 0.1 > skew[100.0] + 0.2
    assert skew[100.0] < 0.1  # close to IID


def test_dirichlet_split_rejects_bad_arguments():
    examples = generate_examples(3, 0)
    with pytest.raises(ValueError, match="only 3 examples"):
        dirichlet_split(examples, 4, 1.0, 0)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_split(examples, 2, 0.0, 0)


# --- prompt, tokenisation, collation --------------------------------------------------------------

def test_labels_mask_the_prompt_exactly():
    example = {"instruction": "Copy the text.", "input": "ab", "output": "ab", "category": "copy"}
    prompt = "### Instruction:\nCopy the text.\n### Input:\nab\n### Response:\n"
    assert format_prompt(example) == prompt
    feature = tokenize_example(example, BYTES, max_length=128)
    assert feature["input_ids"] == [BYTES.bos_id] + list(prompt.encode()) + [ord("a"), ord("b"), BYTES.eos_id]
    assert feature["labels"] == [-100] * (1 + len(prompt)) + [ord("a"), ord("b"), BYTES.eos_id]


def test_prompt_without_input_and_truncation():
    example = {"instruction": "Say hi.", "input": "", "output": "hi", "category": "general"}
    prompt = "### Instruction:\nSay hi.\n### Response:\n"
    assert format_prompt(example) == prompt
    feature = tokenize_example(example, BYTES, max_length=len(prompt) + 2)
    assert feature["input_ids"] == [BYTES.bos_id] + list(prompt.encode()) + [ord("h")]
    assert feature["labels"] == [-100] * (1 + len(prompt)) + [ord("h")]


def test_collate_pads_right_for_training_and_left_for_generation():
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    right = collate(features, pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = collate([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}], pad_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert "labels" not in left


def test_generated_sequences_fit_the_default_length():
    lengths = [len(tokenize_example(e, BYTES, 10_000)["input_ids"]) for e in generate_examples(700, 0)]
    assert max(lengths) <= 128  # local_train's and evaluate's default max_length: nothing is cut
