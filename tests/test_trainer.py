"""The snapshot trainer in process groups started by the test harness:
SIGTERM saves and resumes exactly, time budget, learning-rate scaling,
metrics.csv, the best model, the CLI with a configuration file and the
CIFAR-10 / image-folder data sets."""

import csv
import json
import math
import os
import pickle
import signal
import warnings

import numpy as np
import pytest
import torch

from harness import run_ranks

from disttrain import data, snapshot
from disttrain.train_metrics import COLUMNS

# The columns of ../shared/data/epoch-logs/runs/*.csv, in their order.
EPOCH_LOG_COLUMNS = (",epoch_timings,test_acc,test_error,test_timings,train_acc,train_loss,config_index,model_name,"
                     "num_of_paramters,num_of_layers,model_type,gpu,is_distributed,distributed_strategy,num_of_nodes,"
                     "num_of_gpus,rank,dataset,num_workers_data_loader,distribute_data,num_epochs,batch_size,"
                     "learning_rate,momentum,weight_decay,gamma,milestones,lr_scheduler,optimizer,criterion").split(",")


def _digits_trainer(folder, name, **overrides):
    from disttrain import Trainer, TrainerConfig, models

    torch.manual_seed(0)
    model = models.small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [1], 0.5)
    config = TrainerConfig(**{"epochs": 2, "batch_size": 32, "save_location": folder, "save_name": name,
                              "progress": False, **overrides})
    return Trainer(model, optimizer, data.digits(True), data.digits(False), config, scheduler=scheduler)


def _train_maybe_sigterm(rank, world_size, folder, name, sigterm_step):
    trainer = _digits_trainer(folder, name)
    if sigterm_step is not None and rank == 1:
        def preempt(*_):
            if trainer.global_step == sigterm_step:
                os.kill(os.getpid(), signal.SIGTERM)
        trainer.module.register_forward_pre_hook(preempt)
    try:
        summary = trainer.fit()
    except SystemExit as e:
        return {"exit": e.code, "step": trainer.global_step}
    # numpy, not tensors: tensors would travel through shared memory that dies with the process.
    return {"exit": 0, "summary": summary, "params": {k: v.numpy().copy() for k, v in trainer.module.state_dict().items()}}


def test_sigterm_saves_then_resume_equals_uninterrupted(tmp_path):
    folder = str(tmp_path)
    stopped = run_ranks(_train_maybe_sigterm, world_size=3, args=(folder, "preempted", 7))
    assert [r["exit"] for r in stopped] == [128 + signal.SIGTERM] * 3
    step = stopped[0]["step"]
    assert all(r["step"] == step for r in stopped) and step >= 7
    assert snapshot.list_snapshots(tmp_path / "preempted" / "snapshots")[-1].endswith(f"{step:09d}.dts")

    resumed = run_ranks(_train_maybe_sigterm, world_size=3, args=(folder, "preempted", None))
    reference = run_ranks(_train_maybe_sigterm, world_size=3, args=(folder, "reference", None))
    assert resumed[0]["summary"]["resumed_from"] is not None
    assert reference[0]["summary"]["resumed_from"] is None
    for name, tensor in reference[0]["params"].items():
        for rank in range(3):
            assert np.array_equal(resumed[rank]["params"][name], tensor), f"{name} on rank {rank}"
    assert resumed[0]["summary"]["best_val_loss"] == reference[0]["summary"]["best_val_loss"]


def _budget_and_lr(rank, world_size, folder):
    trainer = _digits_trainer(folder, "budget", epochs=None, time_budget_hours=BUDGET_SECONDS / 3600,
                              lr_scaling="sqrt")
    lr = trainer.optimizer.param_groups[0]["lr"]
    summary = trainer.fit()
    epoch_seconds = [a + b for a, b in zip(trainer.history["epoch_time"], trainer.history["test_time"])]
    return {"lr": lr, "epochs": summary["epochs"], "summary": summary, "epoch_seconds": epoch_seconds}


BUDGET_SECONDS = 0.6


