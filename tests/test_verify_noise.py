"""math-verify under a process-level timeout, and seeded noise models."""

import threading
import time

import pytest

import dfpo.tasks as tasks
from dfpo.supervision.noise import Clean, Flip, Gaussian, PseudoLabel, make_noise
from dfpo.tasks.base import majority_vote
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
    with pytest.raises(ValueError, match=r"binary rewards \(0 or 1\), but the reward was 0.5 for sample 1: use"):
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
    assert make_noise("pseudo_label(8)", seed=2) == PseudoLabel(8, seed=2)
    with pytest.raises(ValueError, match=r"needs a number, as in pseudo_label\(8\)"):
        make_noise("pseudo_label(0.5)")
    with pytest.raises(ValueError, match="n >= 1"):
        make_noise("pseudo_label(0)")


@pytest.fixture(scope="module")
def arithmetic():
    return tasks.get("arithmetic", eval_size=20)


def test_every_noise_scores_a_batch_against_the_gold_answer(arithmetic):
    examples = arithmetic.examples("eval", 4)
    completions = [f"The answer is {e['answer']}." for e in examples[:2]] + ["The answer is 1e9.", "no answer"]
    clean = make_noise("clean").score(arithmetic, completions, examples, step=0)
    assert clean.true == clean.observed == [1.0, 1.0, 0.0, 0.0]
    flipped = make_noise("flip(1.0)").score(arithmetic, completions, examples, step=0)
    assert flipped.true == [1.0, 1.0, 0.0, 0.0] and flipped.observed == [0.0, 0.0, 1.0, 1.0] and flipped.rate == 1.0


def test_majority_vote_groups_numbers_by_value_and_breaks_ties_by_first_seen(arithmetic):
    example = arithmetic.examples("eval", 1)[0]
    votes = ["The answer is 1,200.", "the answer is 7", "The answer is 1200.", "rambling", "The answer is 7."]
    assert majority_vote(arithmetic, example, votes) == ("1,200", 0.4)
    assert majority_vote(arithmetic, example, ["The answer is 3.", "The answer is 5."]) == ("3", 0.5)
    assert majority_vote(arithmetic, example, ["nothing marked", "\\boxed{1} or \\boxed{2}"]) == (None, 0.0)
    science = tasks.get("science", benchmarks=["sciq"])
    question = science.examples("eval", 1)[0]
    assert majority_vote(science, question, ["The answer is (b).", "The answer is B", "The answer is C."]) == (
        "B",
        2 / 3,
    )


def test_pseudo_label_scores_against_the_vote_and_reports_disagreement(arithmetic):
    examples = arithmetic.examples("eval", 3)
    wrong = str(int(examples[1]["answer"]) + 1)
    labelled = [
        {**examples[0], "pseudo_answer": examples[0]["answer"]},
        {**examples[1], "pseudo_answer": wrong},
        {**examples[2], "pseudo_answer": None},
    ]
    completions = [f"The answer is {examples[0]['answer']}.", f"The answer is {wrong}.", "The answer is 5."]
    noise = PseudoLabel(4)
    out = noise.score(arithmetic, completions, labelled, step=0)
    assert out.observed == [1.0, 1.0, 0.0]  # the wrong pseudo-label rewards the wrong answer; no label, no reward
    assert out.true == [1.0, 0.0, float(examples[2]["answer"] == "5")]
    assert out.rate == pytest.approx(sum(o != t for o, t in zip(out.observed, out.true, strict=True)) / 3)
    with pytest.raises(ValueError, match=r"call PseudoLabel\.label"):
        noise.score(arithmetic, completions, examples, step=0)


class ScriptedModel:
    """Stands in for a causal LM: replies to the k-th generated row with ``replies[k % len(replies)]``."""

    def __init__(self, tokenizer, replies):
        self.tokenizer, self.replies, self.calls = tokenizer, replies, 0

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, **sampling):
        import torch

        rows = []
        for _ in range(len(input_ids)):
            text = self.replies[self.calls % len(self.replies)]
            self.calls += 1
            rows.append(self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id])
        width = max(map(len, rows))
        rows = [r + [pad_token_id] * (width - len(r)) for r in rows]
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)


def test_pseudo_label_majority_of_n_samples_and_its_accuracy(arithmetic):
    from dfpo.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    examples = arithmetic.examples("eval", 2)
    right, wrong = examples[0]["answer"], str(int(examples[1]["answer"]) + 3)
    # 3 samples per prompt: example 0 votes right 2 to 1, example 1 votes wrong 2 to 1.
    replies = [f"The answer is {right}.", "The answer is 0.", f"The answer is {right}."]
    replies += [f"The answer is {wrong}.", f"The answer is {examples[1]['answer']}.", f"The answer is {wrong}."]
    labelled, stats = PseudoLabel(3).label(ScriptedModel(tokenizer, replies), tokenizer, arithmetic, examples)
    assert [e["pseudo_answer"] for e in labelled] == [right, wrong]
    assert [e["answer"] for e in labelled] == [examples[0]["answer"], examples[1]["answer"]]  # gold kept
    assert stats == {"accuracy": 0.5, "abstain_rate": 0.0, "agreement": pytest.approx(2 / 3)}
