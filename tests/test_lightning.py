"""disttrain.lightning: strategies for Lightning's Trainer and Fabric.

- Trainer, 2 CPU processes launched by Lightning: "disttrain_ddp" and each ZeRO
  stage end with the parameters of Lightning's own DDPStrategy over gloo
  (Adam, clipping by norm, a step scheduler; relative 1e-6); a ZeRO run
  resumed from its checkpoint continues identically; "disttrain_ddp" under
  torchrun --max-restarts survives kill -9 of a rank and ends identical.
- Manual optimization under "disttrain_ddp" equals Lightning's DDP over gloo;
  ZeRO with manual optimization is a clear error.
- Fabric: every strategy (no_backward_sync accumulation, clipping, a saved and
  reloaded checkpoint) equals one process training on both ranks' data.
- The Hydra example runs end to end on the embedded data.
- In-process: the checkpoint IO round trip, registration, option errors.

The Trainer runs from scratch share one launch (the worker's ``--then``: the
processes import Lightning once, not once per run), run at the same time as the
gloo reference's launch; the runs resumed from their checkpoints share another,
of fresh processes.
"""

from __future__ import annotations

import json
import os
import re
import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("lightning", reason="disttrain[lightning] is part of the dev install (scripts/setup.sh)")

import disttrain.lightning as dl  # noqa: E402
from harness import no_leftover_shared_memory, run_ranks  # noqa: E402
from lightning_worker import RUN_MARKER  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "lightning_worker.py")
FABRIC_WORKER = os.path.join(HERE, "lightning_fabric_worker.py")
HYDRA_EXAMPLE = os.path.join(ROOT, "examples", "lightning_hydra", "train.py")
# Adam, clipping by norm (so ZeRO must clip by the global norm), 4 epochs of 3 steps.
COMMON = ["--epochs", "4", "--batches", "3", "--optimizer", "adam", "--clip", "0.5"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MASTER_", "TORCHELASTIC", "SLURM_", "OMPI_", "PMI_", "NODE_RANK", "GROUP_RANK"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def _run(cmd: list[str], cwd, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _train(tmp, name: str, strategy: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run([sys.executable, WORKER, "--strategy", strategy, "--out", str(tmp / f"{name}.pt"), *extra], tmp,
                check=check)


def _train_runs(tmp, runs: list[tuple[str, str, list[str]]]) -> list[str]:
    """Several runs (name, strategy, arguments) in one launch of the worker (``--then``
    between them: one set of processes, each importing Lightning once, where a launch
    per run imports it again); rank 0 writes ``tmp/<name>.pt`` for each. Returns each
    run's log (its stdout, then its stderr)."""
    cmd = [sys.executable, WORKER]
    for i, (name, strategy, extra) in enumerate(runs):
        cmd += ["--then"] * bool(i) + ["--strategy", strategy, "--out", str(tmp / f"{name}.pt"), *extra]
    proc = _run(cmd, tmp)
    marker = re.compile(rf"{re.escape(RUN_MARKER)} \d+\n")  # not only at a line's start: rank 1 writes to the pipes too
    parts = [marker.split(text) for text in (proc.stdout, proc.stderr)]
    assert [len(p) for p in parts] == [len(runs) + 1] * 2, f"the runs' markers: {proc.stdout[-3000:]}"
    return [parts[0][i + 1] + parts[1][i + 1] for i in range(len(runs))]


def _relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)).item() for k in a)


def _gloo_reference(tmp) -> dict:
    _train(tmp, "gloo", "ddp_gloo", *COMMON)
    return torch.load(tmp / "gloo.pt")


# The first 2 of COMMON's 4 epochs, checkpointed; then resumed with (the same or another strategy) for the other 2.
FIRST_HALF = [*COMMON[:1], "2", *COMMON[2:]]
RESUMED_WITH = {"disttrain_zero2": "disttrain_ddp", "disttrain_zero3_sharded": "disttrain_zero3_sharded",
                "disttrain_zero3_lowmem": "disttrain_zero3_lowmem"}


def _from_scratch(tmp):
    """The runs from scratch, in one launch: ZeRO-1, and manual optimization under
    disttrain_ddp, for COMMON's 4 epochs; each strategy of RESUMED_WITH for the first 2,
    checkpointed into <strategy>_ckpt. Each checkpoint folder is also copied, as its run
    left it, to <strategy>_ckpt_first (the resumed run adds its own checkpoints to the
    folder)."""
    runs = [("zero1", "disttrain_zero1", COMMON), ("manual", "disttrain_ddp", ["--manual", *COMMON])]
    runs += [(f"{s}_first", s, [*FIRST_HALF, "--ckpt-dir", str(tmp / f"{s}_ckpt")]) for s in RESUMED_WITH]
    _train_runs(tmp, runs)
    for s in RESUMED_WITH:
        shutil.copytree(tmp / f"{s}_ckpt", tmp / f"{s}_ckpt_first")
    return tmp


