"""Sampling: filters against direct definitions, seeds independent of the batch, stop tokens and strings."""

from __future__ import annotations

import copy

import pytest
import torch

from lora_serve import Engine, EngineConfig, FinishReason, SamplingParams
from lora_serve.detokenizer import Detokenizer
from lora_serve.sampling import _filter

PROMPT = [5, 17, 33, 9, 41, 77]


def test_top_k_and_top_p_keep_the_defined_sets():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5, 2.5])
    kept = torch.isfinite(_filter(logits, top_k=2, top_p=1.0))
    assert kept.tolist() == [False, True, False, False, True]
    probs = logits.softmax(-1)  # sorted: 3.0 (.41), 2.5 (.25), 2.0 (.15), 1.0, 0.5
    top2 = probs[1] + probs[4]
    # Nucleus = smallest set of most likely tokens whose mass reaches top_p.
    assert torch.isfinite(_filter(logits, 0, float(top2) - 1e-4)).tolist() == [False, True, False, False, True]
    assert torch.isfinite(_filter(logits, 0, float(top2) + 1e-4)).sum() == 3
    assert torch.isfinite(_filter(logits, 0, 1e-6)).tolist() == [False, True, False, False, False]


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(stop=("",)), "stop"),
        (dict(stop_token_ids=(-1,)), "stop_token_ids"),
    ],
)
def test_bad_sampling_values_are_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**bad)


@pytest.fixture(scope="module")
def engine():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=211, eos_token_id=2, bos_token_id=1, pad_token_id=0,
    )
    return Engine(LlamaForCausalLM(config), config=EngineConfig(pool_slots=5000))


def test_seeded_sampling_does_not_depend_on_the_batch(engine):
    params = SamplingParams(max_tokens=12, temperature=1.3, top_p=0.95, seed=7, ignore_eos=True)
    alone = engine.generate([PROMPT], params)[0].token_ids
    others = SamplingParams(max_tokens=5, temperature=0.8, seed=3)
    mixed = engine.generate([[9, 9, 9], PROMPT, [4] * 10], [others, params, others])[1].token_ids
    assert alone == mixed
    assert engine.generate([PROMPT], SamplingParams(max_tokens=12, temperature=1.3, seed=8))[0].token_ids != alone


def test_top_k_one_is_greedy(engine):
    greedy = engine.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    top1 = engine.generate([PROMPT], SamplingParams(max_tokens=8, temperature=2.0, top_k=1, ignore_eos=True))[0]
    assert top1.token_ids == greedy.token_ids


def test_stop_token_ids_and_max_tokens(engine):
    greedy = engine.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert greedy.finish_reason == FinishReason.LENGTH and len(greedy.token_ids) == 8
    stop_at = greedy.token_ids[3]
    first = greedy.token_ids.index(stop_at)
    stopped = engine.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=(stop_at,)))[0]
    assert stopped.token_ids == greedy.token_ids[: first + 1]
    assert stopped.finish_reason == FinishReason.STOP


class _CharTokenizer:
    """Token id = a character's code point: enough to drive the detokenizer."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def test_stop_strings_are_cut_and_never_streamed():
    detok = Detokenizer(_CharTokenizer(), stop=("END", "\n\n"))
    streamed, ids = [], []
    for ch in "hello EN world\n ok EN":
        ids.append(ord(ch))
        assert not detok.update(ids)
        streamed.append(detok.delta(finished=False))
    ids.append(ord("D"))
    assert detok.update(ids)  # "...ok END" -> stop
    streamed.append(detok.delta(finished=True))
    assert "".join(streamed) == detok.text == "hello EN world\n ok "


@pytest.mark.parametrize(
    "extreme",
    [dict(temperature=1e-39), dict(temperature=5e-324), dict(temperature=2e-5), dict(top_p=1e-300),
     dict(temperature=1e-38, top_p=1e-300, top_k=1)],
)
def test_extreme_sampling_values_are_defined_and_the_engine_keeps_serving(engine, extreme):
    # Issue 16: temperature 1e-39 overflowed logits / temperature and top_p 1e-300 dropped every token, so
    # torch.multinomial raised inside the step and every later request failed too.
    greedy = engine.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0].token_ids
    params = SamplingParams(max_tokens=6, ignore_eos=True, seed=1, **extreme)
    out = engine.generate([PROMPT], params)[0]
    assert out.finish_reason == FinishReason.LENGTH, out.error
    # A temperature this close to 0, or a nucleus of one token, is the argmax: the scaled-up random model's
    # logit margins are far above what a temperature of 2e-5 could blur.
    assert out.token_ids == greedy
    assert engine.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0].token_ids == greedy
    assert engine.stats().pool.kv == 0


def test_top_p_keeps_the_top_token_even_below_float32_resolution():
    logits = torch.tensor([1.0, 3.0, 2.0])
    assert torch.isfinite(_filter(logits, 0, 1e-300)).tolist() == [False, True, False]


def test_any_integer_is_a_seed_taken_modulo_2_to_the_64(engine):
    # Issue 16: a huge seed made torch's manual_seed raise inside submit (answered as an error about `prompt`).
    def run(seed):
        return engine.generate([PROMPT], SamplingParams(max_tokens=6, temperature=1.5, seed=seed))[0].token_ids

    assert run(2**200 + 5) == run(5) == run(5 - 2**64)
    assert run(5) != run(6)
    with pytest.raises(ValueError, match="seed must be an integer or None, got float"):
        SamplingParams(seed=1.5)


def test_a_request_failing_in_sampling_ends_alone_and_frees_its_pages(engine, monkeypatch):
    # NaN logits for one row (as an fp16 overflow would give) make torch.multinomial raise: that request
    # ends with finish reason "error"; its greedy neighbour in the same batch finishes normally.
    import lora_serve.sampling as sampling

    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    expected = engine.generate([PROMPT], greedy)[0].token_ids
    real_sample = sampling.sample

    def poisoned(logits, params, generators):
        logits = logits.clone()
        for row, p in enumerate(params):
            if not p.greedy:
                logits[row] = float("nan")
        return real_sample(logits, params, generators)

    monkeypatch.setattr("lora_serve.engine.sample", poisoned)
    failed, fine = engine.generate([[9, 9, 9], PROMPT], [SamplingParams(max_tokens=6, temperature=0.7), greedy])
    assert failed.finish_reason == FinishReason.ERROR and "RuntimeError" in failed.error, failed
    assert fine.finish_reason == FinishReason.LENGTH and fine.token_ids == expected
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.pool.kv) == (0, 0, 0)
    assert not engine.has_unfinished()
