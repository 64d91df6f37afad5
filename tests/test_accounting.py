"""The RDP accountant against dp-accounting, its published test vectors and closed forms."""
import functools
import math
import subprocess
import sys

import numpy as np
import pytest

from fedkern import _accounting as acc
from fedkern._errors import BackendUnavailableError, FedkernTypeError, FedkernValueError
from fedkern._accounting import DEFAULT_RDP_ORDERS, RDPAccountant, noise_multiplier_for, pld_epsilon

RATES = [1e-3, 0.01, 0.1, 1.0]
NOISES = [0.5, 0.8, 1.1, 2.0, 5.0]
STEPS = [1, 10, 1000]
DELTAS = [1e-5, 1e-8]
#: Orders that cross every branch of the without-replacement bound (order 1 in the
#: interpolation, the exact bound up to 256, the cheap one above) at a fraction of the cost
#: of dp-accounting's O(alpha^2) evaluation of all default orders.
WOR_ORDERS = [1.25, 1.5, 2.0, 2.5, 3.0, 4.75, 8.0, 16.0, 31.5, 64.0, 255.5, 256.0, 300.0, 1024.0]


@pytest.fixture(scope="module")
def dp():
    return pytest.importorskip("dp_accounting")


@functools.lru_cache(maxsize=None)
def _dp_poisson_rdp(q, z):
    """dp-accounting's RDP curve of one Poisson-sampled Gaussian round at the default orders."""
    import dp_accounting

    ref = dp_accounting.rdp.RdpAccountant()
    ref.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
    return ref.rdp


def _rel(a, b):
    return abs(a - b) / abs(b) if b else abs(a)


# --- dp-accounting parity ----------------------------------------------------------------

def test_default_orders_are_dp_accountings(dp):
    assert list(DEFAULT_RDP_ORDERS) == dp.rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS
    np.testing.assert_array_equal(RDPAccountant().orders, DEFAULT_RDP_ORDERS)


@pytest.mark.parametrize("q", RATES)
@pytest.mark.parametrize("z", NOISES)
def test_poisson_rdp_per_order_matches_dp_accounting(dp, q, z):
    ref = _dp_poisson_rdp(q, z)
    mine = RDPAccountant().compose(z, q).rdp
    # orders whose fractional series does not converge are +inf in both
    np.testing.assert_array_equal(np.isinf(mine), np.isinf(ref))
    finite = np.isfinite(ref)
    np.testing.assert_allclose(mine[finite], ref[finite], rtol=1e-8, atol=0)


@pytest.mark.parametrize("q", RATES)
@pytest.mark.parametrize("z", NOISES)
def test_poisson_epsilon_and_delta_match_dp_accounting(dp, q, z):
    orders = np.array(DEFAULT_RDP_ORDERS)
    for steps in STEPS:
        mine = RDPAccountant().compose(z, q, steps=steps)
        for delta in DELTAS:
            ref_eps, ref_order = dp.rdp.rdp_privacy_accountant.compute_epsilon(orders, steps * _dp_poisson_rdp(q, z), delta)
            eps, order = mine.epsilon(delta, return_order=True)
            assert _rel(eps, ref_eps) < 1e-4, (steps, delta, eps, ref_eps)
            assert order == ref_order
            ref_delta, ref_order = dp.rdp.rdp_privacy_accountant.compute_delta(orders, steps * _dp_poisson_rdp(q, z), eps)
            got, order = mine.delta(eps, return_order=True)
            assert _rel(got, ref_delta) < 1e-4, (steps, delta, got, ref_delta)
            assert order == ref_order


@pytest.mark.parametrize("q, z, steps", [(0.01, 1.1, 1000), (0.1, 0.8, 10), (1.0, 2.0, 7)])
def test_self_composed_event_matches_dp_accounting_accountant(dp, q, z, steps):
    ref = dp.rdp.RdpAccountant()
    ref.compose(dp.SelfComposedDpEvent(dp.PoissonSampledDpEvent(q, dp.GaussianDpEvent(z)), steps))
    mine = RDPAccountant().compose(z, q, steps)
    for delta in DELTAS:
        assert _rel(mine.epsilon(delta), ref.get_epsilon(delta)) < 1e-4
    assert _rel(mine.delta(1.0), ref.get_delta(1.0)) < 1e-4


