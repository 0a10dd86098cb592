"""The ``mimflow`` application: the command line, ``mimflow run`` and its summary.

It sits above the stages (``tokenizer/``, ``pretrain/``, ``eval/``), which sit above the shared core
(``pipeline/``). Nothing below imports it.
"""
