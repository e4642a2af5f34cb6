#!/usr/bin/env python3
"""A private Slurm cluster on this machine, for the tests and for trying `train.sbatch` without a real one:
munge, slurmctld, and N slurmd nodes, each in a network namespace of its own (a veth pair on a bridge) with
its own address and host name. Needs root, Debian's `slurm-wlm` and `munge`, and `ip` (iproute2).

    python launch/slurm/local_cluster.py up   --dir DIR [--nodes 2] [--cpus 2]
    eval "$(python launch/slurm/local_cluster.py env --dir DIR)"      # SLURM_CONF for sbatch, squeue, ...
    python launch/slurm/local_cluster.py crash-node --dir DIR NODE    # every process of the node killed
    python launch/slurm/local_cluster.py start-node --dir DIR NODE    # its slurmd started again
    python launch/slurm/local_cluster.py down --dir DIR

Everything lives under DIR: munge key and socket, slurm.conf, the controller's state, and per node (`%n`)
spool, log and pid files. Names (bridge, namespaces, links) carry a tag made from DIR, so two clusters in
two directories do not meet. Nodes are `<tag>n1`, `<tag>n2`, ...; each node's /etc/hosts (/etc/netns/<namespace>/hosts,
bind-mounted in the node's mount namespace) names every node and the controller.
Stdlib only: it runs before any virtual environment exists.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

STATE = "cluster.json"
DAEMONS = ("munged", "slurmctld", "slurmd")


def missing_requirements() -> str | None:
    """Why no cluster can start here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, slurmd)"
    absent = [tool for tool in (*DAEMONS, "sbatch", "ip", "unshare", "nsenter") if not shutil.which(tool)]
    if absent:
        return f"not installed: {', '.join(absent)} (Debian: apt-get install slurm-wlm munge iproute2)"
    return None


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {result.stderr.strip() or result.stdout.strip()}")
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, directory: str, nodes: int = 2, cpus: int = 2):
        self.dir = os.path.abspath(directory)
        tag = hashlib.sha256(self.dir.encode()).hexdigest()[:4]
        self.tag = tag
        self.bridge = f"sptbr{tag}"
        octet = int(tag[:2], 16)  # a /24 of its own per directory
        self.subnet = f"10.213.{octet}"
        self.controller = socket.gethostname()  # slurmctld insists on running where SlurmctldHost names
        self.nodes = [f"s{tag}n{i}" for i in range(1, nodes + 1)]
        self.cpus = cpus
        self.conf = os.path.join(self.dir, "slurm.conf")
        self.munge_socket = os.path.join(self.dir, "munge", "munge.sock")

    # ------------------------------------------------------------------ names and paths

    def address(self, node: str) -> str:
        return f"{self.subnet}.{10 + self.nodes.index(node) + 1}"

    def netns(self, node: str) -> str:
        return f"spt-{node}"

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": self.conf}

    def pid_file(self, node: str) -> str:
        return os.path.join(self.dir, f"slurmd-{node}.pid")

    # ------------------------------------------------------------------ up

    def up(self) -> None:
        why = missing_requirements()
        if why:
            raise RuntimeError(why)
        os.makedirs(self.dir, exist_ok=True)
        self.down()  # leftovers of a cluster in this directory that was not taken down
        try:
            self._network()
            self._munge()
            self._write_conf()
            _run("slurmctld", "-c", "-f", self.conf)
            for node in self.nodes:
                self.start_node(node)
            self.wait_idle()
        except BaseException:
            self.down()  # nothing half-built left behind (bridge, namespaces, daemons)
            raise
        with open(os.path.join(self.dir, STATE), "w") as f:
            json.dump({"nodes": self.nodes, "conf": self.conf}, f)

    def _network(self) -> None:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        hosts = "127.0.0.1 localhost\n" + f"{self.subnet}.1 {self.controller}\n" + \
            "".join(f"{self.address(n)} {n}\n" for n in self.nodes)
        for node in self.nodes:
            ns, outside = self.netns(node), f"spv{node}"
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", outside, "type", "veth", "peer", "name", f"spp{node}")
            _run("ip", "link", "set", f"spp{node}", "netns", ns)
            _run("ip", "link", "set", outside, "master", self.bridge)
            _run("ip", "link", "set", outside, "up")
            inside = ["ip", "netns", "exec", ns, "ip"]
            _run(*inside, "link", "set", f"spp{node}", "name", "eth0")
            _run(*inside, "addr", "add", f"{self.address(node)}/24", "dev", "eth0")
            _run(*inside, "link", "set", "eth0", "up")
            _run(*inside, "link", "set", "lo", "up")
            os.makedirs(f"/etc/netns/{ns}", exist_ok=True)
            with open(f"/etc/netns/{ns}/hosts", "w") as f:
                f.write(hosts)

    def _munge(self) -> None:
        munge_dir = os.path.dirname(self.munge_socket)
        os.makedirs(munge_dir, mode=0o700, exist_ok=True)
        key = os.path.join(munge_dir, "munge.key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400), "wb") as f:
            f.write(os.urandom(1024))
        _run("munged", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
             f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log",
             f"--seed-file={munge_dir}/munged.seed")

    def _write_conf(self) -> None:
        d = self.dir
        lines = [
            f"ClusterName=spt{self.tag}",
            f"SlurmctldHost={self.controller}({self.subnet}.1)",
            f"SlurmctldPort={_free_port()}", "SlurmdPort=6818",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.munge_socket}",
            "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={d}/slurmctld", f"SlurmctldPidFile={d}/slurmctld.pid",
            f"SlurmctldLogFile={d}/slurmctld.log",
            f"SlurmdSpoolDir={d}/spool-%n", f"SlurmdPidFile={d}/slurmd-%n.pid", f"SlurmdLogFile={d}/slurmd-%n.log",
            # No cgroups here: processes are tracked by parentage, tasks are not bound.
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "MpiDefault=none", "SwitchType=switch/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "SlurmdParameters=config_overrides",
            # Fast reactions for tests: a dead node is noticed within seconds, a job ends 5 s after SIGTERM,
            # a requeued job may start again at once, and a node that comes back is used again.
            "SlurmdTimeout=6", "KillWait=5", "MessageTimeout=10", "ReturnToService=2", "JobRequeue=1",
            "MinJobAge=600", "SchedulerParameters=defer_batch=0", "InactiveLimit=0",
        ]
        lines += [f"NodeName={n} NodeAddr={self.address(n)} CPUs={self.cpus} RealMemory=4000 State=UNKNOWN"
                  for n in self.nodes]
        lines.append("PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        os.makedirs(f"{d}/slurmctld", exist_ok=True)
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def start_node(self, node: str) -> None:
        """slurmd of `node`: in its network namespace, under its own host name (a UTS namespace) and with its
        own /etc/hosts (a mount namespace). Not `ip netns exec`, whose fresh /sys hides the cgroup mounts
        slurmd reads."""
        os.makedirs(os.path.join(self.dir, f"spool-{node}"), exist_ok=True)
        script = 'mount --bind "$1" /etc/hosts && hostname "$0" && exec slurmd -N "$0" -f "$2"'
        _run("nsenter", f"--net=/run/netns/{self.netns(node)}", "unshare", "--uts", "--mount", "--propagation",
             "private", "--", "sh", "-c", script, node, f"/etc/netns/{self.netns(node)}/hosts", self.conf)

    def wait_idle(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            result = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%N %T"], capture_output=True,
                                    text=True, env=self._client_env())
            states = dict(line.split() for line in result.stdout.splitlines() if line.strip())
            if result.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes not idle after {timeout} s: {states or result.stderr.strip()} "
                                   f"(logs in {self.dir})")
            time.sleep(0.5)

    def _client_env(self) -> dict[str, str]:
        return dict(os.environ, **self.env())

    # ------------------------------------------------------------------ faults

    def crash_node(self, node: str) -> None:
        """The node dies: slurmd, its job steps and every rank on it killed at once."""
        self._signal_node(node, signal.SIGKILL)

    def freeze_node(self, node: str, frozen: bool = True) -> None:
        """Every process of the node stopped (SIGSTOP) or continued: a node that hangs."""
        self._signal_node(node, signal.SIGSTOP if frozen else signal.SIGCONT)

    def _signal_node(self, node: str, sig: signal.Signals) -> None:
        for pid in _run("ip", "netns", "pids", self.netns(node), check=False).stdout.split():
            try:
                os.kill(int(pid), sig)
            except ProcessLookupError:
                pass

    # ------------------------------------------------------------------ down

    def down(self) -> None:
        for node in self.nodes:
            if os.path.exists(f"/run/netns/{self.netns(node)}"):
                self.crash_node(node)
        for pid_file in (f"{self.dir}/slurmctld.pid", f"{self.dir}/munge/munged.pid"):
            _kill_pid_file(pid_file)
        for node in self.nodes:
            _run("ip", "netns", "del", self.netns(node), check=False)
            _run("ip", "link", "del", f"spv{node}", check=False)
            shutil.rmtree(f"/etc/netns/{self.netns(node)}", ignore_errors=True)
        _run("ip", "link", "del", self.bridge, check=False)
        if os.path.exists(os.path.join(self.dir, STATE)):
            os.unlink(os.path.join(self.dir, STATE))


def _kill_pid_file(path: str, timeout: float = 10) -> None:
    try:
        pid = int(open(path).read().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down", "env", "crash-node", "start-node"])
    parser.add_argument("node", nargs="?")
    parser.add_argument("--dir", required=True, help="where the cluster keeps everything")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs each node offers")
    args = parser.parse_args(argv)
    cluster = Cluster(args.dir, args.nodes, args.cpus)
    try:
        if args.action == "up":
            cluster.up()
            print(f"up: nodes {', '.join(cluster.nodes)}; export SLURM_CONF={cluster.conf}")
        elif args.action == "down":
            cluster.down()
        elif args.action == "env":
            print(f"export SLURM_CONF={cluster.conf}")
        elif args.node not in cluster.nodes:
            parser.error(f"node: one of {', '.join(cluster.nodes)}")
        elif args.action == "crash-node":
            cluster.crash_node(args.node)
        else:
            cluster.start_node(args.node)
    except RuntimeError as exc:
        print(f"local_cluster: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
