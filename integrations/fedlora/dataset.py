"""Instruction data of the reference federated app: a generated task suite, an Alpaca/Dolly loader,
the non-IID client split, prompt formatting / tokenisation / padding, and the pre-training corpus.

The generated suite needs no download and every answer is checkable, so exact-match accuracy is a
meaningful quality measure for comparing codecs. Each example is a dict
`{"instruction", "input", "output", "category"}` with string values, the same shape the loader
returns for Alpaca/Dolly files.
"""
from __future__ import annotations

import json
import os
import random
import string
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .tokenizer import Tokenizer

Example = dict[str, str]
IGNORE_INDEX = -100  # label of positions excluded from the loss (prompt and padding)


@dataclass(frozen=True)
class TaskSizes:
    """Difficulty knobs of the generated tasks.

    `max_digits`: operands of `add` have up to this many digits. `min_len`/`max_len`: length range of
    the strings of `sort`, `copy`, `reverse`, `count` and `upper`. `num_keys`: entries of a `lookup` list.
    The defaults are sized for the CPU default (`tiny` pre-trained for ~2 minutes): small enough that
    it learns most tasks, so fine-tuning quality differences show. Larger sizes make harder suites for
    bigger models.
    """

    max_digits: int = 1
    min_len: int = 3
    max_len: int = 5
    num_keys: int = 3

    def __post_init__(self) -> None:
        if self.max_digits < 1 or self.min_len < 1 or self.max_len < self.min_len or not 1 <= self.num_keys <= 26:
            raise ValueError(f"invalid task sizes {self}: need max_digits >= 1, 1 <= min_len <= max_len, "
                             "1 <= num_keys <= 26")


def _word(rng: random.Random, sizes: TaskSizes, alphabet: str = string.ascii_lowercase) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(sizes.min_len, sizes.max_len)))


def _add(rng: random.Random, sizes: TaskSizes) -> tuple[str, str, str]:
    a, b = (rng.randrange(10 ** sizes.max_digits) for _ in range(2))
    return rng.choice(("Add the numbers.", "Compute the sum.")), f"{a}+{b}", str(a + b)


def _sort(rng: random.Random, sizes: TaskSizes) -> tuple[str, str, str]:
    text = _word(rng, sizes, rng.choice((string.ascii_lowercase, string.digits)))
    return rng.choice(("Sort the characters.", "Put the characters in order.")), text, "".join(sorted(text))


def _copy(rng: random.Random, sizes: TaskSizes) -> tuple[str, str, str]:
    text = _word(rng, sizes)
    return rng.choice(("Copy the text.", "Repeat the input.")), text, text


def _reverse(rng: random.Random, sizes: TaskSizes) -> tuple[str, str, str]:
    text = _word(rng, sizes)
    return rng.choice(("Reverse the text.", "Write the input backwards.")), text, text[::-1]


def _lookup(rng: random.Random, sizes: TaskSizes) -> tuple[str, str, str]:
    keys = rng.sample(string.ascii_lowercase, sizes.num_keys)
    values = [str(rng.randrange(10)) for _ in keys]
    key = rng.randrange(len(keys))
    table = " ".join(f"{k}:{v}" for k, v in zip(keys, values))
    return f"Find the value of {keys[key]}.", table, values[key]


def _count(rng: random.Random, sizes: TaskSizes) -> tuple[str, str, str]:
    text = _word(rng, sizes, "abcd")  # a small alphabet, so counts are mostly non-zero
    letter = rng.choice("abcd")
    return f"Count the letter {letter}.", text, str(text.count(letter))


def _upper(rng: random.Random, sizes: TaskSizes) -> tuple[str, str, str]:
    text = _word(rng, sizes)
    return rng.choice(("Uppercase the text.", "Write the input in capitals.")), text, text.upper()


_TASKS: dict[str, Callable[[random.Random, TaskSizes], tuple[str, str, str]]] = {
    "add": _add, "sort": _sort, "copy": _copy, "reverse": _reverse,
    "lookup": _lookup, "count": _count, "upper": _upper,
}
CATEGORIES: tuple[str, ...] = tuple(_TASKS)


