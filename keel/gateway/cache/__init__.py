"""The gateway's response cache: exact and semantic, per alias or per request, scoped by team.

`stage.CacheStage` is the pipeline stage, `keys` decides what is cached and under which key,
`store.CacheStore` keeps entries in the store with memory in front, `routes` has the admin API.
"""

from keel.gateway.cache.routes import router
from keel.gateway.cache.stage import CacheStage

__all__ = ["CacheStage", "router"]
