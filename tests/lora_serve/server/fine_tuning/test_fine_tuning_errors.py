"""Bad input to the files and jobs endpoints gets OpenAI-style 4xx errors naming the problem; cancel; API key."""

from __future__ import annotations

import json

import httpx
import openai
import pytest


def _upload(client, data: bytes, name: str = "train.jsonl"):
    return client.files.create(file=(name, data), purpose="fine-tune")


@pytest.mark.parametrize(("data", "message"), [
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n', "line 2: not valid JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}).encode(),
     "line 1: messages[1].role is 'robot'"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), "line 1: no assistant message"),
    (b"\n\n", "no examples"),
    (b'{"text": "x"}', "line 1: expected a chat example"),
], ids=["malformed-json", "wrong-role", "no-assistant", "empty", "unknown-format"])
def test_bad_files_are_refused_naming_the_line(server, data, message):
    with pytest.raises(openai.BadRequestError) as caught:
        _upload(server.openai(), data)
    assert message in caught.value.message and caught.value.body["param"] == "file"


def test_a_file_over_the_limit_gets_413_and_wrong_purpose_400(server, ft):
    client = server.openai()
    with pytest.raises(openai.APIStatusError) as caught:
        _upload(client, ft.jsonl(ft.chat_examples(60)))  # > max_file_bytes = 4096
    assert caught.value.status_code == 413
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("t.jsonl", ft.jsonl(ft.chat_examples(1))), purpose="batch")


def test_files_list_retrieve_delete(server, ft):
    client = server.openai()
    uploaded = _upload(client, ft.jsonl(ft.chat_examples(2)), "two.jsonl")
    assert client.files.retrieve(uploaded.id).filename == "two.jsonl"
    assert uploaded.id in [f.id for f in client.files.list().data]
    assert client.files.delete(uploaded.id).deleted
    for call in (client.files.retrieve, client.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("../../etc/passwd")  # ids are matched against their pattern, never used as paths


def test_bad_jobs_are_refused(server, ft):
    client = server.openai()
    file_id = _upload(client, ft.jsonl(ft.chat_examples(2))).id
    with pytest.raises(openai.NotFoundError, match="not this server's base model"):
        client.fine_tuning.jobs.create(model="gpt-4o", training_file=file_id)
    with pytest.raises(openai.NotFoundError) as caught:
        client.fine_tuning.jobs.create(model="base", training_file="file-000000000000000000000000")
    assert caught.value.body["param"] == "training_file"
    for name, value in (("n_epochs", 0), ("n_epochs", 51), ("batch_size", 257), ("learning_rate_multiplier", 0.0),
                        ("learning_rate_multiplier", 11.0)):
        with pytest.raises(openai.BadRequestError) as caught:
            client.fine_tuning.jobs.create(model="base", training_file=file_id, hyperparameters={name: value})
        assert caught.value.body["param"] == f"hyperparameters.{name}", caught.value.body
    with pytest.raises(openai.BadRequestError, match="lora.r"):
        client.fine_tuning.jobs.create(model="base", training_file=file_id, extra_body={"lora": {"r": 0}})
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-000000000000000000000000")


def test_targets_that_match_nothing_fail_the_job_with_the_reason(server, ft):
    client = server.openai()
    file_id = _upload(client, ft.jsonl(ft.chat_examples(2))).id
    job = client.fine_tuning.jobs.create(model="base", training_file=file_id,
                                         extra_body={"lora": {"target_modules": ["no_such_proj"]}})
    job = ft.wait_finished(client, job.id)
    assert job.status == "failed" and "match no linear layer" in job.error.message


def test_cancel_a_running_job_then_cancel_again_is_409(server, ft, finished_job):
    client = server.openai()
    file_id = _upload(client, ft.jsonl(ft.chat_examples(6))).id
    job = client.fine_tuning.jobs.create(model="base", training_file=file_id, hyperparameters={"n_epochs": 50})
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    for finished in (job.id, finished_job[1].id):
        with pytest.raises(openai.ConflictError, match="only a job that is"):
            client.fine_tuning.jobs.cancel(finished)
    # the server still serves
    assert client.completions.create(model="base", prompt="a", max_tokens=2).choices[0].text is not None


def test_every_new_endpoint_needs_the_api_key(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for method, path in (("GET", "/v1/files"), ("POST", "/v1/files"), ("GET", "/v1/files/file-x"),
                             ("DELETE", "/v1/files/file-x"), ("GET", "/v1/fine_tuning/jobs"),
                             ("POST", "/v1/fine_tuning/jobs"), ("GET", "/v1/fine_tuning/jobs/x"),
                             ("POST", "/v1/fine_tuning/jobs/x/cancel"), ("GET", "/v1/fine_tuning/jobs/x/events"),
                             ("GET", "/v1/fine_tuning/jobs/x/checkpoints")):
            response = http.request(method, path, headers={"Authorization": "Bearer wrong"})
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key", path
