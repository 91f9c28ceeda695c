"""Evaluation-only paraphrases of ``shapes`` captions, in a style the training templates never use.

``evaluate-text`` asks for the factors of aligned images in these words (requests, questions, a
different word order) and compares with the training-style prompts: the drop measures how much f_tau
learned the words rather than the templates. Nothing on the training side imports this module (a test
checks it), and none of these sentences can come out of ``pipelines.data.shape_caption``.
"""

from __future__ import annotations

import numpy as np

TEMPLATES = [
    "Please draw me a {size} {colour} {shape} near the {pos} of the picture.",
    "Can you make a {colour} {shape}? It should be {size} and sit at the {pos}.",
    "Show one {shape} which is {colour} and {size}, positioned {pos}.",
    "I would like a {size} {shape} painted {colour}, {pos} please.",
    "Generate an image with a single {colour} {shape} ({size}) towards the {pos}.",
]


def _position(v: str, h: str) -> str:
    return "center" if (v, h) == ("middle", "center") else f"{v} {h}"


def paraphrase(values: dict[str, str], rng: np.random.Generator) -> str:
    """One paraphrase of a shapes image's factors (``shape``, ``colour``, ``size``, ``hpos``, ``vpos``)."""
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    return template.format(shape=values["shape"], colour=values["colour"], size=values["size"],
                           pos=_position(values["vpos"], values["hpos"]))
