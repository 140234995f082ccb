"""The mask set stage 05 writes and stage 06 reads: names, columns, round trip, load errors."""

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file, save_file

from moecollab.mask_set import MaskSet, mask_label, mask_name


def planted_mask_set() -> MaskSet:
    """One mask of every kind stage 05 makes, on 2 layers of 4 experts."""
    keep = np.array([[True, True, False, True], [True, False, False, True]])
    mask_set = MaskSet()
    mask_set.add(keep, method="caep", prune_ratio=0.25, role="method", scope="global")
    mask_set.add(keep, method="caep_as_written", prune_ratio=0.5, role="variant",
                 scope="global")
    mask_set.add(~keep, method="reap_global", prune_ratio=0.5, role="variant", scope="global")
    for seed in (0, 1):
        mask_set.add(keep, method="random", prune_ratio=0.25, seed=seed, role="baseline",
                     scope="global")
    mask_set.add(keep, method="caep", prune_ratio=0.25, variant="k1=0.9", role="ablation",
                 scope="global")
    mask_set.add(keep, method="domain", prune_ratio=0.5, field="law", role="domain",
                 scope="global")
    return mask_set


@pytest.mark.parametrize(("fields", "old_format"), [
    # Each name as stage 05 wrote it with f-strings before the mask set existed.
    ({"method": "caep", "prune_ratio": 0.25}, "caep@{ratio:g}"),
    ({"method": "caep_as_written", "prune_ratio": 0.5}, "caep_as_written@{ratio:g}"),
    ({"method": "output_impact_global", "prune_ratio": 0.75}, "output_impact_global@{ratio:g}"),
    ({"method": "random", "prune_ratio": 0.25, "seed": 3}, "random-s{seed}@{ratio:g}"),
    ({"method": "domain", "prune_ratio": 0.5, "field": "computer_science"},
     "domain-{field}@{ratio:g}"),
    ({"method": "caep", "prune_ratio": 0.25, "variant": "k1=0.9"}, "caep[{variant}]@{ratio:g}"),
    ({"method": "caep", "prune_ratio": 0.5, "variant": "sample-level X"},
     "caep[{variant}]@{ratio:g}"),
])
def test_names_keep_the_formats_of_the_old_f_strings(fields, old_format):
    old = old_format.format(ratio=fields["prune_ratio"], seed=fields.get("seed"),
                            field=fields.get("field"), variant=fields.get("variant"))
    assert mask_name(**fields) == old
    assert mask_label(fields["method"], seed=fields.get("seed"), field=fields.get("field"),
                      variant=fields.get("variant")) == old.split("@")[0]


def test_the_table_holds_each_mask_s_fields_and_counts():
    mask_set = planted_mask_set()
    table = mask_set.table.set_index("name")
    assert list(mask_set) == list(table.index) == [
        "caep@0.25", "caep_as_written@0.5", "reap_global@0.5", "random-s0@0.25",
        "random-s1@0.25", "caep[k1=0.9]@0.25", "domain-law@0.5"]
    assert list(mask_set.table.columns) == [
        "name", "method", "prune_ratio", "seed", "variant", "field", "role", "scope", "kept",
        "kept_share", "min_kept_in_a_layer", "kept_per_layer"]
    assert table.loc["random-s1@0.25", "method"] == "random"
    assert table.loc["random-s1@0.25", "seed"] == 1
    assert table["seed"].isna().sum() == 5
    assert table.loc["domain-law@0.5", ["method", "field"]].tolist() == ["domain", "law"]
    assert table.loc["caep[k1=0.9]@0.25", ["method", "variant"]].tolist() == ["caep", "k1=0.9"]
    assert table["field"].notna().sum() == 1 and table["variant"].notna().sum() == 1
    assert table["prune_ratio"].tolist() == [0.25, 0.5, 0.5, 0.25, 0.25, 0.25, 0.5]
    assert table.loc["caep@0.25", ["kept", "kept_share", "min_kept_in_a_layer",
                                   "kept_per_layer"]].tolist() == [5, 0.625, 2, "3 2"]
    assert table.loc["reap_global@0.5", "kept_per_layer"] == "1 2"
    assert mask_set.find("domain", 0.5, field="law").dtype == bool
    assert list(mask_set.at(0.25)) == ["caep", "random-s0", "random-s1", "caep[k1=0.9]"]
    with pytest.raises(KeyError, match="random-s7@0.25"):
        mask_set.find("random", 0.25, seed=7)


