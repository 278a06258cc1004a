"""Launch under mpiexec (Debian's Open MPI) and disttrain.strategies.mpi.

- The launcher variables and the rendezvous address (unit tests, no processes).
- examples/mpi_train.py under `mpiexec -n 3` equals the same job under torchrun,
  a resumed run included; `disttrain train` runs and resumes under `mpiexec -n 2`.
- The pipeline at 5 ranks (4 stages, the last one replicated twice): results in
  input order, bounded queues, a stage's error on every rank, too few ranks.
- Two network-namespace hosts and a hostfile: mpiexec starts the remote rank
  through an rsh agent that enters the other namespace (no ssh).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import disttrain.distributed as dd
from disttrain import snapshot
from disttrain.netns import NamespaceHosts, can_make_hosts
from disttrain.strategies import mpi

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "mpi_worker.py")
TRAIN = os.path.join(ROOT, "examples", "mpi_train.py")
MPIEXEC = ["mpiexec", "--oversubscribe", "--allow-run-as-root"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_", "PMI_", "PMIX_", "SLURM_", "MASTER_", "TORCHELASTIC"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _run(cmd, timeout=120, **env):
    if cmd[0] == "mpiexec" and shutil.which("mpiexec") is None:
        pytest.fail("mpiexec not found: scripts/setup.sh installs Debian's openmpi-bin")
    # A session of its own: on a timeout everything in it goes, the ranks too (Open MPI puts each rank
    # in a process group of its own, in mpiexec's session; killing mpiexec alone left them running).
    proc = subprocess.Popen(cmd, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_session(proc.pid)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout} s; its session was killed:\n{out[-4000:]}")
    finally:
        if proc.poll() is None:  # an interrupt (Ctrl-C) while waiting
            _kill_session(proc.pid)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}"
    return out


def _session_members(sid: int) -> list[int]:
    members = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.getsid(int(name)) == sid:
                    members.append(int(name))
            except OSError:  # gone meanwhile
                pass
    return members


def _kill_session(sid: int) -> None:
    """SIGKILL to every process of session ``sid`` (the leader's group and each rank's own group)."""
    for pid in _session_members(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _results(out_dir, world):
    out = {}
    for rank in range(world):
        with open(os.path.join(out_dir, f"rank_{rank}.json")) as f:
            out[rank] = json.load(f)
    return out


# --- the launcher's variables ---------------------------------------------------------------------

def test_launch_environment_of_each_launcher():
    ompi = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "1"}
    assert dd.launch_environment(ompi) == {"launcher": "Open MPI", "rank": 2, "world_size": 3, "local_rank": 0,
                                           "local_world_size": 1}
    pmi = dd.launch_environment({"PMI_RANK": "1", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1"})
    assert (pmi["launcher"], pmi["rank"], pmi["world_size"], pmi["local_rank"]) == ("MPICH/PMI", 1, 4, 1)
    slurm = dd.launch_environment({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1"})
    assert (slurm["launcher"], slurm["rank"], slurm["world_size"], slurm["local_rank"]) == ("Slurm", 5, 8, 1)
    # torchrun's variables win; an sbatch script itself (no srun step) is no rank; nothing: no launcher
    assert dd.launch_environment({**ompi, "RANK": "0", "WORLD_SIZE": "2"})["launcher"] == "torchrun"
    assert dd.launch_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) is None
    assert dd.launch_environment({}) is None
    with pytest.raises(ValueError, match="PMI_RANK is set but PMI_SIZE is not"):
        dd.launch_environment({"PMI_RANK": "0"})
    with pytest.raises(ValueError, match=r"OMPI_COMM_WORLD_RANK=3 is not in \[0, OMPI_COMM_WORLD_SIZE=3\)"):
        dd.launch_environment({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "3"})


def test_rendezvous_from_hostfile_nodelist_and_job_id(tmp_path):
    assert dd.expand_nodelist("gpu[01-03,07],login1,n[9-10]-ib") == [
        "gpu01", "gpu02", "gpu03", "gpu07", "login1", "n9-ib", "n10-ib"]
    with pytest.raises(ValueError, match="node list"):
        dd.expand_nodelist("gpu[3-1]")
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# the job's hosts\n\nnode7 slots=4\nnode8 slots=4\n")
    assert dd._first_host({"OMPI_MCA_orte_default_hostfile": str(hostfile)})[0] == "node7"
    hostfile.write_text("node3:2\nnode4:2\n")  # MPICH's form
    assert dd._first_host({"DISTTRAIN_HOSTFILE": str(hostfile)})[0] == "node3"
    assert dd._first_host({"SLURM_JOB_NODELIST": "cn[004-005]"})[0] == "cn004"
    port, source = dd._derived_port({"PBS_JOBID": "1234.pbs"})
    assert source == "PBS_JOBID" and port == dd._derived_port({"PBS_JOBID": "1234.pbs"})[0]
    assert 20000 <= port < 40000 and port != dd._derived_port({"PBS_JOBID": "1235.pbs"})[0]


def test_one_host_job_needs_no_hostfile_nor_mpi4py(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("MASTER_", "PBS_", "SLURM_", "DISTTRAIN_HOSTFILE", "OMPI_MCA_orte_default")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MASTER_ADDR", "")  # empty counts as unset; monkeypatch restores both afterwards
    monkeypatch.setenv("MASTER_PORT", "")
    monkeypatch.setattr(dd, "_mpi4py_importable", lambda: False)
    monkeypatch.setenv("OMPI_MCA_ess_base_jobid", "3875471361")
    job = {"launcher": "Open MPI", "rank": 1, "world_size": 3, "local_rank": 1, "local_world_size": 3}
    dd._rendezvous_from_launcher(job)
    assert os.environ["MASTER_ADDR"] == "127.0.0.1"
    assert int(os.environ["MASTER_PORT"]) == dd._derived_port({"OMPI_MCA_ess_base_jobid": "3875471361"})[0]


def _no_launcher(monkeypatch):
    """No launcher's variables, no rendezvous, no hostfile in this process's environment (for the test)."""
    for name in list(os.environ):
        if name.startswith(("OMPI_", "PMI_", "PMIX_", "SLURM_", "PBS_", "MASTER_", "DISTTRAIN_HOSTFILE")) \
                or name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            monkeypatch.delenv(name)


def test_missing_rendezvous_is_a_clear_error(monkeypatch):
    _no_launcher(monkeypatch)
    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setattr(dd, "_mpi4py_importable", lambda: False)
    with pytest.raises(RuntimeError, match="rank 1 of 2 .MPICH/PMI. has no rendezvous address: MASTER_ADDR "
                                           "and MASTER_PORT not set"):
        dd.init()
    # The failed init left no half job behind: RANK and WORLD_SIZE=2 stayed in os.environ, and the
    # next code in the process (a later test: bench scaling's check) took itself for rank 1 of 2.
    left = {name: os.environ[name] for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                                "MASTER_PORT") if name in os.environ}
    assert not left, left


def test_a_failed_init_puts_back_the_rendezvous_it_replaced(monkeypatch):
    """An empty MASTER_ADDR counts as unset: init replaces it (here 127.0.0.1, every rank on this
    host). When the group then fails to start, the environment is as it was, the empty value too."""
    _no_launcher(monkeypatch)
    monkeypatch.setenv("MASTER_ADDR", "")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "2")
    monkeypatch.setenv("OMPI_MCA_ess_base_jobid", "3875471361")

    def refused(*args, **kwargs):
        assert os.environ["MASTER_ADDR"] == "127.0.0.1" and os.environ["RANK"] == "1"  # set for the group
        raise RuntimeError("the group did not start")

    monkeypatch.setattr(dd.dist, "init_process_group", refused)
    with pytest.raises(RuntimeError, match="the group did not start"):
        dd.init()
    assert os.environ["MASTER_ADDR"] == ""
    assert not {name for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")
                if name in os.environ}



def test_mpi4py_of_another_mpi_is_a_clear_error():
    """mpi4py built against another MPI than the launcher's sees a job of its own (here: started
    without mpiexec, a singleton of one process) while the launcher's variables say rank 1 of 2: its
    broadcast returned None to rank 1 (a TypeError) and left rank 0 waiting out the timeout."""
    pytest.importorskip("mpi4py")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_", "PMI_", "PMIX_", "SLURM_", "PBS_", "MASTER_", "DISTTRAIN_HOSTFILE"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(OMPI_COMM_WORLD_RANK="1", OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_LOCAL_RANK="0",
               OMPI_COMM_WORLD_LOCAL_SIZE="1")
    code = "import disttrain.distributed as dd\ntry:\n    dd.init()\nexcept RuntimeError as e:\n    print('error:', e)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "error: disttrain.init: rank 1 of 2" in out.stdout, (out.stdout, out.stderr[-3000:])
    assert "mpi4py, which would exchange one, sees rank 0 of 1" in out.stdout, out.stdout

# --- training under mpiexec ---------------------------------------------------------------------

def _losses(output):
    return [float(x) for x in re.findall(r"mean loss ([0-9.]+)", output)]


def test_mpi_train_under_mpiexec_equals_torchrun_and_resumes(tmp_path):
    common = ["--max-files", "240", "--batch-size", "8"]
    data = ["--data", str(tmp_path / "digits")]
    mpi.write_digits_folder(tmp_path / "digits", limit=240)
    # mpiexec: 2 epochs, then a second job resumes from the checkpoint for a third
    first = _run([*MPIEXEC, "-n", "3", sys.executable, TRAIN, *common, *data, "--epochs", "2",
                  "--out", str(tmp_path / "mpi")])
    resumed = _run([*MPIEXEC, "-n", "3", sys.executable, TRAIN, *common, *data, "--epochs", "3", "--resume",
                    "--out", str(tmp_path / "mpi")])
    assert "resumed from" in resumed and "at epoch 2" in resumed, resumed
    # torchrun: the same job, 3 epochs in one go
    reference = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", TRAIN,
                      *common, *data, "--epochs", "3", "--out", str(tmp_path / "torchrun")])
    losses = _losses(first) + _losses(resumed)
    assert len(losses) == 3 and losses[-1] < losses[0], losses  # it trains
    assert losses == _losses(reference), (losses, _losses(reference))
    got = snapshot.load(str(tmp_path / "mpi" / "checkpoint.dts"))
    want = snapshot.load(str(tmp_path / "torchrun" / "checkpoint.dts"))
    assert got["step"] == want["step"] == 3 * (80 // 8)
    for name, value in want["model"].items():
        assert torch.equal(got["model"][name], value), name  # bitwise


def test_disttrain_train_runs_and_resumes_under_mpiexec(tmp_path):
    cmd = [*MPIEXEC, "-n", "2", sys.executable, "-m", "disttrain.cli", "train", "-s", str(tmp_path),
           "--save-name", "run", "--no-progress", "-b", "64"]
    out = _run([*cmd, "-e", "1"])
    assert "2 rank(s)" in out, out
    # --nproc-per-node is ignored under mpiexec: each process already is a rank (2, not 4)
    out = _run([*cmd, "-e", "2", "--nproc-per-node", "2"])
    assert "2 rank(s)" in out and "resumed from" in out and "epoch 1" in out, out
    assert len(snapshot.list_snapshots(str(tmp_path / "run" / "snapshots"))) == 2


def test_pbs_job_scripts_under_a_pbs_environment(tmp_path):
    """scripts/pbs_*_job.sh as qsub would run them: PBS_NODEFILE (its first host is the
    rendezvous), PBS_JOBID (the port), PBS_O_WORKDIR."""
    nodes = tmp_path / "nodefile"
    nodes.write_text("localhost\nlocalhost\n")
    mpi.write_digits_folder(tmp_path / "digits", limit=64)
    env = {"PBS_O_WORKDIR": ROOT, "PBS_NODEFILE": str(nodes), "PBS_JOBID": "4242.pbs", "ALLOW_ROOT": "1",
           "OUT": str(tmp_path / "run"), "RUN": str(tmp_path / "run"), "EPOCHS": "1",
           "EXTRA_ARGS": f"--data {tmp_path / 'digits'}"}
    train = _run(["bash", os.path.join(ROOT, "scripts", "pbs_train_job.sh")], **env)
    assert "epoch 1/1" in train and "over 2 ranks" in train, train
    evaluate = _run(["bash", os.path.join(ROOT, "scripts", "pbs_evaluation_job.sh")], NPROCS="4", **env)
    assert re.search(r"64 images on 4 ranks .* accuracy [0-9.]+", evaluate), evaluate
    assert "3:predict" in evaluate
    for script in ("pbs_train_job.sh", "pbs_evaluation_job.sh", "slurm_mpi_train.sbatch"):
        assert subprocess.run(["bash", "-n", os.path.join(ROOT, "scripts", script)]).returncode == 0, script


# --- the pipeline ---------------------------------------------------------------------------------

def test_pipeline_and_training_pieces_at_5_ranks(tmp_path):
    images = tmp_path / "images"
    mpi.write_digits_folder(images, limit=42)
    _run([*MPIEXEC, "-n", "5", sys.executable, WORKER, str(tmp_path), "pipeline", str(images)])
    results = _results(str(tmp_path), 5)
    for rank, res in results.items():
        assert res["error"] is None, (rank, res["error"])
        assert res["local_rank"] == str(rank)
        assert res["scatter_sizes"] == [9, 9, 8, 8, 8] and res["scatter_complete"]
        assert "4 file(s) cannot be scattered over 5 ranks" in res["scatter_error"]
        assert res["broadcast_equal"] and res["average_error"] < 1e-6 and res["average_in_place_error"] < 1e-6
        assert res["average_warnings"] == [], res["average_warnings"]
        assert res["grads_reuse_memory"] and res["step_memory_scope_closed"]
        assert res["overlap_buckets"] >= 3 and res["overlap_error"] < 1e-6 and res["overlap_closed"], res
        assert "written again after its bucket's all-reduce started" in (res["overlap_accumulate_error"] or ""), res
        assert res["pipeline_scope_closed"]
        assert res["bad_transfer"] == "pipeline: transfer must be one of broadcast, sendrecv, got 'carrier pigeon'"
        assert res["stage_error"] == ("pipeline stage 2 ('normalise') on rank 2 raised on item 7: "
                                      "ValueError: corrupt image"), (rank, res["stage_error"])
        assert res["disagreeing_ranks"] == (
            "pipeline: every rank must call it with the same number of stages, queue_depth and transfer; got "
            "rank 0: 4 stages, queue_depth=1, transfer='sendrecv'; "
            + "; ".join(f"rank {r}: 4 stages, queue_depth=8, transfer='sendrecv'" for r in range(1, 5))), res
        assert res["too_many_stages"] == ("pipeline: 6 stages need at least 6 ranks (one per stage, the last "
                                          "replicated over the rest), the job has 5")
    assert results[0]["in_order"] and results[0]["in_order_broadcast"]
    assert results[0]["sizes_broadcast"] and results[0]["sizes_sendrecv"]
    for rank, res in results.items():  # item 9 (7 rows) goes to replica 9 mod 4, rank 2
        assert res["long_error"] == "pipeline stage 1 ('long') on rank 2 raised on item 9: ValueError: " + "x" * 1000, (
            rank, res["long_error"])
    stats = results[0]["stats"]
    assert [(s["rank"], s["stage"], s["name"]) for s in stats] == [
        (0, 0, "read"), (1, 1, "resize"), (2, 2, "normalise"), (3, 3, "predict"), (4, 3, "predict")]
    assert [s["items"] for s in stats] == [42, 42, 42, 21, 21]  # round-robin over the two replicas
    assert all(1 <= s["queue_max"] <= 2 for s in stats[1:])  # queue_depth=2 bounds every queue


def test_mpi_evaluate_with_too_few_ranks_is_one_line():
    # Before: each rank loaded the checkpoint, then raised pipeline's ValueError with a traceback.
    proc = subprocess.run([*MPIEXEC, "-n", "2", sys.executable, os.path.join(ROOT, "examples", "mpi_evaluate.py"),
                           "--run", "/nonexistent"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0
    assert "the 4-stage pipeline needs at least 4 ranks, the job has 2" in proc.stdout, proc.stdout[-2000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-2000:]


# --- two hosts: network namespaces and a hostfile -------------------------------------------------

HOSTS = NamespaceHosts(namespaces=("dt-mpi0", "dt-mpi1"), veths=("dt-mveth0", "dt-mveth1"),
                       addresses=("10.231.78.1", "10.231.78.2"))
NAMESPACES, ADDRESSES = HOSTS.namespaces, HOSTS.addresses


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    why = can_make_hosts()
    if why:
        pytest.fail(f"the namespace test {why}")
    HOSTS.make()
    folder = tmp_path_factory.mktemp("hosts")
    agent = folder / "netns_agent.sh"  # Open MPI's rsh agent: "AGENT HOST COMMAND..." -> the host's namespace
    agent.write_text("#!/bin/sh\nhost=$1; shift\ncase \"$host\" in\n"
                     + "".join(f"  {a}) ns={n};;\n" for a, n in zip(ADDRESSES, NAMESPACES))
                     + "  *) echo \"netns agent: unknown host $host\" >&2; exit 1;;\nesac\n"
                     "exec ip netns exec \"$ns\" sh -c \"$*\"\n")
    agent.chmod(0o755)
    hostfile = folder / "hostfile"
    hostfile.write_text("".join(f"{a} slots=1\n" for a in ADDRESSES))
    yield str(agent), str(hostfile)
    HOSTS.remove()


@pytest.mark.parametrize("rendezvous", ["hostfile", "mpi4py"])
def test_two_namespace_hosts_with_a_hostfile(two_hosts, tmp_path, rendezvous):
    agent, hostfile = two_hosts
    images = tmp_path / "images"
    mpi.write_digits_folder(images, limit=12)
    # hostfile: mpiexec and disttrain both read OMPI_MCA_orte_default_hostfile (first host, port from the
    # job id); mpi4py: the hostfile is only mpiexec's argument, rank 0's address comes over MPI.
    env = {"OMPI_MCA_orte_default_hostfile": hostfile} if rendezvous == "hostfile" else {}
    where = [] if rendezvous == "hostfile" else ["--hostfile", hostfile]
    _run(["ip", "netns", "exec", NAMESPACES[0], *MPIEXEC, *where, "-n", "2", "--mca", "plm_rsh_agent", agent,
          sys.executable, WORKER, str(tmp_path), "hosts", str(images)], **env)
    results = _results(str(tmp_path), 2)
    for rank, res in results.items():
        assert res["error"] is None, (rank, res["error"])
        assert res["allreduce"] == 3.0 and res["transport"] == "tcp", res
        assert res["master"].startswith(ADDRESSES[0] + ":"), res["master"]
    if rendezvous == "hostfile":  # the hostfile's first host, the port derived from Open MPI's job id
        assert results[0]["master"] == results[1]["master"] == f"{ADDRESSES[0]}:{results[0]['job_port']}"
    assert results[0]["pipeline_items"] == 12


# --- disttrain bench mpi --------------------------------------------------------------------------

def test_bench_mpi_rows_ceiling_and_parameter_check(tmp_path):
    """A short `disttrain bench mpi`: every training configuration at 2 ranks gets a row (no-comm,
    the floor, included), the report prints the ceiling (no-comm over the recipe) the issue's ratio
    is bounded by, and the run ends only after every averaged configuration's parameters were
    compared with disttrain-mpi's (a mismatch fails the benchmark: see test below). No timing is
    asserted."""
    from disttrain.bench import mpi as bench

    out = tmp_path / "mpi.csv"
    text = _run([sys.executable, "-m", "disttrain.cli", "bench", "mpi", "--ranks", "2", "--models", "resnet18-tv",
                 "--rounds", "1", "--steps", "1", "--warmup", "1", "--eval-ranks", "0", "--out", str(out)],
                timeout=300)
    import csv

    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["config"] for r in rows) == sorted(bench.TRAIN_CONFIGS), rows
    assert all(float(r["steps_per_s"]) > 0 for r in rows)
    assert "ceiling resnet18-tv at 2 ranks: no data-parallel step beats no-comm" in text, text[-3000:]


def test_bench_mpi_fails_when_a_configuration_trains_differently(tmp_path):
    """The parameter check can fail: a recipe whose averaged gradients come out twice too large
    trains other parameters, and the benchmark stops without printing a result."""
    sitecustomize = tmp_path / "sitecustomize.py"
    # Only the recipe turns numpy arrays into tensors (torch.from_numpy) in a training rank.
    sitecustomize.write_text("import torch\n"
                             "_from_numpy = torch.from_numpy\n"
                             "torch.from_numpy = lambda a: _from_numpy(a) * 2\n")
    cmd = [sys.executable, "-m", "disttrain.cli", "bench", "mpi", "--ranks", "2", "--models", "resnet18-tv",
           "--rounds", "1", "--steps", "1", "--warmup", "1", "--eval-ranks", "0", "--out", str(tmp_path / "x.csv")]
    proc = subprocess.run(cmd, env=_env(PYTHONPATH=str(tmp_path)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "mpi4py and disttrain-mpi trained resnet18-tv to different parameters" in proc.stdout, proc.stdout[-3000:]


def test_a_timed_out_run_leaves_no_rank_behind():
    # _run's timeout used to kill mpiexec only: the ranks (each in a process group of its own) ran on.
    sleeper = "import os, time; print('rank pid', os.getpid(), flush=True); time.sleep(120)"
    with pytest.raises((pytest.fail.Exception, subprocess.TimeoutExpired)) as caught:
        _run([*MPIEXEC, "-n", "2", sys.executable, "-c", sleeper], timeout=8)
    output = caught.value.output if isinstance(caught.value, subprocess.TimeoutExpired) else str(caught.value)
    if isinstance(output, bytes):
        output = output.decode()
    pids = [int(p) for p in re.findall(r"rank pid (\d+)", output or "")]
    assert len(pids) == 2, output

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 10
    while any(map(alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in pids if alive(pid)]
    for pid in left:  # not to leave them to the rest of the run
        os.kill(pid, signal.SIGKILL)
    assert not left, f"ranks {left} outlived the timeout"
