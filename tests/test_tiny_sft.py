"""The tiny model's tokenizer and architecture, and supervised fine-tuning on gold answers."""

import torch

import dfpo.tasks as tasks
from dfpo.evaluate import generate, render_prompt
from dfpo.models import load_model
from dfpo.sft import IGNORE, sft_batch, train_sft
from dfpo.tasks.base import target_text
from dfpo.tiny import build_model, build_tokenizer


def test_character_tokenizer_round_trips_and_has_a_chat_template():
    tokenizer = build_tokenizer()
    text = "Compute 12 - 7 from left to right. The answer is -5."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tokenizer.decode(ids) == text
    prompt = render_prompt(tokenizer, [{"role": "user", "content": "1 + 1?"}])
    assert prompt == "<|user|>1 + 1?\n<|assistant|>"
    assert tokenizer(prompt, add_special_tokens=False)["input_ids"][0] == tokenizer.convert_tokens_to_ids("<|user|>")


def test_sft_labels_cover_exactly_the_target_and_end_token():
    tokenizer = build_tokenizer()
    task = tasks.get("arithmetic", eval_size=20, train_size=50)
    examples = task.examples("train", 3)
    batch = sft_batch(tokenizer, task, examples)
    for row, example in enumerate(examples):
        taught = batch["labels"][row][batch["labels"][row] != IGNORE]
        assert tokenizer.decode(taught) == target_text(example) + tokenizer.eos_token
        length = int(batch["attention_mask"][row].sum())
        assert torch.all(batch["attention_mask"][row, :length] == 1)  # right padding
        assert torch.all(batch["labels"][row, length:] == IGNORE)


def test_sft_lowers_the_loss_and_the_model_saves_and_loads(tmp_path):
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size=64, layers=2, heads=4)
    task = tasks.get("arithmetic", min_terms=2, max_terms=2, digits=1, operators="+", eval_size=20, train_size=80)
    history = train_sft(model, tokenizer, task, steps=40, batch_size=16, lr=3e-3, warmup_steps=5, log=None)
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_model(str(tmp_path))
    prompt = render_prompt(loaded_tokenizer, task.messages(task.examples("eval", 1)[0]))
    texts, _ = generate(loaded, loaded_tokenizer, [prompt], max_new_tokens=12)
    original, _ = generate(model, tokenizer, [prompt], max_new_tokens=12)
    assert texts == original


def test_the_shipped_tiny_model_loads_generates_and_matches_its_record():
    """The committed weights reproduce the held-out accuracy recorded beside them (same greedy decoding)."""
    import json

    from dfpo.evaluate import evaluate
    from dfpo.models import TINY_DIR

    model, tokenizer = load_model("tiny")
    record = json.loads((TINY_DIR / "sft.json").read_text())
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]
    assert sum(f.stat().st_size for f in TINY_DIR.glob("*.safetensors")) <= 10 * 2**20
    config = record["config"]
    task = tasks.get(config["task"], **config["task_options"])
    result = evaluate(model, tokenizer, task, "eval", config["eval_limit"], config["max_new_tokens"], batch_size=64)
    # greedy decoding is deterministic; the tolerance only allows an argmax tie broken differently by another CPU
    assert abs(result["accuracy"] - record["eval_accuracy"]) <= 0.02
    assert 0.2 <= result["accuracy"] <= 0.6  # room for RL in both directions
    assert result["format_rate"] > 0.9


def test_sft_stops_at_the_first_eval_that_reaches_stop_at(monkeypatch):
    import dfpo.evaluate

    measured = iter([0.1, 0.3, 0.5, 0.9])
    monkeypatch.setattr(dfpo.evaluate, "evaluate", lambda *args, **kwargs: {"accuracy": next(measured)})
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size=32, layers=1, heads=2)
    task = tasks.get("arithmetic", eval_size=10, train_size=40)
    history = train_sft(model, tokenizer, task, steps=50, batch_size=4, eval_every=2, stop_at=0.25, log=None)
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["eval_accuracy"] == 0.3
