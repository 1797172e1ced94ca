"""Compression: the techniques a plan applies (``techniques``, one module each), the
fine-tuning recipe they share (``train``) and the compressed file that keeps the result
(``artifact``)."""
