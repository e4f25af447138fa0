"""Issue 23: expert parallelism across hosts on the namespace harness (tests/multihost/harness.py; root).

For 2 hosts x 2 ranks and 4 hosts x 1 rank (EP = 4), with the P5 model's routing traces
(benchmarks/results/placement: planned on fit.safetensors, replayed from held_out.safetensors):
  - placements: contiguous (moeplug's default) and node-aware (`ilp_plan(ranks_per_node=L)`,
    max/mean <= 1.1 on the fit trace), also with 4 replicas per layer placed by the ILP;
  - dispatch: flat vs hierarchical;
  - measured per step (forward + backward, six layers, benchmarks/multihost_worker.py): bytes sent on
    the hosts' veth links, rows sent across hosts (`count_traffic`) next to the cost model's prediction
    (`cost.node_rows`), max/mean rank load, and the step time with every host's link shaped to --rate;
  - the Accelerate recipe (unchanged) trained on 1 host (torchrun, 4 processes, flat dispatch) and on the
    harness (hierarchical by default): its per-step losses side by side.

    sudo .venv/bin/python benchmarks/multihost.py --out benchmarks/results/multihost.json
    sudo .venv/bin/python benchmarks/multihost.py --smoke       # seconds of work, for CI
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from moeplug.placement import Placement, RoutingTrace, ilp_plan  # noqa: E402
from moeplug.placement.cost import node_rows  # noqa: E402
from tests.multihost.harness import cluster  # noqa: E402

TRACES = ROOT / "benchmarks" / "results" / "placement"
EP = 4


def plans(hosts: int, procs: int, ilp_seconds: float) -> dict[str, Placement]:
    """Contiguous and node-aware (with and without replicas) plans for EP=4 on `hosts` x `procs`."""
    fit = RoutingTrace.load(TRACES / "fit.safetensors")
    made = {"contiguous": Placement.contiguous(fit.num_layers, fit.num_experts, EP, fit.layer_names)}
    for replicas in (0, 4):
        name = "node_aware" + (f"_r{replicas}" if replicas else "")
        made[name] = ilp_plan(fit, EP, "standard", ranks_per_node=procs, replicas=replicas, max_imbalance=1.1,
                              time_limit=ilp_seconds)
    return made


def measure(hosts: int, procs: int, made: dict, args) -> dict:
    """Run the worker on the harness; per config, the measured and predicted figures."""
    held = RoutingTrace.load(TRACES / "held_out.safetensors")
    with tempfile.TemporaryDirectory() as plan_dir:
        for name, plan in made.items():
            plan.save(Path(plan_dir) / f"{name}.json")
        with cluster(hosts, args.rate) as net:
            runs = net.torchrun(procs, ["benchmarks/multihost_worker.py", plan_dir, str(args.tokens),
                                        str(args.hidden), str(args.repeats)], timeout=args.timeout)
        for host, (code, output) in enumerate(runs):
            if code:
                raise RuntimeError(f"host {host} of {hosts}x{procs} exited {code}:\n{output[-4000:]}")
        ranks = [json.loads((Path(plan_dir) / f"rank{r}.json").read_text()) for r in range(hosts * procs)]
    scale = args.tokens * EP / held.tokens  # replayed tokens per layer over the trace's
    rows = {}
    for config in ranks[0]:
        name, mode = config.split("/")
        work = torch.tensor([r[config]["work"] for r in ranks], dtype=torch.float64).sum(0)  # [L, P]
        predicted = node_rows(held, made[name].rank_share(), procs, mode == "hierarchical")
        rows[config] = {
            "link_bytes_per_step": sum(r[config]["link_tx_bytes"] for r in ranks),
            "inter_host_rows": sum(r[config]["inter_rows"] for r in ranks),
            "predicted_inter_host_rows": predicted["inter"] * scale,
            "max_mean_load": float((work.max(1).values / work.mean(1)).max()),
            "step_s": max(r[config]["step_s"] for r in ranks)}
    baseline = rows["contiguous/flat"]["link_bytes_per_step"]
    for row in rows.values():
        row["bytes_vs_flat_contiguous"] = row["link_bytes_per_step"] / baseline
    return rows


def recipe_losses(hosts: int, procs: int, steps: int, timeout: float) -> list[float]:
    """Per-step losses of recipes/accelerate/train_moe.py with EP=4 (hosts == 1: plain torchrun, loopback)."""
    argv = ["recipes/accelerate/train_moe.py", "--ep-size", str(EP), "--steps", str(steps), "--micro-batches", "2",
            "--batch", "2", "--length", "64"]
    with tempfile.TemporaryDirectory() as out:
        argv += ["--output", out]
        if hosts == 1:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(EP), *argv]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            if done.returncode:
                raise RuntimeError(f"1-host recipe run exited {done.returncode}:\n{done.stderr[-4000:]}")
        else:
            with cluster(hosts) as net:
                for host, (code, output) in enumerate(net.torchrun(procs, argv, timeout)):
                    if code:
                        raise RuntimeError(f"recipe on host {host} of {hosts}x{procs} exited {code}:\n{output[-4000:]}")
        return json.loads((Path(out) / "summary.json").read_text())["step_losses"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layouts", default="2x2,4x1", help="hosts x ranks per host, EP = 4 each")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per rank per layer")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rate", default="1gbit", help="tc tbf rate of every host's link")
    parser.add_argument("--ilp-seconds", type=float, default=20.0)
    parser.add_argument("--loss-steps", type=int, default=4, help="recipe steps for the loss comparison (0: skip)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default="benchmarks/out/multihost.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tokens, args.hidden, args.repeats, args.ilp_seconds, args.loss_steps = 64, 16, 1, 2.0, 0
    layouts = [tuple(int(n) for n in layout.split("x")) for layout in args.layouts.split(",")]
    result = {"command": " ".join(["benchmarks/multihost.py", *(argv or sys.argv[1:])]), "args": vars(args),
              "load_avg_before": os.getloadavg(), "layouts": {}}
    for hosts, procs in layouts:
        made = plans(hosts, procs, args.ilp_seconds)
        entry = {"measured": measure(hosts, procs, made, args), "plans": {k: p.info for k, p in made.items()}}
        if args.loss_steps:
            entry["losses"] = {"1 host": recipe_losses(1, EP, args.loss_steps, args.timeout),
                               f"{hosts}x{procs}": recipe_losses(hosts, procs, args.loss_steps, args.timeout)}
        result["layouts"][f"{hosts}x{procs}"] = entry
        print_table(f"{hosts}x{procs}", entry)
    result["load_avg_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(f"load average {result['load_avg_before']} -> {result['load_avg_after']}; wrote {args.out}")


def print_table(layout: str, entry: dict) -> None:
    """The RESULTS.md table of one layout."""
    print(f"\n{layout}: config | link bytes/step | vs flat+contiguous | inter-host rows (predicted) | max/mean | step s")
    for config, row in entry["measured"].items():
        print(f"| {config} | {row['link_bytes_per_step'] / 1e6:.2f} MB | {row['bytes_vs_flat_contiguous']:.2f} | "
              f"{row['inter_host_rows']} ({row['predicted_inter_host_rows']:.0f}) | {row['max_mean_load']:.3f} | "
              f"{row['step_s']:.3f} |")
    for name, losses in entry.get("losses", {}).items():
        print(f"losses {name}: {[round(v, 5) for v in losses]}")


if __name__ == "__main__":
    main()
