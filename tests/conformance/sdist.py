"""Fetch transformers' common test mixins from its source distribution, at run time, into a cache.

transformers' sdist on the package index carries `tests/test_modeling_common.py` (ModelTesterMixin),
`tests/test_configuration_common.py` (ConfigTester) and other `*_common.py` / `*_mixin.py` files, but not
the per-model test files, nor three helper modules the mixins import:

- `tests/generation/test_utils.py` (GenerationTesterMixin),
- `tests/exporters/test_export.py` (ExportTesterMixin, the base class of ModelTesterMixin),
- `tests/utils/test_configuration_utils.py` (`config_common_kwargs`, used by ConfigTester).

We unpack the sdist's `tests/*.py` as a package named `hf_common_tests` (so it cannot clash with our own
`tests/`) and write small stand-ins of our own for those three modules (see `_STUBS`): the generation and
export tests are therefore not run from transformers; `families.py` adds our own checks for static-cache
generation, export and fullgraph compile instead. Nothing from transformers is copied into this repository.

The mixins also need `parameterized` (not a dependency of ours); it is installed with pip into the cache.
Once cached, everything works offline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("MOEPLUG_CONFORMANCE_CACHE", REPO / ".cache" / "transformers-tests"))
PACKAGE = "hf_common_tests"
PARAMETERIZED = "parameterized==0.9.0"

_STUBS = {
    "generation/__init__.py": "",
    "generation/test_utils.py": (
        '"""moeplug stand-in: tests/generation/ is not part of transformers\' sdist."""\n\n\n'
        "class GenerationTesterMixin:\n    pass\n"
    ),
    "exporters/__init__.py": "",
    "exporters/test_export.py": (
        '"""moeplug stand-in: tests/exporters/ is not part of transformers\' sdist."""\n\n\n'
        "class ExportTesterMixin:\n    pass\n"
    ),
    "utils/__init__.py": "",
    "utils/test_configuration_utils.py": (
        '"""moeplug stand-in: tests/utils/ is not part of transformers\' sdist.\n\n'
        "Common PretrainedConfig keyword arguments with non-default values, for ConfigTester.check_config_arguments_init.\n"
        '"""\n\n'
        "config_common_kwargs = {\n"
        '    "return_dict": False,\n    "output_hidden_states": True,\n    "output_attentions": True,\n'
        '    "dtype": "float16",\n    "tie_word_embeddings": False,\n    "chunk_size_feed_forward": 5,\n'
        '    "architectures": ["BertModel"],\n    "id2label": {0: "label"},\n    "label2id": {"label": "0"},\n'
        '    "problem_type": "regression",\n'
        "}\n"
    ),
}


class SdistUnavailable(RuntimeError):
    """The transformers sdist (or `parameterized`) is neither cached nor downloadable."""


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def _run_pip(args: list[str], what: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as exc:
        raise SdistUnavailable(f"{what}: `{' '.join(cmd)}` timed out") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
        raise SdistUnavailable(
            f"{what}: `{' '.join(cmd)}` failed (rc {done.returncode}). The conformance lane fetches transformers' "
            f"test mixins from its sdist on the package index the first time it runs and needs the network once; "
            f"afterwards it runs offline from {CACHE}. pip said:\n{tail}"
        )


def ensure() -> list[Path]:
    """Make sure the mixins and `parameterized` are cached; return the paths to put on sys.path."""
    version = transformers_version()
    root = CACHE / version
    pkg_parent, deps = root / "pkg", root / "deps"
    package = pkg_parent / PACKAGE
    if not (package / "test_modeling_common.py").exists():
        archive = root / f"transformers-{version}.tar.gz"
        if not archive.exists():
            root.mkdir(parents=True, exist_ok=True)
            _run_pip(["download", "--no-binary", ":all:", "--no-deps", f"transformers=={version}", "-d", str(root)],
                     f"downloading the transformers=={version} sdist")
        if not archive.exists():
            raise SdistUnavailable(f"pip did not leave {archive.name} in {root}")
        _unpack(archive, package, version)
    if not (deps / "parameterized").exists():
        try:
            import parameterized  # noqa: F401  (already installed: nothing to do)
        except ImportError:
            _run_pip(["install", "-q", "--no-deps", "--target", str(deps), PARAMETERIZED],
                     f"installing {PARAMETERIZED} into the cache")
    return [pkg_parent, deps]


def _unpack(archive: Path, package: Path, version: str) -> None:
    tmp = package.with_name(package.name + ".tmp")
    prefix = f"transformers-{version}/tests/"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers()
                   if m.isfile() and m.name.startswith(prefix) and m.name.endswith(".py")]
        if not any(m.name.endswith("/test_modeling_common.py") for m in members):
            raise SdistUnavailable(f"{archive.name} has no tests/test_modeling_common.py; contents changed upstream")
        tmp.mkdir(parents=True, exist_ok=True)
        for member in members:
            target = tmp / member.name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    (tmp / "__init__.py").touch()
    for rel, text in _STUBS.items():
        target = tmp / rel
        if not target.exists():  # a future sdist that ships the real module wins
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
    tmp.rename(package)


def activate() -> None:
    """`ensure()` and put the cached paths on sys.path (idempotent)."""
    for path in ensure():
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))


if __name__ == "__main__":
    try:
        print("\n".join(str(p) for p in ensure()))
    except SdistUnavailable as exc:
        sys.exit(f"conformance: {exc}")
