"""Ranks candidate configurations by predicted cost to reach a target accuracy.

cost = GPUs x hours x price per GPU-hour, hours = epochs to target x time per
epoch (training part; evaluation passes are not counted). Intervals combine
the optimistic ends (fewer epochs: where the upper 80% curve reaches the target;
faster epochs) and the pessimistic ends (the epoch by which 80% of the curve's
draws have reached the target; slower epochs). The table says in words whether
the target is reached with 80% confidence; where it is not, the pessimistic end
is unbounded (null in JSON, "unbounded" or "not reached" in the tables).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .curve_model import epochs_to_target, predict_curves
from .errors import AdvisorInputError
from .hardware import MAX_PRICE, device_family, has_data_sheet

# The logs' recipe: SGD, lr 0.1, step decay at epochs 60 and 80.
RECIPE = {"learning_rate": 0.1, "milestones": "60,80"}


@dataclass
class Recommendation:
    """The ranked table plus a one-line message (empty table when out of reach), and notes:
    what was priced but not ranked, and why."""

    table: pd.DataFrame
    message: str
    out_of_reach: bool = False
    curves: dict = field(default_factory=dict)
    units: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """For --json: the table's rows (an unbounded end is null; ``reached_80pct`` and
        ``p_reach`` say whether the target is reached with 80% confidence), and the unit of each column."""
        return {"message": self.message, "out_of_reach": self.out_of_reach, "notes": self.notes, "units": self.units,
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
    try:
        target_acc = float(target_acc)
    except (TypeError, ValueError):
        raise AdvisorInputError(f"target accuracy {target_acc!r} is not a number") from None
    # Numbers given as strings ('2') are taken, as a target '0.7' is; anything else is one line (a
    # deadline '2h', a price None or a max_epochs 'ten' were TypeErrors from a comparison).
    try:
        deadline_hours = None if deadline_hours is None else float(deadline_hours)
        prices = {family: float(price) for family, price in prices.items()}
        max_epochs = int(max_epochs)
    except (TypeError, ValueError, OverflowError):
        raise AdvisorInputError(f"deadline_hours {deadline_hours!r}, max_epochs {max_epochs!r} and every price "
                                f"must be numbers (prices: {prices!r})") from None
    if not 0 < target_acc <= advisor.max_acc:
        raise AdvisorInputError(f"target accuracy {target_acc} is outside (0, {advisor.max_acc:.4f}], "
                                f"the best accuracy in the training logs")
    # The web page and the API took these unchecked: a deadline of -1 h or NaN h ranked nothing
    # ("no configuration reaches ... within the deadline of nan h"), a negative price a negative cost.
    if deadline_hours is not None and not deadline_hours > 0:
        raise AdvisorInputError(f"deadline of {deadline_hours} h: give a positive number of hours")
    if max_epochs < 1:
        raise AdvisorInputError(f"max_epochs {max_epochs}: give at least 1")
    for family, price in prices.items():
        if not 0 < price <= MAX_PRICE:
            raise AdvisorInputError(f"price {price} for GPU '{family}' is not a positive number up to {MAX_PRICE:g}")
    if isinstance(gpus, str):
        gpus = [gpus]
    # A GPU named twice (or by a family and a full name of it) is one candidate, not two equal rows.
    families = (list(dict.fromkeys(device_family(g) or g for g in gpus)) if gpus
                else sorted(set(prices) & set(advisor.known_families)))
    # A priced type that is not ranked is said, not dropped in silence (a typo, 'P1OO', read as a
    # device of its own; a data-sheet family without runs, ranked only when named).
    notes = [] if gpus else [
        f"'{family}' is priced but has no runs" + (f": name it in gpus (--gpus {family}) to rank it from its data sheet"
                                                  if has_data_sheet(family) else
                                                  " and no data sheet (a typo? give its runs with --data): not ranked")
        for family in prices if family not in advisor.known_families]
    for family in families:
        # A family without logs is priced from its data-sheet speed, flagged in the table (CPU has none).
        if family not in advisor.known_families and not has_data_sheet(family):
            raise AdvisorInputError(f"no epoch logs for GPU '{family}' (known: {', '.join(sorted(advisor.known_families))})")
        if family not in prices:
            raise AdvisorInputError(f"no price for GPU '{family}': add it to the price file")
    if not families:
        raise AdvisorInputError("no GPU type has both epoch logs and a price" + (f" ({'; '.join(notes)})" if notes else ""))
    grid = candidates(model_name, families, gpu_counts, batch_sizes, max_epochs)
    if grid.empty:  # was "configuration lacks column(s) model_name, gpu, batch_size (have: )"
        raise AdvisorInputError(f"no candidates: gpu_counts {tuple(gpu_counts)!r} and batch_sizes "
                                f"{tuple(batch_sizes)!r} need at least one value each")
    configs = advisor.normalize(grid)
    unlogged = advisor.regime_unlogged(configs)  # the CPU: only in the regimes its runs were in
    if unlogged.all():
        raise AdvisorInputError(f"no candidates: {', '.join(sorted(set(configs['gpu_family'])))} has no runs with "
                                f"gpu_counts {tuple(gpu_counts)!r} (one process, or several): add such runs with --data")
    configs = configs[~unlogged].reset_index(drop=True)
    times = advisor.predict(configs)
    epochs = np.arange(1, max_epochs + 1)
    center, low, high, reached = predict_curves(advisor.curve_model, configs, epochs, target=target_acc)
    table = configs[["gpu_family", "num_of_gpus", "batch_size", "distribute_data"]].rename(
        columns={"gpu_family": "gpu"}).copy()
    table["epochs"] = [epochs_to_target(c, epochs, target_acc) for c in center]
    table["epochs_low"] = [epochs_to_target(c, epochs, target_acc) for c in high]
    # In plain words: the share of the curve's draws (see predict_curves) that reach the target
    # within max_epochs, whether that is at least 80%, and by which epoch 80% of them have: the
    # pessimistic end (never earlier than the median curve's epoch), unbounded when they do not.
    table["p_reach"] = reached[:, -1]
    table["reached_80pct"] = table["p_reach"] >= CONFIDENCE
    sure = np.array([float(epochs[np.argmax(r >= CONFIDENCE)]) if r[-1] >= CONFIDENCE else np.inf for r in reached])
    table["epochs_high"] = np.maximum(sure, table["epochs"].to_numpy())
    table = pd.concat([table, times], axis=1)
    price = table["gpu"].map(prices) * table["num_of_gpus"]
    table["hours"] = table["epochs"] * table["epoch_time_s"] / 3600
    table["hours_low"] = table["epochs_low"] * table["epoch_time_s_low"] / 3600
    table["hours_high"] = table["epochs_high"] * table["epoch_time_s_high"] / 3600
    table["cost"] = table["hours"] * price
    table["cost_low"] = table["hours_low"] * price
    table["cost_high"] = table["hours_high"] * price
    table["final_accuracy"] = center[:, -1]
    curves = {i: {"epochs": epochs, "accuracy": center[i], "accuracy_low": low[i], "accuracy_high": high[i],
                  "epoch_time_s": table.loc[i, "epoch_time_s"], "epochs_to_target": table.loc[i, "epochs"]}
              for i in table.index}
    reachable = table[np.isfinite(table["epochs"])]
    if reachable.empty:
        best = table["final_accuracy"].idxmax()
        return Recommendation(table.iloc[:0], (
            f"target {target_acc:.3f} is out of reach for {model_name} within {max_epochs} epochs: the best predicted "
            f"accuracy is {table.loc[best, 'final_accuracy']:.3f} ({table.loc[best, 'num_of_gpus']}x "
            f"{table.loc[best, 'gpu']}, batch {table.loc[best, 'batch_size']})"), True, curves, notes=notes)
    if deadline_hours is not None:
        in_time = reachable[reachable["hours"] <= deadline_hours]
        if in_time.empty:
            fastest = reachable["hours"].min()
            return Recommendation(reachable.iloc[:0], (
                f"no configuration reaches {target_acc:.3f} within the deadline of {deadline_hours:g} h: "
                f"the fastest needs {fastest:.2f} h"), True, curves, notes=notes)
        reachable = in_time
    ranked = reachable.sort_values(["cost", "hours"]).reset_index(drop=True)
    ranked.insert(0, "rank", np.arange(1, len(ranked) + 1))
    keep = {i: curves[i] for i in reachable.index}
    first = ranked.iloc[0]
    currency = currency_of(prices)
    message = (f"cheapest: {int(first['num_of_gpus'])}x {first['gpu']}, batch {int(first['batch_size'])}: "
               f"{first['epochs']:.0f} epochs, {first['hours']:.2f} h, cost {first['cost']:.2f} {currency} "
               f"(80% range {cost_range(first)}); {reach_words(first)}")
    return Recommendation(ranked, message, False, {r: keep[i] for r, i in zip(ranked["rank"], reachable.sort_values(["cost", "hours"]).index)},
                          units={**UNITS, "cost": currency, "cost_low": currency, "cost_high": currency}, notes=notes)


CONFIDENCE = 0.8
UNITS = {"epochs": "epochs", "epochs_low": "epochs", "epochs_high": "epochs",
         "epoch_time_s": "s", "epoch_time_s_low": "s", "epoch_time_s_high": "s",
         "hours": "h", "hours_low": "h", "hours_high": "h", "p_reach": "fraction of predicted curves",
         "load_s": "s", "compute_s": "s", "comm_s": "s"}


def currency_of(prices: dict) -> str:
    """The cost unit: USD at the default (illustrative) prices, else the price file's own."""
    from .hardware import DEFAULT_PRICES

    return "USD" if prices == DEFAULT_PRICES else "price units"


