"""The advisor's Python API: loading, time and accuracy predictions, recommendations."""

import numpy as np
import pandas as pd
import pytest

from disttrain.advisor import Advisor, AdvisorInputError, load_epochs
from disttrain.advisor.loading import default_data_path


@pytest.fixture(scope="module")
def advisor():
    return Advisor.fit(cache=True)  # the session's fit cache (tests/conftest.py): fitted once per session


def test_loading_folds_ranks_into_runs():
    epochs = load_epochs()
    # A distributed run's ranks share one row per epoch; 30 or 100 epochs per run.
    assert not epochs.duplicated(["run_id", "epoch"]).any()
    sizes = epochs.groupby("run_id").size()
    assert set(sizes.unique()) <= {30, 100}
    assert epochs["gpu_family"].notna().all()


def test_predict_returns_ordered_intervals(advisor):
    configs = pd.DataFrame([
        {"model_name": "resnet18", "gpu": "Tesla P40", "num_of_gpus": 1, "batch_size": 128},
        {"model_name": "resnet101", "gpu": "Tesla V100-SXM2-32GB", "num_of_gpus": 4, "batch_size": 512,
         "distribute_data": True},
    ], index=[7, 9])
    pred = advisor.predict(configs)
    assert list(pred.columns) == ["epoch_time_s", "epoch_time_s_low", "epoch_time_s_high"]
    assert list(pred.index) == [7, 9]
    assert (pred["epoch_time_s_low"] < pred["epoch_time_s"]).all()
    assert (pred["epoch_time_s"] < pred["epoch_time_s_high"]).all()
    # ResNet-18 on a P40 with batch 128 took 13 s per epoch in the logs.
    assert 6 < pred.loc[7, "epoch_time_s"] < 30


def test_time_interval_widens_for_a_gpu_family_or_model_not_trained_on():
    from disttrain.advisor.loading import runs_table
    from disttrain.advisor.time_model import EpochTimeModel
    runs = runs_table(load_epochs())
    held_out = (runs["gpu_family"] == "V100-SXM2") | (runs["model_name"] == "resnet50")
    model = EpochTimeModel().fit(runs[~held_out])
    seen = runs[~held_out].head(5)
    for new in (runs[runs["gpu_family"] == "V100-SXM2"].head(5), runs[runs["model_name"] == "resnet50"].head(5)):
        pred, base = model.predict(new), model.predict(seen)
        ratio = (pred["epoch_time_s_high"] / pred["epoch_time_s_low"]).to_numpy()
        # Leaving each trained family (model) out in turn gives a wider interval than leaving a configuration out.
        assert (ratio > 1.1 * (base["epoch_time_s_high"] / base["epoch_time_s_low"]).max()).all()
        assert (pred["epoch_time_s_low"] < pred["epoch_time_s"]).all()


def test_sharding_shortens_the_epoch(advisor):
    base = {"model_name": "resnet50", "gpu": "V100-PCIE", "num_of_gpus": 4, "batch_size": 128}
    pred = advisor.predict(pd.DataFrame([{**base, "distribute_data": False}, {**base, "distribute_data": True}]))
    assert pred["epoch_time_s"].iloc[1] < pred["epoch_time_s"].iloc[0]


def test_accuracy_curve_rises_and_conditioning_narrows(advisor):
    config = {"model_name": "resnet18", "gpu": "P40", "num_of_gpus": 1, "batch_size": 128}
    prior = advisor.accuracy_curve(config, 50)
    assert list(prior["epoch"]) == list(range(1, 51))
    assert prior["accuracy"].iloc[-1] > prior["accuracy"].iloc[0] + 0.2
    assert (prior["accuracy_low"] <= prior["accuracy"] + 1e-9).all()
    assert (prior["accuracy"] <= prior["accuracy_high"] + 1e-9).all()
    observed = load_epochs().query("config_id == 'cfg13' and gpu_family == 'P40'")["test_acc"].to_numpy()
    posterior = advisor.accuracy_curve(config, 50, observed=observed[:15])
    width = lambda c: (c["accuracy_high"] - c["accuracy_low"]).iloc[20:].mean()  # noqa: E731
    assert width(posterior) < width(prior)
    # Conditioned on 15 epochs, epoch 30 is predicted within 0.05 of what the run did.
    assert abs(posterior["accuracy"].iloc[29] - observed[29]) < 0.05


