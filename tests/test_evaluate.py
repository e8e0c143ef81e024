"""Batched generation and task evaluation with the real SmolLM2-135M-Instruct."""

import pytest

import dfpo.tasks as tasks
from dfpo.evaluate import evaluate, generate, render_prompt
from dfpo.models import load_model


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2")


def test_render_prompt_uses_the_chat_template(smollm2):
    _, tokenizer = smollm2
    text = render_prompt(tokenizer, [{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>assistant\n") and "Hi" in text


def test_generate_marks_truncated_completions(smollm2):
    model, tokenizer = smollm2
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": "Count from 1 to 50."}])]
    texts, truncated = generate(model, tokenizer, prompts * 2, max_new_tokens=3, batch_size=2)
    assert len(texts) == 2 and truncated == [True, True]


def test_evaluate_reports_accuracy_and_format(smollm2):
    model, tokenizer = smollm2
    task = tasks.get("arithmetic", min_terms=2, max_terms=2, digits=1, eval_size=50)
    result = evaluate(model, tokenizer, task, "eval", limit=4, max_new_tokens=24, batch_size=4)
    assert result["n"] == 4
    assert 0.0 <= result["accuracy"] <= result["format_rate"] <= 1.0
    assert result["verifier_errors"] == 0
    assert result["sample"]["prompt"].startswith("<|im_start|>")
