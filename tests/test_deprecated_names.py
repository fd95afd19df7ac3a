"""Old public names keep working for a release with a deprecation warning (issue 36, item 7).
`thermosample.bulk:toy_factory` was the documented toy model (README, until it moved to thermosample.toy);
`git log -S` finds the other moved public names listed in MOVED_ELSEWHERE, whose shims belong to other files."""
import importlib
import warnings

import pytest
import torch

import thermosample as ts
import thermosample.apps.cli as cli
from thermosample import bulk
from thermosample.errors import ThermosampleDeprecationWarning


def test_bulk_toy_factory_still_works_and_warns():
    with pytest.warns(DeprecationWarning, match="thermosample.toy.toy_factory"):
        old = bulk.toy_factory
    assert old is ts.toy.toy_factory
    with pytest.raises(AttributeError):
        bulk.no_such_name  # noqa: B018


def test_the_old_model_name_in_the_cli(tmp_path, capsys):
    out = tmp_path / "o"
    with warnings.catch_warnings(record=True) as caught:
        rc = cli.main(["sample", "--model", "thermosample.bulk:toy_factory", "--n", "4", "--batch", "2",
                       "--steps", "2", "--backend", "torch", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    # the CLI turns its own deprecations on (Python hides a DeprecationWarning raised outside __main__)
    assert [str(w.message) for w in caught if w.category is ThermosampleDeprecationWarning], caught
    want = ts.sample(ts.toy.toy_factory(), (4, 8), steps=2, backend="torch")
    assert torch.equal(bulk.load_shards(str(out))["samples"], want.samples)


def test_the_warning_is_a_deprecation_warning():
    assert issubclass(ThermosampleDeprecationWarning, DeprecationWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        bulk.build_denoiser("thermosample.toy:toy_factory")    # the new name does not warn


# Public names documented once (README or docs/api.md) that moved: (old module, name or None for the module
# itself, where it lives now).
MOVED_ELSEWHERE = [
    ("thermosample.digits", None, "thermosample.apps.digits"),                   # README "The digits model"
    ("thermosample.cli", "main", "thermosample.apps.cli"),                       # the old console-script target
    ("thermosample.solvers", "recommended", "thermosample.auto"),                # docs/api.md
    ("thermosample.solvers", "resolve_auto", "thermosample.auto.resolve"),       # docs/api.md
    ("thermosample.ops", "validate_step_args", "thermosample.ops.check"),       # README (Reliability)
]


@pytest.mark.parametrize("old_module,name,now", MOVED_ELSEWHERE, ids=[f"{m}.{n or ''}" for m, n, _ in MOVED_ELSEWHERE])
def test_other_moved_names(old_module, name, now):
    with pytest.warns(ThermosampleDeprecationWarning, match=now.split("(")[0]):
        module = importlib.import_module(old_module)
        if name is not None:
            getattr(module, name)


def test_the_moved_names_do_what_they_did():
    from thermosample import apps, auto, ops, solvers
    with pytest.warns(ThermosampleDeprecationWarning):
        assert solvers.recommended(10) == auto.recommended(10)
    with pytest.warns(ThermosampleDeprecationWarning):
        checked = ops.validate_step_args([torch.ones(2, 3)], [0.5], 0.0, 0, 0, 0, False, 0.0, 0.0, 0, 1, None)
    assert isinstance(checked, tuple) and torch.equal(checked[0], torch.ones(2, 3))
    with pytest.warns(ThermosampleDeprecationWarning), pytest.raises(ValueError, match="coeffs"):
        ops.validate_step_args([torch.ones(2, 3)], [0.5, 1.0], 0.0, 0, 0, 0, False, 0.0, 0.0, 0, 1, None)
    import thermosample.apps.cli
    assert importlib.import_module("thermosample.cli").main is thermosample.apps.cli.main
    assert importlib.import_module("thermosample.digits") is importlib.import_module("thermosample.apps.digits")
    assert apps