def test_save_then_load_gives_the_same_set_and_the_catalogue_layout(tmp_path):
    mask_set = planted_mask_set()
    mask_set.save(tmp_path)
    loaded = MaskSet.load(tmp_path)
    pd.testing.assert_frame_equal(loaded.table, mask_set.table)
    assert list(loaded) == list(mask_set)
    for name in mask_set:
        assert loaded[name].dtype == bool and (loaded[name] == mask_set[name]).all()
    # masks.csv keeps the layout it had before the mask set: stage 05's rows as it wrote them.
    lines = (tmp_path / "masks.csv").read_text().splitlines()
    assert lines[0] == ("name,method,ratio,role,scope,kept,kept_share,min_kept_in_a_layer,"
                        "kept_per_layer,seed,variant,domain")
    assert lines[1] == "caep@0.25,caep,0.25,method,global,5,0.625,2,3 2,,,"
    assert lines[5] == "random-s1@0.25,random,0.25,baseline,global,5,0.625,2,3 2,1.0,,"
    assert lines[6] == "caep[k1=0.9]@0.25,caep-ablation,0.25,ablation,global,5,0.625,2,3 2,,k1=0.9,"
    assert lines[7] == "domain-law@0.5,caep-domain,0.5,domain,global,5,0.625,2,3 2,,,law"
    assert load_file(str(tmp_path / "masks.safetensors"))["caep@0.25"].dtype == np.uint8


def test_an_empty_set_round_trips(tmp_path):
    MaskSet().save(tmp_path)
    assert len(MaskSet.load(tmp_path)) == 0


def _rewrite_csv(folder, change):
    table = change(pd.read_csv(folder / "masks.csv"))
    table.to_csv(folder / "masks.csv", index=False)


def _rewrite_masks(folder, change):
    stored = load_file(str(folder / "masks.safetensors"))
    change(stored)
    save_file(stored, str(folder / "masks.safetensors"))


def _drop_row(table):
    return table.drop(index=0)


def _rename_row(table):
    table.loc[0, ["name", "ratio"]] = ["caep@0.3", 0.3]
    return table


def _bad_count(table):
    table.loc[0, "kept"] = 6
    return table


def _bad_field(table):
    table.loc[4, "seed"] = 7.0   # random-s1@0.25 says seed 7
    return table


def _drop_mask(stored):
    del stored["caep@0.25"]


def _float_mask(stored):
    stored["caep@0.25"] = stored["caep@0.25"].astype(np.float32)


def _two_valued(stored):
    stored["caep@0.25"] = stored["caep@0.25"] * 2


def _flat_mask(stored):
    stored["caep@0.25"] = stored["caep@0.25"].ravel()


def _other_shape(stored):
    stored["random-s0@0.25"] = np.ones((2, 5), dtype=np.uint8)


