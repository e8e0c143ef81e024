"""Task registry, the generated arithmetic task, and the user's data and reward functions."""

import json

import pytest

import dfpo.tasks as tasks
from dfpo.tasks.rewards import load_reward_function, reward_functions, score_components
from dfpo.tasks.user import DataError, RewardFunctionError, UserTask


def test_registry():
    assert {"arithmetic", "user"} <= set(tasks.names())
    with pytest.raises(KeyError, match="unknown task 'arith'; registered: arithmetic"):
        tasks.get("arith")


def test_arithmetic_splits_are_disjoint_and_deterministic():
    task = tasks.get("arithmetic", min_terms=2, max_terms=4, eval_size=200)
    train = task.examples("train", 2000)
    evaluation = task.examples("eval")
    assert len(evaluation) == 200
    assert not {e["expression"] for e in train} & {e["expression"] for e in evaluation}
    assert train == tasks.get("arithmetic", min_terms=2, max_terms=4, eval_size=200).examples("train", 2000)
    assert {e["terms"] for e in train} == {2, 3, 4}
    with pytest.raises(ValueError, match="no split 'test'; it has train, eval"):
        task.examples("test")


def test_arithmetic_mixes_operand_lengths_evenly_with_min_digits():
    mixed = tasks.get("arithmetic", min_terms=2, max_terms=2, digits=2, min_digits=1, operators="+", eval_size=400)
    lengths = [len(str(n)) for e in mixed.examples("eval") for n in e["expression"].split(" + ")]
    assert set(lengths) == {1, 2} and 0.4 < lengths.count(1) / len(lengths) < 0.6
    assert {e["digits"] for e in mixed.examples("eval")} == {1, 2}
    # without min_digits the problems are the ones drawn before the option existed (fixed eval splits)
    assert [e["expression"] for e in tasks.get("arithmetic", eval_size=50).examples("eval")[:3]] == [
        "72 + 97", "15 - 63 - 97", "26 + 12 - 62",
    ]  # fmt: skip
    sub = tasks.get("arithmetic", operators="-", eval_size=1000)
    assert [e["expression"] for e in sub.examples("train", 2)] == ["97 - 53 - 5", "38 - 61 - 45"]
    with pytest.raises(ValueError, match="1 <= min_digits <= digits"):
        tasks.get("arithmetic", digits=2, min_digits=3)


def test_arithmetic_scores_the_marked_answer_only():
    task = tasks.get("arithmetic", operators="+-*")
    example = task.examples("eval", 1)[0]
    assert task.score(example["solution"], example) == 1.0
    answer = example["answer"]
    assert task.score(f"I think {answer}.", example) == 0.0
    assert task.score(f"The answer is {int(answer) + 1}.", example) == 0.0
    assert task.messages(example) == [{"role": "user", "content": example["prompt"]}]


def test_arithmetic_left_to_right_steps():
    task = tasks.get("arithmetic", min_terms=3, max_terms=3, operators="*-", digits=1, eval_size=50)
    for e in task.examples("eval"):
        numbers = [int(t) for t in e["expression"].split()[::2]]
        ops = e["expression"].split()[1::2]
        value = numbers[0]
        for op, n in zip(ops, numbers[1:], strict=True):
            value = value * n if op == "*" else value - n
        assert e["answer"] == str(value)


def test_arithmetic_prompt_styles_and_few_shot_turns():
    terse = tasks.get("arithmetic", eval_size=5, prompt_style="terse", few_shot=2)
    instruct = tasks.get("arithmetic", eval_size=5)
    example = terse.examples("eval", 1)[0]
    assert example["prompt"] == f"{example['expression']} ="
    assert instruct.examples("eval", 1)[0]["prompt"].startswith(f"Compute {example['expression']} from left to right")
    turns = terse.messages(example)
    shots = terse.examples("train", 2)
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant", "user"]
    assert turns[1]["content"] == shots[0]["solution"] and turns[-1]["content"] == example["prompt"]
    assert {s["expression"] for s in shots}.isdisjoint(e["expression"] for e in terse.examples("eval"))
    assert terse.messages(example) == turns  # the same shots for every prompt
    with pytest.raises(ValueError, match="prompt_style must be 'instruct' or 'terse'"):
        tasks.get("arithmetic", prompt_style="short")


def test_presets_build_their_tasks():
    from dfpo.tasks.presets import PRESETS, preset

    assert {"tiny-arithmetic", "smollm2-arithmetic"} <= set(PRESETS)
    task = preset("smollm2-arithmetic").build_task()
    assert task.few_shot == 3 and len(task.messages(task.examples("eval", 1)[0])) == 7
    with pytest.raises(KeyError, match="unknown preset 'tiny'; presets: tiny-arithmetic"):
        preset("tiny")


