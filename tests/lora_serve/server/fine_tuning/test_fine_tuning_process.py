"""``lora-serve --fine-tuning-dir`` as users run it (the engine in its own process): the ``openai`` client's
upload -> create -> poll -> query, and a restarted server serving the fine-tuned model again."""

from __future__ import annotations

import openai
import pytest

from lora_serve.testing import serve_in_subprocess


@pytest.mark.slow  # two lora-serve processes
def test_lora_serve_fine_tunes_and_serves_after_a_restart(tmp_path, lora, serve, ft):
    base = lora.tiny_model("llama")
    base.save_pretrained(tmp_path / "model")
    serve.char_tokenizer().save_pretrained(tmp_path / "model")
    args = ["--model", str(tmp_path / "model"), "--served-model-name", "base", "--pool-slots", "4000",
            "--api-key", "k", "--fine-tuning-dir", str(tmp_path / "ft"), "--ft-learning-rate", str(ft.BASE_LR),
            "--ft-checkpoint-every", "3"]
    with serve_in_subprocess(args) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0, timeout=60)
        uploaded = client.files.create(file=("train.jsonl", ft.jsonl(ft.chat_examples())), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="base", training_file=uploaded.id, seed=ft.SEED,
                                             hyperparameters=ft.HYPER, extra_body={"lora": ft.LORA})
        job = ft.wait_finished(client, job.id)
        assert job.status == "succeeded", job.error
        first = client.completions.create(model=job.fine_tuned_model, prompt="cat", max_tokens=8, temperature=0)
    with serve_in_subprocess(args) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0, timeout=60)
        assert client.fine_tuning.jobs.retrieve(job.id).status in ("running", "succeeded")  # until re-served
        assert ft.wait_finished(client, job.id).status == "succeeded"
        assert job.fine_tuned_model in [m.id for m in client.models.list().data]
        again = client.completions.create(model=job.fine_tuned_model, prompt="cat", max_tokens=8, temperature=0)
        assert again.choices[0].text == first.choices[0].text
