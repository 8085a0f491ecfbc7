"""Ray actors: thin shells around fedsim's plain objects (filled by the Ray runtime)."""
