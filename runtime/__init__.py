"""Torch-free inference over exported models: ``images`` (ONNX Runtime sessions, sampling, the model
runtime serving holds) and ``text`` (text encoders, the text-to-latent map, code banks). numpy, ONNX
Runtime and tokenizers only; used by export's parity checks and by serving.
"""
