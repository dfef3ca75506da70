"""The accounting against the Gaussian mechanism's exact privacy profile.

Why a closed form and a second library: `common.dp.accounting` turns (ε, δ, releases) into a
noise scale through dp-accounting's PLD of the discrete Gaussian, with OpenDP's zCDP maps as a
second bound. If that chain were loose, every run would add more noise than it needs; if it
were unsound, the stated ε would be a lie. The exact (ε, δ) curve of a Gaussian mechanism
(Balle & Wang 2018, Thm. 8) settles both: the discrete Gaussian's curve is that of the
continuous one up to the lattice, so the stated ε must sit on it, and the zCDP bound above it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import dp_event, pld, rdp
from scipy.optimize import brentq
from scipy.stats import norm

from common.dp.accounting import (
    Gaussians,
    calibrate,
    distributed_tau,
    epsilon_of,
    epsilon_of_rho,
    pld_epsilon,
    rho_per_release,
    zcdp_epsilon,
)
from common.dp.settings import PrivacySettings
from common.errors import FedmergeError

# (σ per release, releases K, δ): small and large noise, one and many releases.
CASES = [(1.0, 1, 1e-5), (2.5, 11, 1e-6), (5.0, 11, 1e-6), (20.0, 11, 1e-6), (3.0, 50, 1e-8)]


def pld_accountant() -> pld.PLDAccountant:
    """Google's PLD accountant; a 1e-3 grid keeps it fast and within 0.1% of exact here."""
    return pld.PLDAccountant(value_discretization_interval=1e-3)


def gaussian_delta(eps: float, scale: float, sensitivity: float = 1.0) -> float:
    """Balle & Wang's exact δ(ε) of a Gaussian mechanism with this scale and sensitivity."""
    a = sensitivity / (2.0 * scale)
    b = eps * scale / sensitivity
    return norm.cdf(a - b) - math.exp(eps) * norm.cdf(-a - b)


def exact_epsilon(scale: float, delta: float) -> float:
    """The smallest ε with δ(ε) ≤ delta (δ(ε) falls as ε grows)."""
    return brentq(lambda e: gaussian_delta(e, scale) - delta, 0.0, 500.0, xtol=1e-12)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.5, 17.7])
def test_rho_per_release_is_the_gaussian_zcdp(sigma):
    rho = rho_per_release(sigma)
    assert rho == pytest.approx(1.0 / (2.0 * sigma**2), abs=1e-12)
    # K releases compose to K·ρ, which is the ρ of one Gaussian of scale σ/√K.
    k = 11
    assert k * rho == pytest.approx(rho_per_release(sigma / math.sqrt(k)), rel=1e-12)


def test_composition_equals_one_gaussian_of_scale_sigma_over_sqrt_k():
    # The closed form itself: K-fold composition of N(0, σ²) on a unit shift is a shift of √K
    # in K dimensions, i.e. one Gaussian of scale σ/√K; dp-accounting agrees on the ε.
    sigma, k, delta = 5.0, 11, 1e-6
    composed = pld_accountant().compose(dp_event.GaussianDpEvent(sigma), k)
    single = pld_accountant().compose(dp_event.GaussianDpEvent(sigma / math.sqrt(k)))
    assert composed.get_epsilon(delta) == pytest.approx(single.get_epsilon(delta), rel=2e-3)
    assert composed.get_epsilon(delta) == pytest.approx(
        exact_epsilon(sigma / math.sqrt(k), delta), rel=5e-3
    )


@pytest.mark.parametrize(("sigma", "k", "delta"), CASES)
def test_epsilon_of_rho_is_sound_and_not_loose(sigma, k, delta):
    exact = exact_epsilon(sigma / math.sqrt(k), delta)
    # The closed form is right: its δ at the solved ε is the target.
    assert gaussian_delta(exact, sigma / math.sqrt(k)) == pytest.approx(delta, rel=1e-6)
    stated = epsilon_of_rho(k / (2.0 * sigma**2), delta)
    assert stated >= exact  # sound: never claims less privacy loss than the truth
    assert stated <= 1.25 * exact  # and not so loose that runs pay for noise they do not need


