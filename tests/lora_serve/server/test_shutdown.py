"""Shutdown lets in-flight requests finish for its grace period, then aborts them in the engine.

(Finishing within the grace period is checked end to end with SIGTERM in ``test_cli.py``.)
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from lora_serve import Engine, EngineConfig, FinishReason


def test_shutdown_aborts_requests_still_running_after_the_grace_period(lora, serve):
    engine = Engine(lora.tiny_model("llama"), serve.char_tokenizer(), EngineConfig(pool_slots=4000))
    step = engine.step

    def slow_step():  # 200 tokens now take > 4 s, far past the 0.3 s grace period
        time.sleep(0.02)
        return step()

    engine.step = slow_step
    server = serve.start_server(engine, serve.ServerConfig(model_name="m"), shutdown_timeout=0.3)
    stream = server.openai().completions.create(model="m", prompt="Hi", stream=True, max_tokens=200,
                                                temperature=0, extra_body={"ignore_eos": True})
    next(stream)
    server.stop()
    with pytest.raises((openai.APIError, httpx.HTTPError)):  # the connection closes mid-stream
        list(stream)
    # The cancelled handler aborted its request; the stopped step loop left the abort for the next step.
    assert [output.finish_reason for output in engine.step()] == [FinishReason.ABORT]
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.pool.kv) == (0, 0, 0)
