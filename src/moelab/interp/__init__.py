"""Interpretability analysis: routing traces, specialization metrics, interventions, the HTML report."""
