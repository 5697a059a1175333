"""Tests of gradcodec.integrations.peft: LoRA adapters as named tensors, deltas and FedAvg."""
import pytest
import torch
from peft import LoraConfig, get_peft_model

from gradcodec.integrations.fedlora.model import attach_lora, build_model
from gradcodec.integrations.peft import apply_delta, fedavg, load_lora_state, lora_delta, lora_state


@pytest.fixture(scope="module")
def tiny_lora():
    return attach_lora(build_model("tiny", seed=0), rank=4, seed=0)


def _random_like(state, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in state.items()}


def test_lora_state_names_shapes_and_copies(tiny_lora):
    state = lora_state(tiny_lora)
    assert len(state) == 4 * 4 * 2  # 4 layers x q,k,v,o x A,B
    assert state["model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 128)
    assert state["model.layers.3.self_attn.k_proj.lora_B.weight"].shape == (64, 4)  # 2 KV heads of 32
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" and not v.requires_grad for v in state.values())
    state["model.layers.0.self_attn.q_proj.lora_A.weight"].add_(1.0)  # a copy: the model is untouched
    assert not torch.equal(state["model.layers.0.self_attn.q_proj.lora_A.weight"],
                           lora_state(tiny_lora)["model.layers.0.self_attn.q_proj.lora_A.weight"])


PEFT_PROBES_DEPRECATED = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


@PEFT_PROBES_DEPRECATED
def test_names_do_not_depend_on_the_adapter_name(tiny_lora):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    other = get_peft_model(build_model("tiny", seed=0), config, adapter_name="client7")
    assert {k: v.shape for k, v in lora_state(other).items()} == {k: v.shape for k, v in lora_state(tiny_lora).items()}


def test_load_lora_state_round_trips_exactly(tiny_lora):
    target = attach_lora(build_model("tiny", seed=1), rank=4, seed=1)
    wanted = _random_like(lora_state(tiny_lora), seed=0)
    load_lora_state(target, wanted)
    got = lora_state(target)
    assert got.keys() == wanted.keys() and all(torch.equal(got[k], wanted[k]) for k in wanted)


def test_load_lora_state_rejects_wrong_shape_and_names_without_loading_anything():
    model = attach_lora(build_model("tiny", seed=0), rank=4, seed=0)
    before = lora_state(model)
    rank8 = lora_state(attach_lora(build_model("tiny", seed=0), rank=8, seed=0))
    with pytest.raises(ValueError, match=r"wrong shape.*\(8, 128\) instead of \(4, 128\)"):
        load_lora_state(model, rank8)
    missing = dict(before)
    del missing["model.layers.2.self_attn.v_proj.lora_B.weight"]
    missing["model.layers.9.self_attn.v_proj.lora_B.weight"] = torch.zeros(64, 4)
    with pytest.raises(ValueError, match="missing.*layers.2.*unexpected.*layers.9"):
        load_lora_state(model, missing)
    assert all(torch.equal(before[k], v) for k, v in lora_state(model).items())


@PEFT_PROBES_DEPRECATED
def test_models_without_plain_lora_are_refused():
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora_state(build_model("tiny"))
    dora = get_peft_model(build_model("tiny"), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="besides the LoRA A/B"):
        lora_state(dora)


def test_fedavg_matches_a_hand_computation():
    s1 = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0, 4.0]])}
    s2 = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([[8.0, -4.0]])}
    s3 = {"a": torch.tensor([100.0, 100.0]), "b": torch.tensor([[100.0, 100.0]])}
    avg = fedavg([s1, s2, s3], [1, 3, 0])
    assert torch.equal(avg["a"], torch.tensor([2.5, 3.5]))  # (1*1 + 3*3)/4, (1*2 + 3*4)/4
    assert torch.equal(avg["b"], torch.tensor([[6.0, -2.0]]))  # (0 + 24)/4, (4 - 12)/4
    assert avg["a"].dtype == torch.float32


def test_fedavg_of_one_state_is_that_state():
    state = _random_like({"x": torch.empty(3, 5)}, seed=2)
    assert torch.equal(fedavg([state], [7.0])["x"], state["x"])


@pytest.mark.parametrize("states, weights, problem", [
    ([{"a": torch.zeros(2)}, {"b": torch.zeros(2)}], [1, 1], "names differ"),
    ([{"a": torch.zeros(2)}, {"a": torch.zeros(3)}], [1, 1], "wrong shape"),
    ([{"a": torch.zeros(2)}, {"a": torch.zeros(2)}], [0, 0], "sum to 0"),
    ([{"a": torch.zeros(2)}, {"a": torch.zeros(2)}], [2, -1], ">= 0"),
    ([{"a": torch.zeros(2)}], [1, 1], "one weight per state"),
    ([], [], "at least one state"),
])
def test_fedavg_refuses_bad_input(states, weights, problem):
    with pytest.raises(ValueError, match=problem):
        fedavg(states, weights)


def test_delta_and_apply_are_inverse():
    base = {"a": torch.tensor([1.0, -2.0, 0.5])}
    state = {"a": torch.tensor([1.5, -1.0, 0.0])}
    delta = lora_delta(state, base)
    assert torch.equal(delta["a"], torch.tensor([0.5, 1.0, -0.5]))
    assert torch.equal(apply_delta(base, delta)["a"], state["a"])
    with pytest.raises(ValueError, match="names differ"):
        apply_delta(base, {"b": torch.zeros(3)})
