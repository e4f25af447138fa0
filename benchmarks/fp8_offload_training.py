"""Issue 25, figure: ZeRO-Offload training of a small MoE with DeepSpeedCPUAdam vs moeplug's FP8AdamW.

Each optimizer trains the same Mixtral-style MoE (moeplug.tiny config scaled up, seeded) from the same weights
on the same batches (token sequences that count up by one) under DeepSpeed ZeRO-2 with
``offload_optimizer: {device: cpu}`` (world size 1, gloo), in its own process so that its peak resident
host memory (``ru_maxrss``) is its own. FP8AdamW is set up through ``moeplug.integrations.deepspeed``.
Writes the losses, peak RSS, optimizer-state bytes and median step time per optimizer to JSON and both loss
curves to one PNG.

Run: ``.venv/bin/python benchmarks/fp8_offload_training.py [--steps 60] [--png PATH] [--json PATH]``.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

OPTIMIZERS = ("DeepSpeedCPUAdam", "FP8AdamW", "torch AdamW")  # torch AdamW: fp32 oracle of both
MODEL = dict(hidden_size=256, intermediate_size=512, num_local_experts=8, num_experts_per_tok=2,
             num_hidden_layers=4, vocab_size=1024, head_dim=64, max_position_embeddings=256)
BATCH, LENGTH, LR = 8, 64, 5e-4


def train(optimizer_name: str, steps: int) -> dict:
    """One ZeRO-Offload run in this process (rank 0 of 1); returns its measurements."""
    import deepspeed
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from moeplug.fp8 import FP8AdamW
    from moeplug.integrations import deepspeed as mds
    from moeplug.tiny import tiny_model

    deepspeed.init_distributed(dist_backend="gloo")
    model = tiny_model("mixtral", **MODEL).train()
    mds.patch_model(model)
    groups = mds.param_groups(model)
    optimizer = {"FP8AdamW": lambda: FP8AdamW(groups, lr=LR),
                 "torch AdamW": lambda: torch.optim.AdamW(groups, lr=LR),
                 "DeepSpeedCPUAdam": lambda: DeepSpeedCPUAdam(groups, lr=LR, weight_decay=1e-2, adamw_mode=True)}
    optimizer = optimizer[optimizer_name]()
    config = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
              "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
              # for torch AdamW (moeplug's initialize sets this for FP8AdamW itself)
              "zero_force_ds_cpu_optimizer": False}
    engine, *_ = mds.initialize(model=model, optimizer=optimizer, config=config)
    gen = torch.Generator().manual_seed(0)
    losses, step_s = [], []
    for _ in range(steps):
        ids = (torch.randint(0, 1024, (BATCH, 1), generator=gen) + torch.arange(LENGTH)) % 1024
        loss = engine(ids, labels=ids).loss
        engine.backward(loss)
        start = time.perf_counter()
        engine.step()
        step_s.append(time.perf_counter() - start)
        losses.append(loss.item())
    inner = engine.optimizer.optimizer
    state_bytes = sum(v.numel() * v.element_size() for s in inner.state.values() for k, v in s.items()
                      if torch.is_tensor(v) and k != "step")
    return {"losses": losses, "params": sum(p.numel() for p in model.parameters()),
            "optimizer_state_bytes": state_bytes, "median_engine_step_ms": statistics.median(step_s) * 1e3,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(optimizer_name: str, steps: int, port: int) -> dict:
    """`train` in a fresh process (its own peak RSS); the JSON it prints last."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1"}
    out = subprocess.run([sys.executable, __file__, "--child", optimizer_name, "--steps", str(steps)], env=env,
                         capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1]).stdout
    return json.loads(out.strip().splitlines()[-1])


def plot(results: dict, path: Path) -> None:
    """Both loss curves in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, r in results.items():
        ax.plot(r["losses"], label=f"{name} ({r['optimizer_state_bytes'] / r['params']:.2f} B/param state, "
                                   f"peak RSS {r['peak_rss_mib']:.0f} MiB)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"ZeRO-2 + offload_optimizer=cpu, MoE {next(iter(results.values()))['params'] / 1e6:.1f}M params")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    """Run both optimizers in child processes, write JSON and the PNG."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--child", choices=OPTIMIZERS, help=argparse.SUPPRESS)
    results_dir = Path(__file__).parent / "results"
    parser.add_argument("--json", type=Path, default=results_dir / "fp8_offload_training.json")
    parser.add_argument("--png", type=Path, default=results_dir / "fp8_offload_training.png")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(train(args.child, args.steps)))
        return
    from lora_serve.testing import free_port

    load_before = os.getloadavg()
    results = {name: run_child(name, args.steps, free_port()) for name in OPTIMIZERS}
    summary = {"command": "python " + " ".join(sys.argv), "model": MODEL, "batch": [BATCH, LENGTH], "lr": LR,
               "loadavg": {"before": load_before, "after": os.getloadavg()}, "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2))
    plot(results, args.png)
    for name, r in results.items():
        print(f"{name}: final loss (mean of last 10) {statistics.mean(r['losses'][-10:]):.4f}, state "
              f"{r['optimizer_state_bytes'] / 2**20:.1f} MiB ({r['optimizer_state_bytes'] / r['params']:.2f} B/param), "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB, engine.step {r['median_engine_step_ms']:.1f} ms")


if __name__ == "__main__":
    main()