@pytest.fixture(scope="module")
def _first_launches(tmp_path_factory):
    """Lightning's DDP over gloo (the reference) and the runs from scratch: two independent
    launches, run at once (the two processes of a launch import Lightning one after the
    other, the second started by the first: alone, a launch leaves a core idle for that long)."""
    with no_leftover_shared_memory(), ThreadPoolExecutor(2) as pool:
        reference = pool.submit(_gloo_reference, tmp_path_factory.mktemp("gloo"))
        scratch = pool.submit(_from_scratch, tmp_path_factory.mktemp("scratch"))
        return reference.result(), scratch.result()


@pytest.fixture(scope="module")
def gloo_reference(_first_launches):
    return _first_launches[0]


@pytest.fixture(scope="module")
def from_scratch(_first_launches):
    return _first_launches[1]


@pytest.fixture(scope="module")
def resumed(from_scratch):
    """Each checkpointed run of from_scratch resumed (RESUMED_WITH) for the other 2 epochs,
    in one launch of fresh processes (nothing but the checkpoint carries over): the folder
    and each resumed run's log by strategy."""
    tmp = from_scratch
    runs = [(f"{s}_resumed", r, [*COMMON, "--ckpt-dir", str(tmp / f"{s}_ckpt"), "--resume"])
            for s, r in RESUMED_WITH.items()]
    with no_leftover_shared_memory():
        return tmp, dict(zip(RESUMED_WITH, _train_runs(tmp, runs)))


def test_zero1_equals_lightning_ddp_over_gloo(from_scratch, gloo_reference):
    assert _relative_difference(gloo_reference, torch.load(from_scratch / "zero1.pt")) < 1e-6


@pytest.mark.parametrize("strategy", ["disttrain_zero2", "disttrain_zero3_sharded"])
def test_zero_checkpoint_resumes_identically(resumed, gloo_reference, strategy):
    tmp, logs = resumed
    ckpt = tmp / f"{strategy}_ckpt_first"
    first = torch.load(tmp / f"{strategy}_first.pt")
    if strategy.endswith("_sharded"):
        # A folder: a manifest (with Lightning's loop and callback state) and one shard file per rank.
        from disttrain.fsdp import read_sharded_checkpoint
        assert (ckpt / "last.ckpt" / "manifest.dts").exists()
        state_dict, extra = read_sharded_checkpoint(ckpt / "last.ckpt")
        assert extra["global_step"] == 6 and extra["epoch"] == 1
        assert _relative_difference(first, state_dict) == 0.0
    else:
        # Full: the gathered model under the plain module's keys, and Adam's state per parameter, shaped
        # like it, as DDP would write it: so DDP resumes from it.
        assert dl.is_snapshot(ckpt / "last.ckpt")
        saved = dl.SnapshotCheckpointIO().load_checkpoint(ckpt / "last.ckpt")
        assert saved["global_step"] == 6 and saved["epoch"] == 1
        assert _relative_difference(first, saved["state_dict"]) == 0.0
        optimizer = saved["optimizer_states"][0]
        assert [optimizer["state"][i]["exp_avg"].shape for i in range(len(first))] == [v.shape for v in first.values()]
    assert "Restored all states" in logs[strategy]
    assert _relative_difference(gloo_reference, torch.load(tmp / f"{strategy}_resumed.pt")) < 1e-6


def test_zero3_memory_options_equal_lightning_ddp_and_resume_identically(resumed, gloo_reference):
    """disttrain_zero3 with activation checkpointing of every unit (one per
    Linear) and lean_backward: trained 2 epochs, checkpointed, resumed for the
    other 2, it ends with the parameters of Lightning's DDP over gloo."""
    tmp, logs = resumed
    assert "Restored all states" in logs["disttrain_zero3_lowmem"]
    assert _relative_difference(gloo_reference, torch.load(tmp / "disttrain_zero3_lowmem_resumed.pt")) < 1e-6


