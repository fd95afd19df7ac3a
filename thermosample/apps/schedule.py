"""`thermosample schedule`: calibrate a time grid (ts.thermo_grid) for an embedded model or the user's own
(`--model MODULE:FACTORY`), print it beside karras and save it for `thermosample sample --grid`."""
from __future__ import annotations

import numpy as np

from ..auto import SamplerConfig
from ..calibrate import CalibrationOptions, thermo_grid


def _count(n) -> str:
    return "uncounted" if n is None else f"{n:,}"      # None: a Denoiser subclass, whose calls are not metered


def main(args) -> int:
    """`thermosample schedule`: calibrate a grid for the mixture oracle or the digits model and print it."""
    from .. import grids, toy

    if args.model == "digits":
        from . import digits
        den, shape = digits.load_denoiser(), digits.SHAPE
    elif args.model == "mixture":
        mix = toy.default_mixture()
        den, shape = mix.denoiser("condot"), (mix.dim,)
    else:
        from ..bulk import build_denoiser
        den = build_denoiser(args.model, getattr(args, "weights", None), **dict(getattr(args, "factory_arg", [])))
        shape = getattr(args, "shape", None) or getattr(den, "sample_shape", None)
        if shape is None:
            raise ValueError("pass --shape C,H,W (the shape of one sample): the factory's denoiser has no sample_shape")
    cost = getattr(args, "cost", None)
    options = CalibrationOptions(cost=int(cost) if str(cost).isdigit() else cost, pilot_steps=args.pilot_steps,
                                 pilot_batch=args.pilot_batch, pilot_rows=getattr(args, "pilot_rows", 64),
                                 boundary_pool=getattr(args, "boundary_pool", 0),
                                 progress=getattr(args, "progress", None))
    g = thermo_grid(den, args.steps, solver=args.solver, method=getattr(args, "method", None),
                    sample_shape=tuple(shape), backend=getattr(args, "backend", "auto"), options=options)
    sch = den.schedule
    k = np.append(grids.karras(args.steps, sch.sigma_min, sch.sigma_max), 0.0)
    chosen = f" (chose {g.meta['chosen']})" if "chosen" in g.meta else ""
    auto = isinstance(g, SamplerConfig)
    shown = {k: ("fitted" if k == "corrections" else v) for k, v in (g.options if auto else {}).items()}
    solver = (g.solver if auto else g.meta["solver"]) + (" " + str(shown) if shown else "")   # corrections: per step
    if auto:
        solver += " (chosen by solver auto)"
    print(f"calibrated grid for {args.model} ({sch!r}), {args.steps} steps of {solver}, method "
          f"{g.meta['method']}{chosen}; calibration: {_count(g.meta['calibration_rows'])} model rows in "
          f"{_count(g.meta['calibration_calls'])} calls, {g.meta['calibration_seconds']:.1f} s")
    print(f"{'i':>3} {'sigma (calibrated)':>19} {'t':>9} {'sigma (karras)':>15}")
    for i, (a, b) in enumerate(zip(np.asarray(g.sigmas if auto else g), k)):
        t = float(sch.sigma_to_t(a)) if a > 0 else 0.0
        print(f"{i:>3} {a:>19.6g} {t:>9.5f} {b:>15.6g}")
    if args.save:
        print(f"wrote {g.save(args.save)}")
    return 0
