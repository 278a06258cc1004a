"""Fuzzing in the suite (issue 19): every crash input found so far
(fuzz/regressions/<target>/) and the committed corpus replayed against the
installed package and the C++ sources, then each of the six targets fuzzed
for a few seconds (scripts/fuzz.sh runs them for long). libFuzzer targets need
clang-14 and libfuzzer-14-dev (scripts/setup.sh installs them and builds the
targets); a missing compiler is a failure here, not a skip."""

from __future__ import annotations

import glob
import importlib
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from disttrain import _C, snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = os.path.join(ROOT, "fuzz")
CPP_TARGETS = ["snapshot_read", "tcp_handshake", "group_averager"]
PY_TARGETS = ["snapshot_load", "fsdp_manifest", "decentralised_control"]
SMOKE_SECONDS = 3
ENV = dict(os.environ, ASAN_OPTIONS="detect_container_overflow=0:alloc_dealloc_mismatch=0:detect_leaks=0",
           UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")


@pytest.fixture(scope="module")
def built():
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "fuzz.sh"), "--build-only"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"building the libFuzzer targets failed:\n{proc.stdout}{proc.stderr}"
    return os.path.join(ROOT, "build", "fuzz")


def _command(target: str, build_dir: str) -> list[str]:
    if target in CPP_TARGETS:
        return [os.path.join(build_dir, f"{target}_fuzzer")]
    return [sys.executable, os.path.join(FUZZ, "python", "fuzz_harness.py"), target]


def test_every_target_replays_its_inputs_and_fuzzes_without_a_crash(built, tmp_path):
    """All six at once: each first runs every committed input (corpus and regressions),
    then fuzzes for a few seconds; a crash input lands in tmp_path (named in the message)."""
    procs = {}
    for target in CPP_TARGETS + PY_TARGETS:
        corpus = tmp_path / target
        shutil.copytree(os.path.join(FUZZ, "corpus", target), corpus)
        regressions = os.path.join(FUZZ, "regressions", target)
        cmd = _command(target, built) + [str(corpus)] + ([regressions] if os.path.isdir(regressions) else []) + [
            f"-max_total_time={SMOKE_SECONDS}", "-timeout=25", "-rss_limit_mb=4096",
            f"-artifact_prefix={tmp_path}/{target}-", "-print_final_stats=1"]
        procs[target] = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True)
    failures = []
    for target, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        runs = re.findall(r"stat::number_of_executed_units: *(\d+)", out)
        committed = len(os.listdir(os.path.join(FUZZ, "corpus", target)))
        if proc.returncode != 0 or not runs or int(runs[-1]) < committed:
            failures.append(f"{target} (status {proc.returncode}, crash input in {tmp_path}):\n{out[-3000:]}")
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("target", PY_TARGETS)
def test_python_regressions_in_process(target):
    """The crash inputs of the atheris targets, against the installed package, without atheris."""
    sys.path.insert(0, os.path.join(FUZZ, "python"))
    try:
        module = importlib.import_module(f"{target}_fuzzer")
    finally:
        sys.path.pop(0)
    inputs = glob.glob(os.path.join(FUZZ, "regressions", target, "*"))
    assert inputs, f"fuzz/regressions/{target} holds the crash inputs found so far"
    for path in inputs:
        with open(path, "rb") as f:
            module.test_one_input(f.read())


# ---- the crashes the fuzzers found, as plain tests --------------------------------------------

def _with_metadata(tmp_path, metadata: bytes, state=None):
    _, names, tensors = snapshot._flatten(state or {"w": torch.ones(2)}, stage_on_host=False)
    path = str(tmp_path / "s.dts")
    _C.snapshot_write(path, metadata, names, tensors, False)
    return path


@pytest.mark.parametrize("metadata", [
    b"\xd9$",  # fuzz/regressions/snapshot_load/crash-e745fc2a: not JSON (JSONDecodeError escaped)
    b'{"format":"disttrain.snapshot/1"}',  # no state (KeyError)
    b'{"format":"disttrain.snapshot/1","state":{"$tensor":"nope"}}',  # a tensor that is not in the file
    b'{"format":"disttrain.snapshot/1","state":{"$dict":[[1]]}}',  # a malformed pair (ValueError/TypeError)
    b'{"format":"disttrain.snapshot/1","state":{"$dtype":"save"}}',  # a torch attribute that is no dtype
    b'{"format":"disttrain.snapshot/1","state":{"$ndarray":"w","dtype":"O","shape":[1]}}',  # object pointers
])
def test_malformed_metadata_is_a_corrupt_snapshot(tmp_path, metadata):
    with pytest.raises(snapshot.CorruptSnapshotError, match="s.dts"):
        snapshot.load(_with_metadata(tmp_path, metadata))
