"""``disttrain advise --serve``: a one-page web front end (stdlib http.server).

GET / shows the form; its query parameters (model, target_acc, gpus,
deadline_hours) run a recommendation and add the ranked table and the
accuracy-against-hours plot. Everything is rendered on the server.
"""

from __future__ import annotations

from html import escape
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from .errors import AdvisorInputError
from .hardware import DEFAULT_PRICES, device_family, gpu_family
from .recommend import display_table
from .svg_plot import accuracy_vs_hours_svg

# display_table's columns -> the page's headers (units in each; the cost's unit is filled in).
_HEADERS = {"rank": "rank", "gpu": "GPU", "num_of_gpus": "GPUs", "batch_per_gpu": "batch per GPU",
            "data_split_across_gpus": "data split across GPUs", "epochs_to_target": "epochs to target (median curve)",
            "epochs_80pct_sure": "epochs until 80% sure", "s_per_epoch": "seconds per epoch", "hours": "hours",
            "cost": "cost ({currency})", "cost_80pct_range": "cost, 80% range ({currency})",
            "reached_with_80pct_confidence": "target reached with 80% confidence",
            "outside_logs": "inputs outside the logs (time from the physical terms)"}


def _form(query: dict, models) -> str:
    def value(name, default=""):
        return escape(query.get(name, [default])[0])
    options = "".join(f'<option{" selected" if m == value("model", "resnet50") else ""}>{m}</option>' for m in sorted(models))
    return (f'<form method="get" action="/">'
            f'<label>model <select name="model">{options}</select></label> '
            f'<label>target accuracy <input name="target_acc" value="{value("target_acc", "0.75")}" size="5"></label> '
            f'<label>GPUs <input name="gpus" value="{value("gpus")}" placeholder="all, or P40,V100-SXM2"></label> '
            f'<label>deadline (h) <input name="deadline_hours" value="{value("deadline_hours")}" size="5"></label> '
            f'<button type="submit">advise</button></form>')


def _result(advisor, query: dict) -> str:
    model = query["model"][0].strip().lower()
    try:
        target = float(query.get("target_acc", [""])[0])
    except ValueError:
        raise AdvisorInputError("target accuracy must be a number such as 0.75") from None
    # Commas, or spaces between families ('P40 V100-SXM2'); a full name keeps its spaces ('Tesla P40'
    # was split into 'Tesla' and 'P40', an unknown GPU).
    gpus: list[str] = []
    for part in query.get("gpus", [""])[0].split(","):
        words = part.split()
        gpus += words if words and all(gpu_family(w) for w in words) else ([part.strip()] if part.strip() else [])
    families = [device_family(name) for name in gpus]  # one outside the table too: recommend says what it lacks
    deadline_text = query.get("deadline_hours", [""])[0].strip()
    try:
        deadline = float(deadline_text) if deadline_text else None
    except ValueError:
        raise AdvisorInputError("deadline must be a number of hours") from None
    rec = advisor.recommend(model, target, gpus=families or None, deadline_hours=deadline)
    html = [f'<p id="message">{escape(rec.message)}</p>']
    if rec.table.empty:
        return "".join(html)
    shown = display_table(rec, 15)
    currency = rec.units.get("cost", "USD")
    titles = [_HEADERS.get("cost" if c.startswith("cost_") and c != "cost_80pct_range" else c, c).format(currency=currency)
              for c in shown.columns]
    head = "".join(f"<th>{escape(title)}</th>" for title in titles)
    body = []
    for _, row in shown.iterrows():
        cells = "".join(f"<td>{escape(str(value))}</td>" for value in row)
        body.append(f'<tr class="config-row">{cells}</tr>')
    html.append(f'<table id="ranking" border="1" cellspacing="0" cellpadding="3"><thead><tr>{head}</tr></thead>'
                f'<tbody>{"".join(body)}</tbody></table>')
    html.append("<p><small>Epochs to target: where the median predicted curve reaches the target (the dot on the "
                "plot); until 80% sure: the epoch by which 80% of the predicted curves have reached it. Data split "
                "across GPUs: each GPU trains on its share of the data set (a DistributedSampler); "
                "'-' for one GPU. Inputs outside the logs: the GPU family, model, batch size, GPU count or loader "
                "workers the training runs do not cover; there the time per epoch comes from the physical terms "
                "alone (loading, compute, communication) and its interval is wider.</small></p>")
    series = []
    for rank in list(rec.curves)[:5]:
        c = rec.curves[rank]
        row = rec.table.iloc[rank - 1]
        hours = c["epochs"] * c["epoch_time_s"] / 3600
        series.append({"label": f"#{rank} {int(row['num_of_gpus'])}x {row['gpu']} b{int(row['batch_size'])}",
                       "hours": hours, "accuracy": c["accuracy"], "low": c["accuracy_low"], "high": c["accuracy_high"],
                       "reached_hours": c["epochs_to_target"] * c["epoch_time_s"] / 3600})
    html.append(f"<h2>Predicted accuracy against hours (band: 80% interval; dot: the table's epochs to target)</h2>"
                f"{accuracy_vs_hours_svg(series, target)}")
    return "".join(html)


def make_handler(advisor):
    """A request handler class bound to a fitted advisor."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            url = urlparse(self.path)
            if url.path != "/":
                self.send_error(404)
                return
            query = parse_qs(url.query)
            result = ""
            if "model" in query:
                try:
                    result = _result(advisor, query)
                except AdvisorInputError as e:
                    result = f'<p id="error" style="color:#b00">{escape(str(e))}</p>'
            page = (f"<!doctype html><html><head><meta charset='utf-8'><title>disttrain advise</title></head>"
                    f"<body style='font-family:sans-serif'><h1>Training-cost advisor</h1>"
                    f"{_form(query, advisor.known_models)}{result}"
                    f"<p><small>Prices in USD per GPU-hour (illustrative on-demand): {escape(str(DEFAULT_PRICES))}. "
                    f"Training time only (no evaluation passes).</small></p>"
                    f"</body></html>").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, format, *args):  # keep test output quiet
            pass

    return Handler


def serve(host: str = "127.0.0.1", port: int = 8765, data=None, cache: bool = True) -> int:
    """Fits the advisor (or reads it from the cache) and serves the page until interrupted."""
    from .advisor import Advisor

    advisor = Advisor.fit(data, cache=cache)
    try:
        server = ThreadingHTTPServer((host, port), make_handler(advisor))
    except OSError as e:
        raise AdvisorInputError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    print(f"serving on http://{host}:{server.server_address[1]}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
