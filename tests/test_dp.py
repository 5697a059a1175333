"""The `dp` stage (clip the whole update, add Gaussian noise, then any codec) and gradcodec.privacy."""
from __future__ import annotations

import math

import pytest
import torch

import gradcodec
from gradcodec import privacy
from gradcodec.codecs.dp import update_norm
from gradcodec.errors import InvalidInput

dp_accounting = pytest.importorskip("dp_accounting")


def update(seed: int = 0, scale: float = 1.0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.A": (scale * torch.randn(8, 96, generator=g)).to(dtype),
        "layer.B": (scale * torch.randn(96, 8, generator=g)).to(dtype),
        "bias": (scale * torch.randn(33, generator=g)).to(dtype),
    }


def prepare(spec: str, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the dp stage of `spec` hands to the codec."""
    return gradcodec.get_codec(spec).prepass.prepare(named)


def flat(named: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.double().reshape(-1) for t in named.values()])


# ====================================================================== clipping


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scale", [0.3, 1.0, 7.0, 1e4])
@pytest.mark.parametrize("clip", [0.05, 1.0, 3.7])
def test_clipped_norm_never_exceeds_clip(dtype, scale, clip):
    out = prepare(f"dp:clip={clip},noise=0|raw", update(scale=scale, dtype=dtype))
    assert update_norm(out) <= clip
    assert all(t.dtype == dtype for t in out.values())


def test_clipping_scales_the_whole_update_by_one_factor_not_each_tensor():
    x = update(scale=2.0)
    norm = flat(x).norm().item()
    out = prepare("dp:clip=1.5,noise=0|raw", x)
    for k in x:  # hand-computed: every tensor times clip / ||whole update||
        torch.testing.assert_close(out[k], x[k] * (1.5 / norm), rtol=2e-6, atol=0)
    assert update_norm(out) == pytest.approx(1.5, rel=1e-5)


def test_an_update_within_the_bound_is_left_as_it_is():
    x = update(scale=0.01)
    out = prepare("dp:clip=100,noise=0|raw", x)
    assert all(out[k] is x[k] for k in x)


# ====================================================================== noise


def test_noise_std_matches_noise_times_clip():
    n, clip, mult = 400_000, 0.5, 0.8
    out = prepare(f"dp:clip={clip},noise={mult}|raw", {"z": torch.zeros(n)})["z"].double()
    sigma = mult * clip
    se = sigma / math.sqrt(2 * n)  # standard error of a sample standard deviation
    assert abs(out.std().item() - sigma) < 5 * se
    assert abs(out.mean().item()) < 5 * sigma / math.sqrt(n)


def test_noise_is_added_to_the_clipped_update():
    x = update(scale=3.0)
    seeded = "dp:clip=1.0,noise=0.5,seed=7|raw"
    noised, clipped = prepare(seeded, x), prepare("dp:clip=1.0,noise=0|raw", x)
    residual = flat(noised) - flat(clipped)
    assert residual.std().item() == pytest.approx(0.5, rel=0.1)
    torch.testing.assert_close(flat(prepare(seeded, x)), flat(noised), rtol=0, atol=0)  # the test seed repeats


def test_without_a_seed_every_encode_draws_fresh_noise_whatever_the_codec_seed():
    x = update()
    a = gradcodec.decode(gradcodec.get_codec("dp:clip=1,noise=1|raw", seed=3).encode(x))
    b = gradcodec.decode(gradcodec.get_codec("dp:clip=1,noise=1|raw", seed=3).encode(x))
    assert not torch.equal(flat(a), flat(b))


def test_a_seeded_stage_draws_new_noise_on_each_encode():
    codec = gradcodec.get_codec("dp:clip=1,noise=1,seed=1|raw")
    x = update()
    assert not torch.equal(flat(gradcodec.decode(codec.encode(x))), flat(gradcodec.decode(codec.encode(x))))


# ====================================================================== specs and payloads


def test_payload_names_neither_dp_nor_its_seed_and_decodes_without_it():
    codec = gradcodec.get_codec("dp:clip=2,noise=0.5,seed=1234|int4")
    blob = codec.encode(update())
    assert gradcodec.inspect(blob).codec == "int4:block=64" == codec.payload_spec
    assert codec.spec == "dp:clip=2.0,noise=0.5|int4:block=64"
    assert gradcodec.get_codec(codec.spec).spec == codec.spec  # the spec rebuilds the codec, seed aside
    assert "1234" not in codec.spec and b"1234" not in blob
    torch.testing.assert_close(flat(codec.decode(blob)), flat(gradcodec.decode(blob)), rtol=0, atol=0)
    assert not codec.lossless and not gradcodec.get_codec("dp:clip=1,noise=0|raw").lossless


@pytest.mark.parametrize("spec", ["raw", "int8", "int4:stochastic=true", "sign", "topk:ratio=0.05|int8",
                                  "randk:ratio=0.1|fp16", "qsgd", "powersgd:rank=2|fp16", "int8|zstd"])
@pytest.mark.parametrize("error_feedback", [False, True])
def test_noise_zero_within_the_bound_gives_the_payload_of_the_codec_alone(spec, error_feedback):
    """Bit-identical needs: no payload trace of the stage, no arithmetic on the tensors (not even
    x * 1.0 or x + 0.0, which turns -0.0 into 0.0), and no draws from the codec's random stream."""
    x = update(scale=0.05)
    x["layer.A"][0, :4] = -0.0
    assert update_norm(x) < 10
    if error_feedback and spec == "raw":
        pytest.skip("raw is lossless: no error feedback")
    plain = gradcodec.get_codec(spec, seed=11, error_feedback=error_feedback)
    private = gradcodec.get_codec(f"dp:clip=10,noise=0|{spec}", seed=11, error_feedback=error_feedback)
    for round_ in range(3):
        assert plain.encode(x) == private.encode(x), round_


# ====================================================================== error feedback


def test_error_feedback_residual_is_of_the_noised_update():
    """residual_after = noised_clipped_update + old_residual - decoded, round after round."""
    spec = "dp:clip=1.0,noise=0.3,seed=5|int4"
    codec = gradcodec.get_codec(spec, error_feedback=True)
    reference = gradcodec.get_codec(spec.replace("int4", "raw"))  # same noise stream, nothing lost
    old = {k: torch.zeros_like(v) for k, v in update().items()}
    for round_ in range(3):
        x = update(seed=round_, scale=2.0)
        noised = gradcodec.decode(reference.encode(x))
        decoded = gradcodec.decode(codec.encode(x))
        for k in x:
            torch.testing.assert_close(codec.residuals[k], noised[k] + old[k] - decoded[k], rtol=0, atol=2e-6)
        clipped = prepare("dp:clip=1.0,noise=0|raw", x)
        assert not torch.allclose(codec.residuals["bias"], clipped["bias"] + old["bias"] - decoded["bias"], atol=1e-2)
        old = {k: r.clone() for k, r in codec.residuals.items()}


# ====================================================================== bad input


@pytest.mark.parametrize("spec, problem", [
    ("dp:clip=0|int4", "clip must be > 0"),
    ("dp:clip=-1|int4", "clip must be > 0"),
    ("dp:noise=-0.1|int4", "noise must be >= 0"),
    ("int4|dp:clip=1", "'dp' acts on the whole update and must be the first stage"),
    ("topk:ratio=0.1|dp:clip=1|int8", "'dp' acts on the whole update and must be the first stage"),
    ("dp|dp|int8", "must be the first stage"),
    ("dp:clip=inf|int8", "finite number"),
])
def test_bad_parameters_and_placement_are_refused(spec, problem):
    with pytest.raises(InvalidInput, match=problem):
        gradcodec.get_codec(spec)


def test_integer_tensors_and_nonfinite_updates_are_refused():
    codec = gradcodec.get_codec("dp:clip=1,noise=1|int8")
    with pytest.raises(InvalidInput, match="'step' is torch.int64"):
        codec.encode({"w": torch.randn(8), "step": torch.tensor(3)})
    bad = torch.randn(8)
    bad[2] = float("nan")
    with pytest.raises(InvalidInput, match="'w' contains NaN"):
        codec.encode({"w": bad})


# ====================================================================== accounting


@pytest.mark.parametrize("noise, q, rounds", [(0.7, 0.2, 8), (1.0, 0.05, 30), (2.5, 1.0, 3)])
def test_epsilon_matches_the_librarys_own_computation(noise, q, rounds):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise)), rounds)
    rdp = dp_accounting.rdp.RdpAccountant()
    rdp.compose(event)
    assert privacy.epsilon(noise, q, rounds, delta=1e-5) == pytest.approx(rdp.get_epsilon(1e-5), rel=1e-9)
    pld = dp_accounting.pld.PLDAccountant()
    pld.compose(event)
    assert privacy.epsilon(noise, q, rounds, 1e-5, accountant="pld") == pytest.approx(pld.get_epsilon(1e-5), rel=1e-6)


