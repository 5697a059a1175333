"""The AutoEncoders: ratios as one parameter, shapes, and TGAP training that measurably learns."""
import pytest
import torch

from gradcodec.errors import InvalidInput
from gradcodec.integrations.fedlora.model import lora_shapes
from gradcodec.learned.canvas import CanvasLayout
from gradcodec.learned.model import AEConfig, AutoEncoder, build_decoder, build_encoder
from gradcodec.learned.tgap import TrainConfig, reconstruction_loss, canvas_mask, normalised_canvases, train_autoencoder

TINY = CanvasLayout.for_shapes(lora_shapes("tiny", 8))


@pytest.mark.parametrize("ratio,channels", [(1 / 16, 256), (1 / 64, 64), (1 / 256, 16)])
def test_conv_ratio_is_one_parameter(ratio, channels):
    cfg = AEConfig.conv(TINY, ratio)
    assert cfg.latent_channels == channels and cfg.ratio == ratio
    z = build_encoder(cfg)(torch.zeros(2, *TINY.shape))
    assert z.shape == (2, *cfg.latent_shape) == (2, channels, 2, 4)
    assert build_decoder(cfg)(z).shape == (2, *TINY.shape)


def test_the_papers_configuration_on_llama_7b_is_six_stages_and_64_channels():
    cfg = AEConfig.conv(CanvasLayout.for_shapes(lora_shapes("llama-7b", 8)))
    assert len(cfg.channels) == 6 and cfg.latent_shape == (64, 64, 32) and cfg.ratio == 1 / 64


@pytest.mark.parametrize("ratio", [1 / 16, 1 / 64, 1 / 256])
def test_block_ratio_and_shapes(ratio):
    cfg = AEConfig.block(TINY, ratio)
    assert cfg.ratio == ratio and (cfg.block_rows, cfg.block_cols) == (128, 8)
    ae = AutoEncoder(cfg)
    assert ae.encoder(torch.zeros(3, *TINY.shape)).shape == (3, *cfg.latent_shape)
    assert ae(torch.zeros(3, *TINY.shape)).shape == (3, *TINY.shape)


def test_conv_ae_takes_any_canvas_size_and_pads_it():
    cfg = AEConfig.conv(CanvasLayout.for_shapes({"a": (3, 40), "b": (40, 5)}), ratio=1 / 16, stages=2)
    assert cfg.padded_shape == (40, 8) and cfg.latent_shape == (1, 10, 2)
    assert AutoEncoder(cfg)(torch.randn(1, 40, 8)).shape == (1, 40, 8)


@pytest.mark.parametrize("bad", [dict(ratio=1 / 3), dict(ratio=1 / 8192)])
def test_impossible_conv_ratios_are_refused(bad):
    with pytest.raises(InvalidInput):
        AEConfig.conv(TINY, **bad)


def test_config_round_trips_through_json_and_refuses_unknown_fields():
    cfg = AEConfig.conv(TINY, 1 / 64, width=4)
    assert AEConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(InvalidInput, match="unknown fields"):
        AEConfig.from_json(cfg.to_json()[:-1] + ',"future":1}')


def low_rank_set(n: int, layout: CanvasLayout, rank: int = 3, seed: int = 0, draw: int = 0) -> list[dict]:
    """Updates spanned by `rank` fixed random adapters (from `seed`): a set an AE can learn. `draw`
    seeds the coefficients, so other draws are new samples of the same span."""
    g = torch.Generator().manual_seed(seed)
    basis = [{f.name: torch.randn(f.shape, generator=g) for f in layout.factors} for _ in range(rank)]
    g.manual_seed(1000 + draw)
    out = []
    for _ in range(n):
        c = torch.randn(rank, generator=g)
        out.append({k: sum(c[i] * basis[i][k] for i in range(rank)) for k in basis[0]})
    return out


SMALL = CanvasLayout.for_shapes({"l0.lora_A": (4, 32), "l0.lora_B": (32, 4), "l1.lora_A": (4, 32), "l1.lora_B": (32, 4)})


@pytest.mark.parametrize("arch", ["conv", "block"])
def test_a_few_adam_steps_reduce_the_loss_on_a_low_rank_set(arch):
    train = low_rank_set(48, SMALL)
    cfg = AEConfig.conv(SMALL, 1 / 4, stages=2, width=8) if arch == "conv" else AEConfig.block(SMALL, 1 / 8)
    x = normalised_canvases(train, SMALL, SMALL.shape)
    mask = canvas_mask(SMALL, SMALL.shape)
    torch.manual_seed(0)
    before = reconstruction_loss(AutoEncoder(cfg).eval()(x), x, mask, "mse").item()
    model = train_autoencoder(train, cfg, TrainConfig(steps=60, lr=3e-3, batch_size=8, init="random"))
    after = reconstruction_loss(AutoEncoder(cfg, model.encoder, model.decoder).eval()(x), x, mask, "mse").item()
    assert after < 0.5 * before, (before, after)


def test_pca_start_reconstructs_the_span_it_was_fitted_on():
    """Rank-3 updates, 4 latents per tile: the principal directions hold all the energy."""
    train, held = low_rank_set(40, SMALL), low_rank_set(10, SMALL, draw=1)
    model = train_autoencoder(train, AEConfig.block(SMALL, 1 / 8, block_rows=16), TrainConfig(steps=0))
    x = normalised_canvases(held, SMALL, SMALL.shape)
    loss = reconstruction_loss(AutoEncoder(model.config, model.encoder, model.decoder).eval()(x), x,
                               canvas_mask(SMALL, SMALL.shape), "nmse").item()
    assert loss < 0.02


@pytest.mark.parametrize("loss", ["mse", "nmse", "cosine"])
def test_losses_are_zero_for_a_perfect_reconstruction_and_positive_otherwise(loss):
    x = normalised_canvases(low_rank_set(4, SMALL), SMALL, SMALL.shape)
    mask = canvas_mask(SMALL, SMALL.shape)
    assert reconstruction_loss(x, x, mask, loss).item() == pytest.approx(0, abs=1e-6)
    assert reconstruction_loss(-x, x, mask, loss).item() > 0.5
