r"""Differential privacy in the simulator: DP-FedAvg's settings and a run's privacy ledger.

DP-FedAvg (McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private Recurrent
Language Models", ICLR 2018) gives user-level privacy: each round, every update of the
cohort is clipped to L2 norm C, the clipped updates are summed, Gaussian noise
:math:`\mathcal N(0, (zC)^2 I)` is added and the sum is divided by the *expected* cohort
size m, a fixed denominator, so neither a client's update nor its presence moves the
released mean by more than C / m. Which noise that is, and what it buys, depends on the
mode:

* ``"central"``: a trusted server clips, sums and adds the noise once. With Poisson
  sampling (each client joins with probability q = m / N) a round is the
  Poisson-subsampled Gaussian mechanism under add-or-remove-one-client (Mironov, Talwar
  and Zhang, "Renyi Differential Privacy of the Sampled Gaussian Mechanism", 2019), noise
  multiplier z; with a fixed cohort of m drawn uniformly without replacement it is
  sampling without replacement under replace-one-client (Wang, Balle and Kasiviswanathan,
  "Subsampled Renyi Differential Privacy and Analytical Moments Accountant", AISTATS
  2019), where one client moves the sum by up to 2C, so the accountant sees z / 2.
* ``"local"``: each client clips its own update and adds :math:`\mathcal N(0, (zC)^2 I)`
  before sending it; the server only sums. The guarantee holds against the server itself,
  which sees every noised update and who sent it, so there is no amplification by
  sampling: every round counts as a Gaussian mechanism on a client's update with
  replace-one sensitivity 2C (multiplier z / 2), as if the client took part in all.

Adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy, "Differentially Private
Learning with Adaptive Clipping", NeurIPS 2021) moves C towards a quantile of the update
norms from a noised count of the unclipped updates; that count takes part of the privacy,
so the values get a larger multiplier :math:`z_\Delta` and the pair together is accounted
as one Gaussian mechanism of multiplier z (see :class:`RunPrivacy`).

Examples
--------
>>> from fedkern import sim
>>> settings = sim.DifferentialPrivacy(clip=1.0, noise_multiplier=1.1)
>>> ledger = sim.privacy.RunPrivacy(settings, population=1000, cohort=10)
>>> ledger.sample_rate, ledger.expected_clients
(0.01, 10.0)
>>> for _ in range(1000):
...     epsilon = ledger.end_round(unclipped=0, counted=0, seed=0, stream=0)
>>> round(epsilon, 3)               # the RDP accountant's figure for q = 0.01, z = 1.1, 1000 rounds
1.712
"""
from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np

from .. import _validate as check
from ..privacy import AdaptiveClipping, RDPAccountant, noise_multiplier_for, split_noise_multiplier
from .._errors import FedkernValueError

__all__ = ["DifferentialPrivacy", "RunPrivacy", "MODES", "SAMPLINGS", "ON_BUDGET"]

MODES = ("central", "local")
SAMPLINGS = ("poisson", "fixed")
ON_BUDGET = ("stop", "warn")
#: Budget checks forgive this relative excess: a run composes its rounds one by one, a
#: calibration composes them at once, and the two sums differ in the last bits.
BUDGET_RTOL = 1e-9


