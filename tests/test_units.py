"""Counts print in three digits at every scale: a tiny test model's MACs must not read '0.0 G'."""

import re

import pytest

from mosaic_core.units import format_bytes, format_count


@pytest.mark.parametrize("value, unit, expected", [
    (0, "", "0"),
    (999, "", "999"),
    (1_000, "", "1 k"),
    (48_240, "", "48.2 k"),
    (33_792_000, "", "33.8 M"),
    (8_490_000_000, "", "8.49 G"),
    (5_708_000_000_000, "", "5.71 T"),
    (119_000_000_000_000, "", "119 T"),
    (2_500_000, "B", "2.5 MB"),
    (-1_500, "", "-1.5 k"),
])
def test_counts_read_in_three_digits_with_a_suffix(value, unit, expected):
    assert format_count(value, unit) == expected


@pytest.mark.parametrize("count, expected", [
    (0, "0 B"),
    (1023, "1023 B"),
    (1024, "1.0 KiB"),
    (288 * 1024, "288.0 KiB"),
    (int(2.5 * (1 << 30)), "2.5 GiB"),
])
def test_bytes_take_binary_suffixes(count, expected):
    assert format_bytes(count) == expected


def test_a_tiny_models_plan_prints_its_macs_and_parameters_in_a_readable_unit(tiny_pixel_folder):
    from conftest import run_cli

    run = run_cli("plan", "--model", str(tiny_pixel_folder), "--sparsity", "0.3")
    assert run.returncode == 0, run.stderr
    macs = next(line for line in run.stdout.splitlines() if line.startswith("block-linear MACs"))
    params = next(line for line in run.stdout.splitlines() if line.startswith("prunable-layer parameters"))
    # three significant digits with a suffix, never a scaled-away '0.0 G' / '0.0 M'
    assert re.search(r"dense [1-9][0-9.]* [kMGT]?, staged [1-9][0-9.]* [kMGT]?,", macs), macs
    assert re.search(r"dense [1-9][0-9.]* [kMGT]?, three stage networks [1-9][0-9.]* [kMGT]? ", params), params
