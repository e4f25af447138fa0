"""Run the conformance lane: transformers' model tests on each family, unpatched (eager experts) and patched.

    python -m tests.conformance                       # all six families, both modes (make conformance)
    python -m tests.conformance --families mixtral    # one family
    python -m tests.conformance -k "sdpa or save"     # a subset of the tests (pytest -k)

Each (family, mode) runs in its own pytest process (`families.py` under `plugin.py`), one after the other,
single-threaded. Writes benchmarks/results/conformance.json (every test's outcome in both modes) and
benchmarks/results/conformance.md (the table and the regressions: tests that pass unpatched and fail patched).
Exit status 1 if there is any regression, 2 if a pytest process could not run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moeplug.hf import SUPPORTED_FAMILIES
from tests.conformance import allowlist, sdist
from tests.conformance.report import MODES, compare, counts, dumps, markdown, slim

REPO = Path(__file__).resolve().parents[2]
FAMILIES = SUPPORTED_FAMILIES
# the tester class of each family in families.py
TESTER = {"mixtral": "MixtralConformance", "qwen2_moe": "Qwen2MoeConformance", "qwen3_moe": "Qwen3MoeConformance",
          "olmoe": "OlmoeConformance", "deepseek_v3": "DeepseekV3Conformance", "gpt_oss": "GptOssConformance"}
assert set(TESTER) == set(FAMILIES), "one tester class per supported family"


def run_one(family: str, mode: str, out: Path, keyword: str | None, timeout: int) -> dict:
    env = {**os.environ, "MOEPLUG_CONFORMANCE_MODE": mode, "MOEPLUG_CONFORMANCE_OUT": str(out),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "MKL_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "pytest", f"tests/conformance/families.py::{TESTER[family]}",
           "-p", "tests.conformance.plugin", "-p", "no:logging", "-p", "no:cacheprovider", "-q", "--tb=short",
           f"--timeout={timeout}", "-W", "ignore::pytest.PytestUnknownMarkWarning"]
    if keyword:
        cmd += ["-k", keyword]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = round(time.perf_counter() - start, 1)
    if not out.exists():
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        return {"error": f"pytest exited with {done.returncode} and wrote no results:\n{tail}", "seconds": seconds}
    result = json.loads(out.read_text())
    return {"tests": result["tests"], "seconds": seconds}


def library_state() -> str:
    """The commit that ran, and the library files (moeplug/, kernels/) that differed from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "moeplug", "kernels"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    changed = [line[3:] for line in dirty if line.strip()]
    return commit + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.conformance", description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated (default: all six)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: eager,patched")
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression (a subset of the tests)")
    parser.add_argument("--timeout", type=int, default=300, help="per-test timeout, seconds")
    parser.add_argument("--baseline", default=None,
                        help="reuse the unpatched results of an earlier conformance.json (runs only the patched mode)")
    parser.add_argument("--note", default="", help="a line for the report (e.g. which library state ran)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "conformance.json"))
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    modes = [m for m in args.modes.split(",") if m]
    bad = [f for f in families if f not in FAMILIES] + [m for m in modes if m not in MODES]
    if bad:
        parser.error(f"unknown family/mode {bad}; families: {list(FAMILIES)}, modes: {list(MODES)}")
    baseline = {}
    if args.baseline:
        baseline = json.loads(Path(args.baseline).read_text())
        modes = [m for m in modes if m != "eager"]
    try:
        sdist.ensure()  # fetch once, before the per-family processes (which then run offline)
    except sdist.SdistUnavailable as exc:
        print(f"conformance: {exc}", file=sys.stderr)
        return 2

    import torch
    import transformers

    start = time.perf_counter()
    report = {"command": " ".join(["python -m tests.conformance", *(argv if argv is not None else sys.argv[1:])]),
              "transformers": transformers.__version__, "torch": torch.__version__,
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS="
                         f"{os.environ.get('OMP_NUM_THREADS', '1')}",
              "library": library_state(), "note": args.note,
              "not_applicable_allowlist": allowlist.NOT_APPLICABLE, "families": {}}
    if baseline:
        if baseline["transformers"] != transformers.__version__:
            print(f"conformance: the baseline ran transformers {baseline['transformers']}, this is "
                  f"{transformers.__version__}", file=sys.stderr)
            return 2
        report["baseline"] = {"path": args.baseline, "date": baseline["date"], "command": baseline["command"]}
    failed_run = False
    with tempfile.TemporaryDirectory(prefix="moeplug-conformance-") as tmp:
        for family in families:
            fam = {}
            if baseline and "eager" in baseline["families"].get(family, {}):
                fam["eager"] = baseline["families"][family]["eager"]
            for mode in modes:
                print(f"conformance: {family} {mode} ...", end=" ", flush=True)
                result = run_one(family, mode, Path(tmp) / f"{family}-{mode}.json", args.keyword, args.timeout)
                if "error" in result:
                    print(f"error after {result['seconds']} s")
                    fam = {"error": f"{mode}: {result['error']}"}
                    failed_run = True
                    break
                fam[mode] = {"counts": counts(result["tests"]), "seconds": result["seconds"],
                             "tests": slim(result["tests"], mode)}
                print(f"{fam[mode]['counts']} in {result['seconds']} s", flush=True)
            if "eager" in fam and "patched" in fam:
                fam.update(compare(fam["eager"]["tests"], fam["patched"]["tests"]))
                for r in fam["regressions"]:
                    print(f"  REGRESSION {r['test']}: {r.get('error')} [{r.get('ours') or r.get('where')}]")
            report["families"][family] = fam
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps(report))
    out.with_suffix(".md").write_text(markdown(report))
    n = sum(len(fam.get("regressions", [])) for fam in report["families"].values())
    print(f"conformance: {n} regression(s); wrote {out} and {out.with_suffix('.md')} "
          f"({report['wall_seconds']:.0f} s)")
    return 2 if failed_run else (1 if n else 0)


if __name__ == "__main__":
    sys.exit(main())
