"""Experiments comparing the L2R router with linear gating, outside the installed package.

- ``python -m experiments.multidomain_lm``: a byte-level MoE language model on prose, code and
  Unicode data records from the CPython install (no download).
- ``python -m experiments.digits``: a small ViT-style MoE on scikit-learn's 8x8 digits.

Each trains every arm (:mod:`experiments.arms`) on the same budget with paired seeds and writes a
report to ``results/<task>/`` (:mod:`experiments.report`); ``--quick`` is the CI smoke test and
``--pilot-scale`` the pilot that fixes L2R's scale init. Needs scikit-learn (which brings scipy),
matplotlib and tqdm.
"""