def test_accuracy_is_the_curve_moved_by_the_hybrid_then_averaged_with_the_row_model(advisor):
    import copy

    from disttrain.advisor.curve_model import curve

    model = advisor.curve_model
    assert model.residual_weight_ in (0.0, 0.25, 0.5, 0.75, 1.0)
    config = {"model_name": "resnet50", "gpu": "V100-PCIE", "num_of_gpus": 2, "batch_size": 128}
    predicted = advisor.accuracy_curve(config, 100)
    frame = advisor.normalize(pd.DataFrame([config]))
    frame.loc[0, "milestones"], frame.loc[0, "num_epochs"] = "60,80", 101
    epochs = np.arange(1, 101, dtype=float)
    params = model.predict_params(frame)
    plain = curve(params[0], epochs, 60.0)
    expected = np.clip(plain + model.correction(frame, params, [epochs]), 0, 1)
    np.testing.assert_allclose(predicted["accuracy"], expected, atol=1e-9)
    np.testing.assert_allclose(model.predict_accuracy(frame, [epochs])[0], expected, atol=1e-9)
    # The ensemble: half the (hybrid) curve, half the row model.
    curve_only = copy.copy(model)
    curve_only.rows_ = None
    hybrid = plain + curve_only.correction(frame, params, [epochs])
    rows = model.rows_.predict_accuracy(model.rows_.complete(frame.loc[[0] * 100].assign(epoch=epochs - 1)))
    np.testing.assert_allclose(expected, np.clip(0.5 * hybrid + 0.5 * rows, 0, 1), atol=1e-9)
    # A model the row model never saw: the (hybrid) curve alone.
    unseen = advisor.normalize(pd.DataFrame([{**config, "model_name": "resnet152", "num_of_paramters": 58e6}]))
    unseen_params = model.predict_params(unseen)
    np.testing.assert_allclose(model.correction(unseen, unseen_params, [epochs]),
                               curve_only.correction(unseen, unseen_params, [epochs]), atol=1e-12)
    if model.residual_ is None:
        assert model.residual_weight_ == 0
        np.testing.assert_allclose(hybrid, plain)
    assert ((predicted["accuracy_low"] <= predicted["accuracy"] + 1e-9)
            & (predicted["accuracy"] <= predicted["accuracy_high"] + 1e-9)).all()


def test_row_model_reads_a_configuration_as_the_logs_rows(advisor):
    rows = advisor.curve_model.rows_
    frame = advisor.normalize(pd.DataFrame([
        {"model_name": "resnet18", "gpu": "P40", "batch_size": 128, "num_of_gpus": 1},
        {"model_name": "resnet18", "gpu": "Tesla V100-PCIE-32GB", "batch_size": 128, "num_of_gpus": 2},
    ]))
    done = rows.complete(frame)
    # A family becomes its logged name; the parameter count is the one the
    # logs' runs of that model and regime carry (1000-class single, 10-class DDP).
    assert list(done["gpu"]) == ["Tesla P40", "Tesla V100-PCIE-32GB"]
    raw_counts = pd.concat(pd.read_csv(f, usecols=["num_of_paramters", "is_distributed"])
                           for f in default_data_path().rglob("resnet18_*.csv"))
    single = raw_counts.loc[~raw_counts["is_distributed"].astype(bool), "num_of_paramters"].mode().iloc[0]
    ddp = raw_counts.loc[raw_counts["is_distributed"].astype(bool), "num_of_paramters"].mode().iloc[0]
    assert single != ddp and list(done["num_of_paramters"]) == [single, ddp]


def test_recipe_environment_factor(advisor):
    model = advisor.time_model
    base = {"model_name": "resnet18", "gpu": "P40", "num_of_gpus": 1, "batch_size": 128}
    configs = advisor.normalize(pd.DataFrame([{**base, "learning_rate": lr} for lr in (0.1, 0.01, 0.05)]))
    times = model.predict(configs)["epoch_time_s"].to_numpy()
    # The logs' lr-0.01 runs ran slower (their own test passes too); a recipe
    # not in the logs is predicted for the reference (most common) recipe.
    assert model.core_[3] == [0.01]
    assert times[1] > 1.05 * times[0]
    assert times[2] == pytest.approx(times[0])


