"""Evaluation jobs: the code that loads models, samples, judges and writes result files.

One module per ``eval/`` entry point (``winrate``, ``reward_hacking``, ``mmlu``, ``rm_eval``,
``overopt``, ``demo``: the demo pipeline's eval stage), plus the model-backed judges (``judges``) and the PNG plots (``plots``). The
metrics, statistics, detectors and judges they call are pure and live one level up in
:mod:`rlhfstack.evaluation`; only this subpackage imports ``rlhfstack.models`` and
``rlhfstack.rollout``.
"""
