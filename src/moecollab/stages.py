"""The stage list: the one place that says which stages exist, in which order, and what they need.

``_toc.yml``, the notebook files and the profiles are checked against this list by a test.
Defaults and types of parameters live in each notebook's ``parameters`` cell; the range checks
that cannot be read off a literal live here, next to the stage they belong to.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from . import hsdl_params
from .checks import Check
from .data.corpus import DOMAINS, SPLITS
from .data.paper import FIELDS as PAPER_FIELDS
from .data.sources import DATA_SOURCES, ITEM_FAMILIES, SPLIT_GROUPS

POSITIVE = Check(low=1)
NON_NEGATIVE = Check(low=0)
FRACTION_OPEN = Check(low=0, high=1, high_open=True)   # [0, 1)
PROBABILITY = Check(low=0, high=1)
# The one device vocabulary: the plan checks profiles with it, moecollab.models.resolve_device
# every device argument (auto: CUDA when present, else the CPU).
DEVICE = Check(pattern=r"auto|cpu|mps|cuda(:\d+)?",
               pattern_text="'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
DOMAIN_CHOICES = Check(choices=DOMAINS, each=True)
# Stage 01 reads the embedded corpus's fields or the paper's (moecollab.data.paper.FIELDS);
# which set applies depends on data_source, checked across parameters in moecollab.preflight.
ANY_FIELD = Check(choices=tuple(dict.fromkeys(DOMAINS + PAPER_FIELDS)), each=True)
DATA_SOURCE = Check(choices=DATA_SOURCES)
# Loading a pretrained checkpoint: the one list of each; moecollab.models.DTYPES and DEVICE_MAPS
# (the loaders' own checks) are built from these, so that this module need not import torch.
DTYPES = ("auto", "float32", "bfloat16", "float16")  # names of torch dtypes, or auto
DEVICE_MAPS = ("", "auto", "balanced", "balanced_low_0", "sequential")  # "": one device

# Parameters every notebook has; the runner sets the first three itself.
RUNNER_PARAMETERS = ("profile", "artifacts_root", "output_dir")
COMMON_CHECKS = {"seed": NON_NEGATIVE, "device": DEVICE}  # for stages that declare them


@dataclass(frozen=True)
class Stage:
    """One step of the study: a notebook ``notebooks/<name>.md`` and a folder of artifacts."""

    name: str                        # "00_model": notebook stem and artifact folder
    title: str                       # chapter title
    needs: tuple[str, ...] = ()      # stages whose artifacts this one reads
    checks: dict[str, Check] = field(default_factory=dict)

    @property
    def notebook(self) -> str:
        return f"notebooks/{self.name}.md"

    def all_checks(self) -> dict[str, Check]:
        return {**COMMON_CHECKS, **self.checks}


STAGES: tuple[Stage, ...] = (
    Stage(
        "00_model",
        "The reference model",
        checks={
            "domains": DOMAIN_CHOICES,
            "max_entries_per_domain": POSITIVE,
            "general_text_ratio": Check(low=0, high=10),
            "vocab_size": Check(low=300, high=65536),
            "n_layers": Check(low=1, high=48),
            "hidden_size": Check(low=16, high=4096),
            "n_heads": POSITIVE,
            "n_experts": Check(low=2, high=512),
            "top_k": POSITIVE,
            "expert_size": POSITIVE,
            "seq_len": Check(low=8, high=4096),
            "batch_size": POSITIVE,
            "n_steps": NON_NEGATIVE,
            "lr": Check(low=0, high=1, low_open=True),
            "balance_coef": Check(low=0, high=10),
            "specialisation_coef": Check(low=0, high=10),
            "balance_window": POSITIVE,
            "eval_every": POSITIVE,
            "n_eval_tokens": POSITIVE,
            "n_mcq_choices": Check(low=2, high=10),
            "cloze_option_tokens": POSITIVE,
            "cloze_blanks_per_entry": NON_NEGATIVE,
            "min_expert_share": Check(low=0, high=1),
            "dtype": Check(choices=DTYPES),
            "device_map": Check(choices=DEVICE_MAPS),
        },
    ),
    Stage(
        "01_capture",
        "Capturing the routing",
        needs=("00_model",),
        checks={
            "domains": ANY_FIELD,
            "data_source": DATA_SOURCE,
            "split": Check(choices=(*SPLITS, *SPLIT_GROUPS)),
            "max_tokens": POSITIVE,
            "seq_len": Check(low=8, high=32768),
            "batch_size": POSITIVE,
        },
    ),
    Stage(
        "02_coactivation",
        "Which experts fire together?",
        needs=("00_model", "01_capture"),  # 00: its routing-health verdict gates the claims
        checks={"n_top": POSITIVE, "min_count": POSITIVE, "lift_threshold": Check(low=1)},
    ),
    Stage(
        "03_hsdl",
        "Collaboration patterns by hierarchical sparse dictionary learning",
        needs=("00_model", "01_capture"),  # 00: its routing-health verdict gates the claims
        checks={
            "level": Check(choices=("token", "sample")),
            "value": Check(choices=("weight", "binary")),
            # The estimator's own rules (moecollab.hsdl_params), for its parameters and for
            # the sweep's values of them; the rest are the notebook's.
            **{name: hsdl_params.RULES[name] for name in (
                "n_atoms", "lambda_codes", "lambda_recon", "lambda_sparse", "n_epochs",
                "batch_size", "lr")},
            "sweep_atoms": hsdl_params.RULES["n_atoms"],
            "sweep_lambda_codes": replace(hsdl_params.RULES["lambda_codes"], each=True),
            "sweep_epochs": hsdl_params.RULES["n_epochs"],
            "max_samples": NON_NEGATIVE,
            "sweep_samples": Check(low=100),
        },
    ),
    Stage(
        "04_annotation",
        "What do the collaboration patterns handle?",
        needs=("00_model", "01_capture", "03_hsdl"),
        checks={"n_top_tokens": POSITIVE, "min_count": POSITIVE,
                "n_passages_per_domain": NON_NEGATIVE, "passage_length": POSITIVE,
                "n_random_repeats": POSITIVE},
    ),
    Stage(
        "05_pruning",
        "Pruning experts: CAEP and five baselines",
        needs=("00_model", "03_hsdl"),
        checks={
            "prune_ratios": Check(low=0, high=1, high_open=True, each=True),
            "threshold_ratio": Check(low=0, high=1, low_open=True),
            "caep_level": POSITIVE,
            "scope": Check(choices=("global", "per_layer")),
            "per_layer_methods": Check(choices=("frequency", "seer", "reap", "output_impact"),
                                       each=True),
            "n_random_seeds": POSITIVE,
            # never "test": stage 06 evaluates on the test split
            "calibration_split": Check(choices=("train", "validation")),
            "calibration_tokens": Check(low=64),
            "seq_len": Check(low=8, high=32768),
            "batch_size": POSITIVE,
            "ablation_threshold_ratios": Check(low=0, high=1, low_open=True, each=True),
            "domain_prune_ratio": FRACTION_OPEN,
            "data_source": DATA_SOURCE,
        },
    ),
    Stage(
        "06_evaluation",
        "Does CAEP prune better?",
        needs=("00_model", "05_pruning"),
        checks={
            "limit": NON_NEGATIVE,
            "item_families": Check(choices=ITEM_FAMILIES, each=True),
            "n_workers": POSITIVE,
            "mcq_splits": Check(choices=("train", "validation", "test"), each=True),
            "n_perplexity_entries": POSITIVE,
            "n_random_evaluated": POSITIVE,
            "variant_ratios": Check(low=0, high=1, high_open=True, each=True),
            "mode": Check(choices=("mask", "remove")),
            "batch_size": POSITIVE,
            "backend": Check(choices=("hf", "vllm")),
            "standard_limit": NON_NEGATIVE,
            "data_source": DATA_SOURCE,
            "n_resamples": Check(low=100),
            "confidence": Check(low=0.5, high=1, high_open=True),
        },
    ),
)

STAGE_NAMES = tuple(stage.name for stage in STAGES)


def get_stage(name: str) -> Stage:
    """The stage called ``name``, or a ValueError listing the stages that exist."""
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise ValueError(f"unknown stage {name!r}; stages are: {', '.join(STAGE_NAMES)}")
