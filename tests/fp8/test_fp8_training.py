"""End to end: a tiny LM trained with FP8AdamW (+ FP8 activations) matches fp32 AdamW's loss, and the
optimizer works inside Hugging Face's Trainer (which drives it through Accelerate), checkpoints included."""

import pytest
import torch
import transformers

from moeplug.fp8 import FP8AdamW, compress_activations

VOCAB, SEQ, BATCH = 128, 48, 8


def _tiny_llama() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _bigram_batches(steps: int) -> list[torch.Tensor]:
    """Token sequences from a fixed, peaked bigram chain: learnable, so losses move a lot in 120 steps."""
    gen = torch.Generator().manual_seed(0)
    transitions = torch.softmax(torch.randn(VOCAB, VOCAB, generator=gen) * 3, dim=-1)
    batches = []
    for _ in range(steps):
        tokens = [torch.randint(0, VOCAB, (BATCH,), generator=gen)]
        for _ in range(SEQ - 1):
            tokens.append(torch.multinomial(transitions[tokens[-1]], 1, generator=gen).squeeze(1))
        batches.append(torch.stack(tokens, dim=1))
    return batches


def _train(make_optimizer, compress: bool, batches) -> list[float]:
    model = _tiny_llama()
    optimizer = make_optimizer(model.parameters())
    if compress:
        compress_activations(model)
    losses = []
    for ids in batches:
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_tiny_lm_converges_like_fp32_adamw():
    batches = _bigram_batches(120)
    reference = _train(lambda p: torch.optim.AdamW(p, lr=3e-3), False, batches)
    fp8 = _train(lambda p: FP8AdamW(p, lr=3e-3), True, batches)
    final_ref, final_fp8 = sum(reference[-10:]) / 10, sum(fp8[-10:]) / 10
    assert final_ref < 0.75 * reference[0]  # the task is learnt, so the comparison means something
    # Measured here: mean of the last 10 losses 2.4234 with FP8 states + activations vs 2.4223 (0.05%).
    assert abs(final_fp8 - final_ref) <= 0.02 * final_ref, (final_fp8, final_ref)


class _Batches(torch.utils.data.Dataset):
    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def _trainer(model, out_dir, max_steps) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=4, save_steps=3,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True)
    rows = torch.cat(_bigram_batches(3))
    # The documented one-liner: pass the optimizer, let Trainer build its default scheduler.
    return transformers.Trainer(model=model, args=args, train_dataset=_Batches(rows),
                                optimizers=(FP8AdamW(model.parameters(), lr=3e-3), None))


def test_hf_trainer_trains_and_resumes_from_checkpoint(tmp_path):
    model = _tiny_llama()
    trainer = _trainer(model, tmp_path, max_steps=6)
    trainer.train()
    optimizer = trainer.optimizer.optimizer  # Trainer wraps it in Accelerate's AcceleratedOptimizer
    embed_state = optimizer.state[model.model.embed_tokens.weight]
    assert embed_state["exp_avg"].dtype == torch.float8_e4m3fn
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]

    resumed_model = _tiny_llama()
    resumed = _trainer(resumed_model, tmp_path / "resumed", max_steps=6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
