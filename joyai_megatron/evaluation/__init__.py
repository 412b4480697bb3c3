"""Evaluation of any stage's checkpoint: lm-eval on local tasks, MTP draft acceptance (``eval``)."""
