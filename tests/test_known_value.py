"""The known_value task: rewards with a known value function, for measuring what a critic learns."""

import math

import pytest
import torch

import dfpo.tasks as tasks
from dfpo.tasks.arithmetic import Arithmetic
from dfpo.tasks.known_value import KnownValue
from dfpo.tasks.presets import task_options_for
from dfpo.tasks.user import UserTask


def example(expression: str) -> dict:
    return {"prompt": f"{expression} =", "expression": expression, "answer": "0"}


def within_four_standard_errors(rewards: list[float], p: float) -> bool:
    return abs(sum(rewards) / len(rewards) - p) <= 4 * math.sqrt(p * (1 - p) / len(rewards))


def test_registered_with_arithmetic_prompts_and_terse_for_the_tiny_model():
    assert "known_value" in tasks.names()
    options = {"min_terms": 2, "max_terms": 4, "eval_size": 50, "few_shot": 2, "prompt_style": "terse"}
    task = tasks.get("known_value", kind="bernoulli", **options)
    arithmetic = Arithmetic(**options)
    train = task.examples("train", 20)
    assert [e["expression"] for e in train] == [e["expression"] for e in arithmetic.examples("train", 20)]
    assert all(e["prompt"] == f"{e['expression']} =" and e["prompt"].endswith(f"{e['last_operand']} =") for e in train)
    evaluation = task.examples("eval")
    assert [task.messages(e) for e in evaluation] == [arithmetic.messages(e) for e in arithmetic.examples("eval")]
    assert task_options_for("tiny", "known_value", {"kind": "response"}) == {
        "prompt_style": "terse",
        "kind": "response",
    }
    assert task_options_for("smollm2", "known_value", {}) == {}
    with pytest.raises(ValueError, match="no split 'test'"):
        task.examples("test")
    with pytest.raises(ValueError, match="kind must be one of prompt, response, bernoulli"):
        tasks.get("known_value", kind="parity")


def test_reward_ranges():
    assert KnownValue.reward_range == Arithmetic.reward_range == (0.0, 1.0)
    assert UserTask.reward_range is None


def test_prompt_kind_rewards_the_last_operator_whatever_the_response():
    task = KnownValue(kind="prompt")
    completions = ["12 + 34 = 46. 46 - 5 = 41. The answer is 41.", "The answer is 40.", "", "no idea"]
    for expression, bit in [("12 + 34 - 5", 0.0), ("12 - 34 + 50", 1.0), ("7 - 0", 0.0), ("98 + 13", 1.0)]:
        e = example(expression)
        assert task.score_batch(completions, [e] * 4) == [bit] * 4
        assert task.value(e) == bit and task.return_distribution(e) == [(bit, 1.0)]
    for e in task.examples("eval", 100):
        assert task.score("The answer is 2.", e) == task.value(e) == float(e["last_operator"] == "+")
    assert 0 < sum(task.value(e) for e in task.examples("eval")) < 500  # both operators occur
    assert {e["terms"] for e in task.examples("eval")} == {2}  # two-term problems by default


def test_response_kind_rewards_a_final_answer_of_at_least_50():
    task = KnownValue(kind="response")
    e = example("12 + 34 + 5")  # the right answer, 51, would be rewarded: correctness does not matter
    cases = {
        "12 + 34 = 46. 46 + 5 = 51. The answer is 51.": 1.0,
        "12 + 34 = 46. 46 + 5 = 49. The answer is 49.": 0.0,
        "The answer is 50.": 1.0,
        "The answer is 49.5.": 0.0,
        "The answer is -60.": 0.0,
        "The answer is 1,234.": 1.0,
        "\\boxed{80}": 1.0,
        "The answer is fifty.": 0.0,
        "46 + 5 = 51.": 0.0,  # no marked answer
        "": 0.0,
    }
    assert task.score_batch(list(cases), [e] * len(cases)) == list(cases.values())
    assert [task.score(c, e) for c in cases] == list(cases.values())
    assert task.value(e) is None and task.return_distribution(e) is None