@pytest.mark.parametrize("cohort, population", [(1, 1000), (10, 1000), (100, 1000), (999, 1000), (64, 60000)])
@pytest.mark.parametrize("z", [0.8, 2.0])
def test_fixed_cohort_matches_dp_accounting_without_replacement(dp, cohort, population, z):
    ref = dp.rdp.RdpAccountant(WOR_ORDERS, dp.NeighboringRelation.REPLACE_ONE)
    event = dp.SampledWithoutReplacementDpEvent(population, cohort, dp.GaussianDpEvent(z))
    ref.compose(event, 100)
    mine = RDPAccountant(WOR_ORDERS, neighboring="replace_one").compose_fixed_cohort(z, cohort, population, 100)
    np.testing.assert_allclose(mine.rdp, ref.rdp, rtol=1e-8, atol=0)
    for delta in DELTAS:
        assert _rel(mine.epsilon(delta), ref.get_epsilon(delta)) < 1e-4
    assert _rel(mine.delta(2.0), ref.get_delta(2.0)) < 1e-4


@pytest.mark.parametrize("z", [8.0, 20.0])
def test_fixed_cohort_exact_bound_up_to_order_256(dp, z):
    # at large noise the low terms dominate, where the exact bound of [WBK19] Theorem 27
    # beats the cheap one: this pins the order (256) up to which dp-accounting uses it
    orders = [200.5, 230.0, 256.0, 257.0]
    ref = dp.rdp.RdpAccountant(orders, dp.NeighboringRelation.REPLACE_ONE)
    ref.compose(dp.SampledWithoutReplacementDpEvent(1000, 10, dp.GaussianDpEvent(z)))
    mine = RDPAccountant(orders, neighboring="replace_one").compose_fixed_cohort(z, 10, 1000)
    np.testing.assert_allclose(mine.rdp, ref.rdp, rtol=1e-8, atol=0)


def test_fixed_cohort_at_default_orders_matches_dp_accounting(dp):
    ref = dp.rdp.RdpAccountant(neighboring_relation=dp.NeighboringRelation.REPLACE_ONE)
    ref.compose(dp.SampledWithoutReplacementDpEvent(10_000, 100, dp.GaussianDpEvent(1.1)), 500)
    mine = RDPAccountant(neighboring="replace_one").compose_fixed_cohort(1.1, 100, 10_000, steps=500)
    np.testing.assert_allclose(mine.rdp, ref.rdp, rtol=1e-8, atol=0)
    assert _rel(mine.epsilon(1e-5), ref.get_epsilon(1e-5)) < 1e-4


def test_mixed_poisson_events_compose_like_dp_accounting(dp):
    ref = dp.rdp.RdpAccountant()
    ref.compose(dp.ComposedDpEvent([
        dp.SelfComposedDpEvent(dp.PoissonSampledDpEvent(0.01, dp.GaussianDpEvent(1.1)), 300),
        dp.SelfComposedDpEvent(dp.PoissonSampledDpEvent(0.05, dp.GaussianDpEvent(2.0)), 40),
        dp.GaussianDpEvent(5.0),
    ]))
    mine = RDPAccountant().compose(1.1, 0.01, 300).compose(2.0, 0.05, steps=40).compose(5.0, 1.0)
    np.testing.assert_allclose(mine.rdp, ref.rdp, rtol=1e-8)
    for delta in DELTAS:
        assert _rel(mine.epsilon(delta), ref.get_epsilon(delta)) < 1e-4


