"""A training stage as named parts, and `build_stage`, which picks them for the configured stage.

    stage       model (recipes)     data (loaders)   objective (objectives)   evaluator   EMA
    simmim      SimMIMRecipe        MaskedImages     MaskedReconstruction     -           -
    supervised  ClassifierRecipe    LabelledImages   SoftTargetCrossEntropy   Evaluator   -
    finetune    ClassifierRecipe*   LabelledImages   SoftTargetCrossEntropy   Evaluator   stage.ema_decay
    eval        ClassifierRecipe*   LabelledImages   (trains nothing)         Evaluator   -
                * with the class map's head rows (stage.class_map)

The engine is handed `stage.model`; the trainer reads its loader from `stage.data`, forwards every micro batch
through `stage.objective`, and asks `stage.evaluator` (also behind the EMA's eval and +stage=eval).
"""
from __future__ import annotations

from dataclasses import dataclass

from pretrain import start_weights
from pretrain.config import (ConfigError, EvalStageConfig, FinetuneStageConfig, SimMIMStageConfig,
                             SupervisedStageConfig)
from pretrain.process_group import DistContext
from pretrain.evaluator import Evaluator
from pretrain.loaders import LabelledImages, MaskedImages
from pretrain.objectives import MaskedReconstruction, Objective, SoftTargetCrossEntropy
from pretrain.preflight import Start
from pretrain.recipes import ClassifierRecipe, SimMIMRecipe


@dataclass(frozen=True)
class Stage:
    model: SimMIMRecipe | ClassifierRecipe  # build_model(), flops_per_image(), initial_weights()
    data: MaskedImages | LabelledImages  # train_loader() (and val_loader() for labelled images)
    objective: Objective  # loss(engine, batch) -> (loss, extras), images()
    evaluator: Evaluator | None = None  # due(step, total), evaluate(engine); None: the stage has no val data
    ema_decay: float = 0.0  # > 0: the trainer keeps an EMA of the weights (pretrain.ema.WeightEMA)


def build_stage(start: Start, ctx: DistContext | None) -> Stage:
    """The parts for `start.cfg.stage`. `ctx` is needed by the loaders and the evaluator only (None builds a
    stage whose model alone is used, e.g. scripts/plan_memory.py)."""
    cfg, st = start.cfg, start.cfg.stage
    if isinstance(st, SimMIMStageConfig):
        return Stage(model=SimMIMRecipe(cfg.model), data=MaskedImages(cfg, ctx),
                     objective=MaskedReconstruction(st.norm_target_patch if st.norm_target else None,
                                                    cfg.data.mean, cfg.data.std))
    if not isinstance(st, (SupervisedStageConfig, EvalStageConfig)):
        raise ConfigError(f"stage: no stage implementation for {type(st).__name__}")

    class_map = st.class_map if isinstance(st, (FinetuneStageConfig, EvalStageConfig)) else ""
    rows = start_weights.read_class_map(class_map, cfg.data.num_classes) if class_map else None
    model = ClassifierRecipe(cfg.model, cfg.data.num_classes, source=start.source, class_map=class_map,
                             class_rows=tuple(rows) if rows else None)
    data = LabelledImages(cfg, ctx)
    training = not isinstance(st, EvalStageConfig)
    evaluator = None
    if cfg.data.val_urls or not training:  # +stage=eval evaluates whatever data.val_urls says
        evaluator = Evaluator(data.val_loader, ctx, img_size=cfg.model.img_size, batches=st.eval_batches,
                              expected_images=cfg.data.val_samples, every=st.eval_every if training else 0)
    return Stage(model=model, data=data, objective=SoftTargetCrossEntropy(), evaluator=evaluator,
                 ema_decay=st.ema_decay if isinstance(st, FinetuneStageConfig) else 0.0)