def test_time_budget_stops_after_an_epoch_and_lr_scales(tmp_path):
    results = run_ranks(_budget_and_lr, world_size=2, args=(str(tmp_path),))
    for r in results:
        assert r["epochs"] >= 1 and r["epochs"] == results[0]["epochs"]
        assert r["lr"] == pytest.approx(0.05 * math.sqrt(2))
    # It stopped because the next epoch (estimated by the slowest of the last three) would not fit.
    summary, seconds = results[0]["summary"], results[0]["epoch_seconds"]
    assert summary["run_time"] + max(seconds[-3:]) > BUDGET_SECONDS
    assert summary["run_time"] - seconds[-1] <= BUDGET_SECONDS
    run = tmp_path / "budget"
    with open(run / "metrics.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == COLUMNS == EPOCH_LOG_COLUMNS
    assert len(rows) == 1 + results[0]["epochs"]
    row = dict(zip(rows[0], rows[1]))
    assert row[""] == "0" and row["num_of_gpus"] == "2" and row["batch_size"] == "32"
    assert row["optimizer"] == "SGD" and row["lr_scheduler"] == "MultiStepLR" and row["milestones"] == "1"
    assert 0.0 <= float(row["test_acc"]) <= 1.0 and float(row["train_loss"]) > 0

    best = snapshot.load(run / "best_model.dts")
    assert best["val_loss"] == results[0]["summary"]["best_val_loss"]
    from disttrain import models
    model = models.small_cnn()
    snapshot.export(run / "best_model.dts", tmp_path / "model.pt", key="model")
    model.load_state_dict(torch.load(tmp_path / "model.pt"))


def _write_fake_cifar(folder):
    rng = np.random.default_rng(0)
    folder = os.path.join(folder, "cifar-10-batches-py")
    os.makedirs(folder)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (12, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, 12).tolist(), b"batch_label": name.encode()}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f)


def _write_fake_image_folder(folder):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog", "owl")):
        os.makedirs(os.path.join(folder, name))
        for i in range(5):
            pixels = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, name, f"{i}.png"))


def test_cifar10_and_image_folder_data_sets(tmp_path):
    _write_fake_cifar(str(tmp_path / "cifar"))
    train, classes, shape = data.get_dataset("cifar10", str(tmp_path / "cifar"), train=True)
    test, _, _ = data.get_dataset("cifar10", str(tmp_path / "cifar"), train=False)
    assert (len(train), len(test), classes, shape) == (60, 12, 10, (3, 32, 32))
    image, label = train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= int(label) < 10
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        data.CIFAR10(str(tmp_path))

    _write_fake_image_folder(str(tmp_path / "images"))
    train, classes, shape = data.get_dataset("imagefolder", str(tmp_path / "images"), train=True, image_size=16)
    test, _, _ = data.get_dataset("imagefolder", str(tmp_path / "images"), train=False, image_size=16)
    assert classes == 3 and shape == (3, 16, 16) and len(train) + len(test) == 15 and len(test) == 3
    assert train.classes == ["cat", "dog", "owl"]
    image, label = train[0]
    assert image.shape == (3, 16, 16) and 0.0 <= image.min() and image.max() <= 1.0
    assert not set(train.samples) & set(test.samples)


def _cli(rank, world_size, argv):
    from disttrain import train_cli

    return train_cli.main(argv)