def test_mixed_replace_one_events_compose_like_dp_accounting(dp):
    ref = dp.rdp.RdpAccountant(WOR_ORDERS, dp.NeighboringRelation.REPLACE_ONE)
    ref.compose(dp.ComposedDpEvent([
        dp.SelfComposedDpEvent(dp.SampledWithoutReplacementDpEvent(1000, 20, dp.GaussianDpEvent(1.0)), 50),
        dp.SelfComposedDpEvent(dp.SampledWithoutReplacementDpEvent(5000, 500, dp.GaussianDpEvent(3.0)), 5),
        dp.GaussianDpEvent(4.0),
    ]))
    mine = (RDPAccountant(WOR_ORDERS, "replace_one").compose_fixed_cohort(1.0, 20, 1000, 50)
            .compose_fixed_cohort(3.0, 500, 5000, 5).compose(4.0, 1.0))
    np.testing.assert_allclose(mine.rdp, ref.rdp, rtol=1e-8)
    assert _rel(mine.epsilon(1e-6), ref.get_epsilon(1e-6)) < 1e-4


def test_nonconverging_orders_are_infinite_as_in_dp_accounting():
    # dp-accounting's test_log_a_frac_early_termination: q = 0.1, z = 1 does not converge at
    # some small fractional orders; those are excluded (inf) and epsilon stays finite
    mine = RDPAccountant().compose(1.0, 0.1)
    assert np.isinf(mine.rdp).any() and np.isfinite(mine.rdp).any()
    assert math.isfinite(mine.epsilon(1e-5))


# --- dp-accounting's published vectors -----------------------------------------------------

def test_published_poisson_rdp_vector():
    # dp_accounting/rdp/rdp_privacy_accountant_test.py, test_compute_rdp_poisson_sampled_gaussian
    # (values from TF Privacy's RDP accountant): z = 2.5, q = 0.01, 50 steps; the order inf of
    # that test is left out, fedkern's orders being finite
    mine = RDPAccountant(orders=[1.5, 2.5, 5, 50, 100]).compose(2.5, 0.01, steps=50)
    expected = [6.70579741e-04, 1.08548710e-03, 2.18075656e-03, 2.38460375e-02, 1.67416308e02]
    np.testing.assert_allclose(mine.rdp, expected, rtol=1e-5, atol=1e-8)


def test_published_pure_dp_conversion():
    # same file, test_compute_epsilon_delta_pure_dp: a constant RDP curve 1.1 on orders 2..32
    orders, rdp = np.arange(2.0, 33.0), np.full(31, 1.1)
    eps, order = acc._epsilon(orders, rdp, 1e-5)
    assert eps == pytest.approx(1.32783806176, abs=1e-7) and order == 32
    delta, order = acc._delta(orders, rdp, 1.32783806176)
    assert delta == pytest.approx(1e-5, abs=1e-7) and order == 32


def test_published_gaussian_conversion():
    # same file, test_compute_epsilon_delta_gaussian: z = 4.530877117 is exactly (1, 1e-6)-DP;
    # its orders 0.001 i start at i = 1000 (order 1), which fedkern rejects, so start at 1001
    mine = RDPAccountant(orders=[0.001 * i for i in range(1001, 100000)]).compose(4.530877117, 1.0)
    assert mine.epsilon(1e-6) == pytest.approx(1.0, abs=1e-7)
    assert mine.delta(1.0) == pytest.approx(1e-6, abs=1e-7)


def test_gaussian_delta_lies_between_the_optimal_and_the_classic_bound():
    # the check of test_delta_bounds_gaussian: for z = 1, q = 1, the exact delta of the
    # Gaussian (Balle and Wang 2018, Theorem 8) is below the RDP one, which is below
    # exp(-(eps - 1/2)^2 / 2)
    mine = RDPAccountant(orders=[0.1 * x for x in range(11, 505)]).compose(1.0, 1.0)
    for eps in [0.1 * x for x in range(500)]:
        delta = mine.delta(eps)
        exact = math.erfc((eps - 0.5) / math.sqrt(2)) / 2 - math.exp(eps) * math.erfc((eps + 0.5) / math.sqrt(2)) / 2
        classic = math.exp(-0.5 * (eps - 0.5) ** 2) if eps >= 0.5 else 1.0
        assert exact <= delta + 1e-300 and delta <= classic + 1e-300


