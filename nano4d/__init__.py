"""nano4d: minimal, Triton-kernel-first re-implementations of MIM4D, MuM and GeoLRM.

Models live in ``nano4d/mum.py``, ``nano4d/geolrm.py`` and ``nano4d/mim4d.py`` (each imports only torch,
``kernels`` and the standard library, so you can copy one file into your project). ``nano4d.utils`` (run
plumbing), ``nano4d.cameras``, ``nano4d.metrics`` and the ``nano4d.data`` package are shared by the training scripts.
"""
__version__ = "0.1.0"
