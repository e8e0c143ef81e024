"""The tiny model's tokenizer and architecture, and supervised fine-tuning on gold answers."""

import torch

import dfpo.tasks as tasks
from dfpo.evaluate import generate, render_prompt
from dfpo.models import load_model
from dfpo.sft import IGNORE, sft_batch, target_text, train_sft
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
