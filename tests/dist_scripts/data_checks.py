"""Reading the training data on several CPU ranks (gloo), run by tests/test_setup_checks.py:

    torchrun --standalone --nproc_per_node=2 tests/dist_scripts/data_checks.py OUT.json key=value ...

Every rank counts the image files it opens while ``ril_fast.preflight.load_data`` reads the data the trainer's
``key=value`` settings name, once as given and once with a ``batch.max_tokens`` that no prompt fits in, and notes
what ``distributed.on_rank0`` raises for a result or an exception that cannot travel; then sets the run up (the
models included) with rank 1 unable to read ``output_dir``. Rank 0 writes what each rank saw to OUT.json.
"""

import json
import sys
import traceback
from pathlib import Path

import PIL.Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ril_fast import distributed, lifecycle, preflight, train  # noqa: E402
from ril_fast.config import load_config  # noqa: E402
from ril_fast.data import DataError  # noqa: E402


class Picky(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")


def _raise_picky():
    raise Picky(1, 2)


def _not_here(*args, **kwargs):
    raise AssertionError("rank 1 read output_dir to decide where the run starts")


def _error(fn) -> str:
    """What ``distributed.on_rank0(fn)`` raises on this rank, in words (" [in fn]" where its traceback reaches
    into ``fn``)."""
    try:
        distributed.on_rank0(fn)
    except Exception as e:  # noqa: BLE001
        reached = any(frame.name == fn.__name__ for frame in traceback.extract_tb(e.__traceback__))
        return f"{type(e).__name__}: {e}" + (" [in fn]" if reached else "")
    return "nothing raised"


def main(out_path: str, settings: list[str]) -> None:
    dist = distributed.init()
    opened = []
    real_open = PIL.Image.open
    PIL.Image.open = lambda *a, **k: opened.append(a[0]) or real_open(*a, **k)
    examples, bank, eval_examples, batches = preflight.load_data(load_config(settings), dist)
    seen = dict(opened=len(opened), examples=[e.__dict__ for e in examples], eval=[e.id for e in eval_examples],
                teachers=bank.by_id if bank is not None else None, batch=[e.id for e in next(batches)])
    try:
        preflight.load_data(load_config(settings + ["batch.max_tokens=20"]), dist)
        seen["error"] = None
    except DataError as e:
        seen["error"] = str(e)
    seen["unpicklable"] = _error(lambda: (lambda: 0))  # a result that cannot travel
    seen["unrebuildable"] = _error(_raise_picky)  # an exception that pickles but cannot be rebuilt
    if dist.rank == 1:  # rank 0's view of output_dir decides: this rank's must not be read
        lifecycle.resume_point = lifecycle.finished = _not_here
    run = train.setup(load_config(settings))
    seen["set_up"] = run.start_step
    run.log.close()
    per_rank = distributed.all_gather_objects(json.loads(json.dumps(seen, default=str)))
    if dist.is_main:
        Path(out_path).write_text(json.dumps(per_rank))
    distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