@dataclasses.dataclass(frozen=True)
class DifferentialPrivacy:
    r"""DP-FedAvg settings for :class:`~fedkern.sim.Simulation` (``privacy=``).

    Parameters
    ----------
    mode : ``"central"`` (the server adds the noise once) or ``"local"`` (each client
        noises its own update)
    clip : the clipping norm C (> 0) ...
    adaptive : ... or a :class:`fedkern.privacy.AdaptiveClipping` whose ``clip`` is the
        initial norm (central mode only; give one of ``clip`` and ``adaptive``)
    noise_multiplier : z >= 0, the noise's standard deviation over C ...
    target_epsilon : ... or the epsilon the run should reach after ``rounds`` rounds, for
        which z is calibrated once (the smallest z that meets it, to a relative 1e-6)
    rounds : the number of rounds ``target_epsilon`` is spread over (needed with it)
    delta : the delta of every reported epsilon, in (0, 1)
    sampling : ``"poisson"`` (each client with data joins with probability
        q = clients_per_round / N, the cohort size varies) or ``"fixed"``
        (clients_per_round drawn uniformly without replacement); each is accounted as what it is
    max_epsilon : a budget (optional): with ``on_budget="stop"`` no round runs that would
        take epsilon past it, with ``"warn"`` a warning is issued once it is passed
    on_budget : ``"stop"`` or ``"warn"``

    Examples
    --------
    >>> from fedkern import privacy, sim
    >>> sim.DifferentialPrivacy(adaptive=privacy.AdaptiveClipping(clip=0.5), target_epsilon=2.0, rounds=100).clip0
    0.5
    >>> sim.DifferentialPrivacy(clip=1.0)
    Traceback (most recent call last):
    ...
    fedkern._errors.FedkernValueError: privacy: give noise_multiplier or target_epsilon
    """

    mode: str = "central"
    clip: float | None = None
    adaptive: AdaptiveClipping | None = None
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    rounds: int | None = None
    delta: float = 1e-5
    sampling: str = "poisson"
    max_epsilon: float | None = None
    on_budget: str = "stop"

    def __post_init__(self) -> None:
        _choice(self.mode, "privacy.mode", MODES)
        _choice(self.sampling, "privacy.sampling", SAMPLINGS)
        _choice(self.on_budget, "privacy.on_budget", ON_BUDGET)
        if (self.clip is None) == (self.adaptive is None):
            raise FedkernValueError("privacy: give clip or adaptive (whose clip is the initial one), not both"
                                    if self.clip is not None else "privacy: give clip or adaptive")
        if self.clip is not None:
            check.real(self.clip, "privacy.clip", low=0.0, low_inclusive=False)
        elif not isinstance(self.adaptive, AdaptiveClipping):
            raise check.FedkernTypeError(f"privacy.adaptive must be a fedkern.privacy.AdaptiveClipping; "
                                         f"got {type(self.adaptive).__name__}")
        elif self.mode == "local":
            raise FedkernValueError("privacy.adaptive needs mode 'central': the server noises the count of "
                                    "unclipped updates, which local noise cannot protect")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise FedkernValueError("privacy: give noise_multiplier or target_epsilon, not both"
                                    if self.noise_multiplier is not None else
                                    "privacy: give noise_multiplier or target_epsilon")
        if self.noise_multiplier is not None:
            check.real(self.noise_multiplier, "privacy.noise_multiplier", low=0.0)
        else:
            check.real(self.target_epsilon, "privacy.target_epsilon", low=0.0, low_inclusive=False)
            if self.rounds is None:
                raise FedkernValueError("privacy.rounds: target_epsilon needs the number of rounds it is spread over")
        if self.rounds is not None:
            check.count(self.rounds, "privacy.rounds", low=1)
        check.real(self.delta, "privacy.delta", low=0.0, low_inclusive=False, high=1.0, high_inclusive=False)
        if self.max_epsilon is not None:
            check.real(self.max_epsilon, "privacy.max_epsilon", low=0.0, low_inclusive=False)

    @property
    def clip0(self) -> float:
        """The clipping norm of the first round."""
        return float(self.clip if self.adaptive is None else self.adaptive.clip)