@pytest.mark.parametrize("q, z, order, tight", [
    (0.01, 1.1, 5.5, True), (0.001, 0.8, 12.25, True), (0.01, 3.0, 1.5, False),
    (0.1, 2.0, 2.5, False), (0.3, 3.0, 1.7, False),
])
def test_fractional_order_bounds_numerical_integration(q, z, order, tight):
    # [MTZ19] eq. (2): A_alpha = E_{x ~ N(0, z^2)} [(1 - q + q exp((2x - 1) / (2 z^2)))^alpha].
    # The series (dp-accounting's) adds the magnitudes of its terms, so it bounds A_alpha from
    # above: tightly at small q, loosely at large q and small orders (2.2x at the last case)
    integrate = pytest.importorskip("scipy.integrate")

    def integrand(x):
        return (math.exp(-x * x / (2 * z * z)) / (z * math.sqrt(2 * math.pi))
                * (1 - q + q * math.exp((2 * x - 1) / (2 * z * z))) ** order)

    a, _ = integrate.quad(integrand, -40 * z, 40 * z, points=[0, order], limit=400, epsabs=0, epsrel=1e-12)
    exact = math.log(a) / (order - 1)
    mine = RDPAccountant(orders=[order]).compose(z, q).rdp[0]
    assert mine >= exact * (1 - 1e-9)
    if tight:
        assert mine == pytest.approx(exact, rel=1e-5)


@pytest.mark.parametrize("q, z, order", [(0.01, 1.1, 5), (0.1, 2.0, 3), (0.3, 3.0, 2), (0.5, 0.9, 9)])
def test_integer_order_matches_numerical_integration(q, z, order):
    integrate = pytest.importorskip("scipy.integrate")

    def integrand(x):
        return (math.exp(-x * x / (2 * z * z)) / (z * math.sqrt(2 * math.pi))
                * (1 - q + q * math.exp((2 * x - 1) / (2 * z * z))) ** order)

    a, _ = integrate.quad(integrand, -40 * z, 40 * z, points=[0, order], limit=400, epsabs=0, epsrel=1e-12)
    assert RDPAccountant(orders=[order]).compose(z, q).rdp[0] == pytest.approx(math.log(a) / (order - 1), rel=1e-9)


def test_rdp_stays_positive_where_dp_accounting_once_went_negative():
    # test_log_a_frac_positive: q = 0.4, z = 12 near order 59 once gave a negative log A
    assert (RDPAccountant(orders=np.linspace(58.5, 59.5, 21)).compose(12.0, 0.4).rdp > 0).all()


# --- closed forms ------------------------------------------------------------------------

@pytest.mark.parametrize("z", NOISES + [0.1, 37.0])
def test_full_participation_is_the_gaussian_mechanism(z):
    orders = np.array(DEFAULT_RDP_ORDERS)
    np.testing.assert_allclose(RDPAccountant().compose(z, 1.0).rdp, orders / (2 * z**2), rtol=1e-15, atol=0)
    replace_one = RDPAccountant(neighboring="replace_one")
    np.testing.assert_allclose(replace_one.compose_fixed_cohort(z, 50, 50).rdp, orders / (2 * z**2), rtol=1e-15)
    # the same accountant now holds two such rounds
    np.testing.assert_allclose(replace_one.compose(z, 1.0).rdp, 2 * orders / (2 * z**2), rtol=1e-15)


