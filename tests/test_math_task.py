"""The math task: reasoning-gym training problems, real GSM8K and MATH-500 eval sets, strict scoring."""

import subprocess
import sys

import pytest

import dfpo.tasks as tasks


@pytest.fixture(scope="module")
def math_task():
    task = tasks.get("math", train_size=300, eval_size=100, few_shot=2)
    yield task
    task._verifier.close()


def test_generated_splits_are_disjoint_mixed_and_reproducible_across_processes(math_task):
    train, evaluation = math_task.examples("train"), math_task.examples("eval")
    assert len(train) == 300 and len(evaluation) == 100
    assert not {e["question"] for e in train} & {e["question"] for e in evaluation}
    assert {e["source"] for e in train[:60]} == {"basic_arithmetic", "chain_sum", "gsm_symbolic"}
    code = (
        "import dfpo.tasks as t; print(t.get('math', train_size=300, eval_size=100).examples('train')[7]['question'])"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == train[7]["question"].strip()


def test_real_eval_sets(math_task):
    gsm8k, math500 = math_task.examples("gsm8k"), math_task.examples("math500")
    assert len(gsm8k) == 1319 and len(math500) == 500
    assert math500[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert "The answer is N." in gsm8k[0]["prompt"]


def test_scoring_is_strict_and_symbolic_where_needed(math_task):
    gsm = math_task.examples("gsm8k", 1)[0]  # Janet's ducks: 18
    assert math_task.score("She makes 9 * 2 = 18 dollars. The answer is 18.", gsm) == 1.0
    assert math_task.score("She makes 18 dollars.", gsm) == 0.0
    assert math_task.score("The answer is 16.", gsm) == 0.0
    polar = math_task.examples("math500", 1)[0]
    assert math_task.score("The answer is $(3, \\frac{\\pi}{2})$.", polar) == 1.0
    assert math_task.score("\\boxed{(3, \\pi)}", polar) == 0.0
    assert math_task.verifier_errors == 0


def test_few_shot_turns_teach_the_format(math_task):
    example = math_task.examples("eval", 1)[0]
    turns = math_task.messages(example)
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant", "user"]
    assert turns[1]["content"].startswith("The answer is ")
    assert turns[-1]["content"] == example["prompt"]
