"""Error kinds as documented (issue 35, item 9; README "Bad input"): an argument of the wrong kind - a string,
float or None where an int or a name belongs - raises TypeError, a right kind with a bad value ValueError,
and either before anything runs or touches the disk."""
import numpy as np
import pytest

import thermosample as ts
from thermosample import bulk
from thermosample.toy import toy_factory

SPEC = "thermosample.toy:toy_factory"


def S(**kw):
    args = dict(shape=(3, 2), steps=2, backend="torch", track=False)
    args.update(kw)
    return ts.sample(toy_factory(dim=2), **args)


SAMPLE_CASES = [
    ("seed-str", dict(seed="0"), TypeError), ("seed-float", dict(seed=1.0), TypeError),
    ("seed-negative", dict(seed=-1), ValueError), ("seed-too-big", dict(seed=2 ** 64), ValueError),
    ("shape-str-entry", dict(shape=(2, "4")), TypeError), ("shape-float-entry", dict(shape=(3, 2.0)), TypeError),
    ("shape-str", dict(shape="3x2"), TypeError), ("shape-none-entry", dict(shape=(None, 2)), TypeError),
    ("shape-negative", dict(shape=(3, -2)), ValueError), ("shape-empty", dict(shape=()), ValueError),
    ("offset-float", dict(sample_offset=1.0), TypeError), ("offset-str", dict(sample_offset="1"), TypeError),
    ("offset-negative", dict(sample_offset=-1), ValueError),
    ("steps-str", dict(steps="3"), TypeError), ("backend-none", dict(backend=None), TypeError),
    ("check_every-float", dict(check_every=1.5), TypeError),
]


def cases(table):
    return [pytest.param(kwargs, kind, id=name, marks=marks) for name, kwargs, kind, *marks in table]


@pytest.mark.parametrize("kwargs,kind", cases(SAMPLE_CASES))
def test_sample_argument_kinds(kwargs, kind):
    with pytest.raises(kind):
        S(**kwargs)


BULK_CASES = [
    ("n-str", dict(n="8"), TypeError), ("n-float", dict(n=8.0), TypeError), ("n-none", dict(n=None), TypeError),
    ("n-zero", dict(n=0), ValueError), ("batch-str", dict(batch="4"), TypeError),
    ("batch-bool", dict(batch=True), TypeError), ("steps-str", dict(steps="3"), TypeError),
    ("steps-float", dict(steps=3.0), TypeError), ("steps-zero", dict(steps=0), ValueError),
    ("seed-str", dict(seed="0"), TypeError), ("seed-float", dict(seed=0.0), TypeError),
    ("seed-negative", dict(seed=-1), ValueError), ("sample_shape-str-entry", dict(sample_shape=(2, "4")), TypeError),
    ("sample_shape-str", dict(sample_shape="8"), TypeError), ("sample_shape-zero", dict(sample_shape=(0,)), ValueError),
    ("backend-none", dict(backend=None), TypeError), ("backend-int", dict(backend=1), TypeError),
    ("backend-unknown", dict(backend="gpu"), ValueError), ("solver-int", dict(solver=3), TypeError),
    ("max_shards-float", dict(max_shards=1.5), TypeError), ("max_shards-zero", dict(max_shards=0), ValueError),
    ("out-int", dict(out=3), TypeError),
]


@pytest.mark.parametrize("kwargs,kind", cases(BULK_CASES))
def test_bulk_argument_kinds_touch_no_disk(tmp_path, kwargs, kind):
    out = tmp_path / "never"
    args = dict(model=SPEC, n=4, batch=2, out=str(out), steps=2, backend="torch")
    args.update(kwargs)
    with pytest.raises(kind):
        bulk.sample_to_disk(**args)
    assert not out.exists()


def test_numpy_integers_are_ints():
    assert S(seed=np.uint64(2 ** 63), shape=(np.int64(2), np.int32(2)), sample_offset=0).samples.shape == (2, 2)
