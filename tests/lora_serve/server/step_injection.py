"""Code that server tests run inside lora-serve's processes: a sitecustomize on an inherited PYTHONPATH.

A sitecustomize module runs at the start of the server process and of the engine process it spawns (the
environment, PYTHONPATH included, is inherited), so it can patch the engine's step in both.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

# Makes every engine step fail, as a bug in a step would.
FAILING_STEP = """
import lora_serve.engine
def step(self):
    raise RuntimeError("injected step failure")
lora_serve.engine.Engine.step = step
"""
# Makes every step take at least 20 ms, so that a request is surely still running when a test acts on it.
SLOW_STEP = """
import time
import lora_serve.engine
_step = lora_serve.engine.Engine.step
def step(self):
    time.sleep(0.02)
    return _step(self)
lora_serve.engine.Engine.step = step
"""


def inject(directory: Path, code: str) -> str:
    """A PYTHONPATH whose sitecustomize (written under ``directory``) runs ``code`` in every process that inherits it."""
    (directory / "inject").mkdir()
    (directory / "inject" / "sitecustomize.py").write_text(code)
    return f"{directory / 'inject'}{os.pathsep}{REPO}"
