"""A TRL or verl user's data and reward functions, taken as they are."""

import asyncio
import json
from pathlib import Path

import pytest

from dfpo.cli import main
from dfpo.tasks.rewards import RewardFunctionError, reward_functions, score_components
from dfpo.tasks.user import DataError, UserTask, load_rows

TINY = [
    "model=tiny", "task=user", "rollout.prompts=2", "rollout.samples=2", "rollout.max_new_tokens=12", "eval.limit=4",
    "eval.samples=2", "critic.warmup_steps=1", "critic.flow.samples=8", "log.progress=false", "algo=grpo",
]  # fmt: skip

REWARDS = '''
import asyncio

def trl_length(prompts, completions, completion_ids, answer, **kwargs):
    """TRL's contract: keywords, conversational completions where the prompt is a message list."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    assert len(prompts) == len(completions) == len(completion_ids) == len(answer)
    assert all(isinstance(ids, list) and all(isinstance(t, int) for t in ids) for ids in completion_ids)
    return [float(len(t) < 20) for t in texts]

def conversational_only(completions, **kwargs):
    assert all(isinstance(c, list) and c[0]["role"] == "assistant" for c in completions), completions[:1]
    return [0.5 for _ in completions]

def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """verl's contract: one sample, ground truth from reward_model.ground_truth."""
    assert data_source == "toy" and isinstance(solution_str, str) and ground_truth in ("yes", "no")
    return {"score": float(ground_truth in solution_str), "acc": 0.0}

def breaks_on_two(completions, prompts, **kwargs):
    if any("two" in str(p) for p in prompts):
        raise ZeroDivisionError("division by zero")
    return [1.0] * len(completions)

def says_hi(completions, **kwargs):
    return [float("hi" in c.lower()) for c in completions]
'''


def _rows(n: int, conversational: bool) -> list[dict]:
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
    rows = []
    for i in range(n):
        text = f"Is {words[i % 8]} a number? Answer yes or no."
        prompt = [{"role": "user", "content": text}] if conversational else text
        rows.append({"prompt": prompt, "answer": "yes", "data_source": "toy",
                     "reward_model": {"style": "rule", "ground_truth": "yes"}, "extra_info": {"index": i}})  # fmt: skip
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_trl_and_verl_rewards_weighted_train_two_steps(tmp_path):
    """A TRL reward (conversational completions), a verl compute_score and a second TRL reward, weighted: the run
    trains, logs each function, and sees unflipped rewards without noise= (task=user defaults to clean)."""
    (tmp_path / "rewards.py").write_text(REWARDS)
    data = _write_jsonl(tmp_path / "data.jsonl", _rows(16, conversational=True))
    r = tmp_path / "rewards.py"
    run = tmp_path / "run"
    code = main(["train", *TINY, "steps=2", f"task_options.data={data}", f"run_dir={run}",
                 f"task_options.reward={r}:trl_length,{r}:compute_score,{r}:conversational_only",
                 "task_options.reward_weights=1,2,0.5"])  # fmt: skip
    assert code == 0
    metrics = _metrics(run)
    assert [m["step"] for m in metrics if "step" in m][-1] == 2
    last = metrics[-1]
    for name in ("trl_length", "compute_score", "conversational_only"):
        assert f"reward/{name}" in last
    assert last["reward/conversational_only"] == 0.5
    assert last["reward/noise_rate"] == 0.0
    expected = last["reward/trl_length"] + 2 * last["reward/compute_score"] + 0.25
    assert last["reward/observed"] == pytest.approx(expected)
    assert json.loads((run / "train_config.json").read_text())["config"]["noise"] == "clean"


