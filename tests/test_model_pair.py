"""The trained model and its control, measured one after the other (moecollab.model_pair)."""

import gc
import weakref

import pytest
import torch
from tiny_models import save_tiny_checkpoint

from moecollab import models
from moecollab.model_pair import CONTROL, TRAINED, ModelPair


class _Model(torch.nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((2,), value), requires_grad=False)
        self.config = {"value": value}

    @property
    def dtype(self) -> torch.dtype:  # as transformers models have
        return self.weight.dtype


def test_both_models_are_measured_trained_first():
    pair = ModelPair(_Model(1.0), tokenizer=None, control=_Model(0.0))
    seen = []
    results = pair.map(lambda name, model: seen.append(name) or float(model.weight[0]))
    assert seen == [TRAINED, CONTROL]
    assert results == {TRAINED: 1.0, CONTROL: 0.0}


def test_without_a_control_or_when_asked_the_trained_model_is_measured_alone():
    assert list(ModelPair(_Model(1.0), None).map(lambda name, model: name)) == [TRAINED]
    pair = ModelPair(_Model(1.0), None, control=_Model(0.0))
    assert list(pair.map(lambda name, model: name, control=False)) == [TRAINED]


def test_a_control_to_build_is_built_from_the_trained_models_config_after_its_release():
    trained = _Model(1.0)
    alive = weakref.ref(trained)
    built_from = []

    def build(config, dtype):
        gc.collect()
        built_from.append((config, dtype, alive() is None))  # the trained model is gone
        return _Model(-1.0)

    pair = ModelPair(trained, None, build_control=build)
    del trained
    results = pair.map(lambda name, model: float(model.weight[0]), release_trained=True)
    assert results == {TRAINED: 1.0, CONTROL: -1.0}
    assert built_from == [({"value": 1.0}, torch.float32, True)]
    assert pair.trained is None and pair.control is not None


def test_without_release_the_trained_model_stays():
    pair = ModelPair(_Model(1.0), None, build_control=lambda config, dtype: _Model(-1.0))
    pair.map(lambda name, model: None)
    assert float(pair.trained.weight[0]) == 1.0


def test_map_loaded_skips_a_control_not_built_yet():
    pair = ModelPair(_Model(1.0), None, build_control=lambda config, dtype: _Model(-1.0))
    assert list(pair.map_loaded(lambda name, model: name)) == [TRAINED]
    assert pair.control is None  # nothing was built
    pair.map(lambda name, model: None)
    assert list(pair.map_loaded(lambda name, model: name)) == [TRAINED, CONTROL]


def test_the_embedded_control_starts_from_the_trained_models_weights():
    config = models.embedded_config(vocab_size=64, n_layers=1, hidden_size=16, n_heads=2,
                                    n_experts=4, top_k=2, expert_size=8, seq_len=16)
    pair = ModelPair.from_config(config, tokenizer=None, seed=3)
    assert pair.trained is not pair.control
    for (name, a), (_, b) in zip(pair.trained.state_dict().items(),
                                 pair.control.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("family", ["olmoe"])
def test_a_pretrained_checkpoints_control_is_its_architecture_with_fresh_weights(family,
                                                                                tmp_path):
    folder = save_tiny_checkpoint(family, tmp_path / "checkpoint")
    # (a tiny "checkpoint" saved with seed 0 is random too: its control takes another seed)
    pair = ModelPair.pretrained(str(folder), device="cpu", seed=1)
    assert pair.control is None and pair.has_control
    trained_class = type(pair.trained)
    weights = {name: tensor.clone() for name, tensor in pair.trained.state_dict().items()}
    pair.map(lambda name, model: None, release_trained=True)
    assert type(pair.control) is trained_class
    control = pair.control.state_dict()
    assert control.keys() == weights.keys()
    assert any(not torch.equal(control[name], weights[name]) for name in weights)
