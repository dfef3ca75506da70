"""(ε, δ) ⇄ noise scale for the histogram releases: dp-accounting's privacy loss distributions,
with OpenDP's zCDP maps as a second, always-valid bound.

Mechanism: the discrete Gaussian with scale σ on integer counts. One patient added or removed
moves ONE count of each candidate's histograms by one; every other count carries the same
noise on both sides, so each release is, for that patient, a one-dimensional discrete Gaussian
with sensitivity 1, and a run composes `releases` of them.

Two bounds, the smaller is stated (both are valid, so their minimum is):
- **PLD** (the tight one): Google's dp-accounting builds the privacy loss distribution of the
  discrete Gaussian (`from_discrete_gaussian_mechanism`, pessimistic discretisation) and
  composes it exactly; this is the Gaussian mechanism's true (ε, δ) curve, up to the grid
  (each of K compositions may round the loss up by one step: 1e-3, or 1e-4 from σ = 5, where
  ε is small and the finer grid is still cheap). At ε = 8 over 11 releases it needs 5-6% less
  noise than the zCDP route, at ε = 1 about 7% less: the same guarantee for the cost of ~12%
  more patients.
- **zCDP**: ρ = Δ²/(2σ²) per release (OpenDP's `make_gaussian` map), composed by adding, and
  OpenDP's `make_zCDP_to_approxDP` (Canonne, Kamath, Steinke 2020). Kept because it is what
  the site ledger used before, and as the fallback where the PLD's premise fails (below).

Distributed mode: each site adds a discrete Gaussian of scale s = σ/√t, t the honest sites the
run assumes. A sum of t such draws is not exactly a discrete Gaussian of scale σ. Kairouz, Liu
and Steinke (ICML 2021, Prop. 14) bound the gap, for s ≥ 1/2 (calibration never goes below:
σ ≥ √t/2), by τ = 10·Σ_{k=1}^{t-1} exp(−2π²s²·k/(k+1)):
- their statement is in Rényi terms: the sum is (α, α·ρ + τ)-RDP on the one count that
  changes, so the zCDP bound adds τ per release to ε;
- the PLD bound uses τ as a POINTWISE bound, P_sum(z) ∈ [1 − τ, 1 + τ]·N_Z(0, σ²)(z). This is
  not their statement but follows from the argument behind it: Poisson summation at each of
  the t − 1 convolutions multiplies the ratio to the ideal law by a factor within
  [(1 − 2η)/(1 + 2η)², 1 + 2η], η = Σ_j exp(−2π²c·j²), c = s²·k/(k+1), which totals about
  0.6·τ while τ < 0.1; `tests/test_dp_accounting.py` checks it on exact convolutions (the
  deviation measured stays below 0.25·τ). Then any event's probability under the real sum
  is within (1 ± τ) of the ideal discrete Gaussian's, per release, so K releases that are
  (ε, δ′)-DP for the ideal noise are (ε + K·log((1+τ)/(1−τ)), (1+τ)^K·δ′)-DP for the real
  one; the PLD is read at δ′ = δ/(1+τ)^K. Where τ ≥ 0.1 (s below about 0.7) only the zCDP
  bound is used.
τ is below 1e-5 once s ≥ 1.2 (ε = 8 over 11 releases with 3 honest sites: s ≈ 1.25).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import lru_cache
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict

from common.dp.settings import PrivacySettings
from common.errors import FedmergeError

_SIGMA_MAX = 1e7
# dp-accounting's loss grid: pessimistic at any width, each of K compositions may round up by a
# step. 1e-3 is ~15× faster than the library's 1e-4 where σ is small (a wide loss range: ε = 8
# over 11 releases costs 0.1% more); from σ = 5 (ε ≲ 3 over 11 releases) 1e-4 is cheap.
PLD_GRID = 1e-3
PLD_FINE_GRID, PLD_FINE_FROM_SIGMA = 1e-4, 5.0
# KLS's bound on a sum of discrete Gaussians holds for a per-site scale of at least 1/2.
MIN_SITE_SIGMA = 0.5
# τ above this: the pointwise premise is too loose to be worth it; zCDP alone.
_PLD_MAX_TAU = 0.1


def _opendp():
    import opendp.prelude as dp

    dp.enable_features("contrib")
    return dp


def integer_space():
    """Vectors of integer counts under the L2 distance: OpenDP's input space for the noise."""
    dp = _opendp()
    return dp.vector_domain(dp.atom_domain(T=int)), dp.l2_distance(T=int)


