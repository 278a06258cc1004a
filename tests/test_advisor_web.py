"""The advisor's web page, rendered by a real headless browser (Debian's chromium)."""

import shutil
import socket
import subprocess
import tempfile
import threading
from http.server import ThreadingHTTPServer

import pytest

from disttrain.advisor import Advisor
from disttrain.advisor.server import make_handler


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("no chromium on PATH: run scripts/setup.sh (apt-get install chromium)")


@pytest.fixture(scope="module")
def base_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(Advisor.fit(cache=True)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def dump_dom(url: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                              f"--user-data-dir={profile}", "--dump-dom", url],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_submitted_query_renders_ranked_rows_and_plot(base_url):
    dom = dump_dom(base_url + "?model=resnet50&target_acc=0.75&gpus=P40,V100-SXM2")
    assert '<table id="ranking"' in dom
    rows = dom.split('<tr class="config-row">')[1:]
    assert len(rows) >= 5
    assert all(("<td>P40</td>" in r) or ("<td>V100-SXM2</td>" in r) for r in rows)
    assert rows[0].startswith("<td>1</td>")
    assert 'id="accuracy-plot"' in dom and dom.count('class="curve"') >= 3
    # Each curve with its 80% band and a dot where the table says it reaches the target.
    assert dom.count('class="band"') == dom.count('class="curve"') and 'class="reached"' in dom
    # Units in the headers, the data split and the confidence in words, no infinity.
    head = dom.split("<thead>")[1].split("</thead>")[0]
    assert "cost (USD)" in head and "seconds per epoch" in head and "data split across GPUs" in head
    assert "target reached with 80% confidence" in head
    assert ">inf<" not in dom and ">True<" not in dom
    cells = [r.split("</tr>")[0].split("<td>")[1:] for r in rows]
    assert all(c[-2].startswith(("yes", "no (")) for c in cells)
    # The out-of-range flag (issue 21): these GPUs, batch sizes, counts and workers are all in the logs.
    assert "inputs outside the logs" in head and all(c[-1].startswith("-<") for c in cells)
    assert 'value="0.75"' in dom  # the form keeps the query


def test_empty_form_and_bad_input(base_url):
    dom = dump_dom(base_url)
    assert "<form" in dom and 'id="ranking"' not in dom
    bad = dump_dom(base_url + "?model=resnet50&target_acc=2")
    assert 'id="error"' in bad and "target accuracy" in bad


def test_query_edge_cases_are_one_error_line(base_url):
    # Read with urllib (no browser): what the server sends. A full GPU name in the field was split
    # at its space ('Tesla P40' -> unknown GPU 'Tesla'); a deadline of -1 or NaN hours ranked nothing
    # ("within the deadline of nan h") instead of saying it is not a number of hours.
    import urllib.parse
    import urllib.request

    def page(**query):
        with urllib.request.urlopen(base_url + "?" + urllib.parse.urlencode(query), timeout=120) as r:
            return r.read().decode()
    for gpus in ("Tesla P40", "P40 V100-SXM2", "P40, Tesla V100-SXM2-16GB"):
        body = page(model="resnet50", target_acc="0.7", gpus=gpus)
        assert 'id="ranking"' in body and 'id="error"' not in body, gpus
    for deadline in ("-1", "nan", "0"):
        body = page(model="resnet50", target_acc="0.7", deadline_hours=deadline)
        assert 'id="error"' in body and "positive number of hours" in body, deadline
    body = page(model='"><script>alert(1)</script>', target_acc="0.7", gpus="<b>")
    assert "<script>" not in body and "<b>" not in body and "unknown model &#x27;&quot;&gt;&lt;script&gt;" in body
    body = page(model="resnet50", target_acc="0.7", gpus="<b>")
    assert "<b>" not in body and "no epoch logs for GPU &#x27;&lt;b&gt;&#x27;" in body