@pytest.mark.parametrize(("rewrite", "change", "match"), [
    (_rewrite_csv, _drop_row, r"masks\.safetensors in .* names 1 mask\(s\) that masks\.csv "
                              r"lacks: caep@0\.25"),
    (_rewrite_csv, _rename_row, r"masks\.csv in .* names 1 mask\(s\) that masks\.safetensors "
                                r"lacks: caep@0\.3"),
    (_rewrite_csv, _bad_count, r"does not count the experts .* for caep@0\.25"),
    (_rewrite_csv, _bad_field, r"names masks against their fields: random-s1@0\.25 \(its "
                               r"fields make random-s7@0\.25\)"),
    (_rewrite_masks, _drop_mask, r"masks\.csv in .* names 1 mask\(s\) that masks\.safetensors "
                                 r"lacks: caep@0\.25"),
    (_rewrite_masks, _float_mask, r"mask 'caep@0\.25' .* must hold 0 or 1 as uint8; got dtype "
                                  r"float32"),
    (_rewrite_masks, _two_valued, r"mask 'caep@0\.25' .* must hold 0 or 1"),
    (_rewrite_masks, _flat_mask, r"mask 'caep@0\.25' .* has shape \(8,\)"),
    (_rewrite_masks, _other_shape, r"mask 'random-s0@0\.25' .* has shape \(2, 5\); every "
                                   r"keep-mask must have the same shape .*\(2, 4\)"),
])
def test_load_refuses_files_that_disagree(tmp_path, rewrite, change, match):
    planted_mask_set().save(tmp_path)
    rewrite(tmp_path, change)
    with pytest.raises(ValueError, match=match) as error:
        MaskSet.load(tmp_path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("missing", ["masks.safetensors", "masks.csv"])
def test_load_names_a_missing_file_and_the_stage_that_writes_it(tmp_path, missing):
    planted_mask_set().save(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"no {missing} in .*; run stage 05_pruning"):
        MaskSet.load(tmp_path)


def test_load_names_a_missing_column(tmp_path):
    planted_mask_set().save(tmp_path)
    _rewrite_csv(tmp_path, lambda table: table.drop(columns="ratio"))
    with pytest.raises(ValueError, match="lacks the column.s. prune_ratio"):
        MaskSet.load(tmp_path)


@pytest.mark.parametrize(("mask", "fields", "match"), [
    (np.ones((2, 4), dtype=bool), {"method": "caep", "prune_ratio": 0.25}, "already in the set"),
    (np.ones((2, 3), dtype=bool), {"method": "seer", "prune_ratio": 0.25},
     r"shape \(2, 4\); got \(2, 3\)"),
    (np.ones(4, dtype=bool), {"method": "seer", "prune_ratio": 0.25}, "shape"),
    (np.full((2, 4), 0.5), {"method": "seer", "prune_ratio": 0.25}, "True/False"),
    (np.ones((2, 4), dtype=bool), {"method": "seer", "prune_ratio": 1.0}, "prune_ratio"),
    (np.ones((2, 4), dtype=bool), {"method": "", "prune_ratio": 0.25}, "method"),
    (np.ones((2, 4), dtype=bool), {"method": "random", "prune_ratio": 0.25, "seed": -1},
     "seed"),
    (np.ones((2, 4), dtype=bool), {"method": "seer", "prune_ratio": 0.25, "kept": 3},
     "details may not set kept"),
])
def test_add_refuses_bad_masks_and_fields(mask, fields, match):
    mask_set = MaskSet()
    mask_set.add(np.ones((2, 4), dtype=bool), method="caep", prune_ratio=0.25)
    with pytest.raises(ValueError, match=match):
        mask_set.add(mask, **fields)


def _study_mask_set() -> MaskSet:
    """Masks as stage 05 makes them: roles method, baseline, variant, ablation and domain."""
    mask_set = MaskSet()
    keep = np.array([[True, True, False, False], [True, False, True, False]])
    for ratio in (0.5, 0.25):   # added out of order: the plan sorts the ratios
        mask_set.add(keep, method="caep", prune_ratio=ratio, role="method")
        mask_set.add(keep, method="caep_as_written", prune_ratio=ratio, role="variant")
        mask_set.add(keep, method="reap", prune_ratio=ratio, role="baseline")
        for seed in range(3):
            mask_set.add(keep, method="random", prune_ratio=ratio, seed=seed, role="baseline")
        mask_set.add(keep, method="caep", prune_ratio=ratio, variant="k1=0.9", role="ablation")
    for field in ("law", "physics"):
        mask_set.add(keep, method="domain", prune_ratio=0.5, field=field, role="domain")
    return mask_set


def test_the_evaluation_plan_reads_what_each_mask_is_from_its_role():
    plan = _study_mask_set().evaluation_plan(n_random=2, variant_ratios=[0.5])
    assert plan.ratios == [0.25, 0.5]
    assert plan.caep == {0.25: "caep@0.25", 0.5: "caep@0.5"}
    assert plan.baselines[0.25] == {"reap": ["reap@0.25"],
                                    "random": ["random-s0@0.25", "random-s1@0.25"]}
    assert plan.domain == {"law": "domain-law@0.5", "physics": "domain-physics@0.5"}
    assert plan.methods(0.5) == {"caep": ["caep@0.5"], "reap": ["reap@0.5"],
                                 "random": ["random-s0@0.5", "random-s1@0.5"]}
    # Per ratio: CAEP, the variants asked for, the baselines; then the per-field masks. The
    # ablations and the third random seed are not evaluated.
    assert plan.names == [
        "caep@0.25", "reap@0.25", "random-s0@0.25", "random-s1@0.25",
        "caep@0.5", "caep_as_written@0.5", "reap@0.5", "random-s0@0.5", "random-s1@0.5",
        "domain-law@0.5", "domain-physics@0.5"]
    every_variant = _study_mask_set().evaluation_plan(n_random=1, variant_ratios=[0.25, 0.5])
    assert "caep_as_written@0.25" in every_variant.names
    assert every_variant.baselines[0.5]["random"] == ["random-s0@0.5"]


def test_an_evaluation_plan_needs_the_roles_stage_05_gives():
    mask_set = MaskSet()
    mask_set.add(np.ones((1, 2), dtype=bool), method="caep", prune_ratio=0.5)
    with pytest.raises(ValueError, match="no 'role' column"):
        mask_set.evaluation_plan(n_random=1)