def rho_per_release(sigma: float) -> float:
    """zCDP ρ of one candidate's histograms (sensitivity 1) under noise of scale `sigma`."""
    dp = _opendp()
    return float(dp.m.make_gaussian(*integer_space(), scale=float(sigma)).map(1))


def epsilon_of_rho(rho: float, delta: float) -> float:
    """The smallest ε with (ε, δ)-DP implied by ρ-zCDP (OpenDP's conversion)."""
    if rho <= 0:
        return 0.0
    dp = _opendp()
    # A Gaussian of scale 1/√(2ρ) has exactly this ρ at sensitivity 1.
    meas = dp.m.make_gaussian(*integer_space(), scale=1.0 / math.sqrt(2.0 * rho))
    return float(dp.c.make_zCDP_to_approxDP(meas).map(1).epsilon(delta))


def distributed_tau(site_sigma: float, honest_sites: int) -> float:
    """Kairouz-Liu-Steinke's τ for a sum of `honest_sites` discrete Gaussians of scale s."""
    s2 = site_sigma * site_sigma
    return 10.0 * math.fsum(
        math.exp(-2.0 * math.pi**2 * s2 * k / (k + 1)) for k in range(1, honest_sites)
    )


class Gaussians(NamedTuple):
    """`count` releases of a sum whose guaranteed noise is a discrete Gaussian of scale
    `sigma` (sensitivity 1), each within `tau` of it pointwise (0: exactly that Gaussian)."""

    sigma: float
    count: int
    tau: float = 0.0


@lru_cache(maxsize=256)
def _pld(sigma: float, count: int, grid: float):
    from dp_accounting.pld import privacy_loss_distribution as pld

    one = pld.from_discrete_gaussian_mechanism(
        sigma, sensitivity=1, value_discretization_interval=grid
    )
    return one.self_compose(count) if count > 1 else one


def zcdp_epsilon(charges: Iterable[Gaussians], delta: float) -> float:
    """The zCDP bound: ρ added over every release, converted, plus KLS's τ per release."""
    charges = list(charges)
    rho = math.fsum(c.count / (2.0 * c.sigma**2) for c in charges)
    return epsilon_of_rho(rho, delta) + math.fsum(c.count * c.tau for c in charges)


def pld_epsilon(charges: Iterable[Gaussians], delta: float) -> float:
    """The PLD bound (inf where some release's τ is too large for it)."""
    charges = [c for c in charges if c.count > 0]
    if not charges:
        return 0.0
    if any(c.tau >= _PLD_MAX_TAU for c in charges):
        return math.inf
    # One grid for the whole composition (dp-accounting composes only equal grids).
    fine = min(c.sigma for c in charges) >= PLD_FINE_FROM_SIGMA
    grid = PLD_FINE_GRID if fine else PLD_GRID
    composed = None
    for c in sorted(charges):
        d = _pld(float(c.sigma), int(c.count), grid)
        composed = d if composed is None else composed.compose(d)
    shift = math.fsum(c.count * math.log((1 + c.tau) / (1 - c.tau)) for c in charges)
    inflate = math.fsum(c.count * math.log1p(c.tau) for c in charges)
    return float(composed.get_epsilon_for_delta(delta * math.exp(-inflate))) + shift


def epsilon_of(charges: Iterable[Gaussians], delta: float) -> tuple[float, str]:
    """ε at δ for one patient charged these releases, and which bound gave it."""
    charges = [c for c in charges if c.count > 0]
    if not charges:
        return 0.0, "none"
    z = zcdp_epsilon(charges, delta)
    p = pld_epsilon(charges, delta)
    return (p, "pld") if p < z else (z, "zcdp")


