"""Text-conditioned decoding: f_tau from text to the latent space of a frozen decoder. ``train``
(encoders, the job, the Ray Train loop), ``evaluate``, ``paraphrases``, ``export`` (ONNX), ``registry``.
"""
