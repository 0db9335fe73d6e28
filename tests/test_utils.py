"""fastinf.utils: the one implementation of atomic writes, timing, peak memory and tables."""

import json
import math
import os
import sys

import pytest
import torch

from fastinf import utils


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "sub" / "f.txt"
    utils.atomic_write(p, "old")
    utils.atomic_write(p, b"new bytes", durable=True)
    assert p.read_bytes() == b"new bytes"
    assert sorted(x.name for x in p.parent.iterdir()) == ["f.txt"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    p = tmp_path / "f.txt"
    utils.atomic_write(p, "old")

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        utils.atomic_write(p, "new")
    assert p.read_text() == "old" and sorted(x.name for x in tmp_path.iterdir()) == ["f.txt"]


def test_write_json_makes_tensors_and_non_finite_values_json(tmp_path):
    utils.write_json(tmp_path / "r.json", {"t": torch.tensor([1.0, 2.0]), "nan": math.nan, 3: (tmp_path, None)})
    data = json.loads((tmp_path / "r.json").read_text())
    assert data == {"t": [1.0, 2.0], "nan": None, "3": [str(tmp_path), None]}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux-only")
def test_peak_memory_sees_allocations_also_when_memory_is_reused():
    mib = 200
    for _ in range(2):  # the second block reuses memory the first one freed: it must still count
        with utils.PeakMemory() as outer:
            x = torch.ones(mib * 2**18)  # mib MiB of float32
            del x
            with utils.PeakMemory() as inner:
                y = torch.ones(mib // 2 * 2**18)
                del y
        assert 0.9 * mib <= outer.mb <= 1.5 * mib + 50, outer.mb  # nested probe kept the outer peak
        assert 0.9 * mib / 2 <= inner.mb <= 1.5 * mib / 2 + 50, inner.mb


def test_time_fn_repeats_and_percentiles():
    calls = []
    st = utils.time_fn(lambda: calls.append(1), warmup=2, repeats=5, memory=False)
    assert len(calls) == 7 and len(st.times) == 5
    st.times = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert (st.median, st.p20, st.p80, st.pct(100)) == (3.0, 1.8, 4.2, 5.0)
    st = utils.time_fn(lambda: None, repeats=1, max_repeats=50, budget=0.05, memory=False)
    assert 1 < len(st.times) <= 50


def test_tables():
    rows = [["a", "1.000"], ["bbb", "22"]]
    assert utils.text_table(["x", "value"], rows).splitlines() == [
        "x    value",
        "---  -----",
        "a    1.000",
        "bbb     22",
    ]
    md = utils.markdown_table(["x", "v"], [["a|b", 1]]).splitlines()
    assert md == ["| x | v |", "|:---|---:|", "| a/b | 1 |"]
    assert utils.fmt(None) == "—" and utils.fmt(1e-5) == "1.00e-05" and utils.fmt(0.5) == "0.500"
    assert utils.pm(0.5, 0.1) == "0.500 ± 0.100" and utils.pm(0.5, None) == "0.500" and utils.pm(None) == "—"


def test_provenance_strings():
    from fastinf.version import __version__

    assert utils.version_string(commit=False).startswith(f"fastinf {__version__} torch ")
    assert utils.device_string().startswith("cpu (")
