"""bench_quality on problems and seeds that no tuning has seen: a check of generalisation, not a target.

Each set is bench_quality's held-out run with other problems and noise seeds (the same peers, budgets,
reference and acceptance lines). "fresh" was first run after the free-end jump grid and revealed the
high-dimensional NFE 20 miss that moved UniPC-3's band to 18 steps, so it is no longer independent of
that change; "fresh2" was defined before either was measured and first run with both in place; "fresh3"
was defined in session 8 before any of that session's changes was measured; fresh4/fresh5 in session 9,
fresh6 in session 10, fresh7/fresh8 in session 11, fresh9-fresh12 in session 12, fresh13/fresh14 in
session 13, fresh15/fresh16 in session 14, fresh17/fresh18 in session 15 and fresh19/fresh20 in session 16,
each before that session's changes were measured on it. fresh17 and fresh18 are a new kind of problem
(spectral_mixture: image-like power-law spectra and overlapping classes), on which nothing was ever tuned;
fresh19 is six more of them, fresh20 mixes them with separated-mode mixtures. fresh21 (separated-mode
mixtures) and fresh22 (both kinds) were defined in session 18 before the 15-17-step change was measured;
fresh23 (both kinds, small) in session 23 before the surrogate-tuned fit (decisions 0029, 0030) was run on it;
fresh24 (both kinds, small) in session 24 before the 9-19-step band's pair was run at 20 steps on it.

    python -m benchmarks.bench_quality_fresh fresh|fresh2|...|fresh24 [bench_quality options] [--save-results]

Writes benchmarks/out/bench_quality_<set>.{txt,json,png}; --save-results also writes the committed summary,
benchmarks/results/bench_quality_<set>.{txt,json} (the JSON without the per-run rows). About 3 minutes per
set on two cores (10-15 minutes for the sets of 1000-2000-dimensional problems).
"""
from __future__ import annotations

import os
import sys

import thermosample as ts

from . import bench_quality as bq
from . import quality_problems as qp
from .quality_problems import Problem, aniso_mixture, mixture, spectral_mixture

HERE = os.path.dirname(os.path.abspath(__file__))