def cost_range(row) -> str:
    """The cost's 80% range in words: 'low to high', or 'low to unbounded' when the pessimistic
    curve never reaches the target."""
    high = f"{row['cost_high']:.2f}" if np.isfinite(row["cost_high"]) else "unbounded"
    return f"{row['cost_low']:.2f} to {high}"


def reach_words(row) -> str:
    """Whether the target is reached with 80% confidence, in words."""
    if row["reached_80pct"]:
        return f"target reached with 80% confidence (by epoch {row['epochs_high']:.0f})"
    return f"target not reached with 80% confidence ({100 * row['p_reach']:.0f}% of predicted curves reach it)"


def display_table(rec: "Recommendation", top: int | None = None) -> pd.DataFrame:
    """The ranked table as a person reads it: units in the headers, no 'inf', the data split
    and the confidence in words. Used by the command line and the web page."""
    table = rec.table if top is None else rec.table.head(top)
    currency = rec.units.get("cost", "USD")
    split = np.where(table["num_of_gpus"] == 1, "-", np.where(table["distribute_data"], "yes", "no"))
    return pd.DataFrame({
        "rank": table["rank"].astype(int),
        "gpu": table["gpu"],
        "num_of_gpus": table["num_of_gpus"].astype(int),
        "batch_per_gpu": table["batch_size"].astype(int),
        "data_split_across_gpus": split,
        "epochs_to_target": table["epochs"].map(lambda v: f"{v:.0f}"),
        "epochs_80pct_sure": table["epochs_high"].map(lambda v: f"{v:.0f}" if np.isfinite(v) else "not reached"),
        "s_per_epoch": table["epoch_time_s"].map(lambda v: f"{v:.1f}"),
        "hours": table["hours"].map(lambda v: f"{v:.2f}"),
        f"cost_{currency.replace(' ', '_')}": table["cost"].map(lambda v: f"{v:.2f}"),
        "cost_80pct_range": [cost_range(row) for _, row in table.iterrows()],
        "reached_with_80pct_confidence": [("yes" if row["reached_80pct"] else f"no ({100 * row['p_reach']:.0f}%)")
                                          for _, row in table.iterrows()],
        # Inputs outside what the training runs cover: the time there is the physical terms alone.
        "outside_logs": table["outside_logs"].replace("", "-") if "outside_logs" in table else "-",
    })
