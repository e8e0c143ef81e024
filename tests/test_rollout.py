"""Rollouts with the embedded tiny model: response masks, truncation, and token alignment of the log-probs."""

import pytest
import torch

import dfpo.tasks as tasks
from dfpo.evaluate import render_prompt
from dfpo.models import load_model
from dfpo.rollout import position_ids, response_forward, response_logprobs, response_mask, sample


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_model("tiny")
    model.eval()
    task = tasks.get("arithmetic", prompt_style="terse", eval_size=8)
    prompts = [render_prompt(tokenizer, task.messages(e)) for e in task.examples("eval")]
    return model, tokenizer, prompts


def test_response_mask_stops_after_the_first_end_token_even_when_pad_is_end():
    eos = 2
    responses = torch.tensor([[5, 6, 2, 2, 2], [5, 2, 7, 2, 9], [5, 6, 7, 8, 9]])
    assert response_mask(responses, eos).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert position_ids(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


def test_sample_groups_n_responses_per_prompt_and_is_seeded(tiny):
    model, tokenizer, prompts = tiny
    torch.manual_seed(0)
    rollout = sample(model, tokenizer, prompts[:3], n=4, max_new_tokens=48)
    assert rollout.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert rollout.input_ids.shape == rollout.attention_mask.shape
    assert rollout.response_mask.shape[1] == rollout.input_ids.shape[1] - rollout.prompt_length
    responses = rollout.input_ids[:, rollout.prompt_length :]
    for row, text in enumerate(rollout.completions):
        length = int(rollout.response_mask[row].sum())
        kept = responses[row, :length]
        assert tokenizer.decode(kept, skip_special_tokens=True) == text
        ended = bool((kept == tokenizer.eos_token_id).any())
        assert ended != bool(rollout.truncated[row])
    torch.manual_seed(0)
    assert sample(model, tokenizer, prompts[:3], n=4, max_new_tokens=48).completions == rollout.completions
    short = sample(model, tokenizer, prompts[:2], n=2, max_new_tokens=3)
    assert short.truncated.all() and short.response_mask.sum().item() == 12
    with pytest.raises(ValueError, match="temperature > 0"):
        sample(model, tokenizer, prompts[:1], temperature=0.0)


def test_logprob_of_token_t_comes_from_position_t_minus_1_and_ignores_left_padding(tiny):
    """Batched, left-padded log-probs equal a token-by-token recomputation on each unpadded sequence."""
    model, tokenizer, prompts = tiny
    torch.manual_seed(1)
    rollout = sample(model, tokenizer, [prompts[0], prompts[5]], n=2, max_new_tokens=24)
    width = rollout.response_mask.shape[1]
    with torch.no_grad():
        batched = response_logprobs(model, rollout.input_ids, rollout.attention_mask, width)
    assert batched.shape == rollout.response_mask.shape
    for row in range(len(rollout.completions)):
        real = rollout.attention_mask[row].bool()
        sequence = rollout.input_ids[row][real]  # no padding at all
        response_tokens = int(rollout.response_mask[row].sum())
        start = len(sequence) - response_tokens
        for t in range(response_tokens):
            with torch.no_grad():
                logits = model(input_ids=sequence[None, : start + t]).logits[0, -1]
            expected = torch.log_softmax(logits.float(), -1)[sequence[start + t]]
            assert batched[row, t].item() == pytest.approx(expected.item(), abs=1e-4)


def test_hidden_states_are_those_of_the_state_before_each_response_token(tiny):
    """The critic reads, for response token t, the last-layer state at position P + t - 1 (the last prompt token
    for t = 0); a sequence scored alone and inside a left-padded batch gives the same states."""
    model, tokenizer, prompts = tiny
    torch.manual_seed(2)
    rollout = sample(model, tokenizer, [prompts[1], prompts[6]], n=1, max_new_tokens=16)
    width = rollout.response_mask.shape[1]
    with torch.no_grad():
        logprobs, hidden = response_forward(
            model, rollout.input_ids, rollout.attention_mask, width, temperature=0.7, hidden_states=True
        )
    assert hidden.shape == (2, width, model.config.hidden_size)
    for row in range(2):
        sequence = rollout.input_ids[row][rollout.attention_mask[row].bool()]
        response_tokens = int(rollout.response_mask[row].sum())
        start = len(sequence) - response_tokens
        with torch.no_grad():
            alone = model(input_ids=sequence[None], output_hidden_states=True)
        before = slice(start - 1, start - 1 + response_tokens)
        assert torch.allclose(hidden[row, :response_tokens], alone.hidden_states[-1][0, before], atol=1e-4)
        # log-probs of the temperature-0.7 distribution the tokens were drawn from
        expected = torch.log_softmax(alone.logits[0, before].float() / 0.7, -1).gather(-1, sequence[start:, None])
        assert torch.allclose(logprobs[row, :response_tokens], expected.squeeze(-1), atol=1e-4)