def test_cli_runs_configuration_file_in_turn(tmp_path):
    _write_fake_cifar(str(tmp_path / "cifar"))
    configs = [{"config_index": 4, "model_name": "mlp", "batch_size": 8, "num_epochs": 1, "learning_rate": 0.01},
               {"config_index": 9, "model_name": "small_cnn", "batch_size": 4, "num_epochs": 2}]
    (tmp_path / "configs.json").write_text(json.dumps(configs))
    argv = ["--dataset", "cifar10", "-d", str(tmp_path / "cifar"), "-c", str(tmp_path / "configs.json"),
            "-s", str(tmp_path / "runs"), "--save-name", "sweep", "--no-progress"]
    assert run_ranks(_cli, world_size=2, args=(argv,), backend=None) == [0, 0]
    for index, epochs, model in ((4, 1, "mlp"), (9, 2, "small_cnn")):
        with open(tmp_path / "runs" / "sweep" / f"config_{index}" / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == epochs
        assert rows[0]["config_index"] == str(index) and rows[0]["model_name"] == model
        assert rows[0]["dataset"] == "cifar10"

    (tmp_path / "bad.json").write_text(json.dumps([{"model_name": "mlp", "colour": "blue"}]))
    from disttrain import train_cli
    assert train_cli.main(["-c", str(tmp_path / "bad.json")]) == 2  # a configuration error: one line, status 2


def _strategy_none_error(rank, world_size, folder):
    try:
        _digits_trainer(folder, "none", strategy="none")
    except ValueError as e:
        return str(e)
    return None


def test_strategy_none_refuses_more_than_one_rank(tmp_path):
    # 'none' is plain non-distributed training (bench scaling's serial baseline): in a job of 2 ranks
    # every rank refuses it by name instead of training two unsynchronised copies.
    errors = run_ranks(_strategy_none_error, world_size=2, args=(str(tmp_path),))
    assert all(e is not None and "strategy 'none'" in e and "has 2" in e for e in errors), errors


def _fit_once(rank, world_size, folder, name, resume, seed, model_name):
    from disttrain import Trainer, TrainerConfig, models

    torch.manual_seed(seed)
    model = models.get_model(model_name, **({"in_features": 64} if model_name == "mlp" else {}))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    config = TrainerConfig(epochs=1, save_location=folder, save_name=name, progress=False, resume=resume,
                           snapshot_every_steps=10, seed=seed)
    try:
        summary = Trainer(model, optimizer, data.digits(True), data.digits(False), config).fit()
    except (ValueError, RuntimeError) as e:  # ResumeError, a ValueError
        return {"error": str(e), "type": type(e).__name__}
    return {"summary": summary}


def test_no_resume_starts_over_and_a_later_resume_continues_that_run(tmp_path):
    # A second run into the same folder with resume=False (--no-resume) kept the first run's snapshots:
    # having the higher steps they outlived keep-last-K (which deleted the new run's instead), and the
    # next resume continued the first run, rewriting metrics.csv with its history.
    folder = str(tmp_path)
    snaps = tmp_path / "again" / "snapshots"
    first = run_ranks(_fit_once, world_size=1, args=(folder, "again", True, 0, "small_cnn"))[0]["summary"]
    assert first["epochs"] == 1
    run_ranks(_fit_once, world_size=1, args=(folder, "again", True, 0, "small_cnn"))  # resumes, done
    (tmp_path / "again" / "snapshots" / "step_000000999.dts").write_bytes(  # a later-numbered stale one
        (snaps / os.path.basename(snapshot.list_snapshots(snaps)[-1])).read_bytes())
    fresh = run_ranks(_fit_once, world_size=1, args=(folder, "again", False, 5, "small_cnn"))[0]["summary"]
    assert fresh["resumed_from"] is None
    assert [os.path.basename(p) for p in snapshot.list_snapshots(snaps)] == \
        ["step_000000030.dts", "step_000000040.dts", "step_000000045.dts"]
    later = run_ranks(_fit_once, world_size=1, args=(folder, "again", True, 5, "small_cnn"))[0]["summary"]
    assert later["resumed_from"].endswith("step_000000045.dts")
    assert later["best_val_loss"] == fresh["best_val_loss"]


def test_resume_into_another_model_is_one_line(tmp_path):
    folder = str(tmp_path)
    run_ranks(_fit_once, world_size=1, args=(folder, "m", True, 0, "small_cnn"))
    error = run_ranks(_fit_once, world_size=1, args=(folder, "m", True, 0, "mlp"))[0]
    assert error["type"] == "ResumeError"
    error = error["error"]
    assert "\n" not in error and "cannot resume from" in error and "step_000000045.dts" in error
    assert "another model" in error and "--no-resume" in error and "'3.weight'" in error


@pytest.mark.parametrize("field, value", [("time_budget_hours", math.nan), ("epochs", 1.5), ("batch_size", 2.5),
                                          ("snapshot_every_steps", -1), ("keep_snapshots", 0), ("num_workers", -1),
                                          ("timeout_seconds", 0)])
def test_trainer_config_refuses_bad_values(field, value):
    # A NaN time budget never ran out (every comparison with NaN is false) and -1 snapshotted every
    # step (n % -1 == 0); 1.5 epochs ran two.
    from disttrain import TrainerConfig

    with pytest.raises(ValueError, match=f"TrainerConfig: {field}"):
        TrainerConfig(**{"epochs": 1, field: value})


def _fit_lr(rank, world_size, folder, name, epochs, lr, momentum, strategy):
    from disttrain import Trainer, TrainerConfig, models

    torch.manual_seed(0)
    model = models.small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    config = TrainerConfig(epochs=epochs, save_location=folder, save_name=name, progress=False, strategy=strategy)
    trainer = Trainer(model, optimizer, data.digits(True), data.digits(False), config)
    trainer.fit()
    return {"lr": trainer.optimizer.param_groups[0]["lr"], "momentum": trainer.optimizer.param_groups[0]["momentum"]}


def test_resume_keeps_and_records_the_snapshots_hyperparameters(tmp_path):
    # The optimizer's load_state_dict brings back the snapshot's learning rate and momentum (as in
    # PyTorch), but metrics.csv recorded the new command's for every epoch, the earlier ones included.
    run_ranks(_fit_lr, world_size=1, args=(str(tmp_path), "hp", 1, 0.05, 0.9, "ddp"))
    after = run_ranks(_fit_lr, world_size=1, args=(str(tmp_path), "hp", 2, 0.5, 0.0, "ddp"))[0]
    assert after == {"lr": 0.05, "momentum": 0.9}
    with open(tmp_path / "hp" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["learning_rate"], r["momentum"]) for r in rows] == [("0.05", "0.9")] * 2


