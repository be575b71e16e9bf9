"""Experiments on the method, each with a known answer, one per file; run from the repository root:

    python -m experiments.mechanism   # one layer, K tasks: when can routing beat LoRA?
    python -m experiments.conflict    # the toy VLM with its task conflict turned up
    python -m experiments.routers     # learning curves on the conflict knob: routers that find the task?
    python -m experiments.analysis    # the paper's analyses on the toy: interference, selection maps, ablations
    python -m experiments.bench       # what a MixLoRA layer costs next to LoRA

common.py holds what they share. Each writes its figures and tables to experiments/results/<name>/,
beside that experiment's page (README.md there).
"""
