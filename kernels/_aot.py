"""Ahead-of-time GPU compilation check: build Triton kernels for A100/H100 on a machine without a GPU.

Convention: a kernel module declares a module-level ``AOT_CASES`` list of dicts with keys
``name, fn, signature, constexprs, num_warps, num_stages`` and optionally ``expect_wgmma_sm90`` (bool).
``signature`` maps each runtime argument to a Triton type (``"*bf16"``, ``"i32"``, ...); ``constexprs`` gives
the compile-time arguments, including runtime ints pinned to a value the launcher always sees (a stride of
1 is what Triton's JIT specialises on too). Every pointer and integer argument is marked divisible by 16,
as the JIT marks them for fresh torch allocations and model-sized dimensions (multiples of 16): without it
loads cannot be vectorised or pipelined (``cp.async``), and the report would describe a build that
real launches never get.

:func:`check_case` compiles one case for one architecture with ``triton.compile`` and reports registers,
spills (``ptxas -v`` run with Triton's own flags), shared memory and whether the code uses ``wgmma``.
Run ``python -m kernels._aot`` (without ``TRITON_INTERPRET``) to print every case of every module.
"""

import importlib
import json
import pkgutil
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

ARCHS = (80, 90)  # A100 (sm_80) and H100 (Triton compiles capability 90 as sm_90a)
SHARED_LIMIT_BYTES = {80: 164 * 1024, 90: 227 * 1024}  # max dynamic shared memory per block
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _ptxas(arch: int) -> Path:
    # Triton's own choice: the legacy ptxas rejects the PTX version Triton emits for sm_90+.
    return _BIN / ("ptxas" if arch < 90 else "ptxas-blackwell")


def missing_toolchain() -> str | None:
    """Why AOT checks cannot run here (no bundled ptxas/cuobjdump), or ``None`` when they can."""
    for tool in (_ptxas(80), _ptxas(90), _BIN / "cuobjdump"):
        if not tool.is_file():
            return f"{tool} not found (the triton wheel ships it for Linux x86-64 only)"
        try:
            subprocess.run([str(tool), "--version"], check=True, capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as err:
            return f"{tool} does not run here: {err}"
    return None


def _ptxas_report(ptx: str, arch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
        # The flags Triton passes (triton/backends/nvidia/compiler.py), so the numbers are the real build's.
        cmd = [str(_ptxas(arch)), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", str(src)]
        cmd += ["-o", str(src) + ".o"]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(
        registers=int(registers.group(1)) if registers else 0,
        spill_store_bytes=int(spills.group(1)) if spills else 0,
        spill_load_bytes=int(spills.group(2)) if spills else 0,
    )


def check_case(case: dict, arch: int) -> dict:
    """Compile ``case`` (an ``AOT_CASES`` entry) for ``sm_<arch>`` and report its resource use.

    Returns a dict with ``name, arch, num_warps, num_stages, registers, spill_store_bytes, spill_load_bytes,
    shared_bytes, shared_limit_bytes, wgmma``. Raises ``TypeError`` for a kernel defined under
    ``TRITON_INTERPRET=1`` (an interpreted function cannot be compiled).
    """
    fn = case["fn"]
    if not isinstance(fn, JITFunction):
        raise TypeError(f"{case['name']}: {fn!r} is not a compiled @triton.jit function; unset TRITON_INTERPRET")
    signature = {**case["signature"], **{name: "constexpr" for name in case["constexprs"]}}
    aligned = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items() if t != "constexpr"}
    compiled = triton.compile(
        ASTSource(fn, signature, case["constexprs"], aligned),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=case["num_warps"], num_stages=case["num_stages"]),
    )
    ptx = compiled.asm["ptx"]
    return dict(
        name=case["name"],
        arch="sm_90a" if arch == 90 else f"sm_{arch}",
        num_warps=case["num_warps"],
        num_stages=case["num_stages"],
        **_ptxas_report(ptx, arch),
        shared_bytes=compiled.metadata.shared,
        shared_limit_bytes=SHARED_LIMIT_BYTES[arch],
        wgmma=bool(re.search(r"\bwgmma\.", ptx)),
    )


def aot_case(name: str, fn, signature: dict, constexprs: dict, config: dict, expect_wgmma_sm90: bool = False) -> dict:
    """An ``AOT_CASES`` entry from a launch ``config`` of the kind the kernel modules declare.

    ``config`` holds the kernel's block-size constexprs plus ``num_warps`` and ``num_stages``.
    """
    blocks = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    return dict(
        name=name,
        fn=fn,
        signature=signature,
        constexprs={**constexprs, **blocks},
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
        expect_wgmma_sm90=expect_wgmma_sm90,
    )


def discover_cases() -> list[dict]:
    """Every ``AOT_CASES`` entry of every module in the ``kernels`` package, with ``module`` added."""
    package = importlib.import_module("kernels")
    cases = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"kernels.{info.name}")
        cases += [{**case, "module": info.name} for case in getattr(module, "AOT_CASES", [])]
    return cases


def main(argv: list[str]) -> int:
    """``python -m kernels._aot [--json]``: check every discovered case on every architecture."""
    reason = missing_toolchain()
    if reason:
        print(json.dumps({"skipped": reason}) if "--json" in argv else f"skipped: {reason}")
        return 0
    reports = []
    for case in discover_cases():
        for arch in ARCHS:
            report = check_case(case, arch)
            expect_wgmma = case.get("expect_wgmma_sm90", False)
            reports.append({"module": case["module"], "expect_wgmma_sm90": expect_wgmma, **report})
    if "--json" in argv:
        print(json.dumps({"reports": reports}))
    else:
        for r in reports:
            print(
                f"{r['module']:22s} {r['name']:28s} {r['arch']:7s} warps={r['num_warps']} stages={r['num_stages']} "
                f"regs={r['registers']:3d} spills={r['spill_store_bytes']}/{r['spill_load_bytes']}B "
                f"smem={r['shared_bytes'] // 1024}KiB/{r['shared_limit_bytes'] // 1024}KiB wgmma={r['wgmma']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