class Calibration(BaseModel):
    """What a run's privacy terms mean in noise: the same numbers at every site."""

    model_config = ConfigDict(frozen=True)

    mode: str
    sigma_total: float  # scale the pooled sum carries for the guarantee (per count)
    sigma_site: float  # scale each site adds (per count)
    rho_release: float  # zCDP cost of one candidate's release, for the guarantee
    rho_run: float  # all releases of one fold in the run
    epsilon: float  # achieved ε at `delta` for the whole run (≤ the target)
    delta: float
    accountant: str  # which bound gave `epsilon`: "pld" or "zcdp"
    epsilon_zcdp: float  # the zCDP bound at this σ (what the looser accountant would state)
    tau_release: float  # KLS's τ per release of a distributed sum (0 in local mode)

    def noise_variance(self, summed_sites: int) -> float:
        """Variance per count of the noise in a sum over `summed_sites` honest sites."""
        return summed_sites * self.sigma_site**2

    def charges(self, count: int) -> Gaussians:
        """`count` releases under these terms, as the ledger composes them."""
        return Gaussians(self.sigma_total, count, self.tau_release)


def _tau(sigma: float, s: PrivacySettings) -> float:
    if s.mode != "distributed" or s.honest_sites <= 1:
        return 0.0
    return distributed_tau(sigma / math.sqrt(s.honest_sites), s.honest_sites)


def _bisect(meets, lo: float, hi: float) -> float:
    """The smallest σ in [lo, hi] (to 0.1%) with meets(σ), given meets(hi) and not meets(lo)."""
    while hi - lo > 1e-3 * hi:
        mid = 0.5 * (lo + hi)
        if meets(mid):
            hi = mid
        else:
            lo = mid
    return hi


@lru_cache(maxsize=64)
def calibrate(settings: PrivacySettings) -> Calibration:
    """The smallest noise (to 0.1%) whose run meets `settings.epsilon` at `settings.delta`.

    First the zCDP bound's σ (cheap OpenDP maps), then the PLD bound below it. Cached: the
    coordinator and every site ask for the same run's calibration at each round and release;
    the settings are frozen, hence hashable.
    """
    s = settings
    if not s.on:
        raise FedmergeError("privacy: calibrate() needs mode local or distributed, not off")

    def run(sigma: float) -> list[Gaussians]:
        return [Gaussians(sigma, s.releases, _tau(sigma, s))]

    def zcdp_meets(sigma: float) -> bool:
        return zcdp_epsilon(run(sigma), s.delta) <= s.epsilon

    hi = 1.0
    while not zcdp_meets(hi):
        hi *= 2.0
        if hi > _SIGMA_MAX:
            raise FedmergeError(f"privacy: no noise scale meets epsilon={s.epsilon}")
    sigma = _bisect(zcdp_meets, 1e-3, hi)
    # The PLD bound is the tighter one (5-10% less noise): search below the zCDP σ.
    def pld_meets(x: float) -> bool:
        return pld_epsilon(run(x), s.delta) <= s.epsilon

    if pld_meets(sigma):
        lo = 0.8 * sigma
        while pld_meets(lo) and lo > 1e-3:
            lo *= 0.8
        sigma = _bisect(pld_meets, lo, sigma)
    if s.mode == "distributed":  # KLS's hypothesis: each site's share at least 1/2
        sigma = max(sigma, MIN_SITE_SIGMA * math.sqrt(s.honest_sites))
    eps, accountant = epsilon_of(run(sigma), s.delta)
    site = sigma / math.sqrt(s.honest_sites) if s.mode == "distributed" else sigma
    rho1 = rho_per_release(sigma)
    return Calibration(
        mode=s.mode, sigma_total=sigma, sigma_site=site, rho_release=rho1,
        rho_run=s.releases * rho1, epsilon=eps, delta=s.delta, accountant=accountant,
        epsilon_zcdp=zcdp_epsilon(run(sigma), s.delta), tau_release=_tau(sigma, s),
    )