def test_fsdp_resume_on_another_world_size_keeps_the_learning_rate(tmp_path):
    # The sharded optimizer state of 2 ranks does not fit 1: the optimizer starts fresh, with this
    # world size's learning rate already, and was then rescaled once more (0.05 became 0.025).
    run_ranks(_fit_lr, world_size=2, args=(str(tmp_path), "fs", 1, 0.05, 0.9, "fsdp"))
    after = run_ranks(_fit_lr, world_size=1, args=(str(tmp_path), "fs", 2, 0.05, 0.9, "fsdp"))[0]
    assert after["lr"] == pytest.approx(0.05)


def _fsdp_adamw(rank, world_size, folder):
    from disttrain import Trainer, TrainerConfig, models

    torch.manual_seed(0)
    model = models.small_cnn()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.2, amsgrad=True)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [5], 0.5)
    config = TrainerConfig(epochs=1, save_location=folder, save_name="adamw", progress=False, strategy="fsdp",
                           zero_stage=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(model, optimizer, data.digits(True), None, config, scheduler=scheduler)
        trainer.fit()
    group = {k: v for k, v in trainer.optimizer.param_groups[0].items() if k != "params"}
    return type(trainer.optimizer).__name__, group, [str(w.message) for w in caught if "lr_scheduler" in str(w.message)]


def test_fsdp_rebuilds_an_adamw_optimizer_and_its_scheduler_over_the_shards(tmp_path):
    # AdamW's param group holds decoupled_weight_decay, which AdamW.__init__ does not take: rebuilding
    # the optimizer from its group's settings raised TypeError in Trainer(...) with strategy 'fsdp'.
    # The scheduler is pointed at the rebuilt optimizer: its first step warned that optimizer.step()
    # had been overridden after the scheduler was made (the user did no such thing).
    name, group, scheduler_warnings = run_ranks(_fsdp_adamw, world_size=2, args=(str(tmp_path),))[0]
    assert name == "AdamW" and scheduler_warnings == []
    assert group["lr"] == pytest.approx(2e-3) and group["weight_decay"] == 0.2 and group["amsgrad"] is True


def _fit_with(rank, world_size, folder, optimizer_name, strategy):
    from disttrain import Trainer, TrainerConfig, models

    torch.manual_seed(0)
    model = models.small_cnn()
    optimizer = getattr(torch.optim, optimizer_name)(model.parameters(), lr=1e-3)
    config = TrainerConfig(epochs=2 if optimizer_name == "AdamW" else 1, save_location=folder, save_name="opt",
                           progress=False, strategy=strategy)
    try:
        Trainer(model, optimizer, data.digits(True), None, config).fit()
    except Exception as e:
        return type(e).__name__, str(e)
    return None


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_resume_with_another_optimizer_is_one_line(tmp_path, strategy):
    # With fsdp the snapshot's SGD state went into AdamW unchecked: a bare KeyError: 'step' from
    # optimizer.step(). Either strategy now refuses it in one line that names both optimizers.
    assert run_ranks(_fit_with, world_size=2, args=(str(tmp_path), "SGD", strategy)) == [None, None]
    for kind, error in run_ranks(_fit_with, world_size=2, args=(str(tmp_path), "AdamW", strategy)):
        assert kind == "ResumeError" and "\n" not in error, error
        assert "cannot resume from" in error and "SGD" in error and "AdamW" in error and "--no-resume" in error


def _fsdp_uneven_validation(rank, world_size, folder, strategy):
    from torch.utils.data import Subset

    from disttrain import Trainer, TrainerConfig, models

    torch.manual_seed(0)
    model = models.small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    config = TrainerConfig(epochs=1, batch_size=4, save_location=folder, save_name=strategy, progress=False,
                           strategy=strategy, zero_stage=3, timeout_seconds=60)
    # 17 validation samples, 8 a batch: rank 0 gets 9 (two batches), rank 1 gets 8 (one).
    trainer = Trainer(model, optimizer, Subset(data.digits(True), range(40)), Subset(data.digits(False), range(17)),
                      config)
    summary = trainer.fit()
    return summary["best_val_loss"], trainer.history["test_acc"][-1]


def test_fsdp_stage3_validation_with_uneven_batches_per_rank(tmp_path):
    # A stage-3 forward is collective (it gathers each unit): the rank with one validation batch more
    # ran one forward more than the others, a collective mismatch at the end of every first epoch (a
    # crash a restart repeats). Every rank now runs as many forwards; the extra ones do not count.
    sharded = run_ranks(_fsdp_uneven_validation, world_size=2, args=(str(tmp_path), "fsdp"), timeout=120,
                        pg_timeout=60)
    reference = run_ranks(_fsdp_uneven_validation, world_size=2, args=(str(tmp_path), "ddp"), timeout=120)
    assert sharded[0] == sharded[1]
    assert sharded[0][0] == pytest.approx(reference[0][0], rel=1e-5) and sharded[0][1] == reference[0][1]


def test_ddp_resumes_an_fsdp_snapshot_with_a_fresh_optimizer(tmp_path):
    # The fsdp snapshot's optimizer state is every rank's shard state: a ddp resume fed it to the
    # optimizer and refused the run with "(SGD: 'param_groups')". Now the model and progress load and
    # the optimizer starts fresh, as an fsdp resume does with another world size's shard states.
    run_ranks(_fit_lr, world_size=2, args=(str(tmp_path), "swap", 1, 0.05, 0.9, "fsdp"))
    after = run_ranks(_fit_lr, world_size=2, args=(str(tmp_path), "swap", 2, 0.05, 0.9, "ddp"))[0]
    assert after["lr"] == pytest.approx(0.1)
    with open(tmp_path / "swap" / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == 2


def _fit_with_table(rank, world_size, folder, size):
    from torch import nn

    from disttrain import Trainer, TrainerConfig
    from disttrain.trainer import ResumeError

    class Tabled(nn.Module):  # a buffer whose size is a setting (a positional table's length)
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.zeros(size))
            self.linear = nn.Linear(64, 10)

        def forward(self, x):
            return self.linear(x.flatten(1)) + 0 * self.table.sum()

    torch.manual_seed(0)
    model = Tabled()
    config = TrainerConfig(epochs=1, save_location=folder, save_name="tabled", progress=False, strategy="fsdp")
    try:
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), data.digits(True), None, config).fit()
    except ResumeError as e:
        return str(e)
    return None


def test_fsdp_resume_into_a_model_whose_buffer_differs_is_one_line(tmp_path):
    # With fsdp only the parameters' shapes were compared: a buffer of another size got as far as
    # load_state_dict, a multi-line RuntimeError after the parameters had been loaded.
    assert run_ranks(_fit_with_table, world_size=2, args=(str(tmp_path), 5)) == [None, None]
    for error in run_ranks(_fit_with_table, world_size=2, args=(str(tmp_path), 7)):
        assert error is not None and "\n" not in error and "another model" in error and "'table'" in error, error
