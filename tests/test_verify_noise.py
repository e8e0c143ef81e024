"""math-verify under a process-level timeout, and seeded noise models."""

import threading
import time

import pytest

from dfpo.tasks.noise import Clean, Flip, Gaussian, make_noise
from dfpo.tasks.verify import MathVerifier, VerifierError


@pytest.fixture(scope="module")
def verifier():
    v = MathVerifier(timeout=20.0)
    yield v
    v.close()


def test_math_verify_equivalences(verifier):
    assert verifier("\\frac{3}{4}", "0.75")
    assert verifier("\\sqrt{8}", "2\\sqrt{2}")
    assert verifier("x^2 + 2x + 1", "(x+1)^2")
    assert not verifier("\\frac{3}{4}", "0.7")
    assert not verifier("3", "")


def test_math_verify_times_out_inside_a_worker_thread_and_recovers(verifier):
    """An input that makes sympy run for minutes is cut off at the timeout, from a non-main thread."""
    slow = MathVerifier(timeout=3.0)
    slow("1", "1")  # the worker's start-up (spawn, import sympy) is bounded separately, not by the 3 s
    outcome = {}

    def run():
        start = time.perf_counter()
        try:
            slow("2^{2^{2^{2^{5}}}}", "3^{3^{3^{3}}}")
            outcome["result"] = "returned"
        except VerifierError as error:
            outcome["result"] = str(error)
        outcome["seconds"] = time.perf_counter() - start

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert "took over 3s" in outcome["result"]
    assert outcome["seconds"] < 15
    assert slow("2", "2.0")  # a fresh worker replaced the killed one
    slow.close()


def test_unparseable_gold_is_an_error_not_a_zero(verifier):
    with pytest.raises(VerifierError, match="cannot parse the gold answer"):
        verifier("", "3")


def test_flip_is_deterministic_by_seed_and_step_and_realises_its_rate():
    rewards = [float(i % 2) for i in range(20_000)]
    noise = Flip(0.2, seed=7)
    a, b = noise(rewards, step=3), noise(rewards, step=3)
    assert a.observed == b.observed
    assert a.observed != noise(rewards, step=4).observed
    assert a.observed != Flip(0.2, seed=8)(rewards, step=3).observed
    assert a.true == rewards
    flipped = sum(o != t for o, t in zip(a.observed, a.true, strict=True)) / len(rewards)
    assert a.rate == pytest.approx(flipped)
    assert a.rate == pytest.approx(0.2, abs=0.01)  # 5 standard errors
    assert set(a.observed) == {0.0, 1.0}


def test_flip_refuses_graded_rewards():
    with pytest.raises(ValueError, match=r"binary rewards \(0 or 1\), got 0.5 at index 1; use gaussian"):
        Flip(0.1)([1.0, 0.5], step=0)


def test_gaussian_noise_rate_and_determinism():
    rewards = [0.5] * 20_000
    out = Gaussian(0.3, seed=1)(rewards, step=0)
    assert out.rate == pytest.approx(0.3, rel=0.03)
    assert out.observed == Gaussian(0.3, seed=1)(rewards, step=0).observed
    assert sum(out.observed) / len(rewards) == pytest.approx(0.5, abs=0.01)


def test_make_noise_specs_and_errors():
    assert make_noise("clean") == Clean()
    assert make_noise("flip(0.4)", seed=3) == Flip(0.4, seed=3)
    assert make_noise(" gaussian( 0.1 ) ") == Gaussian(0.1)
    with pytest.raises(ValueError, match=r"unknown noise 'flop\(0.2\)'; valid: clean, flip\(p\), gaussian"):
        make_noise("flop(0.2)")
    with pytest.raises(ValueError, match=r"needs a number, as in flip\(0.2\)"):
        make_noise("flip(x)")
    with pytest.raises(ValueError, match="0 <= p <= 1"):
        make_noise("flip(1.5)")
