"""Tests of the fedlora presets, model building, LoRA attachment, pre-trained base, local training and evaluation."""
import math
from types import SimpleNamespace

import pytest
import torch

from gradcodec.integrations.fedlora import model as fl_model
from gradcodec.integrations.fedlora import train as fl_train
from gradcodec.integrations.fedlora.dataset import collate, generate_examples, tokenize_example
from gradcodec.integrations.fedlora.model import (PretrainRecipe, attach_lora, build_model, load_tokenizer, lora_shapes,
                                                  pretrained_base)
from gradcodec.integrations.fedlora.presets import PRESETS, preset_config
from gradcodec.integrations.fedlora.tokenizer import ByteTokenizer
from gradcodec.integrations.fedlora.train import evaluate, local_train
from gradcodec.integrations.peft import lora_state

BYTES = ByteTokenizer()


def _n_params(module):
    return sum(p.numel() for p in module.parameters())


# --- presets and shapes ---------------------------------------------------------------------------

def test_tiny_preset_has_the_documented_shape():
    model = build_model("tiny")
    config = model.config
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (BYTES.vocab_size, 128, 4)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)  # grouped-query attention
    # embeddings + lm_head + final norm + 4 x (q 128x128, k/v 128x64, o 128x128, 3 MLP 128x344, 2 norms)
    per_layer = 128 * 128 * 2 + 128 * 64 * 2 + 3 * 128 * 344 + 2 * 128
    assert _n_params(model) == 2 * 259 * 128 + 128 + 4 * per_layer == 792_448


def test_llama_7b_preset_is_the_published_shape():
    c = preset_config("llama-7b")
    per_layer = 4 * c.hidden_size ** 2 + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
    total = 2 * c.vocab_size * c.hidden_size + c.num_hidden_layers * per_layer + c.hidden_size
    assert total == 6_738_415_616  # LLaMA-7B's parameter count


def test_lora_shapes_match_a_real_adapter_and_size_7b():
    real = {k: tuple(v.shape) for k, v in lora_state(attach_lora(build_model("tiny"), rank=8)).items()}
    assert lora_shapes("tiny", rank=8) == real
    shapes = lora_shapes("llama-7b", rank=8)
    assert len(shapes) == 32 * 4 * 2
    assert sum(math.prod(s) for s in shapes.values()) == 32 * 4 * (8 * 4096 + 4096 * 8) == 8_388_608
    mlp = lora_shapes("llama-7b", rank=2, targets=("down_proj",))
    assert mlp["model.layers.0.mlp.down_proj.lora_A.weight"] == (2, 11008)
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        lora_shapes("tiny", targets=("qkv",))


def test_unknown_preset_and_missing_path_are_explained(tmp_path):
    with pytest.raises(ValueError, match="neither a model preset.*nor an existing"):
        build_model(str(tmp_path / "no-such-checkpoint"))
    with pytest.raises(ValueError, match="unknown model preset"):
        preset_config("llama-70b")
    assert isinstance(load_tokenizer("tiny"), ByteTokenizer)
    assert isinstance(load_tokenizer("llama-7b"), ByteTokenizer)  # build_model sizes a preset's vocabulary for it
    assert set(PRESETS) >= {"tiny", "llama-7b"}


# --- building and LoRA ----------------------------------------------------------------------------

def test_build_model_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = build_model("tiny", seed=1), build_model("tiny", seed=1), build_model("tiny", seed=2)
    assert torch.equal(torch.rand(1), expected_next)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w]) and not torch.equal(a.state_dict()[w], c.state_dict()[w])
    assert build_model("tiny", dtype=torch.bfloat16).model.embed_tokens.weight.dtype == torch.bfloat16


def test_build_model_loads_a_local_checkpoint(tmp_path):
    saved = build_model("tiny", seed=3)
    saved.save_pretrained(tmp_path)
    loaded = build_model(tmp_path)
    assert saved.state_dict().keys() == loaded.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in saved.state_dict().items())


def test_attach_lora_starts_as_the_base_and_trains_only_the_adapter():
    base = build_model("tiny", seed=0)
    ids = torch.tensor([BYTES.encode("### Instruction:\nCopy")])
    before = base(input_ids=ids).logits
    lora = attach_lora(base, rank=4, seed=5)
    assert torch.equal(lora(input_ids=ids).logits, before)  # B starts at zero
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 * 4 * 2 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    again = lora_state(attach_lora(build_model("tiny", seed=0), rank=4, seed=5))
    assert all(torch.equal(v, again[k]) for k, v in lora_state(lora).items())  # seeded A