def _gaussian_delta(eps: float, mu: float) -> float:
    phi = lambda v: 0.5 * math.erfc(-v / math.sqrt(2))  # noqa: E731
    return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)


def test_unsampled_epsilon_matches_the_analytic_gaussian_mechanism():
    """q = 1: T rounds at multiplier σ are one Gaussian mechanism with μ = √T / σ (Balle & Wang 2018),
    whose exact δ(ε) we invert by bisection. PLD is near exact, RDP an upper bound."""
    noise, rounds, delta = 2.0, 4, 1e-5
    lo, hi = 0.0, 50.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _gaussian_delta(mid, math.sqrt(rounds) / noise) > delta else (lo, mid)
    exact = hi
    pld = privacy.epsilon(noise, 1.0, rounds, delta, accountant="pld")
    assert pld == pytest.approx(exact, rel=0.01)
    assert exact <= privacy.epsilon(noise, 1.0, rounds, delta) <= 1.2 * exact


def test_epsilon_grows_with_rounds_and_falls_with_noise():
    per_round = privacy.epsilon_per_round(1.0, 0.2, 12)
    assert all(a < b for a, b in zip(per_round, per_round[1:]))
    assert per_round[-1] == privacy.epsilon(1.0, 0.2, 12)
    assert privacy.epsilon(2.0, 0.2, 12) < privacy.epsilon(1.0, 0.2, 12) < privacy.epsilon(0.5, 0.2, 12)


