"""``disttrain info``: versions, how the extension was built, and what a job
started here would use."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys


def collect() -> dict:
    import torch

    import disttrain
    from disttrain import _C

    build = dict(_C.build_info)
    # The backend's settings as a group created here would parse them (from the
    # environment; pg_options could still override them per group).
    options = [{"name": n, "value": v, "source": s, "env": e} for n, v, s, e in _C.comm_options()]
    for o in options:
        if o["name"] == "shm_wait" and o["value"] == "auto":
            o["note"] = (f"yield, or sleep when a host runs more than {len(os.sched_getaffinity(0))} ranks "
                         "(the cores a rank may use here)")
    transport = next(o["value"] for o in options if o["name"] == "transport")
    shm_ok = os.access("/dev/shm", os.W_OK)
    same_host = "tcp (loopback)" if transport == "tcp" or not shm_ok else "shared memory (/dev/shm)"
    across = "tcp" if transport == "tcp" or not shm_ok else "two-level: shared memory within each host, tcp between hosts"
    return {
        "disttrain": disttrain.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "build": build,
        "reduce_kernels": _C.reduce_kernel_isa(),
        "backends": {
            "disttrain": True,
            "gloo": torch.distributed.is_gloo_available(),
            "nccl": torch.distributed.is_nccl_available(),
            "mpi": torch.distributed.is_mpi_available(),
        },
        "transport": {
            "requested": transport,
            "between ranks on this host": same_host,
            "between hosts": across,
        },
        "options": options,
        "cuda_available": torch.cuda.is_available(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="disttrain info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = parser.parse_args(argv)
    try:
        info = collect()
    except ValueError as e:  # a malformed setting in the environment
        print(f"disttrain info: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    b = info["build"]
    print(f"disttrain {info['disttrain']}  (torch {info['torch']}, Python {info['python']})")
    print(f"platform      {info['platform']}, {info['cpus']} CPUs")
    print(f"built with    {b['compiler']}, C++{str(b['cplusplus'])[2:4]}, "
          f"_GLIBCXX_USE_CXX11_ABI={int(b['cxx11_abi'])}, against torch {b['torch_version']}")
    print(f"flags         {b['cxx_flags'].strip() or '(none)'}")
    print(f"components    {', '.join(b['components'])}")
    print(f"NCCL path     {'built' if b['nccl'] else b['nccl_status']}")
    print(f"reduce kernels {info['reduce_kernels']} (runtime dispatch)")
    backends = ", ".join(k for k, v in info["backends"].items() if v)
    print(f"backends      {backends}")
    t = info["transport"]
    print(f"transport     {t['requested']}: on this host {t['between ranks on this host']}, "
          f"across hosts {t['between hosts']}")
    print("backend options (effective for a group created here; docs/settings.md):")
    for o in info["options"]:
        value = o["value"] if o["value"] != "" else "(unset)"
        note = f" ({o['note']})" if o.get("note") else ""
        print(f"  {o['name']:<20} {value:<16} {o['source']}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