def test_ddp_survives_kill_9_under_torchrun_and_ends_identical(tmp_path, gloo_reference):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1",
                 "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", WORKER, "--strategy", "disttrain_ddp",
                 *COMMON, "--ckpt-dir", str(ckpt), "--resume", "--kill-rank", "1", "--kill-step", "7",
                 "--out", str(tmp_path / "run.pt")], tmp_path)
    log = proc.stdout + proc.stderr
    assert (ckpt / "killed").exists(), "rank 1 was never killed"
    assert "Restored all states" in log
    assert _relative_difference(gloo_reference, torch.load(tmp_path / "run.pt")) < 1e-6


def test_two_nodes_from_the_templates_environment_variables(tmp_path, gloo_reference):
    # Two "nodes" of one process each on this host: MASTER_ADDR, MASTER_PORT, NODE_RANK, num_nodes=2.
    from disttrain._processes import free_port
    env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    cmd = [sys.executable, WORKER, "--strategy", "disttrain_ddp", "--devices", "1", "--num-nodes", "2", *COMMON,
           "--out", str(tmp_path / "run.pt")]
    logs = [open(tmp_path / f"node{n}.log", "w+") for n in (0, 1)]  # files: a full pipe cannot stall a node
    nodes = [subprocess.Popen(cmd, cwd=tmp_path, env={**env, "NODE_RANK": str(n)}, stdout=logs[n],
                              stderr=subprocess.STDOUT) for n in (0, 1)]
    for node in nodes:
        node.wait(timeout=300)
    outputs = [(tmp_path / f"node{n}.log").read_text() for n in (0, 1)]
    for log in logs:
        log.close()
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "Starting with 2 processes" in outputs[0]
    assert _relative_difference(gloo_reference, torch.load(tmp_path / "run.pt")) < 1e-6


def test_manual_optimization_under_disttrain_ddp_equals_automatic_over_gloo(from_scratch, gloo_reference):
    # The worker's manual loop takes the automatic loop's steps by hand (clip, step, scheduler at epoch end).
    assert _relative_difference(gloo_reference, torch.load(from_scratch / "manual.pt")) < 1e-6


def test_zero_with_manual_optimization_is_a_clear_error(tmp_path):
    proc = _train(tmp_path, "x", "disttrain_zero2", "--manual", "--epochs", "1", "--batches", "1", check=False)
    assert proc.returncode != 0
    assert "manual optimization is not supported with ZeRO" in proc.stderr


def test_fabric_strategies_equal_one_process_on_all_the_data(tmp_path):
    _run([sys.executable, FABRIC_WORKER, str(tmp_path)], tmp_path)
    results = torch.load(tmp_path / "results.pt")
    reference = results.pop("reference")
    assert set(results) == {"disttrain_ddp", "disttrain_zero1", "disttrain_zero2", "disttrain_zero3",
                            "disttrain_zero3_lowmem"}
    for strategy, params in results.items():
        assert _relative_difference(reference, params) < 1e-6, strategy
        assert dl.is_snapshot(tmp_path / f"{strategy}.ckpt")


def test_hydra_example_trains_tests_and_writes_the_template_outputs(tmp_path):
    out = tmp_path / "run"
    _run([sys.executable, HYDRA_EXAMPLE, "experiment=digits_ddp", f"hydra.run.dir={out}", "trainer.max_epochs=3",
          "trainer.enable_progress_bar=false"], tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test/acc"] > 0.8, metrics  # an MLP on digits: above 0.9 after 3 epochs
    assert metrics["best_checkpoint"].startswith(str(out / "checkpoints" / "best-"))
    assert dl.is_snapshot(metrics["best_checkpoint"]) and dl.is_snapshot(out / "checkpoints" / "last.ckpt")
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "tensorboard"))


