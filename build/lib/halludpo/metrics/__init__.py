"""Hallucination metrics: CHAIR, POPE and the text pipelines they use."""