@pytest.mark.parametrize(("sigma", "k", "delta"), CASES)
def test_dp_accounting_agrees(sigma, k, delta):
    event = dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(sigma), k)
    pld_eps = pld_accountant().compose(event).get_epsilon(delta)
    rdp_eps = rdp.RdpAccountant().compose(event).get_epsilon(delta)
    exact = exact_epsilon(sigma / math.sqrt(k), delta)
    stated = epsilon_of_rho(k / (2.0 * sigma**2), delta)
    assert pld_eps == pytest.approx(exact, rel=5e-3)  # PLD is (numerically) exact
    assert stated >= pld_eps * (1 - 5e-3)
    # zCDP -> (ε, δ) and RDP -> (ε, δ) convert the same Rényi curve (measured within 1e-4).
    assert stated == pytest.approx(rdp_eps, rel=1e-2)


@pytest.mark.parametrize(("sigma", "k", "delta"), CASES)
def test_pld_bound_is_the_gaussian_curve_and_below_zcdp(sigma, k, delta):
    """The stated ε (PLD of the discrete Gaussian, composed K times) lies on the Gaussian
    mechanism's exact curve, and the zCDP bound lies above both."""
    exact = exact_epsilon(sigma / math.sqrt(k), delta)
    pld_eps = pld_epsilon([Gaussians(sigma, k)], delta)
    zcdp = zcdp_epsilon([Gaussians(sigma, k)], delta)
    # At σ = 1 the lattice itself moves the curve (by 1.2%); from σ = 2 on it is the grid's.
    assert pld_eps == pytest.approx(exact, rel=1e-2 if sigma >= 2 else 3e-2)
    assert zcdp >= exact
    # Heterogeneous releases compose: K at σ and K at 2σ is one Gaussian of scale
    # 1/√(K/σ² + K/(4σ²)) in the continuous limit.
    mixed = pld_epsilon([Gaussians(sigma, k), Gaussians(2 * sigma, k)], delta)
    # (Each composition can add up to one grid step, 1e-3, pessimistically.)
    assert mixed == pytest.approx(
        exact_epsilon(1.0 / math.sqrt(k / sigma**2 + k / (4 * sigma**2)), delta),
        rel=1e-2 if sigma >= 2 else 3e-2, abs=2 * k * 1e-3)


def discrete_gaussian(scale: float, half_width: int) -> np.ndarray:
    """N_Z(0, scale²) on [−half_width, half_width], normalised there."""
    x = np.arange(-half_width, half_width + 1)
    w = np.exp(-(x**2) / (2 * scale * scale))
    return w / w.sum()


def convolved(law: np.ndarray, times: int) -> np.ndarray:
    """The law of a sum of `times` independent draws from `law` (centred, odd length)."""
    total = law
    for _ in range(times - 1):
        total = np.convolve(total, law)
    return total


def exact_discrete_delta(sigma: float, k: int, eps: float) -> float:
    """The exact δ(ε) of K releases of a discrete Gaussian of scale σ (sensitivity 1).

    For one patient the privacy loss of the K releases is (K − 2·S)/(2σ²), S the sum of the K
    noise draws on the count that patient moves (the other counts cancel): so δ(ε) =
    E[(1 − e^(ε − L))₊] over the K-fold convolution of N_Z(0, σ²), tails below 1e-300 aside.
    """
    law = convolved(discrete_gaussian(sigma, int(40 * sigma) + 5), k)
    total = np.arange(law.size) - (law.size - 1) // 2
    loss = (k - 2 * total) / (2 * sigma**2)
    over = loss > eps
    return float(np.sum(law[over] * -np.expm1(eps - loss[over])))


@pytest.mark.parametrize(("sigma", "k", "delta"),
                         [*CASES, (0.7, 3, 1e-6), (2.166, 11, 1e-6), (14.09, 11, 1e-6)])
def test_the_stated_epsilon_holds_for_the_exact_discrete_mechanism(sigma, k, delta):
    """One-sided, against the mechanism itself (not a formula the code shares): at the ε the
    accountant states, the exact δ of K discrete Gaussian releases is at most the δ claimed."""
    eps, _ = epsilon_of([Gaussians(sigma, k)], delta)
    assert exact_discrete_delta(sigma, k, eps) <= delta * (1 + 1e-9)
    # And not loose: 2% less ε would break the claim (the grid costs at most K steps).
    assert exact_discrete_delta(sigma, k, 0.98 * eps - k * 1e-3) > delta


