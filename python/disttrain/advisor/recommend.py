"""Ranks candidate configurations by predicted cost to reach a target accuracy.

cost = GPUs x hours x price per GPU-hour, hours = epochs to target x time per
epoch (training part; evaluation passes are not counted). Intervals combine
the optimistic ends (fewer epochs, faster epochs) and the pessimistic ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .curve_model import epochs_to_target, predict_curves
from .errors import AdvisorInputError

# The logs' recipe: SGD, lr 0.1, step decay at epochs 60 and 80.
RECIPE = {"learning_rate": 0.1, "milestones": "60,80"}


@dataclass
class Recommendation:
    """The ranked table plus a one-line message (empty table when out of reach)."""

    table: pd.DataFrame
    message: str
    out_of_reach: bool = False
    curves: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"message": self.message, "out_of_reach": self.out_of_reach,
                "configurations": self.table.replace([np.inf, -np.inf], None).to_dict(orient="records")}


def candidates(model_name: str, families, gpu_counts, batch_sizes, max_epochs: int) -> pd.DataFrame:
    """Every configuration worth pricing: GPU family x count x batch x sharding."""
    rows = []
    for family in families:
        for gpus in gpu_counts:
            for batch in batch_sizes:
                for sharded in ([True] if gpus == 1 else [True, False]):
                    rows.append({"model_name": model_name, "gpu": family, "num_of_gpus": gpus,
                                 "batch_size": batch, "distribute_data": sharded,
                                 "is_distributed": gpus > 1, "num_epochs": max_epochs,
                                 "num_workers_data_loader": 16 if gpus > 1 else 4, **RECIPE})
    return pd.DataFrame(rows)


def rank(advisor, model_name: str, target_acc: float, prices: dict, gpus=None, deadline_hours=None,
         gpu_counts=(1, 2, 3, 4), batch_sizes=(32, 128, 512), max_epochs: int = 100) -> Recommendation:
    """See Advisor.recommend."""
    if model_name not in advisor.known_models:
        raise AdvisorInputError(f"unknown model '{model_name}' (known: {', '.join(sorted(advisor.known_models))})")
    if not 0 < target_acc <= advisor.max_acc:
        raise AdvisorInputError(f"target accuracy {target_acc} is outside (0, {advisor.max_acc:.4f}], "
                                f"the best accuracy in the training logs")
    families = list(gpus) if gpus else sorted(set(prices) & set(advisor.known_families))
    for family in families:
        if family not in advisor.known_families:
            raise AdvisorInputError(f"no epoch logs for GPU '{family}' (known: {', '.join(sorted(advisor.known_families))})")
        if family not in prices:
            raise AdvisorInputError(f"no price for GPU '{family}': add it to the price file")
    if not families:
        raise AdvisorInputError("no GPU type has both epoch logs and a price")
    configs = advisor.normalize(candidates(model_name, families, gpu_counts, batch_sizes, max_epochs))
    times = advisor.predict(configs)
    epochs = np.arange(1, max_epochs + 1)
    center, low, high = predict_curves(advisor.curve_model, configs, epochs)
    table = configs[["gpu_family", "num_of_gpus", "batch_size", "distribute_data"]].rename(
        columns={"gpu_family": "gpu"}).copy()
    table["epochs"] = [epochs_to_target(c, epochs, target_acc) for c in center]
    table["epochs_low"] = [epochs_to_target(c, epochs, target_acc) for c in high]
    table["epochs_high"] = [epochs_to_target(c, epochs, target_acc) for c in low]
    table = pd.concat([table, times], axis=1)
    price = table["gpu"].map(prices) * table["num_of_gpus"]
    table["hours"] = table["epochs"] * table["epoch_time_s"] / 3600
    table["hours_low"] = table["epochs_low"] * table["epoch_time_s_low"] / 3600
    table["hours_high"] = table["epochs_high"] * table["epoch_time_s_high"] / 3600
    table["cost"] = table["hours"] * price
    table["cost_low"] = table["hours_low"] * price
    table["cost_high"] = table["hours_high"] * price
    table["final_accuracy"] = center[:, -1]
    curves = {i: (epochs, center[i], table.loc[i, "epoch_time_s"]) for i in table.index}
    reachable = table[np.isfinite(table["epochs"])]
    if reachable.empty:
        best = table["final_accuracy"].idxmax()
        return Recommendation(table.iloc[:0], (
            f"target {target_acc:.3f} is out of reach for {model_name} within {max_epochs} epochs: the best predicted "
            f"accuracy is {table.loc[best, 'final_accuracy']:.3f} ({table.loc[best, 'num_of_gpus']}x "
            f"{table.loc[best, 'gpu']}, batch {table.loc[best, 'batch_size']})"), True, curves)
    if deadline_hours is not None:
        in_time = reachable[reachable["hours"] <= deadline_hours]
        if in_time.empty:
            fastest = reachable["hours"].min()
            return Recommendation(reachable.iloc[:0], (
                f"no configuration reaches {target_acc:.3f} within the deadline of {deadline_hours:g} h: "
                f"the fastest needs {fastest:.2f} h"), True, curves)
        reachable = in_time
    ranked = reachable.sort_values(["cost", "hours"]).reset_index(drop=True)
    ranked.insert(0, "rank", np.arange(1, len(ranked) + 1))
    keep = {i: curves[i] for i in reachable.index}
    first = ranked.iloc[0]
    message = (f"cheapest: {int(first['num_of_gpus'])}x {first['gpu']}, batch {int(first['batch_size'])}: "
               f"{first['epochs']:.0f} epochs, {first['hours']:.2f} h, cost {first['cost']:.2f} "
               f"[{first['cost_low']:.2f}, {first['cost_high']:.2f}]")
    return Recommendation(ranked, message, False, {r: keep[i] for r, i in zip(ranked["rank"], reachable.sort_values(["cost", "hours"]).index)})
