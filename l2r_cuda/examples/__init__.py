"""Small, download-free experiments comparing the L2R router with linear gating.

- ``python -m l2r_cuda.examples.digits``: a small ViT-style MoE on ``sklearn``'s 8x8 digits.
- ``python -m l2r_cuda.examples.pydoc_lm``: a byte-level MoE language model on the English text of
  CPython's ``pydoc_data.topics``.

Both train every router configuration on the same budget with paired seeds and write a table,
a CSV/JSON of all runs, plots and a generated ``summary.md`` (see :mod:`l2r_cuda.examples._common`).
They need the ``examples`` extra (scikit-learn, matplotlib, tqdm); scipy is used when present.
"""
