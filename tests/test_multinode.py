"""Multi-node training for real, on one machine: every "node" is a Linux network namespace
(tests/support/netns.py) with its own address on a private bridge, its own interface name, and no
route to the others except that bridge; hostnames do not resolve to those addresses.

- accelerate across 2 nodes x 1 CPU rank (gloo), by hand as the accelerate docs describe it;
- launch/slurm/train.sbatch on a 2-node SLURM cluster (slurmctld on this host, one slurmd per
  namespace, tests/support/slurm_cluster.py): a run to the end, and a USR1 preemption -> requeue ->
  resume across both nodes, with DDP and with DeepSpeed ZeRO-2 (ACCELERATE_CONFIG).

Each ends with bit-identical weights to the same training on 2 local processes with DDP (same
world size, same global batch: the data order and the all-reduced gradients are the same;
ZeRO-2 in fp32 averages the same local gradients, each rank's BatchNorm sees the same local batch).

Needs root, iproute2 and util-linux (nsenter, unshare); the SLURM tests install slurm-wlm and
munge with apt like tests/test_slurm.py. `pytest -k multinode` selects them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from support.netns import NetnsUnavailable, network_namespaces
from support.slurm_cluster import FINAL_STATES, ClusterUnavailable, SlurmCluster, SlurmNode, apt_install
from support.trainer_fixtures import WITH_WORKER, tiny_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "rsc_dist" / "train.py"
SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
MULTINODE_CPU = ROOT / "launch" / "accelerate" / "multinode_cpu.yaml"
CPU_2PROC = ROOT / "launch" / "accelerate" / "cpu_2proc.yaml"
ZERO2 = ROOT / "launch" / "accelerate" / "deepspeed_zero2.yaml"
NODES = 2
# 3 epochs of 6 steps (the tiny shards, global batch 16), a checkpoint every 4 steps, one
# evaluation at the end: long enough to preempt after the first checkpoint, seconds per run.
TRAIN_SECTION = {"epochs": 3, "checkpoint_every_steps": 4, "eval_every_steps": 18, "agree_every_steps": 2}
RUN_TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return f"--- {path.name} ---\n{path.read_text(errors='replace')[-n:]}\n"
    except OSError:
        return f"--- {path.name}: missing ---\n"


def final_weights(run_dir: Path) -> dict:
    """The trainer's last checkpoint (checkpoint_XXXXXXXX, zero-padded: sorted = by step)."""
    ckpts = sorted(p for p in (run_dir / "checkpoints").glob("checkpoint_*") if p.name[11:].isdigit())
    assert ckpts, f"no checkpoint in {run_dir}"
    return load_file(ckpts[-1] / "model.safetensors")


def assert_same_weights(got_dir: Path, expected_dir: Path) -> None:
    got, expected = final_weights(got_dir), final_weights(expected_dir)
    assert got.keys() == expected.keys()
    differ = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not differ, f"{len(differ)} of {len(expected)} tensors differ from {expected_dir}: {differ[:5]}"


def run_env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true", **extra}


def run_all(commands: list[tuple[list[str], dict, Path]], timeout: float) -> list[int]:
    """Start every (command, env, log file) at once, each in its own session; wait for all;
    on timeout kill them all (process groups) and fail with the logs."""
    procs = []
    try:
        for cmd, env, log in commands:
            with open(log, "wb") as out:
                procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                              cwd=ROOT, start_new_session=True))
        deadline = time.monotonic() + timeout
        for p in procs:
            p.wait(max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"not done within {timeout:.0f} s:\n" + "".join(_tail(log) for _, _, log in commands))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
    return [p.returncode for p in procs]


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def net():
    if os.geteuid() == 0 and not shutil.which("ip"):
        try:
            apt_install(["iproute2"])
        except ClusterUnavailable as exc:
            pytest.skip(f"no network namespaces here: {exc}")
    try:
        with network_namespaces(NODES) as network:
            yield network
    except NetnsUnavailable as exc:
        pytest.skip(f"no network namespaces here: {exc}")


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_shards) -> Path:  # noqa: F811
    return tiny_config(tmp_path_factory.mktemp("multinode_config"), tiny_shards, data=WITH_WORKER, train=TRAIN_SECTION)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, config) -> Path:
    """The same training on 2 processes of this host (no namespace), the torchrun path."""
    out = tmp_path_factory.mktemp("multinode_reference")
    run_dir = out / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
           "--num_processes", "2", "--main_process_port", str(_free_port()), str(TRAIN),
           "--config", str(config), "--output_dir", str(run_dir), "--resume", "auto"]
    (rc,) = run_all([(cmd, run_env(), out / "reference.log")], RUN_TIMEOUT)
    assert rc == 0 and (run_dir / "results.json").exists(), _tail(out / "reference.log")
    return run_dir


