"""Training: the stage loop and evaluation (``loop``), method hooks (``hooks``), LR schedules
(``schedule``), full-state checkpoints (``checkpoint``), seeds (``rng``), the source-domain
pretraining (``pretrain``) and models built with their weights (``build``). Submodules are
imported explicitly, keeping ``p3b_search.training.hooks`` light for the methods."""