def test_reward_only_data_trains_and_evaluates_with_its_reward(tmp_path):
    """No answer column: training and evaluation both score with the reward function, batched, and report the
    mean reward and mean@k, not answer-format metrics."""
    (tmp_path / "rewards.py").write_text(REWARDS)
    rows = [{"prompt": f"Say hi to {name}."} for name in ("Ann", "Bob", "Cy", "Di", "Ed", "Flo", "Gus", "Hal")] * 2
    data = _write_jsonl(tmp_path / "data.jsonl", rows)
    run = tmp_path / "run"
    assert main(["train", *TINY, "steps=2", f"task_options.data={data}", "task_options.eval_fraction=0.25",
                 f"task_options.reward={tmp_path / 'rewards.py'}:says_hi", f"run_dir={run}"]) == 0  # fmt: skip
    after = json.loads((run / "eval.json").read_text())["after"]["eval"]
    assert after["n"] == 4 and 0.0 <= after["mean_reward"] <= 1.0 and "mean@2" in after
    assert "format_rate" not in after and "maj@2" not in after
    keys = set().union(*(m for m in _metrics(run) if any(k.startswith("eval/") for k in m)))
    assert "eval/eval/mean_reward" in keys, keys
    assert not any(k.endswith(("/format_rate", "/maj@2")) for k in keys)
    assert "mean_reward" in (run / "summary.md").read_text()


def test_a_raising_reward_names_the_function_and_the_sample(tmp_path, capsys):
    (tmp_path / "rewards.py").write_text(REWARDS)
    data = _write_jsonl(tmp_path / "data.jsonl", [{"prompt": "Is two a number?"}] * 8)
    code = main(["train", *TINY, "steps=2", f"task_options.data={data}", "task_options.eval_fraction=0",
                 "eval.splits=", f"task_options.reward={tmp_path / 'rewards.py'}:breaks_on_two",
                 f"run_dir={tmp_path / 'run'}"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert "RewardFunctionError" in err and "Traceback" not in err
    assert "'breaks_on_two' raised ZeroDivisionError: division by zero on sample" in err
    assert "Is two a number?" in err and "--debug shows the traceback" in err
    with pytest.raises(RewardFunctionError):  # --debug keeps the traceback
        main(["train", *TINY, "steps=2", f"task_options.data={data}", "task_options.eval_fraction=0", "eval.splits=",
              f"task_options.reward={tmp_path / 'rewards.py'}:breaks_on_two", f"run_dir={tmp_path / 'run2'}",
              "--debug"])  # fmt: skip


def test_trl_plain_prompts_get_string_completions():
    seen = {}

    def reward(prompts, completions, **kwargs):
        seen.update(prompts=prompts, completions=completions, columns=sorted(kwargs))
        return [1.0] * len(completions)

    rows = load_rows(_rows(2, conversational=False))
    out = score_components(reward_functions(reward), ["yes", "no"], rows, [[1, 2], [3]])
    assert out == {"reward": [1.0, 1.0]}
    assert seen["completions"] == ["yes", "no"] and seen["prompts"][0].startswith("Is one")
    assert seen["columns"] == ["answer", "completion_ids", "data_source", "extra_info", "reward_model"]


def test_reward_style_is_chosen_by_signature_or_by_name():
    def verl_style(data_source, solution_str, ground_truth, extra_info=None):
        return 1.0

    def trl_style(completions, **kwargs):
        return [1.0] * len(completions)

    assert [r.style for r in reward_functions([verl_style, trl_style])] == ["verl", "trl"]
    assert reward_functions(trl_style, style="plain")[0].style == "plain"
    with pytest.raises(RewardFunctionError, match="reward_style='nope'"):
        reward_functions(trl_style, style="nope")
    with pytest.raises(RewardFunctionError, match="2 numbers for 1 reward functions"):
        reward_functions(trl_style, weights="1,2")


def test_async_rewards_run_concurrently():
    """A per-sample async judge is awaited on every sample at once, beside a second async function, so a batch
    waits for its slowest call; counted by the calls in flight, not by a clock."""
    in_flight, most = 0, 0

    async def judge(data_source, solution_str, ground_truth, extra_info=None):
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return float(solution_str == ground_truth)

    async def batch_judge(completions, **kwargs):
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return [0.0] * len(completions)

    rows = load_rows(_rows(4, conversational=False))
    out = score_components(reward_functions([judge, batch_judge]), ["yes", "no", "yes", "x"], rows)
    assert out == {"judge": [1.0, 0.0, 1.0, 0.0], "batch_judge": [0.0] * 4}
    assert most == 5  # four samples of the judge and the batch judge, all awaited together


def test_data_formats_load(tmp_path):
    import datasets

    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(6)]
    (tmp_path / "d.csv").write_text("prompt,answer\n" + "".join(f'"{r["prompt"]}",{r["answer"]}\n' for r in rows))
    csv_rows = load_rows(tmp_path / "d.csv")
    assert [(r["prompt"], str(r["answer"])) for r in csv_rows] == [(r["prompt"], r["answer"]) for r in rows]

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    assert [r["answer"] for r in load_rows(tmp_path / "saved")] == [r["answer"] for r in rows]
    with pytest.raises(DataError, match="no split 'test'; it has train"):
        load_rows(tmp_path / "saved", split="test")

    (tmp_path / "d.json").write_text(json.dumps(rows))  # a JSON array, not JSON lines
    assert len(load_rows(tmp_path / "d.json")) == 6
    assert load_rows(datasets.Dataset.from_list(rows))[0]["prompt"] == "What is 0 + 1?"

    messages = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{i}+1?"},
                              {"role": "assistant", "content": str(i + 1)}]} for i in range(10)]  # fmt: skip
    task = UserTask(str(_write_jsonl(tmp_path / "m.jsonl", messages)), eval_fraction=0.2)
    example = task.examples("train")[0]
    assert example["prompt"][-1]["role"] == "user" and len(example["prompt"]) == 2
    assert example["answer"] == str(int(example["prompt"][-1]["content"].split("+")[0]) + 1)