def generate_examples(n: int, seed: int, categories: Sequence[str] = CATEGORIES,
                      sizes: TaskSizes = TaskSizes()) -> list[Example]:
    """`n` generated examples, as balanced over `categories` as `n` allows, in a seeded random order.

    The same `(n, seed, categories, sizes)` always gives the same list, so train, eval and pre-training
    sets drawn from different seeds are reproducible (though, with small `sizes`, not guaranteed to be
    free of coincidental duplicates).
    """
    unknown = [c for c in categories if c not in _TASKS]
    if unknown or not categories:
        raise ValueError(f"unknown or no categories {unknown or list(categories)}; choose from {', '.join(CATEGORIES)}")
    if n < 0:
        raise ValueError(f"cannot generate {n} examples")
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        category = categories[i % len(categories)]
        instruction, inp, output = _TASKS[category](rng, sizes)
        examples.append({"instruction": instruction, "input": inp, "output": output, "category": category})
    rng.shuffle(examples)
    return examples


def _field(record: dict, names: tuple[str, ...], where: str, required: bool) -> str:
    """The string under whichever of `names` the record has ("" if none and not `required`)."""
    present = [k for k in names if k in record]
    if len(present) > 1:
        raise ValueError(f"{where}: has both {present[0]!r} and {present[1]!r}; keep one")
    if not present:
        if required:
            raise ValueError(f"{where}: missing field {' or '.join(repr(k) for k in names)}")
        return ""
    value = record[present[0]]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {present[0]!r} must be a string, not {type(value).__name__}")
    return value


def load_instructions(path: str | os.PathLike, default_category: str = "general") -> list[Example]:
    """Examples from an Alpaca- or Dolly-style file: a JSON list of records, or JSONL (`.jsonl`), one per line.

    Each record needs a non-empty string `instruction` and a string `output` (Dolly: `response`); it may
    have `input` (Dolly: `context`) and `category` (else `default_category`). A record that breaks these
    rules raises ValueError naming the file and the record, so the bad data can be found and fixed.
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".jsonl"):
        records = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append((f"{path}, line {line_no}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {line_no}: not valid JSON ({e.msg})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); "
                             "JSON Lines files must end in .jsonl") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records, found {type(data).__name__}")
        records = [(f"{path}, record {i}", r) for i, r in enumerate(data)]
    examples = []
    for where, record in records:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object with instruction/output fields, found {type(record).__name__}")
        instruction = _field(record, ("instruction",), where, required=True)
        if not instruction.strip():
            raise ValueError(f"{where}: field 'instruction' is empty")
        category = record.get("category", default_category)
        if not isinstance(category, str) or not category:
            raise ValueError(f"{where}: field 'category' must be a non-empty string")
        examples.append({"instruction": instruction,
                         "input": _field(record, ("input", "context"), where, required=False),
                         "output": _field(record, ("output", "response"), where, required=True),
                         "category": category})
    return examples


def dirichlet_split(examples: Sequence[Example], num_clients: int, alpha: float, seed: int) -> list[list[Example]]:
    """Non-IID partition of `examples` over `num_clients` clients, as in FedIT / CG-FedLLM.

    For each category, client shares are drawn from Dirichlet(alpha, ..., alpha) and that category's
    (shuffled) examples are cut accordingly: small `alpha` (e.g. 0.1) gives each client a few dominant
    categories, large `alpha` (e.g. 100) approaches an IID split. Every example goes to exactly one
    client. A client left empty by the draw receives one example from the largest client, so every
    client can train; this needs at least `num_clients` examples.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not alpha > 0:
        raise ValueError(f"the Dirichlet concentration alpha must be > 0, got {alpha}")
    if len(examples) < num_clients:
        raise ValueError(f"cannot give each of {num_clients} clients an example: only {len(examples)} examples")
    rng = np.random.default_rng(seed)
    by_category: dict[str, list[Example]] = {}
    for example in examples:
        by_category.setdefault(example["category"], []).append(example)
    clients: list[list[Example]] = [[] for _ in range(num_clients)]
    for category in sorted(by_category):
        members = [by_category[category][i] for i in rng.permutation(len(by_category[category]))]
        shares = rng.dirichlet(np.full(num_clients, float(alpha)))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for client, part in zip(clients, np.split(np.arange(len(members)), cuts)):
            client.extend(members[i] for i in part)
    for client in clients:
        if not client:
            largest = max(clients, key=len)
            client.append(largest.pop(int(rng.integers(len(largest)))))
    return clients


PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n### Input:\n{input}\n### Response:\n"
PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n### Response:\n"


def format_prompt(example: Example) -> str:
    """The prompt the model sees for `example`: a shortened Alpaca template ending where the response starts."""
    template = PROMPT_WITH_INPUT if example.get("input") else PROMPT_NO_INPUT
    return template.format(instruction=example["instruction"], input=example.get("input", ""))


def tokenize_example(example: Example, tokenizer: Tokenizer, max_length: int) -> dict[str, list[int]]:
    """`input_ids` (bos + prompt + response + eos) and `labels`, the same ids with the prompt masked.

    Only the response and its eos carry a label, so the loss teaches answering, not prompt
    reproduction. Sequences longer than `max_length` are cut at the end; an example whose prompt alone
    fills `max_length` then has no labelled token and contributes nothing to the loss.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    prompt = tokenizer.encode(format_prompt(example), add_bos=True, add_eos=False)
    response = tokenizer.encode(example["output"], add_bos=False, add_eos=True)
    input_ids = (prompt + response)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def collate(features: Sequence[dict[str, list[int]]], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad tokenised examples to one batch: `input_ids` (pad_id), `labels` (-100) and `attention_mask` (0 at padding).

    Right padding suits training; generation needs `padding_side="left"` so every prompt ends at the
    last column. Features without `labels` (prompts to generate from) give no `labels` tensor.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not features:
        raise ValueError("cannot collate an empty batch")
    width = max(len(f["input_ids"]) for f in features)
    keys = [("input_ids", pad_id), ("attention_mask", 0)] + ([("labels", IGNORE_INDEX)] if "labels" in features[0] else [])
    batch = {}
    for key, pad in keys:
        rows = []
        for f in features:
            values = f[key] if key != "attention_mask" else [1] * len(f["input_ids"])
            padding = [pad] * (width - len(values))
            rows.append(padding + list(values) if padding_side == "left" else list(values) + padding)
        batch[key] = torch.tensor(rows, dtype=torch.long)
    return batch


def format_plain(example: Example) -> str:
    """`example` as one line of plain text, `"{instruction} {input} = {output}"`: the pre-training rendering.

    It states the task and its answer back to back with no template, the way skills appear in raw
    pre-training text, so a base model pre-trained on it has the skills but not the instruction format.
    """
    return f"{example['instruction']} {example['input']} = {example['output']}\n"


def pretraining_windows(examples: Sequence[Example], tokenizer: Tokenizer, seq_len: int, template_share: float,
                        seed: int) -> list[dict[str, list[int]]]:
    """A packed language-modelling corpus cut into `seq_len`-token training features (labels = input_ids).

    Each example is rendered with `format_plain`, except a seeded random `template_share` of them,
    which appear in the instruction template with bos/eos (so the base has seen the format, rarely).
    The stream is cut into consecutive windows; the incomplete tail is dropped.
    """
    if not 0 <= template_share <= 1:
        raise ValueError(f"template_share must be in [0, 1], got {template_share}")
    rng = random.Random(seed)
    stream: list[int] = []
    for example in examples:
        if rng.random() < template_share:
            stream += tokenizer.encode(format_prompt(example) + example["output"], add_bos=True, add_eos=True)
        else:
            stream += tokenizer.encode(format_plain(example), add_bos=False)
    return [{"input_ids": stream[i:i + seq_len], "labels": stream[i:i + seq_len]}
            for i in range(0, len(stream) - seq_len + 1, seq_len)]