def test_arithmetic_refuses_impossible_settings():
    with pytest.raises(ValueError, match=r"only \d+ distinct problems"):
        tasks.get("arithmetic", min_terms=2, max_terms=2, digits=1, operators="+", eval_size=500)
    with pytest.raises(ValueError, match="operators from"):
        tasks.get("arithmetic", operators="/")


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_user_data_problems_are_reported_by_row_number(tmp_path):
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [
            {"prompt": "2+2?", "answer": "4"},
            {"answer": "1"},
            {"prompt": 5, "answer": "1"},
            "{not json",
            {"prompt": [{"role": "user"}], "answer": "1"},
            {"prompt": "ok", "answer": None},
            {"prompt": "   ", "answer": "3"},
        ],
    )
    with pytest.raises(DataError, match=r"row 4: not valid JSON"):
        UserTask(path)
    (tmp_path / "data.jsonl").write_text(
        (tmp_path / "data.jsonl").read_text().replace("{not json\n", '{"prompt": "fine", "answer": "2"}\n')
    )
    with pytest.raises(DataError) as info:
        UserTask(path)
    message = str(info.value)
    assert "5 problem(s)" in message
    for expected in (
        "row 2: 'prompt' is missing",
        "row 3: 'prompt' must be a string or a non-empty list of chat messages, got int",
        "row 5: 'prompt' message 0 needs string 'role' and 'content' fields",
        "row 6: 'answer' is missing",
        "row 7: 'prompt' is empty",
    ):
        assert expected in message


def test_user_parquet_and_default_scoring(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(20)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    task = UserTask(str(tmp_path / "d.parquet"), eval_fraction=0.25, seed=1)
    train, evaluation = task.examples("train"), task.examples("eval")
    assert len(evaluation) == 5 and len(train) == 15
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evaluation}
    e = evaluation[0]
    assert task.score(f"The answer is {e['answer']}.", e) == 1.0
    assert task.score(e["answer"], e) == 0.0


REWARDS = """
def length_penalty(completions, answer, **_):
    return [None if c == "skip" else float(c.strip() == a) - 0.01 * len(c) for c, a in zip(completions, answer)]

def wrong_length(completions, **_):
    return [1.0]

def not_a_number(completions, **_):
    return ["high" for _ in completions]
"""


def test_reward_function_by_file_and_by_dotted_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    fn = load_reward_function(f"{tmp_path / 'my_rewards.py'}:length_penalty")
    rows = [{"prompt": "p", "answer": "4", "_row": 1}, {"prompt": "q", "answer": "5", "_row": 2}]
    out = score_components(reward_functions(fn), ["4", "skip"], rows)
    assert out == {"length_penalty": [pytest.approx(0.99), None]}
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward_function("my_rewards.length_penalty") is not None
    assert load_reward_function("my_rewards:length_penalty") is not None


def test_reward_function_errors_name_the_problem(tmp_path, monkeypatch):
    (tmp_path / "bad_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = [{"prompt": "p"}, {"prompt": "q"}]
    with pytest.raises(RewardFunctionError, match="'wrong_length' returned list of length 1, not a list of one"):
        score_components(reward_functions("bad_rewards:wrong_length"), ["a", "b"], rows)
    with pytest.raises(RewardFunctionError, match=r"'not_a_number' returned 'high' \(expected a finite .* on sample 0"):
        score_components(reward_functions("bad_rewards:not_a_number"), ["a", "b"], rows)
    with pytest.raises(RewardFunctionError, match="has no function 'missing'"):
        load_reward_function("bad_rewards:missing")
    with pytest.raises(RewardFunctionError, match="cannot import 'no_such_module'"):
        load_reward_function("no_such_module:f")
    with pytest.raises(RewardFunctionError, match="does not exist"):
        load_reward_function("nowhere/r.py:f")


def test_user_task_with_reward_function_needs_no_answer_column(tmp_path):
    (tmp_path / "r.py").write_text(
        "def starts_yes(completions, **_):\n    return [float(c.startswith('yes')) for c in completions]\n"
    )
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Say yes"}] * 10)
    task = UserTask(data, reward=f"{tmp_path / 'r.py'}:starts_yes")
    rows = task.examples("train", 2)
    assert task.score_batch(["yes!", "no"], rows) == [1.0, 0.0]
