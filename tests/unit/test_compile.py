"""`model.compile`: the model's parts compiled in place, checked with TorchDynamo on the CPU
(backend "eager": Dynamo's tracing without Inductor's code generation, so graph breaks and
recompiles show as they would on a GPU, in seconds)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

from pipeline.methods import build_method
from pipeline.recipe import load_recipe
from pipeline.training.optim import build_optimizer
from pipeline.training.step import MethodRunner, step_generator, train_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = ["model.name=test_resnet", "model.timm_kwargs={}", "model.output_stride=8",
         "model.channels_last=false", "model.ae.embed_channels=32", "model.ae.decoder_width=32",
         "model.ae.decoder_min_width=8", "model.ae.decoder_blocks=1"]  # fmt: skip


def _setup(method_name: str, *extra: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    recipe = load_recipe(None, [f"method.name={method_name}", *SMALL, *extra])
    method = build_method(recipe.method)
    torch.manual_seed(0)
    model = method.build_model(recipe.model, 10)
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    runner, optimizer = accelerator.prepare(
        MethodRunner(model, method), build_optimizer(recipe.optim, model, lr=1e-3)
    )
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    return model, accelerator, runner, optimizer, batch


@pytest.mark.parametrize(
    ("method_name", "extra"),
    [("alignmixup", ()), ("manifold_mixup", ()), ("alignmixup_ae", ("method.clean_prob=0.5",))],
)
def test_compiled_parts_train_without_graph_breaks_or_recompiles(method_name, extra):
    """Warm-up steps meet every branch (levels, directions, clean and mixed batches) and a
    validation pass; after that no step may compile again, and no graph ever broke."""
    dynamo.reset()
    counters.clear()
    model, accelerator, runner, optimizer, (x, y) = _setup(method_name, *extra)
    model.compile_parts(backend="eager")

    def steps(first: int, last: int) -> None:
        for s in range(first, last):
            train_step(accelerator, runner, optimizer, x, y, step_generator(0, s))
        with torch.no_grad():
            model.eval()
            model(x)
            model.train()

    steps(0, 6)
    with dynamo.config.patch(error_on_recompile=True):
        steps(6, 10)
    assert dict(counters["graph_break"]) == {}


def test_explain_finds_one_graph_and_no_break_in_every_part():
    model, *_ = _setup("alignmixup_ae")
    h = torch.randn(2, 3, 32, 32)
    for part in [*model.stages]:
        explained = dynamo.explain(part)(h)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), part
        h = part(h)
    e = model.embed(h)
    for part, arg in ((model.embedding, h), (model.decoder, e), (model.classifier, e.mean((2, 3)))):
        explained = dynamo.explain(part)(arg)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), part
