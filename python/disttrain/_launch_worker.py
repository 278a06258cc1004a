"""Rank side of :func:`disttrain.launch`; started by torch.distributed.run."""

import os
import pickle
import sys
import traceback


def main(workdir: str) -> int:
    rank = int(os.environ.get("RANK", "0"))
    try:
        with open(os.path.join(workdir, "payload.pkl"), "rb") as f:
            fn, args, backend = pickle.load(f)
        import torch.distributed as dist

        import disttrain

        disttrain.init(backend=backend)
        value = fn(*args)
        dist.destroy_process_group()
        outcome = (True, value)
    except BaseException:  # report everything to the launching process
        outcome = (False, traceback.format_exc())
    with open(os.path.join(workdir, f"result_{rank}.pkl"), "wb") as f:
        pickle.dump(outcome, f)
    return 0 if outcome[0] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
