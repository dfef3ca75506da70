"""(ε, δ) ⇄ noise scale for the histogram releases, with OpenDP's privacy maps.

Mechanism: the discrete Gaussian with scale σ on integer counts. OpenDP's `make_gaussian` on an
integer vector gives its zero-concentrated DP, ρ = Δ²/(2σ²) for L2 sensitivity Δ (here 1 per
candidate); zCDP composes by adding ρ, so `releases` candidates cost releases·ρ, which is the
ρ of one Gaussian of scale σ/√releases; OpenDP's `make_zCDP_to_approxDP` then gives the tight
ε at δ for that ρ (Canonne, Kamath, Steinke 2020). Calibration searches σ by bisection on that
map (ε falls as σ grows), keeping the end that meets the target.

Distributed mode: each site adds a discrete Gaussian of scale σ/√t, t = the honest sites the
run assumes. A sum of t such draws is not exactly a discrete Gaussian of scale σ; Kairouz, Liu
and Steinke (ICML 2021, Prop. 14) bound the difference: the sum is (α, α·ρ + τ·d)-RDP with
τ = 10·Σ_{k=1}^{t-1} exp(−2π²s²·k/(k+1)), s the per-site scale and d the coordinates of one
release. The constant τ·d adds at most τ·d to ε per release; it is computed here and added
to the reported ε (it is below 1e-12 once s ≥ 2; calibration raises σ until the total fits).
"""

from __future__ import annotations

import math
from functools import lru_cache

from pydantic import BaseModel, ConfigDict

from common.dp.settings import PrivacySettings
from common.errors import FedmergeError

_SIGMA_MAX = 1e7


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
    tau_epsilon: float  # the distributed-sum correction included in `epsilon`

    def noise_variance(self, summed_sites: int) -> float:
        """Variance per count of the noise in a sum over `summed_sites` honest sites."""
        return summed_sites * self.sigma_site**2


def _run_epsilon(sigma: float, s: PrivacySettings, dims: int) -> tuple[float, float, float]:
    rho1 = rho_per_release(sigma)
    rho_run = s.releases * rho1
    eps = epsilon_of_rho(rho_run, s.delta)
    tau_eps = 0.0
    if s.mode == "distributed" and s.honest_sites > 1:
        tau_eps = s.releases * dims * distributed_tau(sigma / math.sqrt(s.honest_sites),
                                                      s.honest_sites)
    return eps + tau_eps, rho1, tau_eps


@lru_cache(maxsize=64)
def calibrate(settings: PrivacySettings, dims: int) -> Calibration:
    """The smallest noise (to 0.1%) whose run meets `settings.epsilon` at `settings.delta`.

    `dims`: coordinates of one candidate's release (2 × bins), for the distributed correction.
    Cached: the coordinator and every site ask for the same run's calibration at each round
    and release (a bisection of ~40 OpenDP maps); the settings are frozen, hence hashable.
    """
    s = settings
    if not s.on:
        raise FedmergeError("privacy: calibrate() needs mode local or distributed, not off")
    lo, hi = 1e-3, 1.0
    while _run_epsilon(hi, s, dims)[0] > s.epsilon:
        hi *= 2.0
        if hi > _SIGMA_MAX:
            raise FedmergeError(f"privacy: no noise scale meets epsilon={s.epsilon}")
    while hi - lo > 1e-3 * hi:
        mid = 0.5 * (lo + hi)
        if _run_epsilon(mid, s, dims)[0] > s.epsilon:
            lo = mid
        else:
            hi = mid
    eps, rho1, tau_eps = _run_epsilon(hi, s, dims)
    site = hi / math.sqrt(s.honest_sites) if s.mode == "distributed" else hi
    return Calibration(
        mode=s.mode, sigma_total=hi, sigma_site=site, rho_release=rho1,
        rho_run=s.releases * rho1, epsilon=eps, delta=s.delta, tau_epsilon=tau_eps,
    )
