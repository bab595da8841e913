"""`method.draws`: two real gloo ranks share λ always, and the partner, layer and direction under
`global`; under `per_rank` each rank draws its own, as the authors' one-process DataParallel run
did per GPU. A step run again (a resume) draws what it drew the first time, on each rank."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.gloo import run_two_ranks

WORKER = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    import torch.distributed as dist
    from pipeline.config import ModelConfig
    from pipeline.methods import MethodContext, build_method
    from pipeline.models import build_model
    from pipeline.recipe import load_recipe
    from pipeline.training.step import step_generator

    warnings.simplefilter("ignore")
    rank, store, out, draws, method, steps = sys.argv[1:]
    rank, steps = int(rank), [int(s) for s in steps.split(",")]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    recipe = load_recipe(None, [f"method.name={method}", f"method.draws={draws}"])
    chosen = build_method(recipe.method, MethodContext(rank=dist.get_rank()))
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="test_resnet", output_stride=8), 10).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(10, (8,), generator=g)
    record = {}
    for step in steps:
        with torch.no_grad():
            result = chosen(model, x, y, step_generator(7, step))  # same batch on both ranks
        stats = {k: v.item() for k, v in result.stats.items()}
        record[step] = {"loss": result.loss.item(), **stats}
    gathered = [None, None]
    dist.all_gather_object(gathered, record)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()
    """
)


def _run(tmp_path: Path, draws: str, method: str, steps: str, tag: str) -> list[dict]:
    """Per rank, {step: loss and stats} of `method` on one fixed batch, from two gloo ranks."""
    script = tmp_path / "draws_worker.py"
    script.write_text(WORKER)
    out, store = tmp_path / f"{tag}.json", tmp_path / f"{tag}.store"
    run_two_ranks(script, [str(store), str(out), draws, method, steps])
    return json.loads(out.read_text())


@pytest.mark.parametrize("method", ["alignmixup", "manifold_mixup"])
def test_global_draws_agree_per_rank_draws_differ_and_resume_reproduces_both(tmp_path, method):
    for draws in ("global", "per_rank"):
        first = _run(tmp_path, draws, method, "0,1,2,3,4,5,6,7", f"{draws}_first")
        resumed = _run(tmp_path, draws, method, "5,6,7", f"{draws}_resumed")
        rank0, rank1 = first
        # λ is one draw per step for the whole global batch, whatever `draws` says.
        assert all(rank0[s]["lam"] == rank1[s]["lam"] for s in rank0)
        same_loss = [rank0[s]["loss"] == rank1[s]["loss"] for s in rank0]
        if draws == "global":
            assert all(same_loss)  # same batch, same λ, same partner, layer and direction
        else:
            assert not any(same_loss)  # each rank its own partners (and layer, direction)
        kind = "aligned" if method == "alignmixup" else "level"
        choices = [(rank0[s][kind], rank1[s][kind]) for s in rank0]
        assert any(a != b for a, b in choices) == (draws == "per_rank"), choices
        for rank in range(2):
            for step, values in resumed[rank].items():
                assert values == first[rank][step], (draws, rank, step)