def test_recommend_ranks_by_cost_and_respects_the_deadline(advisor):
    rec = advisor.recommend("resnet34", 0.7)
    table = rec.table
    assert not rec.out_of_reach and len(table) > 5
    assert (np.diff(table["cost"].to_numpy()) >= 0).all()
    assert np.allclose(table["cost"], table["hours"] * table["num_of_gpus"] * table["gpu"].map(
        {"P40": 1.00, "P100": 1.46, "V100-PCIE": 2.48, "V100-SXM2": 3.06}))
    assert (table["cost_low"] <= table["cost"]).all() and (table["cost"] <= table["cost_high"]).all()
    deadline = float(table["hours"].median())
    fast = advisor.recommend("resnet34", 0.7, deadline_hours=deadline).table
    assert (fast["hours"] <= deadline).all() and len(fast) < len(table)


def test_price_table_changes_the_winner(advisor):
    cheap_v100 = {"P40": 10.0, "P100": 10.0, "V100-PCIE": 10.0, "V100-SXM2": 0.1}
    assert advisor.recommend("resnet18", 0.7, prices=cheap_v100).table["gpu"].iloc[0] == "V100-SXM2"


def test_unreachable_and_bad_inputs(advisor):
    rec = advisor.recommend("resnet101", 0.8, max_epochs=5)
    assert rec.out_of_reach and rec.table.empty and "out of reach" in rec.message
    with pytest.raises(AdvisorInputError, match="best accuracy"):
        advisor.recommend("resnet50", 0.99)
    with pytest.raises(AdvisorInputError, match="unknown model"):
        advisor.recommend("vgg16", 0.7)
    with pytest.raises(AdvisorInputError, match="GPU"):
        advisor.predict(pd.DataFrame([{"model_name": "resnet18", "gpu": "Radeon 7", "batch_size": 32}]))
    with pytest.raises(AdvisorInputError, match="no epoch logs"):
        advisor.recommend("resnet50", 0.7, gpus=["A100"], prices={"A100": 3.0})


def test_save_load_round_trip(advisor, tmp_path):
    path = tmp_path / "advisor.pkl"
    advisor.save(path)
    again = Advisor.load(path)
    configs = pd.DataFrame([{"model_name": "resnet50", "gpu": "P100", "batch_size": 32}])
    pd.testing.assert_frame_equal(advisor.predict(configs), again.predict(configs))
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(AdvisorInputError):
        Advisor.load(tmp_path / "junk.pkl")


def test_trainer_csvs_become_training_data(tmp_path):
    # The trainer's CSVs: an 'epoch' column, configuration columns, no optional extras.
    rng = np.random.default_rng(0)
    for run, (model, gpu, gpus, batch) in enumerate([("resnet18", "Tesla P40", 1, 128), ("resnet18", "Tesla P40", 2, 128),
                                                      ("resnet34", "Tesla V100-SXM2-16GB", 1, 64),
                                                      ("resnet50", "Tesla P100-PCIE-16GB", 1, 32)]):
        k = np.arange(12)
        pd.DataFrame({"epoch": k, "epoch_timings": 10.0 * gpus + rng.normal(0, 0.1, 12),
                      "test_acc": 0.8 - 0.5 / (1 + 0.5 * k), "model_name": model, "gpu": gpu,
                      "num_of_gpus": gpus, "batch_size": batch}).to_csv(tmp_path / f"run{run}.csv", index=False)
    epochs = load_epochs(tmp_path)
    assert epochs["run_id"].nunique() == 4 and len(epochs) == 48
    fitted = Advisor.fit(tmp_path)
    assert fitted.predict(pd.DataFrame([{"model_name": "resnet18", "gpu": "P40", "batch_size": 128}]))["epoch_time_s"].iloc[0] > 0


def test_malformed_csv_and_missing_data(tmp_path, monkeypatch):
    (tmp_path / "bad.csv").write_text("epoch,model_name\n0,resnet18\n")
    with pytest.raises(AdvisorInputError, match="lacks column"):
        load_epochs(tmp_path / "bad.csv")
    (tmp_path / "neg.csv").write_text("epoch,epoch_timings,model_name,gpu,batch_size\n0,-1,resnet18,P40,32\n")
    with pytest.raises(AdvisorInputError, match="non-positive"):
        load_epochs(tmp_path / "neg.csv")
    monkeypatch.setenv("DISTTRAIN_EPOCH_LOGS", str(tmp_path / "nowhere"))
    with pytest.raises(AdvisorInputError, match="DISTTRAIN_EPOCH_LOGS"):
        default_data_path()