@pytest.mark.parametrize("q, z", [(0.01, 1.1), (0.1, 0.8), (1.0, 2.0)])
def test_steps_multiply_the_rdp(q, z):
    once = RDPAccountant().compose(z, q).rdp
    np.testing.assert_array_equal(RDPAccountant().compose(z, q, steps=250).rdp, 250 * once)
    chained = RDPAccountant()
    for _ in range(5):
        chained.compose(z, q)
    np.testing.assert_allclose(chained.rdp, 5 * once, rtol=1e-14)
    np.testing.assert_array_equal(RDPAccountant().compose(z, q, steps=0).rdp, 0)


def test_fixed_cohort_steps_multiply_the_rdp():
    one = RDPAccountant(WOR_ORDERS, "replace_one").compose_fixed_cohort(1.3, 30, 900).rdp
    many = RDPAccountant(WOR_ORDERS, "replace_one").compose_fixed_cohort(1.3, 30, 900, steps=77).rdp
    np.testing.assert_array_equal(many, 77 * one)


def test_subsampling_amplifies_privacy():
    full = RDPAccountant().compose(1.0, 1.0).epsilon(1e-5)
    rates = [RDPAccountant().compose(1.0, q).epsilon(1e-5) for q in (0.5, 0.1, 0.01, 0.001)]
    assert full > rates[0] > rates[1] > rates[2] > rates[3] > 0


def test_zero_noise_means_no_privacy():
    # as dp-accounting: an infinite RDP curve, epsilon inf and delta 1 (at any q > 0)
    mine = RDPAccountant().compose(0.0, 0.01)
    assert np.isinf(mine.rdp).all() and mine.epsilon(1e-5) == math.inf and mine.delta(10.0) == 1.0
    cohort = RDPAccountant(neighboring="replace_one").compose_fixed_cohort(0.0, 10, 100)
    assert cohort.epsilon(1e-5) == math.inf


def test_nothing_composed_is_perfectly_private():
    fresh = RDPAccountant()
    assert fresh.epsilon(1e-5) == 0.0 and fresh.delta(0.0) == 0.0


@pytest.mark.parametrize("q, z", [(0.01, 1.1), (0.1, 10.0), (1.0, 1.0), (0.8, 0.1)])
def test_epsilon_and_delta_are_inverse(q, z):
    # dp-accounting's test_epsilon_delta_consistency, on fedkern's accountant
    mine = RDPAccountant(orders=range(2, 50)).compose(z, q)
    for delta in [0.9, 0.1, 1e-3, 1e-5, 1e-9, 1e-12]:
        eps = mine.epsilon(delta)
        back = mine.delta(eps)
        if eps == 0:
            assert back <= delta
        else:
            assert back == pytest.approx(delta, rel=1e-9)


def test_query_results_and_views():
    mine = RDPAccountant(orders=[2, 3.5, 64]).compose(1.0, 0.01, 100)
    eps, order = mine.epsilon(1e-5, return_order=True)
    assert eps == mine.epsilon(1e-5) and order in (2.0, 3.5, 64.0)
    delta, order = mine.delta(eps, return_order=True)
    assert delta == mine.delta(eps) and order in (2.0, 3.5, 64.0)
    mine.rdp[:] = 0  # a copy: the accountant is unchanged
    assert mine.epsilon(1e-5) == eps
    with pytest.raises(ValueError):
        mine.orders[0] = 5.0
    assert mine.neighboring == "add_or_remove" and "RDPAccountant" in repr(mine)


# --- noise calibration ---------------------------------------------------------------------

@pytest.mark.parametrize("epsilon, delta, q, steps", [
    (2.0, 1e-5, 0.01, 1000), (1.0, 1e-6, 0.001, 10_000), (8.0, 1e-5, 0.1, 100), (0.5, 1e-5, 1.0, 1),
    (50.0, 1e-3, 0.5, 1),
])
def test_noise_multiplier_for_is_the_smallest_that_meets_the_target(epsilon, delta, q, steps):
    rtol = 1e-6
    z = noise_multiplier_for(epsilon, delta, q, steps, rtol=rtol)
    assert RDPAccountant().compose(z, q, steps).epsilon(delta) <= epsilon
    assert RDPAccountant().compose(z * (1 - rtol), q, steps).epsilon(delta) > epsilon


