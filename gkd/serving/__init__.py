"""The teacher outside the training process: served by ``gkd serve-teacher`` (:mod:`gkd.serving.server`)
or vLLM and reached through :mod:`gkd.serving.client` (``teacher: http://…``), its wire format
(:mod:`gkd.serving.protocol`), and its scores of a fixed dataset cached once (:mod:`gkd.serving.cache`,
``gkd cache-teacher``, ``teacher_cache:``)."""
