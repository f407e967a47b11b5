"""Stage 1: per-layer sensitivity analysis (BITSFUSION.md §3.1–3.2) and the time-step error analysis.

`settings` (what is measured, the record that keys a file and its cache entry), `measure` (the
proxy set, reference images, scorers, one candidate's weight), `run` (the resumable analysis loop,
the cache path, the text report) and `timesteps` (paper Fig. 4).
"""

from bfq.pipeline.analyze.run import (
    analysis_cache_path,
    analyze,
    analyze_model,
    format_sensitivity,
    shared_analysis,
)
from bfq.pipeline.analyze.settings import (
    DEFAULT_BITS,
    DEFAULT_PROMPTS,
    MODES,
    analysis_settings,
    prefer_workqueue_threads,
)
from bfq.pipeline.analyze.timesteps import (
    format_timestep_table,
    plot_timestep_errors,
    timestep_errors,
)
from bfq.pipeline.sensitivity import model_fingerprint

__all__ = [
    "DEFAULT_BITS", "DEFAULT_PROMPTS", "MODES", "analysis_cache_path", "analysis_settings", "analyze", "analyze_model",
    "format_sensitivity", "format_timestep_table", "model_fingerprint", "plot_timestep_errors",
    "prefer_workqueue_threads", "shared_analysis", "timestep_errors",
]
