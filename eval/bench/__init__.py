"""Performance benchmarks: the fast training path against a reference trainer, and a step estimator.

* :mod:`.reference`: the straightforward trainer (re-encode, pad to max, full logits, full matrices);
* :mod:`.train_bench`: ``yochameleon bench train`` (subprocess per run, A B A B, ablation table);
* :mod:`.estimate`: ``yochameleon bench estimate`` (memory and FLOPs of a step from a model's shape);
* :mod:`.cli`: ``register(subparsers)`` for the ``bench`` command.
"""