def test_no_noise_is_no_privacy_and_no_rounds_cost_nothing():
    assert privacy.epsilon(0.0, 0.2, 5) == math.inf
    assert privacy.epsilon(1.0, 0.2, 0) == 0.0


@pytest.mark.parametrize("args, problem", [
    ((-1.0, 0.2, 5), "noise multiplier"), ((1.0, 0.0, 5), "sample_rate"), ((1.0, 1.5, 5), "sample_rate"),
    ((1.0, 0.2, -1), "rounds"), ((1.0, 0.2, 2.5), "rounds"),
])
def test_accounting_refuses_bad_parameters(args, problem):
    with pytest.raises(InvalidInput, match=problem):
        privacy.epsilon(*args)
    with pytest.raises(InvalidInput, match="delta"):
        privacy.epsilon(1.0, 0.2, 5, delta=0.0)


def test_error_feedback_behind_dp_with_a_raw_codec_sends_the_private_update_and_keeps_no_residual():
    """raw float32 hands its input on as the section: the residual must not be computed in place on it."""
    x = update(scale=3.0)
    codec = gradcodec.get_codec("dp:clip=1.0,noise=0|raw", error_feedback=True)
    torch.testing.assert_close(flat(gradcodec.decode(codec.encode(x))), flat(prepare("dp:clip=1.0,noise=0|raw", x)), rtol=0, atol=0)
    assert all(not r.any() for r in codec.residuals.values())
