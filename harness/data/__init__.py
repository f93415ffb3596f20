"""Data: reading and preprocessing videos (video), the generated tasks (synthetic, smoke), lmms_eval
task loading (tasks, and the local task YAMLs under tasks/), what data a run answered (identity),
and the cache of encoded videos (feature_cache)."""
