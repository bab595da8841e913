"""Inputs that must not run code or escape: a crafted CIFAR pickle is refused before anything in it
runs, every label must name a class, and a recipe `name` of dots cannot turn the run folder
(`runs/<name>`) into `runs/` itself or its parent."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.memory import read_cifar
from pipeline.errors import DataError, RecipeError
from pipeline.recipe import load_recipe


class _Payload:
    """Unpickled, this calls `call(*args)`: what a crafted batch file could run."""

    def __init__(self, call, *args) -> None:
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _dump(obj, path: Path, protocol: int = 2) -> None:
    """Pickled as CIFAR's files are: protocol 2 (Python 2's cPickle)."""
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def _cifar10(root: Path, protocol: int = 2, labels: dict[str, list[int]] | None = None) -> Path:
    """A CIFAR-10 folder as distributed, 4 images a batch: bytes keys, uint8 `data` rows of
    3072, `labels` a list of ints; `labels` replaces a batch's labels by file name."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
            b"labels": (labels or {}).get(name, rng.integers(0, 10, 4).tolist()),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(4)],
        }
        _dump(batch, folder / name, protocol)
    names = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}
    _dump(names, folder / "batches.meta", protocol)
    return root


@pytest.mark.parametrize(
    ("file", "call", "refused"),
    [("batches.meta", open, "io.open"), ("data_batch_2", exec, "__builtin__.exec")],
    ids=["meta-open", "batch-exec"],
)
def test_a_crafted_cifar_pickle_is_refused_before_it_runs(tmp_path, file, call, refused):
    root = _cifar10(tmp_path / "data")
    marker = tmp_path / "payload-ran"
    args = (str(marker), "w") if call is open else (f"open({str(marker)!r}, 'w').close()",)
    # Inside the dict, as a crafted file would hide it among the expected entries.
    crafted = {b"label_names": [b"a"] * 10, b"data": _Payload(call, *args), b"labels": [0]}
    _dump(crafted, root / "cifar-10-batches-py" / file)
    with pytest.raises(DataError) as info:
        read_cifar(root, "cifar10", "train")
    assert not marker.exists()
    message = str(info.value)
    assert f"{file}:" in message and repr(refused) in message, message


# Protocol 2 as distributed, under NumPy 1's module names as the official files were written,
# and protocol 5 as a copy re-pickled by Python 3 and NumPy 2 would be.
@pytest.mark.parametrize(
    ("protocol", "numpy_module"), [(2, "numpy.core"), (2, "numpy._core"), (5, "numpy._core")]
)
def test_cifar_batches_as_distributed_still_load(tmp_path, protocol, numpy_module):
    root = _cifar10(tmp_path, protocol)
    folder = root / "cifar-10-batches-py"
    for path in folder.iterdir():  # protocol 2 has no frame lengths to keep
        path.write_bytes(path.read_bytes().replace(b"numpy._core.", f"{numpy_module}.".encode()))
    train = read_cifar(root, "cifar10", "train")
    raw = pickle.loads((folder / "data_batch_5").read_bytes(), encoding="bytes")
    assert train.images.shape == (20, 3, 32, 32) and train.class_names[9] == "class9"
    assert np.array_equal(train.images[16:].reshape(4, 3072), raw[b"data"])
    assert train.labels[16:].tolist() == raw[b"labels"]


@pytest.mark.parametrize("bad", [10, -1])
def test_a_label_outside_the_class_list_is_named(tmp_path, bad):
    root = _cifar10(tmp_path, labels={"data_batch_3": [1, 2, bad, 11]})
    with pytest.raises(DataError, match=rf"data_batch_3: label {bad} .*10 classes"):
        read_cifar(root, "cifar10", "train")


@pytest.mark.parametrize("name", ["..", ".", "'...'", "' . '", "' '"])
def test_a_recipe_name_of_dots_is_refused(name):
    with pytest.raises(RecipeError, match=r"'name': .*not '\.', '\.\.'") as info:
        load_recipe(None, [f"name={name}"])
    assert str(info.value).count("\n") == 1, info.value  # one problem, the name's