EDM = "edm"
SETS = {
    "fresh": ([
        Problem("fr-mix-d1024-k3/edm", lambda: mixture(1024, 3, 0.05, 0.15, 201).denoiser(EDM), (1024,), 256),
        Problem("fr-mix-d6-k9-aniso/vp",
                lambda: aniso_mixture(6, 9, 0.02, 0.2, 202).denoiser(ts.schedules.VPLinear()), (6,), 2048),
        Problem("fr-mix-d40-k5-unequal/cosine",
                lambda: mixture(40, 5, 0.02, 0.1, 203, weight_spread=30.0).denoiser("cosine"), (40,), 1024),
        Problem("fr-mix-d200-k24-sharp/condot", lambda: mixture(200, 24, 0.01, 0.04, 204).denoiser("condot"),
                (200,), 512),
        Problem("fr-mix-d3-k4/edm", lambda: mixture(3, 4, 0.1, 0.3, 205).denoiser(EDM), (3,), 2048),
    ], (3000, 3001, 3002, 3003)),
    "fresh2": ([
        Problem("fr2-mix-d768-k6/edm", lambda: mixture(768, 6, 0.03, 0.12, 301).denoiser(EDM), (768,), 256),
        Problem("fr2-mix-d10-k15-aniso/edm", lambda: aniso_mixture(10, 15, 0.01, 0.15, 302).denoiser(EDM), (10,),
                2048),
        Problem("fr2-mix-d64-k3-unequal/vp", lambda: mixture(64, 3, 0.05, 0.2, 303, weight_spread=10.0).denoiser(
            ts.schedules.VPLinear()), (64,), 1024),
        Problem("fr2-mix-d320-k40/cosine", lambda: mixture(320, 40, 0.02, 0.08, 304).denoiser("cosine"), (320,), 512),
        Problem("fr2-mix-d5-k6-sharp/condot", lambda: mixture(5, 6, 0.005, 0.02, 305).denoiser("condot"), (5,), 2048),
    ], (4000, 4001, 4002, 4003)),
    # defined in session 8 before any change of that session was measured
    "fresh3": ([
        Problem("fr3-mix-d1536-k5/edm", lambda: mixture(1536, 5, 0.04, 0.1, 401).denoiser(EDM), (1536,), 256),
        Problem("fr3-mix-d384-k3-aniso/vp",
                lambda: aniso_mixture(384, 3, 0.03, 0.3, 402).denoiser(ts.schedules.VPLinear()), (384,), 256),
        Problem("fr3-mix-d96-k20/edm", lambda: mixture(96, 20, 0.02, 0.1, 403).denoiser(EDM), (96,), 1024),
        Problem("fr3-mix-d12-k8-unequal/cosine",
                lambda: mixture(12, 8, 0.03, 0.15, 404, weight_spread=15.0).denoiser("cosine"), (12,), 2048),
        Problem("fr3-mix-d256-k8-sharp/condot", lambda: mixture(256, 8, 0.01, 0.03, 405).denoiser("condot"),
                (256,), 512),
        Problem("fr3-mix-d2-k5/edm", lambda: mixture(2, 5, 0.05, 0.25, 406).denoiser(EDM), (2,), 2048),
    ], (5000, 5001, 5002, 5003)),
    # defined in session 9 before any change of that session was measured; high-dimensional mixtures,
    # where the earlier sets missed, plus three low-dimensional ones
    "fresh4": ([
        Problem("fr4-mix-d640-k4/edm", lambda: mixture(640, 4, 0.04, 0.12, 501).denoiser(EDM), (640,), 256),
        Problem("fr4-mix-d1280-k8-unequal/vp", lambda: mixture(1280, 8, 0.03, 0.1, 502, weight_spread=8.0).denoiser(
            ts.schedules.VPLinear()), (1280,), 256),
        Problem("fr4-mix-d160-k12-aniso/cosine",
                lambda: aniso_mixture(160, 12, 0.02, 0.2, 503).denoiser("cosine"), (160,), 512),
        Problem("fr4-mix-d448-k2/condot", lambda: mixture(448, 2, 0.05, 0.15, 504).denoiser("condot"), (448,), 256),
        Problem("fr4-mix-d24-k6/edm", lambda: mixture(24, 6, 0.03, 0.2, 505).denoiser(EDM), (24,), 1024),
        Problem("fr4-mix-d7-k3-sharp/vp", lambda: mixture(7, 3, 0.01, 0.03, 506).denoiser(ts.schedules.VPLinear()),
                (7,), 2048),
    ], (6000, 6001, 6002, 6003)),
    # defined in session 9 after fresh4's first run, before the third NFE-20 candidate it prompted was measured
    # (not adopted) and before the shared-outlier rule was run on it
    "fresh5": ([
        Problem("fr5-mix-d896-k5/edm", lambda: mixture(896, 5, 0.03, 0.12, 601).denoiser(EDM), (896,), 256),
        Problem("fr5-mix-d320-k3-aniso/cosine",
                lambda: aniso_mixture(320, 3, 0.02, 0.25, 602).denoiser("cosine"), (320,), 256),
        Problem("fr5-mix-d2048-k4/vp", lambda: mixture(2048, 4, 0.05, 0.15, 603).denoiser(ts.schedules.VPLinear()),
                (2048,), 128),
        Problem("fr5-mix-d48-k16-unequal/condot",
                lambda: mixture(48, 16, 0.02, 0.1, 604, weight_spread=20.0).denoiser("condot"), (48,), 1024),
        Problem("fr5-mix-d4-k9/edm", lambda: mixture(4, 9, 0.02, 0.15, 605).denoiser(EDM), (4,), 2048),
        Problem("fr5-mix-d600-k10-sharp/edm", lambda: mixture(600, 10, 0.01, 0.04, 606).denoiser(EDM), (600,), 256),
    ], (7100, 7101, 7102, 7103)),
    # defined in session 10 before any change of that session was measured: four 256-1792-dimensional
    # mixtures (where fresh-fresh5 missed at NFE 10) and two low-dimensional ones as a guard
    "fresh6": ([
        Problem("fr6-mix-d512-k6/edm", lambda: mixture(512, 6, 0.03, 0.1, 701).denoiser(EDM), (512,), 256),
        Problem("fr6-mix-d1792-k3/cosine", lambda: mixture(1792, 3, 0.04, 0.12, 702).denoiser("cosine"), (1792,),
                128),
        Problem("fr6-mix-d256-k4-aniso/edm", lambda: aniso_mixture(256, 4, 0.02, 0.2, 703).denoiser(EDM), (256,),
                256),
        Problem("fr6-mix-d1024-k6-unequal/condot",
                lambda: mixture(1024, 6, 0.02, 0.1, 704, weight_spread=6.0).denoiser("condot"), (1024,), 256),
        Problem("fr6-mix-d20-k8/vp", lambda: mixture(20, 8, 0.02, 0.15, 705).denoiser(ts.schedules.VPLinear()),
                (20,), 1024),
        Problem("fr6-mix-d3-k6-sharp/edm", lambda: mixture(3, 6, 0.01, 0.04, 706).denoiser(EDM), (3,), 2048),
    ], (8100, 8101, 8102, 8103)),
    # defined in session 11 before any change of that session was measured (its tuning mixtures are seeds
    # 801-807): four 352-1280-dimensional mixtures, where NFE 20 missed, and two smaller ones as a guard
    "fresh7": ([
        Problem("fr7-mix-d704-k5/condot", lambda: mixture(704, 5, 0.03, 0.1, 901).denoiser("condot"), (704,), 256),
        Problem("fr7-mix-d1280-k4/edm", lambda: mixture(1280, 4, 0.04, 0.15, 902).denoiser(EDM), (1280,), 128),
        Problem("fr7-mix-d352-k6-aniso/vp",
                lambda: aniso_mixture(352, 6, 0.02, 0.2, 903).denoiser(ts.schedules.VPLinear()), (352,), 256),
        Problem("fr7-mix-d896-k8-sharp/cosine", lambda: mixture(896, 8, 0.01, 0.04, 904).denoiser("cosine"),
                (896,), 256),
        Problem("fr7-mix-d80-k10-unequal/edm",
                lambda: mixture(80, 10, 0.02, 0.12, 905, weight_spread=12.0).denoiser(EDM), (80,), 1024),
        Problem("fr7-mix-d8-k5/condot", lambda: mixture(8, 5, 0.03, 0.2, 906).denoiser("condot"), (8,), 2048),
    ], (8200, 8201, 8202, 8203)),
    # defined in session 11 after fresh7's first run, before the revised noise_below cuts were measured
    "fresh8": ([
        Problem("fr8-mix-d576-k4/edm", lambda: mixture(576, 4, 0.04, 0.12, 1001).denoiser(EDM), (576,), 256),
        Problem("fr8-mix-d1664-k5/vp", lambda: mixture(1664, 5, 0.03, 0.1, 1002).denoiser(ts.schedules.VPLinear()),
                (1664,), 128),
        Problem("fr8-mix-d416-k3-aniso/condot",
                lambda: aniso_mixture(416, 3, 0.02, 0.25, 1003).denoiser("condot"), (416,), 256),
        Problem("fr8-mix-d960-k6-sharp/edm", lambda: mixture(960, 6, 0.01, 0.04, 1004).denoiser(EDM), (960,), 256),
        Problem("fr8-mix-d40-k12-unequal/cosine",
                lambda: mixture(40, 12, 0.02, 0.12, 1005, weight_spread=10.0).denoiser("cosine"), (40,), 1024),
        Problem("fr8-mix-d5-k4/vp", lambda: mixture(5, 4, 0.03, 0.2, 1006).denoiser(ts.schedules.VPLinear()), (5,),
                2048),
    ], (8300, 8301, 8302, 8303)),
    # defined in session 12 before any change of that session was measured: mixed dimensions, with
    # 300-1800-dimensional ones (where NFE 6 and 20 missed) and smaller ones as a guard
    "fresh9": ([
        Problem("fr9-mix-d832-k4/cosine", lambda: mixture(832, 4, 0.03, 0.12, 1101).denoiser("cosine"), (832,), 256),
        Problem("fr9-mix-d300-k5-aniso/edm", lambda: aniso_mixture(300, 5, 0.02, 0.2, 1102).denoiser(EDM), (300,),
                256),
        Problem("fr9-mix-d1800-k3/condot", lambda: mixture(1800, 3, 0.04, 0.1, 1103).denoiser("condot"), (1800,),
                128),
        Problem("fr9-mix-d112-k14-sharp/vp",
                lambda: mixture(112, 14, 0.01, 0.05, 1104).denoiser(ts.schedules.VPLinear()), (112,), 512),
        Problem("fr9-mix-d16-k7-unequal/edm",
                lambda: mixture(16, 7, 0.02, 0.15, 1105, weight_spread=15.0).denoiser(EDM), (16,), 2048),
        Problem("fr9-mix-d3-k5/cosine", lambda: mixture(3, 5, 0.04, 0.2, 1106).denoiser("cosine"), (3,), 2048),
    ], (8400, 8401, 8402, 8403)),
    "fresh10": ([
        Problem("fr10-mix-d480-k6/vp", lambda: mixture(480, 6, 0.03, 0.1, 1201).denoiser(ts.schedules.VPLinear()),
                (480,), 256),
        Problem("fr10-mix-d1152-k4-aniso/edm",
                lambda: aniso_mixture(1152, 4, 0.03, 0.2, 1202).denoiser(EDM), (1152,), 128),
        Problem("fr10-mix-d672-k8-sharp/condot", lambda: mixture(672, 8, 0.01, 0.04, 1203).denoiser("condot"),
                (672,), 256),
        Problem("fr10-mix-d224-k3-unequal/cosine",
                lambda: mixture(224, 3, 0.03, 0.15, 1204, weight_spread=8.0).denoiser("cosine"), (224,), 512),
        Problem("fr10-mix-d28-k9/edm", lambda: mixture(28, 9, 0.02, 0.15, 1205).denoiser(EDM), (28,), 1024),
        Problem("fr10-mix-d6-k3-sharp/condot", lambda: mixture(6, 3, 0.01, 0.04, 1206).denoiser("condot"), (6,),
                2048),
    ], (8500, 8501, 8502, 8503)),
    # defined in session 12 after fresh9/fresh10's first run, before the NFE 8-14 band's default was
    # re-examined on every earlier set
    "fresh11": ([
        Problem("fr11-mix-d544-k5/edm", lambda: mixture(544, 5, 0.03, 0.12, 1301).denoiser(EDM), (544,), 256),
        Problem("fr11-mix-d1408-k3-unequal/cosine",
                lambda: mixture(1408, 3, 0.04, 0.1, 1302, weight_spread=6.0).denoiser("cosine"), (1408,), 128),
        Problem("fr11-mix-d176-k6-aniso/vp",
                lambda: aniso_mixture(176, 6, 0.02, 0.2, 1303).denoiser(ts.schedules.VPLinear()), (176,), 512),
        Problem("fr11-mix-d36-k12-sharp/condot", lambda: mixture(36, 12, 0.01, 0.05, 1304).denoiser("condot"),
                (36,), 1024),
        Problem("fr11-mix-d12-k4/edm", lambda: mixture(12, 4, 0.03, 0.2, 1305).denoiser(EDM), (12,), 2048),
        Problem("fr11-mix-d2-k7-unequal/vp",
                lambda: mixture(2, 7, 0.03, 0.15, 1306, weight_spread=10.0).denoiser(ts.schedules.VPLinear()),
                (2,), 2048),
    ], (8600, 8601, 8602, 8603)),
    "fresh12": ([
        Problem("fr12-mix-d960-k6-aniso/condot",
                lambda: aniso_mixture(960, 6, 0.03, 0.15, 1401).denoiser("condot"), (960,), 256),
        Problem("fr12-mix-d384-k10-sharp/edm", lambda: mixture(384, 10, 0.01, 0.04, 1402).denoiser(EDM), (384,), 256),
        Problem("fr12-mix-d96-k4-unequal/cosine",
                lambda: mixture(96, 4, 0.02, 0.12, 1403, weight_spread=12.0).denoiser("cosine"), (96,), 1024),
        Problem("fr12-mix-d24-k16/vp", lambda: mixture(24, 16, 0.02, 0.12, 1404).denoiser(ts.schedules.VPLinear()),
                (24,), 1024),
        Problem("fr12-mix-d8-k6-aniso/edm", lambda: aniso_mixture(8, 6, 0.02, 0.2, 1405).denoiser(EDM), (8,), 2048),
        Problem("fr12-mix-d4-k3-sharp/cosine", lambda: mixture(4, 3, 0.01, 0.05, 1406).denoiser("cosine"), (4,),
                2048),
    ], (8700, 8701, 8702, 8703)),
    "fresh13": ([
        Problem("fr13-mix-d1216-k5/edm", lambda: mixture(1216, 5, 0.03, 0.12, 1501).denoiser(EDM), (1216,), 128),
        Problem("fr13-mix-d448-k4-aniso/vp",
                lambda: aniso_mixture(448, 4, 0.02, 0.25, 1502).denoiser(ts.schedules.VPLinear()), (448,), 256),
        Problem("fr13-mix-d704-k9-sharp/cosine", lambda: mixture(704, 9, 0.01, 0.04, 1503).denoiser("cosine"),
                (704,), 256),
        Problem("fr13-mix-d64-k6-unequal/condot",
                lambda: mixture(64, 6, 0.02, 0.15, 1504, weight_spread=20.0).denoiser("condot"), (64,), 1024),
        Problem("fr13-mix-d20-k12/edm", lambda: mixture(20, 12, 0.02, 0.15, 1505).denoiser(EDM), (20,), 1024),
        Problem("fr13-mix-d3-k6-aniso/vp",
                lambda: aniso_mixture(3, 6, 0.02, 0.2, 1506).denoiser(ts.schedules.VPLinear()), (3,), 2048),
    ], (8800, 8801, 8802, 8803)),
    "fresh14": ([
        Problem("fr14-mix-d1920-k4-aniso/cosine",
                lambda: aniso_mixture(1920, 4, 0.04, 0.15, 1601).denoiser("cosine"), (1920,), 128),
        Problem("fr14-mix-d640-k7/condot", lambda: mixture(640, 7, 0.03, 0.1, 1602).denoiser("condot"), (640,), 256),
        Problem("fr14-mix-d288-k5-sharp/edm", lambda: mixture(288, 5, 0.01, 0.05, 1603).denoiser(EDM), (288,), 512),
        Problem("fr14-mix-d144-k10-unequal/vp",
                lambda: mixture(144, 10, 0.02, 0.15, 1604, weight_spread=10.0).denoiser(ts.schedules.VPLinear()),
                (144,), 512),
        Problem("fr14-mix-d10-k4/cosine", lambda: mixture(10, 4, 0.03, 0.2, 1605).denoiser("cosine"), (10,), 2048),
        Problem("fr14-mix-d2-k8-sharp/edm", lambda: mixture(2, 8, 0.01, 0.05, 1606).denoiser(EDM), (2,), 2048),
    ], (8900, 8901, 8902, 8903)),
    "fresh15": ([
        Problem("fr15-mix-d1536-k6-unequal/vp",
                lambda: mixture(1536, 6, 0.03, 0.12, 1701, weight_spread=6.0).denoiser(ts.schedules.VPLinear()),
                (1536,), 128),
        Problem("fr15-mix-d576-k3-aniso/edm", lambda: aniso_mixture(576, 3, 0.03, 0.2, 1702).denoiser(EDM), (576,),
                256),
        Problem("fr15-mix-d320-k8-sharp/condot", lambda: mixture(320, 8, 0.01, 0.04, 1703).denoiser("condot"),
                (320,), 512),
        Problem("fr15-mix-d128-k5/cosine", lambda: mixture(128, 5, 0.03, 0.15, 1704).denoiser("cosine"), (128,), 1024),
        Problem("fr15-mix-d12-k10-aniso/vp",
                lambda: aniso_mixture(12, 10, 0.02, 0.2, 1705).denoiser(ts.schedules.VPLinear()), (12,), 2048),
        Problem("fr15-mix-d3-k5-unequal/edm",
                lambda: mixture(3, 5, 0.02, 0.1, 1706, weight_spread=8.0).denoiser(EDM), (3,), 2048),
    ], (9000, 9001, 9002, 9003)),
    "fresh16": ([
        Problem("fr16-mix-d1024-k4-aniso/condot",
                lambda: aniso_mixture(1024, 4, 0.03, 0.2, 1801).denoiser("condot"), (1024,), 128),
        Problem("fr16-mix-d768-k5/cosine", lambda: mixture(768, 5, 0.03, 0.12, 1802).denoiser("cosine"), (768,), 256),
        Problem("fr16-mix-d400-k6-aniso/vp",
                lambda: aniso_mixture(400, 6, 0.02, 0.25, 1803).denoiser(ts.schedules.VPLinear()), (400,), 256),
        Problem("fr16-mix-d200-k12-sharp/edm", lambda: mixture(200, 12, 0.01, 0.05, 1804).denoiser(EDM), (200,), 512),
        Problem("fr16-mix-d48-k3-unequal/condot",
                lambda: mixture(48, 3, 0.02, 0.15, 1805, weight_spread=15.0).denoiser("condot"), (48,), 1024),
        Problem("fr16-mix-d6-k9/cosine", lambda: mixture(6, 9, 0.03, 0.15, 1806).denoiser("cosine"), (6,), 2048),
    ], (9050, 9051, 9052, 9053)),
    "fresh17": ([
        Problem("fr17-spec-d1024-k6-a1/edm", lambda: spectral_mixture(1024, 6, 1.0, 0.3, 1901).denoiser(EDM), (1024,),
                256),
        Problem("fr17-spec-d768-k4-a1.5/vp",
                lambda: spectral_mixture(768, 4, 1.5, 0.2, 1902).denoiser(ts.schedules.VPLinear()), (768,), 256),
        Problem("fr17-spec-d256-k10-a0.5/cosine",
                lambda: spectral_mixture(256, 10, 0.5, 0.5, 1903).denoiser("cosine"), (256,), 512),
        Problem("fr17-spec-d64-k3-a2/condot", lambda: spectral_mixture(64, 3, 2.0, 0.6, 1904).denoiser("condot"),
                (64,), 1024),
        Problem("fr17-spec-d2048-k2-a1/edm", lambda: spectral_mixture(2048, 2, 1.0, 0.1, 1905).denoiser(EDM),
                (2048,), 128),
        Problem("fr17-spec-d16-k5-a1-unequal/vp",
                lambda: spectral_mixture(16, 5, 1.0, 0.8, 1906, weight_spread=6.0).denoiser(ts.schedules.VPLinear()),
                (16,), 2048),
    ], (9500, 9501, 9502, 9503)),
    "fresh18": ([
        Problem("fr18-spec-d1536-k8-a1.2/cosine",
                lambda: spectral_mixture(1536, 8, 1.2, 0.4, 2001).denoiser("cosine"), (1536,), 128),
        Problem("fr18-spec-d512-k3-a1/edm", lambda: spectral_mixture(512, 3, 1.0, 0.7, 2002).denoiser(EDM), (512,),
                256),
        Problem("fr18-spec-d384-k5-a2/vp",
                lambda: spectral_mixture(384, 5, 2.0, 0.3, 2003).denoiser(ts.schedules.VPLinear()), (384,), 512),
        Problem("fr18-spec-d128-k12-a0.8-unequal/edm",
                lambda: spectral_mixture(128, 12, 0.8, 0.5, 2004, weight_spread=10.0).denoiser(EDM), (128,), 1024),
        Problem("fr18-spec-d32-k4-a1.5/condot", lambda: spectral_mixture(32, 4, 1.5, 0.2, 2005).denoiser("condot"),
                (32,), 2048),
        Problem("fr18-spec-d896-k2-a1/cosine",
                lambda: spectral_mixture(896, 2, 1.0, 0.9, 2006).denoiser("cosine"), (896,), 256),
    ], (9550, 9551, 9552, 9553)),
    "fresh19": ([
        Problem("fr19-spec-d1280-k3-a1.3/vp",
                lambda: spectral_mixture(1280, 3, 1.3, 0.25, 2101).denoiser(ts.schedules.VPLinear()), (1280,), 128),
        Problem("fr19-spec-d640-k7-a0.9/condot",
                lambda: spectral_mixture(640, 7, 0.9, 0.35, 2102).denoiser("condot"), (640,), 256),
        Problem("fr19-spec-d320-k4-a1.7/edm", lambda: spectral_mixture(320, 4, 1.7, 0.5, 2103).denoiser(EDM), (320,),
                512),
        Problem("fr19-spec-d160-k6-a1.1/cosine",
                lambda: spectral_mixture(160, 6, 1.1, 0.15, 2104).denoiser("cosine"), (160,), 1024),
        Problem("fr19-spec-d1792-k5-a0.7/edm", lambda: spectral_mixture(1792, 5, 0.7, 0.4, 2105).denoiser(EDM),
                (1792,), 128),
        Problem("fr19-spec-d24-k3-a1.5-unequal/condot",
                lambda: spectral_mixture(24, 3, 1.5, 0.6, 2106, weight_spread=8.0).denoiser("condot"), (24,), 2048),
    ], (9600, 9601, 9602, 9603)),
    "fresh20": ([
        Problem("fr20-mix-d1152-k5/vp",
                lambda: mixture(1152, 5, 0.03, 0.1, 2201).denoiser(ts.schedules.VPLinear()), (1152,), 128),
        Problem("fr20-mix-d576-k4-aniso/edm", lambda: aniso_mixture(576, 4, 0.03, 0.2, 2202).denoiser(EDM), (576,),
                256),
        Problem("fr20-spec-d448-k5-a1.4/cosine",
                lambda: spectral_mixture(448, 5, 1.4, 0.3, 2203).denoiser("cosine"), (448,), 512),
        Problem("fr20-mix-d96-k8-sharp/condot", lambda: mixture(96, 8, 0.01, 0.06, 2204).denoiser("condot"), (96,),
                1024),
        Problem("fr20-spec-d2048-k4-a1.2/vp",
                lambda: spectral_mixture(2048, 4, 1.2, 0.5, 2205).denoiser(ts.schedules.VPLinear()), (2048,), 128),
        Problem("fr20-mix-d12-k6-unequal/edm",
                lambda: mixture(12, 6, 0.03, 0.2, 2206, weight_spread=10.0).denoiser(EDM), (12,), 2048),
    ], (9650, 9651, 9652, 9653)),
    # defined in session 18 before the 15-17-step band change was measured on any set
    "fresh21": ([
        Problem("fr21-mix-d1344-k4/cosine", lambda: mixture(1344, 4, 0.03, 0.12, 2301).denoiser("cosine"), (1344,),
                128),
        Problem("fr21-mix-d704-k6-aniso/vp",
                lambda: aniso_mixture(704, 6, 0.02, 0.22, 2302).denoiser(ts.schedules.VPLinear()), (704,), 256),
        Problem("fr21-mix-d352-k5-unequal/edm",
                lambda: mixture(352, 5, 0.03, 0.15, 2303, weight_spread=8.0).denoiser(EDM), (352,), 512),
        Problem("fr21-mix-d160-k10-sharp/cosine", lambda: mixture(160, 10, 0.01, 0.05, 2304).denoiser("cosine"),
                (160,), 1024),
        Problem("fr21-mix-d1920-k3/vp",
                lambda: mixture(1920, 3, 0.04, 0.12, 2305).denoiser(ts.schedules.VPLinear()), (1920,), 128),
        Problem("fr21-mix-d20-k7-aniso/condot", lambda: aniso_mixture(20, 7, 0.03, 0.2, 2306).denoiser("condot"),
                (20,), 2048),
    ], (9700, 9701, 9702, 9703)),
    "fresh22": ([
        Problem("fr22-spec-d1664-k4-a1.1/edm", lambda: spectral_mixture(1664, 4, 1.1, 0.3, 2401).denoiser(EDM),
                (1664,), 128),
        Problem("fr22-mix-d896-k5-aniso/cosine",
                lambda: aniso_mixture(896, 5, 0.03, 0.2, 2402).denoiser("cosine"), (896,), 256),
        Problem("fr22-spec-d512-k6-a1.6/vp",
                lambda: spectral_mixture(512, 6, 1.6, 0.4, 2403).denoiser(ts.schedules.VPLinear()), (512,), 256),
        Problem("fr22-mix-d256-k6/edm", lambda: mixture(256, 6, 0.03, 0.12, 2404).denoiser(EDM), (256,), 512),
        Problem("fr22-spec-d96-k8-a0.8/condot", lambda: spectral_mixture(96, 8, 0.8, 0.5, 2405).denoiser("condot"),
                (96,), 1024),
        Problem("fr22-mix-d1024-k4-unequal/vp",
                lambda: mixture(1024, 4, 0.03, 0.1, 2406, weight_spread=6.0).denoiser(ts.schedules.VPLinear()),
                (1024,), 128),
    ], (9750, 9751, 9752, 9753)),
    "fresh23": ([
        Problem("fr23-spec-d192-k5-a1.3/edm", lambda: spectral_mixture(192, 5, 1.3, 0.35, 2501).denoiser(EDM),
                (192,), 512),
        Problem("fr23-spec-d64-k4-a1.0/vp",
                lambda: spectral_mixture(64, 4, 1.0, 0.3, 2502).denoiser(ts.schedules.VPLinear()), (64,), 1024),
        Problem("fr23-mix-d48-k5/edm", lambda: mixture(48, 5, 0.04, 0.15, 2503).denoiser(EDM), (48,), 1024),
        Problem("fr23-mix-d24-k6-aniso/cosine",
                lambda: aniso_mixture(24, 6, 0.03, 0.2, 2504).denoiser("cosine"), (24,), 1024),
        Problem("fr23-spec-d320-k6-a1.5/condot",
                lambda: spectral_mixture(320, 6, 1.5, 0.25, 2505).denoiser("condot"), (320,), 512),
        Problem("fr23-mix-d12-k4-unequal/edm",
                lambda: mixture(12, 4, 0.05, 0.2, 2506, weight_spread=4.0).denoiser(EDM), (12,), 2048),
    ], (9850, 9851, 9852, 9853)),
    "fresh24": ([
        Problem("fr24-mix-d20-k3-vsharp/vp",
                lambda: mixture(20, 3, 0.01, 0.03, 2601).denoiser(ts.schedules.VPLinear()), (20,), 2048),
        Problem("fr24-spec-d128-k4-a1.2/edm", lambda: spectral_mixture(128, 4, 1.2, 0.3, 2602).denoiser(EDM),
                (128,), 1024),
        Problem("fr24-mix-d64-k12-sharp/edm", lambda: mixture(64, 12, 0.02, 0.05, 2603).denoiser(EDM), (64,), 1024),
        Problem("fr24-mix-d10-k5-aniso/condot",
                lambda: aniso_mixture(10, 5, 0.03, 0.2, 2604).denoiser("condot"), (10,), 2048),
        Problem("fr24-spec-d256-k5-a1.4/cosine",
                lambda: spectral_mixture(256, 5, 1.4, 0.3, 2605).denoiser("cosine"), (256,), 512),
        Problem("fr24-mix-d32-k4-unequal/edm",
                lambda: mixture(32, 4, 0.03, 0.12, 2606, weight_spread=8.0).denoiser(EDM), (32,), 1024),
    ], (9950, 9951, 9952, 9953)),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SETS:
        print(__doc__)
        return 2
    name, rest = argv[0], argv[1:]
    qp.HELDOUT[:], qp.HELDOUT_SEEDS = SETS[name]
    stem = os.path.join(HERE, "out", f"bench_quality_{name}")
    return bq.main(["--heldout", "--threads", "1", "--json", stem + ".json", "--out", stem + ".txt",
                    "--plot", stem + ".png", "--results-stem", os.path.join(HERE, "results", f"bench_quality_{name}"),
                    *rest])


if __name__ == "__main__":
    sys.exit(main())