def test_a_dataset_in_the_local_hub_cache_loads_by_name_offline(tmp_path, monkeypatch):
    """Laid out as huggingface_hub caches a downloaded dataset repo; nothing is fetched."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "datasets--someone--toy-math"
    snapshot = repo / "snapshots" / ("a" * 40)
    (snapshot / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    _write_jsonl(snapshot / "data" / "train.jsonl", [{"prompt": "1+1?", "answer": "2"}] * 3)
    assert [r["answer"] for r in load_rows("someone/toy-math")] == ["2"] * 3
    with pytest.raises(DataError, match="nor a dataset in the local Hugging Face cache"):
        load_rows("someone/not-downloaded")


def test_templated_prompts_are_used_as_they_are(tmp_path):
    from dfpo.models import load_model

    _, tokenizer = load_model("tiny")
    data = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "<|raw|> 2+2=", "answer": "4"}] * 4)
    example = UserTask(str(data), eval_fraction=0).examples("train")[0]
    assert UserTask(str(data), templated=True).prompt_text(tokenizer, example) == "<|raw|> 2+2="
    assert UserTask(str(data)).prompt_text(tokenizer, example) != "<|raw|> 2+2="


def _greedy(model, tokenizer, prompt: str) -> str:
    from dfpo.evaluate import generate

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return generate(model, tokenizer, [prompt], max_new_tokens=12)[0][0]


@pytest.mark.parametrize("lora", [False, True])
def test_export_writes_a_plain_folder_that_generates_as_the_run_does(lora, tmp_path):
    """A full and a LoRA run: ``dfpo export`` (and the run's own final/) load with plain transformers and write
    the same greedy text as the run's policy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dfpo.models import load_model

    run = tmp_path / "run"
    extra = ["actor.lora_rank=4", "actor.lr=1e-2"] if lora else ["actor.lr=1e-3"]
    args = ["train", "model=tiny", "task=arithmetic", "algo=grpo", "steps=2", "noise=flip(0.4)", "rollout.prompts=2",
            "rollout.samples=2", "rollout.max_new_tokens=12", "eval.splits=", "log.progress=false", f"run_dir={run}",
            *extra]  # fmt: skip
    assert main(args) == 0
    assert main(["export", str(run), str(tmp_path / "out")]) == 0
    policy, tokenizer = load_model(str(run))
    prompt = "3 + 4 ="
    expected = _greedy(policy, tokenizer, prompt)
    base = dict(load_model("tiny")[0].named_parameters())
    for folder in (tmp_path / "out", run / "final"):
        assert not (folder / "adapter_config.json").exists()
        model = AutoModelForCausalLM.from_pretrained(folder)
        moved = max(float((p - base[n]).abs().max().detach()) for n, p in model.named_parameters())
        assert moved > 0  # training (through the merged adapters, for LoRA) changed the weights
        plain = AutoTokenizer.from_pretrained(folder)
        assert _greedy(model, plain, prompt) == expected


def test_a_hub_id_in_the_local_cache_loads_offline(tmp_path, monkeypatch):
    import shutil

    import huggingface_hub.constants as constants

    from dfpo.models import TINY_DIR, resolve_model

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--someone--tiny-lm"
    snapshot = repo / "snapshots" / ("b" * 40)
    shutil.copytree(TINY_DIR, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    assert resolve_model("someone/tiny-lm") == snapshot
    from dfpo.assets import MissingAssetError

    with pytest.raises(MissingAssetError, match="nor a model in the local Hugging Face cache"):
        resolve_model("someone/absent-lm")


def test_python_api_applies_presets_and_takes_objects_and_callbacks(tmp_path):
    """``train(TrainConfig(algo="grpo"))`` runs GRPO's preset (no critic), data and rewards go in as Python
    objects, and callbacks see every step and evaluation."""
    from dfpo import Callback, TrainConfig, train

    seen: dict[str, list] = {"steps": [], "evals": []}

    class Record(Callback):
        def on_step_end(self, trainer, step, metrics):
            seen["steps"].append((step, metrics["reward/observed"]))

        def on_evaluate(self, trainer, step, results):
            seen["evals"].append((step, sorted(results)))

    def long_enough(completions, **kwargs):
        return [float(len(c) > 3) for c in completions]

    rows = [{"prompt": f"{a} + {a} ="} for a in range(12)]
    config = TrainConfig(algo="grpo", model="tiny", task="user", steps=2, run_dir=str(tmp_path / "run"))
    result = train(config, callbacks=[Record()], task_options={"data": rows, "reward": long_enough},
                   rollout={"prompts": 2, "samples": 2, "max_new_tokens": 8}, eval={"limit": 2, "samples": 0},
                   log={"progress": False})  # fmt: skip
    assert [s for s, _ in seen["steps"]] == [1, 2] and [s for s, _ in seen["evals"]] == [0, 2]
    assert "mean_reward" in result["after"]["eval"]
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())["config"]
    assert saved["critic"]["kind"] == "none" and saved["advantage"]["estimator"] == "grpo"
    assert saved["task_options"]["reward"].endswith("long_enough>")
    assert saved["task_options"]["data"] == "<list of 12 rows in memory>"
    # the same objects resume the run; its identity is the description, not the objects' addresses
    train(config, steps=3, resume="auto", task_options={"data": list(rows), "reward": long_enough},
          rollout={"prompts": 2, "samples": 2, "max_new_tokens": 8}, eval={"limit": 2, "samples": 0},
          log={"progress": False})  # fmt: skip
    assert [s for s, _ in seen["steps"]] == [1, 2]
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3


def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = text.split("## Python\n", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    assert (tmp_path / "runs" / "api" / "final" / "config.json").exists()


def test_flipping_a_graded_user_reward_is_a_named_error(tmp_path, capsys):
    (tmp_path / "rewards.py").write_text("def half(completions, **kw):\n    return [0.5] * len(completions)\n")
    data = _write_jsonl(tmp_path / "data.jsonl", [{"prompt": "Hello"}] * 8)
    code = main(["train", *TINY, "steps=1", f"task_options.data={data}", "eval.splits=", "noise=flip(0.2)",
                 f"task_options.reward={tmp_path / 'rewards.py'}:half", f"run_dir={tmp_path / 'run'}"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "NoiseError: noise=flip(0.2) needs binary rewards (0 or 1), but the reward was 0.5" in err


def test_evaluating_a_run_folder_runs_its_reward_code_only_when_trusted(tmp_path, capsys):
    (tmp_path / "rewards.py").write_text(REWARDS)
    data = _write_jsonl(tmp_path / "data.jsonl", [{"prompt": f"Say hi to {n}."} for n in "ABCDEFGH"])
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *TINY,
                "steps=1",
                f"task_options.data={data}",
                "task_options.eval_fraction=0.5",
                "eval.samples=0",
                f"task_options.reward={tmp_path / 'rewards.py'}:says_hi",
                f"run_dir={run}",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["eval", str(run)]) == 2
    assert "trust_run_code=true" in capsys.readouterr().err
    assert main(["eval", str(run), "trust_run_code=true"]) == 0
    assert "mean_reward=" in capsys.readouterr().out