def test_gradient_checkpointing_gives_the_same_lora_gradients():
    batch = collate([tokenize_example(e, BYTES, 128) for e in generate_examples(4, 0)], BYTES.pad_id)
    grads = []
    for checkpointing in (False, True):
        model = attach_lora(build_model("tiny", seed=0, gradient_checkpointing=checkpointing), seed=0)
        with torch.no_grad():  # non-zero B, so A receives gradient too
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.fill_(0.01)
        model.train()
        loss_sum, count = fl_train._token_losses(model, batch)
        (loss_sum.sum() / count.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert all(g.abs().sum() > 0 for g in grads[1].values())
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


# --- local training -------------------------------------------------------------------------------

def _fixed_batch_loss(model, features):
    with torch.no_grad():
        loss_sum, count = fl_train._token_losses(model, collate(features, BYTES.pad_id))
    return (loss_sum.sum() / count.sum()).item()


def test_local_train_reduces_the_loss_and_touches_only_the_adapter():
    model = attach_lora(build_model("tiny", seed=0), seed=0)
    examples = generate_examples(16, 0)
    features = [tokenize_example(e, BYTES, 128) for e in examples]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = _fixed_batch_loss(model, features)
    stats = local_train(model, examples, BYTES, steps=25, lr=1e-2, batch_size=16, seed=0)
    after = _fixed_batch_loss(model, features)
    assert stats["steps"] == 25 and stats["num_examples"] == 16
    assert after < before - 0.4, (before, after)  # measured: 5.56 -> 4.79
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_local_train_is_deterministic_given_a_seed():
    examples = generate_examples(40, 1)
    states = []
    for seed in (7, 7, 8):
        model = attach_lora(build_model("tiny", seed=0), seed=0)
        local_train(model, examples, BYTES, steps=3, lr=1e-3, batch_size=8, seed=seed)
        states.append(lora_state(model))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])  # another batch order


def test_local_train_with_sgd_takes_plain_clipped_gradient_steps():
    """One SGD step is exactly params - lr * (gradient clipped to norm 1), computed here by hand."""
    model = attach_lora(build_model("tiny", seed=0), seed=0)
    examples = generate_examples(8, 2)
    local_train(model, examples, BYTES, steps=1, lr=1e-2, batch_size=8, seed=0)  # B moves off zero: A gets gradients
    features = [tokenize_example(e, BYTES, 128) for e in examples]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    loss_sum, count = fl_train._token_losses(model, collate(features, BYTES.pad_id))
    grads = torch.autograd.grad(loss_sum.sum() / count.sum(), list(params.values()))
    scale = min(1.0, 1.0 / (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item() + 1e-6))
    local_train(model, examples, BYTES, steps=1, lr=0.5, batch_size=8, seed=0, optimizer="sgd")  # one pass = the same batch
    for (n, p), g in zip(params.items(), grads):
        torch.testing.assert_close(p.detach(), before[n] - 0.5 * scale * g, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="optimizer must be one of adamw, sgd"):
        local_train(model, examples, BYTES, steps=1, optimizer="lion")


def test_local_train_counts_epochs_and_checks_its_arguments():
    model = attach_lora(build_model("tiny", seed=0), seed=0)
    examples = generate_examples(20, 0)
    assert local_train(model, examples, BYTES, epochs=1.5, batch_size=8)["steps"] == 4  # ceil(1.5 * 20 / 8)
    with pytest.raises(ValueError, match="exactly one of"):
        local_train(model, examples, BYTES, steps=2, epochs=1)
    with pytest.raises(ValueError, match=r"not all LoRA \(e.g. model.embed_tokens.weight\).*attach_lora"):
        local_train(build_model("tiny"), examples, BYTES, steps=1)  # would silently full-fine-tune
    with pytest.raises(ValueError, match="are none"):
        local_train(build_model("tiny").requires_grad_(False), examples, BYTES, steps=1)


# --- evaluation -----------------------------------------------------------------------------------

class _TableModel(torch.nn.Module):
    """Predicts the next token from the current one by a fixed table (eos when unlisted), with probability P."""

    P = 0.5
    NEXT = {ord("\n"): ord("4"), ord("4"): ord("2")}

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # evaluate reads the device from the parameters

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False):
        predicted = input_ids.clone().apply_(lambda t: self.NEXT.get(t, BYTES.eos_id))
        probs = torch.full((*input_ids.shape, BYTES.vocab_size), (1 - self.P) / (BYTES.vocab_size - 1))
        probs.scatter_(2, predicted[..., None], self.P)
        return SimpleNamespace(logits=probs.log(), cache=None)


