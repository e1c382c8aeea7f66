"""Evaluation: the rule-based scene checker and the HTML/JSON report."""
