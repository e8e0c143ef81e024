"""Rollouts with the embedded tiny model: response masks, truncation, token alignment of the log-probs, and the
shared-prompt paths (a prompt run once for all the rows that answer it) against running every row whole."""

import pytest
import torch

import dfpo.tasks as tasks
from dfpo.evaluate import render_prompt
from dfpo.generation.rollout import (
    forward_positions,
    generate_batch,
    position_ids,
    response_forward,
    response_logprobs,
    response_mask,
    sample,
    trunk_hidden,
)
from dfpo.models import load_model


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


def test_generating_n_answers_from_one_prefill_equals_generating_every_row_whole(tiny):
    model, tokenizer, prompts = tiny
    repeated = [p for p in prompts[:3] for _ in range(4)]
    # 8 new tokens, fewer than the prompts' 16: the prompts are prefilled apart
    whole = generate_batch(model, tokenizer, repeated, max_new_tokens=8)  # greedy, each row prefilled on its own
    shared = generate_batch(model, tokenizer, prompts[:3], max_new_tokens=8, repeats=4)
    assert torch.equal(shared.input_ids, whole.input_ids)
    assert torch.equal(shared.attention_mask, whole.attention_mask)
    assert shared.completions == whole.completions
    assert shared.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def _all_rows_whole(monkeypatch):
    """Make every row run its prompt itself, as if no two rows shared one."""
    import dfpo.generation.rollout as rollout

    monkeypatch.setattr(rollout, "_shared_prefixes", lambda *args: None)


def test_shared_prompt_forward_gives_the_same_logprobs_states_and_gradients(tiny, monkeypatch):
    """Rows in a shuffled order, two prompts with three answers each: running each prompt once and copying its
    key/value cache gives what running every row whole gives, gradients included (they add up over the copies)."""
    model, tokenizer, prompts = tiny
    torch.manual_seed(3)
    rollout = sample(model, tokenizer, [prompts[2], prompts[7]], n=3, max_new_tokens=6)  # shorter than the prompts
    order = torch.tensor([4, 0, 5, 2, 1, 3])
    ids, attn, width = rollout.input_ids[order], rollout.attention_mask[order], rollout.response_mask.shape[1]

    def run():
        model.zero_grad()
        logp, hidden = response_forward(model, ids, attn, width, temperature=0.7, hidden_states=True)
        trunk = trunk_hidden(model.model, ids, attn, width)
        (logp.sum() + hidden.square().mean() + trunk.mean()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logp.detach(), hidden.detach(), trunk.detach(), grads

    shared = run()
    assert forward_positions(ids, attn, width) < ids.numel()  # the shared path ran
    with monkeypatch.context() as m:
        _all_rows_whole(m)
        assert forward_positions(ids, attn, width) == ids.numel()
        whole = run()
    for a, b in zip(shared[:3], whole[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert shared[3].keys() == whole[3].keys()
    for name in whole[3]:
        torch.testing.assert_close(shared[3][name], whole[3][name], rtol=1e-4, atol=1e-5, msg=name)
    model.zero_grad()


def test_forward_positions_counts_each_distinct_prompt_once():
    # 4 rows, prompt width 3 (+ the tail: last prompt token and 2 response tokens); rows 0, 1, 3 share a prompt
    ids = torch.tensor([[5, 6, 7, 8, 1, 2], [5, 6, 7, 8, 3, 4], [0, 6, 7, 8, 1, 1], [5, 6, 7, 8, 9, 9]])
    attn = torch.ones_like(ids)
    assert forward_positions(ids, attn, response_length=2) == 2 * 3 + 4 * 3
    attn[2, 0] = 0  # a different mask makes a different prompt even with equal ids
    assert forward_positions(ids, attn, response_length=2) == 2 * 3 + 4 * 3
    distinct = ids.clone()
    distinct[:, 0] = torch.arange(4)
    assert forward_positions(distinct, attn, response_length=2) == distinct.numel()
    # a prompt shorter than the tail runs with its rows: no separate pass
    assert forward_positions(ids, attn, response_length=3) == ids.numel()
