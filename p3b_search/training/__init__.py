"""Training: the stage loop and evaluation (``loop``), LR schedules (``schedule``), full-state
checkpoints (``checkpoint``) and the prefixes trials share (``prefixes``), seeds (``rng``), the
source-domain pretraining (``pretrain``) and models built with their weights (``build``). The
points where a method plugs into the loop are ``p3b_search.methods.hooks``. Submodules are
imported explicitly."""
