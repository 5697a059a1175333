"""Privacy accounting for DP federated training: ε at δ after T rounds of the sampled Gaussian mechanism.

Each round samples every client with probability `sample_rate` (Poisson sampling) and releases its
update clipped to L2 norm C with Gaussian noise of standard deviation noise · C (DP-FedAvg; Flower's
DifferentialPrivacy*FixedClipping wrappers add it to the sum on the server, gradcodec's `dp` stage on
each client). The privacy loss of T such rounds is computed by Google's `dp-accounting` library
(`pip install 'gradcodec[dp]'`): the Rényi-DP accountant by default (Mironov 2017; a valid upper
bound, fast), or the privacy-loss-distribution accountant (tighter, ~1 s per call).

Neighbouring datasets differ by adding or removing one client (client-level DP). What the ε means
depends on who sees what (docs/codecs.md, "Differential privacy"):

* an observer of the aggregated model (central noise, or the `dp` stage behind secure aggregation):
  `epsilon(noise, sample_rate, rounds)`;
* the server seeing one client's individually noised uploads (the `dp` stage without secure
  aggregation): the server knows who took part and any change of the client's data may move its
  clipped update across the whole ball, so the sensitivity is 2C and there is no sampling amplification:
  `epsilon(noise / 2, 1.0, rounds_the_client_took_part_in)`.
"""
from __future__ import annotations

import contextlib
import logging
import math

from .errors import InvalidInput

ACCOUNTANTS = ("rdp", "pld")


def epsilon(noise: float, sample_rate: float, rounds: int, delta: float = 1e-5, accountant: str = "rdp") -> float:
    """ε at `delta` after `rounds` rounds with noise multiplier `noise` and client sampling rate `sample_rate`.

    noise 0 gives ∞ (nothing is private); rounds 0 gives 0.
    """
    _check(noise, sample_rate, rounds, delta, accountant)
    if rounds == 0 or noise == 0:
        return 0.0 if rounds == 0 else math.inf
    acc = _accountant(accountant)
    with _quiet():
        acc.compose(_round_event(noise, sample_rate), rounds)
        return float(acc.get_epsilon(delta))


def epsilon_per_round(noise: float, sample_rate: float, rounds: int, delta: float = 1e-5,
                      accountant: str = "rdp") -> list[float]:
    """ε at `delta` after each of rounds 1..`rounds` (one list entry per round; see `epsilon`)."""
    _check(noise, sample_rate, rounds, delta, accountant)
    if noise == 0:
        return [math.inf] * rounds
    event, acc = _round_event(noise, sample_rate), _accountant(accountant)
    out = []
    with _quiet():
        for _ in range(rounds):
            acc.compose(event)
            out.append(float(acc.get_epsilon(delta)))
    return out


def _check(noise: float, sample_rate: float, rounds: int, delta: float, accountant: str) -> None:
    if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
        raise InvalidInput(f"noise multiplier must be a finite number >= 0, got {noise!r}")
    if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
        raise InvalidInput(f"sample_rate is the probability a client takes part in a round, in (0, 1]; got {sample_rate!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise InvalidInput(f"rounds must be an integer >= 0, got {rounds!r}")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise InvalidInput(f"delta must be in (0, 1), got {delta!r}")
    if accountant not in ACCOUNTANTS:
        raise InvalidInput(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")


def _round_event(noise: float, sample_rate: float):
    """One round: each client sampled with probability sample_rate, its update through the Gaussian mechanism."""
    dp_accounting = _library()
    return dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise))


def _accountant(name: str):
    dp_accounting = _library()
    return dp_accounting.rdp.RdpAccountant() if name == "rdp" else dp_accounting.pld.PLDAccountant()


def _library():
    try:
        import dp_accounting
        import dp_accounting.pld
        import dp_accounting.rdp
    except ImportError as e:
        raise ImportError("privacy accounting needs dp-accounting: pip install 'gradcodec[dp]'") from e
    return dp_accounting


@contextlib.contextmanager
def _quiet():
    """Silence absl's warnings about fractional RDP orders the library drops (they do not change ε)."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