def test_distributed_calibration_keeps_each_site_at_kls_minimum_scale():
    """KLS's bound on a sum of discrete Gaussians needs each site's scale ≥ 1/2: a loose
    target over many honest sites raises σ to that, and the stated ε falls below the target."""
    cal = calibrate(PrivacySettings(mode="distributed", epsilon=64.0, releases=1,
                                    honest_sites=50))
    assert cal.sigma_site == pytest.approx(0.5, rel=1e-12)
    assert cal.epsilon < 64.0


@pytest.mark.parametrize("epsilon", [1.0, 4.0, 8.0])
@pytest.mark.parametrize("mode", ["local", "distributed"])
def test_calibrate_meets_the_target_tightly(epsilon, mode):
    honest = 2 if mode == "distributed" else 1
    s = PrivacySettings(mode=mode, epsilon=epsilon, delta=1e-6, releases=11, honest_sites=honest)
    cal = calibrate(s)
    assert cal.epsilon <= epsilon
    assert cal.epsilon >= 0.995 * epsilon
    assert cal.accountant == "pld"
    assert cal.rho_run == pytest.approx(11 * cal.rho_release, rel=1e-12)
    assert cal.rho_release == pytest.approx(1.0 / (2.0 * cal.sigma_total**2), rel=1e-12)
    # The achieved ε is the exact Gaussian's at σ_total/√11 (up to the lattice and the grid);
    # the zCDP bound at the same σ is above it.
    exact = exact_epsilon(cal.sigma_total / math.sqrt(11), 1e-6)
    assert cal.epsilon == pytest.approx(exact, rel=1e-2)
    assert exact <= cal.epsilon_zcdp <= 1.25 * exact
    if mode == "local":
        assert cal.sigma_site == cal.sigma_total
        assert cal.noise_variance(3) == pytest.approx(3 * cal.sigma_total**2)
        assert cal.tau_release == 0.0
    else:
        assert cal.sigma_site == pytest.approx(cal.sigma_total / math.sqrt(2), rel=1e-12)
        # The honest sites' sum carries the full scale.
        assert cal.noise_variance(2) == pytest.approx(cal.sigma_total**2, rel=1e-12)
        assert cal.tau_release == pytest.approx(distributed_tau(cal.sigma_site, 2), rel=1e-12)
    if cal.sigma_site >= 2:
        assert cal.tau_release < 1e-12


@pytest.mark.parametrize(("epsilon", "at_least"), [(8.0, 0.05), (1.0, 0.06)])
def test_the_pld_accountant_needs_less_noise_than_zcdp(epsilon, at_least):
    """What the tight accountant buys: the σ zCDP alone would need, against the one used."""
    s = PrivacySettings(mode="distributed", epsilon=epsilon, delta=1e-6, releases=11,
                        honest_sites=3)
    cal = calibrate(s)
    zcdp_sigma = brentq(lambda x: zcdp_epsilon([Gaussians(x, 11)], 1e-6) - epsilon, 0.5, 100.0)
    assert cal.sigma_total <= (1 - at_least) * zcdp_sigma
    assert cal.epsilon_zcdp > epsilon  # the looser bound could not state this run's ε


def test_calibrate_more_privacy_means_more_noise():
    sig = [
        calibrate(PrivacySettings(mode="local", epsilon=e, releases=11)).sigma_total
        for e in (8.0, 4.0, 1.0)
    ]
    assert sig[0] < sig[1] < sig[2]
    # σ grows with √releases at fixed ε (composition of K equal Gaussians; at ε = 1 one
    # release needs σ ≈ 4, where the lattice no longer shows).
    one = calibrate(PrivacySettings(mode="local", epsilon=1.0, releases=1)).sigma_total
    assert sig[2] == pytest.approx(math.sqrt(11) * one, rel=1e-2)


