"""The recommended 9-14 step configuration runs in bulk (issue 35, item 1): solver="auto" there chooses deis
with fitted per-step corrections, which the bulk pre-flight check must run on the config's whole grid (one
step of it refused every such config). Through `thermosample sample --grid` and ts.bulk.sample_to_disk, the
shards equal ts.sample on the same config; a config whose corrections do not fit its grid is refused before
the output folder exists (item 9)."""
import numpy as np
import pytest
import torch

import thermosample as ts
import thermosample.apps.cli as cli
from thermosample import bulk
from thermosample.toy import toy_factory

SPEC = "thermosample.toy:toy_factory"
STEPS = 10


def config(steps=STEPS, corrections=None):
    """A SamplerConfig of the shape thermo_grid(solver="auto") returns at 9-14 steps: deis with one fitted
    correction per step (2 min(2, i) coefficients at step i)."""
    schedule = toy_factory().schedule
    sigmas = np.append(ts.grids.karras(steps, schedule.sigma_min, schedule.sigma_max), 0.0)
    if corrections is None:
        corrections = [[0.02 * (-1) ** j for j in range(2 * min(2, i))] for i in range(steps)]
    return ts.SamplerConfig("deis", {"corrections": corrections}, sigmas, meta={"method": "select"})


def test_bulk_runs_a_config_with_per_step_corrections(tmp_path):
    cfg = config()
    res = bulk.sample_to_disk(SPEC, 6, 4, str(tmp_path / "o"), grid=cfg, backend="torch")
    assert res.written == [0, 1]
    want = ts.sample(toy_factory(), (6, 8), grid=cfg, backend="torch")
    assert torch.equal(bulk.load_shards(str(tmp_path / "o"))["samples"], want.samples)


def test_the_cli_runs_a_saved_auto_config(tmp_path, capsys):
    path = config().save(str(tmp_path / "g.json"))
    out = tmp_path / "o"
    rc = cli.main(["sample", "--model", SPEC, "--n", "8", "--batch", "4", "--out", str(out), "--solver", "auto",
                   "--grid", path, "--backend", "torch"])
    assert rc == 0, capsys.readouterr().err
    assert "solver deis" in capsys.readouterr().out
    want = ts.sample(toy_factory(), (8, 8), grid=ts.SamplerConfig.load(path), backend="torch")
    assert torch.equal(bulk.load_shards(str(out))["samples"], want.samples)


@pytest.mark.parametrize("corrections", [[[]] * 5, [[]] * 11, [[]] + [[0.1, float("nan")]] * 9,
                                         [[]] + [[0.1]] * 9, [[]]],
                         ids=["short", "long", "nan", "per-step-length", "one-step"])
def test_corrections_that_do_not_fit_the_grid_leave_no_folder(tmp_path, capsys, corrections):
    path = config(corrections=corrections).save(str(tmp_path / "g.json"))
    out = tmp_path / "o"
    rc = cli.main(["sample", "--model", SPEC, "--n", "8", "--batch", "4", "--out", str(out), "--grid", path,
                   "--backend", "torch"])
    err = capsys.readouterr().err
    assert rc == 2 and "corrections" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()                   # no .thermosample.lock, no manifest.json
    with pytest.raises(ValueError, match="corrections"):
        bulk.sample_to_disk(SPEC, 8, 4, str(out), grid=config(corrections=corrections), backend="torch")
    assert not out.exists()
