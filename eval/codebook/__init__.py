"""Codebook utilisation reports: how a visual tokenizer's codes are used, seen through its token cache.

``eval.codebook.report.codebook_report(cache_dir, out_dir, tokenizer_dir=None, ...)`` is the API;
``mimflow codebook report`` the command (``eval.codebook.cli``).
"""