@pytest.mark.parametrize("s", [0.6, 0.8, 1.0, 1.25])
@pytest.mark.parametrize("t", [2, 3, 5, 8, 20])
def test_kls_tau_bounds_the_sum_of_discrete_gaussians_pointwise(s, t):
    """The premise of the PLD bound in distributed mode: the exact law of a sum of t discrete
    Gaussians of scale s (convolved here, far tails below 1e-250 left out) is within a factor
    1 ± τ of the discrete Gaussian N_Z(0, t·s²) at every point."""
    law = convolved(discrete_gaussian(s, int(60 * s) + 5), t)
    ideal = discrete_gaussian(s * math.sqrt(t), (law.size - 1) // 2)
    seen = ideal > 1e-250
    ratio = law[seen] / ideal[seen]
    tau = distributed_tau(s, t)
    assert 1 - tau <= ratio.min() and ratio.max() <= 1 + tau
    assert ratio.max() - ratio.min() > 0 or tau < 1e-9  # the sum is not the Gaussian itself


def test_distributed_tau_closed_form_and_its_share_of_epsilon():
    s, t = 0.5, 3
    expected = 10 * sum(math.exp(-2 * math.pi**2 * s * s * k / (k + 1)) for k in (1, 2))
    assert distributed_tau(s, t) == pytest.approx(expected, rel=1e-12)
    assert distributed_tau(s, 1) == 0.0
    assert distributed_tau(2.0, 10) < 1e-15
    # A loose target with many honest sites puts the per-site scale below 1, where τ matters:
    # calibration must still count it inside the target, and too large a τ leaves the PLD
    # bound out (zCDP plus τ per release stands).
    s = PrivacySettings(mode="distributed", epsilon=64.0, releases=1, honest_sites=50)
    cal = calibrate(s)
    assert cal.sigma_site < 1.0
    assert cal.tau_release > 0.1
    assert cal.accountant == "zcdp"
    rho_eps = epsilon_of_rho(cal.rho_run, cal.delta)
    assert cal.epsilon == pytest.approx(rho_eps + cal.tau_release, rel=1e-9)
    assert cal.epsilon <= 64.0
    # A small τ costs the PLD bound something, never nothing.
    assert pld_epsilon([Gaussians(3.0, 11, 1e-3)], 1e-6) > pld_epsilon([Gaussians(3.0, 11)], 1e-6)


def exact_sum_delta(s: float, t: int, k: int, eps: float) -> float:
    """The exact δ(ε) of K releases of a count plus the SUM of t discrete Gaussians of scale
    s (distributed mode's t honest shares; sensitivity 1): the law of the sum by convolution,
    each release's privacy loss log P(z)/P(z − 1), the K losses added over every combination
    of draws (mass below 1e-40 per point left out)."""
    law = convolved(discrete_gaussian(s, int(40 * s) + 5), t)
    law = law[law > 1e-40]  # symmetric: trims both tails alike
    p = np.concatenate([law, [0.0]])  # P(z), the last point beyond the support
    q = np.concatenate([[0.0], law])  # P(z − 1): the neighbour without the patient
    with np.errstate(divide="ignore"):
        loss = np.log(p) - np.log(q)
    keep = p > 0
    values, probs = loss[keep], p[keep]
    total, mass = values, probs
    for _ in range(k - 1):
        total = (total[:, None] + values[None, :]).ravel()
        mass = (mass[:, None] * probs[None, :]).ravel()
    over = total > eps
    return float(np.sum(mass[over] * -np.expm1(eps - total[over])))


@pytest.mark.parametrize(("s", "t", "k"), [(0.8, 3, 1), (0.8, 3, 3), (1.0, 5, 2), (0.6, 3, 2),
                                           (1.2, 2, 3)])
def test_the_stated_epsilon_holds_for_the_exact_sum_of_honest_shares(s, t, k):
    """Distributed mode end to end, against the mechanism itself: the released sum carries t
    discrete Gaussians of scale s, which is NOT a discrete Gaussian (τ measures how far), and
    at the ε the accountant states for it (PLD shifted by τ, or zCDP plus τ where τ ≥ 0.1:
    s = 0.6) the exact δ of K releases is at most the δ claimed."""
    delta = 1e-6
    tau = distributed_tau(s, t)
    eps, accountant = epsilon_of([Gaussians(s * math.sqrt(t), k, tau)], delta)
    assert accountant == ("zcdp" if tau >= 0.1 else "pld")
    assert exact_sum_delta(s, t, k, eps) <= delta
    # Tight where τ is small (the exact ε is within 1-2% of the PLD's: 3.36 against 3.40 at
    # s = 0.8, t = 3, K = 1), looser where zCDP had to stand in (7.11 against 8.18).
    assert exact_sum_delta(s, t, k, (0.96 if accountant == "pld" else 0.8) * eps) > delta


def test_calibrate_refuses_mode_off():
    with pytest.raises(FedmergeError, match="mode local or distributed"):
        calibrate(PrivacySettings(mode="off"))
