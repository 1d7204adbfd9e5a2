"""One rank of the distributed tests, started by ``torchrun`` from tests/train/test_distributed.py (not a test).

    ddp_worker.py runs RUNS.json OUT    # every config of RUNS.json, trained in one process group, into OUT/NAME
    ddp_worker.py kill ARGS...          # `taft ARGS`, rank 1 killed (SIGKILL) at its 2nd step, first attempt only
    ddp_worker.py mismatch ARGS...      # `taft ARGS`, rank 1 with another seed
    ddp_worker.py otherdata ARGS...     # `taft ARGS`, rank 1 reading --data from other/NAME beside it
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path


def _runs(spec: Path, out: Path) -> None:
    import torch.distributed as dist

    from taft.config import TrainConfig
    from taft.train.loop import train

    dist.init_process_group("gloo")  # one group for all runs (train() uses it as it is)
    for name, kw in json.loads(spec.read_text()).items():
        train(TrainConfig(**kw, output_dir=str(out / name)), progress=False)
    dist.destroy_process_group()


def _kill_rank1_at_second_step() -> None:
    import taft.train.fit as fit

    real, calls = fit.sum_gradients, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    fit.sum_gradients = dying


def main() -> int:
    mode, args = sys.argv[1], sys.argv[2:]
    rank = int(os.environ["RANK"])
    if mode == "runs":
        _runs(Path(args[0]), Path(args[1]))
        return 0
    if mode == "kill" and rank == 1 and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        _kill_rank1_at_second_step()
    if mode == "mismatch" and rank == 1:
        args = [*args, "--seed", "1"]
    if mode == "otherdata" and rank == 1:
        i = args.index("--data") + 1
        args[i] = str(Path(args[i]).parent / "other" / Path(args[i]).name)
    from taft.cli import main as cli

    return cli(args)


if __name__ == "__main__":
    sys.exit(main())