def _choice(value, name: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise FedkernValueError(f"{name} must be one of {allowed}; got {value!r}")


class RunPrivacy:
    r"""One run's privacy: its noise multipliers, the current clipping norm, the accountant.

    Built once per run from the settings, the population N (clients with data) and the
    clients per round m. The expected cohort is m in both samplings (q N = m under
    Poisson), the fixed denominator of the mean. Every round ends with :meth:`end_round`,
    which moves an adaptive clip and composes the round into one
    :class:`fedkern.privacy.RDPAccountant`:

    ==================  ===============  ===========================================
    mode, sampling      relation         each round
    ==================  ===============  ===========================================
    central, poisson    add or remove    ``compose(z, q)``
    central, fixed      replace one      ``compose_fixed_cohort(z / 2, m, N)``
    local, either       replace one      ``compose(z / 2, 1)``
    ==================  ===============  ===========================================

    With adaptive clipping the values get noise :math:`z_\Delta C`, and the count of
    unclipped updates noise :math:`\sigma_b` (``adaptive.stddev(m)``) on bits centred at
    1/2 (:meth:`AdaptiveClipping.update` with the round's accepted updates as
    ``clients``). The pair is as private as one Gaussian mechanism of the accounted
    multiplier when the squared sensitivity-to-noise ratios add up to its own (Andrew et
    al. 2021, Theorem 1), and under both relations that is
    ``split_noise_multiplier(z, sigma_b)``:

    * add or remove: values C, count 1/2: :math:`z_\Delta^{-2} + (2\sigma_b)^{-2} = z^{-2}`;
    * replace one, accounted z / 2: values 2C, count 1:
      :math:`4 z_\Delta^{-2} + \sigma_b^{-2} = 4 z^{-2}`.

    Parameters
    ----------
    settings : the :class:`DifferentialPrivacy` settings (its ``adaptive`` is copied, never moved)
    population : N, the clients with training data
    cohort : m, the clients per round (1 <= m <= N)
    """

    def __init__(self, settings: DifferentialPrivacy, population: int, cohort: int):
        self.settings = settings
        self.population = check.count(population, "population", low=1)
        self.cohort = check.count(cohort, "cohort", low=1, high=self.population, why=" (the population)")
        self.sample_rate = self.cohort / self.population
        self.expected_clients = float(self.cohort)
        self.central = settings.mode == "central"
        self.poisson = self.central and settings.sampling == "poisson"
        self.noise_multiplier = (float(settings.noise_multiplier) if settings.target_epsilon is None
                                 else self._calibrate(settings.target_epsilon, settings.rounds))
        self.adaptive = copy.deepcopy(settings.adaptive)
        self.value_multiplier = self._value_multiplier()
        self._clip = settings.clip0
        self.accountant = self._new_accountant()
        self.warned = False

    # ------------------------------------------------------------------ set-up
    def _new_accountant(self) -> RDPAccountant:
        return RDPAccountant(neighboring="add_or_remove" if self.poisson else "replace_one")

    def _compose(self, accountant: RDPAccountant, z: float, steps: int = 1) -> RDPAccountant:
        if self.poisson:
            return accountant.compose(z, self.sample_rate, steps)
        if self.central:
            return accountant.compose_fixed_cohort(z / 2, self.cohort, self.population, steps)
        return accountant.compose(z / 2, 1.0, steps)

    def _calibrate(self, epsilon: float, rounds: int) -> float:
        """The smallest z whose ``rounds`` rounds reach ``epsilon`` at delta (relative tolerance 1e-6)."""
        delta = self.settings.delta
        try:
            if self.poisson:
                return noise_multiplier_for(epsilon, delta, self.sample_rate, rounds)
            if not self.central:     # a Gaussian on every round, multiplier z / 2
                return 2.0 * noise_multiplier_for(epsilon, delta, 1.0, rounds)
            return _smallest_meeting(
                lambda z: self._compose(self._new_accountant(), z, rounds).epsilon(delta) <= epsilon)
        except FedkernValueError as err:
            raise FedkernValueError(f"privacy.target_epsilon: {epsilon:g} at delta {delta:g} over {rounds} "
                                    f"rounds cannot be calibrated: {err}") from None

    def _value_multiplier(self) -> float:
        z = self.noise_multiplier
        if self.adaptive is None:
            return z
        sigma = self.adaptive.stddev(self.expected_clients)
        if z > 0 and 2 * sigma <= z:
            raise FedkernValueError(
                f"privacy.adaptive.count_stddev: must exceed noise_multiplier / 2 = {z / 2:g}, or the count of "
                f"unclipped updates spends the whole budget; got {sigma:g} (default: expected clients / 20)")
        return split_noise_multiplier(z, sigma)

    # ------------------------------------------------------------------ rounds
    @property
    def clip(self) -> float:
        """The clipping norm of the next round."""
        return self._clip

    @property
    def value_std(self) -> float:
        """The standard deviation of the noise on the sum of clipped updates (central) or on
        each update (local) in the next round."""
        return self.value_multiplier * self._clip

    @property
    def epsilon(self) -> float:
        """Epsilon at ``settings.delta`` of the rounds accounted so far."""
        return self.accountant.epsilon(self.settings.delta)

    def next_epsilon(self, rounds: int = 1) -> float:
        """Epsilon after ``rounds`` more rounds (the accountant itself is left as it is)."""
        accountant = copy.deepcopy(self.accountant)
        for _ in range(rounds):      # one by one, as the run will compose them
            self._compose(accountant, self.noise_multiplier)
        return accountant.epsilon(self.settings.delta)

    def over(self, epsilon: float) -> bool:
        """True if ``epsilon`` passes the budget (none set: never)."""
        budget = self.settings.max_epsilon
        return budget is not None and epsilon > budget * (1 + BUDGET_RTOL)

    def end_round(self, unclipped: int, counted: int, seed: int, stream: int) -> float:
        """Account a finished round; with adaptive clipping, move the clip first.

        ``unclipped`` counts the round's ``counted`` accepted updates with norm <=
        :attr:`clip`; ``seed`` and ``stream`` key the count's noise. Returns epsilon after
        the round.
        """
        if self.adaptive is not None:
            self._clip = self.adaptive.update(unclipped, self.expected_clients, seed, stream=stream,
                                              clients=counted)
        self._compose(self.accountant, self.noise_multiplier)
        return self.epsilon

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """The arrays and the JSON metadata a checkpoint keeps."""
        return ({"privacy.rdp": self.accountant.rdp, "privacy.clip": np.array([self._clip])},
                {"privacy_warned": self.warned, "privacy_noise_multiplier": self.noise_multiplier})

    def restore(self, arrays: dict[str, np.ndarray], meta: dict, rounds: int) -> None:
        """Continue after ``rounds`` rounds from :meth:`state`'s output.

        The accountant is rebuilt by composing the rounds again one by one (the same sums
        in the same order as the interrupted run, so the same bits), and must match the
        saved one: a checkpoint of other privacy settings is refused.
        """
        if "privacy.rdp" not in arrays:
            raise FedkernValueError("the checkpoint was written without differential privacy")
        accountant = self._new_accountant()
        for _ in range(rounds):
            self._compose(accountant, self.noise_multiplier)
        if not np.array_equal(accountant.rdp, arrays["privacy.rdp"]):
            raise FedkernValueError("the checkpoint was written with other privacy settings (its accountant differs)")
        self.accountant = accountant
        self._clip = float(arrays["privacy.clip"][0])
        if self.adaptive is not None:
            self.adaptive.clip = self._clip
        self.warned = bool(meta["privacy_warned"])


def _smallest_meeting(meets, rtol: float = 1e-6) -> float:
    """The smallest z (to ``rtol``) with ``meets(z)``, for a ``meets`` that holds from some z on.

    Brackets z by doubling or halving from 1, then bisects geometrically, as
    :func:`fedkern.privacy.noise_multiplier_for` does for Poisson sampling.
    """
    low = high = 1.0
    if meets(high):
        while meets(low):
            if low < 1e-6:
                raise FedkernValueError("the target is met even with noise_multiplier < 1e-6")
            high, low = low, low / 2
    else:
        while not meets(high):
            if high > 1e9:
                raise FedkernValueError("no noise_multiplier up to 1e9 reaches the target")
            low, high = high, high * 2
    while low < high * (1 - rtol):
        middle = math.sqrt(low * high)
        low, high = (low, middle) if meets(middle) else (middle, high)
    return high