@pytest.mark.parametrize(("operator", "p"), [("+", 0.8), ("-", 0.2)])
def test_bernoulli_rate_over_distinct_prompts_matches_p(operator, p):
    task = KnownValue(kind="bernoulli")
    examples = [example(f"{a} {operator} {b}") for a in range(100) for b in range(40)]
    assert {task.value(e) for e in examples} == {p}
    assert task.return_distribution(examples[0]) == [(0.0, 1 - p), (1.0, p)]
    rewards = task.score_batch(["The answer is 7."] * len(examples), examples)
    assert set(rewards) <= {0.0, 1.0} and within_four_standard_errors(rewards, p)


def test_bernoulli_draws_of_identical_completions_are_independent():
    task = KnownValue(kind="bernoulli")
    # one prompt answered 4,000 times the same way: each occurrence draws anew
    e = example("12 + 34 - 5")
    p = task.value(e)
    rewards = task.score_batch(["The answer is 41."] * 4000, [e] * 4000)
    assert within_four_standard_errors(rewards, p)
    # two identical completions of each of 4,000 prompts: both rewarded with probability p^2, not p
    examples = [example(f"{a} + {b}") for a in range(100) for b in range(40)]
    pairs = task.score_batch(["The answer is 7."] * 8000, [e for e in examples for _ in range(2)])
    both = [pairs[2 * i] * pairs[2 * i + 1] for i in range(len(examples))]
    assert within_four_standard_errors(both, 0.8**2)
    # occurrences are counted per (prompt, completion): a different completion in between does not shift them
    assert task.score_batch(["a", "b", "a"], [e] * 3) == [
        task.score_batch(["a"], [e])[0], task.score_batch(["b"], [e])[0], task.score_batch(["a", "a"], [e] * 2)[1],
    ]  # fmt: skip


def test_bernoulli_draws_are_reproducible_and_keyed_by_the_seed():
    examples = [example(f"{a} - {b}") for a in range(20) for b in range(20)]
    completions = [f"The answer is {i % 7}." for i in range(len(examples))]
    first = KnownValue(kind="bernoulli").score_batch(completions, examples)
    assert KnownValue(kind="bernoulli").score_batch(completions, examples) == first
    assert KnownValue(kind="bernoulli", seed=1).score_batch(completions, examples) != first
    task = KnownValue(kind="bernoulli")
    assert [task.score(c, e) for c, e in zip(completions, examples, strict=True)] == first  # occurrence 0


def test_tiny_model_rewards_match_the_known_values():
    from dfpo.evaluate import render_prompt
    from dfpo.generation.rollout import sample
    from dfpo.models import load_model

    model, tokenizer = load_model("tiny")
    prompt_task = tasks.get("known_value", **task_options_for("tiny", "known_value", {"kind": "prompt"}))
    examples = prompt_task.examples("eval", 16)
    prompts = [render_prompt(tokenizer, prompt_task.messages(e)) for e in examples]
    assert all(
        p.rstrip().endswith(f"{e['last_operand']} =\n<|assistant|>") for p, e in zip(prompts, examples, strict=True)
    )
    torch.manual_seed(0)
    rollout = sample(model, tokenizer, prompts, 4, 48, 0.7)
    per_sample = [examples[i] for i in rollout.prompt_index.tolist()]
    rewards = prompt_task.score_batch(rollout.completions, per_sample)
    plus_share = sum(e["last_operator"] == "+" for e in examples) / len(examples)
    assert 0 < plus_share < 1 and sum(rewards) / len(rewards) == pytest.approx(plus_share)
    # the response kind reads the model's own answer: where that answer is right, it is the true result's
    response_task = KnownValue(kind="response", prompt_style="terse")
    arithmetic = Arithmetic(prompt_style="terse", max_terms=2)
    right = [(c, e) for c, e in zip(rollout.completions, per_sample, strict=True) if arithmetic.score(c, e) == 1.0]
    assert len(right) >= 16
    assert [response_task.score(c, e) for c, e in right] == [float(int(e["answer"]) >= 50) for _, e in right]
