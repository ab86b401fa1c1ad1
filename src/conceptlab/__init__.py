"""conceptlab: concept-level explanations of vision-language models, checked against ground truth.

Shared modules: ``world`` (Concept World), ``models`` (open_clip loading, world CLIP training),
``data`` (real data sets), ``artifacts`` (the content-keyed store), ``training`` (resumable runs),
``chapter`` (the chapter harness), ``plots``, ``explore`` (widgets), ``reliance`` (interventions),
``bookrun`` (papermill runner), ``bench`` (benchmarks). One module per method: ``descriptors``,
``explain`` and ``deal`` (DEAL), ``ex2``, ``judges`` and ``textlm`` (EX2), ``sae`` and ``dncbm``
(DN-CBM), ``cnn`` and ``lavise`` (LaViSE); ``verdict`` scores them all against measured reliance.
"""

__version__ = "0.2.0"