@pytest.fixture(scope="module")
def slurm(net, tmp_path_factory):
    """slurmctld on this host (listening on the bridge address), slurmd `nodeK` in namespace K
    with hostname nodeK (a UTS namespace of its own) and GLOO_SOCKET_IFNAME set to that
    namespace's interface for every task on it (TaskProlog), as a site would."""
    nodes = [SlurmNode(name=f"node{n.index}", addr=n.addr,
                       prefix=tuple(n.enter(["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                                             f"node{n.index}"])),
                       env={"GLOO_SOCKET_IFNAME": n.ifname})
             for n in net.nodes]
    try:
        cluster = SlurmCluster(tmp_path_factory.mktemp("slurm_multinode"), nodes=nodes,
                               ctld_addr=net.host_addr).start()
    except ClusterUnavailable as exc:
        pytest.skip(f"no SLURM here: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


# -- accelerate by hand -----------------------------------------------------------------------
def test_multinode_accelerate_gloo(net, config, reference, tmp_path):
    """`accelerate launch --num_machines 2 --machine_rank R ...` in each namespace, rendezvous on
    node 0's address, gloo over the bridge (GLOO_SOCKET_IFNAME = the namespace's interface)."""
    run_dir = tmp_path / "run"
    port = str(_free_port())
    bridge_port = Path(f"/sys/class/net/rsc{net.tag}h1/statistics/rx_bytes")  # node 1 -> bridge
    sent_before = int(bridge_port.read_text())
    commands = []
    for node in net.nodes:
        cmd = node.exec([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(MULTINODE_CPU),
                         "--num_machines", str(NODES), "--machine_rank", str(node.index),
                         "--num_processes", str(NODES), "--main_process_ip", net.nodes[0].addr,
                         "--main_process_port", port, str(TRAIN), "--config", str(config),
                         "--output_dir", str(run_dir), "--resume", "auto"])
        commands.append((cmd, run_env(GLOO_SOCKET_IFNAME=node.ifname), tmp_path / f"node{node.index}.log"))
    codes = run_all(commands, RUN_TIMEOUT)
    logs = "".join(_tail(log) for _, _, log in commands)
    assert codes == [0] * NODES, f"exit codes {codes}\n{logs}"
    node0 = (tmp_path / "node0.log").read_text()
    # One process per node, so a world of 2 is one rank on each node.
    assert "2 process(es)" in node0, logs
    assert (run_dir / "results.json").exists(), logs
    sent = int(bridge_port.read_text()) - sent_before
    assert sent > 1_000_000, f"node 1 sent only {sent} bytes over the bridge: the gradients went elsewhere?"
    assert_same_weights(run_dir, reference)
    last = lambda d: json.loads((d / "results.json").read_text())["last"]  # noqa: E731
    assert last(run_dir) == last(reference)


# -- SLURM ------------------------------------------------------------------------------------
def job_env(tmp_path: Path) -> dict:
    # GLOO_SOCKET_IFNAME is NOT here: each node's TaskProlog sets its own.
    return {"RSC_DEVICE": "cpu", "NPROC_PER_NODE": "1", "RSC_VENV": sys.prefix,
            "RSC_RUNS": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def submit(cluster: SlurmCluster, tmp_path: Path, name: str, config: Path,
           **extra_env: str) -> tuple[str, Path, Path]:
    run_dir = tmp_path / "runs" / name
    env = {**job_env(tmp_path), **extra_env}
    jobid = cluster.sbatch([f"--job-name={name}", f"--nodes={NODES}", f"--output={tmp_path}/%x-%j.out",
                            str(SBATCH), "--config", str(config), "--output_dir", str(run_dir)],
                           env=env, cwd=ROOT)
    return jobid, run_dir, tmp_path / f"{name}-{jobid}.out"


def check_two_node_log(cluster: SlurmCluster, log: str) -> None:
    addr0 = cluster.node_addr("node0")
    assert f"rendezvous {addr0}:" in log and "(NodeAddr of node0)" in log, log
    assert "on 2 node(s) [node[0-1]], 1 cpu process(es) per node" in log, log
    for k in range(NODES):  # each node's own interface, from its TaskProlog
        ifname = cluster.nodes[k].env["GLOO_SOCKET_IFNAME"]
        assert f"[node_launch node{k} node {k}] GLOO_SOCKET_IFNAME={ifname}" in log, log
    assert "2 process(es)" in log, log


def test_multinode_slurm_two_nodes_run_to_completion(slurm, config, reference, tmp_path):
    jobid, run_dir, out = submit(slurm, tmp_path, "two", config)
    info = slurm.wait_done(jobid, RUN_TIMEOUT)
    log = _tail(out, 20000)
    assert (info["JobState"], info["ExitCode"], info["NodeList"]) == ("COMPLETED", "0:0", "node[0-1]"), log
    check_two_node_log(slurm, log)
    assert (run_dir / "results.json").exists(), log
    assert_same_weights(run_dir, reference)


def preempt_and_resume(cluster: SlurmCluster, tmp_path: Path, name: str, config: Path,
                       **extra_env: str) -> tuple[Path, str]:
    """Submit a 2-node job, `scancel --signal=USR1 --batch` it (what --signal=B:USR1@120 does
    before the time limit) once its first checkpoint exists, let it requeue and run to the end;
    checks that both nodes stopped, both starts were 2-node starts and the second resumed.
    Returns the run folder and the job's log."""
    jobid, run_dir, out = submit(cluster, tmp_path, name, config, **extra_env)
    deadline = time.monotonic() + RUN_TIMEOUT
    while not any((run_dir / "checkpoints").glob("checkpoint_*[0-9]")):
        state = cluster.job(jobid).get("JobState")
        if state in FINAL_STATES or time.monotonic() > deadline:
            pytest.fail(f"no checkpoint before the job ended ({state}):\n{_tail(out)}{cluster.logs()}")
        time.sleep(0.25)
    assert cluster.job(jobid)["JobState"] == "RUNNING"
    cluster.run(["scancel", "--signal=USR1", "--batch", jobid])
    cluster.requeue_now(jobid)
    info = cluster.wait_done(jobid, RUN_TIMEOUT)

    log = _tail(out, 40000)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert "SIGUSR1: asking the trainer to checkpoint and stop" in log
    for k in range(NODES):  # the signal reached both nodes' launch scripts
        assert f"[node_launch node{k} node {k}] SIGUSR1: forwarding to the trainer ranks" in log, log
    assert f"requeueing {jobid} to resume" in log and f"finished: {run_dir}" in log, log
    assert "resumed from" in log, log
    starts = (run_dir / "slurm_starts.log").read_text().splitlines()
    assert [("restart=0" in s, "restart=1" in s, "nodes=node[0-1]" in s) for s in starts] == \
        [(True, False, True), (False, True, True)], starts
    # Both starts were 2-node starts with their own rendezvous port.
    assert log.count("(NodeAddr of node0)") == 2 and log.count("2 process(es)") >= 2, log
    assert not (run_dir / "preempted.json").exists()
    return run_dir, log


def test_multinode_slurm_preempted_job_resumes_across_both_nodes(slurm, config, reference, tmp_path):
    """USR1 -> both nodes' ranks checkpoint and stop -> requeue -> resume on both nodes -> the
    weights of an uninterrupted run."""
    run_dir, _ = preempt_and_resume(slurm, tmp_path, "pre", config)
    assert_same_weights(run_dir, reference)


def test_multinode_slurm_deepspeed_zero2_preempted_and_resumed(slurm, config, reference, tmp_path):
    """The same preemption with ACCELERATE_CONFIG=launch/accelerate/deepspeed_zero2.yaml: one
    torchrun per node (deepspeed_multinode_launcher: standard), DeepSpeed over gloo on the CPU
    ranks, its own checkpoint layout saved at the USR1 stop and loaded on both nodes after the
    requeue; ZeRO-2 on 2 ranks ends with the weights of DDP on 2 ranks, bit for bit."""
    pytest.importorskip("deepspeed")
    from support.deepspeed import consolidated_weights

    run_dir, log = preempt_and_resume(slurm, tmp_path, "zero2", config, ACCELERATE_CONFIG=str(ZERO2))
    assert f"--config_file {ZERO2}" in log, log
    final = sorted(p for p in (run_dir / "checkpoints").glob("checkpoint_*") if p.name[11:].isdigit())[-1]
    shards = sorted(p.name for p in (final / "pytorch_model").glob("*optim_states.pt"))
    assert [s[:15] for s in shards] == ["zero_pp_rank_0_", "zero_pp_rank_1_"], shards  # ZeRO's layout
    assert not (final / "model.safetensors").exists()  # not Accelerate's DDP layout
    got = consolidated_weights(final)
    expected = final_weights(reference)
    assert len(got) > 50 and got.keys() == expected.keys(), sorted(set(got) ^ set(expected))[:10]
    differ = {k: (got[k] - expected[k]).abs().max().item() for k in got if not torch.equal(got[k], expected[k])}
    assert not differ, f"{len(differ)} of {len(got)} tensors differ from DDP: {differ}"
    last = lambda d: json.loads((d / "results.json").read_text())["last"]  # noqa: E731
    assert last(run_dir) == last(reference)
