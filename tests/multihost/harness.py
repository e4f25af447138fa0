"""Several "hosts" on one Linux machine: network namespaces joined by veth links, torchrun in each.

    with cluster(hosts=2, rate="1gbit") as hosts:          # root only; removed again even on failure
        results = hosts.torchrun(2, ["recipes/accelerate/train_moe.py", "--ep-size", "4"], timeout=300)

Each host is a network namespace holding one end of a veth pair; the other ends sit on a bridge in a
"switch" namespace, so every byte between two hosts crosses two veth links and the host-side link's
counters (`link_bytes`) measure inter-host traffic, while ranks of one host talk over its loopback.
`rate` puts a tc token-bucket filter (tbf) on every host's outgoing link. Each host runs
`torchrun --nnodes N --node-rank i --rdzv-backend c10d --rdzv-endpoint <host0>:<port> --local-addr <host i>`
with gloo bound to the host's link (GLOO_SOCKET_IFNAME), exactly as on a real cluster.

Names carry this process's id and a random tag, so concurrent runs never collide; addresses are
10.23.0.x on the run's own links only. Workers see MULTIHOST_IFNAME (their host's link) and
MULTIHOST_HOSTS. CLI: `python -m tests.multihost.harness --hosts 2 --procs 2 [--rate 1gbit] -- script args`.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUBNET = "10.23.0"


def unavailable_reason() -> str | None:
    """Why the harness cannot run here (None when it can): it needs root and iproute2's `ip` and `tc`."""
    if os.geteuid() != 0:
        return "the multi-host harness needs root (network namespaces, veth links)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    return f"the multi-host harness needs {', '.join(missing)} (iproute2)" if missing else None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def link_bytes(ifname: str | None = None) -> dict[str, int]:
    """{"tx": .., "rx": ..} bytes of this host's link, read from inside the host's namespace."""
    ifname = ifname or os.environ["MULTIHOST_IFNAME"]
    base = Path("/sys/class/net") / ifname / "statistics"
    return {key: int((base / f"{key}_bytes").read_text()) for key in ("tx", "rx")}


@dataclass
class Cluster:
    """The namespaces and links of one harness run (see the module docstring)."""

    tag: str
    hosts: int
    addresses: list[str] = field(default_factory=list)

    def namespace(self, host: int) -> str:
        return f"{self.tag}h{host}"

    def ifname(self, host: int) -> str:
        return f"{self.tag}h{host}"  # the host-side veth is named like its namespace

    def counters(self) -> list[dict[str, int]]:
        """Per host, tx/rx bytes of its link (read from this side through `ip -n`)."""
        found = []
        for host in range(self.hosts):
            out = subprocess.run(["ip", "-n", self.namespace(host), "-s", "-j", "link", "show", self.ifname(host)],
                                 check=True, capture_output=True, text=True, timeout=30).stdout
            stats = json.loads(out)[0]["stats64"]
            found.append({"tx": stats["tx"]["bytes"], "rx": stats["rx"]["bytes"]})
        return found

    def spawn(self, host: int, procs: int, argv: list[str], port: int, env: dict | None = None) -> subprocess.Popen:
        """Start torchrun for `host` (its own session, so a kill reaches its workers)."""
        command = ["ip", "netns", "exec", self.namespace(host), sys.executable, "-m", "torch.distributed.run",
                   "--nnodes", str(self.hosts), "--nproc-per-node", str(procs), "--node-rank", str(host),
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{self.addresses[0]}:{port}",
                   "--rdzv-id", self.tag, "--local-addr", self.addresses[host], "--max-restarts", "0",
                   # Host 0 serves the rendezvous store: said outright, since torch's guess compares the
                   # endpoint with the machine's hostname, which the namespaces share with the real host.
                   "--rdzv-conf", f"is_host={int(host == 0)}", *argv]
        environ = {**os.environ, "GLOO_SOCKET_IFNAME": self.ifname(host), "MULTIHOST_IFNAME": self.ifname(host),
                   "MULTIHOST_HOSTS": str(self.hosts), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                   **(env or {})}
        return subprocess.Popen(command, cwd=ROOT, env=environ, start_new_session=True, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def torchrun(self, procs: int, argv: list[str], timeout: float, env: dict | None = None,
                 port: int = 29400) -> list[tuple[int, str]]:
        """Run `argv` (a script and its arguments) with torchrun on every host; (exit code, output) per host.

        A host still running after `timeout` seconds is killed (its whole session) and reports -9.
        """
        started = [self.spawn(host, procs, argv, port, env) for host in range(self.hosts)]
        results = []
        for process in started:
            try:
                output, _ = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill(process)
                output, _ = process.communicate()
            results.append((process.returncode, output))
            timeout = max(timeout * 0.1, 5.0)  # the others had the same wall clock: little extra grace
        return results


def kill(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the session of a process started by `Cluster.spawn` (torchrun and its workers)."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def _build(net: Cluster, rate: str | None) -> None:
    switch = f"{net.tag}sw"
    _ip("netns", "add", switch)
    _ip("-n", switch, "link", "add", "br0", "type", "bridge")
    _ip("-n", switch, "link", "set", "br0", "up")
    for host in range(net.hosts):
        ns, dev, peer = net.namespace(host), net.ifname(host), f"{net.tag}s{host}"
        _ip("netns", "add", ns)
        _ip("link", "add", dev, "type", "veth", "peer", "name", peer)
        _ip("link", "set", dev, "netns", ns)
        _ip("link", "set", peer, "netns", switch)
        _ip("-n", switch, "link", "set", peer, "master", "br0", "up")
        address = f"{SUBNET}.{host + 1}"
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", dev)
        _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        if rate:  # shape what leaves each host; burst ~ 1 ms at the rate, at least a few jumbo frames
            subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                            "burst", "256kb", "latency", "100ms"], check=True, capture_output=True, timeout=30)
        net.addresses.append(address)


def _teardown(net: Cluster) -> None:
    """Remove the run's namespaces (their veth ends go with them); ignore what was never made."""
    for name in [f"{net.tag}h{host}" for host in range(net.hosts)] + [f"{net.tag}sw"]:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


@contextmanager
def cluster(hosts: int, rate: str | None = None):
    """Namespaces and links for `hosts` hosts (2-8), removed on exit even after an error."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    if not isinstance(hosts, int) or not 2 <= hosts <= 8:
        raise ValueError(f"hosts={hosts!r}; expected an integer from 2 to 8")
    # <= 15 characters per link name: "mh" + 6 hex + "h"/"s" + host digit.
    net = Cluster(f"mh{secrets.token_hex(3)}", hosts)
    try:
        _build(net, rate)
        yield net
    finally:
        _teardown(net)


def main(argv: list[str] | None = None) -> int:
    """CLI: run a script under torchrun on N simulated hosts and print each host's output and link bytes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--procs", type=int, default=1, help="processes per host")
    parser.add_argument("--rate", default=None, help="tc tbf rate of each host's link, e.g. 1gbit")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("script", nargs=argparse.REMAINDER, help="-- script.py [args]")
    args = parser.parse_args(argv)
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    if not script:
        parser.error("give the script to run after --")
    with cluster(args.hosts, args.rate) as net:
        results = net.torchrun(args.procs, script, args.timeout)
        counters = net.counters()
    for host, ((code, output), bytes_) in enumerate(zip(results, counters)):
        print(f"=== host {host} exit {code} link tx {bytes_['tx']} rx {bytes_['rx']} bytes\n{output}")
    return max(abs(code) for code, _ in results)


if __name__ == "__main__":
    sys.exit(main())
