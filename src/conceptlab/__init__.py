"""conceptlab: concept-level explanations of vision-language models, checked against ground truth.

Modules: ``world`` (Concept World), ``models`` (open_clip loading and world CLIP training),
``data`` (real image folders), ``artifacts`` (parameter-keyed store), ``plots``, ``bookrun``
(papermill runner), ``bench`` (benchmarks); one module per method: ``descriptors``, ``explain``,
``deal``, ``ex2``, ``dncbm``, ``lavise``.
"""

__version__ = "0.1.0"
