"""The teacher out of process: ``gkd serve-teacher`` (:mod:`gkd.serving.server`) and its wire format
(:mod:`gkd.serving.protocol`)."""
