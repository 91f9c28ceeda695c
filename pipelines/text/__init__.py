"""Text-conditioned decoding: f_tau from text to the latent space of a frozen decoder.

``train-text``: ``encoders`` (MiniLM, hashed n-grams), ``job`` (params, decoder and data checked
before Ray starts), ``aligned`` (the aligned set and its targets), ``loop`` and ``captioner`` (the Ray
Train workers), ``outputs`` (the stage output), ``train`` (the run). Then ``evaluate`` (with
``paraphrases``), ``export`` (ONNX) and ``registry``.
"""