def test_noise_multiplier_for_honours_orders_and_matches_dp_accounting(dp):
    orders = [1.5, 2, 4, 8, 16, 32, 64]
    z = noise_multiplier_for(3.0, 1e-5, 0.02, 500, orders=orders, rtol=1e-7)
    assert RDPAccountant(orders).compose(z, 0.02, 500).epsilon(1e-5) <= 3.0
    assert RDPAccountant(orders).compose(z * (1 - 1e-7), 0.02, 500).epsilon(1e-5) > 3.0
    ref = dp.calibrate_dp_mechanism(
        lambda: dp.rdp.RdpAccountant(orders),
        lambda s: dp.SelfComposedDpEvent(dp.PoissonSampledDpEvent(0.02, dp.GaussianDpEvent(s)), 500),
        3.0, 1e-5, tol=1e-8)
    assert z == pytest.approx(ref, rel=1e-5)


def test_noise_multiplier_for_refuses_a_vacuous_target():
    with pytest.raises(FedkernValueError, match="epsilon"):
        noise_multiplier_for(1e15, 0.5, 1e-3, 1)


# --- PLD through dp-accounting ----------------------------------------------------------

def test_pld_epsilon_delegates_to_dp_accounting(dp):
    ref = dp.pld.PLDAccountant(value_discretization_interval=1e-3)
    ref.compose(dp.PoissonSampledDpEvent(0.01, dp.GaussianDpEvent(1.1)), 200)
    eps = pld_epsilon(1.1, 0.01, 200, 1e-5, value_discretization_interval=1e-3)
    assert eps == ref.get_epsilon(1e-5)
    assert eps < RDPAccountant().compose(1.1, 0.01, 200).epsilon(1e-5)  # PLD is the tighter
    assert pld_epsilon(0.0, 0.5, 3, 1e-5) == math.inf


def test_pld_epsilon_without_dp_accounting_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # makes the import fail
    with pytest.raises(BackendUnavailableError, match=r"fedkern\[privacy\]") as info:
        pld_epsilon(1.0, 0.01, 10, 1e-5)
    assert isinstance(info.value, ImportError)


def test_fedkern_never_imports_dp_accounting():
    code = "import sys, fedkern, fedkern._accounting as a; a.RDPAccountant().compose(1.0, 0.1).epsilon(1e-5); " \
           "print('dp_accounting' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, name", [
    (dict(orders=[2, 1.0]), FedkernValueError, "orders"),
    (dict(orders=[0.5]), FedkernValueError, "orders"),
    (dict(orders=[2, np.inf]), FedkernValueError, "orders"),
    (dict(orders=[2, np.nan]), FedkernValueError, "orders"),
    (dict(orders=[]), FedkernValueError, "orders"),
    (dict(orders=[[2, 3]]), FedkernValueError, "orders"),
    (dict(orders=["2"]), FedkernTypeError, "orders"),
    (dict(orders=3.0), FedkernTypeError, "orders"),
    (dict(neighboring="replace"), FedkernValueError, "neighboring"),
    (dict(neighboring=1), FedkernTypeError, "neighboring"),
])
def test_bad_accountant_arguments(kwargs, error, name):
    with pytest.raises(error, match=name):
        RDPAccountant(**kwargs)


@pytest.mark.parametrize("args, error, name", [
    ((-0.1, 0.01), FedkernValueError, "noise_multiplier"),
    ((np.nan, 0.01), FedkernValueError, "noise_multiplier"),
    (("1", 0.01), FedkernTypeError, "noise_multiplier"),
    ((1.0, 0.0), FedkernValueError, "sample_rate"),
    ((1.0, -0.1), FedkernValueError, "sample_rate"),
    ((1.0, 1.5), FedkernValueError, "sample_rate"),
    ((1.0, None), FedkernTypeError, "sample_rate"),
    ((1.0, 0.01, -1), FedkernValueError, "steps"),
    ((1.0, 0.01, 2.0), FedkernTypeError, "steps"),
    ((1.0, 0.01, True), FedkernTypeError, "steps"),
])
def test_bad_compose_arguments(args, error, name):
    mine = RDPAccountant()
    with pytest.raises(error, match=name):
        mine.compose(*args)
    assert (mine.rdp == 0).all()  # nothing was composed


