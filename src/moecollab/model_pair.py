"""The studied model and its untrained twin, measured one after the other.

Every structure claim in the study is read against the same architecture with random weights
(the control). For the embedded model both fit in memory at once; for a pretrained checkpoint
of tens of GB only one does, so the twin is built from the checkpoint's config only after the
checkpoint is released. :meth:`ModelPair.map` does that dance, so that a chapter says what it
measures on each model and not how memory is managed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moecollab import models

TRAINED, CONTROL = "trained", "control"


class ModelPair:
    """The trained (or pretrained) model, its tokenizer, and its control, loaded or to build.

    ``control`` is the control when it is already in memory; otherwise ``build_control`` makes
    it from the trained model's config and dtype, once that model is released. Without either,
    the pair holds the trained model alone.
    """

    def __init__(self, trained, tokenizer, *, control=None,
                 build_control: Callable[[Any, Any], Any] | None = None) -> None:
        self.trained = trained
        self.tokenizer = tokenizer
        self.control = control
        self._build_control = build_control

    @classmethod
    def from_config(cls, config, tokenizer, *, seed: int) -> ModelPair:
        """A new embedded model and its control: the same initial weights, never trained."""
        return cls(models.build_model(config, seed=seed), tokenizer,
                   control=models.build_model(config, seed=seed))

    @classmethod
    def pretrained(cls, model: str, *, device: str, dtype: str = "auto", device_map: str = "",
                   trust_remote_code: bool = False, seed: int = 0) -> ModelPair:
        """A pretrained checkpoint; its control is built from its config when it is needed."""
        trained, tokenizer = models.load_model(model, device=device, dtype=dtype,
                                               device_map=device_map,
                                               trust_remote_code=trust_remote_code)

        def build(config, weights_dtype):
            return models.build_control_model(config, seed=seed, dtype=weights_dtype,
                                              device=device, device_map=device_map,
                                              trust_remote_code=trust_remote_code)

        return cls(trained, tokenizer, build_control=build)

    @classmethod
    def of_stage_00(cls, folder: str | os.PathLike, *, device: str = "cpu",
                    seed: int = 0) -> ModelPair:
        """The model stage 00 settled on and its control (saved there, or built when needed)."""
        folder = Path(folder)
        trained, tokenizer = models.load_reference_model(folder, device=device)

        def load(config, weights_dtype):
            return models.load_control_model(folder, config, seed=seed, device=device,
                                             dtype=weights_dtype)

        return cls(trained, tokenizer, build_control=load)

    @property
    def has_control(self) -> bool:
        return self.control is not None or self._build_control is not None

    def map(self, measure: Callable[[str, Any], Any], *, control: bool = True,
            release_trained: bool = False) -> dict[str, Any]:
        """``measure(name, model)`` on the trained model, then on the control: ``{name: result}``.

        ``control=False`` measures the trained model alone. ``release_trained`` lets the pair
        drop the trained model (and collect it) before the control is loaded or built, so that
        a large checkpoint and its twin never share the memory; the pair's ``trained`` is then
        None. ``measure`` must not keep the model it is given.
        """
        results = {TRAINED: measure(TRAINED, self.trained)}
        if not control or not self.has_control:
            return results
        if self.control is None:
            config, weights_dtype = self.trained.config, self.trained.dtype
            if release_trained:
                self.trained = None
                models.release_memory()
            self.control = self._build_control(config, weights_dtype)
        results[CONTROL] = measure(CONTROL, self.control)
        return results

    def map_loaded(self, measure: Callable[[str, Any], Any]) -> dict[str, Any]:
        """``measure(name, model)`` on the models in memory now; a control still to build is
        skipped (a pretrained checkpoint's, until :meth:`map` has built it)."""
        loaded = {TRAINED: self.trained, CONTROL: self.control}
        return {name: measure(name, model) for name, model in loaded.items()
                if model is not None}
