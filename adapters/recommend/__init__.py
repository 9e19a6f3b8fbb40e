"""`adapters recommend`: which strategy for this model, data and budget, from `plan`, `bench` and `compare`.

`recommend(RecommendSettings.of(model=..., data=..., memory_limit=..., budget_minutes=...))` plans every candidate,
measures those that fit and ranks them (`adapters.recommend.run`); `adapters.recommend.ranking` holds the rules,
`adapters.recommend.render` what is printed and kept.
"""
from __future__ import annotations

from .run import Candidate, RecommendSettings, default_candidates, recommend

__all__ = ["Candidate", "RecommendSettings", "default_candidates", "recommend"]
