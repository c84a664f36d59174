"""Held-out evaluation of a sharded student on two CPU ranks (gloo), run by tests/test_eval.py:

    torchrun --standalone --nproc_per_node=2 tests/dist_scripts/eval_checks.py MODEL_DIR DATA.jsonl OUT.json N

Each rank loads the model, shards it as the trainer does (``distributed.shard_model``, fp32 on CPU) and runs
``ril_fast.evaluate.evaluate`` on the first N examples of DATA.jsonl with ``batch_size=1``, so that the ranks'
slices differ in length when N is odd. Rank 0 writes each rank's metrics, records and number of ``generate``
calls (``sample_responses``: each all-gathers the sharded parameters) to OUT.json. A rank that has not finished
after ``HANG_S`` seconds dumps its stack and exits 1 (``faulthandler``): ranks out of step wait on each other's
collectives for gloo's 30 minutes otherwise. The model is freed before the process group is left (below).
"""

import faulthandler
import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ril_fast import distributed, evaluate  # noqa: E402
from ril_fast.data import load_examples  # noqa: E402
from ril_fast.judge import RuleJudge  # noqa: E402
from ril_fast.models import load  # noqa: E402

HANG_S = 120  # a healthy run takes ~10 s on 2 cores


def main(model_dir: str, data: str, out_path: str, n: int) -> None:
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    dist = distributed.init()
    model, processor = load(model_dir, device="cpu")
    model = distributed.shard_model(model, mixed_precision=False, device=dist.device)
    calls = []
    real = evaluate.sample_responses
    evaluate.sample_responses = lambda *a, **k: calls.append(len(a[2])) or real(*a, **k)
    records: list[dict] = []
    metrics = evaluate.evaluate(model, processor, load_examples(data)[:n], RuleJudge(), dist, max_new_tokens=4,
                                batch_size=1, records=records)
    seen = distributed.all_gather_objects({"metrics": metrics, "records": records, "calls": calls})
    faulthandler.cancel_dump_traceback_later()
    if dist.is_main:
        Path(out_path).write_text(json.dumps(seen))
    # The sharded model holds the process group, and the processor and reference cycles hold the model: left to
    # the interpreter's exit, a rank aborted after leaving the group in 2 of ~70 runs ("terminate called without
    # an active exception"). Freed first, the group goes when it is left.
    del model, processor
    gc.collect()
    distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