def test_hydra_decentralised_experiment_two_peers(tmp_path):
    """Two Lightning processes, each one peer (strategy disttrain_decentralised), the second
    finding the first from DISTTRAIN_INITIAL_PEERS: both average (rounds with 2 members) and learn."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for i in range(2):
        env = {**_env(), "DISTTRAIN_LISTEN": f"127.0.0.1:{port if i == 0 else 0}", "DISTTRAIN_PEER_SECRET": "t",
               **({"DISTTRAIN_INITIAL_PEERS": f"127.0.0.1:{port}"} if i else {})}
        procs.append(subprocess.Popen(
            [sys.executable, HYDRA_EXAMPLE, "experiment=digits_decentralised", f"hydra.run.dir={tmp_path / str(i)}",
             "trainer.max_epochs=3", "trainer.enable_progress_bar=false", "seed=" + str(42 + i),
             "trainer.strategy.wait_for_peers=1"],  # on a quiet machine one peer would finish before the other starts
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        outputs.append(out + err)
    for i in range(2):
        metrics = json.loads((tmp_path / str(i) / "metrics.json").read_text())
        assert metrics["test/acc"] > 0.8, metrics
        summary = re.search(r"disttrain_decentralised: peer \S+: (\d+) rounds, mean group size ([\d.]+)", outputs[i])
        assert summary and int(summary[1]) >= 5 and float(summary[2]) > 1.5, outputs[i][-2000:]


def test_hydra_override_of_the_wrong_type_is_one_line(tmp_path):
    """trainer.max_epochs=abc: one line and exit 1 before any process starts (was a TypeError deep in
    Lightning's scheduler setup, in each process)."""
    out = tmp_path / "run"
    proc = _run([sys.executable, HYDRA_EXAMPLE, "experiment=digits_ddp", f"hydra.run.dir={out}",
                 "trainer.max_epochs=abc"], tmp_path, timeout=120, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip() == ("train.py: bad setting(s): trainer.max_epochs='abc' (expected a whole number)"), \
        proc.stderr[-3000:]
    assert not (out / "checkpoints").exists()


def test_hydra_resume_with_more_epochs_equals_a_fresh_run(tmp_path):
    """Run again in the same folder with a larger trainer.max_epochs: the cosine schedule is stretched
    to the new length (it kept the checkpoint's T_max and trained the epochs past it at lr 0), so
    1 + 1 resumed epochs end where a fresh 2-epoch run does. One process (Lightning's DDP: the
    DistributedSampler's shuffle is the same for an epoch resumed or not), a tiny MLP."""
    common = [sys.executable, HYDRA_EXAMPLE, "experiment=digits_ddp", "trainer.devices=1", "trainer.strategy=ddp",
              "model.kwargs.hidden=16", "trainer.enable_progress_bar=false"]
    metrics = {}
    for name, epochs in [("fresh", [2]), ("resumed", [1, 2])]:
        for n in epochs:
            _run([*common, f"hydra.run.dir={tmp_path / name}", f"trainer.max_epochs={n}"], tmp_path)
        metrics[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    for key in ("best_val_acc", "test/loss", "test/acc"):
        assert metrics["resumed"][key] == pytest.approx(metrics["fresh"][key], rel=1e-5), (key, metrics)


# --- in-process ---------------------------------------------------------------------------------

class _Custom:
    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return isinstance(other, _Custom) and other.value == self.value


@pytest.mark.parametrize("async_write", [True, False])
def test_checkpoint_io_round_trip(tmp_path, async_write):
    from lightning.fabric.utilities.data import AttributeDict
    io = dl.SnapshotCheckpointIO(async_write=async_write)
    checkpoint = {"state_dict": {"w": torch.randn(3, 4)}, "epoch": 2, "hyper_parameters": AttributeDict(lr=0.1),
                  "callbacks": {"Custom{'x': 1}": {"obj": _Custom(5), "score": torch.tensor(0.5)}},
                  "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 3}}}}}
    path = tmp_path / "a.ckpt"
    io.save_checkpoint(checkpoint, path)
    loaded = io.load_checkpoint(path)  # waits for the background write
    assert dl.is_snapshot(path)
    assert torch.equal(loaded["state_dict"]["w"], checkpoint["state_dict"]["w"])
    assert type(loaded["hyper_parameters"]) is AttributeDict and loaded["hyper_parameters"].lr == 0.1
    assert loaded["callbacks"]["Custom{'x': 1}"]["obj"] == _Custom(5)
    assert loaded["loops"] == checkpoint["loops"]
    with pytest.raises(pickle.UnpicklingError, match="weights_only=True refuses it"):
        io.load_checkpoint(path, weights_only=True)
    io.remove_checkpoint(path)
    assert not path.exists()
    io.teardown()


def test_checkpoint_io_loads_lightning_torch_save_checkpoints(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 1}, tmp_path / "old.ckpt")
    loaded = dl.SnapshotCheckpointIO().load_checkpoint(tmp_path / "old.ckpt", weights_only=True)
    assert loaded["epoch"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.ones(2))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dl.SnapshotCheckpointIO().load_checkpoint(tmp_path / "missing.ckpt")


def test_load_from_checkpoint_reads_a_snapshot_checkpoint(tmp_path):
    """LightningModule.load_from_checkpoint on a checkpoint the disttrain strategies wrote
    was torch.load's 'Weights only load failed ... Unsupported operand 68' (the snapshot's magic)."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    class Tiny(L.LightningModule):
        def __init__(self, width: int = 3, lr: float = 0.1):
            super().__init__()
            self.save_hyperparameters()
            self.layer = torch.nn.Linear(4, width)

        def training_step(self, batch, _):
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    globals()["Tiny"] = Tiny  # load_from_checkpoint instantiates the class
    Tiny.__qualname__ = "Tiny"
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        plugins=[dl.SnapshotCheckpointIO(async_write=False)])
    model = Tiny(width=5, lr=0.05)
    trainer.fit(model, DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    assert dl.is_snapshot(tmp_path / "m.ckpt")
    loaded = Tiny.load_from_checkpoint(tmp_path / "m.ckpt")
    assert loaded.hparams.width == 5 and loaded.hparams.lr == 0.05
    assert torch.equal(loaded.layer.weight, model.layer.weight)
    assert dl.load_checkpoint(str(tmp_path / "m.ckpt"))["hyper_parameters"]["width"] == 5
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": {"width": 5, "lr": 0.05},
                "pytorch-lightning_version": L.__version__}, tmp_path / "t.ckpt")
    assert torch.equal(Tiny.load_from_checkpoint(tmp_path / "t.ckpt").layer.weight, model.layer.weight)


def test_checkpoint_io_reports_a_failed_background_write(tmp_path):
    io = dl.SnapshotCheckpointIO()
    (tmp_path / "dir.ckpt").mkdir()
    with pytest.raises(IsADirectoryError):
        io.save_checkpoint({"x": torch.ones(1)}, tmp_path / "dir.ckpt")
    io.teardown()


def test_strategy_names_are_registered_with_trainer_and_fabric():
    from lightning.fabric.strategies import STRATEGY_REGISTRY
    from lightning.pytorch.strategies import StrategyRegistry
    for name in dl.STRATEGY_NAMES:
        assert name in StrategyRegistry and (name in STRATEGY_REGISTRY or name == "disttrain_decentralised")
    assert isinstance(StrategyRegistry.get("disttrain_decentralised"), dl.DisttrainDecentralisedStrategy)
    assert isinstance(StrategyRegistry.get("disttrain_zero2"), dl.DisttrainZeroStrategy)
    assert StrategyRegistry.get("disttrain_zero2").stage == 2
    assert isinstance(STRATEGY_REGISTRY.get("disttrain_ddp"), dl.DisttrainFabricDDPStrategy)


def test_bad_stage_is_a_clear_error():
    with pytest.raises(ValueError, match="stage must be 1, 2 or 3"):
        dl.DisttrainZeroStrategy(stage=4)
    with pytest.raises(ValueError, match="stage must be 1, 2 or 3"):
        dl.DisttrainFabricZeroStrategy(stage=0)


def _retarget_errors(rank, world_size):
    import disttrain
    from disttrain.lightning import _sharding

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))

    errors = []
    # One unit (the root) whose parameters are in two groups with different hyper-parameters.
    model = build()
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.1}],
                                lr=0.01)
    sharded = disttrain.FullyShardedDataParallel(model, stage=2)
    try:
        _sharding.retarget_optimizers(sharded, [optimizer], names)
    except ValueError as error:
        errors.append(str(error))
    # A unit with a parameter no optimizer steps.
    model = build()
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.01)
    sharded = disttrain.FullyShardedDataParallel(model, stage=3)
    try:
        _sharding.retarget_optimizers(sharded, [optimizer], names)
    except ValueError as error:
        errors.append(str(error))
    # Finer units: each Linear its own unit, so two groups are fine.
    model = build()
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.1}],
                                lr=0.01)
    sharded = disttrain.FullyShardedDataParallel(model, stage=3, auto_wrap={torch.nn.Linear})
    _sharding.retarget_optimizers(sharded, [optimizer], names)
    shards = [len(g["params"]) for g in optimizer.param_groups]
    return errors, shards


def test_zero_optimizer_groups_that_split_a_unit_are_clear_errors():
    for errors, shards in run_ranks(_retarget_errors, 2):
        assert len(errors) == 2
        assert "is split between" in errors[0] and "auto_wrap" in errors[0]
        assert "has parameters no optimizer steps" in errors[1]
        assert shards == [1, 1]


@pytest.mark.parametrize("argv, message", [(["--models", "resnet99"], "unknown model 'resnet99'"),
                                           (["--configs", "ddp_nccl"], "unknown configuration 'ddp_nccl'"),
                                           (["--steps", "0"], "--steps must be at least 1")])
def test_bench_lightning_bad_options_exit_2(argv, message, capsys):
    from disttrain.bench import lightning as bench
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