def test_evaluate_on_a_stub_gives_hand_computed_loss_and_accuracy():
    examples = [  # the stub always answers "42" (prompts end in "\n"); prompts differ in length
        {"instruction": "Add the numbers.", "input": "40+2", "output": "42", "category": "add"},
        {"instruction": "Compute the sum.", "input": "40+1", "output": "41", "category": "add"},
        {"instruction": "Copy the text.", "input": "42", "output": " 42 ", "category": "copy"},
    ]
    result = evaluate(_TableModel(), examples, BYTES, batch_size=2, max_new_tokens=5)
    hit, miss = -math.log(0.5), -math.log(0.5 / 258)
    # "42"+eos: 3 hits. "41"+eos: '4' hit, '1' miss (2 expected), eos hit. " 42 "+eos: ' ' miss, '4' miss
    # (after ' ' the stub expects eos), '2' hit, ' ' miss, eos hit.
    assert result["categories"]["add"] == {"loss": pytest.approx((5 * hit + miss) / 6), "accuracy": 0.5, "num_examples": 2}
    assert result["categories"]["copy"] == {"loss": pytest.approx((2 * hit + 3 * miss) / 5), "accuracy": 1.0,
                                            "num_examples": 1}
    assert result["loss"] == pytest.approx((7 * hit + 4 * miss) / 11)
    assert result["accuracy"] == pytest.approx(2 / 3) and result["num_examples"] == 3


def _reference_greedy(model, prompt, max_new_tokens):
    ids = list(prompt)
    for _ in range(max_new_tokens):
        token = model(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item()
        if token == BYTES.eos_id:
            break
        ids.append(token)
    return ids[len(prompt):]


@torch.no_grad()
def test_batched_cached_greedy_matches_one_prompt_at_a_time():
    model = build_model("tiny", seed=4, dtype=torch.float64).eval()  # float64: no near-tie flips
    prompts = [BYTES.encode(text) for text in ("### Instruction:\nCopy", "ab", "### Input:\nxyz\n### Response:\n")]
    got = fl_train._greedy(model, prompts, BYTES.pad_id, BYTES.eos_id, max_new_tokens=6)
    assert got == [_reference_greedy(model, p, 6) for p in prompts]


# --- pre-trained base -----------------------------------------------------------------------------

def test_pretrained_base_trains_once_then_loads_from_the_cache(tmp_path, monkeypatch):
    recipe = PretrainRecipe(steps=3, batch_size=4, seq_len=32, corpus_examples=60)
    first = pretrained_base("tiny", cache_dir=tmp_path, recipe=recipe)
    files = list(tmp_path.glob("pretrained-tiny-*.safetensors"))
    assert len(files) == 1
    assert not torch.equal(first.lm_head.weight, build_model("tiny").lm_head.weight)  # it did train

    def no_training(*args, **kwargs):
        raise AssertionError("trained again despite the cache")

    monkeypatch.setattr(fl_model, "train_steps", no_training)
    monkeypatch.setenv("GRADCODEC_CACHE", str(tmp_path))
    second = pretrained_base("tiny", recipe=recipe)  # found through $GRADCODEC_CACHE
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())
    with pytest.raises(AssertionError, match="trained again"):  # another recipe is another cache entry
        pretrained_base("tiny", cache_dir=tmp_path, recipe=PretrainRecipe(steps=4, batch_size=4, seq_len=32,
                                                                          corpus_examples=60))
    with pytest.raises(ValueError, match="byte-vocabulary presets.*--no-pretrained"):
        pretrained_base("llama-7b", cache_dir=tmp_path)


@pytest.mark.slow
def test_default_base_knows_something_and_lora_improves_it(tmp_path):
    base = pretrained_base(cache_dir=tmp_path)
    held_out = generate_examples(210, 7)
    before = evaluate(base, held_out, BYTES)
    model = attach_lora(base, seed=0)
    local_train(model, generate_examples(2000, 11), BYTES, steps=300, lr=3e-3, batch_size=16, seed=0)
    after = evaluate(model, held_out, BYTES)
    assert before["loss"] < 0.5 * math.log(BYTES.vocab_size)  # far better than a uniform guess
    assert after["loss"] < before["loss"] - 0.2 and after["accuracy"] > before["accuracy"] + 0.1
