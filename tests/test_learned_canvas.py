"""The LoRA canvas layout: exact round trips for any rank and target set, layout from names and shapes alone."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcodec.errors import InvalidInput
from gradcodec.integrations.fedlora.model import lora_shapes
from gradcodec.learned.canvas import CanvasLayout, adapter_from_lora_canvas, lora_canvas_from_adapter

TARGET_SETS = {
    "qkvo": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qv": ("q_proj", "v_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


def adapter(shapes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}


@pytest.mark.parametrize("targets", sorted(TARGET_SETS))
@pytest.mark.parametrize("rank", [4, 8, 16])
def test_round_trip_is_exact_for_every_rank_and_target_set(rank, targets):
    x = adapter(lora_shapes("tiny", rank, TARGET_SETS[targets]))
    layout = CanvasLayout.of(x)
    y = adapter_from_lora_canvas(lora_canvas_from_adapter(x, layout), layout)
    assert list(y) == list(x)
    for k in x:
        assert torch.equal(y[k], x[k]), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_factors_round_trip_exactly_in_float32(dtype):
    x = adapter(lora_shapes("tiny", 8), dtype=dtype)
    layout = CanvasLayout.of(x)
    y = adapter_from_lora_canvas(lora_canvas_from_adapter(x, layout), layout)
    assert all(torch.equal(y[k], x[k].float()) for k in x)


def test_llama_7b_qkvo_rank_8_is_the_papers_canvas():
    layout = CanvasLayout.for_shapes(lora_shapes("llama-7b", 8))
    assert layout.shape == (4096, 2048) and layout.padding_fraction == 0


def test_grouped_query_attention_pads_the_short_factors():
    """tiny has 2 KV heads per 4 query heads: k/v B factors are 64 x r in a 128-row canvas."""
    layout = CanvasLayout.for_shapes(lora_shapes("tiny", 8))
    assert layout.height == 128 and layout.width == 2 * 4 * 4 * 8
    assert layout.padding_fraction == pytest.approx(2 * 64 / (8 * 128))
    kv_b = [f for f in layout.factors if f.name.endswith(("k_proj.lora_B.weight", "v_proj.lora_B.weight"))]
    assert kv_b and all(f.length == 64 and f.folds == 1 for f in kv_b)


def test_factors_longer_than_the_canvas_fold_into_several_column_blocks():
    layout = CanvasLayout.for_shapes(lora_shapes("tiny", 8, TARGET_SETS["all"]))
    assert layout.height == 128  # the hidden size is the most common long side
    gate_b = next(f for f in layout.factors if f.name.endswith("gate_proj.lora_B.weight"))
    assert gate_b.length == 344 and gate_b.folds == 3


def test_a_factors_are_transposed_and_b_factors_are_not():
    x = {"l.lora_A.weight": torch.arange(12.0).view(3, 4), "l.lora_B.weight": torch.arange(8.0).view(4, 2)}
    canvas = lora_canvas_from_adapter(x)
    assert torch.equal(canvas[:, :3], x["l.lora_A.weight"].t())
    assert torch.equal(canvas[:, 3:], x["l.lora_B.weight"])


def test_the_layout_depends_only_on_names_shapes_and_order():
    shapes = lora_shapes("tiny", 8)
    a, b = CanvasLayout.for_shapes(shapes), CanvasLayout.of(adapter(shapes, seed=3))
    assert a == b and a.digest() == b.digest()
    reordered = dict(reversed(list(shapes.items())))
    assert CanvasLayout.for_shapes(reordered).digest() != a.digest()


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), (0, 8), ()])
def test_non_matrix_tensors_are_refused(shape):
    with pytest.raises(InvalidInput, match="2-D factors"):
        CanvasLayout.for_shapes({"t": shape})


def test_unpacking_checks_the_canvas_size():
    layout = CanvasLayout.for_shapes(lora_shapes("tiny", 4))
    with pytest.raises(InvalidInput, match="smaller than the layout"):
        adapter_from_lora_canvas(torch.zeros(128, 10), layout)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 70), st.integers(1, 9), st.booleans()), min_size=1, max_size=6),
       st.one_of(st.none(), st.integers(1, 80)))
def test_any_set_of_matrices_round_trips(factors, height):
    shapes = {f"t{i}": ((r, n) if a else (n, r)) for i, (n, r, a) in enumerate(factors)}
    x = adapter(shapes)
    layout = CanvasLayout.of(x, height)
    canvas = lora_canvas_from_adapter(x, layout)
    assert canvas.shape == layout.shape
    assert int((canvas != 0).sum()) <= layout.numel
    y = adapter_from_lora_canvas(canvas, layout)
    assert all(torch.equal(y[k], x[k]) for k in x)
