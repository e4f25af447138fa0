"""Schemathesis (the ``st`` CLI, as a user runs it) fuzzes every operation of a live server from its own
``/openapi.json`` with every check: no 5xx, no response outside the documented statuses, media types and
schemas, no schema-valid request refused (but for the context limit, see ``schemathesis_hooks.py``), no
schema-invalid request accepted, auth enforced, 405s with a correct ``Allow``. Afterwards the pool holds
no KV pages and a completion still equals PEFT's.

Offline and bounded: a fixed seed, a bounded number of examples per operation, no stateful phase (the API
has no links between operations), a tiny model with a 64-token context.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_serve import Engine, EngineConfig

pytestmark = pytest.mark.slow  # a fuzz run against a server subprocess (~1 min): not in `make test-fast`

ADAPTERS = ("fuzz-a", "team/fuzz-b")
CONFIG = """
seed = 16
workers = 1
request-timeout = 60
max-failures = 20
[generation]
max-examples = {examples}
database = "none"
[phases.stateful]
enabled = false
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "400", "401", "403", "404", "409"]
"""


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, lora, serve):
    root = tmp_path_factory.mktemp("fuzz-root")
    base = lora.tiny_model("llama", max_position_embeddings=64)
    for seed, name in enumerate(ADAPTERS):
        lora.save_adapter(base, root / name, 4 + 4 * seed, ["q_proj", "v_proj"], seed=seed)
    tokenizer = serve.char_tokenizer()
    engine = Engine(copy.deepcopy(base), tokenizer, EngineConfig(pool_slots=30_000, max_batch_tokens=256))
    for name in ADAPTERS:
        engine.add_adapter(name, root / name)
    server = serve.start_server(engine, serve.ServerConfig(model_name="base", adapter_root=root,
                                                           api_key=serve.API_KEY, unload_timeout=0))
    yield base, root, tokenizer, server
    server.stop()


def test_schemathesis_finds_no_server_error_and_no_contract_violation(fuzzed, serve, tmp_path):
    server = fuzzed[-1]
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG.format(examples=int(os.environ.get("LORA_SERVE_FUZZ_EXAMPLES", 30))))
    here = Path(__file__).parent
    env = {
        **os.environ, "PYTHONPATH": str(here), "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
        "LORA_SERVE_FUZZ_MODELS": ",".join(("base", *ADAPTERS)), "NO_COLOR": "1",
    }
    st = Path(sys.executable).with_name("st")
    command = [str(st), "--config-file", str(config), "run", f"{server.url}/openapi.json", "--checks", "all",
               "-H", f"Authorization: Bearer {serve.API_KEY}"]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert "No issues found" in report or "passed" in report, report


def test_after_the_fuzz_run_the_pool_is_empty_and_completions_equal_peft(fuzzed, lora):
    base, root, tokenizer, server = fuzzed
    server.wait_until_idle()
    assert server.engine.stats().pool.kv == 0
    client = server.openai()
    prompt_ids = tokenizer("Fuzzed")["input_ids"]
    for name in ADAPTERS:  # the fuzzer may have unloaded one (a schema-valid request): serve it again
        if name not in {m.id for m in client.models.list()}:
            server.engine.add_adapter(name, root / name)
        expected = tokenizer.decode(lora.peft_generate(base, root / name, prompt_ids, 10), skip_special_tokens=True)
        answer = client.completions.create(model=name, prompt="Fuzzed", max_tokens=10, temperature=0)
        assert answer.choices[0].text == expected, name
