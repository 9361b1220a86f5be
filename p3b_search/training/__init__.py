"""Training: the stage loop and evaluation (``loop``), method hooks (``hooks``), LR schedules
(``schedule``), full-state checkpoints (``checkpoint``), seeds (``rng``) and the digits
source-domain pretraining (``pretrain``). Submodules are imported explicitly, keeping
``p3b_search.training.hooks`` light for the methods."""
