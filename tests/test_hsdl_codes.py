"""The HSDL codes stage 03 writes and stage 04 reads: bytes, round trip, load errors."""

import numpy as np
import pytest
from safetensors.numpy import save_file

from moecollab.hsdl_codes import CODES_FILE, HSDLCodes


def planted_levels(n_rows: int = 5) -> list[np.ndarray]:
    """Codes as ``HSDL.transform`` returns them: float32, level 1 wider than level 2."""
    generator = np.random.default_rng(0)
    return [generator.random((n_rows, 4), dtype=np.float32),
            generator.random((n_rows, 2), dtype=np.float32)]


def test_save_writes_the_bytes_of_the_old_raw_save_file(tmp_path):
    levels = planted_levels()
    # What stage 03 wrote before the codes had a type.
    save_file({f"level{index + 1}": level_codes for index, level_codes in enumerate(levels)},
              str(tmp_path / "old.safetensors"))
    HSDLCodes(levels).save(tmp_path / CODES_FILE)
    assert (tmp_path / CODES_FILE).read_bytes() == (tmp_path / "old.safetensors").read_bytes()
    # Written atomically: no temporary file is left beside it.
    assert sorted(path.name for path in tmp_path.iterdir()) == [CODES_FILE, "old.safetensors"]


def test_round_trip_keeps_levels_in_order(tmp_path):
    levels = planted_levels()
    HSDLCodes(levels).save(tmp_path / CODES_FILE)
    codes = HSDLCodes.load(tmp_path / CODES_FILE, n_tokens=5)
    assert (codes.n_levels, codes.n_rows) == (2, 5)
    for number, expected in enumerate(levels, start=1):
        np.testing.assert_array_equal(codes.level(number), expected)
        assert codes.level(number).dtype == np.float32
    with pytest.raises(ValueError, match=r"level must be an int in \[1, 2\]; got 3"):
        codes.level(3)


def test_ten_levels_are_read_by_number_not_by_name(tmp_path):
    levels = [np.full((2, 1), number, dtype=np.float32) for number in range(1, 11)]
    HSDLCodes(levels).save(tmp_path / CODES_FILE)
    codes = HSDLCodes.load(tmp_path / CODES_FILE)
    assert [float(codes.level(number)[0, 0]) for number in range(1, 11)] == list(range(1, 11))


def test_codes_of_a_sample_level_fit_are_refused_where_tokens_are_needed(tmp_path):
    HSDLCodes(planted_levels(n_rows=3)).save(tmp_path / CODES_FILE)
    assert HSDLCodes.load(tmp_path / CODES_FILE).n_rows == 3  # without n_tokens: read as is
    with pytest.raises(ValueError, match=(
            r"has 3 rows of codes but the trace has 1,000 tokens: stage 03 was fitted at sample "
            r"level \(or on another trace\); token-level codes are needed \(run 03_hsdl with "
            r"level=token\)")):
        HSDLCodes.load(tmp_path / CODES_FILE, n_tokens=1000)


@pytest.mark.parametrize(("arrays", "match"), [
    ({}, "has no levels; HSDL codes have at least level1"),
    ({"level1": np.ones((2, 2), np.float32), "level3": np.ones((2, 2), np.float32)},
     r"holds keys \['level1', 'level3'\]; HSDL codes are stored under level1, level2, … "
     r"without gaps \(expected \['level1', 'level2'\]\)"),
    ({"codes": np.ones((2, 2), np.float32)}, r"holds keys \['codes'\]"),
    ({"level1": np.ones((2, 2), np.float32), "level01": np.ones((2, 2), np.float32)},
     r"holds keys \['level01', 'level1'\]"),
    ({"level1": np.ones(4, np.float32)},
     r"level1 of .* is float32 of shape \(4,\); HSDL codes are 2-D float arrays"),
    ({"level1": np.ones((2, 2), np.float32), "level2": np.ones((2, 2), np.int64)},
     r"level2 of .* is int64 of shape \(2, 2\)"),
    ({"level1": np.ones((5, 4), np.float32), "level2": np.ones((4, 2), np.float32)},
     r"the levels of .* have different row counts \(level1: 5, level2: 4\); every level "
     "codes the same rows"),
])
def test_a_malformed_file_is_refused_with_what_is_wrong(tmp_path, arrays, match):
    path = tmp_path / CODES_FILE
    save_file(arrays, str(path))
    with pytest.raises(ValueError, match=match):
        HSDLCodes.load(path)


def test_a_missing_file_names_the_stage_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="no HSDL codes at .*; run stage 03_hsdl"):
        HSDLCodes.load(tmp_path / CODES_FILE)


def test_codes_are_checked_when_made_too():
    with pytest.raises(ValueError, match="HSDLCodes has no levels"):
        HSDLCodes(())
    with pytest.raises(ValueError, match=r"level1 of HSDLCodes is list"):
        HSDLCodes(([[0.5]],))
    with pytest.raises(ValueError, match="different row counts"):
        HSDLCodes((np.ones((2, 1)), np.ones((3, 1))))


def test_load_checks_the_levels_once(tmp_path, monkeypatch):
    from moecollab import hsdl_codes

    places = []
    check = hsdl_codes._check_levels
    monkeypatch.setattr(hsdl_codes, "_check_levels",
                        lambda levels, *, where: places.append(where) or check(levels,
                                                                               where=where))
    HSDLCodes(planted_levels()).save(tmp_path / CODES_FILE)
    places.clear()
    HSDLCodes.load(tmp_path / CODES_FILE)
    assert places == [str(tmp_path / CODES_FILE)]  # once, naming the file