@pytest.mark.parametrize("args, error, name", [
    ((-1.0, 10, 100), FedkernValueError, "noise_multiplier"),
    ((1.0, 0, 100), FedkernValueError, "cohort_size"),
    ((1.0, 101, 100), FedkernValueError, "cohort_size"),
    ((1.0, 10.0, 100), FedkernTypeError, "cohort_size"),
    ((1.0, 10, 0), FedkernValueError, "population"),
    ((1.0, 10, 100, -2), FedkernValueError, "steps"),
    ((1.0, 10, 100, 0.5), FedkernTypeError, "steps"),
])
def test_bad_fixed_cohort_arguments(args, error, name):
    with pytest.raises(error, match=name):
        RDPAccountant(neighboring="replace_one").compose_fixed_cohort(*args)


def test_each_sampling_scheme_needs_its_relation():
    with pytest.raises(FedkernValueError, match="replace_one"):
        RDPAccountant().compose_fixed_cohort(1.0, 10, 100)
    with pytest.raises(FedkernValueError, match="add_or_remove"):
        RDPAccountant(neighboring="replace_one").compose(1.0, 0.01)


@pytest.mark.parametrize("value, error", [(0.0, FedkernValueError), (1.0, FedkernValueError),
                                          (-1e-5, FedkernValueError), (np.nan, FedkernValueError),
                                          ("1e-5", FedkernTypeError)])
def test_bad_delta(value, error):
    with pytest.raises(error, match="delta"):
        RDPAccountant().compose(1.0, 0.01).epsilon(value)


@pytest.mark.parametrize("value, error", [(-0.5, FedkernValueError), (np.inf, FedkernValueError),
                                          (None, FedkernTypeError)])
def test_bad_epsilon(value, error):
    with pytest.raises(error, match="epsilon"):
        RDPAccountant().compose(1.0, 0.01).delta(value)


@pytest.mark.parametrize("args, kwargs, error, name", [
    ((0.0, 1e-5, 0.01, 10), {}, FedkernValueError, "epsilon"),
    ((1.0, 0.0, 0.01, 10), {}, FedkernValueError, "delta"),
    ((1.0, 1e-5, 0.0, 10), {}, FedkernValueError, "sample_rate"),
    ((1.0, 1e-5, 0.01, 0), {}, FedkernValueError, "steps"),
    ((1.0, 1e-5, 0.01, 10), dict(rtol=0.0), FedkernValueError, "rtol"),
    ((1.0, 1e-5, 0.01, 10), dict(orders=[1.0, 2.0]), FedkernValueError, "orders"),
])
def test_bad_noise_multiplier_for_arguments(args, kwargs, error, name):
    with pytest.raises(error, match=name):
        noise_multiplier_for(*args, **kwargs)


@pytest.mark.parametrize("args, kwargs, error, name", [
    ((-1.0, 0.01, 10, 1e-5), {}, FedkernValueError, "noise_multiplier"),
    ((1.0, 2.0, 10, 1e-5), {}, FedkernValueError, "sample_rate"),
    ((1.0, 0.01, -1, 1e-5), {}, FedkernValueError, "steps"),
    ((1.0, 0.01, 10, 1.0), {}, FedkernValueError, "delta"),
    ((1.0, 0.01, 10, 1e-5), dict(value_discretization_interval=0.0), FedkernValueError, "value_discretization"),
])
def test_bad_pld_arguments(args, kwargs, error, name):
    with pytest.raises(error, match=name):
        pld_epsilon(*args, **kwargs)
